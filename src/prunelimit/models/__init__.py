"""The paper's model zoo (CIFAR-style) and user models by import path.

Importing this package registers every family: ``mlp`` (fc5, fc12, lenet300),
``alexnet``, ``vgg`` (vgg16 with BN) and ``resnet`` (resnet18, resnet50).
"""
from . import alexnet, mlp, resnet, vgg  # noqa: F401  (imported for their registrations)
from .registry import ModelSpec, create_model, is_import_path, list_models, model_spec, register_model

__all__ = ["ModelSpec", "create_model", "is_import_path", "list_models", "model_spec", "register_model"]
