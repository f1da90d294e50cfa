"""MIL models: one module per family, all reachable through the registry.

>>> from mmil.models import create_model, list_models
>>> model = create_model("mmil", in_dim=1024, n_classes=2)
"""
from .base import MILModel, MILOutput, as_padded_batch, mask_to_bias
from .registry import create_model, list_models, register_model

# Importing the family modules fills the registry.
from . import mmil_transformer  # noqa: F401,E402
from . import pooling  # noqa: F401,E402
from . import abmil  # noqa: F401,E402
from . import transmil  # noqa: F401,E402
from . import dsmil  # noqa: F401,E402
from . import clam  # noqa: F401,E402

__all__ = ["MILModel", "MILOutput", "as_padded_batch", "mask_to_bias", "create_model", "list_models", "register_model"]
