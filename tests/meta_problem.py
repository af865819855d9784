"""The small float64 problem the meta-engine tests share: an encoder, strata, two losses."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from msr_loss import MetaSemanticRegularizer, info_nce, nt_xent

TAU = 0.5

Loss = Callable[[Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


def meta_losses(
    msr: MetaSemanticRegularizer,
    x1: torch.Tensor,
    x2: torch.Tensor,
    *,
    regularised_meta: bool = False,
) -> tuple[Loss, Loss]:
    """(train loss NT-Xent + ICL-MSR, meta loss InfoNCE, plus ICL-MSR if ``regularised_meta``)."""

    def train_loss(f):
        z1, z2 = f(x1), f(x2)
        return nt_xent(z1, z2, temperature=TAU) + msr(z1, z2)

    def meta_loss(f):
        z1, z2 = f(x1), f(x2)
        loss = info_nce(z1, z2, temperature=TAU)
        return loss + msr(z1, z2) if regularised_meta else loss

    return train_loss, meta_loss


def make_problem(
    seed: int = 0, *, regularised_meta: bool = False
) -> tuple[nn.Module, MetaSemanticRegularizer, Loss, Loss]:
    """(encoder, regulariser, :func:`meta_losses`) on 6 fixed pairs."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    msr = MetaSemanticRegularizer(4, 3, temperature=TAU, weight=2.0).double()
    x1, x2 = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    return encoder, msr, *meta_losses(msr, x1, x2, regularised_meta=regularised_meta)
