"""The ``msr`` flag block: ICL-MSR's interventional loss and the meta update of its strata."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from msr_loss._validation import check_choice
from msr_loss.functional import info_nce
from msr_loss.meta import MetaUpdate
from msr_loss.regularizers import MetaSemanticRegularizer
from msr_loss.types import PRECISIONS, Backend, MetaMode, NegativeSet, Precision

from .terms import AuxiliaryTerm, StepContext, flags_from_block


@dataclass(frozen=True)
class MSRFlags:
    """The ``msr`` flag block: ICL-MSR as an auxiliary loss with its meta-learned strata.

    Args:
        weight: The factor beta on ``L_ICL``.
        num_strata: Number of strata n.
        temperature: Temperature of ``L_ICL`` and of the InfoNCE meta objective.
        meta_lr: Learning rate of the strata's Adam optimizer.
        meta_every: Run stage 2 after every ``meta_every``-th optimizer step.
        meta_mode: ``"finite_difference"`` or ``"exact"`` (see :class:`msr_loss.MetaUpdate`).
        negatives: ``"cross_view"`` (the paper's) or ``"all"``.
        init_std: Standard deviation of the strata's initial logits.
        backend: Similarity backend, ``"auto"``, ``"torch"`` or ``"triton"``.
        precision: Similarity GEMM precision, ``"auto"``, ``"fp32"``, ``"tf32"`` or ``"bf16"``.
        gather_distributed: Under DDP, take the negatives of ``L_ICL`` and of the meta objective
            from every rank.
        enabled: Whether the term is on; a block without ``enabled`` is on.

    Examples:
        >>> MSRFlags.from_block({"weight": 0.5, "num_strata": 8}).num_strata
        8
    """

    weight: float = 1.0
    num_strata: int = 16
    temperature: float = 0.2
    meta_lr: float = 1e-2
    meta_every: int = 1
    meta_mode: MetaMode = "finite_difference"
    negatives: NegativeSet = "cross_view"
    init_std: float = 1.0
    backend: Backend = "auto"
    precision: Precision = "auto"
    gather_distributed: bool = False
    enabled: bool = True

    def __post_init__(self) -> None:
        if not self.meta_lr > 0:
            raise ValueError(f"msr.meta_lr must be > 0, got {self.meta_lr}")
        if self.meta_every < 1:
            raise ValueError(f"msr.meta_every must be >= 1, got {self.meta_every}")
        check_choice("msr.precision", self.precision, PRECISIONS)

    @classmethod
    def from_block(cls, block: Mapping[str, Any]) -> MSRFlags:
        """Reads a flag block, rejecting unknown keys and values of the wrong type."""
        return flags_from_block(cls, "msr", block)

    def build(self, projection_dim: int) -> AuxiliaryTerm:
        """The term for a projector of width ``projection_dim``."""
        return ICLMSRTerm(self, projection_dim)


class ICLMSRTerm(AuxiliaryTerm):
    """ICL-MSR on a solo-learn method: ``weight * L_ICL`` in stage 1, the strata's meta step after.

    Stage 2 runs :class:`msr_loss.MetaUpdate` after the host's optimizer step, with the virtual
    step taken on ``weight * L_ICL`` of the first two large crops (the host's own loss does not
    depend on the strata and cannot be re-evaluated for every solo-learn method) at the host
    optimizer's current learning rate, and InfoNCE of the same crops as the meta objective.
    Under DDP, :class:`msr_loss.MetaUpdate` averages the meta-gradients over ranks, so the
    strata stay the same on every rank.

    Args:
        flags: The ``msr`` flag block.
        projection_dim: Width of the host's projector output.

    Examples:
        >>> term = ICLMSRTerm(MSRFlags(num_strata=4), projection_dim=32)
        >>> term.regularizer.strata.shape
        torch.Size([4, 32])
    """

    flag = "msr"

    def __init__(self, flags: MSRFlags, projection_dim: int) -> None:
        super().__init__()
        self.flags = flags
        with torch.random.fork_rng(devices=[]):
            self.regularizer = MetaSemanticRegularizer(
                projection_dim,
                flags.num_strata,
                temperature=flags.temperature,
                weight=flags.weight,
                negatives=flags.negatives,
                init_std=flags.init_std,
                backend=flags.backend,
                precision=flags.precision,
                gather_distributed=flags.gather_distributed,
            )
        self.meta_optimizer = torch.optim.Adam(self.regularizer.parameters(), lr=flags.meta_lr)
        self.meta_calls = 0
        self._meta: MetaUpdate | None = None

    def loss(self, context: StepContext) -> torch.Tensor:
        z1, z2 = context.projections
        return self.regularizer(z1, z2)

    def after_optimizer_step(self, context: StepContext, optimizer: torch.optim.Optimizer) -> None:
        encoder = context.encoder
        for param in self.regularizer.parameters():
            param.grad = None
        meta = self._meta
        if meta is None or meta.encoder is not encoder or meta.encoder_optimizer is not optimizer:
            meta = MetaUpdate(
                encoder,
                self.regularizer.parameters(),
                self.meta_optimizer,
                encoder_optimizer=optimizer,
                mode=self.flags.meta_mode,
                every=self.flags.meta_every,
            )
            meta.calls = self.meta_calls
            self._meta = meta
        x1, x2 = context.crops
        flags = self.flags
        meta.step(
            train_loss=lambda f: self.regularizer(f(x1), f(x2)),
            meta_loss=lambda f: info_nce(
                f(x1),
                f(x2),
                temperature=flags.temperature,
                negatives=flags.negatives,
                backend=flags.backend,
                precision=flags.precision,
                gather_distributed=flags.gather_distributed,
            ),
        )
        self.meta_calls = meta.calls

    def extra_state(self) -> dict[str, Any]:
        return {"meta_optimizer": self.meta_optimizer.state_dict(), "meta_calls": self.meta_calls}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.meta_calls = int(state["meta_calls"])
        self._meta = None
