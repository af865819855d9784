"""The ``msr`` flag block: ICL-MSR's interventional loss and the meta update of its strata."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch

from msr_loss._validation import check_choice, check_integer, check_real, check_temperature
from msr_loss.functional import info_nce
from msr_loss.meta import Forward, MetaUpdate
from msr_loss.regularizers import MetaSemanticRegularizer
from msr_loss.types import (
    BACKENDS,
    META_MODES,
    NEGATIVE_SETS,
    PRECISIONS,
    Backend,
    MetaMode,
    NegativeSet,
    Precision,
)

from .terms import AuxiliaryTerm, Check, FlagBlock, StepContext, positive


class ICLMSRTerm(AuxiliaryTerm):
    """ICL-MSR on a solo-learn method: ``weight * L_ICL`` in stage 1, the strata's meta step after.

    ``L_ICL`` is taken over every crop the method projected (large and small): each crop is an
    anchor and every other crop of the same image a positive. Stage 2 runs
    :class:`msr_loss.MetaUpdate` after each real optimizer step of the host, with the virtual step
    taken on ``weight * L_ICL`` of the same crops (the host's own loss does not depend on the
    strata and cannot be re-evaluated for every solo-learn method), mirroring the host's optimizer
    at its current learning rate, and InfoNCE of the same crops as the meta objective. Under DDP,
    :class:`msr_loss.MetaUpdate` averages the meta-gradients over ranks, so the strata stay the
    same on every rank.

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

    def _interventional(self, views: list[torch.Tensor]) -> torch.Tensor:
        return self.regularizer(views[0], views[1], more_views=views[2:])

    def _info_nce(self, views: list[torch.Tensor]) -> torch.Tensor:
        flags = self.flags
        return info_nce(
            views[0],
            views[1],
            temperature=flags.temperature,
            negatives=flags.negatives,
            backend=flags.backend,
            precision=flags.precision,
            gather_distributed=flags.gather_distributed,
            more_views=views[2:],
        )

    def loss(self, context: StepContext) -> torch.Tensor:
        return self._interventional(list(context.projections))

    def _meta_update(self, context: StepContext, optimizer: torch.optim.Optimizer) -> MetaUpdate:
        meta = self._meta
        if (
            meta is None
            or meta.encoder is not context.encoder
            or meta.encoder_optimizer is not (optimizer)
        ):
            meta = MetaUpdate(
                context.encoder,
                self.regularizer.parameters(),
                self.meta_optimizer,
                encoder_optimizer=optimizer,
                mode=self.flags.meta_mode,
                every=self.flags.meta_every,
            )
            meta.calls = self.meta_calls
            self._meta = meta
        return meta

    def after_optimizer_step(self, context: StepContext, optimizer: torch.optim.Optimizer) -> None:
        for param in self.regularizer.parameters():
            param.grad = None
        crops = context.crops

        def views(forward: Forward) -> list[torch.Tensor]:
            return [forward(x) for x in crops]

        meta = self._meta_update(context, optimizer)
        meta.step(
            train_loss=lambda f: self._interventional(views(f)),
            meta_loss=lambda f: self._info_nce(views(f)),
        )
        self.meta_calls = meta.calls

    def extra_state(self) -> dict[str, Any]:
        return {"meta_optimizer": self.meta_optimizer.state_dict(), "meta_calls": self.meta_calls}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.meta_calls = int(state["meta_calls"])
        self._meta = None


@dataclass(frozen=True)
class MSRFlags(FlagBlock):
    """The ``msr`` flag block: ICL-MSR as an auxiliary loss with its meta-learned strata.

    Args:
        weight: The factor beta >= 0 on ``L_ICL`` (0 trains exactly as without the term).
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

    term_type = ICLMSRTerm
    label = "MSR"
    checks: ClassVar[Mapping[str, Check]] = {
        "weight": partial(check_real, at_least=0),
        "num_strata": partial(check_integer, at_least=1),
        "temperature": lambda name, value: check_temperature(value, name),
        "meta_lr": positive,
        "meta_every": partial(check_integer, at_least=1),
        "meta_mode": partial(check_choice, allowed=META_MODES),
        "negatives": partial(check_choice, allowed=NEGATIVE_SETS),
        "init_std": partial(check_real, at_least=0),
        "backend": partial(check_choice, allowed=BACKENDS),
        "precision": partial(check_choice, allowed=PRECISIONS),
    }

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
