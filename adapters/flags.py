"""Which config flag block switches on which auxiliary term."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .metamask_term import MetaMaskFlags
from .msr_term import MSRFlags
from .nsneg_term import NSNegFlags

TermFlags = Callable[[Mapping[str, Any]], Any]
TERMS: dict[str, TermFlags] = {
    "msr": MSRFlags.from_block,
    "nsneg": NSNegFlags.from_block,
    "metamask": MetaMaskFlags.from_block,
}


def register_term(flag: str, from_block: TermFlags) -> None:
    """Makes the flag block ``flag`` switch on another auxiliary term.

    Args:
        flag: Name of the config block, e.g. ``"mine"`` for ``+mine.weight=...``.
        from_block: Reads the block into an object with ``enabled`` and
            ``build(projection_dim) -> AuxiliaryTerm``; the adapter then calls the term's
            ``bind(model)``.

    Examples:
        >>> register_term("msr", MSRFlags.from_block)
    """
    if not flag.isidentifier():
        raise ValueError(f"flag must be a Python identifier, got {flag!r}")
    TERMS[flag] = from_block
