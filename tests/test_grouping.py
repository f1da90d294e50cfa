"""Grouping functions against numpy (array_split, a naive Lloyd loop) and by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmil.grouping import (
    GROUPINGS,
    Grouping,
    GroupingInputs,
    array_split_sizes,
    cap_subbags,
    drop_subbags,
    get_grouping,
    index_groups,
    kmeans_groups,
    kmeans_init,
    lloyd,
    make_generator,
    random_groups,
    register_grouping,
    sequential_groups,
)

SIZES = [(1, 1), (1, 4), (3, 5), (10, 10), (11, 10), (19, 10), (23, 4), (100, 7), (4301, 10)]



def _gen(seed: int) -> torch.Generator:
    return make_generator(seed, "cpu")


@pytest.mark.parametrize("n,g", SIZES)
def test_array_split_sizes_match_numpy(n, g):
    assert array_split_sizes(n, g) == [len(c) for c in np.array_split(np.arange(n), g)]


@pytest.mark.parametrize("n,g", SIZES)
def test_sequential_groups_equal_numpy_array_split(n, g):
    ids = sequential_groups(torch.ones(1, n, dtype=torch.bool), g)[0].numpy()
    expected = np.concatenate([np.full(len(c), j) for j, c in enumerate(np.array_split(np.arange(n), g))])
    np.testing.assert_array_equal(ids, expected)


@pytest.mark.parametrize("n,g", SIZES)
def test_random_groups_are_a_permutation_cut_like_array_split(n, g):
    ids = random_groups(torch.ones(1, n, dtype=torch.bool), g, _gen(n + g))[0]
    counts = torch.bincount(ids, minlength=g).tolist()
    assert counts == [len(c) for c in np.array_split(np.arange(n), g)]


def test_padded_batch_groups_each_bag_by_its_own_size():
    lengths = [23, 9, 3]
    mask = torch.arange(23).view(1, -1) < torch.tensor(lengths).view(-1, 1)
    for ids in (random_groups(mask, 4, _gen(0)), sequential_groups(mask, 4)):
        assert bool((ids[~mask] == -1).all())
        for b, n in enumerate(lengths):
            assert torch.bincount(ids[b, :n], minlength=4).tolist() == array_split_sizes(n, 4)
    # Sequential follows stored order even when real instances are not contiguous.
    holes = torch.tensor([[True, False, True, True, False, True]])
    assert sequential_groups(holes, 2).tolist() == [[0, -1, 0, 1, -1, 1]]


def test_random_groups_uniform_over_partitions():
    # 3000 bags of 4 instances in 2 chunks: each of the 6 possible first chunks ~ 500 times.
    ids = random_groups(torch.ones(3000, 4, dtype=torch.bool), 2, _gen(1))
    first = ids == 0
    codes = (first.long() * torch.tensor([1, 2, 4, 8])).sum(1)
    counts = torch.bincount(codes, minlength=16)
    assert int((counts > 0).sum()) == 6 and bool((first.sum(1) == 2).all())
    assert counts[counts > 0].min() > 400 and counts.max() < 600  # ~5 standard deviations


def test_random_groups_seeded_and_leave_global_rng_alone():
    mask = torch.ones(2, 50, dtype=torch.bool)
    state = torch.get_rng_state()
    a = random_groups(mask, 5, _gen(7))
    b = random_groups(mask, 5, _gen(7))
    c = random_groups(mask, 5, _gen(8))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _numpy_lloyd(points, init, iters):
    """Textbook Lloyd: assign to nearest centroid, move centroids to members' mean."""
    c = init.copy()
    d = ((points[:, None, :] - c[None]) ** 2).sum(-1)
    ids = d.argmin(1)
    for _ in range(iters):
        for g in range(len(c)):
            members = points[ids == g]
            if len(members):
                c[g] = members.mean(0)
        new = ((points[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        if np.array_equal(new, ids):
            ids = new
            break
        ids = new
    return ids, c


@pytest.mark.parametrize("dim", [2, 40])  # direct distances and the matmul expansion
def test_lloyd_matches_naive_numpy_loop(dim):
    rng = np.random.default_rng(0)
    lengths, G = [60, 37], 5
    pts = rng.normal(size=(2, 60, dim)) + rng.integers(0, 4, size=(2, 60, 1)) * 1.5
    mask = torch.arange(60).view(1, -1) < torch.tensor(lengths).view(-1, 1)
    pts_t = torch.tensor(pts)
    pts_t[~mask] = 1e6  # garbage in the pads must be ignored
    init_idx = torch.tensor([[0, 5, 9, 20, 33], [1, 2, 3, 30, 36]])
    init = torch.gather(pts_t, 1, init_idx.unsqueeze(-1).expand(-1, -1, dim))
    valid = torch.ones(2, G, dtype=torch.bool)
    ids, cent = lloyd(pts_t, mask, init, valid, iters=4)
    for b, n in enumerate(lengths):
        ref_ids, ref_c = _numpy_lloyd(pts[b, :n], pts[b, init_idx[b].numpy()], 4)
        np.testing.assert_array_equal(ids[b, :n].numpy(), ref_ids)
        np.testing.assert_allclose(cent[b].numpy(), ref_c, rtol=0, atol=1e-9)
        assert bool((ids[b, n:] == -1).all())


def test_kmeans_groups_equal_numpy_with_same_init_on_large_coords():
    # Pixel coordinates around 1e5 in float32: centring keeps the assignment exact.
    rng = np.random.default_rng(3)
    centres = np.array([[1e5, 2e5], [1.05e5, 2e5], [1e5, 2.05e5], [1.05e5, 2.05e5]])
    blob = rng.integers(0, 4, 200)
    pts = centres[blob] + rng.normal(scale=800, size=(200, 2))
    mask = torch.ones(1, 200, dtype=torch.bool)
    ids = kmeans_groups(torch.tensor(pts, dtype=torch.float32).unsqueeze(0), mask, 4, iters=10, generator=_gen(5))[0]
    init_idx, _ = kmeans_init(mask, 4, _gen(5))  # same generator state -> same initial points
    ref_ids, _ = _numpy_lloyd(pts, pts[init_idx[0].numpy()], 10)
    np.testing.assert_array_equal(ids.numpy(), ref_ids)
    assert len(set(ids.tolist())) == 4


def test_kmeans_fewer_instances_than_groups_and_determinism():
    mask = torch.tensor([[True, True, True, False, False, False]])
    pts = torch.randn(1, 6, 3)
    init_idx, valid = kmeans_init(mask, 5, _gen(0))
    assert valid.tolist() == [[True, True, True, False, False]]
    assert sorted(init_idx[0, :3].tolist()) == [0, 1, 2]
    ids = kmeans_groups(pts, mask, 5, generator=_gen(0))
    assert sorted(ids[0, :3].tolist()) == [0, 1, 2] and ids[0, 3:].tolist() == [-1] * 3
    big = torch.randn(2, 300, 8)
    m2 = torch.ones(2, 300, dtype=torch.bool)
    assert torch.equal(kmeans_groups(big, m2, 6, generator=_gen(4)), kmeans_groups(big, m2, 6, generator=_gen(4)))
    assert not torch.equal(kmeans_groups(big, m2, 6, iters=0, generator=_gen(4)), kmeans_groups(big, m2, 6, iters=0, generator=_gen(5)))


def test_index_groups_remap_gaps_and_negatives_per_bag():
    labels = torch.tensor([[7, 3, 42, 3, -1, 99], [5, 5, 100, 0, 0, 0]])
    mask = torch.tensor([[True, True, True, True, True, False], [True, True, True, False, False, False]])
    ids, counts = index_groups(labels, mask)
    assert ids.tolist() == [[2, 1, 3, 1, 0, -1], [0, 0, 1, -1, -1, -1]]
    assert counts.tolist() == [4, 2]
    with pytest.raises(ValueError, match="shape"):
        index_groups(labels[:, :3], mask)


@pytest.mark.parametrize("g,ratio,kept", [(10, 0.6, 4), (4, 0.75, 1), (10, 0.0, 10), (10, 0.95, 1), (10, 0.7, 3), (3, 0.5, 1)])
def test_drop_subbags_keeps_int_of_g_times_one_minus_ratio(g, ratio, kept):
    n = 50
    ids = sequential_groups(torch.ones(3, n, dtype=torch.bool), g)
    valid = torch.ones(3, g, dtype=torch.bool)
    new_ids, keep = drop_subbags(ids, valid, ratio, _gen(2))
    assert keep.sum(1).tolist() == [kept] * 3
    for b in range(3):
        kept_groups = set(torch.nonzero(keep[b]).flatten().tolist())
        for i in range(n):
            assert new_ids[b, i].item() == (ids[b, i].item() if ids[b, i].item() in kept_groups else -1)


def test_drop_subbags_random_and_respects_invalid():
    ids = sequential_groups(torch.ones(1, 40, dtype=torch.bool), 10)
    valid = torch.ones(1, 10, dtype=torch.bool)
    kept_sets = {tuple(drop_subbags(ids, valid, 0.6, _gen(s))[1][0].tolist()) for s in range(10)}
    assert len(kept_sets) > 3
    # Per-bag sub-bag counts (index grouping): never keeps a sub-bag that does not exist.
    valid2 = torch.tensor([[True] * 4 + [False] * 6])
    for s in range(10):
        _, keep = drop_subbags(ids, valid2, 0.5, _gen(s))
        assert int(keep.sum()) == 2 and not bool(keep[0, 4:].any())
    with pytest.raises(ValueError):
        drop_subbags(ids, valid, 1.0)


def test_cap_subbags_keeps_random_subset_of_size_cap():
    mask = torch.ones(2, 30, dtype=torch.bool)
    ids = sequential_groups(mask, 3)  # sizes 10, 10, 10
    ids[1, 20:] = -1  # bag 1: third sub-bag absent
    ids[1, :10] = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    capped = cap_subbags(ids, 3, 4, _gen(0))
    kept = capped >= 0
    assert bool((capped[kept] == ids[kept]).all())  # survivors keep their sub-bag
    assert torch.bincount(capped[0][capped[0] >= 0], minlength=3).tolist() == [4, 4, 4]
    assert torch.bincount(capped[1][capped[1] >= 0], minlength=3).tolist() == [3, 4, 0]
    assert bool((capped[1, :3] == 0).all())  # sub-bag smaller than the cap is untouched
    subsets = {tuple(cap_subbags(ids, 3, 4, _gen(s))[0].tolist()) for s in range(6)}
    assert len(subsets) > 1


def test_registry_gives_every_grouping_one_signature_and_one_result():
    assert GROUPINGS == ("random", "sequential", "embedding", "coords", "index")
    assert [get_grouping(n).needs for n in GROUPINGS] == [None, None, "features", "coords", "groups"]
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(12).view(1, -1) < torch.tensor([12, 7]).view(-1, 1)
    features, coords = torch.randn(2, 12, 5, generator=g), torch.rand(2, 12, 2, generator=g) * 1000
    labels = torch.tensor([[4, 4, 9, 1, 1, 1, 9, 4, 4, 1, 9, 9], [2, 2, 2, 0, 0, 2, 2, 7, 7, 7, 7, 7]])
    # each registered mode is its building block, and the result type is the same for all
    expected = {
        "random": (random_groups(mask, 4, _gen(3)), [4, 4]),
        "sequential": (sequential_groups(mask, 4), [4, 4]),
        "embedding": (kmeans_groups(features, mask, 4, 10, _gen(3)), [4, 4]),
        "coords": (kmeans_groups(coords, mask, 4, 10, _gen(3)), [4, 4]),
        "index": (index_groups(labels, mask)[0], [3, 2]),
    }
    for name in GROUPINGS:
        inputs = GroupingInputs(mask, 4, features=features, coords=coords, groups=labels, generator=_gen(3))
        result = get_grouping(name).fn(inputs)
        assert isinstance(result, Grouping), name
        ids, counts = expected[name]
        assert torch.equal(result.ids, ids) and result.counts.tolist() == counts, name
        assert result.valid.tolist() == [[j < c for j in range(max(counts))] for c in counts], name
    # single-bag coords / labels without the batch axis are accepted
    one = torch.ones(1, 12, dtype=torch.bool)
    assert torch.equal(get_grouping("index").fn(GroupingInputs(one, 4, groups=labels[0])).ids, index_groups(labels[:1], one)[0])
    assert get_grouping("coords").fn(GroupingInputs(one, 4, coords=coords[0], generator=_gen(1))).ids.shape == (1, 12)


def test_registry_rejects_unknown_names_missing_inputs_and_duplicates():
    mask = torch.ones(1, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown grouping 'kmeans'.*random, sequential, embedding, coords, index"):
        get_grouping("kmeans")
    with pytest.raises(ValueError, match="needs patch coordinates"):
        get_grouping("coords").fn(GroupingInputs(mask, 2))
    with pytest.raises(ValueError, match=r"coords must have shape \(1, 5, 2\)"):
        get_grouping("coords").fn(GroupingInputs(mask, 2, coords=torch.zeros(1, 4, 2)))
    with pytest.raises(ValueError, match="needs precomputed group labels"):
        get_grouping("index").fn(GroupingInputs(mask, 2))
    with pytest.raises(ValueError, match="needs the projected features"):
        get_grouping("embedding").fn(GroupingInputs(mask, 2))
    with pytest.raises(ValueError, match="registered twice"):
        register_grouping("random")(lambda inputs: None)
