"""The two-stage meta update shared by ICL-MSR's strata and MetaMask's mask.

Stage 1 is the user's own optimizer step on the encoder. Stage 2, here, takes one virtual step
of the encoder on the training loss, ``theta' = step(theta, grad L_train(theta, a))`` with the
encoder optimizer's own rule (:mod:`msr_loss.virtual_step`), and moves the meta parameters ``a``
down the gradient of ``L_meta(theta'(a))``: a second-order gradient, computed exactly (double
backward) or by the finite difference of DARTS.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from msr_loss._validation import check_choice, check_integer, check_real
from msr_loss.distributed import all_reduce_mean, broadcast_from_rank0
from msr_loss.types import META_MODES, MetaMode
from msr_loss.virtual_step import (
    ParameterStep,
    VirtualSGD,
    mirrors,
    virtual_steps_from_optimizer,
)

Forward = Callable[..., Any]
LossFn = Callable[[Forward], torch.Tensor]

__all__ = ["LossFn", "MetaUpdate", "VirtualSGD", "preserved_buffers", "replayed_rng"]


@contextlib.contextmanager
def preserved_buffers(module: nn.Module) -> Iterator[None]:
    """Restores every buffer (e.g. BatchNorm running statistics) on exit.

    Examples:
        >>> norm = nn.BatchNorm1d(3)
        >>> with preserved_buffers(norm):
        ...     _ = norm(torch.randn(4, 3))
        >>> int(norm.num_batches_tracked)
        0
    """
    saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


@contextlib.contextmanager
def replayed_rng(devices: Iterable[torch.device] = ()) -> Iterator[Callable[[], None]]:
    """Saves the CPU generator and the CUDA generators of ``devices``; restores them on exit.

    Yields a ``replay()`` that resets those generators to the saved state, so that passes which
    call it first draw the same random numbers (Dropout masks) as each other and as the code that
    runs after the block.

    Examples:
        >>> with replayed_rng() as replay:
        ...     first = torch.rand(2)
        ...     replay()
        ...     second = torch.rand(2)
        >>> torch.equal(first, second), torch.equal(torch.rand(2), first)
        (True, True)
    """
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    cpu_state = torch.get_rng_state()
    cuda_states = [torch.cuda.get_rng_state(index) for index in cuda]

    def replay() -> None:
        torch.set_rng_state(cpu_state)
        for index, state in zip(cuda, cuda_states, strict=True):
            torch.cuda.set_rng_state(state, index)

    try:
        yield replay
    finally:
        replay()


def _grads_or_zero(
    output: torch.Tensor, inputs: Sequence[torch.Tensor], **kwargs: Any
) -> list[torch.Tensor]:
    if not output.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(output, inputs, allow_unused=True, **kwargs)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)]


def _step_vjp(
    stepped: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], v: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``(d stepped / d grads)^T v``: how the virtual parameters move with the gradient."""
    pairs = [(s, vi) for s, vi in zip(stepped, v, strict=True) if s.requires_grad]
    if not pairs:
        return [torch.zeros_like(g) for g in grads]
    outputs, cotangents = zip(*pairs, strict=True)
    found = torch.autograd.grad(outputs, grads, cotangents, allow_unused=True)
    return [torch.zeros_like(g) if f is None else f for g, f in zip(grads, found, strict=True)]


