"""The ``nsneg`` flag block: patch-based non-semantic negatives as an auxiliary InfoNCE term."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from msr_loss.losses import NonSemanticContrastiveLoss
from msr_loss.negatives import PATCH_RANGE, patch_negatives
from msr_loss.types import Backend, NegativeSet, Precision

from .terms import AuxiliaryTerm, StepContext, flags_from_block


@dataclass(frozen=True)
class NSNegFlags:
    """The ``nsneg`` flag block: InfoNCE with one patch-based negative per query, added to the loss.

    Args:
        weight: The factor on the term.
        temperature: Temperature of the InfoNCE term.
        alpha: Scale of the non-semantic negatives' similarities (2 in the paper).
        patch_min: Smallest patch side, as a fraction of the crop's shorter side.
        patch_max: Largest patch side, as a fraction of the crop's shorter side.
        negatives: The in-batch negatives, ``"cross_view"`` or ``"all"``.
        backend: Similarity backend, ``"auto"``, ``"torch"`` or ``"triton"``.
        precision: Similarity GEMM precision, ``"auto"``, ``"fp32"``, ``"tf32"`` or ``"bf16"``.
        gather_distributed: Under DDP, take the in-batch negatives from every rank.
        enabled: Whether the term is on; a block without ``enabled`` is on.

    Examples:
        >>> NSNegFlags.from_block({"alpha": 3}).alpha
        3.0
    """

    weight: float = 1.0
    temperature: float = 0.2
    alpha: float = 2.0
    patch_min: float = PATCH_RANGE[0]
    patch_max: float = PATCH_RANGE[1]
    negatives: NegativeSet = "cross_view"
    backend: Backend = "auto"
    precision: Precision = "auto"
    gather_distributed: bool = False
    enabled: bool = True

    @classmethod
    def from_block(cls, block: Mapping[str, Any]) -> NSNegFlags:
        """Reads a flag block, rejecting unknown keys and values of the wrong type."""
        return flags_from_block(cls, "nsneg", block)

    def build(self, projection_dim: int) -> AuxiliaryTerm:
        """The term; it has no parameters, so ``projection_dim`` is not needed."""
        return NonSemanticNegativesTerm(self)


class NonSemanticNegativesTerm(AuxiliaryTerm):
    """``weight * InfoNCE(z1, z2)`` with each crop's patch-based negative as an extra column.

    The negatives are encoded like the host's keys: by the momentum backbone and projector
    without gradient where the method has them (MoCo, BYOL), else by the online encoder with
    gradient (SimCLR, Barlow Twins, VICReg).

    Args:
        flags: The ``nsneg`` flag block.

    Examples:
        >>> term = NonSemanticNegativesTerm(NSNegFlags(alpha=2.0))
        >>> term.criterion.alpha
        2.0
    """

    flag = "nsneg"

    def __init__(self, flags: NSNegFlags) -> None:
        super().__init__()
        self.flags = flags
        self.criterion = NonSemanticContrastiveLoss(
            temperature=flags.temperature,
            alpha=flags.alpha,
            negatives=flags.negatives,
            backend=flags.backend,
            precision=flags.precision,
            gather_distributed=flags.gather_distributed,
        )

    def loss(self, context: StepContext) -> torch.Tensor:
        patch_range = (self.flags.patch_min, self.flags.patch_max)
        images = torch.cat([patch_negatives(x, patch_range=patch_range) for x in context.crops])
        if context.key_encoder is None:
            encoded = context.encoder(images)
        else:
            with torch.no_grad():
                encoded = context.key_encoder(images)
        t1, t2 = encoded.chunk(2)
        z1, z2 = context.projections
        return self.flags.weight * self.criterion(z1, z2, t1, t2)
