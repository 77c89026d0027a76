"""Evaluation: metrics (and, later, the papers' analyses)."""
from .metrics import evaluate

__all__ = ["evaluate"]
