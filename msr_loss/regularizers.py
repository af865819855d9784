"""nn.Modules that own learnable parameters of the regularisers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from msr_loss._validation import (
    check_choice,
    check_flag,
    check_integer,
    check_real,
    check_temperature,
)
from msr_loss.functional import interventional_loss
from msr_loss.types import BACKENDS, NEGATIVE_SETS, PRECISIONS, Backend, NegativeSet, Precision


class MetaSemanticRegularizer(nn.Module):
    """ICL-MSR's meta semantic regulariser: n learnable strata and the interventional loss.

    Each stratum is a soft mask ``a_t = sigmoid(w_t)`` in (0, 1)^D with ``w_t`` drawn from
    N(0, init_std^2), so the strata start apart. ``forward`` returns ``weight * L_ICL``; the strata
    are meant to be learned by :class:`msr_loss.MetaUpdate`, not by the encoder's optimizer.

    Args:
        dim: Projection dimension D.
        num_strata: Number of strata n.
        temperature: Softmax temperature, > 0.
        weight: The factor beta on the loss.
        negatives: ``"cross_view"`` (default, the paper's) or ``"all"``.
        init_std: Standard deviation of the initial ``w``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        gather_distributed: Take the negatives from every rank of the initialised process group
            (see :func:`msr_loss.interventional_loss`); the strata must be the same on every rank,
            which :class:`msr_loss.MetaUpdate` keeps true.
        precision: The similarity GEMMs' precision, ``"auto"``, ``"fp32"``, ``"tf32"`` or
            ``"bf16"`` (see :func:`msr_loss.interventional_loss`).

    Examples:
        >>> msr = MetaSemanticRegularizer(dim=128, num_strata=16, temperature=0.2)
        >>> z1, z2 = torch.randn(32, 128), torch.randn(32, 128)
        >>> loss = msr(z1, z2)
        >>> msr.strata.shape
        torch.Size([16, 128])
    """

    def __init__(
        self,
        dim: int,
        num_strata: int,
        *,
        temperature: float,
        weight: float = 1.0,
        negatives: NegativeSet = "cross_view",
        init_std: float = 1.0,
        backend: Backend = "auto",
        gather_distributed: bool = False,
        precision: Precision = "auto",
    ) -> None:
        super().__init__()
        dim = check_integer("dim", dim, at_least=1)
        num_strata = check_integer("num_strata", num_strata, at_least=1)
        init_std = check_real("init_std", init_std, at_least=0)
        self.temperature = check_temperature(temperature)
        self.negatives = check_choice("negatives", negatives, NEGATIVE_SETS)
        self.weight = check_real("weight", weight)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)
        self.precision = check_choice("precision", precision, PRECISIONS)
        self.logits = nn.Parameter(torch.randn(num_strata, dim) * init_std)

    @property
    def strata(self) -> torch.Tensor:
        """The (n, D) stratum vectors ``a_t = sigmoid(w_t)``."""
        return torch.sigmoid(self.logits)

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        extra_negative_logits: torch.Tensor | None = None,
        *,
        more_views: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        """Returns ``weight * interventional_loss(z1, z2, strata, more_views=more_views)``.

        ``extra_negative_logits`` ((V N, K), e.g. from :func:`msr_loss.non_semantic_logits`)
        join every anchor's negatives; ``more_views`` are further (N, D) views of the same
        images (multi-crop, see :func:`msr_loss.interventional_loss`).
        """
        loss = interventional_loss(
            z1,
            z2,
            self.strata,
            temperature=self.temperature,
            negatives=self.negatives,
            backend=self.backend,
            gather_distributed=self.gather_distributed,
            extra_negative_logits=extra_negative_logits,
            precision=self.precision,
            more_views=more_views,
        )
        return self.weight * loss

    def extra_repr(self) -> str:
        num_strata, dim = self.logits.shape
        return (
            f"dim={dim}, num_strata={num_strata}, temperature={self.temperature}, "
            f"weight={self.weight}, negatives={self.negatives!r}, precision={self.precision!r}"
        )
