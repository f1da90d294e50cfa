"""Does a recipe change make the MIL models learn a small tumour? Learning curves over seeds (issue 10).

One cohort is generated in memory and split once: the first ``--train`` slides train, the rest
validate. For every model, every variant and every seed the toolkit's own training loop
(:func:`mmil.train.train_fold`, the default recipe of ``TrainConfig`` with no early stopping) runs
``--epochs`` epochs and records the validation AUC after each. The table gives, per model and variant,
the mean over seeds of the last five epochs' AUC ("late AUC": what the run learned, free of the
selection rule) and of the best epoch's AUC, and in how many seeds the late AUC reached 0.9.
A validation set of 40 slides is used instead of cross-validation because here the question is
whether a run learns, not how well a kept model generalises: the bench answers that.

Variants (``--variants``, one change at a time against the default):

* ``default``: the defaults (slide centring on: slide features);
* ``no-centring``: ``center_slides: none``;
* ``no-augment``: ``instance_dropout: 0, feature_noise: 0``;
* ``augment``: ``instance_dropout: 0.25, feature_noise: 0.1`` (the default, named: the same runs as ``default``
  unless ``--weight-average`` or a later default changes the base);
* ``no-mask``: MMIL without sub-bag masking (``mask_ratio: 0``; other models skip it);
* ``lr-5e-4``, ``lr-1e-3``: learning rate 5e-4 or 1e-3 instead of 2e-4;
* ``paper-width``: MMIL at the paper's width (D = 512, 8 heads of 64; other models skip it);
* ``pseudo-bags-4``: every training bag split into 4 random pseudo-bags carrying its label (DTFD-MIL's first tier);
* ``average-0.8``: a moving average of the weights over epochs (decay 0.8, about the last 5 epochs) is validated;
* ``no-average``: ``weight_average: 0`` (the last epoch's weights are validated);
* ``negative-mix-0.5``, ``negative-mix-1``: ``negative_mix`` 0.5 or 1 (half or as many instances of a random negative
  training slide inserted into every training bag, each step).

``--weight-average D`` sets the base of every variant (default: the toolkit's default); the tables of
docs/benchmarks.md measured before weight averaging became the default are reproduced with ``--weight-average 0``.

Models: any registered model; ``mmil`` runs at width 128 (4 heads of 32) on this CPU, ``mmil-512`` is
``mmil`` at the paper's width (its default). Say which when quoting.

Cohorts: ``setting-c`` (``mmil synth`` defaults with 150-750 instances, 1-3 % tumour, signal 8, 128-d:
the scaled-down setting C of docs/benchmarks.md), ``setting-b`` (300-1,500 instances, 1-3 % tumour, signal 6,
128-d: setting B of docs/benchmarks.md at full scale with ``--slides 120``) and ``camelyon-like`` (``--preset camelyon-like
--scale 0.05``, signal 8, 64-d).

Usage::

    python benchmarks/recipe_ablation.py --out ablation --cohort setting-c --seeds 0 1 2
    python benchmarks/recipe_ablation.py --out ablation --cohort camelyon-like --slides 120 --train 80
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mmil.config import TrainConfig  # noqa: E402
from mmil.data import BagDataset  # noqa: E402
from mmil.data.bags import Bag  # noqa: E402
from mmil.train import resolve_centering, train_fold  # noqa: E402

VARIANTS = {
    "default": ({}, {}),
    "no-centring": ({"center_slides": "none"}, {}),
    "no-augment": ({"instance_dropout": 0.0, "feature_noise": 0.0}, {}),
    "augment": ({"instance_dropout": 0.25, "feature_noise": 0.1}, {}),
    "no-mask": ({}, {"mmil": {"mask_ratio": 0.0}}),
    "lr-5e-4": ({"lr": 5e-4}, {}),
    "lr-1e-3": ({"lr": 1e-3}, {}),
    "paper-width": ({}, {"mmil": {"embed_dim": 512, "heads": 8, "head_dim": 64}}),
    "pseudo-bags-4": ({"pseudo_bags": 4}, {}),
    "average-0.8": ({"weight_average": 0.8}, {}),
    "no-average": ({"weight_average": 0.0}, {}),
    "negative-mix-0.5": ({"negative_mix": 0.5}, {}),
    "negative-mix-1": ({"negative_mix": 1.0}, {}),
}
#: Benchmark names -> (registered model, its keyword arguments).
MODELS = {"mmil": ("mmil", {"embed_dim": 128, "heads": 4, "head_dim": 32}),
          "mmil-512": ("mmil", {"embed_dim": 512, "heads": 8, "head_dim": 64})}


#: Instances per slide of the ``mmil synth`` cohorts.
SYNTH_SIZES = {"setting-b": (300, 1500), "setting-c": (150, 750)}
#: Tumour signal of each cohort unless ``--signal`` is given.
DEFAULT_SIGNAL = {"setting-b": 6.0, "setting-c": 8.0, "camelyon-like": 8.0}


def cohort(name: str, n_slides: int, signal: float = 8.0) -> tuple[BagDataset, float | None]:
    """The cohort's bags in memory (seed 0), and the AUC of the instance-level oracle."""
    from mmil.data.synth import SynthSpec, synthetic_slides
    from mmil.data.synth_camelyon import CamelyonLikeSpec, camelyon_like_slides, oracle_auc

    if name in SYNTH_SIZES:
        rows = list(synthetic_slides(n_slides, 0, SynthSpec(128, *SYNTH_SIZES[name], (0.01, 0.03), signal), 0.5, 1))
    else:
        rows = list(camelyon_like_slides(n_slides, 0, CamelyonLikeSpec(in_dim=64, signal=signal, scale=0.05), 0.5, 1))
    return BagDataset.from_bags([Bag(r[0], torch.from_numpy(r[3]), r[2]) for r in rows]), oracle_auc([r[2] for r in rows], [r[6] for r in rows])


