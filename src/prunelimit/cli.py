"""`prunelimit` command line: argument parsing and printing only (the work is in pipeline.py).

    prunelimit run --model lenet300 --dataset digits --out runs/lenet300
    prunelimit spectrum --out runs/lenet300 --lanczos-steps 300     # redo one step with other options
    prunelimit list-models

The run options are declared once, as the fields of :class:`prunelimit.config.RunConfig`; their
flags, help texts and range types come from there (:func:`mmpl.config.add_config_flags`).
Options given on the command line override a ``--config`` YAML, which overrides the run
directory's stored config.yaml. Bad input ends with one line on stderr and exit status 2, before
anything is computed or written: numbers are range-checked at parse time (the same ranges check
YAML values), the output directory, the device, the data and the model are checked before the
first step runs.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any, Sequence

from mmpl.cliargs import EXIT_USER_ERROR, OneLineParser as _Parser, add_common_flags, apply_common_flags
from mmpl.config import add_config_flags, given_flags, read_yaml_mapping
from mmpl.device import DEVICE_HELP, resolve_device

from .config import RunConfig, help_defaults
from .errors import PruneLimitError

# name: (one-line help in the command list, description on the command's own --help)
COMMANDS = {
    "run": ("the whole pipeline: train, spectrum, predict, prune, report",
            "Run the whole pipeline on the run directory --out: l1-regularized training, epsilon and the SLQ Hessian "
            "spectrum, the predicted threshold p*, the actual threshold by one-shot pruning, and the report with its "
            "plots. Finished steps are skipped; a changed option redoes exactly the steps that depend on it."),
    "train": ("l1-regularized training; writes model.safetensors, model.json, train.json",
              "Train the model on loss + lam * ||w||_1 (SGD with momentum) from a seeded initialisation and measure its "
              "dense test accuracy; writes model.safetensors, model.json and train.json."),
    "spectrum": ("epsilon, SLQ spectrum, Hutchinson trace, p0; writes spectrum.json",
                 "From the trained model: epsilon (spread of the per-batch training loss), the SLQ spectrum of the "
                 "training-loss Hessian (with --lanczos-steps auto, m grows until p* settles), the Hutchinson trace and "
                 "the null mass p0; writes spectrum.json."),
    "predict": ("predicted threshold p*; writes prediction.json",
                "The predicted threshold p*, the root of G(R(p)) = p, with p* at eps/2 and 2 eps, the trace bound and "
                "the LOMP-regime check; writes prediction.json."),
    "prune": ("actual threshold by one-shot pruning on the test set; writes actual.json",
              "The actual threshold: one-shot global magnitude pruning, evaluated on the test set up to the first ratio "
              "whose accuracy falls below dense - tolerance; writes actual.json."),
    "report": ("report.json and the PNG plots",
               "report.json and the plots (spectrum, G(R) against R(p), accuracy against the pruning ratio), from the "
               "other result files alone."),
    "list-models": ("the model zoo",
                    "The model zoo: name, family, default l1 lambda, whether p0 is on by default, and a description."),
    "list-datasets": ("the dataset names understood by --dataset",
                      "The built-in dataset names --dataset understands (any package.module:factory works too)."),
}
# --help layout: the RunConfig flags by topic (seed and device are common flags, mmpl.cliargs.add_common_flags)
FLAG_GROUPS = {
    "model and data": ("model", "dataset", "data_root"),
    "training (l1-regularized)": ("lam", "max_dense_drop", "lam_sweep_epochs", "epochs", "lr", "batch_size",
                                  "weight_decay", "schedule", "augment"),
    "curvature and prediction": ("lanczos_steps", "lanczos_max_steps", "lanczos_max_seconds", "lanczos_max_memory_mb",
                                 "probes", "trace_samples", "hessian_samples", "hessian_batch_size", "eps_batch_size", "p0"),
    "pruning": ("tolerance", "criterion", "prune_ratio", "save_pruned"),
}
COMMON_FIELDS = ("seed", "device")  # RunConfig fields whose flags are the common ones
# The option groups each command's steps read (`run` reads them all); the others are not its options.
COMMAND_GROUPS = {
    "run": tuple(FLAG_GROUPS),
    "train": ("model and data", "training (l1-regularized)"),
    "spectrum": ("model and data", "curvature and prediction"),
    "predict": ("model and data",),
    "prune": ("model and data", "pruning"),
    "report": ("model and data",),
}
SEED_HELP = "seed of the split, initialisation, shuffling and probes"


def _add_run_options(parser: argparse.ArgumentParser, command: str) -> None:
    """The options of `run` and the step commands: the run directory, then only the groups its steps read."""
    new_run = command in ("run", "train")
    g = parser.add_argument_group("run directory")
    g.add_argument("--out", required=True, metavar="DIR", help="run directory (a folder): every step reads and writes its files here")
    g.add_argument("--config", metavar="YAML", help="YAML file of options (field names of prunelimit.config.RunConfig); flags win over it")
    g.add_argument("--force", action="store_true", help="redo the step(s) even if their results exist (same model and dataset)")
    if new_run:
        g.add_argument("--overwrite", action="store_true",
                       help="start the run directory afresh: delete the files prunelimit wrote there (refused if it holds "
                       "other files); the stored config is ignored, so give --model and --dataset")
    named = "none; required for a new run directory" if new_run else "the run directory's; given, it is only checked against it"
    shown = {**help_defaults(), "model": named, "dataset": named}
    for title in COMMAND_GROUPS[command]:
        others = tuple(f.name for f in fields(RunConfig) if f.name not in FLAG_GROUPS[title])
        add_config_flags(parser.add_argument_group(title), RunConfig, exclude=others, defaults=shown)
    add_common_flags(parser, helps={"seed": SEED_HELP, "device": DEVICE_HELP})


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prunelimit", description="How far can a network be pruned in one shot? "
                     "l1 training, SLQ Hessian spectrum, predicted vs actual pruning threshold.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (short, long) in COMMANDS.items():
        command = sub.add_parser(name, help=short, description=long)
        if name in COMMAND_GROUPS:
            _add_run_options(command, name)
        else:
            add_common_flags(command, unused=("threads", "device", "no_progress", "seed"))
    from .cli_compare import add_compare_command

    add_compare_command(sub)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Options from --config (checked with the command line's ranges, naming file and key), then flags on top."""
    values: dict[str, Any] = {}
    if args.config:
        values = read_yaml_mapping(args.config, PruneLimitError, "--config")
        source = f"--config {args.config}"
        given = {k: v for k, v in values.items() if v is not None}
        probe = RunConfig.from_dict({"model": "-", "dataset": "-", **given}, source)  # unknown keys, types
        probe.validate(source, keys=given)
        if "device" in given and args.device is None:
            resolve_device(probe.device, f"{source}: option device", error=PruneLimitError)
    values.update(given_flags(args, RunConfig))
    if args.device is not None:
        resolve_device(args.device, "--device", error=PruneLimitError)
    return values


