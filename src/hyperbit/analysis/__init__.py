"""Diagnostics: is a model wired as its pathways say, and what did its pathway learn?"""

from .collapse import branch_inputs, collapse, consecutive_cosine
from .connections import BranchWeights, composite_gain, model_branch_weights, pathway_states, unfold
from .monitor import pathway_summary
from .wiring import WiringReport, check_wiring

__all__ = ["BranchWeights", "WiringReport", "branch_inputs", "check_wiring", "collapse",
           "composite_gain", "consecutive_cosine", "model_branch_weights", "pathway_states",
           "pathway_summary", "unfold"]
