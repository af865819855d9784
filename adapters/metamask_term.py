"""The ``metamask`` flag block: MetaMask's dimensional mask, contrastive head and meta step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from msr_loss._validation import check_choice, check_integer, check_real, check_temperature
from msr_loss.functional import nt_xent
from msr_loss.meta import Forward
from msr_loss.metamask import DimensionalMask, MetaMaskUpdate
from msr_loss.types import BACKENDS, META_MODES, PRECISIONS, Backend, MetaMode, Precision

from .terms import AuxiliaryTerm, Check, FlagBlock, StepContext, positive


class _MaskedHead(nn.Module):
    """Backbone, mask, contrastive head: the module the meta step's virtual step moves."""

    def __init__(self, backbone: nn.Module, mask: DimensionalMask, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.mask = mask
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mask(self.backbone(x)))


class MetaMaskTerm(AuxiliaryTerm):
    """MetaMask on a solo-learn method: a mask in front of the projectors, a contrastive head.

    :meth:`bind` puts a :class:`msr_loss.DimensionalMask` of the backbone's width
    (``features_dim``) in front of the host's ``projector`` (and ``momentum_projector``), so every
    projection head sees masked features while the online classifier, k-NN and
    ``main_linear.py`` see the backbone's own; it adds a contrastive head
    (Linear, BatchNorm, ReLU, Linear) trained by the host's optimizer. Stage 1 adds
    ``weight * NT-Xent`` of the head on the masked features of every crop the method projected
    (large and small; each crop's positives are the other crops of its image); the mask is frozen
    there. Stage 2 is :class:`msr_loss.MetaMaskUpdate` after each real host optimizer step: a
    virtual step of backbone and head mirroring the host optimizer, with NT-Xent of the
    same crops as both the virtual step's loss and the meta objective, as in MetaMask's code.

    Args:
        flags: The ``metamask`` flag block.
        projection_dim: Output width of the contrastive head (the host projector's).

    Examples:
        >>> host = nn.Module()
        >>> host.backbone, host.features_dim = nn.Linear(8, 16), 16
        >>> host.projector = nn.Linear(16, 4)
        >>> term = MetaMaskTerm(MetaMaskFlags(head_hidden_dim=32), projection_dim=4)
        >>> term.bind(host)
        >>> host.projector(host.backbone(torch.randn(3, 8))).shape
        torch.Size([3, 4])
        >>> term.mask.logits.shape
        torch.Size([16])
    """

    flag = "metamask"
    mask: DimensionalMask
    head: nn.Module
    mask_optimizer: torch.optim.Optimizer

    def __init__(self, flags: MetaMaskFlags, projection_dim: int) -> None:
        super().__init__()
        self.flags = flags
        self.projection_dim = projection_dim
        self.meta_calls = 0
        self._meta: MetaMaskUpdate | None = None

    def bind(self, host: nn.Module) -> None:
        width = getattr(host, "features_dim", None)
        if isinstance(width, bool) or not isinstance(width, int):
            raise TypeError(
                f"{type(host).__name__} has no int 'features_dim'; the metamask term needs the "
                "backbone's output width"
            )
        flags = self.flags
        with torch.random.fork_rng(devices=[]):
            self.mask = DimensionalMask(width)
            self.head = nn.Sequential(
                nn.Linear(width, flags.head_hidden_dim),
                nn.BatchNorm1d(flags.head_hidden_dim),
                nn.ReLU(),
                nn.Linear(flags.head_hidden_dim, self.projection_dim),
            )
        self.mask_optimizer = torch.optim.SGD(
            self.mask.parameters(),
            lr=flags.mask_lr,
            momentum=flags.mask_momentum,
            weight_decay=flags.mask_weight_decay,
        )
        for name in ("projector", "momentum_projector"):
            projector = getattr(host, name, None)
            if isinstance(projector, nn.Module):
                projector.register_forward_pre_hook(self._mask_input)

    def _mask_input(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self.mask(args[0]), *args[1:])

    def host_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def _contrastive(self, projections: Sequence[torch.Tensor]) -> torch.Tensor:
        return nt_xent(
            projections[0],
            projections[1],
            temperature=self.flags.temperature,
            backend=self.flags.backend,
            precision=self.flags.precision,
            gather_distributed=self.flags.gather_distributed,
            more_views=projections[2:],
        )

    def loss(self, context: StepContext) -> torch.Tensor:
        if context.features is None:
            raise ValueError("the metamask term needs the backbone features in the StepContext")
        return self.flags.weight * self._contrastive([self.head(f) for f in context.features])

    def _meta_update(
        self, context: StepContext, optimizer: torch.optim.Optimizer
    ) -> MetaMaskUpdate:
        backbone = context.encoder.get_submodule("backbone")
        meta = self._meta
        if (
            meta is None
            or meta.encoder_optimizer is not optimizer
            or meta.encoder.backbone is not (backbone)
        ):
            meta = MetaMaskUpdate(
                _MaskedHead(backbone, self.mask, self.head),
                self.mask,
                self.mask_optimizer,
                encoder_optimizer=optimizer,
                mode=self.flags.meta_mode,
                every=self.flags.meta_every,
            )
            meta.calls = self.meta_calls
            self._meta = meta
        return meta

    def after_optimizer_step(self, context: StepContext, optimizer: torch.optim.Optimizer) -> None:
        crops = context.crops

        def contrastive(forward: Forward) -> torch.Tensor:
            return self._contrastive([forward(x) for x in crops])

        meta = self._meta_update(context, optimizer)
        meta.step(contrastive, contrastive)
        self.meta_calls = meta.calls

    def extra_state(self) -> dict[str, Any]:
        return {"mask_optimizer": self.mask_optimizer.state_dict(), "meta_calls": self.meta_calls}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.mask_optimizer.load_state_dict(state["mask_optimizer"])
        self.meta_calls = int(state["meta_calls"])
        self._meta = None


