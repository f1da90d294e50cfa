"""Instances -> sub-bag ids: the grouping step of the MMIL-Transformer (``docs/method/mmil.md §1.3``).

Every grouping works on a padded batch and gives per-instance sub-bag ids of
shape ``(B, N)`` (int64): ``0 .. G-1`` for real instances, ``-1`` at padded (or
dropped) positions. Mask convention: ``mask`` is bool ``(B, N)``, True = real.
Randomness comes only from a :class:`torch.Generator` (``None``: torch's global
RNG); the same generator state and inputs always give the same ids.

The modes are registered by name (:func:`register_grouping`, :func:`get_grouping`,
:data:`GROUPINGS`) with one signature, ``(GroupingInputs) -> Grouping``: ``random``
(:func:`random_groups`, a uniform permutation cut into G chunks), ``sequential``
(:func:`sequential_groups`, stored order cut into G chunks), ``embedding`` and
``coords`` (:func:`kmeans_groups` on the projected features / the patch
coordinates) and ``index`` (:func:`index_groups`, precomputed labels -> 0..m-1).
Chunk sizes follow :func:`numpy.array_split`: the first ``n mod G`` chunks hold
``n // G + 1`` instances, the others ``n // G`` (with ``n < G`` the last ``G - n``
are empty). Afterwards :func:`drop_subbags` (sub-bag masking) and
:func:`cap_subbags` (the release's size cap, off by default) may thin the ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

# Points of at most this many dimensions use the exact difference form of the
# squared distance; wider ones the matmul expansion (memory B*N*G instead of B*N*G*P).
_DIRECT_DISTANCE_MAX_DIM = 16


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A fresh generator on ``device`` seeded with ``seed``, or ``None`` (global RNG) for ``seed=None``."""
    if seed is None:
        return None
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(seed))
    return gen


def array_split_sizes(n: int, num_groups: int) -> list[int]:
    """Chunk sizes of ``numpy.array_split(range(n), num_groups)``.

    ``size_g = n // G + 1`` for ``g < n mod G``, else ``n // G``.
    """
    q, r = divmod(int(n), int(num_groups))
    return [q + 1 if g < r else q for g in range(num_groups)]


def chunk_of_rank(rank: Tensor, n: Tensor, num_groups: int) -> Tensor:
    """Chunk index of the element at position ``rank`` when ``n`` elements are cut
    into ``num_groups`` chunks as :func:`numpy.array_split` does.

    With ``q = n // G`` and ``r = n mod G`` the first ``r`` chunks have ``q + 1``
    elements: ``chunk = rank // (q + 1)`` if ``rank < r (q + 1)`` else
    ``r + (rank - r (q + 1)) // q``.

    Args:
        rank: ``(B, N)`` int64 positions (only entries with ``rank < n`` are meaningful).
        n: ``(B,)`` int64 number of elements per row.
    """
    n = n.view(-1, 1)
    q = torch.div(n, num_groups, rounding_mode="floor")
    r = n - q * num_groups
    big = r * (q + 1)  # elements held by the larger chunks
    first = torch.div(rank, q + 1, rounding_mode="floor")
    # q == 0 only when n < G, and then every rank < n = r lies in the first branch.
    second = r + torch.div(rank - big, q.clamp(min=1), rounding_mode="floor")
    return torch.where(rank < big, first, second)


def _check_mask(mask: Tensor) -> None:
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a (B, N) bool tensor, got {tuple(mask.shape)} {mask.dtype}")


def _ranks_of_keys(keys: Tensor) -> Tensor:
    """Position of each entry of ``keys`` (per row) in ascending order (inverse argsort)."""
    order = torch.argsort(keys, dim=1, stable=True)
    ar = torch.arange(keys.shape[1], device=keys.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ar)


