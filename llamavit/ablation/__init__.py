"""Ablations: ladders of model/training options trained with one budget (iLLaMA), AIM's pre-training ablation
arms with the paper's claims judged, and their reports."""
from .aim import AimAblation, Arm, Claim, judge_claims, load_aim_ablation, run_aim_ablation, save_aim_report
from .ladder import Ladder, Rung, load_ladder, run_ladder, rung_train_config
from .report import format_ladder_table, save_ladder_report, summarize_ladder

__all__ = ["AimAblation", "Arm", "Claim", "judge_claims", "load_aim_ablation", "run_aim_ablation", "save_aim_report",
           "Ladder", "Rung", "load_ladder", "run_ladder", "rung_train_config", "format_ladder_table",
           "save_ladder_report", "summarize_ladder"]
