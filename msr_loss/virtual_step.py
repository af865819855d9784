"""The virtual step of stage 2: one step of the encoder's optimizer as a function of the gradient.

Each rule takes a parameter, a gradient and the optimizer's state for that parameter, and returns
the parameter after the step, differentiably in the gradient, so that the meta-gradient can follow
the step the real optimizer would take. :func:`virtual_steps_from_optimizer` reads the rule, each
group's *current* hyper-parameters (a scheduler's lr) and the state from an optimizer. At lr 0
every rule returns the parameter itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch

from msr_loss._validation import check_real

ParameterStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(param, grad) -> param after the step``, for one parameter with its state bound."""


def _momentum(
    direction: torch.Tensor,
    buffer: torch.Tensor | None,
    momentum: float,
    dampening: float,
    nesterov: bool,
) -> torch.Tensor:
    if not momentum:
        return direction
    updated = direction if buffer is None else momentum * buffer + (1 - dampening) * direction
    return direction + momentum * updated if nesterov else updated


@dataclass(frozen=True)
class VirtualSGD:
    """One step of ``torch.optim.SGD`` (momentum, dampening, weight decay, Nesterov, maximize).

    Args:
        lr: Learning rate, >= 0; at 0 the step is the identity.
        momentum: Momentum factor; the real optimizer's buffer is used when there is one.
        dampening: Dampening of the momentum.
        weight_decay: L2 penalty added to the gradient.
        nesterov: Nesterov momentum.
        maximize: Step up the gradient.

    Examples:
        >>> step = VirtualSGD(lr=0.1, momentum=0.9)
        >>> step.apply(torch.ones(2), torch.ones(2), None)
        tensor([0.9000, 0.9000])
        >>> VirtualSGD(lr=0.0).apply(torch.ones(2), torch.ones(2), None)
        tensor([1., 1.])
    """

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False

    def __post_init__(self) -> None:
        check_real("lr", self.lr, at_least=0)
        check_real("momentum", self.momentum, at_least=0)
        check_real("dampening", self.dampening)
        check_real("weight_decay", self.weight_decay, at_least=0)

    def apply(
        self, param: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor | None
    ) -> torch.Tensor:
        """``param`` after one SGD step with ``grad`` (differentiable); at lr 0, ``param``."""
        if self.lr == 0:
            return param
        grad = -grad if self.maximize else grad
        direction = grad + self.weight_decay * param if self.weight_decay else grad
        return param - self.lr * _momentum(
            direction, buffer, self.momentum, self.dampening, self.nesterov
        )


@dataclass(frozen=True)
class AdamState:
    """The state ``torch.optim.Adam`` keeps for one parameter (empty before its first step).

    Examples:
        >>> AdamState().step
        0.0
    """

    step: float = 0.0
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None
    max_exp_avg_sq: torch.Tensor | None = None


@dataclass(frozen=True)
class VirtualAdam:
    """One step of ``torch.optim.Adam`` or ``AdamW``, exactly as the optimizer takes it.

    No approximation: both moments are updated with the gradient and bias-corrected at step
    ``t + 1`` (AMSGrad's running maximum included), so the step's derivative in the gradient is
    the real optimizer's. On the first step, where Adam's update is about ``lr * sign(grad)``, that
    derivative is close to 0 and the meta-gradient is then close to its first-order term.

    Args:
        lr: Learning rate, >= 0; at 0 the step is the identity.
        betas: The moments' decay rates.
        eps: Added to the denominator.
        weight_decay: L2 penalty (Adam) or decoupled decay (AdamW).
        decoupled_weight_decay: AdamW's decay ``param * (1 - lr * weight_decay)``.
        amsgrad: Divide by the running maximum of the second moment.
        maximize: Step up the gradient.

    Examples:
        >>> step = VirtualAdam(lr=0.1)
        >>> step.apply(torch.ones(2), torch.ones(2), AdamState())
        tensor([0.9000, 0.9000])
    """

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    amsgrad: bool = False
    maximize: bool = False

    def __post_init__(self) -> None:
        check_real("lr", self.lr, at_least=0)
        check_real("betas[0]", self.betas[0], at_least=0, at_most=1)
        check_real("betas[1]", self.betas[1], at_least=0, at_most=1)
        check_real("eps", self.eps, at_least=0)
        check_real("weight_decay", self.weight_decay, at_least=0)

    def apply(self, param: torch.Tensor, grad: torch.Tensor, state: AdamState) -> torch.Tensor:
        """``param`` after one Adam step with ``grad`` (differentiable); at lr 0, ``param``."""
        if self.lr == 0:
            return param
        beta1, beta2 = self.betas
        grad = -grad if self.maximize else grad
        if self.weight_decay and not self.decoupled_weight_decay:
            grad = grad + self.weight_decay * param
        exp_avg = (1 - beta1) * grad
        exp_avg_sq = (1 - beta2) * grad * grad
        if state.exp_avg is not None:
            exp_avg = exp_avg + beta1 * state.exp_avg
        if state.exp_avg_sq is not None:
            exp_avg_sq = exp_avg_sq + beta2 * state.exp_avg_sq
        if self.amsgrad and state.max_exp_avg_sq is not None:
            exp_avg_sq = torch.maximum(state.max_exp_avg_sq, exp_avg_sq)
        step = state.step + 1
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        tiny = torch.finfo(exp_avg_sq.dtype).tiny
        root = torch.where(exp_avg_sq > 0, exp_avg_sq.clamp_min(tiny).sqrt(), 0.0)
        denominator = root / bias_correction2**0.5 + self.eps
        if self.weight_decay and self.decoupled_weight_decay:
            param = param * (1 - self.lr * self.weight_decay)
        return param - (self.lr / bias_correction1) * exp_avg / denominator