def random_groups(mask: Tensor, num_groups: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform random permutation of each bag's real instances cut into ``num_groups``
    consecutive chunks (sizes as :func:`array_split_sizes`). Returns ``(B, N)`` ids, -1 at pads.

    The permutation is the argsort of i.i.d. uniform keys; padded positions draw keys
    too (so the ids of real instances do not depend on what is in the pads) but are
    sorted last.
    """
    _check_mask(mask)
    keys = torch.rand(mask.shape, generator=generator, device=mask.device)
    keys = keys.masked_fill(~mask, 2.0)
    rank = _ranks_of_keys(keys)
    ids = chunk_of_rank(rank, mask.sum(dim=1), num_groups)
    return ids.masked_fill(~mask, -1)


def sequential_groups(mask: Tensor, num_groups: int) -> Tensor:
    """Real instances in stored order cut into ``num_groups`` consecutive chunks
    (sizes as :func:`array_split_sizes`). Returns ``(B, N)`` ids, -1 at pads."""
    _check_mask(mask)
    rank = torch.cumsum(mask.long(), dim=1) - 1
    ids = chunk_of_rank(rank, mask.sum(dim=1), num_groups)
    return ids.masked_fill(~mask, -1)


def index_groups(labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Remap precomputed group labels to dense ids per bag.

    The distinct labels of bag b's real instances, sorted ascending, become
    ``0 .. m_b - 1`` (so gaps such as ``{3, 7, 42}`` and negative labels are fine).

    Returns:
        ids: ``(B, N)`` int64, -1 at pads.
        counts: ``(B,)`` int64, the number ``m_b`` of sub-bags of each bag.
    """
    _check_mask(mask)
    if labels.shape != mask.shape:
        raise ValueError(f"group labels must have shape {tuple(mask.shape)} to match the bag, got {tuple(labels.shape)}")
    if labels.is_floating_point() and not bool(torch.equal(labels[mask], labels[mask].round())):
        raise ValueError("group labels must be integers")
    B, N = mask.shape
    labels = labels.long()
    real = labels[mask]
    bag_of_real = torch.arange(B, device=mask.device).view(B, 1).expand(B, N)[mask]
    lo = real.min()
    span = real.max() - lo + 1
    key = bag_of_real * span + (real - lo)  # sorts by bag, then by label
    uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
    counts = torch.bincount(torch.div(uniq, span, rounding_mode="floor"), minlength=B)
    starts = torch.cumsum(counts, 0) - counts
    ids = torch.full((B, N), -1, dtype=torch.long, device=mask.device)
    ids[mask] = inverse - starts[bag_of_real]
    return ids, counts


def kmeans_init(mask: Tensor, num_groups: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Initial centroids for :func:`lloyd`: ``num_groups`` distinct real instances
    per bag, chosen uniformly at random.

    Returns:
        index: ``(B, G)`` int64 instance indices (0 where not valid).
        valid: ``(B, G)`` bool; False for ``g >= n_b`` when a bag has fewer
        instances than groups (those clusters stay empty).
    """
    _check_mask(mask)
    keys = torch.rand(mask.shape, generator=generator, device=mask.device).masked_fill(~mask, 2.0)
    order = torch.argsort(keys, dim=1, stable=True)
    B, N = mask.shape
    if N < num_groups:
        order = torch.cat([order, order.new_zeros(B, num_groups - N)], dim=1)
    index = order[:, :num_groups]
    valid = torch.arange(num_groups, device=mask.device).view(1, -1) < mask.sum(dim=1, keepdim=True)
    return index.masked_fill(~valid, 0), valid


def _squared_distances(points: Tensor, centroids: Tensor) -> Tensor:
    """``d[b, i, g] = ||points[b, i] - centroids[b, g]||^2`` as ``(B, N, G)``."""
    if points.shape[-1] <= _DIRECT_DISTANCE_MAX_DIM:
        return (points.unsqueeze(2) - centroids.unsqueeze(1)).pow(2).sum(-1)
    cross = torch.bmm(points, centroids.transpose(1, 2))
    return points.pow(2).sum(-1, keepdim=True) - 2 * cross + centroids.pow(2).sum(-1).unsqueeze(1)


def lloyd(points: Tensor, mask: Tensor, centroids: Tensor, valid: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means iterations from given centroids, batched over bags.

    Each iteration assigns every real instance to its nearest valid centroid
    (squared Euclidean distance, ties to the lowest index), then moves each
    centroid to the mean of its members; a centroid with no member stays where it
    is. Stops early once no assignment changes. The returned assignment is the one
    of the final centroids.

    Args:
        points: ``(B, N, P)`` float; padded rows are ignored.
        mask: ``(B, N)`` bool.
        centroids: ``(B, G, P)`` initial centroids.
        valid: ``(B, G)`` bool; invalid centroids never receive instances.
        iters: maximum number of update steps (>= 0).

    Returns:
        ids ``(B, N)`` int64 (-1 at pads) and the final centroids ``(B, G, P)``.
    """
    _check_mask(mask)
    num_groups = centroids.shape[1]
    weight = mask.to(points.dtype).unsqueeze(-1)

    def assign(c: Tensor) -> Tensor:
        d = _squared_distances(points, c).masked_fill(~valid.unsqueeze(1), float("inf"))
        return d.argmin(dim=-1)

    ids = assign(centroids)
    for _ in range(iters):
        # One-hot matmul instead of scatter_add: deterministic on CUDA as well.
        onehot = torch.nn.functional.one_hot(ids, num_groups).to(points.dtype) * weight
        sums = torch.bmm(onehot.transpose(1, 2), points)
        counts = onehot.sum(dim=1).unsqueeze(-1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        new_ids = assign(centroids)
        changed = bool(((new_ids != ids) & mask).any())
        ids = new_ids
        if not changed:
            break
    return ids.masked_fill(~mask, -1), centroids


def kmeans_groups(points: Tensor, mask: Tensor, num_groups: int, iters: int = 10, generator: torch.Generator | None = None) -> Tensor:
    """k-means sub-bags: :func:`kmeans_init` then :func:`lloyd` (``iters`` steps).

    Runs on ``points``' device, without autograd, in float32 (float64 inputs stay
    float64). Points are centred per bag first (k-means is translation invariant;
    centring keeps the distance expansion accurate for large pixel coordinates).
    Clusters may come out empty; the model handles empty sub-bags.
    Returns ``(B, N)`` ids, -1 at pads.
    """
    _check_mask(mask)
    if points.dim() != 3 or points.shape[:2] != mask.shape:
        raise ValueError(f"k-means points must have shape (B, N, P) matching mask {tuple(mask.shape)}, got {tuple(points.shape)}")
    device_type = points.device.type
    with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False):
        dtype = torch.float64 if points.dtype == torch.float64 else torch.float32
        pts = points.detach().to(dtype)
        w = mask.to(dtype).unsqueeze(-1)
        pts = torch.where(mask.unsqueeze(-1), pts, torch.zeros((), dtype=dtype, device=pts.device))
        centre = (pts * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)
        pts = (pts - centre) * w
        index, valid = kmeans_init(mask, num_groups, generator)
        init = torch.gather(pts, 1, index.unsqueeze(-1).expand(-1, -1, pts.shape[-1]))
        ids, _ = lloyd(pts, mask, init, valid, iters)
    return ids


def drop_subbags(ids: Tensor, valid: Tensor, mask_ratio: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Sub-bag masking (``docs/method/mmil.md §1.7``): keep ``r_b = max(1, int(m_b * (1 - mask_ratio)))``
    of bag b's ``m_b`` sub-bags, chosen uniformly at random; the others vanish
    (their instances get id -1 and ``valid`` becomes False).

    Empty sub-bags count as sub-bags, as in the release. ``int`` truncates like
    Python's (e.g. G=10, ratio 0.6 keeps 4).

    Returns the new ``(ids, valid)``; ``ids`` keep their original numbering.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    m = valid.sum(dim=1, keepdim=True)
    keep_n = torch.floor(m.to(torch.float64) * (1.0 - mask_ratio)).long().clamp(min=1)
    keys = torch.rand(valid.shape, generator=generator, device=valid.device).masked_fill(~valid, 2.0)
    keep = valid & (_ranks_of_keys(keys) < keep_n)
    inst_keep = (ids >= 0) & torch.gather(keep, 1, ids.clamp(min=0))
    return ids.masked_fill(~inst_keep, -1), keep


def cap_subbags(ids: Tensor, num_groups: int, max_size: int, generator: torch.Generator | None = None) -> Tensor:
    """Keep at most ``max_size`` instances per sub-bag, a uniformly random subset
    (the release's cap, which it applies silently with 4300). Instances beyond the
    cap get id -1. ``num_groups`` is the number of id values (``ids < num_groups``).
    """
    if max_size < 1:
        raise ValueError(f"max_subbag_size must be >= 1, got {max_size}")
    B, N = ids.shape
    keys = torch.rand(ids.shape, generator=generator, device=ids.device)
    # Sort by (bag, group, key): random order inside each sub-bag; -1 goes last.
    slot = torch.where(ids >= 0, ids + num_groups * torch.arange(B, device=ids.device).view(B, 1), B * num_groups).flatten()
    by_key = torch.argsort(keys.flatten(), stable=True)
    order = by_key[torch.argsort(slot[by_key], stable=True)]
    counts = torch.bincount(slot, minlength=B * num_groups + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(slot)
    rank[order] = torch.arange(B * N, device=ids.device) - starts[slot[order]]
    return ids.masked_fill(rank.view(B, N) >= max_size, -1)


# ------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class GroupingInputs:
    """Everything a grouping may read (each reads what it needs): the ``(B, N)`` bool ``mask``,
    G = ``num_groups`` (``index`` takes it from the labels), the projected ``features`` ``(B, N, D)``
    (``embedding``), patch ``coords`` ``(B, N, 2)`` (``coords``), integer labels ``groups``
    ``(B, N)`` (``index``; single bags may drop the batch axis), and ``generator`` (None: global RNG)."""

    mask: Tensor
    num_groups: int
    features: Tensor | None = None
    coords: Tensor | None = None
    groups: Tensor | None = None
    kmeans_iters: int = 10
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class Grouping:
    """The result of every grouping.

    ``ids`` ``(B, N)`` int64: the sub-bag of each instance, ``-1`` at pads. ``counts`` ``(B,)``
    int64: the sub-bags of each bag, empty ones included (G; for ``index`` the number of labels).
    """

    ids: Tensor
    counts: Tensor

    @property
    def valid(self) -> Tensor:
        """``(B, max counts)`` bool: which sub-bag ids exist in each bag."""
        width = int(self.counts.max())
        return torch.arange(width, device=self.counts.device).view(1, -1) < self.counts.view(-1, 1)


GroupingFn = Callable[[GroupingInputs], Grouping]


@dataclass(frozen=True)
class GroupingSpec:
    """A registered grouping and the input it needs besides the mask (features, coords, groups or None)."""

    name: str
    fn: GroupingFn
    needs: str | None = None


_REGISTRY: dict[str, GroupingSpec] = {}


def register_grouping(name: str, needs: str | None = None) -> Callable[[GroupingFn], GroupingFn]:
    """Decorator registering ``fn(inputs: GroupingInputs) -> Grouping`` as grouping ``name``;
    ``needs`` names the one input it reads besides the mask (features, coords, groups or None)."""

    def wrap(fn: GroupingFn) -> GroupingFn:
        if name in _REGISTRY:
            raise ValueError(f"grouping {name!r} registered twice")
        _REGISTRY[name] = GroupingSpec(name, fn, needs)
        return fn

    return wrap


def list_groupings() -> tuple[str, ...]:
    """Registered grouping names, in registration order."""
    return tuple(_REGISTRY)


def get_grouping(name: str) -> GroupingSpec:
    """The grouping registered as ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown grouping {name!r}; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def _same_count(ids: Tensor, num_groups: int) -> Grouping:
    return Grouping(ids, torch.full((ids.shape[0],), int(num_groups), dtype=torch.long, device=ids.device))


def _per_bag(value: Tensor | None, mask: Tensor, name: str, needed: str, trailing: tuple[int, ...] = ()) -> Tensor:
    """A per-instance input as ``(B, N, *trailing)`` on the mask's device; ``ValueError`` if absent."""
    if value is None:
        raise ValueError(needed)
    if value.dim() == 1 + len(trailing):
        value = value.unsqueeze(0)
    if trailing and value.shape[:2] != mask.shape:
        raise ValueError(f"{name} must have shape {(*mask.shape, *trailing)}, got {tuple(value.shape)}")
    return value.to(mask.device)


@register_grouping("random")
def _random(inputs: GroupingInputs) -> Grouping:
    return _same_count(random_groups(inputs.mask, inputs.num_groups, inputs.generator), inputs.num_groups)


@register_grouping("sequential")
def _sequential(inputs: GroupingInputs) -> Grouping:
    return _same_count(sequential_groups(inputs.mask, inputs.num_groups), inputs.num_groups)


@register_grouping("embedding", needs="features")
def _embedding(inputs: GroupingInputs) -> Grouping:
    if inputs.features is None:
        raise ValueError("grouping='embedding' needs the projected features")
    ids = kmeans_groups(inputs.features, inputs.mask, inputs.num_groups, inputs.kmeans_iters, inputs.generator)
    return _same_count(ids, inputs.num_groups)


@register_grouping("coords", needs="coords")
def _coords(inputs: GroupingInputs) -> Grouping:
    needed = "grouping='coords' needs patch coordinates: pass coords (B, N, 2) or use another grouping"
    coords = _per_bag(inputs.coords, inputs.mask, "coords", needed, trailing=(2,))
    ids = kmeans_groups(coords, inputs.mask, inputs.num_groups, inputs.kmeans_iters, inputs.generator)
    return _same_count(ids, inputs.num_groups)


@register_grouping("index", needs="groups")
def _index(inputs: GroupingInputs) -> Grouping:
    needed = "grouping='index' needs precomputed group labels: pass groups (B, N) or use another grouping"
    ids, counts = index_groups(_per_bag(inputs.groups, inputs.mask, "groups", needed), inputs.mask)
    return Grouping(ids, counts)


GROUPINGS = list_groupings()  # the built-in modes: random, sequential, embedding, coords, index
