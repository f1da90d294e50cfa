"""``mmil bench``: argument parsing and printing for :mod:`mmil.bench`.

The options are fields of :class:`mmil.bench_config.BenchConfig` (and ``--epochs``/``--device``
those of :class:`mmil.config.TrainConfig`); each declares its flag, help and range once.
"""
from __future__ import annotations

import argparse
import sys

from mmpl.config import add_config_flags, given_flags, layered_config

from ..bench_config import BenchConfig
from ..config import TrainConfig
from ..errors import MMILInputError
from .common import add_common, check_device, default_device_auto, device_option

#: The training options ``mmil bench`` has flags for (the rest come from --config's ``train:``; --device is a common flag).
TRAIN_FLAGS = ("epochs", "workers")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="cross-validate several MIL models with the same folds and recipe; write one table, ROC/bar/cost plots",
        description=(
            "Train and evaluate every listed model with the same folds, seeds, optimiser recipe and early stopping "
            "(the `mmil train` loop), then write DIR/results.csv, DIR/summary.md, roc.png, metrics.png and a cost "
            "table against bag size (cost.csv, cost.png). Rerunning the same command skips finished models; a rerun with "
            "other data or settings is refused (naming them) unless --overwrite."
        ),
    )
    p.add_argument("--features", required=True, help="directory of per-slide .h5/.pt feature files, or one MIL-benchmark CSV")
    p.add_argument("--labels", default=None, help="label CSV (slide_id,label[,case_id][,split]); omit for a MIL-benchmark CSV")
    p.add_argument("--out", required=True, help="output folder (created; reused to resume)")
    p.add_argument("--config", default=None, help="YAML with bench settings: models, model_kwargs {name: {...}}, train {...}, folds, repeats, seed, cost_sizes, ...")
    add_config_flags(p, BenchConfig, exclude=("seed",), defaults={"models": "every baseline and mmil", "cost_sizes": "1k 10k 50k 100k"})
    add_config_flags(p, TrainConfig, prefix="train_", exclude=tuple(f for f in TrainConfig.__dataclass_fields__ if f not in TRAIN_FLAGS),
                     defaults={"epochs": "the training config's, 200"})
    p.add_argument("--overwrite", action="store_true",
                   help="start --out afresh: delete the files an earlier bench wrote there (refused if it holds other files)")
    add_common(p, seed="seed of folds, initial weights and evaluation, the same for every model (YAML: seed)",
               device="where to train and time the models (YAML: train.device)", progress="no progress bars or progress lines",
               dests={"device": "train_device"})
    p.add_argument("--quiet", dest="no_progress", action="store_true", help="deprecated alias of --no-progress")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> BenchConfig:
    """The :class:`~mmil.bench_config.BenchConfig` of the YAML file (if any) with the flags on top."""
    default_device_auto(args, "train_device", ("train", "device"))
    flags = given_flags(args, BenchConfig)
    train = given_flags(args, TrainConfig, prefix="train_")
    if "seed" in flags:  # one seed for folds, weights and evaluation
        train["seed"] = flags["seed"]
    if args.no_progress:
        train["progress"] = False
    return layered_config(BenchConfig, args.config, flags, {"train": train}, MMILInputError)


def run(args: argparse.Namespace) -> int:
    from mmpl.fsio import check_output_dir

    from ..bench import run_bench
    from ..data import load_dataset

    cfg = build_config(args)
    check_output_dir(args.out, "--out")
    check_device(cfg.train.device, device_option(args, args.train_device is not None, "train.device"))
    dataset = load_dataset(args.features, args.labels)
    if len(dataset) == 0:
        raise MMILInputError(f"{args.features}: no bags found")
    log = (lambda msg: None) if args.no_progress else (lambda msg: print(f"mmil bench: {msg}", file=sys.stderr, flush=True))
    result = run_bench(dataset, cfg, args.out, progress=not args.no_progress, log=log, overwrite=args.overwrite)
    width = max(len(s["model"]) for s in result.summary)
    print(f"{'rank':>4}  {'model':<{width}}  {'AUC':>13}  {'accuracy':>13}")
    for s in result.summary:
        print(f"{s['rank']:>4}  {s['model']:<{width}}  {s['auc']:.3f} ± {s['auc_std']:.3f}  {s['accuracy']:.3f} ± {s['accuracy_std']:.3f}")
    print(f"wrote {result.out_dir}/summary.md, results.csv, cost.csv and plots")
    return 0
