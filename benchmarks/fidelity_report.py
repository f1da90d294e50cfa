"""docs/fidelity.md and docs/img/fidelity.png from the study's run directories (benchmarks/fidelity.py).

Reads only JSON: DIR/<run>/report.json, DIR/<run>.failed.json and DIR/variants/<run>.json. The regime
warning of each run is re-evaluated with the current rule (:func:`prunelimit.geometry.lomp_regime_check`),
so the calibration section always describes the code as it is.
"""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
from mmpl import plotstyle
from mmpl.jsonio import read_json, write_text
from prunelimit.geometry import LOMP_MIN_SHARE, LOMP_MISS_LIMIT, lomp_regime_check

LAM_ORDER = ("0", "1e-05", "5e-05", "0.0002", "0.001", "auto")


def load_rows(out: Path, runs) -> tuple[list[dict], list[dict]]:
    """(rows of finished runs, failed runs) for ``runs`` = [(setting, lam, seed, name)]."""
    rows, failed = [], []
    for setting, lam, seed, name in runs:
        report_path, failed_path = out / name / "report.json", out / f"{name}.failed.json"
        if failed_path.is_file():
            failed.append(read_json(failed_path))
        elif report_path.is_file():
            variants_path = out / "variants" / f"{name}.json"
            variants = read_json(variants_path) if variants_path.is_file() else {}
            rows.append(make_row(read_json(report_path), setting.label, lam, seed, variants))
    return rows, failed


def make_row(report: dict, setting: str, lam: str, seed: int, variants: dict) -> dict:
    """The numbers of one run that the doc shows."""
    meaning = report.get("tolerance_meaning") or {}
    interval = report.get("predicted_interval") or {}
    p_star, frac = report["predicted_threshold"], report["regime_fraction"]
    return {
        "setting": setting, "lam_key": lam, "lam": float(report["lam"]), "seed": seed,
        "dense": report["test_accuracy_dense"], "dense_se": meaning.get("dense_accuracy_stderr", float("nan")),
        "near_zero": frac, "p_star": p_star, "low": interval.get("low", p_star), "high": interval.get("high", p_star),
        "actual": report["actual_threshold_first_drop"], "actual_train": report.get("actual_threshold_train_data"),
        "released": report["actual_threshold_released_criterion"],
        "gap": p_star - report["actual_threshold_first_drop"],
        "warned_old": not lomp_regime_check(frac, p_star, 0.5),
        "warned": not lomp_regime_check(frac, p_star),
        "seconds": float(sum(report["seconds"].values())), "steps": report["lanczos_steps_per_probe"],
        "stops": report.get("lanczos_stop_reasons") or [], "variants": variants,
    }


def lam_label(row: dict) -> str:
    return f"auto ({row['lam']:g})" if row["lam_key"] == "auto" else f"{row['lam']:g}"


