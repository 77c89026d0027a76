"""Evaluation: metrics and the papers' analyses."""
from .metrics import evaluate
from .resolution import accuracy_by_resolution

__all__ = ["evaluate", "accuracy_by_resolution"]
