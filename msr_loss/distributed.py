"""Collectives with gradients: gathering negatives across ranks and averaging meta-gradients.

Gradient convention of :func:`gather` (the one lightly and solo-learn use): the backward sums, over
ranks, the gradients with respect to the gathered tensor and returns this rank's slice, so each
rank receives the gradient of the *sum* of every rank's loss. With losses that are per-rank means
over equal local batches, ``DistributedDataParallel``'s gradient averaging then yields exactly the
single-process gradient of the mean loss over the global batch.

Without an initialised process group (or with one rank) every function here is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def world_size() -> int:
    """The number of ranks of the default process group, 1 when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in the default process group, 0 when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def check_same_shape(name: str, tensor: torch.Tensor) -> None:
    """Raises ValueError on every rank when ``tensor``'s shape differs between ranks."""
    if world_size() == 1 or torch.compiler.is_compiling():
        return
    shape = torch.tensor(tensor.shape, dtype=torch.int64, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)
    found = [tuple(s.tolist()) for s in shapes]
    if any(s != found[0] for s in found):
        raise ValueError(
            f"{name} must have the same shape on every rank to be gathered, got {found} "
            "(rank 0 first); use equal per-rank batch sizes (e.g. drop_last=True)"
        )


class _Gather(torch.autograd.Function):
    """All-gather along dim 0; its backward is :class:`_SumSlice`, so it is twice differentiable."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        pieces = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(pieces, tensor)
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = _SumSlice.apply(grad)
        return result


class _SumSlice(torch.autograd.Function):
    """Sums a gathered tensor over ranks and keeps this rank's rows: the adjoint of the gather."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, gathered: torch.Tensor) -> torch.Tensor:
        total = gathered.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        rows = total.shape[0] // world_size()
        return total[rank() * rows : (rank() + 1) * rows].clone()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = _Gather.apply(grad)
        return result


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates ``tensor`` from every rank along dim 0 (rank 0 first), with gradients.

    The gradient of the result flows back to every rank's input: each rank receives the gradient
    of the sum of all ranks' objectives with respect to its own rows (see the module docstring).
    All ranks must pass tensors of the same shape; a mismatch raises ValueError on every rank.

    Args:
        tensor: (n, ...) the local rows.

    Returns:
        (world_size * n, ...) the rows of every rank; ``tensor`` itself without distribution.

    Examples:
        >>> local = torch.randn(4, 8, requires_grad=True)
        >>> gather(local).shape  # one process: the identity
        torch.Size([4, 8])
    """
    if world_size() == 1:
        return tensor
    check_same_shape("the gathered tensor", tensor)
    result: torch.Tensor = _Gather.apply(tensor)
    return result


class _AllReduceMean(torch.autograd.Function):
    """The mean over ranks; self-adjoint, so its backward is itself."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total / world_size()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = _AllReduceMean.apply(grad)
        return result


def all_reduce_mean(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The element-wise mean of each tensor over ranks, differentiable (to any order).

    The tensors travel in one flat buffer, so a list of parameter gradients costs one all-reduce.
    All ranks must pass tensors of the same shapes, in the same order.

    Args:
        tensors: The local tensors, e.g. the gradients of a replicated set of parameters.

    Returns:
        The averaged tensors, in the input order, dtypes and shapes; the inputs themselves
        without distribution.

    Examples:
        >>> grads = [torch.ones(2, 3), torch.zeros(4)]
        >>> [g.shape for g in all_reduce_mean(grads)]  # one process: the identity
        [torch.Size([2, 3]), torch.Size([4])]
    """
    if world_size() == 1 or not tensors:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    mean: torch.Tensor = _AllReduceMean.apply(flat)
    pieces = mean.split([t.numel() for t in tensors])
    return [p.view(t.shape).to(t.dtype) for p, t in zip(pieces, tensors, strict=True)]


def broadcast_from_rank0(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrites each tensor, in place, with rank 0's value (e.g. freshly initialised strata).

    Args:
        tensors: Tensors of the same shapes on every rank, in the same order.

    Examples:
        >>> strata = torch.randn(4, 8)
        >>> broadcast_from_rank0([strata])  # one process: nothing to do
    """
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)
