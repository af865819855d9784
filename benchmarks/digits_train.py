"""Self-supervised pretraining runs of the confounded-digits benchmark, one method per run.

Runs with the same seed are paired: the same encoder initialisation, the same batches and the
same augmented views; only the objective differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from msr_loss import MetaSemanticRegularizer, MetaUpdate, info_nce, nt_xent

from .digits_data import ConfoundedDigits
from .digits_models import DigitsEncoder, augment

METHODS = {
    "random": "randomly initialised encoder, no training",
    "simclr": "SimCLR (NT-Xent) on full images",
    "simclr_fg": "SimCLR on foreground-only images (positive control)",
    "icl_msr": "SimCLR + ICL-MSR, strata learned by the finite-difference meta step",
    "icl_fixed": "SimCLR + ICL-MSR loss with fixed random strata (no meta step)",
    "patch_neg": "SimCLR + patch-based non-semantic negatives (alpha 2)",
    "metamask": "MetaMask: Barlow Twins + 10 NT-Xent (tau 0.07), mask learned by the meta step",
    "barlow": "Barlow Twins on full images",
    "barlow_icl": "Barlow Twins + ICL-MSR, strata learned by the finite-difference meta step",
}
RELATIVE_COST = {"random": 0.05, "icl_msr": 3.0, "icl_fixed": 1.1, "patch_neg": 2.0}
RELATIVE_COST |= {"metamask": 3.0, "barlow_icl": 3.0}
TRAINED_ON_FOREGROUNDS = frozenset({"simclr_fg"})
NEGATIVES_SEED_OFFSET = 1_000_003

Views = tuple[torch.Tensor, torch.Tensor]
Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters shared by every method (chosen before any test split was looked at).

    Args:
        epochs: Passes over the correlated training split.
        batch_size: Images per step (two views each); the last partial batch is dropped.
        lr: Adam learning rate of the encoder.
        temperature: Temperature of NT-Xent, of the ICL-MSR loss and of the meta objective.
        width: Encoder width (feature dimension ``8 * width``).
        projection_dim: Projection dimension D.
        num_strata: ICL-MSR's number of strata n.
        beta: Weight of the ICL-MSR loss.
        virtual_lr: Learning rate of the meta step's virtual SGD step.
        strata_lr: Adam learning rate of the strata.
        meta_every: Meta step on every ``meta_every``-th encoder step.
    """

    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    temperature: float = 0.2
    width: int = 8
    projection_dim: int = 32
    num_strata: int = 8
    beta: float = 1.0
    virtual_lr: float = 0.05
    strata_lr: float = 0.1
    meta_every: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 2 or self.meta_every < 1:
            raise ValueError(f"need epochs >= 0, batch_size >= 2 and meta_every >= 1: {self}")


@dataclass(frozen=True)
class TrainResult:
    """A trained encoder and what the run measured about itself.

    Attributes:
        encoder: The encoder, in eval mode.
        strata_shift_mean: Mean absolute change of the learned strata (or mask) in (0, 1); NaN
            for methods without them.
        strata_shift_max: Largest absolute change of one of their entries (NaN without them).
        seconds: Wall time of the training loop.
    """

    encoder: DigitsEncoder
    strata_shift_mean: float
    strata_shift_max: float
    seconds: float


@dataclass
class _Objective:
    parameters: list[nn.Parameter]
    loss: Callable[[Views], torch.Tensor]
    meta_step: Callable[[Views], object] | None = None
    learned: Callable[[], torch.Tensor] | None = None


def _two_views(forward: Forward, views: Views) -> tuple[torch.Tensor, ...]:
    return forward(torch.cat(views)).chunk(2)


def _with_strata(
    encoder: DigitsEncoder,
    config: TrainConfig,
    base: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    learn: bool,
) -> _Objective:
    msr = MetaSemanticRegularizer(
        config.projection_dim, config.num_strata, temperature=config.temperature, weight=config.beta
    )

    def loss(views: Views, forward: Forward = encoder) -> torch.Tensor:
        z1, z2 = _two_views(forward, views)
        return base(z1, z2) + msr(z1, z2)

    if not learn:
        msr.requires_grad_(False)
        return _Objective(list(encoder.parameters()), loss, learned=lambda: msr.strata)
    meta = MetaUpdate(
        encoder,
        msr.parameters(),
        torch.optim.Adam(msr.parameters(), lr=config.strata_lr),
        lr=config.virtual_lr,
        mode="finite_difference",
        every=config.meta_every,
    )

    def meta_loss(views: Views, forward: Forward) -> torch.Tensor:
        return info_nce(*_two_views(forward, views), temperature=config.temperature)

    def meta_step(views: Views) -> bool:
        return meta.step(lambda f: loss(views, f), lambda f: meta_loss(views, f))

    return _Objective(list(encoder.parameters()), loss, meta_step, lambda: msr.strata)


