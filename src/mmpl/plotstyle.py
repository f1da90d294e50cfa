"""The one matplotlib style of every plot both wings draw.

Every figure is built and saved inside :func:`apply` (a ``matplotlib.rc_context``), so fonts,
colours, markers, grid and resolution are the same in every PNG:

- colours: the Okabe-Ito palette (distinguishable with the common colour-vision deficiencies),
  each paired with its own marker and line style in the property cycle, so two series differ
  in shape as well as colour and a line drawn on top of another does not hide it;
- fonts readable at a column width (labels 11 pt, ticks and legends 9 pt);
- a light grid, a constrained (tight) layout, 150 dpi PNGs.

Figures are made with :func:`new_figure` (matplotlib's object API on an Agg canvas: no pyplot,
no global backend switch) and written with :func:`save_figure` (atomically, through
:func:`mmpl.fsio.atomic_path`). Axis labels state their units (``"time per bag (ms)"``);
:func:`unlabelled_axes` lists the axes of a figure that lack them (tests use it).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from .fsio import atomic_path

#: Okabe & Ito (2008), "Color universal design": black first is left out (reserved for references).
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 2, 2, 2)))
DPI = 150
#: Reference lines (chance diagonal, tolerances) and shared threshold colours.
REFERENCE = {"color": "0.45", "linestyle": ":", "linewidth": 1.0, "marker": ""}
PREDICTED = {"color": OKABE_ITO[1], "linestyle": "--", "linewidth": 1.4, "marker": ""}
ACTUAL = {"color": OKABE_ITO[2], "linestyle": "-", "linewidth": 1.4, "marker": ""}
RELEASED = {"color": "0.5", "linestyle": ":", "linewidth": 1.2, "marker": ""}


def rc_params() -> dict[str, Any]:
    """The rcParams of the house style."""
    from cycler import cycler

    return {
        "axes.prop_cycle": cycler(color=OKABE_ITO) + cycler(marker=MARKERS) + cycler(linestyle=LINESTYLES),
        "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 11, "xtick.labelsize": 9, "ytick.labelsize": 9,
        "legend.fontsize": 9, "legend.framealpha": 0.85, "figure.titlesize": 12,
        "lines.linewidth": 1.6, "lines.markersize": 5, "errorbar.capsize": 3,
        "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6, "axes.spines.top": False, "axes.spines.right": False,
        "figure.dpi": 100, "savefig.dpi": DPI, "figure.constrained_layout.use": True,
    }


@contextlib.contextmanager
def apply() -> Iterator[None]:
    """Draw with the house style inside this block (``with apply(): fig = ...``)."""
    import matplotlib

    with matplotlib.rc_context(rc_params()):
        yield


def series_style(i: int) -> dict[str, Any]:
    """Colour, marker and line style of the ``i``-th series (the property cycle, by index)."""
    k = i % len(OKABE_ITO)
    return {"color": OKABE_ITO[k], "marker": MARKERS[k], "linestyle": LINESTYLES[k]}


def new_figure(width: float = 6.4, height: float = 4.4, nrows: int = 1, ncols: int = 1, **subplots: Any):
    """``(figure, axes)`` on an Agg canvas, in the house style (call inside :func:`apply` to keep it
    for everything drawn later; the figure itself is made inside it here)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with apply():
        fig = Figure(figsize=(width, height), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, **subplots)
    return fig, axes


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at the house resolution, atomically; returns the path."""
    path = Path(path)
    with apply(), atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def unlabelled_axes(fig) -> list[str]:
    """``"axes k: x"`` / ``"axes k: y"`` for every visible axes of ``fig`` whose x or y label is empty
    (colour bars and twin axes sharing a labelled side count as labelled)."""
    missing = []
    for k, ax in enumerate(fig.get_axes()):
        if not ax.get_visible() or not ax.has_data():
            continue
        if not ax.get_xlabel().strip() and not _shares_labelled(ax, "x"):
            missing.append(f"axes {k}: x")
        if not ax.get_ylabel().strip() and not _shares_labelled(ax, "y"):
            missing.append(f"axes {k}: y")
    return missing


def _shares_labelled(ax, which: str) -> bool:
    group = ax.get_shared_x_axes() if which == "x" else ax.get_shared_y_axes()
    return any((o.get_xlabel() if which == "x" else o.get_ylabel()).strip() for o in group.get_siblings(ax) if o is not ax)


def finish_roc_axes(ax, title: str, equal: bool = False) -> None:
    """The chance diagonal, unit limits, the two rates as axis labels, a title and the legend of a ROC panel."""
    ax.plot([0, 1], [0, 1], **REFERENCE, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    if equal:
        ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title)
    ax.legend(loc="lower right")
