"""Plain loop implementations of the paper's formulas, written for clarity, not speed."""

from __future__ import annotations

import torch


def cosine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u @ v) / (u.norm() * v.norm())


def seed_interventional_loss(
    z1: torch.Tensor, z2: torch.Tensor, strata: torch.Tensor, temperature: float, negatives: str
) -> torch.Tensor:
    """SPEC 1 term by term: P_ij = sum_t (1/n) exp(s_ijt) / (exp(s_ijt) + neg_ij)."""
    views = {1: z1, 2: z2}
    batch, num_strata = z1.shape[0], strata.shape[0]
    terms = []
    for i in range(batch):
        for j in (1, 2):
            anchor, positive = views[j][i], views[3 - j][i]
            neg = torch.zeros((), dtype=z1.dtype)
            for k in range(batch):
                if k == i:
                    continue
                for view in (1, 2):
                    if negatives == "cross_view" and view == j:
                        continue
                    neg = neg + torch.exp(cosine(anchor, views[view][k]) / temperature)
            prob = torch.zeros((), dtype=z1.dtype)
            for t in range(num_strata):
                pos = torch.exp(cosine(anchor, strata[t] * positive) / temperature)
                prob = prob + pos / (pos + neg) / num_strata
            terms.append(-torch.log(prob))
    return torch.stack(terms).mean()
