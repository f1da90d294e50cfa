"""``mmil train | evaluate | predict | prune-limit | import-checkpoint | synth``: parsing and printing only.

The work lives in :mod:`mmil.crossval`, :mod:`mmil.evaluate`, :mod:`mmil.pruning`,
:mod:`mmil.data.synth` and :mod:`mmil.checkpoint`. Every option is a field of a config
dataclass (:class:`mmil.config.ExperimentConfig`, :class:`mmil.config.TrainConfig` and
those of :mod:`mmil.cli.options`) that declares its flag, help, default and range once.
Options given on the command line override those of ``--config``; both override the defaults.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from mmpl.config import add_config_flags, given_flags, layered_config
from mmpl.fsio import check_output_dir, check_output_file

from ..config import ExperimentConfig, TrainConfig
from ..errors import MMILInputError
from .common import add_common, check_device, check_grouping, default_device_auto, device_option, model_args, options_from_args
from .options import (
    IMPORT_DEFAULTS,
    EvaluateOptions,
    ImportOptions,
    ModelOptions,
    ModelOverrides,
    PredictOptions,
    PruneLimitOptions,
    SynthOptions,
)

STANDARDIZE = {"auto": None, "on": True, "off": False}


def add_commands(subparsers) -> None:
    for add in (_add_train, _add_evaluate, _add_predict, _add_prune_limit, _add_import_checkpoint, _add_synth):
        add(subparsers)


def _add_overrides(p) -> None:
    g = p.add_argument_group("model options (only those given override the checkpoint's)")
    add_config_flags(g, ModelOverrides, prefix="model_", defaults={f.name: "the checkpoint's" for f in dataclasses.fields(ModelOverrides)})


# ----------------------------------------------------------------------------- train
def _add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="cross-validate a MIL model on feature bags",
        description="Cross-validate a MIL model (stratified k-fold, patient-level with case_id, the label CSV's fixed split, or CLAM's splits_k.csv with --splits-dir) and write metrics.json, roc.png, config.yaml and one checkpoint per fold. Rerun the same command to resume.",
    )
    p.add_argument("--features", required=True, help="directory of per-slide .h5/.pt bags (CLAM, STAMP; a TRIDENT job root or features_<encoder> folder), or one MIL-benchmark CSV (label,bag_id,f1,...)")
    p.add_argument("--labels", help="label CSV (slide_id,label[,case_id][,split|fold]) or the wide split CSV; not needed for a MIL-benchmark CSV")
    p.add_argument("--out", required=True, help="output folder of the run")
    p.add_argument("--config", help="YAML experiment config (see configs/mmil_default.yaml); command-line options override it")
    p.add_argument("--overwrite", action="store_true", help="start --out afresh: delete the run files a previous run left there (other files are kept)")
    add_common(p, seed="seed of folds, initial weights, bag order and evaluation (YAML: seed)", device="where to train (YAML: train.device)",
               progress="no progress bars (YAML: train.progress)", dests={"device": "train_device"})
    g = p.add_argument_group("experiment options (YAML: top-level keys)")
    add_config_flags(g, ExperimentConfig, exclude=("seed",))
    g.add_argument("--ignore-splits", action="store_true", help="cross-validate even when the label CSV has a split or fold column (YAML: use_splits: false)")
    g = p.add_argument_group("training options (YAML: keys under train:; --seed also seeds the training)")
    add_config_flags(g, TrainConfig, prefix="train_", exclude=("seed", "device", "progress"))
    g.add_argument("--standardize", choices=tuple(STANDARDIZE), help="z-score features with training-fold statistics (auto: on for MIL-benchmark CSVs only)")
    g = p.add_argument_group("model options (YAML: keys under model_kwargs:; only those given are passed to the model)")
    add_config_flags(g, ModelOptions, prefix="model_", defaults={f.name: "the model's" for f in dataclasses.fields(ModelOptions)})
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="any other model option, VALUE parsed as YAML (repeatable), e.g. --model-arg gated=true")
    p.set_defaults(func=cmd_train)


def _experiment_from_args(args) -> ExperimentConfig:
    """The ``--config`` experiment with the flags given laid over it."""
    default_device_auto(args, "train_device", ("train", "device"))
    top = given_flags(args, ExperimentConfig)
    train = given_flags(args, TrainConfig, prefix="train_")
    if args.no_progress:
        train["progress"] = False
    if "seed" in top:
        train["seed"] = top["seed"]
    if args.standardize is not None:
        train["standardize"] = STANDARDIZE[args.standardize]
    if args.ignore_splits:
        top["use_splits"] = False
    top["features"] = str(Path(args.features).resolve())
    top["labels"] = str(Path(args.labels).resolve()) if args.labels else None
    if top.get("splits_dir"):
        top["splits_dir"] = str(Path(top["splits_dir"]).resolve())
    model_kwargs = {**given_flags(args, ModelOptions, prefix="model_"), **model_args(args.model_arg)}
    exp = layered_config(ExperimentConfig, args.config, top, {"train": train, "model_kwargs": model_kwargs}, MMILInputError)
    check_grouping(exp.model_kwargs.get("grouping"))
    return exp


def cmd_train(args) -> int:
    from ..crossval import cross_validate, format_metrics_table
    from ..data import load_dataset

    exp = _experiment_from_args(args)
    check_device(exp.train.device, device_option(args, args.train_device is not None, "train.device"))
    check_output_dir(args.out)
    features = Path(args.features)
    if features.suffix.lower() != ".csv" and not args.labels:
        raise MMILInputError(f"{features}: --labels is required for a features directory (a MIL-benchmark CSV carries its own labels)")
    dataset = load_dataset(features, args.labels)
    result = cross_validate(
        dataset, exp.model, exp.model_kwargs, exp.train, args.out,
        folds=exp.folds, repeats=exp.repeats, seed=exp.seed, use_splits=exp.use_splits, experiment=exp, overwrite=args.overwrite,
        splits_dir=exp.splits_dir,
    )
    s = result.summary
    if not s:  # a torchrun rank other than 0 (mmil.ddp): rank 0 writes and reports
        return 0
    print(f"{exp.model} on {dataset.source}: {len(dataset)} bags, classes {dataset.class_names}, split {s['split']}, R={exp.repeats}")
    print(format_metrics_table(s))
    print(f"results: {Path(args.out) / 'metrics.json'}, {Path(args.out) / 'roc.png'}, {Path(args.out) / 'reliability.png'}")
    return 0


# ----------------------------------------------------------------------------- evaluate, predict
def _resolve_checkpoint(path: str) -> Path:
    d = Path(path)
    if (d / "config.json").is_file() and (d / "model.safetensors").is_file():
        return d
    if (d / "checkpoint" / "config.json").is_file():
        return d / "checkpoint"
    folds = sorted(p.name for p in d.glob("fold_*") if (p / "checkpoint").is_dir())
    if folds:
        raise MMILInputError(f"{d}: a cross-validation run with one checkpoint per fold; pass one of them, e.g. {d / folds[0] / 'checkpoint'}")
    return d  # let load_checkpoint report what is missing


def _overrides(args) -> dict:
    over = given_flags(args, ModelOverrides, prefix="model_")
    check_grouping(over.get("grouping"))
    return over


def _add_inference(subparsers, name: str, options, func, *, help: str, description: str, inputs: list[tuple[str, dict]]) -> None:
    """``evaluate`` or ``predict``: a checkpoint, the bags, ``options``' flags, threads and the model overrides."""
    p = subparsers.add_parser(name, help=help, description=description)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. RUN/fold_0/checkpoint, or one from `mmil import-checkpoint`)")
    for flag, kwargs in inputs:
        p.add_argument(flag, **kwargs)
    add_config_flags(p, options, exclude=("seed", "device"))
    add_common(p, seed="first seed of the R stochastic runs (seeds S..S+R-1)", device="where to run the model",
               progress="no progress bars")
    _add_overrides(p)
    p.set_defaults(func=func)