@dataclass(frozen=True)
class VirtualLARS:
    """One step of LARS as solo-learn takes it (``solo.utils.lars.LARS``, and 1.0.2's wrapper).

    For a parameter that is scaled (not a 1-d bias or norm weight when ``exclude_bias_n_norm``,
    and neither it nor its gradient zero), the direction is
    ``trust * (grad + weight_decay * param)`` with the trust ratio
    ``eta * |param| / (|grad| + weight_decay * |param| + eps)`` (divided by lr and capped at 1
    with ``clip``), differentiated in ``|grad|`` too; otherwise it is the bare gradient, without
    weight decay, as in solo's code. SGD momentum follows.

    Args:
        lr: Learning rate, >= 0; at 0 the step is the identity.
        momentum: Momentum factor.
        dampening: Dampening of the momentum.
        weight_decay: Weight decay inside the trust ratio.
        nesterov: Nesterov momentum.
        eta: Trust coefficient.
        eps: Added to the trust ratio's denominator.
        clip: solo's ``clip_lars_lr``.
        exclude_bias_n_norm: solo's ``exclude_bias_n_norm_lars``: 1-d parameters are not scaled.

    Examples:
        >>> step = VirtualLARS(lr=1.0, eta=0.1)
        >>> step.apply(torch.ones(4), torch.ones(4), None)
        tensor([0.9000, 0.9000, 0.9000, 0.9000])
    """

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    eta: float = 1e-3
    eps: float = 1e-8
    clip: bool = False
    exclude_bias_n_norm: bool = False

    def __post_init__(self) -> None:
        check_real("lr", self.lr, at_least=0)
        check_real("momentum", self.momentum, at_least=0)
        check_real("dampening", self.dampening)
        check_real("weight_decay", self.weight_decay, at_least=0)
        check_real("eta", self.eta, at_least=0)
        check_real("eps", self.eps, at_least=0)

    def apply(
        self, param: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor | None
    ) -> torch.Tensor:
        """``param`` after one LARS step with ``grad`` (differentiable); at lr 0, ``param``."""
        if self.lr == 0:
            return param
        direction = grad
        if param.dim() != 1 or not self.exclude_bias_n_norm:
            param_norm = torch.linalg.vector_norm(param.detach())
            grad_norm = torch.linalg.vector_norm(grad)
            if param_norm != 0 and grad_norm != 0:
                trust = (
                    self.eta * param_norm / (grad_norm + param_norm * self.weight_decay + self.eps)
                )
                if self.clip:
                    trust = torch.clamp(trust / self.lr, max=1.0)
                direction = (grad + self.weight_decay * param) * trust
        return param - self.lr * _momentum(
            direction, buffer, self.momentum, self.dampening, self.nesterov
        )


def _is_solo_lars(optimizer: object) -> bool:
    keys = {"eta", "eps", "clip_lars_lr", "exclude_bias_n_norm_lars", "momentum", "nesterov"}
    groups = getattr(optimizer, "param_groups", [])
    return bool(groups) and all(keys <= group.keys() for group in groups)


def _is_lars_wrapper(optimizer: object) -> bool:
    return type(optimizer).__name__ == "LARSWrapper" and isinstance(
        getattr(optimizer, "optim", None), torch.optim.SGD
    )