def table_lines(rows: list[dict]) -> list[str]:
    """The per-run table in Markdown."""
    lines = ["| setting | lambda | seed | dense acc (± SE) | near-zero share | p* [interval] | actual test | "
             "actual train | released | gap | warns | s | Lanczos m |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        train = "-" if r["actual_train"] is None else f"{r['actual_train']:.3f}"
        lines.append(
            f"| {r['setting']} | {lam_label(r)} | {r['seed']} | {r['dense']:.3f} ± {r['dense_se']:.3f} | "
            f"{r['near_zero']:.3f} | {r['p_star']:.3f} [{r['low']:.3f}, {r['high']:.3f}] | {r['actual']:.3f} | {train} | "
            f"{r['released']:.3f} | {r['gap']:+.3f} | {'yes' if r['warned'] else 'no'} | {r['seconds']:.0f} | "
            f"{'/'.join(str(s) for s in r['steps'])} |")
    return lines


def figure(rows: list[dict]):
    """Predicted p* against the actual threshold, one marker per run (colour = lambda, marker = setting,
    black edge = regime warning): left as pruning ratios, right as kept fractions 1 - p on log axes."""
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, (left, right) = plotstyle.new_figure(12.0, 5.6, ncols=2)
    with plotstyle.apply():
        left.fill_between([0, 1], [-0.05, 0.95], [0.05, 1.05], color="0.85", alpha=0.5, lw=0, label="|gap| <= 0.05")
        for ax, f, ends in ((left, lambda p: p, [0, 1]), (right, lambda p: max(1.0 - p, 1e-3), [1e-4, 1])):
            ax.plot(ends, ends, **plotstyle.REFERENCE, label="identity (predicted = actual)")
            for r in rows:
                colour = plotstyle.OKABE_ITO[LAM_ORDER.index(r["lam_key"]) % len(plotstyle.OKABE_ITO)]
                marker = plotstyle.MARKERS[settings.index(r["setting"]) % len(plotstyle.MARKERS)]
                ax.plot([f(r["actual"])], [f(r["p_star"])], marker=marker, color=colour, linestyle="", markersize=7,
                        markeredgecolor="black" if r["warned"] else colour, markeredgewidth=1.2)
        for k, lam in enumerate(LAM_ORDER):
            left.plot([], [], "s", color=plotstyle.OKABE_ITO[k], label=f"lambda {lam}")
        for k, s in enumerate(settings):
            left.plot([], [], plotstyle.MARKERS[k], color="0.4", label=s)
        left.plot([], [], "o", color="white", markeredgecolor="black", label="regime warning (black edge)")
        lo = max(0.0, min(min(r["actual"] for r in rows), min(r["p_star"] for r in rows)) - 0.05) if rows else 0.0
        left.set_xlim(lo, 1.0)
        left.set_ylim(lo, 1.0)
        left.set_xlabel("actual threshold p (first drop > 1 point of test accuracy)")
        left.set_ylabel("predicted threshold p*")
        left.set_title("pruning ratio p (fraction removed)", fontsize=10)
        left.legend(loc="lower center", fontsize=7, ncols=2)
        kept = [max(1.0 - v, 1e-3) for r in rows for v in (r["actual"], r["p_star"])] or [1e-3, 1.0]
        right.set_xscale("log")
        right.set_yscale("log")
        right.set_xlim(min(kept) / 1.5, min(1.0, max(kept) * 1.5))
        right.set_ylim(min(kept) / 1.5, min(1.0, max(kept) * 1.5))
        right.set_xlabel("actual kept fraction 1 - p (log scale)")
        right.set_ylabel("predicted kept fraction 1 - p* (log scale)")
        right.set_title("kept fraction, log axes: the high-sparsity end spread out", fontsize=10)
    return fig


def calibration_lines(rows: list[dict]) -> list[str]:
    """How the current rule fares on the study: misses must all warn; false-alarm rate on the rest."""
    bad = [r for r in rows if abs(r["gap"]) > 0.05]
    good = [r for r in rows if abs(r["gap"]) <= 0.05]
    caught = sum(r["warned"] for r in bad)
    alarms = sum(r["warned"] for r in good)
    old_caught = sum(r["warned_old"] for r in bad)
    worst = max((abs(r["gap"]) for r in rows if r["warned"]), default=0.0)
    return [
        f"- Runs with |gap| > 0.05: **{len(bad)}**; the current rule warns on **{caught}** of them "
        f"(the previous rule, near-zero share < 0.5 p*, warned on {old_caught}).",
        f"- Runs with |gap| <= 0.05: {len(good)}; the rule also warns on {alarms} of them "
        f"(false-alarm rate {alarms / max(len(good), 1):.0%}).",
        f"- Warned runs missed by up to {worst:.3f} (the warning text quotes {LOMP_MISS_LIMIT:g}).",
        f"- Share of all runs that warn: {sum(r['warned'] for r in rows)} of {len(rows)}.",
        "", *threshold_table(rows),
    ]


def threshold_table(rows: list[dict], factors=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.8, 0.9)) -> list[str]:
    """How the rule "warn when near-zero share < c p*" fares for other c: misses caught, false alarms."""
    bad = [r for r in rows if abs(r["gap"]) > 0.05]
    good = [r for r in rows if abs(r["gap"]) <= 0.05]
    worst = max((r["near_zero"] / r["p_star"] for r in bad), default=float("nan"))
    lines = [f"The largest near-zero share / p* of a run with |gap| > 0.05 is {worst:.3f}: any c above it catches every "
             "such run. Other values of c on the same runs:", "",
             "| c (warn when near-zero share < c p*) | runs with abs gap > 0.05 warned | runs with abs gap <= 0.05 warned |",
             "|---|---|---|"]
    for c in factors:
        caught = sum(not lomp_regime_check(r["near_zero"], r["p_star"], c) for r in bad)
        alarms = sum(not lomp_regime_check(r["near_zero"], r["p_star"], c) for r in good)
        lines.append(f"| {c:g} | {caught} of {len(bad)} | {alarms} of {len(good)} |")
    return lines


