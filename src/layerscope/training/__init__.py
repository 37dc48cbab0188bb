"""Supervised fine-tuning of chosen blocks (full or LoRA), with checkpoints and resume.

    from layerscope.training import FinetuneConfig, finetune, run_finetune
    result = run_finetune("smollm2-135m", data="dolly", out="runs/ft", layers=[3, 4, 5], samples=256)
"""

from .config import DEFAULT_LR, METHODS, SCHEDULES, FinetuneConfig
from .job import run_finetune
from .sft import FinetuneResult, finetune

__all__ = ["DEFAULT_LR", "METHODS", "SCHEDULES", "FinetuneConfig", "FinetuneResult", "finetune", "run_finetune"]
