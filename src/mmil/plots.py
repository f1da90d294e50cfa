"""ROC curve figure of a cross-validation run (matplotlib, Agg backend, no display)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from mmpl.fsio import atomic_path


def plot_roc(
    y_true_per_fold: Sequence[np.ndarray],
    probs_per_fold: Sequence[np.ndarray],
    path: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    title: str = "ROC",
) -> Path:
    """Write a ROC PNG to ``path`` (atomically).

    Binary tasks: one curve per fold (positive class = index 1) with its AUC,
    plus the chance diagonal. Multi-class tasks: one-vs-rest curves of the
    pooled out-of-fold predictions, one per class.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import auc as area, roc_curve

    n_classes = int(np.asarray(probs_per_fold[0]).shape[1])
    names = list(class_names) if class_names else [str(c) for c in range(n_classes)]
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    try:
        if n_classes == 2:
            for k, (y, p) in enumerate(zip(y_true_per_fold, probs_per_fold)):
                y = np.asarray(y)
                if len(np.unique(y)) < 2:
                    continue
                fpr, tpr, _ = roc_curve(y, np.asarray(p)[:, 1])
                label = f"fold {k} (AUC {area(fpr, tpr):.3f})" if len(y_true_per_fold) > 1 else f"AUC {area(fpr, tpr):.3f}"
                ax.plot(fpr, tpr, lw=1.5, label=label)
        else:
            y = np.concatenate([np.asarray(v) for v in y_true_per_fold])
            p = np.concatenate([np.asarray(v) for v in probs_per_fold])
            for c in range(n_classes):
                yc = (y == c).astype(int)
                if 0 < yc.sum() < len(yc):
                    fpr, tpr, _ = roc_curve(yc, p[:, c])
                    ax.plot(fpr, tpr, lw=1.5, label=f"{names[c]} vs rest (AUC {area(fpr, tpr):.3f})")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        path = Path(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
