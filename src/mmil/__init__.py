"""Multi-level MIL with Transformer for whole-slide image classification."""
__version__ = "0.1.0"