def _add_evaluate(subparsers) -> None:
    _add_inference(subparsers, "evaluate", EvaluateOptions, cmd_evaluate, help="evaluate a checkpoint on labelled bags",
                   description="Repeated stochastic evaluation of a checkpoint (mean ± std over R runs, and the test-time ensemble).",
                   inputs=[("--features", {"required": True, "help": "directory of .h5/.pt bags, or a MIL-benchmark CSV"}),
                           ("--labels", {"help": "label CSV (required for a features directory)"}),
                           ("--out", {"help": "output file: the metrics as JSON"})])


def _add_predict(subparsers) -> None:
    _add_inference(subparsers, "predict", PredictOptions, cmd_predict, help="class probabilities per slide",
                   description="Write slide_id,prob_<class>...,pred_label,repeat_std for every bag (columns named by the checkpoint's classes): probabilities averaged over R seeded runs and "
                               "scaled by the checkpoint's temperature, and the std over the runs of the predicted class's probability; "
                               "with --conformal-alpha also the prediction set of class names (e.g. normal|tumor) and abstain (set not a single class).",
                   inputs=[("--features", {"required": True, "help": "directory of .h5/.pt bags (every slide found), or a MIL-benchmark CSV"}),
                           ("--out", {"required": True, "help": "output file: the predictions CSV"}),
                           ("--labels", {"help": "label CSV slide_id,label[,case_id] (labels may be empty): predict only its slides, "
                                                 "and know their patients (case_id) for --patient-out"}),
                           ("--patient-out", {"help": "output file: patient-level predictions case_id,n_slides,prob_<class>...,pred_label, "
                                                      "the mean of each patient's slide probabilities (needs --labels with a case_id column); "
                                                      "with --conformal-alpha also each patient's set and abstain, thresholds from the validation patients"})])


