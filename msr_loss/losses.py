"""The losses as modules, with lightly's call convention: build with the settings, call on views.

Each module checks its settings when it is built and computes exactly its function in
:mod:`msr_loss.functional`:

- :class:`NTXentLoss`: :func:`msr_loss.nt_xent` (SimCLR), a drop-in for ``lightly.loss.NTXentLoss``;
- :class:`InfoNCELoss`: :func:`msr_loss.info_nce`;
- :class:`InterventionalLoss`: :func:`msr_loss.interventional_loss` with the strata passed in
  (:class:`msr_loss.MetaSemanticRegularizer` owns learnable ones);
- :class:`NonSemanticContrastiveLoss`: InfoNCE or the interventional loss with each anchor's
  non-semantic negatives (:func:`msr_loss.non_semantic_logits`) added.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from msr_loss._validation import (
    check_choice,
    check_flag,
    check_floating,
    check_loss_choices,
    check_real,
    check_temperature,
    check_views,
)
from msr_loss.functional import info_nce, interventional_loss, non_semantic_logits, nt_xent
from msr_loss.types import PRECISIONS, Backend, NegativeSet, Precision, Reduction


class _ContrastiveLoss(nn.Module):
    """The settings every contrastive loss module shares, checked at construction."""

    def __init__(
        self,
        temperature: float,
        negatives: NegativeSet,
        reduction: Reduction,
        backend: Backend,
        gather_distributed: bool,
        precision: Precision,
    ) -> None:
        super().__init__()
        check_loss_choices(negatives, reduction, backend)
        self.precision = check_choice("precision", precision, PRECISIONS)
        self.temperature = check_temperature(temperature)
        self.negatives: NegativeSet = negatives
        self.reduction: Reduction = reduction
        self.backend: Backend = backend
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, negatives={self.negatives!r}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}, "
            f"precision={self.precision!r}"
        )


class NTXentLoss(_ContrastiveLoss):
    """NT-Xent (SimCLR) as a module: :func:`msr_loss.nt_xent` with its settings fixed.

    Called like lightly's ``NTXentLoss``: ``criterion(out0, out1)`` on the two views' projections.

    Args:
        temperature: Softmax temperature, > 0 (0.5 by default, as in lightly).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        gather_distributed: Take the negatives from every rank (see :func:`msr_loss.nt_xent`).
        precision: The similarity GEMMs' precision: ``"auto"``, ``"fp32"``, ``"tf32"`` or
            ``"bf16"`` (see :func:`msr_loss.interventional_loss`).

    Examples:
        >>> criterion = NTXentLoss(temperature=0.5)
        >>> loss = criterion(torch.randn(8, 16), torch.randn(8, 16))
    """

    def __init__(
        self,
        temperature: float = 0.5,
        *,
        reduction: Reduction = "mean",
        backend: Backend = "auto",
        gather_distributed: bool = False,
        precision: Precision = "auto",
    ) -> None:
        super().__init__(temperature, "all", reduction, backend, gather_distributed, precision)

    def forward(
        self, z1: torch.Tensor, z2: torch.Tensor, *, more_views: Sequence[torch.Tensor] = ()
    ) -> torch.Tensor:
        """The loss of the (N, D) projections ``z1`` and ``z2`` of two views of N images.

        ``more_views`` are further (N, D) views of the same images (see :func:`msr_loss.nt_xent`).
        """
        return nt_xent(
            z1,
            z2,
            temperature=self.temperature,
            reduction=self.reduction,
            backend=self.backend,
            gather_distributed=self.gather_distributed,
            precision=self.precision,
            more_views=more_views,
        )


class InfoNCELoss(_ContrastiveLoss):
    """Symmetric InfoNCE as a module: :func:`msr_loss.info_nce` with its settings fixed.

    Args:
        temperature: Softmax temperature, > 0.
        negatives: ``"cross_view"`` (the N-1 other images' other view) or ``"all"`` (NT-Xent).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        gather_distributed: Take the negatives from every rank (see :func:`msr_loss.info_nce`).
        precision: The similarity GEMMs' precision: ``"auto"``, ``"fp32"``, ``"tf32"`` or
            ``"bf16"`` (see :func:`msr_loss.interventional_loss`).

    Examples:
        >>> criterion = InfoNCELoss(temperature=0.1)
        >>> loss = criterion(torch.randn(8, 16), torch.randn(8, 16))
    """

    def __init__(
        self,
        temperature: float,
        *,
        negatives: NegativeSet = "cross_view",
        reduction: Reduction = "mean",
        backend: Backend = "auto",
        gather_distributed: bool = False,
        precision: Precision = "auto",
    ) -> None:
        super().__init__(temperature, negatives, reduction, backend, gather_distributed, precision)

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        extra_negative_logits: torch.Tensor | None = None,
        *,
        more_views: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        """The loss of ``z1`` and ``z2`` ((N, D) each), with optional (V N, K) extra negatives.

        ``more_views`` are further (N, D) views of the same images (see :func:`msr_loss.info_nce`).
        """
        return info_nce(
            z1,
            z2,
            temperature=self.temperature,
            negatives=self.negatives,
            reduction=self.reduction,
            backend=self.backend,
            extra_negative_logits=extra_negative_logits,
            gather_distributed=self.gather_distributed,
            precision=self.precision,
            more_views=more_views,
        )


class InterventionalLoss(_ContrastiveLoss):
    """The ICL-MSR interventional loss as a module, the strata passed in at every call.

    :func:`msr_loss.interventional_loss` with its settings fixed; for strata learned by the meta
    step use :class:`msr_loss.MetaSemanticRegularizer`, which owns them.

    Args:
        temperature: Softmax temperature, > 0.
        negatives: ``"cross_view"`` (default, the paper's) or ``"all"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        gather_distributed: Take the negatives from every rank (see
            :func:`msr_loss.interventional_loss`).
        precision: The similarity GEMMs' precision: ``"auto"``, ``"fp32"``, ``"tf32"`` or
            ``"bf16"`` (see :func:`msr_loss.interventional_loss`).

    Examples:
        >>> criterion = InterventionalLoss(temperature=0.2)
        >>> loss = criterion(torch.randn(8, 16), torch.randn(8, 16), torch.rand(4, 16))
    """

    def __init__(
        self,
        temperature: float,
        *,
        negatives: NegativeSet = "cross_view",
        reduction: Reduction = "mean",
        backend: Backend = "auto",
        gather_distributed: bool = False,
        precision: Precision = "auto",
    ) -> None:
        super().__init__(temperature, negatives, reduction, backend, gather_distributed, precision)

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        strata: torch.Tensor,
        extra_negative_logits: torch.Tensor | None = None,
        *,
        more_views: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        """The loss of ``z1`` and ``z2`` ((N, D) each) over the (n, D) ``strata``.

        ``more_views`` are further (N, D) views of the same images (see
        :func:`msr_loss.interventional_loss`).
        """
        return interventional_loss(
            z1,
            z2,
            strata,
            temperature=self.temperature,
            negatives=self.negatives,
            reduction=self.reduction,
            backend=self.backend,
            extra_negative_logits=extra_negative_logits,
            gather_distributed=self.gather_distributed,
            precision=self.precision,
            more_views=more_views,
        )


def _check_negative_embeddings(
    name: str, embeddings: object, views_shape: tuple[int, ...]
) -> torch.Tensor:
    """Checks one view's (N, D) or (N, K, D) negative embeddings against its (N, D) views."""
    embeddings = check_floating(name, embeddings)
    n, d = views_shape
    shape = tuple(embeddings.shape)
    if embeddings.dim() not in (2, 3) or shape[0] != n or shape[-1] != d:
        raise ValueError(f"{name} must have shape ({n}, {d}) or ({n}, K, {d}), got {shape}")
    return embeddings


class NonSemanticContrastiveLoss(_ContrastiveLoss):
    """InfoNCE (or the interventional loss) with each anchor's non-semantic negatives added.

    Args:
        temperature: Softmax temperature, > 0.
        alpha: Scale of the non-semantic negatives' similarities (2 in the paper).
        negatives: The in-batch negatives: ``"cross_view"`` or ``"all"`` (NT-Xent).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        gather_distributed: Gather the in-batch negatives from every rank (see
            :func:`msr_loss.info_nce`); each anchor keeps only its own non-semantic negatives.
        precision: The similarity GEMMs' precision: ``"auto"``, ``"fp32"``, ``"tf32"`` or
            ``"bf16"`` (see :func:`msr_loss.interventional_loss`).

    Examples:
        >>> criterion = NonSemanticContrastiveLoss(temperature=0.2, negatives="all")
        >>> z1, z2, t1, t2 = (torch.randn(8, 16) for _ in range(4))
        >>> loss = criterion(z1, z2, t1, t2)
    """

    def __init__(
        self,
        *,
        temperature: float,
        alpha: float = 2.0,
        negatives: NegativeSet = "cross_view",
        reduction: Reduction = "mean",
        backend: Backend = "auto",
        gather_distributed: bool = False,
        precision: Precision = "auto",
    ) -> None:
        super().__init__(temperature, negatives, reduction, backend, gather_distributed, precision)
        self.alpha = check_real("alpha", alpha, above=0)

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        t1: torch.Tensor,
        t2: torch.Tensor,
        strata: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of ``(z1, z2)`` with ``t1`` and ``t2`` as the views' own extra negatives.

        Args:
            z1: (N, D) projections of view 1.
            z2: (N, D) projections of view 2.
            t1: (N, D) or (N, K, D) negative embeddings: the encoded non-semantic negatives of
                view 1's images.
            t2: The same for view 2.
            strata: If given, (n, D) strata: the interventional loss instead of InfoNCE.
        """
        z1, z2 = check_views(z1, z2)
        shape = tuple(z1.shape)
        t1 = _check_negative_embeddings("t1", t1, shape)
        t2 = _check_negative_embeddings("t2", t2, shape)
        if t1.shape != t2.shape:
            raise ValueError(
                f"t1 and t2 must have the same shape, got {tuple(t1.shape)} and {tuple(t2.shape)}"
            )
        extra = non_semantic_logits(
            torch.cat([z1, z2]),
            torch.cat([t1, t2]),
            temperature=self.temperature,
            alpha=self.alpha,
            precision=self.precision,
        )
        if strata is None:
            return info_nce(
                z1,
                z2,
                temperature=self.temperature,
                negatives=self.negatives,
                reduction=self.reduction,
                backend=self.backend,
                extra_negative_logits=extra,
                gather_distributed=self.gather_distributed,
                precision=self.precision,
            )
        return interventional_loss(
            z1,
            z2,
            strata,
            temperature=self.temperature,
            negatives=self.negatives,
            reduction=self.reduction,
            backend=self.backend,
            extra_negative_logits=extra,
            gather_distributed=self.gather_distributed,
            precision=self.precision,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"
