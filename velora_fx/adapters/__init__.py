"""Parameter-efficient adapters that train well under ``velora_fx.backend``."""
from .lotr import (LoTRFactorDict, LoTRFactors, LoTRLinear, apply_lotr, lotr_modules, lotr_parameter_count,
                   lotr_report, merge_lotr, unmerge_lotr)

__all__ = ["LoTRFactors", "LoTRFactorDict", "LoTRLinear", "apply_lotr", "merge_lotr", "unmerge_lotr",
           "lotr_parameter_count", "lotr_report", "lotr_modules"]
