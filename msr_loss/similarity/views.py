"""The negatives' log-sum-exp for V >= 2 views of each image, built from two-view blocks.

With unit-norm views ``zhat_1..zhat_V`` (each (N, D)), ``B[j][l][i]`` is the log-sum-exp of
``zhat_j[i] . zhat_l[k] / tau`` over the other images ``k != i`` in view ``l``. For ``j != l`` both
``B[j][l]`` and ``B[l][j]`` are the ``"cross_view"`` log-sum-exp of the two-view stack
``[zhat_j; zhat_l]``, and ``B[j][j]`` is the first half of that of ``[zhat_j; zhat_j]``; each comes
from :func:`msr_loss.similarity.negative_logsumexp` (or its gathered form), so no backend ever
holds more than its two-view working set and nothing of size (VN) x (VN) is formed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from msr_loss.similarity import negative_logsumexp
from msr_loss.similarity.gathered import gathered_negative_logsumexp
from msr_loss.types import Precision


def _view_blocks(
    views: Sequence[torch.Tensor],
    temperature: float,
    within_view: bool,
    backend: str,
    gather_distributed: bool,
    precision: Precision,
) -> dict[tuple[int, int], torch.Tensor]:
    """``B[j][l]`` keyed ``(j, l)`` for every pair of distinct views, and ``j == l`` if asked."""
    lse_fn = gathered_negative_logsumexp if gather_distributed else negative_logsumexp
    num_images = views[0].shape[0]
    blocks = {}
    for j in range(len(views)):
        for other in range(j if within_view else j + 1, len(views)):
            stack = torch.cat([views[j], views[other]])
            lse = lse_fn(stack, num_images, temperature, "cross_view", backend, precision)
            blocks[other, j] = lse[num_images:]
            blocks[j, other] = lse[:num_images]
    return blocks


def multiview_negative_logsumexp(
    views: Sequence[torch.Tensor],
    temperature: float,
    negatives: str,
    backend: str = "auto",
    gather_distributed: bool = False,
    precision: Precision = "auto",
) -> torch.Tensor:
    """Log-sum-exp over the negatives of every (anchor view, positive view) pair of each image.

    The negatives of anchor ``zhat_j[i]`` paired with positive ``zhat_p[i]`` are the other
    images' views: with ``"cross_view"`` those in the positive's view ``p``; with ``"all"``
    those in every view (then they do not depend on ``p``).

    Args:
        views: V >= 2 unit-norm (N, D) projections, one per view.
        temperature: The softmax temperature, > 0.
        negatives: ``"cross_view"`` or ``"all"``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        gather_distributed: Take the negatives from every rank (see
            :func:`msr_loss.similarity.gathered.gathered_negative_logsumexp`).
        precision: The GEMMs' precision (see :func:`msr_loss.similarity.negative_logsumexp`).

    Returns:
        A (V, V - 1, N) tensor: entry ``[j, q, i]`` is for anchor view ``j`` and the ``q``-th of
        the other views in increasing order.

    Examples:
        >>> views = [torch.nn.functional.normalize(torch.randn(4, 8), dim=1) for _ in range(3)]
        >>> multiview_negative_logsumexp(views, 0.2, "cross_view", backend="torch").shape
        torch.Size([3, 2, 4])
    """
    num_views = len(views)
    within_view = negatives == "all"
    blocks = _view_blocks(views, temperature, within_view, backend, gather_distributed, precision)
    rows = []
    for j in range(num_views):
        others = [p for p in range(num_views) if p != j]
        if within_view:
            every_view = torch.logsumexp(torch.stack([blocks[j, k] for k in range(num_views)]), 0)
            rows.append(every_view.expand(num_views - 1, -1))
        else:
            rows.append(torch.stack([blocks[j, p] for p in others]))
    return torch.stack(rows)