@dataclass(frozen=True)
class MetaMaskFlags(FlagBlock):
    """The ``metamask`` flag block: MetaMask on a solo-learn method.

    The term adds ``weight * NT-Xent`` of a second (contrastive) head; on solo-learn's
    ``barlow_twins`` (with ``scale_loss=1`` and ``lamb=0.005``) the total loss is MetaMask's
    objective ``L_BT + w_cl * NT-Xent``, up to solo-learn's own Barlow Twins normalisation.

    Args:
        weight: The factor w_cl >= 0 on the contrastive term (10 in MetaMask).
        temperature: NT-Xent temperature.
        head_hidden_dim: Hidden width of the contrastive head; its output width is the host
            projector's.
        mask_lr: Learning rate of the mask's SGD optimizer.
        mask_momentum: Momentum of the mask's SGD optimizer, in [0, 1].
        mask_weight_decay: Weight decay (>= 0) of the mask's SGD optimizer.
        meta_every: Run the meta step after every ``meta_every``-th optimizer step.
        meta_mode: ``"finite_difference"`` or ``"exact"`` (see :class:`msr_loss.MetaUpdate`).
        backend: Similarity backend of NT-Xent, ``"auto"``, ``"torch"`` or ``"triton"``.
        precision: Similarity GEMM precision, ``"auto"``, ``"fp32"``, ``"tf32"`` or ``"bf16"``.
        gather_distributed: Under DDP, take NT-Xent's negatives from every rank.
        enabled: Whether the term is on; a block without ``enabled`` is on.

    Examples:
        >>> MetaMaskFlags.from_block({"weight": 1, "meta_mode": "exact"}).weight
        1.0
    """

    term_type = MetaMaskTerm
    label = "MetaMask"
    checks: ClassVar[Mapping[str, Check]] = {
        "weight": partial(check_real, at_least=0),
        "temperature": lambda name, value: check_temperature(value, name),
        "head_hidden_dim": partial(check_integer, at_least=1),
        "mask_lr": positive,
        "mask_momentum": partial(check_real, at_least=0, at_most=1),
        "mask_weight_decay": partial(check_real, at_least=0),
        "meta_every": partial(check_integer, at_least=1),
        "meta_mode": partial(check_choice, allowed=META_MODES),
        "backend": partial(check_choice, allowed=BACKENDS),
        "precision": partial(check_choice, allowed=PRECISIONS),
    }

    weight: float = 10.0
    temperature: float = 0.07
    head_hidden_dim: int = 2048
    mask_lr: float = 1e-3
    mask_momentum: float = 0.9
    mask_weight_decay: float = 5e-4
    meta_every: int = 1
    meta_mode: MetaMode = "finite_difference"
    backend: Backend = "auto"
    precision: Precision = "auto"
    gather_distributed: bool = False
    enabled: bool = True
