"""The losses for V > 2 views of each image (multi-crop): each view an anchor, the others positives.

For anchor view ``j`` of image ``i`` and each other view ``p`` of the same image as the positive,
the two-view term is taken with the negatives that
:func:`~msr_loss.similarity.views.multiview_negative_logsumexp` gives the pair; an anchor's value
is the mean over its V - 1 positives. The public entry points are
:func:`msr_loss.interventional_loss`, :func:`msr_loss.info_nce` and :func:`msr_loss.nt_xent` with
``more_views``; for V = 2 they do not come here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from msr_loss._validation import check_finite, check_floating, check_views
from msr_loss.similarity.precision import GemmPrecision
from msr_loss.similarity.views import multiview_negative_logsumexp


def check_all_views(z1: object, z2: object, more_views: Sequence[object]) -> list[torch.Tensor]:
    """``[z1, z2, *more_views]`` checked: floating (N, D) tensors of one shape and device.

    ``more_views`` must be a sequence of tensors; a single tensor is refused.
    """
    if isinstance(more_views, torch.Tensor):
        raise TypeError(
            "more_views must be a sequence of (N, D) tensors, got a tensor; pass list(tensor)"
        )
    z1, z2 = check_views(z1, z2)
    views = [z1, z2]
    for index, view in enumerate(more_views):
        name = f"more_views[{index}]"
        view = check_floating(name, view)
        if view.shape != z1.shape:
            raise ValueError(
                f"{name} must have the shape of z1, {tuple(z1.shape)}, got {tuple(view.shape)}"
            )
        if view.device != z1.device:
            raise ValueError(f"{name} is on {view.device}, z1 on {z1.device}")
        check_finite(name, view)
        views.append(view)
    return views


def _negatives(
    unit: Sequence[torch.Tensor],
    temperature: float,
    negatives: str,
    backend: str,
    extra_logits: torch.Tensor | None,
    gather_distributed: bool,
    precision: GemmPrecision,
) -> torch.Tensor:
    """(V, V - 1, N) negatives' log-sum-exp, with the checked ``extra_logits`` (V N, K) joined."""
    lse = multiview_negative_logsumexp(
        unit, temperature, negatives, backend, gather_distributed, precision
    )
    if extra_logits is None:
        return lse
    num_views, num_images = len(unit), unit[0].shape[0]
    extra_lse = torch.logsumexp(extra_logits.to(lse.dtype), dim=1)
    return torch.logaddexp(lse, extra_lse.view(num_views, 1, num_images))


def _other_views(num_views: int) -> list[list[int]]:
    return [[p for p in range(num_views) if p != j] for j in range(num_views)]


def _per_anchor(log_p: torch.Tensor) -> torch.Tensor:
    """(V N,) loss per anchor, view 1 first: ``-log P`` averaged over the anchor's positives."""
    return -log_p.mean(dim=1).reshape(-1)


def multiview_interventional(
    unit: Sequence[torch.Tensor],
    strata: torch.Tensor,
    temperature: float,
    negatives: str,
    backend: str,
    extra_logits: torch.Tensor | None,
    gather_distributed: bool,
    precision: GemmPrecision,
) -> torch.Tensor:
    """(V N,) interventional loss per anchor of unit-norm views and (n, D) ``strata``.

    The views, the strata and ``extra_logits`` (V N, K) come checked, in the compute dtype;
    ``precision`` is the resolved precision of the negatives' GEMMs.
    """
    tiny = torch.finfo(strata.dtype).tiny
    squared = strata * strata
    norms = [torch.sqrt(((view * view) @ squared.T).clamp_min(tiny)) for view in unit]
    dots = {
        (j, p): (unit[j] * unit[p]) @ strata.T
        for j in range(len(unit))
        for p in range(j + 1, len(unit))
    }
    positive = torch.stack(
        [
            torch.stack([dots[min(j, p), max(j, p)] / norms[p] for p in others])
            for j, others in enumerate(_other_views(len(unit)))
        ]
    )
    positive = positive / temperature
    lse = _negatives(
        unit, temperature, negatives, backend, extra_logits, gather_distributed, precision
    )
    per_stratum = F.logsigmoid(positive - lse[..., None])
    log_p = torch.logsumexp(per_stratum, dim=-1) - math.log(strata.shape[0])
    return _per_anchor(log_p)


def multiview_info_nce(
    unit: Sequence[torch.Tensor],
    temperature: float,
    negatives: str,
    backend: str,
    extra_logits: torch.Tensor | None,
    gather_distributed: bool,
    precision: GemmPrecision,
) -> torch.Tensor:
    """(V N,) InfoNCE loss per anchor of unit-norm views (as :func:`multiview_interventional`)."""
    positive = torch.stack(
        [
            torch.stack([(unit[j] * unit[p]).sum(dim=1) for p in others])
            for j, others in enumerate(_other_views(len(unit)))
        ]
    )
    positive = positive / temperature
    lse = _negatives(
        unit, temperature, negatives, backend, extra_logits, gather_distributed, precision
    )
    return _per_anchor(F.logsigmoid(positive - lse))
