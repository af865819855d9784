"""The losses as pure functions.

The interventional (ICL-MSR) loss, InfoNCE and NT-Xent; the non-semantic negatives' logits that
join them; and the Barlow Twins loss that MetaMask trains with. :mod:`msr_loss.losses` wraps them
as modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from msr_loss._validation import (
    check_finite,
    check_flag,
    check_floating,
    check_loss_choices,
    check_real,
    check_strata,
    check_temperature,
    check_views,
    compute_dtype,
    without_autocast,
)
from msr_loss.multiview import (
    check_all_views,
    multiview_info_nce,
    multiview_interventional,
)
from msr_loss.rows import scale_rows, unit_rows
from msr_loss.similarity import negative_logsumexp
from msr_loss.similarity.gathered import gathered_negative_logsumexp
from msr_loss.similarity.precision import GemmPrecision, gemm_operand, resolve_precision
from msr_loss.types import Backend, NegativeSet, Precision, Reduction


def _reduce(per_anchor: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return per_anchor.mean()
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor


def _unit_views(
    z1: torch.Tensor, z2: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unit rows of each view and the (2N, D) anchors, view 1 stacked over view 2.

    The positive of anchor ``r`` is anchor ``(r + N) mod 2N``. The positives' terms take the
    views themselves, so autograd never scatters a slice of the anchors into a (2N, D) zero tensor.
    """
    unit1, unit2 = unit_rows(z1, dtype), unit_rows(z2, dtype)
    return unit1, unit2, torch.cat([unit1, unit2])


def _check_extra_logits(
    extra_logits: torch.Tensor | None, rows: int, device: torch.device
) -> torch.Tensor | None:
    if extra_logits is None:
        return None
    if isinstance(extra_logits, torch.Tensor) and extra_logits.device != device:
        raise ValueError(
            f"extra_negative_logits is on {extra_logits.device} but the views are on {device}"
        )
    extra = check_floating("extra_negative_logits", extra_logits)
    if extra.dim() != 2 or extra.shape[0] != rows:
        raise ValueError(
            f"extra_negative_logits must have shape ({rows}, K), got {tuple(extra.shape)}"
        )
    check_finite("extra_negative_logits", extra)
    return extra


def _negatives_lse(
    anchors: torch.Tensor,
    num_images: int,
    temperature: float,
    negatives: NegativeSet,
    backend: Backend,
    extra_logits: torch.Tensor | None,
    gather_distributed: bool,
    precision: GemmPrecision,
) -> torch.Tensor:
    lse_fn = gathered_negative_logsumexp if gather_distributed else negative_logsumexp
    lse = lse_fn(anchors, num_images, temperature, negatives, backend, precision)
    if extra_logits is None:
        return lse
    return torch.logaddexp(lse, torch.logsumexp(extra_logits.to(anchors.dtype), dim=1))


