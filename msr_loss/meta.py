"""The two-stage meta update shared by ICL-MSR's strata and MetaMask's mask.

Stage 1 is the user's own optimizer step on the encoder. Stage 2, here, takes one virtual SGD
step of the encoder on the training loss, ``theta' = theta - lr * grad L_train(theta, a)``, and
moves the meta parameters ``a`` down the gradient of ``L_meta(theta'(a))``: a second-order
gradient, computed exactly (double backward) or by the finite difference of DARTS.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from msr_loss._validation import check_choice, check_real
from msr_loss.distributed import all_reduce_mean, broadcast_from_rank0
from msr_loss.types import META_MODES

Forward = Callable[..., Any]
LossFn = Callable[[Forward], torch.Tensor]


@dataclass(frozen=True)
class VirtualSGD:
    """The hyper-parameters of one virtual SGD step, as ``torch.optim.SGD`` applies them.

    Args:
        lr: Learning rate of the virtual step.
        momentum: Momentum factor; the real optimizer's buffer is used when there is one.
        dampening: Dampening of the momentum.
        weight_decay: L2 penalty added to the gradient.
        nesterov: Nesterov momentum.

    Examples:
        >>> step = VirtualSGD(lr=0.1, momentum=0.9)
        >>> step.apply(torch.ones(2), torch.ones(2), None)
        tensor([0.9000, 0.9000])
    """

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        check_real("lr", self.lr, at_least=0)

    def apply(
        self, param: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor | None
    ) -> torch.Tensor:
        """``param`` after one SGD step with ``grad`` (differentiable); at lr 0, ``param``."""
        if self.lr == 0:
            return param
        direction = grad + self.weight_decay * param if self.weight_decay else grad
        if self.momentum:
            if buffer is None:
                momentum_term = direction
            else:
                momentum_term = self.momentum * buffer + (1 - self.dampening) * direction
            direction = (
                direction + self.momentum * momentum_term if self.nesterov else momentum_term
            )
        return param - self.lr * direction

    def gradient_scale(self, has_buffer: bool) -> float:
        """``-d(step)/d(grad)``: how much one unit of gradient moves the parameter."""
        if not self.momentum or not self.lr:
            return self.lr
        per_unit = (1 - self.dampening) if has_buffer else 1.0
        return self.lr * (1 + self.momentum * per_unit if self.nesterov else per_unit)


def virtual_steps_from_optimizer(
    optimizer: torch.optim.Optimizer,
) -> dict[int, tuple[VirtualSGD, torch.Tensor | None]]:
    """Per parameter (keyed by ``id``), the virtual step mirroring ``optimizer``'s current state.

    A ``torch.optim.SGD`` is mirrored with its momentum buffers and weight decay; for any other
    optimizer the virtual step is plain SGD at each group's current learning rate.
    """
    steps: dict[int, tuple[VirtualSGD, torch.Tensor | None]] = {}
    is_sgd = isinstance(optimizer, torch.optim.SGD)
    for group in optimizer.param_groups:
        if is_sgd:
            step = VirtualSGD(
                lr=float(group["lr"]),
                momentum=float(group["momentum"]),
                dampening=float(group["dampening"]),
                weight_decay=float(group["weight_decay"]),
                nesterov=bool(group["nesterov"]),
            )
        else:
            step = VirtualSGD(lr=float(group["lr"]))
        for param in group["params"]:
            buffer = optimizer.state.get(param, {}).get("momentum_buffer") if is_sgd else None
            steps[id(param)] = (step, buffer)
    return steps


@contextlib.contextmanager
def preserved_buffers(module: nn.Module) -> Iterator[None]:
    """Restores every buffer (e.g. BatchNorm running statistics) on exit."""
    saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class MetaUpdate:
    """Stage 2 of the two-stage update: the meta-gradient of the meta parameters, and their step.

    Call :meth:`step` after the encoder's own optimizer step. ``train_loss`` and ``meta_loss`` are
    functions of a ``forward`` callable that runs the encoder at given parameters; write them as you
    would write the loss with the encoder itself.

    Under an initialised ``torch.distributed`` process group the meta parameters start from rank
    0's values, and the virtual step's gradient, the finite-difference direction and the
    meta-gradient are averaged over ranks (as ``DistributedDataParallel`` averages the real step's),
    so every rank takes the single-process step on the global batch. Pass the unwrapped module
    (``ddp.module``) as ``encoder``.

    Args:
        encoder: The module trained in stage 1 (backbone and projector). Meta parameters may live
            inside it (MetaMask's mask) or outside (ICL-MSR's strata); they are held out of the
            virtual step either way.
        meta_parameters: The parameters learned by the meta objective.
        meta_optimizer: The optimizer of ``meta_parameters``.
        encoder_optimizer: The encoder's optimizer, mirrored by the virtual step (learning rate,
            and for SGD its momentum buffers and weight decay). Either this or ``lr``.
        lr: A fixed learning rate for a plain virtual SGD step.
        mode: ``"exact"`` (double backward through the virtual step) or ``"finite_difference"``
            (two extra gradient evaluations, O(1) extra memory).
        every: Update the meta parameters on every ``every``-th call of :meth:`step`.

    Examples:
        >>> from msr_loss import MetaSemanticRegularizer, info_nce
        >>> encoder = nn.Linear(8, 4)
        >>> msr = MetaSemanticRegularizer(dim=4, num_strata=2, temperature=0.5)
        >>> meta = MetaUpdate(encoder, msr.parameters(), torch.optim.Adam(msr.parameters()), lr=0.1)
        >>> x1, x2 = torch.randn(6, 8), torch.randn(6, 8)
        >>> _ = meta.step(
        ...     train_loss=lambda f: msr(f(x1), f(x2)),
        ...     meta_loss=lambda f: info_nce(f(x1), f(x2), temperature=0.5),
        ... )
    """

    def __init__(
        self,
        encoder: nn.Module,
        meta_parameters: Iterable[nn.Parameter],
        meta_optimizer: torch.optim.Optimizer,
        *,
        encoder_optimizer: torch.optim.Optimizer | None = None,
        lr: float | None = None,
        mode: str = "finite_difference",
        every: int = 1,
    ) -> None:
        if (encoder_optimizer is None) == (lr is None):
            raise ValueError("give exactly one of encoder_optimizer and lr")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.encoder = encoder
        self.meta_parameters = list(meta_parameters)
        if not self.meta_parameters:
            raise ValueError("meta_parameters is empty")
        broadcast_from_rank0(self.meta_parameters)
        self.meta_optimizer = meta_optimizer
        self.encoder_optimizer = encoder_optimizer
        self.fixed_step = None if lr is None else VirtualSGD(lr=check_real("lr", lr, at_least=0))
        self.mode = check_choice("mode", mode, META_MODES)
        self.every = every
        self.calls = 0

    def _encoder_parameters(self) -> dict[str, nn.Parameter]:
        held_out = {id(p) for p in self.meta_parameters}
        return {
            name: p
            for name, p in self.encoder.named_parameters()
            if p.requires_grad and id(p) not in held_out
        }

    def _virtual_steps(
        self, params: dict[str, nn.Parameter]
    ) -> dict[str, tuple[VirtualSGD, torch.Tensor | None]]:
        if self.fixed_step is not None:
            return {name: (self.fixed_step, None) for name in params}
        assert self.encoder_optimizer is not None
        mirrored = virtual_steps_from_optimizer(self.encoder_optimizer)
        missing = [name for name, p in params.items() if id(p) not in mirrored]
        if missing:
            raise ValueError(f"encoder parameters not in encoder_optimizer: {missing[:5]}")
        return {name: mirrored[id(p)] for name, p in params.items()}

    def _forward(self, params: dict[str, torch.Tensor]) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.encoder, params, args, kwargs)

        return forward

    def meta_gradients(self, train_loss: LossFn, meta_loss: LossFn) -> list[torch.Tensor]:
        """The gradient of ``meta_loss`` at the virtual parameters w.r.t. the meta parameters."""
        params = self._encoder_parameters()
        steps = self._virtual_steps(params)
        with preserved_buffers(self.encoder), torch.enable_grad():
            if self.mode == "exact":
                return all_reduce_mean(self._exact(params, steps, train_loss, meta_loss))
            return all_reduce_mean(self._finite_difference(params, steps, train_loss, meta_loss))

    def _grad_or_zero(
        self, output: torch.Tensor, inputs: Sequence[torch.Tensor], **kwargs: Any
    ) -> list[torch.Tensor]:
        grads = torch.autograd.grad(output, inputs, allow_unused=True, **kwargs)
        return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)]

    def _exact(
        self,
        params: dict[str, nn.Parameter],
        steps: dict[str, tuple[VirtualSGD, torch.Tensor | None]],
        train_loss: LossFn,
        meta_loss: LossFn,
    ) -> list[torch.Tensor]:
        theta = {name: p.detach().requires_grad_() for name, p in params.items()}
        loss = train_loss(self._forward(theta))
        grads = all_reduce_mean(self._grad_or_zero(loss, list(theta.values()), create_graph=True))
        virtual = {
            name: steps[name][0].apply(value, grad, steps[name][1])
            for (name, value), grad in zip(theta.items(), grads, strict=True)
        }
        return self._grad_or_zero(meta_loss(self._forward(virtual)), self.meta_parameters)

    def _finite_difference(
        self,
        params: dict[str, nn.Parameter],
        steps: dict[str, tuple[VirtualSGD, torch.Tensor | None]],
        train_loss: LossFn,
        meta_loss: LossFn,
    ) -> list[torch.Tensor]:
        names = list(params)
        theta = [params[name].detach() for name in names]
        leaves = [t.clone().requires_grad_() for t in theta]
        grads = all_reduce_mean(
            self._grad_or_zero(
                train_loss(self._forward(dict(zip(names, leaves, strict=True)))), leaves
            )
        )
        virtual = [
            steps[name][0].apply(t, g, steps[name][1]).requires_grad_()
            for name, t, g in zip(names, theta, grads, strict=True)
        ]
        outer = self._grad_or_zero(
            meta_loss(self._forward(dict(zip(names, virtual, strict=True)))),
            [*virtual, *self.meta_parameters],
        )
        v, first_order = all_reduce_mean(outer[: len(virtual)]), outer[len(virtual) :]
        direction = [
            steps[name][0].gradient_scale(steps[name][1] is not None) * vi
            for name, vi in zip(names, v, strict=True)
        ]
        norm = torch.sqrt(sum((d * d).sum() for d in direction))  # type: ignore[arg-type]
        if float(norm) == 0.0:
            return first_order
        eps = 0.01 / norm

        def train_grad_at(sign: float) -> list[torch.Tensor]:
            shifted = {
                n: t + sign * eps * d for n, t, d in zip(names, theta, direction, strict=True)
            }
            return self._grad_or_zero(train_loss(self._forward(shifted)), self.meta_parameters)

        plus, minus = train_grad_at(1.0), train_grad_at(-1.0)
        return [f - (p - m) / (2 * eps) for f, p, m in zip(first_order, plus, minus, strict=True)]

    def step(self, train_loss: LossFn, meta_loss: LossFn) -> bool:
        """Runs stage 2 if the schedule says so; returns whether the meta parameters moved.

        Args:
            train_loss: ``forward -> L_base + beta * L_ICL`` (the loss of stage 1).
            meta_loss: ``forward -> L_meta``, evaluated at the virtual parameters.
        """
        self.calls += 1
        if (self.calls - 1) % self.every:
            return False
        grads = self.meta_gradients(train_loss, meta_loss)
        for param, grad in zip(self.meta_parameters, grads, strict=True):
            param.grad = grad.detach()
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        return True
