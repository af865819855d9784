"""Whole training runs of every flag block on solo-learn's default schedule, as CI runs them.

solo-learn 1.0.2 (the one PyPI has) with pytorch-lightning 1.9: SimCLR, BYOL and Barlow Twins,
each with ``msr``, ``nsneg``, ``metamask`` and all three, trained through two full epochs by the
real Lightning ``Trainer`` on solo's own optimizer (SGD wrapped in its LARS) and its
``warmup_cosine`` schedule from ``warmup_start_lr = 0`` (so the whole first epoch runs at lr 0,
the case that used to crash stage 2), with ``accumulate_grad_batches = 2`` and two large plus two
small crops (Barlow Twins: two large crops, as 1.0.2's Barlow Twins unpacks exactly two). Tiny:
resnet18 on 16x16 scikit-learn digits (small crops 8x8), batch 4, 8 images, one CPU thread.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from msr_loss.adapters import MetaMaskFlags, MSRFlags, NSNegFlags, wrap_method
from test_solo_learn_adapter import (
    API,
    COMMON,
    MOMENTUM_KWARGS,
    SPECIFIC_KWARGS,
    BaseMomentumMethod,
    backbone,
    one_thread,  # noqa: F401  (the autouse fixture pinning torch to one thread)
    pl,
    sklearn_datasets,
    solo_methods,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.skipif(API != "kwargs", reason="the CI schedule is written for solo-learn 1.0.x"),
]
BATCH, IMAGES, EPOCHS, ACCUMULATE = 4, 8, 2, 2
REAL_STEPS = EPOCHS * IMAGES // (BATCH * ACCUMULATE)
SMALL_CROPS = {"simclr": 2, "byol": 2, "barlow_twins": 0}
BLOCKS = {
    "msr": (MSRFlags(num_strata=4, meta_lr=0.1),),
    "nsneg": (NSNegFlags(weight=0.5),),
    "metamask": (MetaMaskFlags(weight=1.0, head_hidden_dim=32, mask_lr=0.5),),
}
BLOCKS["all"] = tuple(flags for block in BLOCKS.values() for flags in block)


class MultiCropDigits(Dataset):
    """Digits at 16x16 RGB: two large crops (shifts and noise) and ``small`` 8x8 crops of each."""

    def __init__(self, small: int) -> None:
        digits = sklearn_datasets.load_digits()
        images = torch.tensor(digits.images[:IMAGES], dtype=torch.float32)[:, None] / 16.0
        self.images = F.interpolate(images, size=16, mode="bilinear").expand(-1, 3, -1, -1)
        self.labels = torch.tensor(digits.target[:IMAGES])
        self.small = small

    def __len__(self) -> int:
        return IMAGES

    def _large(self, image: torch.Tensor) -> torch.Tensor:
        shift = torch.randint(-2, 3, (2,))
        moved = torch.roll(image, shifts=(int(shift[0]), int(shift[1])), dims=(1, 2))
        return moved + 0.1 * torch.randn_like(moved)

    def _small(self, image: torch.Tensor) -> torch.Tensor:
        row, col = (int(i) for i in torch.randint(0, 5, (2,)))
        crop = image[None, :, row : row + 12, col : col + 12]
        return F.interpolate(crop, size=8, mode="bilinear")[0]

    def __getitem__(self, index: int) -> tuple[int, list[torch.Tensor], torch.Tensor]:
        image = self.images[index]
        crops = [self._large(image), self._large(image)]
        crops += [self._small(image) for _ in range(self.small)]
        return index, crops, self.labels[index]


def default_schedule(method: str) -> dict:
    """solo-learn 1.0.2's keyword arguments for a LARS, warm-up then cosine-to-0 run."""
    momentum = issubclass(solo_methods.METHODS[method], BaseMomentumMethod)
    return {
        **COMMON,
        "batch_size": BATCH,
        "max_epochs": EPOCHS,
        "lr": 0.3,
        "lars": True,
        "eta_lars": 0.02,
        "exclude_bias_n_norm": True,
        "scheduler": "warmup_cosine",
        "warmup_epochs": 1,
        "warmup_start_lr": 0.0,
        "min_lr": 0.0,
        "accumulate_grad_batches": ACCUMULATE,
        "num_large_crops": 2,
        "num_small_crops": SMALL_CROPS[method],
        "proj_output_dim": 16,
        "proj_hidden_dim": 32,
        **SPECIFIC_KWARGS[method],
        **(MOMENTUM_KWARGS if momentum else {}),
    }


def batch_norm_updates(module: nn.Module | None) -> int:
    """How many train-mode forwards the first BatchNorm of ``module`` has counted."""
    if module is None:
        return 0
    first = next(m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return int(first.num_batches_tracked)


def momentum_backbone(model) -> nn.Module | None:
    return getattr(model, "momentum_encoder", getattr(model, "momentum_backbone", None))


def moved(model, flag: str) -> float:
    term = model.msr_terms[flag]
    return float((term.regularizer.logits if flag == "msr" else term.mask.logits).abs().max())


@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("method", list(SMALL_CROPS))
def test_every_flag_block_trains_through_the_default_schedule(method, block):
    flags = BLOCKS[block]
    cls = wrap_method(solo_methods.METHODS[method], *flags)
    pl.seed_everything(0, workers=True)
    model = cls(**default_schedule(method))
    before = {
        flag: model.msr_terms[flag].state_dict() for flag in model.msr_terms if flag != "nsneg"
    }
    before = {flag: {k: v.clone() for k, v in state.items()} for flag, state in before.items()}
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        accumulate_grad_batches=ACCUMULATE,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(MultiCropDigits(SMALL_CROPS[method]), batch_size=BATCH, shuffle=True)
    trainer.fit(model, loader)

    assert trainer.state.finished and trainer.current_epoch == EPOCHS
    assert type(model.trainer.optimizers[0]).__name__ == "LARSWrapper"
    batches = EPOCHS * len(loader)
    assert trainer.global_step == model.msr_optimizer_steps == REAL_STEPS
    for flag in model.msr_terms:
        assert torch.isfinite(trainer.callback_metrics[f"train_{flag}_loss"]), flag
    for flag, state in before.items():
        term = model.msr_terms[flag]
        assert term.meta_calls == REAL_STEPS, flag
        meta = "regularizer.logits" if flag == "msr" else "mask.logits"
        change = (term.state_dict()[meta] - state[meta]).abs().max()
        assert change > 1e-4, f"{flag}: {meta} moved by {change}"
    crops = 2 + SMALL_CROPS[method]
    assert batch_norm_updates(backbone(model)) == batches * crops
    assert batch_norm_updates(momentum_backbone(model)) == (
        batches * 2 if momentum_backbone(model) is not None else 0
    )
