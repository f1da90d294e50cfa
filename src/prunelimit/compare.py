"""`prunelimit compare`: the paper's pruning algorithm (LOMP) beside the pruning methods people use.

Every method prunes the same architecture on the same data split, seeds and training budget
(``epochs`` per training run), and is evaluated on the test set at each requested sparsity:

- ``lomp``: l1-regularized training (``lam``), then one-shot global magnitude pruning (the paper's);
- ``magnitude``: the same without l1 (one-shot global magnitude pruning of a dense-trained network);
- ``imp``: iterative magnitude pruning with weight rewinding (lottery tickets): train, prune the smallest
  weights, rewind the survivors to their values after ``rewind_epoch`` epochs, retrain; densities fall
  geometrically, ``imp_rounds`` rounds per requested sparsity, one trajectory for all sparsities;
- ``snip``, ``synflow``, ``random``: masks chosen at initialisation, then the masked network is trained.
``finetune_epochs`` > 0 retrains ``lomp``/``magnitude`` after pruning (0, the paper's setting, by default).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from mmpl.cliargs import non_negative_int, open_fraction, positive_float, positive_int
from mmpl.config import option

from .data import BatchIterable, DatasetBundle
from .errors import PruneLimitError
from .params import prunable_modules
from .methods import (apply_masks, global_masks, magnitude_scores, random_scores, rewind, snip_scores, sparsity_by_layer,
                      synflow_masks, unmask)
from .regularize import evaluate, train_l1

METHODS = ("lomp", "magnitude", "imp", "snip", "synflow", "random")
RESULT_COLUMNS = ("method", "sparsity", "seed", "test_accuracy", "test_loss", "kept_weights", "train_seconds", "finetune_epochs")


@dataclass
class CompareConfig:
    """One comparison: model, data, methods, sparsities, seeds and the shared training budget."""

    model: str = option("lenet300", help="zoo model or package.module:factory")
    dataset: str = option("mnist5k", help="digits, mnist5k, ... or package.module:factory")
    methods: list[str] = option(default_factory=lambda: list(METHODS), help="comma-separated methods", cli=False)
    sparsities: list[float] = option(default_factory=lambda: [0.9, 0.95, 0.98, 0.99], help="removed fractions", cli=False)
    seeds: list[int] = option(default_factory=lambda: [0, 1, 2], help="seeds", cli=False)
    epochs: int = option(20, help="epochs of every training run", type=positive_int)
    lam: float = option(1e-3, help="l1 strength of lomp", type=positive_float)
    lr: float = option(0.05, help="SGD learning rate", type=positive_float)
    batch_size: int = option(128, help="training batch size", type=positive_int)
    finetune_epochs: int = option(0, help="retrain lomp/magnitude after pruning (0: none, as the paper)", type=non_negative_int)
    imp_rounds: int = option(2, help="IMP prune-retrain rounds per requested sparsity", type=positive_int)
    rewind_epoch: int = option(1, help="IMP rewinds survivors to their weights after this many epochs", type=non_negative_int)
    data_root: str | None = option(None, help="folder of local datasets (never downloaded)")
    device: str = option("cpu", help="torch device")

    def validate(self) -> "CompareConfig":
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise PruneLimitError(f"--methods {','.join(self.methods)}: choose from {', '.join(METHODS)}")
        outside = [s for s in self.sparsities if not open_fraction.contains(s)]
        if outside or not self.sparsities:
            _bad("--sparsities", f"give removed fractions in [0, 1), got {', '.join(map(str, outside or ['none']))}")
        if not self.seeds or min(self.seeds) < 0:
            _bad("--seeds", "give one or more seeds >= 0")
        if self.rewind_epoch >= self.epochs:
            _bad("--rewind-epoch", f"must be below --epochs ({self.epochs})")
        return self


def _bad(option_name: str, why: str):
    raise PruneLimitError(f"{option_name}: {why}")


@dataclass
class Trial:
    """What one (method, seed) needs: data, a fresh-model factory, the loss and the evaluation batches."""

    bundle: DatasetBundle
    make_model: Callable[[int], nn.Module]
    cfg: CompareConfig
    seed: int
    loss_fn: nn.Module = field(default_factory=nn.CrossEntropyLoss)

    def train(self, model: nn.Module, epochs: int, lam: float = 0.0, callback=None) -> float:
        """Train in place (masks, if installed, stay); return the wall-clock seconds."""
        start = time.perf_counter()
        if epochs > 0:
            train_l1(model, self.loss_fn, self.bundle.train, lam, epochs, lr=self.cfg.lr, batch_size=self.cfg.batch_size,
                     seed=self.seed, device=self.cfg.device, progress=False, callback=callback, augment=self.bundle.augment)
        return time.perf_counter() - start

    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        return evaluate(model, self.loss_fn, BatchIterable(self.bundle.test, 512, device=self.cfg.device), self.cfg.device)

    def first_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(iter(BatchIterable(self.bundle.train, self.cfg.batch_size, device=self.cfg.device)))


def _row(trial: Trial, method: str, sparsity: float, model: nn.Module, seconds: float, finetune: int) -> dict:
    accuracy, loss = trial.evaluate(model)
    kept = int(sum(int((getattr(m, "weight") != 0).sum()) for m in _prunable(model)))
    return {"method": method, "sparsity": sparsity, "seed": trial.seed, "test_accuracy": accuracy, "test_loss": loss,
            "kept_weights": kept, "train_seconds": round(seconds, 3), "finetune_epochs": finetune,
            "layer_sparsity": sparsity_by_layer(model)}


def _prunable(model: nn.Module) -> list[nn.Module]:
    return [m for m, _ in prunable_modules(model)]


def run_one_shot(trial: Trial, method: str, trained: dict | None = None) -> list[dict]:
    """``lomp`` (l1 training) or ``magnitude`` (dense training): train once, prune at every sparsity.

    The trained, unpruned state goes into ``trained["state"]`` when a dict is given (the prediction uses it).
    """
    model = trial.make_model(trial.seed)
    seconds = trial.train(model, trial.cfg.epochs, trial.cfg.lam if method == "lomp" else 0.0)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    if trained is not None:
        trained["state"] = dense_state
    rows = []
    for sparsity in trial.cfg.sparsities:
        unmask(model).load_state_dict(dense_state)
        apply_masks(model, global_masks(magnitude_scores(model), sparsity))
        extra = trial.train(model, trial.cfg.finetune_epochs)
        rows.append(_row(trial, method, sparsity, model, seconds + extra, trial.cfg.finetune_epochs))
    return rows


def run_at_init(trial: Trial, method: str) -> list[dict]:
    """``snip``, ``synflow`` or ``random``: masks from the initial network, then the masked network is trained."""
    rows = []
    for sparsity in trial.cfg.sparsities:
        model = trial.make_model(trial.seed)
        start = time.perf_counter()
        if method == "snip":
            masks = global_masks(snip_scores(model, trial.loss_fn, *trial.first_batch()), sparsity)
        elif method == "synflow":
            masks = synflow_masks(model, trial.bundle.in_shape, sparsity)
        else:
            masks = global_masks(random_scores(model, seed=1000 + trial.seed), sparsity)
        apply_masks(model, masks)
        seconds = time.perf_counter() - start + trial.train(model, trial.cfg.epochs)
        rows.append(_row(trial, method, sparsity, model, seconds, 0))
    return rows


def imp_densities(sparsities: list[float], rounds_per_target: int) -> list[tuple[float, float | None]]:
    """(density of the round, the requested sparsity it reaches or None): geometric steps from 1 to each target."""
    steps, density = [], 1.0
    for target in sorted(sparsities):
        goal = 1.0 - target
        ratio = (goal / density) ** (1.0 / rounds_per_target)
        for r in range(1, rounds_per_target + 1):
            density = goal if r == rounds_per_target else density * ratio
            steps.append((density, target if r == rounds_per_target else None))
    return steps


def run_imp(trial: Trial) -> list[dict]:
    """Iterative magnitude pruning with rewinding to the weights after ``rewind_epoch`` epochs."""
    model = trial.make_model(trial.seed)
    early: dict[str, torch.Tensor] = {k: v.clone() for k, v in model.state_dict().items()}

    def keep_early(epoch: int, _record, m: nn.Module) -> None:
        if epoch + 1 == trial.cfg.rewind_epoch:
            early.update({k: v.clone() for k, v in m.state_dict().items()})

    seconds = trial.train(model, trial.cfg.epochs, callback=keep_early)
    masks, rows = None, []
    for density, target in imp_densities(trial.cfg.sparsities, trial.cfg.imp_rounds):
        masks = global_masks(magnitude_scores(model), 1.0 - density, previous=masks)
        rewind(model, _without_masks(early), masks)
        seconds += trial.train(model, trial.cfg.epochs)
        if target is not None:
            rows.append(_row(trial, "imp", target, model, seconds, 0))
    return rows


def _without_masks(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as an unpruned model names it (``weight_orig`` -> ``weight``, masks dropped)."""
    out = {}
    for key, value in state.items():
        if key.endswith("_mask"):
            continue
        out[key[: -len("_orig")] if key.endswith("_orig") else key] = value
    return out


