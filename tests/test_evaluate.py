"""Metrics against hand computations, the repeated-evaluation protocol, inference plumbing."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mmpl.jsonio import to_builtin

from mmil.checkpoint import save_checkpoint
from mmil.data import BagDataset
from mmil.data.synth import synthetic_bags
from mmil.errors import MMILInputError
from mmil.evaluate import classification_metrics, load_for_inference, predict_probs, predictions_csv, repeated_metrics
from mmil.models import create_model
from mmil_toys import ToyAttnMIL, naive_auc, register_toys


def _naive_metrics(y, probs):
    """Accuracy, balanced accuracy and macro F1 by explicit counting."""
    pred = [max(range(len(p)), key=lambda c: p[c]) for p in probs]
    n = len(y)
    acc = sum(int(a == b) for a, b in zip(y, pred)) / n
    classes_true = sorted(set(y))
    recalls = []
    for c in classes_true:
        idx = [i for i in range(n) if y[i] == c]
        recalls.append(sum(int(pred[i] == c) for i in idx) / len(idx))
    f1s = []
    for c in sorted(set(y) | set(pred)):
        tp = sum(1 for i in range(n) if y[i] == c and pred[i] == c)
        fp = sum(1 for i in range(n) if y[i] != c and pred[i] == c)
        fn = sum(1 for i in range(n) if y[i] == c and pred[i] != c)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return acc, sum(recalls) / len(recalls), sum(f1s) / len(f1s)


def _random_probs(rng, n, c):
    logits = rng.normal(size=(n, c))
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_match_hand_computation(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=37)
    y[:2] = [0, 1]
    probs = _random_probs(rng, 37, 2)
    probs[5] = probs[6]  # a tie for the AUC
    y[5], y[6] = 0, 1
    m = classification_metrics(y, probs)
    acc, bacc, f1 = _naive_metrics(y.tolist(), probs.tolist())
    assert m["accuracy"] == pytest.approx(acc) and m["balanced_accuracy"] == pytest.approx(bacc) and m["f1"] == pytest.approx(f1)
    assert m["auc"] == pytest.approx(naive_auc(y.tolist(), probs[:, 1].tolist()))


def test_multiclass_auc_is_macro_one_vs_rest():
    rng = np.random.default_rng(5)
    y = np.array([0, 1, 2] * 10)
    probs = _random_probs(rng, 30, 3)
    m = classification_metrics(y, probs)
    expected = np.mean([naive_auc((y == c).astype(int).tolist(), probs[:, c].tolist()) for c in range(3)])
    assert m["auc"] == pytest.approx(expected)
    acc, bacc, f1 = _naive_metrics(y.tolist(), probs.tolist())
    assert (m["accuracy"], m["balanced_accuracy"], m["f1"]) == pytest.approx((acc, bacc, f1))


def test_auc_undefined_for_one_class_and_json_null():
    m = classification_metrics([1, 1, 1], np.array([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]))
    assert math.isnan(m["auc"]) and m["accuracy"] == pytest.approx(1 / 3)
    assert to_builtin({"a": [m["auc"], 1.0]}) == {"a": [None, 1.0]}


def test_repeated_metrics_mean_std_and_ensemble():
    rng = np.random.default_rng(7)
    y = np.array([0, 1] * 12)
    probs_r = np.stack([_random_probs(rng, 24, 2) for _ in range(5)])
    r = repeated_metrics(y, probs_r)
    aucs = [naive_auc(y.tolist(), p[:, 1].tolist()) for p in probs_r]
    accs = [_naive_metrics(y.tolist(), p.tolist())[0] for p in probs_r]
    assert r["auc"] == pytest.approx(np.mean(aucs)) and r["auc_std"] == pytest.approx(np.std(aucs))
    assert r["accuracy"] == pytest.approx(np.mean(accs)) and r["accuracy_std"] == pytest.approx(np.std(accs))
    assert r["ensemble"]["auc"] == pytest.approx(naive_auc(y.tolist(), probs_r.mean(0)[:, 1].tolist()))
    assert len(r["repeats"]) == 5


def test_predict_probs_repeat_r_uses_seed_plus_r():
    torch.manual_seed(0)
    model = ToyAttnMIL(8, 3, seed_noise=1.0).eval()
    bags = synthetic_bags(4, seed=0, in_dim=8, min_instances=5, max_instances=9)
    ds = BagDataset.from_bags(bags)
    out = predict_probs(model, ds, seed=5, repeats=3)
    assert out.shape == (3, 4, 3)
    with torch.no_grad():
        for r in range(3):
            for i, b in enumerate(bags):
                direct = model(b.features, seed=5 + r).probs[0].numpy()
                np.testing.assert_allclose(out[r, i], direct, rtol=1e-6, atol=1e-7)
    assert not np.allclose(out[0], out[1])  # the seeds differ, so do the runs
    np.testing.assert_array_equal(out, predict_probs(model, ds, seed=5, repeats=3))


def test_bf16_inference_close_to_fp32_with_mmil():
    torch.manual_seed(0)
    model = create_model("mmil", in_dim=16, n_classes=2, embed_dim=32, heads=2, head_dim=16, num_subbags=3).eval()
    ds = BagDataset.from_bags(synthetic_bags(4, seed=1, in_dim=16, min_instances=40, max_instances=80))
    p32 = predict_probs(model, ds, seed=3, repeats=2)
    p16 = predict_probs(model, ds, seed=3, repeats=2, precision="bf16")
    assert np.abs(p32 - p16).max() < 3e-2
    assert not np.array_equal(p32, p16)  # autocast really ran in bf16


def test_load_for_inference_checks_dim_classes_and_standardization(tmp_path):
    name = register_toys()
    torch.manual_seed(0)
    model = create_model(name, in_dim=8, n_classes=2)
    mean, std = np.arange(8, dtype=np.float32), np.full(8, 2.0, np.float32)
    save_checkpoint(tmp_path / "ck", model, name, model.init_kwargs, extra={"class_names": ["normal", "tumor"], "standardize": {"mean": mean.tolist(), "std": std.tolist()}})
    bags = synthetic_bags(4, seed=0, in_dim=8, min_instances=5, max_instances=9)
    ds = BagDataset.from_bags(bags, class_names=["normal", "tumor"])
    loaded, ds2, cfg = load_for_inference(tmp_path / "ck", ds)
    np.testing.assert_allclose(ds2[0].features.numpy(), (bags[0].features.numpy() - mean) / std, rtol=1e-6)
    assert ds2.class_names == ["normal", "tumor"] and ds2.labels.tolist() == ds.labels.tolist()
    wrong = BagDataset.from_bags(synthetic_bags(2, seed=0, in_dim=6, min_instances=5, max_instances=9))
    with pytest.raises(MMILInputError, match=r"ck: checkpoint expects in_dim=8.*dimension 6"):
        load_for_inference(tmp_path / "ck", wrong)
    other = BagDataset.from_bags(bags, class_names=["benign", "tumor"])
    with pytest.raises(MMILInputError, match="'benign'.*not one of the checkpoint's classes"):
        load_for_inference(tmp_path / "ck", other)


def test_predictions_csv_layout():
    text = predictions_csv(["a", "b"], np.array([[0.25, 0.75], [0.9, 0.1]]))
    assert text.splitlines() == ["slide_id,prob_0,prob_1,pred_label", "a,0.250000,0.750000,1", "b,0.900000,0.100000,0"]
    named = predictions_csv(["a", "b"], np.array([[0.25, 0.75], [0.9, 0.1]]), [0, 0], class_names=["normal", "tumor"])
    assert named.splitlines() == ["slide_id,label,prob_normal,prob_tumor,pred_label", "a,normal,0.250000,0.750000,tumor", "b,normal,0.900000,0.100000,normal"]
