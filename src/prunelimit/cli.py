"""`prunelimit` command line: argument parsing and printing only (the work is in pipeline.py).

    prunelimit run --model lenet300 --dataset digits --out runs/lenet300
    prunelimit spectrum --out runs/lenet300 --lanczos-steps 300     # redo one step with other options
    prunelimit list-models

Options given on the command line override a ``--config`` YAML, which overrides the run
directory's stored config.yaml. Bad input ends with one line on stderr and exit status 2, before
anything is computed or written: numbers are range-checked at parse time (the ranges of
``prunelimit.config.BOUNDS``, which also check YAML values), the output directory, the device,
the data and the model are checked before the first step runs.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from mmpl.cliargs import EXIT_USER_ERROR, OneLineParser as _Parser, positive_int, ranged

from .config import BOUNDS, FLAG_OPTIONS
from .errors import PruneLimitError

STEP_COMMANDS = ("train", "spectrum", "predict", "prune", "report")


def _lanczos_steps(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"need at least 2 steps, got {value}")
    return value


def _bounded(key: str):
    """The argparse type of option ``key``: its kind and range from :data:`prunelimit.config.BOUNDS`."""
    b = BOUNDS[key]
    if b.kind is int and b.high is not None:  # (seed) print the integer bound in full, not as 4.29e+09
        low = ranged(int, b.low, low_open=b.low_open)

        def parse(text: str) -> int:
            value = low(text)
            if value > b.high:
                raise argparse.ArgumentTypeError(f"must be <= {b.high}, got {text}")
            return value

        return parse
    return ranged(b.kind, b.low, b.high, low_open=b.low_open, high_open=b.high_open)


def _add_run_options(parser: argparse.ArgumentParser, *, new_run: bool) -> None:
    """Options shared by `run` and the step commands (all default to "not given")."""
    what = "required for a new run directory" if new_run else "only to check it matches the run directory"
    g = parser.add_argument_group("run")
    g.add_argument("--out", required=True, metavar="DIR", help="run directory: every step reads and writes its files here")
    g.add_argument("--model", help=f"zoo model (see `prunelimit list-models`) or package.module:factory; {what}")
    g.add_argument("--dataset", help=f"digits, mnist5k, mnist, cifar10, cifar100 or package.module:factory; {what}")
    g.add_argument("--data-root", metavar="PATH", help="folder with local datasets in torchvision's layout (never downloaded); "
                   "the CIFAR files are Python pickles, which can run code: use only files from the official archive")
    g.add_argument("--config", metavar="YAML", help="YAML file of options (field names of prunelimit.config.RunConfig); flags win over it")
    g.add_argument("--seed", type=_bounded("seed"), help="seed of the split, initialisation, shuffling and probes (default 0)")
    g.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default cpu)")
    g.add_argument("--force", action="store_true", help="redo the step(s) even if their results exist (same model and dataset)")
    if new_run:
        g.add_argument("--overwrite", action="store_true",
                       help="start the run directory afresh: delete the files prunelimit wrote there (refused if it holds "
                       "other files); the stored config is ignored, so give --model and --dataset")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--threads", type=positive_int, metavar="N",
                   help="torch CPU threads (default: torch's choice; 1 is often faster on a busy small machine)")

    t = parser.add_argument_group("training (l1-regularized)")
    t.add_argument("--lam", type=_bounded("lam"), help="l1 strength lambda (default: 2e-3 on digits, 1e-3 on mnist5k, the paper's per-model value otherwise)")
    t.add_argument("--epochs", type=_bounded("epochs"), help="training epochs (default: 30 digits, 20 mnist5k, 160 otherwise)")
    t.add_argument("--lr", type=_bounded("lr"), help="SGD learning rate (default 0.05)")
    t.add_argument("--batch-size", type=_bounded("batch_size"), help="training batch size (default 128)")
    t.add_argument("--weight-decay", type=_bounded("weight_decay"), help="l2 weight decay on all parameters (default 0)")
    t.add_argument("--schedule", choices=("cosine", "step", "constant"), help="learning-rate schedule, stepped per epoch (default cosine)")
    t.add_argument("--no-augment", dest="augment", action="store_const", const=False,
                   help="no random crop/flip for CIFAR training (never used for the Hessian anyway)")

    c = parser.add_argument_group("curvature and prediction")
    c.add_argument("--lanczos-steps", type=_lanczos_steps, metavar="M|auto",
                   help="Lanczos steps per probe; auto (default) grows m = 50, 100, 200, ... until p* moves < 0.005")
    c.add_argument("--lanczos-max-steps", type=_bounded("lanczos_max_steps"), help="cap on m in auto mode (default 800)")
    c.add_argument("--probes", type=_bounded("probes"), help="Rademacher probes for SLQ (default 2)")
    c.add_argument("--trace-samples", type=_bounded("trace_samples"), help="Hutchinson samples for Tr(H) (default 20)")
    c.add_argument("--hessian-samples", type=_bounded("hessian_samples"), metavar="N",
                   help="use a fixed seeded subset of N training samples for Hessian products (default: all; "
                   "epsilon always uses the whole training set, forward passes only)")
    c.add_argument("--hessian-batch-size", type=_bounded("hessian_batch_size"), help="batch size of Hessian passes; memory only, not the result (default 512)")
    c.add_argument("--eps-batch-size", type=_bounded("eps_batch_size"), help="batch size whose per-batch loss spread is epsilon (default 128, as the paper)")
    c.add_argument("--p0", choices=("auto", "on", "off"),
                   help="null-mass correction from Hessian rows: auto = on for conv nets, off for FC nets")

    p = parser.add_argument_group("pruning")
    p.add_argument("--tolerance", type=_bounded("tolerance"),
                   help="accuracy drop (fraction, e.g. 0.01 = 1 point) allowed before the actual threshold (default 0)")
    p.add_argument("--prune-ratio", type=_bounded("prune_ratio"), metavar="P", help="also evaluate (and with --save-pruned save) the model pruned at ratio P in [0, 1) instead of at p*")
    p.add_argument("--save-pruned", action="store_const", const=True,
                   help="save the pruned model (masks made permanent) as model_pruned.safetensors")


CONFIG_FLAGS = FLAG_OPTIONS  # the options a flag sets (dest names = RunConfig fields)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prunelimit", description="How far can a network be pruned in one shot? "
                     "l1 training, SLQ Hessian spectrum, predicted vs actual pruning threshold.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    run = sub.add_parser("run", help="the whole pipeline: train, spectrum, predict, prune, report")
    _add_run_options(run, new_run=True)
    helps = {
        "train": "l1-regularized training; writes model.safetensors, model.json, train.json",
        "spectrum": "epsilon, SLQ spectrum, Hutchinson trace, p0; writes spectrum.json",
        "predict": "predicted threshold p*; writes prediction.json",
        "prune": "actual threshold by one-shot pruning on the test set; writes actual.json",
        "report": "report.json and the PNG plots",
    }
    for name in STEP_COMMANDS:
        _add_run_options(sub.add_parser(name, help=helps[name]), new_run=name == "train")
    sub.add_parser("list-models", help="the model zoo")
    sub.add_parser("list-datasets", help="the dataset names understood by --dataset")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Options from --config (checked with the command line's ranges, naming file and key), then flags on top."""
    from .config import RunConfig, load_yaml_mapping
    from .preflight import check_device

    values: dict[str, Any] = {}
    if args.config:
        values = load_yaml_mapping(args.config)
        source = f"--config {args.config}"
        given = {k: v for k, v in values.items() if v is not None}
        probe = RunConfig.from_dict({"model": "-", "dataset": "-", **given}, source)  # unknown keys, types
        probe.validate(source, keys=given)
        if "device" in given and args.device is None:
            check_device(probe.device, f"{source}: option device")
    for name in CONFIG_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    if args.device is not None:
        check_device(args.device, "--device")
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
    from .pipeline import RunDirectory

    result = RunDirectory(run_dir).read_result({"train": "train", "spectrum": "spectrum", "predict": "predict",
                                                "prune": "prune", "report": "report"}[command])
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
    if args.command == "list-models":
        return _cmd_list_models()
    if args.command == "list-datasets":
        return _cmd_list_datasets()
    from mmpl.fsio import check_output_dir

    if not args.out.strip():
        raise PruneLimitError("--out is empty; give the path of the run directory")
    check_output_dir(args.out, "--out")  # before anything is read, computed or written
    from .pipeline import STEPS, maybe_init_distributed, run_pipeline
    from .report import summary_lines

    from . import distributed

    overrides = _overrides(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    started = maybe_init_distributed(overrides.get("device") or "cpu")
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
