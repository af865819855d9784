"""The hot spot of every loss: the log-sum-exp over each anchor's negatives, and its backends."""

from __future__ import annotations

import torch

from msr_loss.similarity.reference import chunked_negative_logsumexp

BACKENDS = ("auto", "torch", "triton")


def negative_logsumexp(
    zhat: torch.Tensor,
    batch_size: int,
    temperature: float,
    negatives: str,
    backend: str = "auto",
) -> torch.Tensor:
    """Log-sum-exp of ``zhat_r . zhat_k / temperature`` over the negatives ``k`` of each row ``r``.

    Args:
        zhat: (2N, D) unit-norm projections, view 1 stacked over view 2.
        batch_size: N, the number of images.
        temperature: The softmax temperature, > 0.
        negatives: ``"cross_view"`` (the other view of the other images) or ``"all"``.
        backend: ``"torch"``, ``"triton"`` or ``"auto"`` (Triton for CUDA tensors when installed).

    Returns:
        A (2N,) tensor in the dtype of ``zhat``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        raise ValueError("backend='triton' is not available in this build")
    return chunked_negative_logsumexp(zhat, batch_size, 1.0 / temperature, negatives)


__all__ = ["BACKENDS", "negative_logsumexp"]
