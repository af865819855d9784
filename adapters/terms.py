"""The contract of an auxiliary term a wrapped solo-learn method adds to its loss.

A term is an ``nn.Module`` built from its flag block (``cfg.msr`` for ICL-MSR) and the
projection width. In stage 1 it adds a loss computed from the first two large crops and their
projections; after each optimizer step of the host it may run a stage 2 of its own (ICL-MSR's
meta update of the strata).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class StepContext:
    """What a term sees of one training step.

    Attributes:
        crops: The first two large crops of the batch, as fed to the backbone.
        projections: The projector's outputs for those crops (in the autograd graph in stage 1).
        encoder: Backbone then projector of the online branch.
        key_encoder: The momentum backbone and projector, for methods that have them.
    """

    crops: tuple[torch.Tensor, torch.Tensor]
    projections: tuple[torch.Tensor, torch.Tensor]
    encoder: nn.Module
    key_encoder: nn.Module | None = None


class AuxiliaryTerm(nn.Module):
    """The contract of an auxiliary term; subclasses set ``flag`` and implement ``loss``.

    Examples:
        >>> class Zero(AuxiliaryTerm):
        ...     flag = "zero"
        ...     def loss(self, context):
        ...         return context.projections[0].sum() * 0
    """

    flag: ClassVar[str]

    def loss(self, context: StepContext) -> torch.Tensor:
        """The term's contribution to the host's loss in stage 1."""
        raise NotImplementedError

    def after_optimizer_step(self, context: StepContext, optimizer: torch.optim.Optimizer) -> None:
        """Stage 2, run after ``optimizer`` (the host's) has stepped."""

    def extra_state(self) -> dict[str, Any]:
        """State outside ``state_dict`` (optimizer moments, counters) to put in checkpoints."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restores what :meth:`extra_state` returned."""


def flags_from_block(cls: Any, flag: str, block: Mapping[str, Any]) -> Any:
    """Builds the flag dataclass ``cls`` from a block, rejecting unknown keys and wrong types."""
    if not isinstance(block, Mapping):
        raise TypeError(f"the {flag} flag block must be a mapping, got {type(block).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(block) - set(fields))
    if unknown:
        raise ValueError(f"unknown {flag} flags {unknown}; known flags are {sorted(fields)}")
    values = {}
    for key, value in block.items():
        expected = type(fields[key].default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not expected:
            raise TypeError(
                f"{flag}.{key} must be a {expected.__name__}, got {value!r} "
                f"({type(value).__name__})"
            )
        values[key] = value
    return cls(**values)