def stratified_positive_logits(
    unit1: torch.Tensor, unit2: torch.Tensor, strata: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``sim(anchor, a_t * positive) / temperature`` for every anchor and stratum, shape (2N, n).

    ``unit1`` and ``unit2`` are the (N, D) unit rows of the two views; the anchors are view 1's
    rows, then view 2's. Both anchors of an image share ``sum_d u1_d u2_d a_td``: one
    (N x D)(D x n) product gives every dot, two more every ``||a_t * positive||``.
    """
    dots = (unit1 * unit2) @ strata.T
    squared = strata * strata
    tiny = torch.finfo(unit1.dtype).tiny

    def norms(unit: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(((unit * unit) @ squared.T).clamp_min(tiny))

    return torch.cat([dots / norms(unit2), dots / norms(unit1)]) / temperature


@without_autocast
def interventional_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    strata: torch.Tensor,
    *,
    temperature: float,
    negatives: NegativeSet = "cross_view",
    reduction: Reduction = "mean",
    backend: Backend = "auto",
    extra_negative_logits: torch.Tensor | None = None,
    gather_distributed: bool = False,
    precision: Precision = "auto",
    more_views: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """The ICL-MSR interventional contrastive loss (backdoor adjustment over n strata).

    For anchor ``Z_i^j`` with positive ``Z_i^{3-j}``, ``s_t = sim(Z_i^j, a_t * Z_i^{3-j}) / tau``
    and ``P = (1/n) sum_t exp(s_t) / (exp(s_t) + neg)``, with ``neg`` the summed exponentiated
    logits of the negatives. The loss is ``-log P`` averaged over both views of every image,
    computed in the log domain, in float32 for half-precision inputs.

    With ``more_views`` (multi-crop: V = 2 + len(more_views) views of each image) every view is
    an anchor and each other view of its image a positive in turn; the term above is taken for
    every (anchor, positive) pair, with the negatives of the other images in the positive's view
    (``"cross_view"``) or in every view (``"all"``), and averaged over the anchor's V - 1 pairs.
    The negatives are composed from two-view blocks (:mod:`msr_loss.similarity.views`), so memory
    stays O(V N D) plus one two-view block; for V = 2 this is exactly the loss without it.

    Args:
        z1: (N, D) projections of the first view.
        z2: (N, D) projections of the second view.
        strata: (n, D) stratum vectors ``a_t``; the positive of each anchor is modulated by each.
        temperature: Softmax temperature, > 0.
        negatives: ``"cross_view"`` (the paper's N-1 negatives from the other view) or ``"all"``
            (the 2N-2 views of the other images, as in NT-Xent).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (a (V N,) tensor, one value per anchor,
            the mean over its positives: view 1's N anchors first, then view 2's, then
            ``more_views`` in order).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the negatives' similarity.
        extra_negative_logits: Optional (V N, K) logits of further negatives per anchor (rows in
            the order of ``reduction="none"``), already divided by the temperature; they join
            every anchor's negatives, for each of its positives (see :mod:`msr_loss.negatives`).
        gather_distributed: Take the negatives from the views of every rank of the initialised
            process group, with gradients (see :mod:`msr_loss.distributed`); the anchors, the
            reduction and ``extra_negative_logits`` stay this rank's. Every rank needs the same N
            and the same number of views.
        precision: ``"auto"``, ``"fp32"``, ``"tf32"`` or ``"bf16"``: the operands' precision in the
            similarity GEMMs, accumulated in float32 (see the README's performance section);
            ``"auto"`` is ``"bf16"`` for half-precision inputs or under autocast and otherwise
            follows ``torch.get_float32_matmul_precision()``.
        more_views: Further (N, D) views of the same N images (e.g. small crops), each of the
            shape of ``z1``; empty by default.

    Returns:
        The loss, in float64 if any tensor input is float64 and float32 otherwise.

    Examples:
        >>> z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
        >>> strata = torch.rand(4, 16)
        >>> loss = interventional_loss(z1, z2, strata, temperature=0.2)
    """
    temperature = check_temperature(temperature)
    check_loss_choices(negatives, reduction, backend)
    gather_distributed = check_flag("gather_distributed", gather_distributed)
    views = check_all_views(z1, z2, more_views)
    strata = check_strata(strata, z1.shape[1], z1.device)
    gemm = resolve_precision(precision, z1.dtype)
    extra = _check_extra_logits(extra_negative_logits, len(views) * z1.shape[0], z1.device)
    dtype = compute_dtype(*[t.dtype for t in (*views, strata, extra) if t is not None])
    if len(views) > 2:
        per_anchor = multiview_interventional(
            [unit_rows(view, dtype) for view in views],
            scale_rows(strata.to(dtype)),
            temperature,
            negatives,
            backend,
            extra,
            gather_distributed,
            gemm,
        )
        return _reduce(per_anchor, reduction)
    unit1, unit2, anchors = _unit_views(z1, z2, dtype)
    positive_logits = stratified_positive_logits(
        unit1, unit2, scale_rows(strata.to(dtype)), temperature
    )
    lse = _negatives_lse(
        anchors, z1.shape[0], temperature, negatives, backend, extra, gather_distributed, gemm
    )
    per_stratum = F.logsigmoid(positive_logits - lse[:, None])
    log_p = torch.logsumexp(per_stratum, dim=1) - math.log(strata.shape[0])
    return _reduce(-log_p, reduction)


@without_autocast
def info_nce(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    temperature: float,
    negatives: NegativeSet = "cross_view",
    reduction: Reduction = "mean",
    backend: Backend = "auto",
    extra_negative_logits: torch.Tensor | None = None,
    gather_distributed: bool = False,
    precision: Precision = "auto",
    more_views: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """Symmetric InfoNCE: each view is an anchor, the other view of its image the positive.

    With ``more_views`` each other view of the image is a positive in turn, as in
    :func:`interventional_loss`.

    Args:
        z1: (N, D) projections of the first view.
        z2: (N, D) projections of the second view.
        temperature: Softmax temperature, > 0.
        negatives: ``"cross_view"`` or ``"all"`` (then this is NT-Xent).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (a (V N,) tensor, as in
            :func:`interventional_loss`).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        extra_negative_logits: Optional (V N, K) logits of further negatives per anchor, already
            divided by the temperature.
        gather_distributed: Take the negatives from every rank (see :func:`interventional_loss`).
        precision: The similarity GEMMs' precision (see :func:`interventional_loss`).
        more_views: Further (N, D) views of the same images (see :func:`interventional_loss`).

    Returns:
        The loss, in float64 if any tensor input is float64 and float32 otherwise.

    Examples:
        >>> loss = info_nce(torch.randn(8, 16), torch.randn(8, 16), temperature=0.1)
    """
    temperature = check_temperature(temperature)
    check_loss_choices(negatives, reduction, backend)
    gather_distributed = check_flag("gather_distributed", gather_distributed)
    views = check_all_views(z1, z2, more_views)
    gemm = resolve_precision(precision, z1.dtype)
    extra = _check_extra_logits(extra_negative_logits, len(views) * z1.shape[0], z1.device)
    dtype = compute_dtype(*[t.dtype for t in (*views, extra) if t is not None])
    if len(views) > 2:
        per_anchor = multiview_info_nce(
            [unit_rows(view, dtype) for view in views],
            temperature,
            negatives,
            backend,
            extra,
            gather_distributed,
            gemm,
        )
        return _reduce(per_anchor, reduction)
    unit1, unit2, anchors = _unit_views(z1, z2, dtype)
    dots = (unit1 * unit2).sum(dim=1)
    positive_logits = torch.cat([dots, dots]) / temperature
    lse = _negatives_lse(
        anchors, z1.shape[0], temperature, negatives, backend, extra, gather_distributed, gemm
    )
    log_p = F.logsigmoid(positive_logits - lse)
    return _reduce(-log_p, reduction)


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    temperature: float,
    reduction: Reduction = "mean",
    backend: Backend = "auto",
    gather_distributed: bool = False,
    precision: Precision = "auto",
    more_views: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """NT-Xent (SimCLR): InfoNCE with the 2N-2 views of the other images as negatives.

    With ``more_views`` (V views), the (V - 1) N views of the other images.

    Args:
        z1: (N, D) projections of the first view.
        z2: (N, D) projections of the second view.
        temperature: Softmax temperature, > 0.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        gather_distributed: Take the negatives from every rank (see :func:`interventional_loss`).
        precision: The similarity GEMMs' precision (see :func:`interventional_loss`).
        more_views: Further (N, D) views of the same images (see :func:`interventional_loss`).

    Returns:
        The loss, in float64 if any tensor input is float64 and float32 otherwise.

    Examples:
        >>> loss = nt_xent(torch.randn(8, 16), torch.randn(8, 16), temperature=0.5)
    """
    return info_nce(
        z1,
        z2,
        temperature=temperature,
        negatives="all",
        reduction=reduction,
        backend=backend,
        gather_distributed=gather_distributed,
        precision=precision,
        more_views=more_views,
    )


@without_autocast
def non_semantic_logits(
    queries: torch.Tensor,
    negative_embeddings: torch.Tensor,
    *,
    temperature: float,
    alpha: float = 2.0,
    precision: Precision = "auto",
) -> torch.Tensor:
    """``alpha * cos(q_i, t_ik) / temperature``: each query against its own negatives only.

    The result is what ``extra_negative_logits`` of :func:`msr_loss.info_nce` and
    :func:`msr_loss.interventional_loss` expect when ``queries`` is ``cat([z1, z2])``.

    Args:
        queries: (M, D) query projections (for the symmetric losses, view 1 rows then view 2).
        negative_embeddings: (M, D) or (M, K, D) projections of each query's
            non-semantic negatives.
        temperature: The temperature of the loss they join, > 0.
        alpha: The scale on the similarity (2 in the paper, 3 also reported), > 0.
        precision: The products' operand precision (see :func:`interventional_loss`).

    Returns:
        (M, K) logits (K = 1 for (M, D) ``negative_embeddings``), in float64 if either input
        is float64, else float32.

    Examples:
        >>> z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
        >>> t1, t2 = torch.randn(8, 16), torch.randn(8, 16)
        >>> extra = non_semantic_logits(torch.cat([z1, z2]), torch.cat([t1, t2]), temperature=0.2)
        >>> loss = info_nce(z1, z2, temperature=0.2, extra_negative_logits=extra)
    """
    temperature = check_temperature(temperature)
    alpha = check_real("alpha", alpha, above=0)
    queries = check_floating("queries", queries)
    gemm = resolve_precision(precision, queries.dtype)
    embeddings = check_floating("negative_embeddings", negative_embeddings)
    if queries.dim() != 2:
        raise ValueError(f"queries must have shape (M, D), got {tuple(queries.shape)}")
    grouped = embeddings.unsqueeze(1) if embeddings.dim() == 2 else embeddings
    if grouped.dim() != 3 or grouped.shape[0] != queries.shape[0]:
        raise ValueError(
            f"negative_embeddings must have shape ({queries.shape[0]}, D) or "
            f"({queries.shape[0]}, K, D), got {tuple(embeddings.shape)}"
        )
    if grouped.shape[2] != queries.shape[1]:
        raise ValueError(
            f"negative_embeddings have dimension {grouped.shape[2]} but the queries have "
            f"dimension {queries.shape[1]}"
        )
    if grouped.device != queries.device:
        raise ValueError(
            f"queries are on {queries.device} but negative_embeddings on {grouped.device}"
        )
    check_finite("queries", queries)
    check_finite("negative_embeddings", embeddings)
    dtype = compute_dtype(queries.dtype, embeddings.dtype)
    q = gemm_operand(unit_rows(queries, dtype), gemm)
    t = gemm_operand(unit_rows(grouped, dtype), gemm)
    return alpha * torch.einsum("md,mkd->mk", q, t) / temperature


@without_autocast
def barlow_twins(
    z1: torch.Tensor, z2: torch.Tensor, *, off_diagonal_weight: float = 5e-3
) -> torch.Tensor:
    """The Barlow Twins redundancy-reduction loss.

    Each dimension is standardised over the batch (unbiased standard deviation, as in MetaMask's
    released code), ``C = z1^T z2 / N`` and the loss is
    ``sum_i (1 - C_ii)^2 + off_diagonal_weight * sum_{i != j} C_ij^2``.

    The loss is invariant to the scale of each dimension: a dimension is divided by its largest
    absolute value before it is standardised, so neither huge nor tiny values overflow or count
    as constant. It stops where the compute dtype does: a dimension whose standard deviation is
    below ``finfo(dtype).eps`` (1.19e-7 in float32) times its largest absolute value is floored
    there, as a constant.

    Args:
        z1: (N, D) projections of the first view, N >= 2.
        z2: (N, D) projections of the second view.
        off_diagonal_weight: The weight lambda of the redundancy term, >= 0.

    Returns:
        A scalar, in float64 if either input is float64 and float32 otherwise.

    Examples:
        >>> loss = barlow_twins(torch.randn(16, 32), torch.randn(16, 32))
    """
    off_diagonal_weight = check_real("off_diagonal_weight", off_diagonal_weight, at_least=0)
    z1, z2 = check_views(z1, z2)
    dtype = compute_dtype(z1.dtype, z2.dtype)
    eps = torch.finfo(dtype).eps

    def standardise(z: torch.Tensor) -> torch.Tensor:
        z = scale_rows(z.to(dtype), dim=0)
        return (z - z.mean(dim=0)) / z.std(dim=0).clamp_min(eps)

    c = standardise(z1).T @ standardise(z2) / z1.shape[0]
    diagonal = torch.diagonal(c)
    on = (1 - diagonal).pow(2).sum()
    off = c.pow(2).sum() - diagonal.pow(2).sum()
    return on + off_diagonal_weight * off
