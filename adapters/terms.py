"""The contract of an auxiliary term a wrapped solo-learn method adds to its loss, and of the flag
block that builds it.

A term is an ``nn.Module`` built from its flag block (``cfg.msr`` for ICL-MSR) and the
projection width, then bound to the host method (MetaMask adds its mask and head there). In
stage 1 it adds a loss computed from the crops the method projected (large and small), their
backbone features and their projections; after each real optimizer step of the host it may run a
stage 2 of its own (ICL-MSR's meta update of the strata, MetaMask's of the mask).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn
from torch.func import functional_call

from msr_loss._validation import check_real

Check = Callable[[str, Any], Any]


@dataclass(frozen=True)
class StepContext:
    """What a term sees of one training step.

    Attributes:
        crops: The crops the method projected, large crops first then small crops, as fed to
            the backbone (at least two, all with the same batch size N).
        projections: The projector's outputs for those crops (in the autograd graph in stage 1).
        encoder: Backbone then projector of the online branch (attributes ``backbone`` and
            ``projector``).
        key_encoder: The momentum backbone and projector, for methods that have them.
        features: The projector's inputs for those crops: the backbone features, after any mask
            a term put in front of the projector (in the autograd graph in stage 1).
    """

    crops: tuple[torch.Tensor, ...]
    projections: tuple[torch.Tensor, ...]
    encoder: nn.Module
    key_encoder: nn.Module | None = None
    features: tuple[torch.Tensor, ...] | None = None


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
        """Stage 2, run once after each optimizer step of the host that changed its weights."""

    def extra_state(self) -> dict[str, Any]:
        """State outside ``state_dict`` (optimizer moments, counters) to put in checkpoints."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restores what :meth:`extra_state` returned."""


def positive(name: str, value: object) -> float:
    """A finite real number > 0 (a learning rate), named in the error as ``name``.

    Examples:
        >>> positive("msr.meta_lr", 0.01)
        0.01
    """
    number = check_real(name, value)
    if number <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return number


@dataclass(frozen=True)
class FlagBlock:
    """The base of every flag block: parse a config block, check each flag, build the term.

    A subclass is a frozen dataclass whose fields are the block's flags (each with a default,
    whose type is the flag's type), and sets ``term_type`` (the :class:`AuxiliaryTerm` it builds,
    whose ``flag`` names the block), ``label`` (its part of the wrapped class's name) and
    ``checks`` (a check per flag, called as ``check("msr.weight", value)`` when the block is made,
    returning the value to keep). Every block ends with ``enabled: bool = True``.

    Examples:
        >>> from msr_loss.adapters import MSRFlags
        >>> MSRFlags.from_block({"num_strata": 4}).num_strata
        4
        >>> MSRFlags.from_block({"num_strata": 0})
        Traceback (most recent call last):
        ...
        ValueError: msr.num_strata must be >= 1, got 0
    """

    term_type: ClassVar[type[AuxiliaryTerm]]
    label: ClassVar[str]
    checks: ClassVar[Mapping[str, Check]] = {}

    def __post_init__(self) -> None:
        flag = self.term_type.flag
        for name, check in self.checks.items():
            object.__setattr__(self, name, check(f"{flag}.{name}", getattr(self, name)))

    @classmethod
    def from_block(cls, block: Mapping[str, Any]) -> Any:
        """Reads a flag block, rejecting unknown keys, values of the wrong type and out of range."""
        return flags_from_block(cls, cls.term_type.flag, block)

    def build(self, projection_dim: int) -> AuxiliaryTerm:
        """The term for a projector of width ``projection_dim``."""
        return cast(Callable[[FlagBlock, int], AuxiliaryTerm], self.term_type)(self, projection_dim)


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


def forward_keeping_buffers(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` in its current mode, writing BatchNorm running statistics to copies.

    Train-mode BatchNorm still normalises by the batch's own statistics and gradients flow to
    the module's parameters as usual; only the buffers the module keeps are left untouched.

    Examples:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> _ = forward_keeping_buffers(net, torch.randn(8, 3))
        >>> net[1].running_mean.abs().max().item(), net[1].num_batches_tracked.item()
        (0.0, 0)
    """
    copies = {name: buffer.clone() for name, buffer in module.named_buffers()}
    return functional_call(module, copies, (x,))


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