def mirrors(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`virtual_steps_from_optimizer` reproduces ``optimizer``'s own step.

    True for ``torch.optim.SGD``, ``Adam``, ``AdamW``, solo-learn's ``LARS`` (recognised by its
    parameter groups' keys) and solo-learn 1.0.2's ``LARSWrapper`` around an SGD; for any other
    optimizer the virtual step is plain SGD at each group's current lr.

    Examples:
        >>> param = torch.nn.Parameter(torch.ones(2))
        >>> mirrors(torch.optim.AdamW([param])), mirrors(torch.optim.RMSprop([param]))
        (True, False)
    """
    return (
        isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam))
        or _is_solo_lars(optimizer)
        or _is_lars_wrapper(optimizer)
    )


def _adam_steps(optimizer: torch.optim.Adam) -> dict[int, ParameterStep]:
    steps: dict[int, ParameterStep] = {}
    decoupled_default = isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        rule = VirtualAdam(
            lr=float(group["lr"]),
            betas=(float(beta1), float(beta2)),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            decoupled_weight_decay=bool(group.get("decoupled_weight_decay", decoupled_default)),
            amsgrad=bool(group["amsgrad"]),
            maximize=bool(group.get("maximize", False)),
        )
        for param in group["params"]:
            saved = optimizer.state.get(param, {})
            state = AdamState(
                step=float(saved.get("step", 0.0)),
                exp_avg=saved.get("exp_avg"),
                exp_avg_sq=saved.get("exp_avg_sq"),
                max_exp_avg_sq=saved.get("max_exp_avg_sq"),
            )
            steps[id(param)] = functools.partial(rule.apply, state=state)
    return steps


def _lars_steps(optimizer: torch.optim.Optimizer, wrapper: Any) -> dict[int, ParameterStep]:
    steps: dict[int, ParameterStep] = {}
    for group in optimizer.param_groups:
        if wrapper is None:
            eta, eps = group["eta"], group["eps"]
            clip, exclude = group["clip_lars_lr"], group["exclude_bias_n_norm_lars"]
        else:
            eta, eps = wrapper.eta, wrapper.eps
            clip, exclude = wrapper.clip, wrapper.exclude_bias_n_norm
        rule = VirtualLARS(
            lr=float(group["lr"]),
            momentum=float(group["momentum"]),
            dampening=float(group["dampening"]),
            weight_decay=float(group["weight_decay"]),
            nesterov=bool(group["nesterov"]),
            eta=float(eta),
            eps=float(eps),
            clip=bool(clip),
            exclude_bias_n_norm=bool(exclude),
        )
        for param in group["params"]:
            buffer = optimizer.state.get(param, {}).get("momentum_buffer")
            steps[id(param)] = functools.partial(rule.apply, buffer=buffer)
    return steps


def _sgd_steps(optimizer: torch.optim.Optimizer, *, plain: bool) -> dict[int, ParameterStep]:
    steps: dict[int, ParameterStep] = {}
    for group in optimizer.param_groups:
        if plain:
            rule = VirtualSGD(lr=float(group["lr"]))
        else:
            rule = VirtualSGD(
                lr=float(group["lr"]),
                momentum=float(group["momentum"]),
                dampening=float(group["dampening"]),
                weight_decay=float(group["weight_decay"]),
                nesterov=bool(group["nesterov"]),
                maximize=bool(group.get("maximize", False)),
            )
        for param in group["params"]:
            buffer = None if plain else optimizer.state.get(param, {}).get("momentum_buffer")
            steps[id(param)] = functools.partial(rule.apply, buffer=buffer)
    return steps


def virtual_steps_from_optimizer(optimizer: torch.optim.Optimizer) -> dict[int, ParameterStep]:
    """Per parameter (keyed by ``id``), the virtual step mirroring ``optimizer``'s next step.

    Each group's current hyper-parameters are read (the lr a scheduler set, not the defaults),
    with the optimizer's state (momentum buffers, Adam's moments and step count). See
    :func:`mirrors` for the optimizers mirrored; any other takes plain SGD at its groups' lr.

    Examples:
        >>> param = torch.nn.Parameter(torch.ones(2))
        >>> optimizer = torch.optim.SGD([param], lr=0.5)
        >>> virtual_steps_from_optimizer(optimizer)[id(param)](param, torch.ones(2))
        tensor([0.5000, 0.5000], grad_fn=<SubBackward0>)
    """
    if isinstance(optimizer, torch.optim.Adam):
        return _adam_steps(optimizer)
    if isinstance(optimizer, torch.optim.SGD):
        return _sgd_steps(optimizer, plain=False)
    if _is_solo_lars(optimizer):
        return _lars_steps(optimizer, wrapper=None)
    if _is_lars_wrapper(optimizer):
        return _lars_steps(cast(Any, optimizer).optim, wrapper=optimizer)
    return _sgd_steps(optimizer, plain=True)