def write_report(out: Path, runs, doc: Path, png: Path) -> None:
    """Write the Markdown page and the PNG from the JSON files under ``out``."""
    rows, failed = load_rows(out, runs)
    rel_png = Path("img") / png.name
    lines = header_lines(cpu_name())
    lines += ["## Results per run", "", *table_lines(rows), ""]
    if failed:
        lines += ["Runs that stopped (exit 2, no report):", ""]
        lines += [f"- {f['setting']} lambda {f['lam']} seed {f['seed']}: {f['message']}" for f in failed]
        lines.append("")
    lines += [f"![predicted against actual threshold, one marker per run]({rel_png.as_posix()})", ""]
    lines += findings_lines(rows)
    lines += variant_lines(rows)
    lines += ["## Regime-warning calibration", "", *rule_text(), "", *calibration_lines(rows), ""]
    warned = sum(r["warned"] for r in rows)
    if rows and warned > len(rows) / 2:
        lines += [f"So a rule on the near-zero share that catches every |gap| > 0.05 run must warn on most runs: "
                  f"{warned} of {len(rows)} here, {sum(r['warned'] for r in rows if abs(r['gap']) <= 0.05)} of them "
                  "runs whose prediction was in fact within 0.05. Read the warning as 'this prediction is "
                  "unverified', not as 'this prediction is wrong'.", ""]
    png.parent.mkdir(parents=True, exist_ok=True)
    if rows:
        plotstyle.save_figure(figure(rows), png)
    write_text(doc, "\n".join(lines).rstrip() + "\n")


def rule_text() -> list[str]:
    """The rule the report uses, from the code's constants."""
    return [f"The rule the report now uses (`prunelimit.geometry.lomp_regime_check`): warn when the share of "
            f"prunable weights with |w| < 1e-3 is below {LOMP_MIN_SHARE:g} p* (`regime_min_share`, before this "
            "study 0.5). The warning says: \"outside the LOMP regime, where the predicted threshold is unreliable: "
            f"in docs/fidelity.md, runs like this missed the actual threshold by up to {LOMP_MISS_LIMIT:.2f}\"."]



