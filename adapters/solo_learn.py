"""Wraps any solo-learn method with auxiliary terms, without editing or forking solo-learn.

The wrapped class is a subclass of the method's own class. A forward hook on its ``projector``
records the inputs (backbone features) and projections of the first two large crops inside
``training_step``; the step's loss becomes ``base + sum of the terms``; after each optimizer step
(``on_train_batch_end``) every term runs its stage 2; the parameters a term gives the host's
optimizer join ``learnable_params``; the terms' parameters live in the model's ``state_dict`` and
their optimizer state in the checkpoint under ``"msr_loss"``. solo-learn and Lightning are imported
only by :func:`register`, never at import time.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .flags import TERMS
from .terms import AuxiliaryTerm, StepContext, backbone_of

if TYPE_CHECKING:
    _Host = Any
else:
    _Host = object

CHECKPOINT_KEY = "msr_loss"
UNSUPPORTED = {
    "DINO": "its projector output ('z') is prototype logits, not a projection",
    "MAE": "it reconstructs pixels and has no projector",
}


def solo_api(method_cls: type) -> str:
    """``"cfg"`` for solo-learn's current constructor ``__init__(cfg)``, else ``"kwargs"``.

    The keyword API is PyPI's solo-learn 1.0.x (``__init__(encoder=..., lr=..., **kwargs)``).

    Examples:
        >>> class Host:
        ...     def __init__(self, cfg): ...
        >>> solo_api(Host)
        'cfg'
    """
    if not isinstance(method_cls, type):
        raise TypeError(f"expected a solo-learn method class, got {type(method_cls).__name__}")
    return "cfg" if "cfg" in inspect.signature(method_cls).parameters else "kwargs"


def projection_dim(projector: nn.Module) -> int:
    """Output width of a projector: the ``out_features`` of its last ``nn.Linear``."""
    widths = [m.out_features for m in projector.modules() if isinstance(m, nn.Linear)]
    if not widths:
        raise TypeError(
            f"cannot tell the projection width of {type(projector).__name__}: it has no nn.Linear"
        )
    return widths[-1]


class _Encoder(nn.Module):
    """Backbone then projector: the parameters the virtual step of stage 2 moves."""

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def _first(module: nn.Module, *names: str) -> Any:
    return next((getattr(module, n) for n in names if getattr(module, n, None) is not None), None)


def _momentum_encoder(method: nn.Module) -> _Encoder | None:
    """The momentum backbone (``momentum_backbone`` on main, ``momentum_encoder`` on 1.0.x) and
    ``momentum_projector``, if the method has both."""
    backbone = _first(method, "momentum_backbone", "momentum_encoder")
    projector = getattr(method, "momentum_projector", None)
    if isinstance(backbone, nn.Module) and isinstance(projector, nn.Module):
        return _Encoder(backbone, projector)
    return None


class _AuxiliaryMixin(_Host):
    _msr_host: type
    _msr_flags: tuple[Any, ...]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        projector = getattr(self, "projector", None)
        if not isinstance(projector, nn.Module):
            raise TypeError(
                f"{self._msr_host.__name__} has no nn.Module 'projector'; the msr-loss adapter "
                "needs the projector whose outputs are the projections z"
            )
        dim = projection_dim(projector)
        self.msr_terms = nn.ModuleDict()
        for flags in self._msr_flags:
            term = flags.build(dim)
            self.msr_terms[term.flag] = term
            term.bind(self)
        self.__dict__["_msr_encoders"] = (
            _Encoder(backbone_of(self), projector),
            _momentum_encoder(self),
        )
        self.__dict__["_msr_captured"] = None
        self.__dict__["_msr_pending"] = None
        projector.register_forward_hook(self._msr_capture)

    def _msr_terms(self) -> list[tuple[str, AuxiliaryTerm]]:
        return [(flag, cast(AuxiliaryTerm, term)) for flag, term in self.msr_terms.items()]

    @property
    def learnable_params(self) -> list[dict[str, Any]]:
        groups = list(super().learnable_params)
        params = [p for _, term in self._msr_terms() for p in term.host_parameters()]
        return [*groups, {"name": "msr_terms", "params": params}] if params else groups

    def _msr_capture(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        captured = self.__dict__["_msr_captured"]
        if captured is not None and len(captured) < 2:
            captured.append((inputs[0], output))

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.__dict__["_msr_captured"] = []
        try:
            out = super().training_step(batch, batch_idx)
        finally:
            captured = self.__dict__["_msr_captured"]
            self.__dict__["_msr_captured"] = None
        if len(captured) < 2:
            raise RuntimeError(
                f"{self._msr_host.__name__}.training_step ran its projector {len(captured)} "
                "time(s); the msr-loss adapter needs the projections of two large crops"
            )
        crops = (batch[1][0].detach(), batch[1][1].detach())
        (f1, z1), (f2, z2) = captured
        encoder, key_encoder = self.__dict__["_msr_encoders"]
        context = StepContext(crops, (z1, z2), encoder, key_encoder, (f1, f2))
        total = torch.zeros((), device=z1.device)
        for flag, term in self._msr_terms():
            loss = term.loss(context)
            self.log(f"train_{flag}_loss", loss.detach(), on_epoch=True, sync_dist=True)
            total = total + loss
        trainer = self._trainer
        self.__dict__["_msr_pending"] = (
            StepContext(
                crops,
                (z1.detach(), z2.detach()),
                encoder,
                key_encoder,
                (f1.detach(), f2.detach()),
            ),
            None if trainer is None else trainer.global_step,
        )
        if isinstance(out, Mapping):
            return {**out, "loss": out["loss"] + total}
        return out + total

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int, *args: Any) -> None:
        parent = super().on_train_batch_end
        missing = [
            p
            for p in list(inspect.signature(parent).parameters.values())[3:]
            if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        parent(outputs, batch, batch_idx, *args, *[0] * (len(missing) - len(args)))
        pending, self.__dict__["_msr_pending"] = self.__dict__["_msr_pending"], None
        if pending is None:
            return
        context, step_before = pending
        if self.trainer.global_step == step_before:
            return
        optimizer = self.trainer.optimizers[0]
        for _, term in self._msr_terms():
            term.after_optimizer_step(context, optimizer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY] = {flag: term.extra_state() for flag, term in self._msr_terms()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        terms = dict(self._msr_terms())
        for flag, state in checkpoint.get(CHECKPOINT_KEY, {}).items():
            if flag in terms:
                terms[flag].load_extra_state(state)


def wrap_method(method_cls: type, *flags: Any) -> type:
    """A subclass of ``method_cls`` that adds the auxiliary terms described by ``flags``.

    Args:
        method_cls: A solo-learn method class (``solo.methods.SimCLR``, ``BYOL``, ...), either
            API (``__init__(cfg)`` on main, keyword arguments on PyPI 1.0.x).
        *flags: Parsed flag blocks, e.g. :class:`msr_loss.adapters.MSRFlags`,
            :class:`msr_loss.adapters.NSNegFlags` or :class:`msr_loss.adapters.MetaMaskFlags`;
            each has ``build(projection_dim)`` returning the term, which is then bound to the
            model (:meth:`AuxiliaryTerm.bind`).

    Returns:
        The wrapped class; construct it exactly like ``method_cls``.

    Examples:
        >>> from solo.methods import SimCLR  # doctest: +SKIP
        >>> SimCLRWithMSR = wrap_method(SimCLR, MSRFlags(weight=0.5))  # doctest: +SKIP
    """
    solo_api(method_cls)
    host = getattr(method_cls, "_msr_host", method_cls)
    for klass in host.__mro__:
        if klass.__name__ in UNSUPPORTED:
            raise TypeError(
                f"the msr-loss adapter does not support {host.__name__}: "
                f"{UNSUPPORTED[klass.__name__]}"
            )
    if not flags:
        raise ValueError("wrap_method needs at least one flag block, got none")
    namespace = {"_msr_host": host, "_msr_flags": tuple(flags), "__module__": __name__}
    return type(f"{host.__name__}WithMSR", (_AuxiliaryMixin, host), namespace)


def _read(config: Any, key: str) -> Any:
    if isinstance(config, argparse.Namespace):
        return getattr(config, key, None)
    if isinstance(config, Mapping):
        return config.get(key)
    raise TypeError(
        "config must be an omegaconf DictConfig, a Mapping or an argparse.Namespace, "
        f"got {type(config).__name__}"
    )


def flags_from_config(config: Any) -> list[Any]:
    """The enabled flag blocks (``msr``, and any added by ``register_term``) found in ``config``.

    Examples:
        >>> flags_from_config({"method": "simclr", "msr": {"num_strata": 4}})[0].num_strata
        4
    """
    found = []
    for flag, from_block in TERMS.items():
        block = _read(config, flag)
        if block is None:
            continue
        parsed = from_block(dict(block.items()) if isinstance(block, Mapping) else block)
        if parsed.enabled:
            found.append(parsed)
    return found


def register(config: Any, methods: MutableMapping[str, type] | None = None) -> type:
    """Puts the wrapped method in solo-learn's registry when ``config`` carries a flag block.

    ``methods[config.method]`` becomes the wrapped class if ``config`` has an enabled ``msr``,
    ``nsneg`` or ``metamask`` block (or one added by ``register_term``), and the plain class
    otherwise; ``config.method`` is left unchanged. Call it before the model is built.

    Args:
        config: The run's config: solo-learn main's hydra ``DictConfig``, or for PyPI 1.0.x the
            parsed ``argparse.Namespace`` (or a dict) with ``method`` and an ``msr`` dict.
        methods: The registry; solo-learn's ``solo.methods.METHODS`` by default.

    Returns:
        The class now at ``methods[config.method]``.

    Examples:
        >>> model = register(cfg)(cfg)  # doctest: +SKIP
    """
    if methods is None:
        from solo.methods import METHODS

        methods = METHODS
    name = _read(config, "method")
    if name not in methods:
        raise ValueError(f"config.method must be one of {sorted(methods)}, got {name!r}")
    host = getattr(methods[name], "_msr_host", methods[name])
    flags = flags_from_config(config)
    methods[name] = wrap_method(host, *flags) if flags else host
    return methods[name]
