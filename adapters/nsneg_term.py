"""The ``nsneg`` flag block: patch-based non-semantic negatives as an auxiliary InfoNCE term."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch

from msr_loss._validation import check_choice, check_real, check_temperature
from msr_loss.losses import NonSemanticContrastiveLoss
from msr_loss.negatives import PATCH_RANGE, patch_negatives
from msr_loss.types import BACKENDS, NEGATIVE_SETS, PRECISIONS, Backend, NegativeSet, Precision

from .terms import AuxiliaryTerm, Check, FlagBlock, StepContext, forward_keeping_buffers


class NonSemanticNegativesTerm(AuxiliaryTerm):
    """``weight * InfoNCE(z1, z2)`` with each crop's patch-based negative as an extra column.

    The term is taken on the first two large crops. Their negatives are encoded like the host's
    keys: by the momentum backbone and projector without gradient where the method has them
    (MoCo, BYOL), else by the online encoder with gradient (SimCLR, Barlow Twins, VICReg). Either
    way the encoder runs in its current mode but keeps its BatchNorm running statistics as they
    were: those are the statistics ``main_linear.py`` evaluates with, and negatives are not data.

    Args:
        flags: The ``nsneg`` flag block.
        projection_dim: Unused (the term has no parameters); part of the terms' constructor.

    Examples:
        >>> term = NonSemanticNegativesTerm(NSNegFlags(alpha=2.0))
        >>> term.criterion.alpha
        2.0
    """

    flag = "nsneg"

    def __init__(self, flags: NSNegFlags, projection_dim: int | None = None) -> None:
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
        crops = context.crops[:2]
        images = torch.cat([patch_negatives(x, patch_range=patch_range) for x in crops])
        if context.key_encoder is None:
            encoded = forward_keeping_buffers(context.encoder, images)
        else:
            with torch.no_grad():
                encoded = forward_keeping_buffers(context.key_encoder, images)
        t1, t2 = encoded.chunk(2)
        z1, z2 = context.projections[:2]
        return self.flags.weight * self.criterion(z1, z2, t1, t2)


def _fraction(name: str, value: object) -> float:
    return check_real(name, value, above=0, at_most=1)


@dataclass(frozen=True)
class NSNegFlags(FlagBlock):
    """The ``nsneg`` flag block: InfoNCE with one patch-based negative per query, added to the loss.

    Args:
        weight: The factor >= 0 on the term.
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

    term_type = NonSemanticNegativesTerm
    label = "NSNeg"
    checks: ClassVar[Mapping[str, Check]] = {
        "weight": partial(check_real, at_least=0),
        "temperature": lambda name, value: check_temperature(value, name),
        "alpha": partial(check_real, above=0),
        "patch_min": _fraction,
        "patch_max": _fraction,
        "negatives": partial(check_choice, allowed=NEGATIVE_SETS),
        "backend": partial(check_choice, allowed=BACKENDS),
        "precision": partial(check_choice, allowed=PRECISIONS),
    }

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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch_min > self.patch_max:
            raise ValueError(
                f"nsneg.patch_min must be <= nsneg.patch_max, got {self.patch_min} and "
                f"{self.patch_max}"
            )