def _cmd_list_models() -> int:
    from .models import list_models, model_spec

    for name in list_models():
        spec = model_spec(name)
        p0 = "p0 on" if spec.uses_conv else "p0 off"
        print(f"{name:10s} {spec.family:8s} lam {spec.default_lam:<7g} {p0:7s} {spec.description}")
    print("(or any package.module:factory returning a torch.nn.Module)")
    return 0


def _cmd_list_datasets() -> int:
    from .data import list_datasets

    for name in list_datasets():
        print(name)
    print("(or any package.module:factory returning a prunelimit.data.DatasetBundle)")
    return 0


def _print_step(command: str, run_dir) -> None:
    """One line on stdout with the step's headline number."""
    from .rundir import RunDirectory

    result = RunDirectory(run_dir).read_result(command)
    if result is None:
        return
    if command == "train":
        print(f"dense test accuracy {result['test_accuracy_dense']:.4f}, D = {result['num_prunable']}")
    elif command == "spectrum":
        print(f"eps = {result['epsilon']:.4g}, m = {result['lanczos_steps']}, probes = {result['probes']}, "
              f"Tr(H) = {result['trace']['mean']:.4g}, p0 = {result['p0']:.3f}")
    elif command == "predict":
        print(f"predicted threshold p* = {result['predicted_threshold']:.4f} (keep {result['kept_fraction']:.2%})")
    elif command == "prune":
        print(f"actual threshold = {result['threshold']:.4f} (keep {result['kept_fraction']:.2%})")


def _one_line(err: BaseException) -> str:
    """The first line of an error; an OSError names its file and the fix."""
    if isinstance(err, OSError) and err.filename is not None:
        names = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 else "")
        return f"{names}: {err.strerror or type(err).__name__}; check the path, its permissions and the free space"
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_common_flags(args)
    try:
        return _dispatch(args)
    except (PruneLimitError, ValueError, OSError) as err:  # OutputPathError is a ValueError
        if args.debug:
            raise
        print(f"prunelimit: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("prunelimit: interrupted (finished steps are kept; rerun to resume)", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if getattr(args, "func", None) is not None:  # commands with their own module (compare)
        return args.func(args)
    if args.command == "list-models":
        return _cmd_list_models()
    if args.command == "list-datasets":
        return _cmd_list_datasets()
    from mmpl.fsio import check_output_dir

    if not args.out.strip():
        raise PruneLimitError("--out is empty; give the path of the run directory")
    check_output_dir(args.out, "--out")  # before anything is read, computed or written
    from .pipeline import maybe_init_distributed, run_pipeline
    from .rundir import STEPS
    from .summary import summary_lines

    from . import distributed

    overrides = _overrides(args)
    started = maybe_init_distributed(overrides.get("device") or "auto")
    rank = distributed.world()[0]
    try:
        steps = STEPS if args.command == "run" else (args.command,)
        report = run_pipeline(args.out, overrides, steps=steps, force=args.force, overwrite=getattr(args, "overwrite", False),
                              progress=not args.no_progress)
    finally:
        if started:
            import torch.distributed

            torch.distributed.destroy_process_group()
    if rank != 0:
        return 0
    if report is not None:
        for line in summary_lines(report):
            print(line)
        print(f"report: {args.out}/report.json (plots beside it)")
    else:
        _print_step(args.command, args.out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