def run_method(trial: Trial, method: str, trained: dict | None = None) -> list[dict]:
    """Rows of ``method`` at every sparsity for the trial's seed."""
    if method in ("lomp", "magnitude"):
        return run_one_shot(trial, method, trained)
    if method == "imp":
        return run_imp(trial)
    return run_at_init(trial, method)


def config_dict(cfg: CompareConfig) -> dict:
    return asdict(cfg)


def predicted_limit(trial: Trial, state: dict[str, torch.Tensor], lanczos_steps: int = 100, probes: int = 2) -> dict:
    """The paper's predicted threshold p* of the l1-trained (lomp) network of ``trial`` (its seed)."""
    from .epsilon import loss_epsilon
    from .estimators import slq
    from .hessian import hessian_operator
    from .prediction import predict_limit

    model = trial.make_model(trial.seed)
    model.load_state_dict(state)
    eps_batches = BatchIterable(trial.bundle.train, 128, device=trial.cfg.device)
    eps = loss_epsilon(model, trial.loss_fn, eps_batches)
    op = hessian_operator(model, trial.loss_fn, BatchIterable(trial.bundle.train, 512, device=trial.cfg.device))
    spectrum = slq(op, num_steps=lanczos_steps, num_probes=probes, seed=trial.seed)
    pred = predict_limit(model, eps, spectrum)
    return {"seed": trial.seed, "predicted_ratio": pred.predicted_ratio, "kept_fraction": pred.kept_fraction,
            "epsilon": eps, "in_lomp_regime": pred.in_lomp_regime, "lanczos_steps": lanczos_steps, "probes": probes}
