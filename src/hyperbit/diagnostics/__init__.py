"""Diagnostics: is a model wired as its pathways say?"""

from .wiring import WiringReport, check_wiring

__all__ = ["WiringReport", "check_wiring"]
