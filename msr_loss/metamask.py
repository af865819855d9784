"""MetaMask (Li, Qiang et al., NeurIPS 2022): a dimensional mask learned only by the meta step.

The backbone features are multiplied by ``M = sigmoid(m)`` (``m`` starts at 0) before two
projection heads; the encoder is trained on ``L_BT + w_cl * NT-Xent`` and the mask by
:class:`MetaMaskUpdate`, which is :class:`msr_loss.MetaUpdate` (the same meta engine as ICL-MSR's
strata) with the mask as meta parameter and NT-Xent as both the virtual-step and the meta loss.

The mask is frozen (``requires_grad=False``) outside the meta step, so the ordinary step gives it
no gradient and no optimizer can move it, even one built from ``model.parameters()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from msr_loss._validation import (
    check_choice,
    check_flag,
    check_integer,
    check_real,
    check_temperature,
)
from msr_loss.functional import barlow_twins, nt_xent
from msr_loss.meta import MetaUpdate
from msr_loss.types import BACKENDS, PRECISIONS, Backend, MetaMode, Precision


class DimensionalMask(nn.Module):
    """A learnable soft mask ``sigmoid(m)`` over feature dimensions, ``m`` initialised to 0.

    The logits ``m`` are frozen except inside :meth:`meta_phase`, which
    :class:`MetaMaskUpdate` enters for its meta step.

    Args:
        num_features: Feature width F (the backbone's output dimension).

    Examples:
        >>> mask = DimensionalMask(512)
        >>> mask(torch.ones(4, 512))[0, :3]
        tensor([0.5000, 0.5000, 0.5000])
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        num_features = check_integer("num_features", num_features, at_least=1)
        self.logits = nn.Parameter(torch.zeros(num_features), requires_grad=False)

    @property
    def mask(self) -> torch.Tensor:
        """The (F,) mask ``sigmoid(m)`` in (0, 1)."""
        return torch.sigmoid(self.logits)

    @contextlib.contextmanager
    def meta_phase(self) -> Iterator[None]:
        """Lets gradients reach the logits for the duration of the block."""
        previous = self.logits.requires_grad
        self.logits.requires_grad_(True)
        try:
            yield
        finally:
            self.logits.requires_grad_(previous)

    def attach(self, module: nn.Module) -> RemovableHandle:
        """Masks the output of ``module`` (e.g. a backbone) from now on, with a forward hook.

        Args:
            module: A module whose output has shape (N, F) or (N, F, ...).

        Returns:
            The hook's handle; ``handle.remove()`` detaches the mask again.

        Examples:
            >>> backbone, mask = nn.Linear(8, 4), DimensionalMask(4)
            >>> handle = mask.attach(backbone)
            >>> backbone(torch.randn(2, 8)).shape
            torch.Size([2, 4])
        """
        return module.register_forward_hook(lambda _module, _inputs, output: self(output))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Multiplies dimension 1 of ``features`` ((N, F) or (N, F, ...)) by the mask."""
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if features.dim() < 2 or features.shape[1] != self.logits.shape[0]:
            raise ValueError(
                f"features must have shape (N, {self.logits.shape[0]}, ...), "
                f"got {tuple(features.shape)}"
            )
        mask = self.mask.to(features.dtype)
        return features * mask.view(-1, *([1] * (features.dim() - 2)))

    def extra_repr(self) -> str:
        return f"num_features={self.logits.shape[0]}"


class MetaMaskLoss(nn.Module):
    """MetaMask's encoder objective ``L_BT(z1, z2) + w_cl * NT-Xent(c1, c2)``.

    ``z`` come from the Barlow Twins head, ``c`` from the contrastive head, both fed the masked
    features (see :class:`MetaMaskModel`). :meth:`contrastive` alone is the meta objective.

    Args:
        off_diagonal_weight: Barlow Twins' lambda.
        temperature: NT-Xent temperature (2N-2 negatives per anchor).
        contrastive_weight: The weight w_cl of the contrastive term.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for NT-Xent's similarity.
        gather_distributed: Gather NT-Xent's negatives from every rank. Barlow Twins keeps each
            rank's own batch statistics.
        precision: NT-Xent's similarity GEMM precision, ``"auto"``, ``"fp32"``, ``"tf32"`` or
            ``"bf16"`` (see :func:`msr_loss.interventional_loss`).

    Examples:
        >>> criterion = MetaMaskLoss()
        >>> z1, z2, c1, c2 = (torch.randn(8, 16) for _ in range(4))
        >>> loss = criterion(z1, z2, c1, c2)
    """

    def __init__(
        self,
        *,
        off_diagonal_weight: float = 5e-3,
        temperature: float = 0.07,
        contrastive_weight: float = 10.0,
        backend: Backend = "auto",
        gather_distributed: bool = False,
        precision: Precision = "auto",
    ) -> None:
        super().__init__()
        self.off_diagonal_weight = check_real(
            "off_diagonal_weight", off_diagonal_weight, at_least=0
        )
        self.temperature = check_temperature(temperature)
        self.contrastive_weight = check_real("contrastive_weight", contrastive_weight)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)
        self.precision = check_choice("precision", precision, PRECISIONS)

    def contrastive(self, c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
        """NT-Xent of the contrastive head's projections (the meta objective)."""
        return nt_xent(
            c1,
            c2,
            temperature=self.temperature,
            backend=self.backend,
            gather_distributed=self.gather_distributed,
            precision=self.precision,
        )

    def forward(
        self, z1: torch.Tensor, z2: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor
    ) -> torch.Tensor:
        """Returns ``barlow_twins(z1, z2) + contrastive_weight * contrastive(c1, c2)``."""
        redundancy = barlow_twins(z1, z2, off_diagonal_weight=self.off_diagonal_weight)
        return redundancy + self.contrastive_weight * self.contrastive(c1, c2)

    def extra_repr(self) -> str:
        return (
            f"off_diagonal_weight={self.off_diagonal_weight}, temperature={self.temperature}, "
            f"contrastive_weight={self.contrastive_weight}, precision={self.precision!r}"
        )


class MetaMaskModel(nn.Module):
    """A backbone, the dimensional mask on its features, and MetaMask's two projection heads.

    Args:
        backbone: Maps inputs to (N, F) features.
        num_features: F.
        projector: The Barlow Twins head.
        contrastive_projector: The contrastive (NT-Xent) head.

    Examples:
        >>> model = MetaMaskModel(nn.Linear(10, 6), 6, nn.Linear(6, 4), nn.Linear(6, 4))
        >>> z, c = model(torch.randn(3, 10))
        >>> optimizer = torch.optim.SGD(model.encoder_parameters(), lr=0.1)
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_features: int,
        projector: nn.Module,
        contrastive_projector: nn.Module,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.mask = DimensionalMask(num_features)
        self.projector = projector
        self.contrastive_projector = contrastive_projector

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the mask: what the encoder optimizer should get."""
        mask_ids = {id(p) for p in self.mask.parameters()}
        return [p for p in self.parameters() if id(p) not in mask_ids]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(projector(masked features), contrastive_projector(masked features))``."""
        features = self.mask(self.backbone(x))
        return self.projector(features), self.contrastive_projector(features)


def _mask_of(model: nn.Module) -> DimensionalMask:
    masks = [m for m in model.modules() if isinstance(m, DimensionalMask)]
    if len(masks) != 1:
        raise ValueError(
            f"model must contain exactly one DimensionalMask when mask is not given, "
            f"found {len(masks)}"
        )
    return masks[0]


class MetaMaskUpdate(MetaUpdate):
    """The mask's meta step: :class:`msr_loss.MetaUpdate` with the mask as meta parameter.

    Call :meth:`step` after the encoder's optimizer step with the contrastive loss as both
    ``train_loss`` (the virtual step's loss, as in MetaMask's code) and ``meta_loss``; the mask is
    unfrozen only for the duration of the meta step.

    Args:
        model: The module whose parameters take the virtual step (backbone and heads).
        mask: The mask to learn; by default the one :class:`DimensionalMask` inside ``model``.
        mask_optimizer: Defaults to MetaMask's SGD (lr 1e-3, momentum 0.9, weight decay 5e-4),
            whose state :meth:`state_dict` then carries.
        encoder_optimizer: The encoder's optimizer, mirrored by the virtual step. Either this or
            ``lr``.
        lr: A fixed learning rate for a plain virtual SGD step.
        mode: ``"exact"`` or ``"finite_difference"``.
        every: Update the mask on every ``every``-th call of :meth:`step`.

    Examples:
        >>> model = MetaMaskModel(nn.Linear(10, 6), 6, nn.Linear(6, 4), nn.Linear(6, 4))
        >>> meta = MetaMaskUpdate(model, lr=0.1)
        >>> x1, x2 = torch.randn(5, 10), torch.randn(5, 10)
        >>> contrastive = lambda f: MetaMaskLoss().contrastive(f(x1)[1], f(x2)[1])
        >>> meta.step(contrastive, contrastive)
        True
        >>> sorted(meta.state_dict())
        ['calls', 'meta_optimizer']
    """

    def __init__(
        self,
        model: nn.Module,
        mask: DimensionalMask | None = None,
        mask_optimizer: torch.optim.Optimizer | None = None,
        *,
        encoder_optimizer: torch.optim.Optimizer | None = None,
        lr: float | None = None,
        mode: MetaMode = "finite_difference",
        every: int = 1,
    ) -> None:
        self.mask = _mask_of(model) if mask is None else mask
        if not isinstance(self.mask, DimensionalMask):
            raise TypeError(f"mask must be a DimensionalMask, got {type(self.mask).__name__}")
        self.owns_meta_optimizer = mask_optimizer is None
        if mask_optimizer is None:
            mask_optimizer = torch.optim.SGD(
                self.mask.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4
            )
        super().__init__(
            model,
            self.mask.parameters(),
            mask_optimizer,
            encoder_optimizer=encoder_optimizer,
            lr=lr,
            mode=mode,
            every=every,
        )

    @contextlib.contextmanager
    def meta_phase(self) -> Iterator[None]:
        """The mask is unfrozen for the duration of the meta step."""
        with self.mask.meta_phase():
            yield
