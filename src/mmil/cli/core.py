"""``mmil train | evaluate | predict | import-checkpoint | synth``: parsing and printing only.

The work lives in :mod:`mmil.crossval`, :mod:`mmil.evaluate`,
:mod:`mmil.data.synth` and :mod:`mmil.checkpoint`. Options given on the command
line override those of ``--config``; both override the built-in defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from mmpl.fsio import check_output_dir, check_output_file
from mmpl.cliargs import fraction, non_negative_float, non_negative_int, open_fraction, positive_float, positive_int, ranged

THREADS_HELP = "CPU threads for torch (default: torch's choice); small models often run fastest on 1, especially on a busy machine"
GROUPINGS_HELP = "random, sequential, embedding (k-means on projected features), coords (k-means on patch coordinates) or index (precomputed `groups` in the bag files)"

#: model flag -> constructor keyword (only set keywords reach the model).
MODEL_FLAGS: dict[str, tuple[str, type, str]] = {
    "num_subbags": ("--num-subbags", positive_int, "G, sub-bags per bag (MMIL)"),
    "grouping": ("--grouping", str, f"how instances are grouped into sub-bags (MMIL): {GROUPINGS_HELP}"),
    "embed_dim": ("--embed-dim", positive_int, "embedding width D"),
    "num_layers": ("--num-layers", positive_int, "number of attention layers (MMIL, TransMIL)"),
    "heads": ("--heads", positive_int, "attention heads"),
    "head_dim": ("--head-dim", positive_int, "width of each attention head (MMIL)"),
    "num_msg": ("--num-msg", positive_int, "message tokens per sub-bag (MMIL)"),
    "mask_ratio": ("--mask-ratio", open_fraction, "fraction of sub-bags dropped during training (MMIL; the paper uses 0.6 with G=10)"),
    "max_subbag_size": ("--max-subbag-size", positive_int, "cap on instances per sub-bag (MMIL; off by default, nothing is dropped)"),
    "dropout": ("--dropout", open_fraction, "dropout rate of the model"),
    "attn_dropout": ("--attn-dropout", open_fraction, "dropout on attention weights (0.1 reproduces the release; 0 keeps the fused CPU kernel)"),
}


def add_commands(subparsers) -> None:
    from ..models import list_models

    # -- train -------------------------------------------------------------
    p = subparsers.add_parser(
        "train",
        help="cross-validate a MIL model on feature bags",
        description="Cross-validate a MIL model (stratified k-fold, patient-level with case_id, or the label CSV's fixed split) and write metrics.json, roc.png, config.yaml and one checkpoint per fold. Rerun the same command to resume.",
    )
    p.add_argument("--features", required=True, help="directory of per-slide .h5/.pt bags, or one MIL-benchmark CSV (label,bag_id,f1,...)")
    p.add_argument("--labels", help="label CSV (slide_id,label[,case_id][,split|fold]) or the wide split CSV; not needed for a MIL-benchmark CSV")
    p.add_argument("--out", required=True, help="output directory of the run")
    p.add_argument("--config", help="YAML experiment config (see configs/mmil_default.yaml); command-line options override it")
    p.add_argument("--model", choices=list_models(), help="registered model (default: mmil)")
    p.add_argument("--folds", type=ranged(int, 2), help="k of stratified k-fold (default 5; ignored with a fixed split)")
    p.add_argument("--ignore-splits", action="store_true", help="cross-validate even when the label CSV has a split or fold column")
    p.add_argument("--epochs", type=positive_int, help="maximum epochs (default 200)")
    p.add_argument("--min-epochs", type=non_negative_int, help="no early stopping before this epoch (default 50)")
    p.add_argument("--patience", type=positive_int, help="epochs without a lower validation loss before stopping (default 20)")
    p.add_argument("--lr", type=positive_float, help="AdamW learning rate (default 2e-4)")
    p.add_argument("--weight-decay", type=non_negative_float, help="AdamW weight decay (default 1e-4)")
    p.add_argument("--accumulate", type=positive_int, help="bags per optimiser step (gradient accumulation, default 1)")
    p.add_argument("--class-weights", action="store_true", default=None, help="weight the loss by inverse class frequency")
    p.add_argument("--val-fraction", type=ranged(float, 0, 1, low_open=True, high_open=True), help="share of each training fold held out for early stopping (default 0.15)")
    p.add_argument("--standardize", choices=("auto", "on", "off"), help="z-score features with training-fold statistics (auto: on for MIL-benchmark CSVs only)")
    p.add_argument("--seed", type=non_negative_int, help="seed of folds, training and evaluation (default 0)")
    p.add_argument("--repeats", type=positive_int, help="R stochastic evaluations of each test fold, seeds seed..seed+R-1 (default 10, the paper's protocol)")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="bf16 autocast for training and evaluation (default fp32)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--num-workers", type=non_negative_int, help="background workers reading bags (default 0)")
    p.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--overwrite", action="store_true", help="start --out afresh: delete the run files a previous run left there (other files are kept)")
    _add_model_flags(p)
    p.set_defaults(func=cmd_train)

    # -- evaluate ----------------------------------------------------------
    p = subparsers.add_parser("evaluate", help="evaluate a checkpoint on labelled bags", description="Repeated stochastic evaluation of a checkpoint (mean ± std over R runs, and the test-time ensemble).")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. RUN/fold_0/checkpoint, or one from `mmil import-checkpoint`)")
    p.add_argument("--features", required=True, help="directory of .h5/.pt bags, or a MIL-benchmark CSV")
    p.add_argument("--labels", help="label CSV (required for a features directory)")
    p.add_argument("--repeats", type=positive_int, default=10, help="R stochastic evaluations, seeds seed..seed+R-1 (default 10)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="first evaluation seed (default 0)")
    p.add_argument("--grouping", help=f"override the checkpoint's grouping (MMIL): {GROUPINGS_HELP}")
    p.add_argument("--num-subbags", type=positive_int, help="override the checkpoint's number of sub-bags (MMIL)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 autocast for inference (default fp32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    p.add_argument("--out", help="write the metrics to this JSON file")
    p.set_defaults(func=cmd_evaluate)

    # -- predict -----------------------------------------------------------
    p = subparsers.add_parser("predict", help="class probabilities per slide", description="Write slide_id,prob_0,...,prob_{C-1},pred for every bag (probabilities averaged over R seeded runs).")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--features", required=True, help="directory of .h5/.pt bags (every slide found), or a MIL-benchmark CSV")
    p.add_argument("--out", required=True, help="output CSV")
    p.add_argument("--grouping", help=f"override the checkpoint's grouping (MMIL): {GROUPINGS_HELP}")
    p.add_argument("--num-subbags", type=positive_int, help="override the checkpoint's number of sub-bags (MMIL)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the (first) stochastic run (default 0)")
    p.add_argument("--repeats", type=positive_int, default=1, help="average probabilities over R runs with seeds seed..seed+R-1 (default 1)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 autocast for inference (default fp32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    p.set_defaults(func=cmd_predict)

    # -- prune-limit -----------------------------------------------------------
    p = subparsers.add_parser("prune-limit", help="predicted vs actual one-shot pruning limit of a checkpoint", description="prunelimit on a trained MIL model: epsilon and the SLQ Hessian spectrum of the mean training loss give the predicted threshold; one-shot global magnitude pruning on the test bags gives the actual one. Weights are not changed.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--features", required=True, help="training bags (Hessian, epsilon): a directory of .h5/.pt bags, or a MIL-benchmark CSV")
    p.add_argument("--labels", help="label CSV for --features (required for a directory)")
    p.add_argument("--test-features", help="test bags for the actual threshold (default: --features)")
    p.add_argument("--test-labels", help="label CSV for --test-features")
    p.add_argument("--out", required=True, help="output JSON")
    p.add_argument("--lanczos-steps", type=ranged(int, 2), default=100, help="Lanczos steps m (default 100)")
    p.add_argument("--probes", type=positive_int, default=4, help="Rademacher probes (default 4)")
    p.add_argument("--tolerance", type=open_fraction, default=0.0, help="accuracy drop (fraction) allowed before the actual threshold (default 0)")
    p.add_argument("--bags-per-batch", type=positive_int, default=1, help="bags per padded batch for epsilon and the Hessian (default 1)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="grouping and probe seed (default 0)")
    p.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    p.set_defaults(func=cmd_prune_limit)

    # -- import-checkpoint ---------------------------------------------------
    p = subparsers.add_parser("import-checkpoint", help="convert a released MMIL-Transformer checkpoint", description="Convert the authors' released weights (a plain state dict, read with weights_only=True) into an mmil checkpoint directory.")
    p.add_argument("--released", required=True, help="released .pth/.pt file")
    p.add_argument("--in-dim", type=positive_int, required=True, help="feature dimension C the checkpoint was trained on (1024 for CLAM ResNet-50, 512 for DSMIL ResNet-18)")
    p.add_argument("--num-subbags", type=positive_int, default=10, help="G used at inference (released: 10 for CAMELYON16, 4 for TCGA; default 10)")
    p.add_argument("--grouping", default="random", help=f"grouping used at inference (default random): {GROUPINGS_HELP}")
    p.add_argument("--n-classes", type=ranged(int, 2), help="number of classes (default: read from the weights)")
    p.add_argument("--heads", type=positive_int, help="attention heads (default 8; heads x head-dim must match the weights)")
    p.add_argument("--head-dim", type=positive_int, help="width of each head (default: attention width / heads)")
    p.add_argument("--class-names", nargs="+", help="class names in index order (default 0..C-1)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in --out")
    p.set_defaults(func=cmd_import_checkpoint)

    # -- synth -------------------------------------------------------------
    p = subparsers.add_parser("synth", help="write a synthetic WSI-like bag dataset", description="Synthetic slides: tissue-shaped patch grids, positives with a small spatially clustered fraction of shifted instances. Writes OUT/features/*.h5 and OUT/labels.csv.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n-slides", type=positive_int, default=40, help="number of slides (default 40)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed (same seed -> same files; default 0)")
    p.add_argument("--in-dim", type=positive_int, default=128, help="feature dimension (default 128)")
    p.add_argument("--min-instances", type=positive_int, default=200, help="fewest instances per slide (default 200)")
    p.add_argument("--max-instances", type=positive_int, default=20000, help="most instances per slide (default 20000; sizes are log-uniform)")
    p.add_argument("--positive-fraction", type=ranged(float, 0, 1, low_open=True), nargs=2, metavar=("LO", "HI"), default=(0.01, 0.10), help="range of the tumour share of a positive slide's instances (default 0.01 0.10)")
    p.add_argument("--positive-rate", type=fraction, default=0.5, help="share of positive slides (default 0.5)")
    p.add_argument("--signal", type=non_negative_float, default=4.0, help="shift of tumour instances along the tumour direction, in noise standard deviations (default 4)")
    p.add_argument("--slides-per-case", type=positive_int, default=1, help="slides per patient (case_id), for patient-level folds (default 1)")
    p.set_defaults(func=cmd_synth)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model options (only those given are passed to the model)")
    for key, (flag, typ, help_text) in MODEL_FLAGS.items():
        g.add_argument(flag, dest=f"model_{key}", type=typ, metavar=key.upper(), help=help_text)
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="any other model option, VALUE parsed as YAML (repeatable), e.g. --model-arg gated=true")


def _model_kwargs_from_args(args) -> dict[str, Any]:
    import yaml

    from ..errors import MMILInputError

    kwargs: dict[str, Any] = {}
    for key in MODEL_FLAGS:
        value = getattr(args, f"model_{key}", None)
        if value is not None:
            kwargs[key] = value
    for item in args.model_arg:
        if "=" not in item:
            raise MMILInputError(f"--model-arg {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        kwargs[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return kwargs


def _check_device(device: str) -> None:
    """Fail at the start, before anything is written, on a device this machine lacks."""
    from ..evaluate import resolve_device

    resolve_device(device)


def _set_threads(threads: int | None) -> None:
    from ..errors import MMILInputError

    if threads is not None:
        if threads < 1:
            raise MMILInputError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def _check_grouping(grouping: str | None) -> None:
    from ..errors import MMILInputError
    from ..grouping import GROUPINGS

    if grouping is not None and grouping not in GROUPINGS:
        raise MMILInputError(f"--grouping {grouping!r}: unknown grouping; choose one of: {', '.join(GROUPINGS)}")


def _experiment_from_args(args):
    from ..config import ExperimentConfig

    exp = ExperimentConfig.from_yaml(args.config) if args.config else ExperimentConfig()
    train_over: dict[str, Any] = {}
    for name in ("epochs", "min_epochs", "patience", "lr", "weight_decay", "accumulate", "val_fraction", "precision", "device", "num_workers", "seed"):
        value = getattr(args, name)
        if value is not None:
            train_over[name] = value
    if args.class_weights:
        train_over["class_weights"] = True
    if args.standardize is not None:
        train_over["standardize"] = {"auto": None, "on": True, "off": False}[args.standardize]
    if args.no_progress:
        train_over["progress"] = False
    train = dataclasses.replace(exp.train, **train_over)
    model_kwargs = dict(exp.model_kwargs)
    model_kwargs.update(_model_kwargs_from_args(args))
    _check_grouping(model_kwargs.get("grouping"))
    top: dict[str, Any] = {"train": train, "model_kwargs": model_kwargs, "features": str(Path(args.features).resolve())}
    top["labels"] = str(Path(args.labels).resolve()) if args.labels else None
    if args.model is not None:
        top["model"] = args.model
    if args.folds is not None:
        top["folds"] = args.folds
    if args.repeats is not None:
        top["repeats"] = args.repeats
    if args.seed is not None:
        top["seed"] = args.seed
    if args.ignore_splits:
        top["use_splits"] = False
    return dataclasses.replace(exp, **top)


def cmd_train(args) -> int:
    from ..crossval import cross_validate, format_metrics_table
    from ..data import load_dataset
    from ..errors import MMILInputError

    exp = _experiment_from_args(args)
    _check_device(exp.train.device)
    check_output_dir(args.out)
    _set_threads(args.threads)
    features = Path(args.features)
    if features.suffix.lower() != ".csv" and not args.labels:
        raise MMILInputError(f"{features}: --labels is required for a features directory (a MIL-benchmark CSV carries its own labels)")
    dataset = load_dataset(features, args.labels)
    result = cross_validate(
        dataset, exp.model, exp.model_kwargs, exp.train, args.out,
        folds=exp.folds, repeats=exp.repeats, seed=exp.seed, use_splits=exp.use_splits, experiment=exp, overwrite=args.overwrite,
    )
    s = result.summary
    print(f"{exp.model} on {dataset.source}: {len(dataset)} bags, classes {dataset.class_names}, split {s['split']}, R={exp.repeats}")
    print(format_metrics_table(s))
    print(f"results: {Path(args.out) / 'metrics.json'}, {Path(args.out) / 'roc.png'}")
    return 0


def _resolve_checkpoint(path: str) -> Path:
    from ..errors import MMILInputError

    d = Path(path)
    if (d / "config.json").is_file() and (d / "model.safetensors").is_file():
        return d
    if (d / "checkpoint" / "config.json").is_file():
        return d / "checkpoint"
    folds = sorted(p.name for p in d.glob("fold_*") if (p / "checkpoint").is_dir())
    if folds:
        raise MMILInputError(f"{d}: a cross-validation run with one checkpoint per fold; pass one of them, e.g. {d / folds[0] / 'checkpoint'}")
    return d  # let load_checkpoint report what is missing


def _overrides(args) -> dict[str, Any]:
    _check_grouping(args.grouping)
    over: dict[str, Any] = {}
    if args.grouping is not None:
        over["grouping"] = args.grouping
    if args.num_subbags is not None:
        over["num_subbags"] = args.num_subbags
    return over


def cmd_evaluate(args) -> int:
    from ..data import load_dataset
    from ..errors import MMILInputError
    from ..evaluate import METRIC_NAMES, evaluate_checkpoint, json_safe
    from ..io import write_json

    features = Path(args.features)
    if features.suffix.lower() != ".csv" and not args.labels:
        raise MMILInputError(f"{features}: --labels is required to evaluate on a features directory")
    _check_device(args.device)
    if args.out:
        check_output_file(args.out)
    _set_threads(args.threads)
    ckpt = _resolve_checkpoint(args.checkpoint)
    dataset = load_dataset(features, args.labels)
    result = evaluate_checkpoint(ckpt, dataset, repeats=args.repeats, seed=args.seed, device=args.device, precision=args.precision, **_overrides(args))
    print(f"{ckpt} on {dataset.source}: {len(dataset)} bags, R={args.repeats} (seeds {args.seed}..{args.seed + args.repeats - 1})")
    print(f"{'metric':>18} {'mean':>8} {'std':>8} {'ensemble':>9}")
    for name in METRIC_NAMES:
        print(f"{name:>18} {result[name]:8.4f} {result[name + '_std']:8.4f} {result['ensemble'][name]:9.4f}")
    if args.out:
        write_json(args.out, json_safe(result))
        print(f"metrics: {args.out}")
    return 0


def cmd_predict(args) -> int:
    from ..data import load_dataset
    from ..evaluate import load_for_inference, predict_probs, predictions_csv
    from ..io import write_text

    _check_device(args.device)
    check_output_file(args.out)
    _set_threads(args.threads)
    ckpt = _resolve_checkpoint(args.checkpoint)
    dataset = load_dataset(args.features, None).without_labels()  # a MIL CSV's labels play no part in prediction
    model, dataset, _ = load_for_inference(ckpt, dataset, device=args.device, **_overrides(args))
    probs = predict_probs(model, dataset, seed=args.seed, repeats=args.repeats, device=args.device, precision=args.precision, progress=sys.stderr.isatty()).mean(0)
    write_text(args.out, predictions_csv(dataset.slide_ids, probs))
    print(f"wrote {len(dataset)} predictions to {args.out}")
    return 0


def _labelled_dataset(features: str, labels: str | None):
    from ..data import load_dataset
    from ..errors import MMILInputError

    if Path(features).suffix.lower() != ".csv" and not labels:
        raise MMILInputError(f"{features}: a label CSV is required for a features directory")
    return load_dataset(features, labels)


def cmd_prune_limit(args) -> int:
    from ..evaluate import json_safe, load_for_inference
    from ..io import write_json
    from ..pruning import prune_limit

    check_output_file(args.out)
    _set_threads(args.threads)
    ckpt = _resolve_checkpoint(args.checkpoint)
    train = _labelled_dataset(args.features, args.labels)
    test = _labelled_dataset(args.test_features, args.test_labels) if args.test_features else train
    model, train, _ = load_for_inference(ckpt, train)
    _, test, _ = load_for_inference(ckpt, test)
    result = prune_limit(model, train, test, seed=args.seed, lanczos_steps=args.lanczos_steps, num_probes=args.probes,
                         tolerance=args.tolerance, bags_per_batch=args.bags_per_batch, progress=sys.stderr.isatty())
    write_json(args.out, json_safe(result.to_dict()))
    print(f"{ckpt}: {result.num_prunable} prunable weights, dense accuracy {result.dense_accuracy:.4f}; {result.regime}")
    print(f"predicted threshold {result.predicted_ratio:.4f} (keep {1 - result.predicted_ratio:.4f}); "
          f"actual {result.actual_ratio:.4f} (keep {1 - result.actual_ratio:.4f}); written to {args.out}")
    return 0


def cmd_import_checkpoint(args) -> int:
    from ..checkpoint import save_checkpoint
    from ..errors import MMILInputError
    from ..models.mmil_transformer import load_released_checkpoint

    _check_grouping(args.grouping)
    out = Path(args.out)
    check_output_dir(out)
    if (out / "config.json").exists() and not args.force:
        raise MMILInputError(f"{out}: already holds a checkpoint; choose another --out or pass --force")
    model = load_released_checkpoint(
        args.released, in_dim=args.in_dim, n_classes=args.n_classes, heads=args.heads, head_dim=args.head_dim,
        num_subbags=args.num_subbags, grouping=args.grouping,
    )
    kwargs = dict(getattr(model, "init_kwargs", {}))
    n_classes = int(kwargs.get("n_classes", model.n_classes))
    names = args.class_names or [str(c) for c in range(n_classes)]
    if len(names) != n_classes:
        raise MMILInputError(f"--class-names lists {len(names)} names but {args.released} has {n_classes} classes")
    save_checkpoint(out, model, "mmil", kwargs, extra={"imported_from": str(Path(args.released).resolve()), "class_names": names})
    print(f"imported {args.released} -> {out} ({json.dumps({k: kwargs[k] for k in ('in_dim', 'n_classes', 'embed_dim', 'num_subbags', 'grouping') if k in kwargs})})")
    return 0


def cmd_synth(args) -> int:
    from ..data.synth import write_synthetic_dataset

    check_output_dir(args.out)
    out = write_synthetic_dataset(
        args.out, args.n_slides, args.seed, in_dim=args.in_dim, min_instances=args.min_instances, max_instances=args.max_instances,
        positive_fraction=tuple(args.positive_fraction), signal=args.signal, positive_rate=args.positive_rate,
        slides_per_case=args.slides_per_case, progress=sys.stderr.isatty(),
    )
    print(f"wrote {args.n_slides} synthetic slides to {out / 'features'} and labels to {out / 'labels.csv'}")
    return 0
