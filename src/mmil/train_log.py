"""What a training fold reports while it runs, on a terminal or not (``docs/method/mmil.md`` §3).

Per fold directory (``fold_k/``), after every epoch:

- ``history.csv``: one row per epoch so far (:data:`HISTORY_COLUMNS`; ``kept`` = 1 on the epoch whose
  weights are kept so far), rewritten atomically, so the file is complete and valid after each epoch;
- a line on stderr when stderr is not a terminal (a batch job's log): epoch, losses, validation AUC,
  learning rate, seconds and ``kept`` on the kept epoch, every ``log_every`` epochs and at the last
  one (on a terminal the progress bar shows instead; ``progress: false`` or ``log_every: 0`` silences it);
- TensorBoard scalars in ``fold_k/tensorboard/`` with ``tensorboard: true`` (needs the ``tensorboard``
  package; :func:`require_tensorboard` refuses the option without it).

When the fold ends, ``curves.png``: training and validation loss, validation AUC, the kept epoch marked.
"""
from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from mmpl import plotstyle
from mmpl.jsonio import write_text
from mmpl.progress import show_progress

from .errors import MMILInputError

HISTORY_NAME = "history.csv"
CURVES_NAME = "curves.png"
TENSORBOARD_DIRNAME = "tensorboard"
HISTORY_COLUMNS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_auc", "val_accuracy", "selection_criterion",
                   "lr", "seconds", "kept")
#: Record key -> TensorBoard tag.
TENSORBOARD_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "val_auc": "auc/val", "train_accuracy": "accuracy/train",
                    "val_accuracy": "accuracy/val", "selection_criterion": "selection/criterion", "lr": "lr", "seconds": "seconds"}


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can be imported (it needs the ``tensorboard`` package)."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def require_tensorboard(option: str = "--tensorboard") -> None:
    """Raise :class:`MMILInputError` when ``option`` asks for TensorBoard logs but the package is missing."""
    if not tensorboard_available():
        raise MMILInputError(f"{option}: the tensorboard package is not installed; `pip install tensorboard`, "
                             "or drop the option (history.csv and curves.png are written either way)")


def line_interval(log_every: int, progress: bool, terminal: bool) -> int:
    """Epochs between two log lines: ``log_every`` off a terminal, 0 (none) on one or with progress off."""
    return 0 if not progress or terminal else int(log_every)


def logs_epoch(epoch: int, every: int, last: bool) -> bool:
    """Whether ``epoch`` gets a line: ``every > 0`` and (``epoch % every == 0`` or it is the last epoch)."""
    return every > 0 and (epoch % every == 0 or last)


