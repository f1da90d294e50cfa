"""How sparse can a network be pruned: l1 training, one-shot pruning, SLQ and the predicted limit."""
__version__ = "0.1.0"
