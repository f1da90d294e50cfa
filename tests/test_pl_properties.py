"""The known properties of the pruning methods (issue 16 "Targets"), with margins, on real data that ships.

scikit-learn's ``digits`` (through the project's dataset registry) and a 64-128-64-10 MLP, 20 epochs per
training run, through the library API (``compare.run_method``). Margins are at most half of the smallest
gap (accuracy difference on the 360 test images) observed over seeds 0-9: 0-6 while choosing the settings,
7-9 as an unseen check.

| property | smallest gap seen | margin |
|---|---|---|
| IMP (rewinding, 2 rounds) beats random at 0.98 | 0.76 | 0.35 |
| SNIP beats random at 0.95 | 0.46 | 0.20 |
| SynFlow beats random at 0.95 | 0.69 | 0.30 |
| lomp (lam 6e-3) beats one-shot magnitude, no fine-tuning, at 0.95 / 0.98 / 0.99 | 0.23 / 0.61 / 0.45 | 0.11 / 0.30 / 0.22 |

At lam 3e-3 the lomp property held at 0.95 and 0.98 but not at 0.99 (one seed of seven had both at chance);
lam 6e-3 makes it hold at all three. Seed 0 rerun at 2 threads gave the same gaps within 0.02. Each
(method, sparsities) run is made once per module and shared by the tests (IMP and magnitude each train their
own dense network through ``run_method``; about 1-2 s a training run on one core).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prunelimit.compare import CompareConfig, Trial, run_method
from prunelimit.data import load_dataset

SEED = 0
EPOCHS = 20
LAM = 6e-3
SPARSITIES = {"imp": (0.98,), "random": (0.95, 0.98), "snip": (0.95,), "synflow": (0.95,),
              "lomp": (0.95, 0.98, 0.99), "magnitude": (0.95, 0.98, 0.99)}


def _mlp(seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def accuracy():
    """``accuracy(method)`` -> {sparsity: test accuracy}; each method trained once for the whole module."""
    bundle = load_dataset("digits", None, seed=0)
    cache: dict[str, dict[float, float]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def get(method: str) -> dict[float, float]:
        if method not in cache:
            cfg = CompareConfig(dataset="digits", sparsities=list(SPARSITIES[method]), seeds=[SEED], epochs=EPOCHS, lam=LAM,
                                imp_rounds=2, rewind_epoch=1).validate()
            rows = run_method(Trial(bundle, _mlp, cfg, SEED), method)
            assert [r["sparsity"] for r in rows] == list(SPARSITIES[method])
            cache[method] = {r["sparsity"]: r["test_accuracy"] for r in rows}
        return cache[method]

    yield get
    torch.set_num_threads(threads)


def test_imp_with_rewinding_beats_random_pruning_at_98_percent_by_a_wide_margin(accuracy):
    assert accuracy("imp")[0.98] > accuracy("random")[0.98] + 0.35


@pytest.mark.parametrize("method, margin", [("snip", 0.20), ("synflow", 0.30)])
def test_pruning_at_initialisation_beats_random_at_95_percent(accuracy, method, margin):
    assert accuracy(method)[0.95] > accuracy("random")[0.95] + margin


@pytest.mark.parametrize("sparsity, margin", [(0.95, 0.11), (0.98, 0.30), (0.99, 0.22)])
def test_lomp_beats_one_shot_magnitude_without_finetuning(accuracy, sparsity, margin):
    assert accuracy("lomp")[sparsity] > accuracy("magnitude")[sparsity] + margin