def _number(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def format_epoch_line(tag: str, record: dict[str, Any], epochs: int, kept: bool) -> str:
    """One log line: ``TAG epoch E/N  train_loss ..  val_loss ..  val_auc ..  lr ..  S s[  best so far]``.

    ``best so far`` marks an epoch whose weights replace the kept ones (the selection rule improved); the
    epoch finally kept is the last one so marked (``kept`` in history.csv).
    """
    parts = [f"{tag} epoch {record['epoch']}/{epochs}"]
    for key, fmt in (("train_loss", ".4f"), ("val_loss", ".4f"), ("val_auc", ".3f"), ("lr", ".2e")):
        if key in record:
            v = _number(record[key])
            parts.append(f"{key} {'nan' if v is None else format(v, fmt)}")
    parts.append(f"{float(record.get('seconds', 0.0)):.1f}s")
    if kept:
        parts.append("best so far")
    return "  ".join(parts)


def history_csv_text(history: Sequence[dict[str, Any]], kept_epoch: int) -> str:
    """``history.csv``: :data:`HISTORY_COLUMNS`, one row per epoch (empty cell = not measured)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HISTORY_COLUMNS)
    for r in history:
        row = dict(r, kept=int(int(r["epoch"]) == kept_epoch))
        w.writerow(["" if row.get(c) is None else (repr(float(row[c])) if isinstance(row[c], float) else row[c]) for c in HISTORY_COLUMNS])
    return buf.getvalue()


def curve_data(history: Sequence[dict[str, Any]], kept_epoch: int) -> dict[str, np.ndarray | int | None]:
    """Arrays of the curves figure: ``epoch``, ``train_loss``, ``val_loss``, ``val_auc`` (NaN where absent)
    and ``kept_epoch`` (``None`` when that epoch is not in ``history``)."""
    col = lambda k: np.array([np.nan if _number(r.get(k)) is None else float(r[k]) for r in history])  # noqa: E731
    epochs = np.array([int(r["epoch"]) for r in history])
    return {"epoch": epochs, "train_loss": col("train_loss"), "val_loss": col("val_loss"), "val_auc": col("val_auc"),
            "kept_epoch": kept_epoch if kept_epoch in set(epochs.tolist()) else None}


def curves_figure(history: Sequence[dict[str, Any]], kept_epoch: int, title: str = "training curves"):
    """Left: training and validation loss per epoch; right: validation AUC; the kept epoch marked on both."""
    from matplotlib.ticker import MaxNLocator

    d = curve_data(history, kept_epoch)
    fig, (left, right) = plotstyle.new_figure(10.0, 4.0, ncols=2)
    with plotstyle.apply():
        left.plot(d["epoch"], d["train_loss"], **plotstyle.series_style(0), markersize=3, label="training loss")
        if np.isfinite(d["val_loss"]).any():
            left.plot(d["epoch"], d["val_loss"], **plotstyle.series_style(1), markersize=3, label="validation loss")
        right.plot(d["epoch"], d["val_auc"], **plotstyle.series_style(2), markersize=3, label="validation AUC")
        right.set_ylim(-0.02, 1.02)
        if d["kept_epoch"] is not None:
            i = int(np.flatnonzero(d["epoch"] == d["kept_epoch"])[0])
            for ax, key in ((left, "val_loss" if np.isfinite(d["val_loss"]).any() else "train_loss"), (right, "val_auc")):
                ax.axvline(d["kept_epoch"], **plotstyle.REFERENCE)
                ax.plot([d["kept_epoch"]], [d[key][i]], linestyle="", marker="*", markersize=13, color="black",
                        label=f"kept epoch {d['kept_epoch']}", zorder=5)
        left.set_ylabel("cross-entropy loss (nats)")
        right.set_ylabel("validation ROC AUC")
        for ax in (left, right):
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(loc="best")
        fig.suptitle(title)
    return fig


class EpochLog:
    """The per-epoch reports of one fold (see the module docstring); call :meth:`epoch` after each
    epoch's state is saved and :meth:`close` when the fold ends. ``enabled=False`` (a data-parallel
    rank other than 0) writes and prints nothing."""

    def __init__(self, fold_dir: Path, cfg: Any, tag: str, start_epoch: int = 1, enabled: bool = True) -> None:
        self.fold_dir, self.cfg, self.tag, self.enabled = Path(fold_dir), cfg, tag, enabled
        self.every = line_interval(getattr(cfg, "log_every", 1), cfg.progress, show_progress(True))
        self.writer = None
        if enabled and getattr(cfg, "tensorboard", False):
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.fold_dir / TENSORBOARD_DIRNAME), purge_step=start_epoch)

    def epoch(self, history: Sequence[dict[str, Any]], kept_epoch: int, last: bool) -> None:
        """Rewrite ``history.csv``, print the line of the newest epoch (when due), add TensorBoard scalars."""
        if not self.enabled:
            return
        record = history[-1]
        write_text(self.fold_dir / HISTORY_NAME, history_csv_text(history, kept_epoch))
        if logs_epoch(int(record["epoch"]), self.every, last):
            print(format_epoch_line(self.tag, record, self.cfg.epochs, int(record["epoch"]) == kept_epoch), file=sys.stderr, flush=True)
        if self.writer is not None:
            for key, name in TENSORBOARD_TAGS.items():
                v = _number(record.get(key))
                if v is not None:
                    self.writer.add_scalar(name, v, int(record["epoch"]))
            self.writer.flush()

    def note(self, text: str) -> None:
        """One line on stderr (beside a progress bar, not through it)."""
        if self.enabled:
            from tqdm.auto import tqdm

            tqdm.write(f"{self.tag}: {text}", file=sys.stderr)

    def close(self, history: Sequence[dict[str, Any]], kept_epoch: int) -> None:
        """Write ``curves.png`` and close the TensorBoard writer."""
        if self.enabled and history:
            plotstyle.save_figure(curves_figure(history, kept_epoch, f"{self.tag}: training curves"), self.fold_dir / CURVES_NAME)
        if self.writer is not None:
            self.writer.close()
