"""One-shot global magnitude pruning and the measured (actual) pruning threshold.

`prune_global` gives users standard `torch.nn.utils.prune` masks. The threshold search instead
uses `MagnitudeMasker`, which sorts the magnitudes once and zeroes/restores weights in place,
so no model is copied or written to disk (the released code saved 2,000 model files).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from mmpl.progress import progress_bar
from torch import nn
from torch.nn.utils import prune as torch_prune

from .errors import PruneLimitError
from .geometry import num_removed
from .params import num_weights, parameter_slots, resolve_params

__all__ = [
    "check_ratio",
    "prune_global",
    "remove_masks",
    "has_masks",
    "MagnitudeMasker",
    "actual_threshold",
    "ThresholdSearch",
    "default_grid",
]


def check_ratio(ratio) -> float:
    """The pruning ratio as a float in [0, 1), else PruneLimitError."""
    try:
        p = float(ratio)
    except (TypeError, ValueError):
        raise PruneLimitError(f"pruning ratio must be a number in [0, 1), got {ratio!r}") from None
    if not (0.0 <= p < 1.0):
        raise PruneLimitError(f"pruning ratio must be in [0, 1) (fraction of weights removed), got {ratio}")
    return p


def has_masks(model: nn.Module) -> bool:
    """True if any module of `model` carries a torch.nn.utils.prune mask."""
    return torch_prune.is_pruned(model)


def prune_global(model: nn.Module, ratio: float, params: Sequence[torch.Tensor] | None = None) -> nn.Module:
    """Global unstructured L1 (magnitude) pruning of `params` (default: Linear/Conv weights), in place.

    Removes exactly D - ceil((1 - ratio) D) weights with the smallest |w| across all tensors
    (`torch.nn.utils.prune.global_unstructured` with `L1Unstructured` and an integer amount), so the
    removed set matches R(p) of `geometry.radius_curve`. Adds `weight_mask`/`weight_orig`;
    `remove_masks` makes the pruning permanent. Returns the model.
    """
    p = check_ratio(ratio)
    if has_masks(model):
        raise PruneLimitError("model already carries pruning masks; call remove_masks(model) before pruning again")
    slots = parameter_slots(model, params)
    dim = sum(getattr(m, name).numel() for m, name in slots)
    amount = num_removed(p, dim)
    # global_unstructured needs a list (a generator is consumed before use).
    torch_prune.global_unstructured(list(slots), pruning_method=torch_prune.L1Unstructured, amount=int(amount))
    return model


def remove_masks(model: nn.Module) -> nn.Module:
    """Make pruning permanent: fold every mask into its weight (`torch.nn.utils.prune.remove`)."""
    for module in model.modules():
        names = [h._tensor_name for h in list(module._forward_pre_hooks.values())
                 if isinstance(h, torch_prune.BasePruningMethod)]
        for name in names:
            torch_prune.remove(module, name)
    return model


class MagnitudeMasker:
    """Global magnitude pruning applied in place, for fast threshold sweeps.

    Sorts |w| once (stable, on the parameters' device) and keeps one copy of the weights.
    `apply(p)` zeroes the D - ceil((1-p) D) smallest weights (the same set sizes as prune_global);
    `restore()` puts the original weights back. As a context manager it restores on exit.
    """

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor] | None = None):
        self.params = resolve_params(model, params)
        self.dim = num_weights(self.params)
        with torch.no_grad():
            self._original = [p.detach().clone() for p in self.params]
            flat = torch.cat([p.reshape(-1).abs() for p in self._original])
            order = torch.sort(flat, stable=True).indices
            # rank[i] = position of weight i in ascending |w|: "removed" is then rank < r.
            self._rank = torch.empty_like(order)
            self._rank[order] = torch.arange(self.dim, device=order.device)
        self._offsets = np.cumsum([0] + [p.numel() for p in self.params])
        self.ratio = 0.0
        self.removed = 0

    def apply(self, ratio: float) -> int:
        """Zero the weights pruned at `ratio` (relative to the original weights); returns the count removed."""
        p = check_ratio(ratio)
        r = num_removed(p, self.dim)
        with torch.no_grad():
            for i, (param, orig) in enumerate(zip(self.params, self._original)):
                rank = self._rank[self._offsets[i] : self._offsets[i + 1]].view_as(param)
                param.copy_(torch.where(rank < r, torch.zeros_like(orig), orig))
        self.ratio, self.removed = p, r
        return r

    def restore(self) -> None:
        """Put the original weights back."""
        with torch.no_grad():
            for param, orig in zip(self.params, self._original):
                param.copy_(orig)
        self.ratio, self.removed = 0.0, 0

    def __enter__(self) -> "MagnitudeMasker":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


@dataclass
class ThresholdSearch:
    """Result of `actual_threshold` (ratios are removed fractions; accuracies are fractions in [0, 1])."""

    threshold: float  # first-drop criterion
    kept_fraction: float  # 1 - threshold
    released_threshold: float  # released code: largest evaluated p with accuracy > dense accuracy (0.0 if none)
    dense_accuracy: float
    dense_loss: float
    tolerance: float
    num_evaluations: int
    ratios: list[float] = field(default_factory=list)  # every evaluated p, ascending
    accuracies: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_grid(resolution: float = 1e-3) -> np.ndarray:
    """Coarse grid: p = 0, 0.02, ..., 0.9, then 1 - 10^(-1 - k/8) up to 0.999 (thresholds of
    l1-trained nets often sit above 0.9), snapped to multiples of `resolution`."""
    grid = np.concatenate([np.arange(0.0, 0.9, 0.02), 1.0 - np.logspace(-1.0, -3.0, 17)])
    grid = np.round(grid / resolution) * resolution
    grid = grid[grid <= 1.0 - resolution + 1e-12]
    return np.unique(np.round(grid, 12))


def actual_threshold(
    model: nn.Module,
    eval_fn: Callable[[nn.Module], tuple[float, float]],
    tolerance: float = 0.0,
    params: Sequence[torch.Tensor] | None = None,
    grid: Sequence[float] | None = None,
    refine_steps: int = 10,
    progress: bool = False,
    *,
    resolution: float = 1e-3,
    margin: float = 0.005,
) -> ThresholdSearch:
    """Largest pruning ratio before test accuracy first falls below (dense accuracy - tolerance).

    `eval_fn(model) -> (accuracy, loss)`, accuracy a fraction in [0, 1]; it is called on the model
    with weights pruned in place (global magnitude, the same sets as prune_global) under
    torch.no_grad().

    First-drop criterion on the lattice of multiples of `resolution` (default 0.001, the released
    code's 1000 ratios): the threshold is the lattice ratio just before the first ratio whose
    accuracy < bar = dense - tolerance. Search: scan the coarse `grid` (default `default_grid`)
    upwards; a gap (a, b] between scanned ratios is rescanned upwards in `refine_steps` equal
    lattice steps (recursively, down to single lattice steps) when b fails, or when a or b already
    has accuracy below min(dense, bar + margin) — accuracy close to the bar, where a dip could
    fall below it and recover unseen. The first failure found this way is the first failure of the
    exhaustive sweep unless a dip hides inside a gap whose ends both stay above that line.
    Without a failing ratio the threshold is the last grid ratio.

    Also reports the released code's criterion: the largest evaluated ratio whose accuracy is
    strictly above the dense accuracy (0.0 if none). Weights are restored afterwards; nothing is
    written to disk.
    """
    tol = _check_search_options(tolerance, resolution, refine_steps)
    grid_cells = _grid_cells(grid, resolution)
    pbar = progress_bar(progress, len(grid_cells) + 2 * int(refine_steps), "threshold search")
    with MagnitudeMasker(model, params) as masker:
        sweep = _Sweep(model, eval_fn, masker, resolution, int(refine_steps), pbar)
        dense_acc, dense_loss = _evaluate(sweep, 0)
        sweep.bar = dense_acc - tol
        sweep.risk_line = min(dense_acc, sweep.bar + margin)
        bad = _first_failure(sweep, 0, grid_cells[1:])
        last_good = grid_cells[-1] if bad is None else bad - 1
    if pbar is not None:
        pbar.close()

    cells = sorted(sweep.results)
    ratios = [c * resolution for c in cells]
    accs = [sweep.results[c][0] for c in cells]
    losses = [sweep.results[c][1] for c in cells]
    above = [r for r, a in zip(ratios, accs) if a > dense_acc]
    threshold = last_good * resolution
    return ThresholdSearch(
        threshold=threshold, kept_fraction=1.0 - threshold, released_threshold=max(above) if above else 0.0,
        dense_accuracy=dense_acc, dense_loss=dense_loss, tolerance=tol, num_evaluations=len(sweep.results),
        ratios=ratios, accuracies=accs, losses=losses,
    )


def _check_search_options(tolerance: float, resolution: float, refine_steps: int) -> float:
    tol = float(tolerance)
    if not (0.0 <= tol < 1.0):
        raise PruneLimitError(f"tolerance must be an accuracy fraction in [0, 1), got {tolerance}")
    if not (0.0 < resolution < 1.0):
        raise PruneLimitError(f"resolution must be in (0, 1), got {resolution}")
    if int(refine_steps) < 2:
        raise PruneLimitError(f"refine_steps must be >= 2, got {refine_steps}")
    return tol


def _grid_cells(grid: Sequence[float] | None, resolution: float) -> list[int]:
    """The coarse grid as lattice cells (multiples of `resolution`), 0 included, below 1."""
    n_cells = int(round(1.0 / resolution))
    raw_grid = default_grid(resolution) if grid is None else [check_ratio(g) for g in grid]
    grid_cells = sorted({int(round(g / resolution)) for g in raw_grid} | {0})
    return [c for c in grid_cells if c < n_cells]


@dataclass
class _Sweep:
    """What the threshold search shares: the model pruned in place, the evaluations so far, the bar."""

    model: nn.Module
    eval_fn: Callable[[nn.Module], tuple[float, float]]
    masker: MagnitudeMasker
    resolution: float
    refine_steps: int
    pbar: Any = None
    results: dict[int, tuple[float, float]] = field(default_factory=dict)  # lattice cell -> (accuracy, loss)
    bar: float = 0.0  # dense accuracy - tolerance: below it is a failure
    risk_line: float = 0.0  # min(dense, bar + margin): a gap with an end below it is rescanned


def _evaluate(sweep: _Sweep, cell: int) -> tuple[float, float]:
    """(accuracy, loss) with the weights of lattice cell `cell` removed (each cell evaluated once)."""
    if cell not in sweep.results:
        sweep.masker.apply(cell * sweep.resolution)
        with torch.no_grad():
            acc, loss = sweep.eval_fn(sweep.model)
        acc, loss = float(acc), float(loss)
        if not math.isfinite(acc) or not (0.0 <= acc <= 1.0 + 1e-9):
            raise PruneLimitError(f"eval_fn must return accuracy as a fraction in [0, 1], got {acc}")
        sweep.results[cell] = (acc, loss)
        if sweep.pbar is not None:
            sweep.pbar.update(1)
    return sweep.results[cell]


def _first_failure(sweep: _Sweep, lo: int, cells: Sequence[int]) -> int | None:
    """First failing cell among `cells` (ascending, > lo), refining each gap that fails or where
    accuracy has already fallen to within `margin` of the bar (an unseen dip could hide there)."""
    prev = lo
    for cell in cells:
        acc = _evaluate(sweep, cell)[0]
        at_risk = min(acc, _evaluate(sweep, prev)[0]) < sweep.risk_line
        if (acc < sweep.bar or at_risk) and cell - prev > 1:
            step = max(1, (cell - prev) // sweep.refine_steps)
            found = _first_failure(sweep, prev, list(range(prev + step, cell, step)) + [cell])
            if found is not None:
                return found
        elif acc < sweep.bar:
            return cell
        prev = cell
    return None
