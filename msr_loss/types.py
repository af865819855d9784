"""The typed choices of every public argument that takes one of a few words.

Annotating user code with these lets mypy catch a misspelt choice before a run starts; the
constructors and functions still check them at run time.

Examples:
    >>> from msr_loss.types import NEGATIVE_SETS, NegativeSet
    >>> choice: NegativeSet = "cross_view"
    >>> choice in NEGATIVE_SETS
    True
"""

from __future__ import annotations

from typing import Literal, get_args

Backend = Literal["auto", "torch", "triton"]
NegativeSet = Literal["cross_view", "all"]
Reduction = Literal["mean", "sum", "none"]
MetaMode = Literal["exact", "finite_difference"]
Precision = Literal["auto", "fp32", "tf32", "bf16"]

BACKENDS: tuple[str, ...] = get_args(Backend)
NEGATIVE_SETS: tuple[str, ...] = get_args(NegativeSet)
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
META_MODES: tuple[str, ...] = get_args(MetaMode)
PRECISIONS: tuple[str, ...] = get_args(Precision)

__all__ = [
    "BACKENDS",
    "META_MODES",
    "NEGATIVE_SETS",
    "PRECISIONS",
    "REDUCTIONS",
    "Backend",
    "MetaMode",
    "NegativeSet",
    "Precision",
    "Reduction",
]