class MetaUpdate:
    """Stage 2 of the two-stage update: the meta-gradient of the meta parameters, and their step.

    Call :meth:`step` after the encoder's own optimizer step. ``train_loss`` and ``meta_loss`` are
    functions of a ``forward`` callable that runs the encoder at given parameters; write them as you
    would write the loss with the encoder itself.

    The virtual step mirrors ``encoder_optimizer`` (:func:`msr_loss.virtual_step.mirrors`: SGD,
    Adam, AdamW, solo-learn's LARS) at each group's current lr; at lr 0 it is the identity and the
    meta-gradient is the first-order term alone. Every pass of one stage 2 (virtual, meta, and the
    finite difference's two) starts from one saved RNG state, so they see the same Dropout masks,
    and the global RNG state and the encoder's buffers (BatchNorm statistics) are left exactly as
    before.

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
        meta_optimizer: The optimizer of ``meta_parameters``; it must hold every one of them.
        encoder_optimizer: The encoder's optimizer, mirrored by the virtual step. Either this or
            ``lr``. Any optimizer not mirrored warns once, here, and takes plain SGD.
        lr: A fixed learning rate (>= 0) for a plain virtual SGD step.
        mode: ``"exact"`` (double backward through the virtual step) or ``"finite_difference"``
            (two extra gradient evaluations, O(1) extra memory).
        every: Update the meta parameters on every ``every``-th call of :meth:`step`.

    Raises:
        TypeError: ``lr`` is not a real number or ``every`` not an integer.
        ValueError: A setting is out of range or not finite, ``meta_optimizer`` misses a meta
            parameter, or a meta parameter does not require grad.

    Examples:
        >>> from msr_loss import MetaSemanticRegularizer, info_nce
        >>> encoder = nn.Linear(8, 4)
        >>> msr = MetaSemanticRegularizer(dim=4, num_strata=2, temperature=0.5)
        >>> meta = MetaUpdate(encoder, msr.parameters(), torch.optim.Adam(msr.parameters()), lr=0.1)
        >>> x1, x2 = torch.randn(6, 8), torch.randn(6, 8)
        >>> meta.step(
        ...     train_loss=lambda f: msr(f(x1), f(x2)),
        ...     meta_loss=lambda f: info_nce(f(x1), f(x2), temperature=0.5),
        ... )
        True
        >>> meta.state_dict()
        {'calls': 1}
    """

    owns_meta_optimizer = False
    """Whether :meth:`state_dict` carries the meta optimizer's state (it does when built here)."""

    def __init__(
        self,
        encoder: nn.Module,
        meta_parameters: Iterable[nn.Parameter],
        meta_optimizer: torch.optim.Optimizer,
        *,
        encoder_optimizer: torch.optim.Optimizer | None = None,
        lr: float | None = None,
        mode: MetaMode = "finite_difference",
        every: int = 1,
    ) -> None:
        if (encoder_optimizer is None) == (lr is None):
            raise ValueError("give exactly one of encoder_optimizer and lr")
        self.every = check_integer("every", every, at_least=1)
        self.mode = check_choice("mode", mode, META_MODES)
        self.fixed_step = None if lr is None else VirtualSGD(lr=check_real("lr", lr, at_least=0))
        self.encoder = encoder
        self.meta_parameters = list(meta_parameters)
        if not self.meta_parameters:
            raise ValueError("meta_parameters is empty")
        held = {id(p) for group in meta_optimizer.param_groups for p in group["params"]}
        missing = [i for i, p in enumerate(self.meta_parameters) if id(p) not in held]
        if missing:
            raise ValueError(
                f"meta_optimizer does not hold the meta parameters at positions {missing}: "
                "build it from the same parameters, or the meta step moves nothing"
            )
        self._check_requires_grad()
        broadcast_from_rank0(self.meta_parameters)
        self.meta_optimizer = meta_optimizer
        self.encoder_optimizer = encoder_optimizer
        if encoder_optimizer is not None and not mirrors(encoder_optimizer):
            warnings.warn(
                f"MetaUpdate cannot mirror {type(encoder_optimizer).__name__}: the virtual step "
                "is plain SGD at each parameter group's current lr",
                stacklevel=2,
            )
        self.calls = 0

    @contextlib.contextmanager
    def meta_phase(self) -> Iterator[None]:
        """The context in which the meta parameters take gradients (MetaMask unfreezes its mask)."""
        yield

    def _check_requires_grad(self) -> None:
        with self.meta_phase():
            frozen = [i for i, p in enumerate(self.meta_parameters) if not p.requires_grad]
        if frozen:
            raise ValueError(
                f"the meta parameters at positions {frozen} have requires_grad=False: "
                "the meta-gradient cannot reach them"
            )

    def state_dict(self) -> dict[str, Any]:
        """The call counter (and the meta optimizer's state when this object built it).

        Plain Python values and tensors: ``torch.save`` it, ``torch.load(weights_only=True)`` it.
        """
        state: dict[str, Any] = {"calls": self.calls}
        if self.owns_meta_optimizer:
            state["meta_optimizer"] = self.meta_optimizer.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict`'s output, so an ``every`` schedule resumes in phase."""
        if "calls" not in state:
            raise ValueError("state has no 'calls': it is not a MetaUpdate state_dict")
        calls = check_integer("state['calls']", state["calls"], at_least=0)
        if self.owns_meta_optimizer:
            if "meta_optimizer" not in state:
                raise ValueError("state has no 'meta_optimizer' for the meta optimizer built here")
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.calls = calls

    def _encoder_parameters(self) -> dict[str, nn.Parameter]:
        held_out = {id(p) for p in self.meta_parameters}
        return {
            name: p
            for name, p in self.encoder.named_parameters()
            if p.requires_grad and id(p) not in held_out
        }

    def _virtual_steps(self, params: dict[str, nn.Parameter]) -> dict[str, ParameterStep]:
        if self.fixed_step is not None:
            fixed = self.fixed_step
            return {name: lambda p, g: fixed.apply(p, g, None) for name in params}
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

    def _devices(self) -> set[torch.device]:
        tensors = [*self.encoder.parameters(), *self.encoder.buffers(), *self.meta_parameters]
        return {t.device for t in tensors}

    def meta_gradients(self, train_loss: LossFn, meta_loss: LossFn) -> list[torch.Tensor]:
        """The gradient of ``meta_loss`` at the virtual parameters w.r.t. the meta parameters.

        Leaves the encoder, its buffers and the global RNG state exactly as they were.
        """
        with self.meta_phase():
            self._check_requires_grad()
            params = self._encoder_parameters()
            steps = self._virtual_steps(params)
            with (
                preserved_buffers(self.encoder),
                replayed_rng(self._devices()) as replay,
                torch.enable_grad(),
            ):
                compute = self._exact if self.mode == "exact" else self._finite_difference
                return all_reduce_mean(compute(params, steps, train_loss, meta_loss, replay))

    def _exact(
        self,
        params: dict[str, nn.Parameter],
        steps: dict[str, ParameterStep],
        train_loss: LossFn,
        meta_loss: LossFn,
        replay: Callable[[], None],
    ) -> list[torch.Tensor]:
        theta = {name: p.detach().requires_grad_() for name, p in params.items()}
        replay()
        loss = train_loss(self._forward(theta))
        grads = all_reduce_mean(_grads_or_zero(loss, list(theta.values()), create_graph=True))
        virtual = {
            name: steps[name](value, grad)
            for (name, value), grad in zip(theta.items(), grads, strict=True)
        }
        replay()
        return _grads_or_zero(meta_loss(self._forward(virtual)), self.meta_parameters)

    def _finite_difference(
        self,
        params: dict[str, nn.Parameter],
        steps: dict[str, ParameterStep],
        train_loss: LossFn,
        meta_loss: LossFn,
        replay: Callable[[], None],
    ) -> list[torch.Tensor]:
        names = list(params)
        theta = [params[name].detach() for name in names]
        leaves = [t.clone().requires_grad_() for t in theta]
        replay()
        loss = train_loss(self._forward(dict(zip(names, leaves, strict=True))))
        grads = [g.requires_grad_() for g in all_reduce_mean(_grads_or_zero(loss, leaves))]
        stepped = [steps[name](t, g) for name, t, g in zip(names, theta, grads, strict=True)]
        virtual = [s.detach().requires_grad_() for s in stepped]
        replay()
        outer = _grads_or_zero(
            meta_loss(self._forward(dict(zip(names, virtual, strict=True)))),
            [*virtual, *self.meta_parameters],
        )
        v, first_order = all_reduce_mean(outer[: len(virtual)]), outer[len(virtual) :]
        direction = _step_vjp(stepped, grads, v)
        norm = torch.sqrt(sum((d * d).sum() for d in direction))  # type: ignore[arg-type]
        if float(norm) == 0.0:
            return first_order
        eps = 0.01 / norm

        def train_grad_at(sign: float) -> list[torch.Tensor]:
            shifted = {
                n: t + sign * eps * d for n, t, d in zip(names, theta, direction, strict=True)
            }
            replay()
            return _grads_or_zero(train_loss(self._forward(shifted)), self.meta_parameters)

        plus, minus = train_grad_at(1.0), train_grad_at(-1.0)
        return [f + (p - m) / (2 * eps) for f, p, m in zip(first_order, plus, minus, strict=True)]

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
