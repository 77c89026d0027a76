"""Ablations: ladders of model/training options trained with one budget, and their reports."""
from .ladder import Ladder, Rung, load_ladder, run_ladder, rung_train_config
from .report import format_ladder_table, save_ladder_report, summarize_ladder

__all__ = ["Ladder", "Rung", "load_ladder", "run_ladder", "rung_train_config", "format_ladder_table",
           "save_ladder_report", "summarize_ladder"]
