"""The small float64 problem the meta-engine tests share: an encoder, strata, two losses."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from msr_loss import MetaSemanticRegularizer, info_nce, nt_xent

TAU = 0.5

Loss = Callable[[Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


def make_problem(seed: int = 0) -> tuple[nn.Module, MetaSemanticRegularizer, Loss, Loss]:
    """(encoder, regulariser, train loss NT-Xent + ICL-MSR, meta loss InfoNCE) on 6 fixed pairs."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    msr = MetaSemanticRegularizer(4, 3, temperature=TAU, weight=2.0).double()
    x1, x2 = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)

    def train_loss(f):
        z1, z2 = f(x1), f(x2)
        return nt_xent(z1, z2, temperature=TAU) + msr(z1, z2)

    def meta_loss(f):
        return info_nce(f(x1), f(x2), temperature=TAU)

    return encoder, msr, train_loss, meta_loss
