"""``mmil bench``: argument parsing and printing for :mod:`mmil.bench`."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from mmpl.cliargs import non_negative_int, positive_float, positive_int, ranged

from ..errors import MMILInputError


def parse_size(text: str) -> int:
    """argparse type for bag sizes (``1000``, ``10k``, ``0.1m``)."""
    from ..bench import parse_size as parse

    try:
        return parse(text)
    except MMILInputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="cross-validate several MIL models with the same folds and recipe; write one table, ROC/bar/cost plots",
        description=(
            "Train and evaluate every listed model with the same folds, seeds, optimiser recipe and early stopping "
            "(the `mmil crossval` loop), then write DIR/results.csv, DIR/summary.md, roc.png, metrics.png and a cost "
            "table against bag size (cost.csv, cost.png). Rerunning the same command skips finished models; a rerun with "
            "other data or settings is refused (naming them) unless --overwrite."
        ),
    )
    p.add_argument("--features", required=True, help="directory of per-slide .h5/.pt feature files, or one MIL-benchmark CSV")
    p.add_argument("--labels", default=None, help="label CSV (slide_id,label[,case_id][,split]); omit for a MIL-benchmark CSV")
    p.add_argument("--out", required=True, help="output directory (created; reused to resume)")
    p.add_argument("--models", default=None, help="comma-separated registry names (default: every baseline and mmil; 'all' = every registered model)")
    p.add_argument("--folds", type=ranged(int, 2), default=None, help="k of stratified k-fold cross-validation (default 5; ignored with fixed splits)")
    p.add_argument("--repeats", type=positive_int, default=None, help="stochastic evaluations of each test fold, seeds S..S+R-1 (default 1)")
    p.add_argument("--epochs", type=positive_int, default=None, help="maximum training epochs per fold (default: the training config's, 200)")
    p.add_argument("--seed", type=non_negative_int, default=None, help="seed of folds, initial weights and evaluation, the same for every model (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--cost-sizes", nargs="*", type=parse_size, default=None, metavar="N",
                   help="bag sizes of the cost table (default 1k 10k 50k 100k; give the flag alone to skip the cost table)")
    p.add_argument("--cost-budget", type=positive_float, default=None, metavar="SECONDS",
                   help="skip a model's larger bag sizes once one forward pass takes longer than this (default 60)")
    p.add_argument("--config", default=None, help="YAML with bench settings: models, model_kwargs {name: {...}}, train {...}, folds, repeats, seed, cost_sizes, ...")
    p.add_argument("--overwrite", action="store_true",
                   help="start --out afresh: delete the files an earlier bench wrote there (refused if it holds other files)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    """The :class:`~mmil.bench.BenchConfig` of the YAML file (if any) with the flags on top."""
    from ..bench import BenchConfig, parse_model_list

    cfg = BenchConfig.from_yaml(args.config) if args.config else BenchConfig()
    train_changes = {}
    if args.epochs is not None:
        train_changes["epochs"] = args.epochs
    if args.seed is not None:
        train_changes["seed"] = args.seed
    if args.device is not None:
        train_changes["device"] = args.device
    if args.quiet:
        train_changes["progress"] = False
    changes = {}
    if train_changes:
        changes["train"] = dataclasses.replace(cfg.train, **train_changes)
    for name in ("folds", "repeats", "seed"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.models is not None:
        changes["models"] = parse_model_list(args.models)
    if args.cost_sizes is not None:
        changes["cost_sizes"] = list(args.cost_sizes)
    if args.cost_budget is not None:
        changes["cost_budget_s"] = args.cost_budget
    return dataclasses.replace(cfg, **changes) if changes else cfg


def run(args: argparse.Namespace) -> int:
    from ..bench import run_bench
    from ..data import load_dataset
    from ..io import check_output_dir
    from ..wsi.options import check_device

    cfg = build_config(args)
    check_output_dir(args.out, "--out")
    if cfg.train.device != "auto":
        check_device(cfg.train.device, "--device" if args.device is not None or not args.config else f"{args.config}: train.device")
    dataset = load_dataset(args.features, args.labels)
    if len(dataset) == 0:
        raise MMILInputError(f"{args.features}: no bags found")
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"mmil bench: {msg}", file=sys.stderr, flush=True))
    result = run_bench(dataset, cfg, args.out, progress=not args.quiet, log=log, overwrite=args.overwrite)
    width = max(len(s["model"]) for s in result.summary)
    print(f"{'rank':>4}  {'model':<{width}}  {'AUC':>13}  {'accuracy':>13}")
    for s in result.summary:
        print(f"{s['rank']:>4}  {s['model']:<{width}}  {s['auc']:.3f} ± {s['auc_std']:.3f}  {s['accuracy']:.3f} ± {s['accuracy_std']:.3f}")
    print(f"wrote {result.out_dir}/summary.md, results.csv, cost.csv and plots")
    return 0