def _start_inference(args, options):
    """The options given and the checkpoint, after the checks that stop a command before it writes anything."""
    opts = options_from_args(args, options)
    check_device(opts.device)
    if args.out:
        check_output_file(args.out)
    return opts, _resolve_checkpoint(args.checkpoint)


def _check_seen(command: str, ckpt: Path, slide_ids, refuse: bool) -> None:
    """One warning line on stderr when the checkpoint trained on some of ``slide_ids``; exit 2 with ``refuse``."""
    from ..evaluate import check_seen_slides

    line = check_seen_slides(ckpt, slide_ids, refuse=refuse)
    if line:
        print(f"mmil {command}: warning: {line}", file=sys.stderr)


def cmd_evaluate(args) -> int:
    from mmpl.jsonio import write_json

    from ..data import load_dataset
    from ..calibrate_run import calibration_lines
    from ..evaluate import METRIC_NAMES, evaluate_checkpoint

    features = Path(args.features)
    if features.suffix.lower() != ".csv" and not args.labels:
        raise MMILInputError(f"{features}: --labels is required to evaluate on a features directory")
    opts, ckpt = _start_inference(args, EvaluateOptions)
    dataset = load_dataset(features, args.labels)
    _check_seen("evaluate", ckpt, dataset.slide_ids, opts.refuse_training_slides)
    calibration = {"use_temperature": opts.temperature, "alpha": opts.conformal_alpha, "mondrian": opts.mondrian}
    result = evaluate_checkpoint(ckpt, dataset, repeats=opts.repeats, seed=opts.seed, device=opts.device, precision=opts.precision,
                                 calibration=calibration, progress=not args.no_progress, **_overrides(args))
    print(f"{ckpt} on {dataset.source}: {len(dataset)} bags, R={opts.repeats} (seeds {opts.seed}..{opts.seed + opts.repeats - 1})")
    print(f"{'metric':>18} {'mean':>8} {'std':>8} {'ensemble':>9}")
    for name in METRIC_NAMES:
        print(f"{name:>18} {result[name]:8.4f} {result[name + '_std']:8.4f} {result['ensemble'][name]:9.4f}")
    print("\n".join(calibration_lines(result["calibration"])))
    if args.out:
        write_json(args.out, result)
        print(f"metrics: {args.out}")
    return 0


