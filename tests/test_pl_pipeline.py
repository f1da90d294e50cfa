"""The run pipeline end to end on digits: report contents checked against independent recomputation,
resumable steps, staleness, and refusal of a run directory made for another model."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from prunelimit import create_model, load_dataset, predict_threshold
from prunelimit.errors import PruneLimitError
from prunelimit.estimators import SpectrumEstimate
from prunelimit.io import load_state_dict
from prunelimit import pipeline
from prunelimit.pipeline import open_run, run_pipeline
from prunelimit.summary import REPORT_KEYS



TINY = {
    "model": "lenet300", "dataset": "digits", "lam": 1e-3, "epochs": 3, "lanczos_steps": 30, "probes": 2,
    "trace_samples": 4, "hessian_samples": 300,
}
LENET300_DIGITS_D = 64 * 300 + 300 * 100 + 100 * 10


def _quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("plrun") / "run"
    report = run_pipeline(out, TINY, progress=False, log=_quiet)
    return out, report


def _load_trained(out):
    info = json.loads((out / "model.json").read_text())
    model = create_model(info["model"], info["in_shape"], info["num_classes"])
    model.load_state_dict(load_state_dict(out / "model.safetensors"))
    return model.eval()


def _weights(model):
    return torch.cat([m.weight.detach().reshape(-1) for m in model.modules() if isinstance(m, nn.Linear)]).double().numpy()


def test_report_has_required_keys_and_sane_values(finished):
    out, report = finished
    on_disk = json.loads((out / "report.json").read_text())
    for key in REPORT_KEYS + ("predicted_kept_fraction", "lanczos_steps", "probes", "p0_used", "regime_fraction", "sensitivity"):
        assert key in on_disk, key
    assert on_disk["predicted_threshold"] == report["predicted_threshold"]
    assert 0.0 <= report["actual_threshold"] < 1.0
    assert 0.0 <= report["predicted_threshold"] <= 1.0
    assert report["predicted_kept_fraction"] == pytest.approx(1 - report["predicted_threshold"])
    assert report["num_prunable"] == LENET300_DIGITS_D
    assert report["p0_used"] is False and report["p0"] == 0.0  # FC net: p0 off by default (docs/method/prunelimit.md §3.3)
    assert report["lanczos_steps"] == 30 and report["probes"] == 2 and report["hessian_samples"] == 300
    assert report["test_accuracy_dense"] > 0.5
    for name in ("spectrum.png", "gaussian_width.png", "accuracy_vs_ratio.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_predicted_threshold_recomputes_from_saved_spectrum(finished):
    out, report = finished
    spectrum_record = json.loads((out / "spectrum.json").read_text())
    spectrum = SpectrumEstimate.from_dict(spectrum_record["spectrum"])
    w = _weights(_load_trained(out))
    again = predict_threshold(w, spectrum_record["epsilon"], spectrum, p0=0.0)
    assert again.predicted_ratio == pytest.approx(report["predicted_threshold"], abs=1e-12)
    # Independent check of the root G(R(p*)) = p*: R from a plain sort, G from the raw Ritz values.
    p = report["predicted_threshold"]
    D = w.size
    removed = D - int(np.ceil((1 - p) * D - 1e-9))
    R2 = np.sum(np.sort(w ** 2)[:removed])
    eps = spectrum_record["epsilon"]
    nodes, weights = np.asarray(spectrum.nodes), np.asarray(spectrum.weights)
    G = np.mean([np.sum(weights[k] * 2 * eps / (2 * eps + np.abs(nodes[k]) * R2)) for k in range(len(nodes))])
    assert abs(G - p) < 2e-3


def test_epsilon_accuracy_and_regime_match_direct_computation(finished):
    out, report = finished
    model = _load_trained(out)
    bundle = load_dataset("digits", seed=0)
    x, y = bundle.train.tensors
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(model(x[i:i + 128]), y[i:i + 128]).item() for i in range(0, len(y), 128)]
        xt, yt = bundle.test.tensors
        dense_acc = (model(xt).argmax(1) == yt).double().mean().item()
    assert report["epsilon"] == pytest.approx(np.std(losses), rel=1e-6)
    assert report["test_accuracy_dense"] == pytest.approx(dense_acc)
    w = _weights(model)
    assert report["regime_fraction"] == pytest.approx(np.mean(np.abs(w) < report["regime_tol"]))


def test_actual_threshold_is_the_first_drop(finished):
    from prunelimit.prune import MagnitudeMasker

    out, report = finished
    model = _load_trained(out)
    xt, yt = load_dataset("digits", seed=0).test.tensors
    bar = report["test_accuracy_dense"] - report["tolerance"]
    t = report["actual_threshold"]
    with MagnitudeMasker(model) as masker, torch.no_grad():
        masker.apply(t)
        assert (model(xt).argmax(1) == yt).double().mean().item() >= bar
        masker.apply(round(t + 0.001, 3))
        assert (model(xt).argmax(1) == yt).double().mean().item() < bar


def _mtimes(out):
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


@pytest.fixture
def counted_steps(monkeypatch):
    calls = []
    for name, fn in list(pipeline.STEP_FUNCTIONS.items()):
        def wrapper(ctx, _fn=fn, _name=name):
            calls.append(_name)
            return _fn(ctx)
        monkeypatch.setitem(pipeline.STEP_FUNCTIONS, name, wrapper)
    return calls


def test_rerun_skips_changed_option_redoes_dependents_force_redoes(finished, tmp_path, counted_steps):
    src, report = finished
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    before = _mtimes(out)
    again = run_pipeline(out, {"model": "lenet300"}, progress=False, log=_quiet)
    assert counted_steps == []
    assert _mtimes(out) == before
    assert again["predicted_threshold"] == report["predicted_threshold"]

    # A pruning option changes only the prune and report results.
    run_pipeline(out, {"tolerance": 0.05}, progress=False, log=_quiet)
    assert counted_steps == ["prune", "report"]
    after = _mtimes(out)
    assert after["spectrum.json"] == before["spectrum.json"] and after["model.safetensors"] == before["model.safetensors"]
    assert after["actual.json"] != before["actual.json"]
    assert "tolerance: 0.05" in (out / "config.yaml").read_text()

    # Forcing one step makes everything downstream of it stale; a step refuses stale inputs.
    counted_steps.clear()
    run_pipeline(out, {}, steps=("spectrum",), force=True, progress=False, log=_quiet)
    assert counted_steps == ["spectrum"]
    with pytest.raises(PruneLimitError, match=r"prediction.json is out of date \(an earlier step was redone\); run `prunelimit predict"):
        run_pipeline(out, {}, steps=("report",), progress=False, log=_quiet)
    counted_steps.clear()
    run_pipeline(out, {}, progress=False, log=_quiet)
    assert counted_steps == ["predict", "prune", "report"]  # prune reads the prediction (accuracy at p*)
    counted_steps.clear()
    run_pipeline(out, {}, steps=("predict",), force=True, progress=False, log=_quiet)
    assert counted_steps == ["predict"]


def test_a_skipped_step_leaves_the_stored_config_alone(finished, tmp_path, counted_steps):
    src, _ = finished
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    before = (out / "config.yaml").read_text()
    run_pipeline(out, {"lam": 0.5}, steps=("predict",), progress=False, log=_quiet)  # predict does not depend on lam
    assert counted_steps == []
    assert (out / "config.yaml").read_text() == before  # train.json was made with the stored lam, not 0.5


def test_run_directory_of_another_model_is_refused(finished, tmp_path):
    src, _ = finished
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    before = _mtimes(out)
    with pytest.raises(PruneLimitError, match="holds a run of model 'lenet300'.*not model 'fc5'"):
        run_pipeline(out, {"model": "fc5", "dataset": "digits"}, progress=False, log=_quiet)
    with pytest.raises(PruneLimitError, match="not dataset 'mnist5k'"):
        open_run(out, {"dataset": "mnist5k"})
    assert _mtimes(out) == before
    # model.json from another model (a mixed-up directory) is caught too
    info = json.loads((out / "model.json").read_text())
    (out / "model.json").write_text(json.dumps({**info, "model": "fc12"}))
    with pytest.raises(PruneLimitError, match="model.json describes model 'fc12'"):
        open_run(out, {})


def test_steps_need_their_inputs_and_bad_files_are_named(finished, tmp_path):
    with pytest.raises(PruneLimitError, match="not a prunelimit run directory"):
        run_pipeline(tmp_path / "empty", {}, steps=("predict",), progress=False, log=_quiet)
    assert not (tmp_path / "empty").exists()
    src, _ = finished
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    (out / "spectrum.json").unlink()
    with pytest.raises(PruneLimitError, match="no spectrum.json yet: run `prunelimit spectrum"):
        run_pipeline(out, {}, steps=("predict",), progress=False, log=_quiet)
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(PruneLimitError, match="cannot read .*model.safetensors"):
        run_pipeline(out, {}, steps=("spectrum",), progress=False, log=_quiet)


def test_failed_first_step_leaves_no_directory(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(PruneLimitError, match="pass --data-root"):
        run_pipeline(out, {"model": "fc5", "dataset": "cifar10"}, progress=False, log=_quiet)
    assert not out.exists()
    with pytest.raises(PruneLimitError, match="unknown model 'fc7'"):
        run_pipeline(out, {"model": "fc7", "dataset": "digits"}, progress=False, log=_quiet)
    assert not out.exists()


def test_save_pruned_model_has_the_predicted_sparsity(finished, tmp_path):
    src, report = finished
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    run_pipeline(out, {"save_pruned": True}, steps=("prune",), progress=False, log=_quiet)
    state = load_state_dict(out / "model_pruned.safetensors")
    assert not any(k.endswith("_orig") or k.endswith("_mask") for k in state)  # masks made permanent
    w = torch.cat([state[k].reshape(-1) for k in state if k.endswith("weight")])
    D = w.numel()
    expected_zeros = D - int(np.ceil((1 - report["predicted_threshold"]) * D - 1e-9))
    assert int((w == 0).sum()) == expected_zeros
    actual = json.loads((out / "actual.json").read_text())
    assert actual["at_ratio"]["source"] == "predicted"
    assert actual["at_ratio"]["ratio"] == pytest.approx(report["predicted_threshold"])


USER_MODULE = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset
from prunelimit.data import DatasetBundle

AUGMENT_CALLS = [0]


def jitter(x, generator):
    AUGMENT_CALLS[0] += 1
    return x + 0.01 * torch.randn(x.shape, generator=generator)


def blobs(seed):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(3, 8, generator=g)
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 8, generator=g)
    return DatasetBundle(TensorDataset(x[:240], y[:240]), TensorDataset(x[240:], y[240:]), (8,), 3, "blobs", augment=jitter)


def small_conv(in_shape, num_classes):
    return nn.Sequential(nn.Unflatten(1, (1, 8)), nn.Conv1d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(24, num_classes))
'''


def test_user_model_and_dataset_and_augmentation_only_in_training(tmp_path, monkeypatch):
    import sys

    (tmp_path / "pl_user_parts.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import pl_user_parts

        out = tmp_path / "run"
        options = {"model": "pl_user_parts:small_conv", "dataset": "pl_user_parts:blobs", "epochs": 3, "lam": 1e-3,
                   "lanczos_steps": 20, "probes": 1, "trace_samples": 3}
        run_pipeline(out, options, steps=("train",), progress=False, log=_quiet)
        assert pl_user_parts.AUGMENT_CALLS[0] == 6  # 3 epochs x 2 batches (240 samples)
        report = run_pipeline(out, {}, progress=False, log=_quiet)
        assert pl_user_parts.AUGMENT_CALLS[0] == 6  # never for epsilon, Hessian or evaluation
        assert report["num_prunable"] == 4 * 3 + 24 * 3
        assert report["p0_used"] is True  # a conv net: the null-mass correction is on by default
        spectrum = json.loads((out / "spectrum.json").read_text())
        assert len(spectrum["null_mass"]["row_l1_norms"]) == 99
        with pytest.raises(PruneLimitError, match="fill only one batch of 512; set a smaller --eps-batch-size"):
            run_pipeline(out, {"eps_batch_size": 512}, steps=("spectrum",), progress=False, log=_quiet)
    finally:
        sys.modules.pop("pl_user_parts", None)
