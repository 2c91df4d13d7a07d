"""Diagnostics: is a model wired as its pathways say, and what did its pathway learn?"""

from .connections import BranchWeights, composite_gain, model_branch_weights, unfold
from .wiring import WiringReport, check_wiring

__all__ = ["BranchWeights", "WiringReport", "check_wiring", "composite_gain",
           "model_branch_weights", "unfold"]
