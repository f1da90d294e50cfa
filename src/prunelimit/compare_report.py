"""Running `prunelimit compare` into a directory, resumably, and its reports.

    OUT/compare_config.json   the settings (a rerun with other settings is refused, naming them)
    OUT/results.csv           method,sparsity,seed,test_accuracy,test_loss,kept_weights,train_seconds,finetune_epochs
    OUT/layers.json           layer-wise sparsity of every result (methods differ most there)
    OUT/prediction.json       the predicted limit p* of the l1-trained network (lomp), first seed
    OUT/summary.md            mean +- std over seeds, the best method per sparsity, paired t-tests against it
    OUT/accuracy.png          test accuracy against the kept fraction (log axis), p* marked
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mmpl import plotstyle
from mmpl.config import differences
from mmpl.jsonio import write_json, write_text

from .compare import RESULT_COLUMNS, CompareConfig, Trial, config_dict, predicted_limit, run_method
from .errors import PruneLimitError
from .report import kept_axis, kept_fraction


def _load_rows(out: Path, cfg: CompareConfig) -> list[dict]:
    """Rows already computed with the same settings; a directory with other settings is refused."""
    stored = out / "compare_config.json"
    if not stored.is_file():
        return []
    diff = differences(json.loads(stored.read_text()), config_dict(cfg))
    if diff:
        raise PruneLimitError(f"{out}: holds a comparison with other settings ({'; '.join(diff[:5])}); "
                              "use another --out or the same options")
    if not (out / "results.csv").is_file():
        return []
    layers = json.loads((out / "layers.json").read_text()) if (out / "layers.json").is_file() else {}
    rows = []
    for r in csv.DictReader((out / "results.csv").open()):
        row = {"method": r["method"], "sparsity": float(r["sparsity"]), "seed": int(r["seed"]),
               "test_accuracy": float(r["test_accuracy"]), "test_loss": float(r["test_loss"]),
               "kept_weights": int(r["kept_weights"]), "train_seconds": float(r["train_seconds"]),
               "finetune_epochs": int(r["finetune_epochs"])}
        row["layer_sparsity"] = layers.get(_key(row), {})
        rows.append(row)
    return rows


def _key(row: dict) -> str:
    return f"{row['method']}@{row['sparsity']:g}#{row['seed']}"


def _write_rows(out: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: (r["method"], r["sparsity"], r["seed"])))
    write_text(out / "results.csv", buf.getvalue())
    write_json(out / "layers.json", {_key(r): r["layer_sparsity"] for r in rows})


def run_compare(cfg: CompareConfig, out: str | Path, make_trial: Callable[[int], Trial], *,
                log: Callable[[str], None] = print) -> list[dict]:
    """Every (seed, method) not yet in ``out``; reports rewritten after each, so a killed run resumes."""
    out = Path(out)
    rows = _load_rows(out, cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare_config.json", config_dict(cfg))
    done = {(r["method"], r["seed"]) for r in rows}
    for seed in cfg.seeds:
        trial = make_trial(seed)
        for method in cfg.methods:
            if (method, seed) in done:
                continue
            trained: dict = {}
            new = run_method(trial, method, trained)
            rows += new
            _write_rows(out, rows)
            log(f"seed {seed} {method:9s} " + "  ".join(f"{r['sparsity']:g}: {r['test_accuracy']:.4f}" for r in new))
            if method == "lomp" and seed == cfg.seeds[0] and "state" in trained:
                write_json(out / "prediction.json", predicted_limit(trial, trained["state"]))
    prediction = json.loads((out / "prediction.json").read_text()) if (out / "prediction.json").is_file() else None
    write_text(out / "summary.md", summary_markdown(rows, cfg, prediction))
    plot_accuracy(rows, out / "accuracy.png", prediction)
    return rows


def _table(rows: list[dict]) -> dict[tuple[str, float], np.ndarray]:
    """(method, sparsity) -> test accuracies ordered by seed."""
    table: dict[tuple[str, float], list[tuple[int, float]]] = {}
    for r in rows:
        table.setdefault((r["method"], r["sparsity"]), []).append((r["seed"], r["test_accuracy"]))
    return {k: np.array([a for _, a in sorted(v)]) for k, v in table.items()}


def paired_p_value(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided paired t-test over seeds (nan with fewer than 2 pairs or no spread)."""
    from scipy import stats

    if len(a) < 2 or len(a) != len(b) or np.allclose(a - b, (a - b).mean()):
        return float("nan")
    return float(stats.ttest_rel(a, b).pvalue)