def cpu_name() -> str:
    """The CPU's model name and its widest vector extension (from /proc/cpuinfo where there is one)."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    vector = "AVX-512" if "avx512f" in info else "AVX2" if "avx2" in info else "no AVX2"
    return f"{name or platform.machine()}, {vector}"


# What the study scaled down against the grid; benchmarks/fidelity.py sets these flags.
SCALED_DOWN = (
    "2 seeds (0, 1) instead of 3 for the three MLP settings, 1 seed (0) for vgg_small: 42 runs, not 72;",
    "`--lanczos-max-seconds 60` (the default budget is 120 s) for every run;",
    "vgg_small (the smallest conv net of the zoo: 8-16-32 conv widths, BatchNorm) trains 8 epochs instead of the "
    "mnist5k default of 20 (the `--lam auto` sweep too) and takes its Hessian products on 500 of the 4,000 training "
    "images (`--hessian-samples 500`; epsilon still uses all of them);",
    "the variant 'p0 on' of the MLPs (99 extra Hessian rows each) only for seed 0;",
    "everything else is the default of `prunelimit run` (2 probes, Lanczos steps auto, tolerance 1 point, "
    "first-drop criterion; 30 epochs on digits, 20 on mnist5k; SGD lr 0.05, momentum 0.9, cosine schedule).",
)


def header_lines(cpu: str) -> list[str]:
    return [
        "# How well does the predicted pruning limit hold? A validation study",
        "",
        "This page is written by `benchmarks/fidelity.py` from its run directories (issue 11, item 3). Each run is "
        "one `prunelimit run`: l1 training at the given lambda, the SLQ spectrum, the predicted threshold p* "
        "(docs/method/prunelimit.md §3) and the actual one: the largest pruning ratio before test accuracy first "
        "falls more than 1 point below dense (§2). gap = predicted - actual (first drop, test set).",
        "",
        "## How it was run",
        "",
        "```bash norun",
        "# norun: trains 42 networks and their lambda sweeps, about 65 minutes of one CPU core",
        "python benchmarks/fidelity.py --out fidelity_runs --threads 1 --no-p0-rows",
        "python benchmarks/fidelity.py --out fidelity_runs --threads 1 --p0-rows-seeds 0   # runs are skipped: adds p0",
        "python benchmarks/fidelity.py --out fidelity_runs --report-only   # rewrite this page from the JSON files",
        "```",
        "",
        f"Machine: 2-core {cpu}, one torch thread per run, runs one after the other. Scaled down from the issue's grid:",
        "",
        *[f"- {item}" for item in SCALED_DOWN],
        "",
        "Columns: dense acc = dense test accuracy with its binomial standard error; near-zero share = fraction of "
        "prunable weights with |w| < 1e-3; p* [interval] = the prediction and its range over eps/2, 2 eps and the "
        "single SLQ probes; actual test / train = first-drop threshold with 1 point tolerance on the test / training "
        "data; released = the release's criterion (largest ratio still strictly above dense accuracy); warns = the "
        "report's regime warning under the calibrated rule below; s = wall seconds of all steps (the lambda sweep "
        "included); Lanczos m = steps per probe.",
        "",
    ]


def group_stats(rows: list[dict]) -> dict:
    gaps = np.array([r["gap"] for r in rows], dtype=float)
    return {"n": gaps.size, "mean": float(gaps.mean()), "max": float(np.abs(gaps).max()),
            "in3": int(np.sum(np.abs(gaps) <= 0.03)), "in5": int(np.sum(np.abs(gaps) <= 0.05))}


def grouped(rows: list[dict], key) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def findings_lines(rows: list[dict]) -> list[str]:
    """Per setting and lambda: how many runs land within 0.03 / 0.05; then the defaults-only runs."""
    lines = ["## Findings", "", "Per setting and lambda (mean gap over seeds, largest |gap|, runs within 0.03 / 0.05):",
             "", "| setting | lambda | runs | mean gap | max abs gap | within 0.03 | within 0.05 |", "|---|---|---|---|---|---|---|"]
    by = grouped(rows, lambda r: (r["setting"], r["lam_key"]))
    for (setting, lam), group in sorted(by.items(), key=lambda kv: (kv[0][0], LAM_ORDER.index(kv[0][1]))):
        s = group_stats(group)
        lines.append(f"| {setting} | {lam} | {s['n']} | {s['mean']:+.3f} | {s['max']:.3f} | {s['in3']} | {s['in5']} |")
    lines += ["", "Per setting, all lambdas:", ""]
    for setting, group in grouped(rows, lambda r: r["setting"]).items():
        s = group_stats(group)
        lines.append(f"- {setting}: {s['in3']} of {s['n']} runs within 0.03, {s['in5']} within 0.05; mean gap {s['mean']:+.3f}.")
    lines += ["", "With defaults only (`--lam auto`), against the issue's targets |gap| <= 0.03 and dense accuracy "
              "within 1.5 points of lambda = 0:", ""]
    lines += defaults_lines(rows)
    zero = sum(r["released"] == 0.0 for r in rows)
    lines += ["", f"The release's criterion (largest ratio still strictly above dense accuracy) was 0 in {zero} of "
              f"{len(rows)} runs: no pruned network scored strictly above the dense one, so it said nothing about the limit there.",
              "", *NOTES, ""]
    return lines


def defaults_lines(rows: list[dict]) -> list[str]:
    lines = []
    zero = {(r["setting"], r["seed"]): r["dense"] for r in rows if r["lam_key"] == "0"}
    for r in (r for r in rows if r["lam_key"] == "auto"):
        base = zero.get((r["setting"], r["seed"]))
        drop = "" if base is None else f" (lambda 0: {base:.3f}, a drop of {100 * (base - r['dense']):+.1f} points)"
        verdict = "meets" if abs(r["gap"]) <= 0.03 else f"misses by {abs(r['gap']) - 0.03:.3f}"
        lines.append(f"- {r['setting']} seed {r['seed']}: lambda {r['lam']:g}, dense {r['dense']:.3f}{drop}; "
                     f"p* {r['p_star']:.3f}, actual {r['actual']:.3f}, gap {r['gap']:+.3f}: {verdict} the 0.03 target.")
    return lines


# Interpretation of the tables above, written after reading them (benchmarks/fidelity.py --report-only keeps it).
NOTES: tuple[str, ...] = (
    "What the tables say:",
    "",
    "- **The prediction holds in the LOMP regime, with converged Lanczos.** At lambda = 1e-3 every FC run is within "
    "0.03 (6 of 6; p* 0.91-0.99, the agreement partly trivial at 0.98-0.99 where almost every weight is already zero), "
    "and with `--lam auto` fc5/digits and lenet300/digits are within 0.03 on both seeds.",
    "- **Weak l1 (lambda <= 5e-5) is not reliable, in either direction.** lenet300/digits was within 0.03 on seed 0 "
    "and 0.08-0.09 too low on seed 1: the actual threshold itself moved by 0.1 between seeds (0.69 against 0.79, "
    "with a 360-image test set and a different split per seed), the prediction by under 0.02. On lenet300/mnist5k p* "
    "overestimated by up to 0.15 (lambda 0, seed 1). fc5/digits underestimated by 0.10-0.26: on its 875,000 weights "
    "the 60-s Lanczos budget stopped every probe after 70-97 steps, too few to resolve the near-zero eigenvalues that "
    "G(R) weighs most (docs/method/prunelimit.md §6: too few steps bias p* low). A timing run of fc5/digits at "
    "lambda 0 with the default 120-s budget reached 142/149 steps and still missed by -0.127. So with weak l1 the "
    "spectrum is the limit on fc5 and the threshold's own noise on lenet300.",
    "- **lambda = 2e-4** is the transition: within 0.05 on 5 of 6 FC runs (fc5 seed 1 -0.059), within 0.03 on 3.",
    "- **The conv net never reached the regime.** vgg_small overestimated at every lambda: +0.26 to +0.38 up to "
    "lambda 2e-4, +0.20 at 1e-3, +0.08 with `--lam auto`, which chose 5e-3, the top of the sweep grid (dense accuracy "
    "never dropped a point) yet left only 49 % of the weights near zero against p* = 0.86. It has 6,152 weights, "
    "trained only 8 epochs (the scaled-down schedule), and BatchNorm follows every conv (which makes the loss "
    "invariant to the "
    "scale of the conv weights, a plausible reason why l1 drives few of them to zero; not tested here), the "
    "prediction does not hold at these lambdas.",
    "- **Defaults only** (`--lam auto`): dense accuracy stayed within 1.5 points of lambda = 0 in all 7 runs "
    "(largest drop 1.4 points, fc5 seed 1). |gap| <= 0.03 in 5 of 7: lenet300/digits (-0.006, -0.023) and fc5/digits "
    "(+0.013, +0.006) on both seeds and lenet300/mnist5k seed 0 (+0.022); missed on lenet300/mnist5k seed 1 (+0.077, "
    "by 0.047: auto chose 1e-4, 38 % of weights near zero, outside the regime, and the report warns) and vgg_small "
    "(+0.082, by 0.052, warned). The issue's target holds for the two digits MLPs, not for mnist5k in general nor "
    "for the conv net.",
)

VARIANTS = ("default", "eps/2", "2eps", "negatives dropped", "p0 off", "p0 on")


def variant_lines(rows: list[dict]) -> list[str]:
    """The paper's variants recomputed from each run's spectrum: mean gap and runs within 0.05, per setting."""
    settings = list(grouped(rows, lambda r: r["setting"]))
    lines = ["## The paper's variants (recomputed from the saved spectra, no retraining)", "",
             "Each cell: mean gap (predicted - actual) over the setting's runs, and how many runs are within 0.05. "
             "default = as run (p0 on for vgg_small, off for the FC nets, negative Ritz values as |theta|, eps = std "
             "of the per-batch training loss); eps/2, 2eps = epsilon halved / doubled; negatives dropped = Ritz "
             "values < 0 removed from the quadrature instead of counted as |theta|; p0 off / on = the null-mass "
             "correction forced off / on (for the FC nets p0 from 99 Hessian rows, computed afterwards).", "",
             "| variant | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for name in VARIANTS:
        cells = []
        for setting in settings:
            pairs = [(r["variants"].get(name), r["actual"]) for r in rows if r["setting"] == setting]
            gaps = np.array([p - a for p, a in pairs if p is not None], dtype=float)
            cells.append("-" if gaps.size == 0 else f"{gaps.mean():+.3f} ({int(np.sum(np.abs(gaps) <= 0.05))}/{gaps.size})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    p0 = [r["variants"].get("p0_rows") for r in rows if r["variants"].get("p0_rows") is not None]
    neg = [r["variants"].get("negative_mass", 0.0) for r in rows if r["variants"]]
    p0_text = f"p0 from Hessian rows ranged over {min(p0):.2f}-{max(p0):.2f}" if p0 else "p0 was not computed"
    lines += ["", f"{p0_text}; the negative Ritz values carried {100 * min(neg, default=0.0):.0f}-"
              f"{100 * max(neg, default=0.0):.0f} % of the quadrature weight of a run.", "", *VARIANT_NOTES, ""]
    return lines


VARIANT_NOTES = (
    "- **epsilon**: eps/2 lowers and 2 eps raises p* by 0.04-0.07 at weak l1 (lambda <= 5e-5) and by at most 0.02 "
    "at lambda >= 1e-3. Neither choice fixes the weak-l1 misses, which go both ways (2 eps helps fc5, which was too "
    "low, and hurts lenet300/mnist5k, which was too high); the default eps is as good as either.",
    "- **negative eigenvalues dropped** instead of taken as |theta|: worse in three settings of four. Much of the "
    "quadrature weight sits on Ritz values close to zero, many of them slightly negative; dropping them removes "
    "near-null directions from G(R) and moves p* by -0.20 to +0.05 (mostly down).",
    "- **p0**: the Hessian-row null mass was 0 in every vgg_small run (no null rows at the 99 magnitude quantiles), "
    "so p0 on/off makes no difference there; on the MLPs (seed 0) it was 0.01-0.39 and raised p* by 0.001-0.025: "
    "a minor correction, which the release applies to CNNs only.",
)