def _write_patient_predictions(path: str, cfg: dict, ckpt: Path, case_ids, probs_r, opts) -> None:
    """The patient means of the probabilities written by ``predict`` (calibrated the same way) and, with
    ``--conformal-alpha``, each patient's conformal set (:func:`mmil.calibrate_run.patient_sets`)."""
    from mmpl.jsonio import write_text

    from ..calibrate_run import PATIENT_THRESHOLD_NOTE, patient_predictions_table, require_calibration

    write_text(path, patient_predictions_table(cfg, ckpt, case_ids, probs_r, use_temperature=opts.temperature,
                                               alpha=opts.conformal_alpha, mondrian=opts.mondrian))
    print(f"wrote {len(set(case_ids))} patient predictions to {path}")
    if opts.conformal_alpha is not None and not require_calibration(cfg, ckpt).get("case_ids"):
        print(f"mmil predict: note: {PATIENT_THRESHOLD_NOTE}", file=sys.stderr)


def cmd_predict(args) -> int:
    from mmpl.jsonio import write_text

    from ..data import load_dataset
    from ..calibrate_run import predictions_table, require_calibration
    from ..evaluate import load_for_inference, predict_probs

    opts, ckpt = _start_inference(args, PredictOptions)
    if args.patient_out:
        check_output_file(args.patient_out, "--patient-out")
    dataset = load_dataset(args.features, args.labels).without_labels()  # labels play no part in prediction
    if args.patient_out and dataset.case_ids is None:
        raise MMILInputError(f"--patient-out needs the slides' patients: pass --labels with a case_id column ({args.labels or 'no --labels given'})")
    _check_seen("predict", ckpt, dataset.slide_ids, opts.refuse_training_slides)
    model, dataset, cfg = load_for_inference(ckpt, dataset, device=opts.device, **_overrides(args))
    if opts.conformal_alpha is not None:
        require_calibration(cfg, ckpt)  # before the inference
    probs_r = predict_probs(model, dataset, seed=opts.seed, repeats=opts.repeats, device=opts.device, precision=opts.precision,
                            progress=not args.no_progress)
    write_text(args.out, predictions_table(cfg, ckpt, dataset.slide_ids, probs_r, use_temperature=opts.temperature,
                                           alpha=opts.conformal_alpha, mondrian=opts.mondrian))
    print(f"wrote {len(dataset)} predictions to {args.out}")
    if args.patient_out:
        _write_patient_predictions(args.patient_out, cfg, ckpt, dataset.case_ids, probs_r, opts)
    return 0


# ----------------------------------------------------------------------------- prune-limit
def _add_prune_limit(subparsers) -> None:
    p = subparsers.add_parser("prune-limit", help="predicted vs actual one-shot pruning limit of a checkpoint", description="prunelimit on a trained MIL model: epsilon and the SLQ Hessian spectrum of the mean training loss give the predicted threshold; one-shot global magnitude pruning on the test bags gives the actual one. Weights are not changed.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--features", required=True, help="training bags (Hessian, epsilon): a directory of .h5/.pt bags, or a MIL-benchmark CSV")
    p.add_argument("--labels", help="label CSV for --features (required for a directory)")
    p.add_argument("--test-features", help="test bags for the actual threshold (default: --features)")
    p.add_argument("--test-labels", help="label CSV for --test-features")
    p.add_argument("--out", required=True, help="output file: the result as JSON")
    add_config_flags(p, PruneLimitOptions, exclude=("seed",))
    add_common(p, seed="grouping and probe seed", progress="no progress bars")
    p.set_defaults(func=cmd_prune_limit)


def _labelled_dataset(features: str, labels: str | None):
    from ..data import load_dataset

    if Path(features).suffix.lower() != ".csv" and not labels:
        raise MMILInputError(f"{features}: a label CSV is required for a features directory")
    return load_dataset(features, labels)