def summary_markdown(rows: list[dict], cfg: CompareConfig, prediction: dict | None) -> str:
    """Mean +- std test accuracy per method and sparsity, the best per sparsity and p-values against it."""
    table = _table(rows)
    methods = [m for m in cfg.methods if any(k[0] == m for k in table)]
    lines = [f"# {cfg.model} on {cfg.dataset}: test accuracy after pruning", "",
             f"{len(cfg.seeds)} seeds, {cfg.epochs} epochs per training run, lomp lambda {cfg.lam:g}, "
             f"fine-tuning {cfg.finetune_epochs} epochs. Cells: mean +- std over seeds; **bold** = best mean; "
             "p = paired t-test over seeds against the best (few seeds: low power).", ""]
    if prediction:
        lines += [f"Predicted limit of the lomp network (seed {prediction['seed']}): p* = {prediction['predicted_ratio']:.4f} "
                  f"(keep {prediction['kept_fraction']:.4f}){'' if prediction['in_lomp_regime'] else ', outside the LOMP regime'}.", ""]
    lines += ["| method | " + " | ".join(f"sparsity {s:g}" for s in cfg.sparsities) + " |",
              "|---|" + "---|" * len(cfg.sparsities)]
    best = {s: max((m for m in methods if (m, s) in table), key=lambda m: table[(m, s)].mean(), default=None) for s in cfg.sparsities}
    for m in methods:
        cells = []
        for s in cfg.sparsities:
            acc = table.get((m, s))
            if acc is None:
                cells.append("-")
                continue
            text = f"{acc.mean():.4f} +- {acc.std():.4f}"
            p = paired_p_value(acc, table[(best[s], s)]) if best[s] != m else float("nan")
            cells.append(f"**{text}**" if best[s] == m else f"{text} (p {p:.3f})" if np.isfinite(p) else text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def accuracy_figure(rows: list[dict], prediction: dict | None):
    """Test accuracy (mean +- sd over seeds) against the kept fraction ``1 - sparsity`` on a log
    axis (:func:`prunelimit.report.kept_axis`), one marker and line style per method, p* marked."""
    table = _table(rows)
    fig, ax = plotstyle.new_figure(8.6, 4.6)
    with plotstyle.apply():
        for i, method in enumerate(sorted({m for m, _ in table})):
            sparsities = sorted(s for m, s in table if m == method)
            means = [table[(method, s)].mean() for s in sparsities]
            stds = [table[(method, s)].std() for s in sparsities]
            ax.errorbar(kept_fraction(sparsities), means, yerr=stds, **plotstyle.series_style(i), markerfacecolor="none",
                        label=method)
        if prediction:
            ax.axvline(prediction["kept_fraction"], **dict(plotstyle.PREDICTED, color="black"),
                       label=f"predicted limit p* = {prediction['predicted_ratio']:.4f} (lomp, seed {prediction.get('seed', 0)})")
        kept_axis(ax, ticks=kept_fraction(sorted({s for _, s in table})))
        ax.set_ylabel("test accuracy (fraction correct)")
        ax.set_title("accuracy after pruning, mean +- sd over seeds")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    return fig


def plot_accuracy(rows: list[dict], path: Path, prediction: dict | None) -> None:
    """Write :func:`accuracy_figure` to ``path`` (atomically)."""
    plotstyle.save_figure(accuracy_figure(rows, prediction), path)


def make_trial_factory(cfg: CompareConfig) -> Callable[[int], Trial]:
    """Trials on one data split (seed 0) with models initialised from each trial's seed."""
    from .data import load_dataset
    from .models import create_model

    bundle = load_dataset(cfg.dataset, cfg.data_root, seed=0)

    def make_model(seed: int):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return create_model(cfg.model, bundle.in_shape, bundle.num_classes).to(cfg.device)

    return lambda seed: Trial(bundle, make_model, cfg, seed)