def _patch_negatives(encoder: DigitsEncoder, config: TrainConfig, seed: int) -> _Objective:
    from msr_loss.losses import NonSemanticContrastiveLoss
    from msr_loss.negatives import patch_negatives

    generator = torch.Generator().manual_seed(seed + NEGATIVES_SEED_OFFSET)
    criterion = NonSemanticContrastiveLoss(temperature=config.temperature, negatives="all")

    def loss(views: Views) -> torch.Tensor:
        negatives = [patch_negatives(view, generator=generator) for view in views]
        z1, z2, t1, t2 = encoder(torch.cat([*views, *negatives])).chunk(4)
        return criterion(z1, z2, t1, t2)

    return _Objective(list(encoder.parameters()), loss)


def _metamask(encoder: DigitsEncoder, config: TrainConfig) -> _Objective:
    from msr_loss.metamask import MetaMaskLoss, MetaMaskModel, MetaMaskUpdate

    width = encoder.feature_dim
    head = nn.Sequential(
        nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, config.projection_dim)
    )
    model = MetaMaskModel(encoder.backbone, width, encoder.projector, head)
    criterion = MetaMaskLoss()
    meta = MetaMaskUpdate(model, lr=config.virtual_lr, every=config.meta_every)

    def loss(views: Views) -> torch.Tensor:
        z, c = model(torch.cat(views))
        return criterion(*z.chunk(2), *c.chunk(2))

    def contrastive(views: Views, forward: Callable[..., tuple[torch.Tensor, ...]]) -> torch.Tensor:
        return criterion.contrastive(*forward(torch.cat(views))[1].chunk(2))

    def meta_step(views: Views) -> bool:
        return meta.step(lambda f: contrastive(views, f), lambda f: contrastive(views, f))

    return _Objective(model.encoder_parameters(), loss, meta_step, lambda: model.mask.mask)


def _objective(method: str, encoder: DigitsEncoder, config: TrainConfig, seed: int) -> _Objective:
    def simclr(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent(z1, z2, temperature=config.temperature)

    if method in ("simclr", "simclr_fg", "random"):
        return _Objective(
            list(encoder.parameters()), lambda views: simclr(*_two_views(encoder, views))
        )
    if method in ("icl_msr", "icl_fixed"):
        return _with_strata(encoder, config, simclr, learn=method == "icl_msr")
    if method == "patch_neg":
        return _patch_negatives(encoder, config, seed)
    if method == "metamask":
        return _metamask(encoder, config)
    from msr_loss.functional import barlow_twins

    if method == "barlow":
        return _Objective(
            list(encoder.parameters()), lambda views: barlow_twins(*_two_views(encoder, views))
        )
    return _with_strata(encoder, config, barlow_twins, learn=True)


def train(method: str, data: ConfoundedDigits, seed: int, config: TrainConfig) -> TrainResult:
    """Pretrains one encoder with ``method`` (a key of :data:`METHODS`).

    Args:
        method: The objective.
        data: The dataset; training uses ``data.train`` (its foregrounds for ``simclr_fg``).
        seed: Seeds the initialisation, the batch order and the views.
        config: The hyper-parameters.

    Returns:
        The trained encoder and how far its strata (or mask) moved.

    Raises:
        ValueError: On an unknown method.

    Examples:
        >>> data = build_confounded_digits(seed=0, max_samples=100)
        >>> result = train("simclr", data, seed=0, config=TrainConfig(epochs=1, batch_size=32))
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    torch.manual_seed(seed)
    encoder = DigitsEncoder(config.width, config.projection_dim)
    objective = _objective(method, encoder, config, seed)
    initial = None if objective.learned is None else objective.learned().detach().clone()
    start = time.perf_counter()
    if method != "random":
        images = data.train.foregrounds if method in TRAINED_ON_FOREGROUNDS else data.train.images
        _fit(encoder, objective, images, seed, config)
    encoder.eval()
    seconds = time.perf_counter() - start
    if objective.learned is None or initial is None:
        return TrainResult(encoder, float("nan"), float("nan"), seconds)
    shift = (objective.learned().detach() - initial).abs()
    return TrainResult(encoder, float(shift.mean()), float(shift.max()), seconds)


def _fit(
    encoder: DigitsEncoder,
    objective: _Objective,
    images: torch.Tensor,
    seed: int,
    config: TrainConfig,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(objective.parameters, lr=config.lr)
    encoder.train()
    steps_per_epoch = images.shape[0] // config.batch_size
    for _ in range(config.epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for step in range(steps_per_epoch):
            batch = images[order[step * config.batch_size : (step + 1) * config.batch_size]]
            views = (augment(batch, generator), augment(batch, generator))
            optimizer.zero_grad(set_to_none=True)
            objective.loss(views).backward()
            optimizer.step()
            if objective.meta_step is not None:
                objective.meta_step(views)
