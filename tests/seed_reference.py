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


def seed_multiview_interventional_loss(
    views: list[torch.Tensor],
    strata: torch.Tensor,
    temperature: float,
    negatives: str,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """Issue 12's V-view form, term by term, as a (V N,) tensor per anchor, view 1 first.

    Anchor view j of image i, each other view p of image i the positive in turn (the SPEC 1 term
    per pair, averaged over the V - 1 pairs); negatives: the other images' views in view p
    ("cross_view") or in every view ("all"), plus exp(extra[row]) for the anchor's row.
    """
    num_views, batch, num_strata = len(views), views[0].shape[0], strata.shape[0]
    per_anchor = []
    for j in range(num_views):
        for i in range(batch):
            anchor, pair_terms = views[j][i], []
            for p in range(num_views):
                if p == j:
                    continue
                neg = torch.zeros((), dtype=anchor.dtype)
                if extra is not None:
                    neg = neg + torch.exp(extra[j * batch + i]).sum()
                for k in range(batch):
                    for view in range(num_views):
                        if k != i and (negatives == "all" or view == p):
                            neg = neg + torch.exp(cosine(anchor, views[view][k]) / temperature)
                prob = torch.zeros((), dtype=anchor.dtype)
                for t in range(num_strata):
                    pos = torch.exp(cosine(anchor, strata[t] * views[p][i]) / temperature)
                    prob = prob + pos / (pos + neg) / num_strata
                pair_terms.append(-torch.log(prob))
            per_anchor.append(torch.stack(pair_terms).mean())
    return torch.stack(per_anchor)
