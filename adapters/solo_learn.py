"""Wraps any solo-learn method with auxiliary terms, without editing or forking solo-learn.

The wrapped class is a subclass of the method's own class. A forward hook on its ``projector``
records the inputs (backbone features) and projections of every crop the method projects inside
``training_step`` (large crops, then small ones); the step's loss becomes
``base + sum of the terms``; after each optimizer step that changed the weights (counted by a
step hook on the optimizer, so neither a step that AMP's GradScaler skipped nor the batches
between two steps under gradient accumulation count) every term runs its stage 2, on the batch of
that step; the parameters a term gives the host's optimizer join ``learnable_params``; the terms'
parameters live in the model's ``state_dict`` and their optimizer state in the checkpoint under
``"msr_loss"``; a checkpoint written without a term loads with that term fresh. solo-learn and
Lightning are imported only by :func:`register`, never at import time.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import weakref
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .flags import TERMS
from .terms import AuxiliaryTerm, FlagBlock, StepContext, backbone_of

if TYPE_CHECKING:
    _Host = Any
else:
    _Host = object

CHECKPOINT_KEY = "msr_loss"
TERM_GROUP = "msr_terms"
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


@dataclass(frozen=True)
class _Branches:
    """The host's online and momentum encoders, seen as backbone then projector.

    Held in a plain dataclass so that ``nn.Module`` does not register the host's own modules a
    second time (which would duplicate them in the ``state_dict``).
    """

    online: _Encoder
    momentum: _Encoder | None


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` that updates the weights: solo-learn 1.0.x's
    ``LARSWrapper`` rescales the gradients, then steps the optimizer it holds in ``optim``."""
    inner = getattr(optimizer, "optim", optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"expected a torch optimizer, got {type(optimizer).__name__}")
    return inner


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
        self._msr_branches = _Branches(
            _Encoder(backbone_of(self), projector), _momentum_encoder(self)
        )
        self._msr_captured: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._msr_pending: StepContext | None = None
        self._msr_watched: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self.msr_optimizer_steps = 0
        projector.register_forward_hook(self._msr_capture)

    def _msr_terms(self) -> list[tuple[str, AuxiliaryTerm]]:
        return [(flag, cast(AuxiliaryTerm, term)) for flag, term in self.msr_terms.items()]

    @property
    def learnable_params(self) -> list[dict[str, Any]]:
        groups = list(super().learnable_params)
        params = [p for _, term in self._msr_terms() for p in term.host_parameters()]
        return [*groups, {"name": TERM_GROUP, "params": params}] if params else groups

    def _msr_capture(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if self._msr_captured is not None:
            self._msr_captured.append((inputs[0], output))

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self._msr_captured = []
        try:
            out = super().training_step(batch, batch_idx)
        finally:
            captured, self._msr_captured = self._msr_captured, None
        crops = batch[1] if isinstance(batch[1], Sequence) else [batch[1]]
        views = min(len(captured), len(crops))
        if views < 2:
            raise RuntimeError(
                f"{self._msr_host.__name__}.training_step projected {len(captured)} crop(s); "
                "the msr-loss adapter needs the projections of at least two crops"
            )
        features = tuple(f for f, _ in captured[:views])
        projections = tuple(z for _, z in captured[:views])
        inputs = tuple(x.detach() for x in crops[:views])
        branches = self._msr_branches
        context = StepContext(inputs, projections, branches.online, branches.momentum, features)
        total = torch.zeros((), device=projections[0].device)
        for flag, term in self._msr_terms():
            loss = term.loss(context)
            self.log(f"train_{flag}_loss", loss.detach(), on_epoch=True, sync_dist=True)
            total = total + loss
        self._msr_pending = StepContext(
            inputs,
            tuple(z.detach() for z in projections),
            branches.online,
            branches.momentum,
            tuple(f.detach() for f in features),
        )
        if isinstance(out, Mapping):
            return {**out, "loss": out["loss"] + total}
        return out + total

    def _msr_count_step(self, *_: Any) -> None:
        self.msr_optimizer_steps += 1

    def optimizer_step(self, *args: Any, **kwargs: Any) -> Any:
        optimizer = self.trainer.optimizers[0]
        weights = _torch_optimizer(optimizer)
        if weights not in self._msr_watched:
            weights.register_step_post_hook(self._msr_count_step)
            self._msr_watched.add(weights)
        steps_before = self.msr_optimizer_steps
        result = super().optimizer_step(*args, **kwargs)
        pending, self._msr_pending = self._msr_pending, None
        if pending is not None and self.msr_optimizer_steps > steps_before:
            for _, term in self._msr_terms():
                term.after_optimizer_step(pending, optimizer)
        return result

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY] = {flag: term.extra_state() for flag, term in self._msr_terms()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        fresh = start_missing_terms_fresh(self, checkpoint)
        terms = dict(self._msr_terms())
        for flag, state in checkpoint.get(CHECKPOINT_KEY, {}).items():
            if flag in terms and flag not in fresh:
                terms[flag].load_extra_state(state)


class _DataloaderIndexCompat(_Host):
    """solo-learn 1.0.x's momentum methods take a ``dataloader_idx`` in ``on_train_batch_end``
    that pytorch-lightning 1.9 no longer passes; this passes 0, the only training dataloader."""

    def on_train_batch_end(
        self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx, dataloader_idx)


def start_missing_terms_fresh(model: nn.Module, checkpoint: dict[str, Any]) -> list[str]:
    """Makes a checkpoint written without some of ``model``'s terms load, those terms fresh.

    For each term whose state is missing from ``checkpoint["state_dict"]`` (or has other
    shapes), the model's current values are put there, its optimizer state under
    ``"msr_loss"`` is ignored, and a parameter group for the term's parameters in the host's
    optimizer (with the schedule state of the first group) is added to the saved optimizer and
    scheduler states. Prints one line naming the terms; returns their flags.

    Examples:
        >>> start_missing_terms_fresh(nn.Linear(2, 2), {"state_dict": {}})
        []
    """
    saved = checkpoint.get("state_dict")
    terms = getattr(model, "msr_terms", None)
    if saved is None or not isinstance(terms, nn.ModuleDict):
        return []
    own = model.state_dict()
    fresh = []
    for flag in terms:
        keys = [k for k in own if k.startswith(f"msr_terms.{flag}.")]
        if all(k in saved and saved[k].shape == own[k].shape for k in keys):
            continue
        for key in [k for k in saved if k.startswith(f"msr_terms.{flag}.")]:
            del saved[key]
        saved.update({k: own[k] for k in keys})
        fresh.append(flag)
    if fresh:
        _add_term_group(terms, checkpoint)
        print(
            f"msr-loss: the checkpoint has no state for {', '.join(fresh)}: "
            "starting that term fresh, the rest of the run resumes",
            file=sys.stderr,
        )
    return fresh


def _add_term_group(terms: nn.ModuleDict, checkpoint: dict[str, Any]) -> None:
    """Adds the terms' parameter group to saved optimizer and scheduler states that lack it."""
    count = sum(len(cast(AuxiliaryTerm, term).host_parameters()) for term in terms.values())
    if not count:
        return
    for state in checkpoint.get("optimizer_states", []):
        groups = state["param_groups"]
        if any(group.get("name") == TERM_GROUP for group in groups):
            continue
        first = max((i for group in groups for i in group["params"]), default=-1) + 1
        params = list(range(first, first + count))
        groups.append({**groups[0], "name": TERM_GROUP, "params": params})
        for scheduler in checkpoint.get("lr_schedulers", []):
            for key in ("base_lrs", "_last_lr"):
                values = scheduler.get(key)
                if isinstance(values, list) and len(values) == len(groups) - 1:
                    values.append(values[0])


def wrap_method(method_cls: type, *flags: FlagBlock) -> type:
    """A subclass of ``method_cls`` that adds the auxiliary terms described by ``flags``.

    Args:
        method_cls: A solo-learn method class (``solo.methods.SimCLR``, ``BYOL``, ...), either
            API (``__init__(cfg)`` on main, keyword arguments on PyPI 1.0.x).
        *flags: Parsed flag blocks, e.g. :class:`msr_loss.adapters.MSRFlags`,
            :class:`msr_loss.adapters.NSNegFlags` or :class:`msr_loss.adapters.MetaMaskFlags`;
            each has ``build(projection_dim)`` returning the term, which is then bound to the
            model (:meth:`AuxiliaryTerm.bind`), and a ``label`` that names it in the class name.

    Returns:
        The wrapped class, named after what was added (``SimCLRWithMSR``,
        ``BarlowTwinsWithMetaMask``, ``BYOLWithMSRAndNSNeg``); construct it exactly like
        ``method_cls``.

    Examples:
        >>> from solo.methods import SimCLR  # doctest: +SKIP
        >>> SimCLRWithMSR = wrap_method(SimCLR, MSRFlags(weight=0.5))  # doctest: +SKIP
    """
    api = solo_api(method_cls)
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
    momentum_on_lightning_1_9 = api == "kwargs" and any(
        klass.__name__ == "BaseMomentumMethod" for klass in host.__mro__
    )
    bases = (_AuxiliaryMixin, *([_DataloaderIndexCompat] if momentum_on_lightning_1_9 else []))
    name = f"{host.__name__}With{'And'.join(f.label for f in flags)}"
    return type(name, (*bases, host), namespace)


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
