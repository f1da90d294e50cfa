"""A registered encoder preset as a :class:`~mmil.wsi.backbones.Backbone` (``mmil extract --backbone NAME``)."""
from __future__ import annotations

from pathlib import Path

import torch

from ...errors import MMILInputError
from .presets import PRESETS, check_preset_keys, get_preset, load_preset_weights


def preset_weights_hint(name: str) -> str:
    """What to pass instead, for error messages."""
    spec = PRESETS.get(name)
    where = f" ({spec.source})" if spec is not None and spec.source else ""
    return (f"download the released {name} weights once on a machine with internet{where} and pass the local file "
            "(pytorch_model.bin / model.safetensors) with --weights; for tests or smoke runs pass --random-weights")


def preset_backbone(name: str, weights: str | Path | None, *, random_weights: bool, seed: int, input_size: int | None):
    """Build preset ``name`` in eval mode with strictly loaded local weights (or seeded random ones).

    ``input_size``: ``-1`` = the preset's (e.g. 224), ``None``/``0`` = keep the patch size. Mean, std,
    interpolation and centre-crop fraction come from the preset.
    """
    from ..backbones import Backbone, LoadReport, read_weight_file  # noqa: PLC0415 - backbones imports this module lazily

    spec = get_preset(name)
    if weights is None and not random_weights:
        raise MMILInputError(f"backbone {name!r} needs weights: {preset_weights_hint(name)}")
    if weights is not None and random_weights:
        raise MMILInputError("pass either --weights FILE or --random-weights, not both")
    if weights is not None and not Path(weights).is_file():
        raise MMILInputError(f"{weights}: weights file not found; {preset_weights_hint(name)}")
    state = read_weight_file(weights) if weights is not None else None  # read first: a bad file fails before a big model is built
    if state is not None:
        _check_keys_on_meta(spec, state, str(weights))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.build()
    report = None
    if state is not None:
        report = LoadReport(loaded=load_preset_weights(model, spec, state, str(weights)))
    size = spec.input_size if input_size == -1 else (input_size or None)
    return Backbone(name, model.eval(), spec.embed_dim, size, tuple(spec.mean), tuple(spec.std), report,
                    None if weights is None else str(weights), interpolation=spec.resize, crop_pct=spec.crop_pct)


def _check_keys_on_meta(spec, state, source: str) -> None:
    """Key check against the architecture built on the meta device (no memory, no init), before the real build."""
    try:
        with torch.device("meta"):
            expected = list(spec.build().state_dict())
    except Exception:  # noqa: BLE001 - a builder that cannot run on meta is checked by the real load instead
        return
    check_preset_keys(expected, spec, spec.checkpoint_filter(state), source)