def cmd_prune_limit(args) -> int:
    from mmpl.jsonio import write_json

    from ..evaluate import load_for_inference
    from ..pruning import prune_limit

    opts = options_from_args(args, PruneLimitOptions)
    check_output_file(args.out)
    ckpt = _resolve_checkpoint(args.checkpoint)
    train = _labelled_dataset(args.features, args.labels)
    test = _labelled_dataset(args.test_features, args.test_labels) if args.test_features else train
    model, train, _ = load_for_inference(ckpt, train)
    _, test, _ = load_for_inference(ckpt, test)
    result = prune_limit(model, train, test, seed=opts.seed, lanczos_steps=opts.lanczos_steps, num_probes=opts.probes,
                         tolerance=opts.tolerance, bags_per_batch=opts.bags_per_batch,
                         progress=not args.no_progress and sys.stderr.isatty())
    write_json(args.out, result.to_dict())
    print(f"{ckpt}: {result.num_prunable} prunable weights, dense accuracy {result.dense_accuracy:.4f}; {result.regime}")
    print(f"predicted threshold {result.predicted_ratio:.4f} (keep {1 - result.predicted_ratio:.4f}); "
          f"actual {result.actual_ratio:.4f} (keep {1 - result.actual_ratio:.4f}); written to {args.out}")
    return 0


# ----------------------------------------------------------------------------- import-checkpoint, synth
def _add_import_checkpoint(subparsers) -> None:
    p = subparsers.add_parser("import-checkpoint", help="convert a released MMIL-Transformer checkpoint", description="Convert the authors' released weights (a plain state dict, read with weights_only=True) into an mmil checkpoint directory.")
    p.add_argument("--released", required=True, help="released .pth/.pt file")
    p.add_argument("--class-names", nargs="+", help="class names in index order (default 0..C-1)")
    p.add_argument("--out", required=True, help="output folder: the checkpoint directory to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in --out")
    add_config_flags(p, ImportOptions, defaults=IMPORT_DEFAULTS)
    add_common(p)
    p.set_defaults(func=cmd_import_checkpoint)


def cmd_import_checkpoint(args) -> int:
    from ..checkpoint import load_released_checkpoint, save_checkpoint

    opts = options_from_args(args, ImportOptions)
    check_grouping(opts.grouping)
    out = Path(args.out)
    check_output_dir(out)
    if (out / "config.json").exists() and not args.force:
        raise MMILInputError(f"{out}: already holds a checkpoint; choose another --out or pass --force")
    model = load_released_checkpoint(args.released, **dataclasses.asdict(opts))
    kwargs = dict(getattr(model, "init_kwargs", {}))
    n_classes = int(kwargs.get("n_classes", model.n_classes))
    names = args.class_names or [str(c) for c in range(n_classes)]
    if len(names) != n_classes:
        raise MMILInputError(f"--class-names lists {len(names)} names but {args.released} has {n_classes} classes")
    save_checkpoint(out, model, "mmil", kwargs, extra={"imported_from": str(Path(args.released).resolve()), "class_names": names})
    print(f"imported {args.released} -> {out} ({json.dumps({k: kwargs[k] for k in ('in_dim', 'n_classes', 'embed_dim', 'num_subbags', 'grouping') if k in kwargs})})")
    return 0


def _add_synth(subparsers) -> None:
    p = subparsers.add_parser("synth", help="write a synthetic WSI-like bag dataset", description="Synthetic slides: tissue-shaped patch grids, positives with a small spatially clustered fraction of shifted instances. Writes OUT/features/*.h5 and OUT/labels.csv.")
    p.add_argument("--out", required=True, help="output folder (features/, labels.csv)")
    add_config_flags(p, SynthOptions, exclude=("seed",))
    add_common(p, seed="seed of the slides (same seed -> same files)", progress="no progress bar")
    p.set_defaults(func=cmd_synth)


def cmd_synth(args) -> int:
    from ..data.synth import write_synthetic_dataset

    opts = options_from_args(args, SynthOptions)
    check_output_dir(args.out)
    out = write_synthetic_dataset(args.out, progress=not args.no_progress, **dataclasses.asdict(opts))
    print(f"wrote {opts.n_slides} synthetic slides to {out / 'features'} and labels to {out / 'labels.csv'}")
    if (out / "oracle.json").is_file():
        import json

        print(f"instance-level oracle AUC: {json.loads((out / 'oracle.json').read_text())['oracle_auc']:.4f} ({out / 'oracle.json'})")
    return 0
