"""Misspelt choices that mypy must reject: ``make lint`` type-checks this file.

Each call carries a ``type: ignore[arg-type]``; with ``warn_unused_ignores`` mypy fails on an
ignore that suppresses nothing, so the file type-checks only while the ``Literal`` annotations
catch every typo. ``tests/test_losses.py`` calls each function to check the run-time error too.
"""

from __future__ import annotations

import torch

from msr_loss import (
    InfoNCELoss,
    InterventionalLoss,
    MetaMaskLoss,
    MetaSemanticRegularizer,
    NonSemanticContrastiveLoss,
    NTXentLoss,
    info_nce,
    interventional_loss,
    nt_xent,
)
from msr_loss.types import Backend, NegativeSet, Reduction

Z = torch.randn(4, 8)


def well_typed() -> list[torch.nn.Module]:
    backend: Backend = "torch"
    negatives: NegativeSet = "all"
    reduction: Reduction = "sum"
    return [
        NTXentLoss(0.5, backend=backend, reduction=reduction),
        InfoNCELoss(0.1, negatives=negatives),
        InterventionalLoss(0.2, negatives=negatives, reduction=reduction),
    ]


def ntxent_backend() -> None:
    NTXentLoss(0.5, backend="trition")  # type: ignore[arg-type]


def info_nce_loss_negatives() -> None:
    InfoNCELoss(0.1, negatives="cross-view")  # type: ignore[arg-type]


def interventional_loss_reduction() -> None:
    InterventionalLoss(0.2, reduction="avg")  # type: ignore[arg-type]


def non_semantic_backend() -> None:
    NonSemanticContrastiveLoss(temperature=0.2, backend="cuda")  # type: ignore[arg-type]


def regularizer_negatives() -> None:
    MetaSemanticRegularizer(8, 2, temperature=0.2, negatives="every")  # type: ignore[arg-type]


def metamask_backend() -> None:
    MetaMaskLoss(backend="gpu")  # type: ignore[arg-type]


def function_backend() -> None:
    nt_xent(Z, Z, temperature=0.5, backend="trition")  # type: ignore[arg-type]


def function_reduction() -> None:
    info_nce(Z, Z, temperature=0.5, reduction="average")  # type: ignore[arg-type]


def function_negatives() -> None:
    interventional_loss(Z, Z, Z, temperature=0.5, negatives="al")  # type: ignore[arg-type]


MISSPELT = [
    ntxent_backend,
    info_nce_loss_negatives,
    interventional_loss_reduction,
    non_semantic_backend,
    regularizer_negatives,
    metamask_backend,
    function_backend,
    function_reduction,
    function_negatives,
]
