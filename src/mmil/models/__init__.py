"""MIL models: one module per family, all reachable through the registry.

>>> from mmil.models import create_model, list_models
>>> model = create_model("mmil", in_dim=1024, n_classes=2)
>>> out = model(x, mask, **model_inputs(model, coords=coords, groups=groups, seed=0))
"""
from .base import BAG_INPUTS, MILModel, MILOutput, as_padded_batch, mask_to_bias, model_inputs
from .registry import create_model, list_models, register_model

# Importing the family modules fills the registry.
from . import mmil_transformer  # noqa: F401,E402
from . import pooling  # noqa: F401,E402
from . import abmil  # noqa: F401,E402
from . import transmil  # noqa: F401,E402
from . import dsmil  # noqa: F401,E402
from . import clam  # noqa: F401,E402

__all__ = ["BAG_INPUTS", "MILModel", "MILOutput", "as_padded_batch", "mask_to_bias", "model_inputs", "create_model", "list_models", "register_model"]
