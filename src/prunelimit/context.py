"""What the pipeline's steps share during one invocation: run directory, configuration, data, model."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from mmpl.device import resolve_device
from mmpl.jsonio import read_json
from torch import nn

from . import distributed
from .config import RunConfig
from .data import BatchIterable, DatasetBundle, load_dataset
from .errors import PruneLimitError
from .io import load_state_dict
from .models import create_model
from .rundir import MODEL_FILE, MODEL_INFO_FILE, RunDirectory

EVAL_BATCH_SIZE = 1024


def loss_fn() -> nn.Module:
    """The loss of every step: cross-entropy, the batch mean."""
    return nn.CrossEntropyLoss()


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Context:
    """What the steps share during one invocation: directory, config, data (loaded once), options."""

    run: RunDirectory
    config: RunConfig
    progress: bool = True
    log: Callable[[str], None] = stderr_log
    _bundle: DatasetBundle | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        device = resolve_device(self.config.device, error=PruneLimitError)
        if device.type == "cuda" and device.index is None and distributed.is_distributed():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return device

    @property
    def bundle(self) -> DatasetBundle:
        if self._bundle is None:
            self._bundle = load_dataset(self.config.dataset, data_root=self.config.data_root, seed=self.config.seed)
        return self._bundle

    def build_model(self, in_shape: Sequence[int], num_classes: int) -> nn.Module:
        """A freshly initialised model; initialisation is seeded without touching the global RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            return create_model(self.config.model, in_shape, num_classes)

    def load_model(self, file: str = MODEL_FILE) -> nn.Module:
        """Rebuild the trained model from model.json and load its safetensors weights (strict)."""
        info_path = self.run.file(MODEL_INFO_FILE)
        weights_path = self.run.file(file)
        if not info_path.is_file() or not weights_path.is_file():
            raise PruneLimitError(f"{self.run.path} has no trained model ({MODEL_INFO_FILE}, {file}); run `prunelimit train --out {self.run.path}` first")
        info = read_json(info_path, PruneLimitError)
        model = self.build_model(info["in_shape"], info["num_classes"])
        try:
            state = load_state_dict(weights_path)
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise PruneLimitError(f"cannot read {weights_path} ({type(err).__name__}: {err}); rerun `prunelimit train --force`") from None
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise PruneLimitError(f"{weights_path} does not fit model {info['model']!r} ({first}); rerun `prunelimit train --force`") from None
        return model.to(self.device).eval()

    def test_batches(self) -> BatchIterable:
        return BatchIterable(self.bundle.test, EVAL_BATCH_SIZE, device=self.device)