def run_one(data: BagDataset, n_train: int, model: str, variant: str, seed: int, epochs: int, work: Path, base: dict) -> dict[str, list[float]]:
    """Validation AUC and training accuracy after every epoch of one run (the toolkit's loop, no early stopping)."""
    train_over, kwargs_over = VARIANTS[variant]
    cfg = TrainConfig(epochs=epochs, min_epochs=epochs, patience=epochs, seed=seed, progress=False, log_every=0, **{**base, **train_over})
    centred = data.with_centering(resolve_centering(cfg, data))  # as cross_validate does
    name, kwargs = MODELS.get(model, (model, {}))
    kwargs = {**kwargs, **kwargs_over.get(name, {})}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        res = train_fold(centred.subset(range(n_train)), centred.subset(range(n_train, len(data))), name, kwargs, cfg, tmp)
    return {"val_auc": [float(h["val_auc"]) for h in res.history], "train_accuracy": [float(h["train_accuracy"]) for h in res.history]}


def _curve(run: list[float] | dict[str, list[float]], key: str = "val_auc") -> list[float] | None:
    """One curve of a stored run; runs stored before training accuracy was recorded are a bare AUC list."""
    if isinstance(run, list):
        return run if key == "val_auc" else None
    return run[key]


def run_key(model: str, variant: str, seed: int, a: argparse.Namespace, base: dict) -> str:
    """The cache key of one run. Settings that differ from those of the first runs (weight average 0, augmentation
    0.25 / 0.1) are part of it, except in the variant that names them, so cached runs stay valid if a default moves."""
    cfg = TrainConfig(**{**base, **VARIANTS[variant][0]})
    augment = (cfg.instance_dropout, cfg.feature_noise)
    return (f"{model}|{variant}|{seed}|{a.epochs}|{a.slides}|{a.train}" + ("" if a.signal == 8.0 else f"|signal {a.signal:g}")
            + ("" if cfg.weight_average == 0 or variant == "average-0.8" else f"|wa {cfg.weight_average:g}")
            + ("" if augment == (0.25, 0.1) or variant in ("no-augment", "augment") else f"|aug {augment[0]:g}/{augment[1]:g}"))


def summarise(curves: dict[tuple[str, str], list]) -> str:
    """The markdown table: per (model, variant) late AUC, best AUC and late training accuracy (mean ± std over seeds),
    seeds reaching 0.9. A late training accuracy near 1 beside a late AUC near 0.5 is memorisation; both near 0.5 is
    a run that has not fitted its training slides yet."""
    lines = ["| model | variant | late AUC (last 5 epochs) | best-epoch AUC | late training accuracy | seeds with late AUC >= 0.9 |",
             "|---|---|---|---|---|---|"]
    for (model, variant), runs in curves.items():
        late = np.array([np.mean(_curve(r)[-5:]) for r in runs])
        best = np.array([np.max(_curve(r)) for r in runs])
        acc = [np.mean(c[-5:]) for c in (_curve(r, "train_accuracy") for r in runs) if c is not None]
        acc_text = f"{np.mean(acc):.3f} ± {np.std(acc):.3f}" if len(acc) == len(runs) else "(not recorded)"
        lines.append(f"| {model} | {variant} | {late.mean():.3f} ± {late.std():.3f} | {best.mean():.3f} ± {best.std():.3f} | "
                     f"{acc_text} | {int((late >= 0.9).sum())} / {len(runs)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for curves.json and ablation.md (reruns skip finished runs)")
    p.add_argument("--cohort", choices=tuple(DEFAULT_SIGNAL), default="setting-c")
    p.add_argument("--slides", type=int, default=80)
    p.add_argument("--train", type=int, default=40, help="the first N slides train, the rest validate")
    p.add_argument("--models", nargs="+", default=["mmil", "abmil", "max"])
    p.add_argument("--variants", nargs="+", default=["default", "no-centring"], choices=tuple(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--signal", type=float, default=None, help="tumour signal of the cohort (lower: harder; default 6 for setting-b, else 8)")
    p.add_argument("--weight-average", type=float, default=None, metavar="D", help="base weight_average of every variant (default: the toolkit's)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    a.signal = DEFAULT_SIGNAL[a.cohort] if a.signal is None else a.signal
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / f"curves_{a.cohort}.json"
    done = json.loads(store.read_text()) if store.is_file() else {}
    base = {} if a.weight_average is None else {"weight_average": a.weight_average}
    data, oracle = cohort(a.cohort, a.slides, a.signal)
    if oracle is not None:
        print(f"{a.cohort}, signal {a.signal:g}: oracle AUC {oracle:.3f}", flush=True)
    curves: dict[tuple[str, str], list] = {}
    for model in a.models:
        for variant in a.variants:
            if variant in ("no-mask", "paper-width") and MODELS.get(model, (model,))[0] != "mmil":
                continue
            for seed in a.seeds:
                key = run_key(model, variant, seed, a, base)
                if key not in done:
                    t0 = time.perf_counter()
                    done[key] = run_one(data, a.train, model, variant, seed, a.epochs, out, base)
                    store.write_text(json.dumps(done))
                    print(f"{key}: late AUC {np.mean(_curve(done[key])[-5:]):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
                curves.setdefault((model, variant), []).append(done[key])
    table = summarise(curves) + ("" if oracle is None else f"\n\nOracle AUC (instance-level, all {a.slides} slides): {oracle:.3f}")
    (out / f"ablation_{a.cohort}{'' if a.signal == 8.0 else f'_signal{a.signal:g}'}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
