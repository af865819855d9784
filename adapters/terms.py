"""The contract of an auxiliary term a wrapped solo-learn method adds to its loss.

A term is an ``nn.Module`` built from its flag block (``cfg.msr`` for ICL-MSR) and the
projection width, then bound to the host method (MetaMask adds its mask and head there). In
stage 1 it adds a loss computed from the first two large crops, their backbone features and their
projections; after each optimizer step of the host it may run a stage 2 of its own (ICL-MSR's
meta update of the strata, MetaMask's of the mask).
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
        features: The projector's inputs for those crops: the backbone features, after any mask
            a term put in front of the projector (in the autograd graph in stage 1).
    """

    crops: tuple[torch.Tensor, torch.Tensor]
    projections: tuple[torch.Tensor, torch.Tensor]
    encoder: nn.Module
    key_encoder: nn.Module | None = None
    features: tuple[torch.Tensor, torch.Tensor] | None = None


class AuxiliaryTerm(nn.Module):
    """The contract of an auxiliary term; subclasses set ``flag`` and implement ``loss``.

    Examples:
        >>> class Zero(AuxiliaryTerm):
        ...     flag = "zero"
        ...     def loss(self, context):
        ...         return context.projections[0].sum() * 0
    """

    flag: ClassVar[str]

    def bind(self, host: nn.Module) -> None:
        """Called once at the end of the host's ``__init__``, before its optimizer exists.

        A term may read the host here (its backbone width), add submodules and register hooks.
        """

    def host_parameters(self) -> list[nn.Parameter]:
        """Parameters the host's optimizer trains, with its own learning rate and schedule."""
        return []

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


def backbone_of(host: nn.Module) -> nn.Module:
    """The method's backbone: ``backbone`` on solo-learn main, ``encoder`` on 1.0.x.

    Examples:
        >>> host = nn.Module()
        >>> host.encoder = nn.Linear(4, 2)
        >>> backbone_of(host)
        Linear(in_features=4, out_features=2, bias=True)
    """
    for name in ("backbone", "encoder"):
        module = getattr(host, name, None)
        if isinstance(module, nn.Module):
            return module
    raise TypeError(f"{type(host).__name__} has neither a 'backbone' nor an 'encoder' nn.Module")


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
