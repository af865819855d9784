"""Frozen-feature evaluation of a pretrained encoder on the confounded digits.

Two protocols, side by side:

- The paper's: probes fit on the pretraining domain (correlated full images, or foregrounds for
  a foreground-trained encoder), tested on full images whose background is correlated with the
  label as in training (like the paper's natural images), on shifted full images and on
  foregrounds. With the linear probe these are the Background Challenge's (Xiao et al., ICLR
  2021) Original, Mixed-Rand and Only-FG; Mixed-Same and Only-BG-T are added, and
  BG-Gap = acc(Mixed-Same) - acc(Mixed-Rand).
- Neutral probes: background decodability (a linear probe predicting the background family,
  lower is better), and the digit probe fit on shifted-background training images and tested on
  shifted test images ("neutral shift"), or fit and tested on foregrounds.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .digits_data import ConfoundedDigits
from .digits_models import DigitsEncoder

METRICS = {
    "bg_decod": "background family decodable from features, % (lower is better)",
    "neutral_shift": "digit probe fit and tested on shifted-background images, %",
    "neutral_fg": "digit probe fit and tested on foregrounds, %",
    "paper_lin_corr": "paper protocol, linear probe, correlated full test images, %",
    "paper_lin_full": "paper protocol, linear probe, shifted full test images, %",
    "paper_lin_fg": "paper protocol, linear probe, foreground test images, %",
    "paper_lin_same": "paper protocol, linear probe, digits on their class's family, %",
    "paper_lin_bg": "paper protocol, linear probe, backgrounds of paper_lin_same alone, %",
    "bg_gap": "BG-Gap: paper_lin_same - paper_lin_full, points (lower is better)",
    "paper_knn_corr": "paper protocol, 5-NN, correlated full test images, %",
    "paper_knn_full": "paper protocol, 5-NN, shifted full test images, %",
    "paper_knn_fg": "paper protocol, 5-NN, foreground test images, %",
}


@torch.no_grad()
def features(encoder: DigitsEncoder, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Backbone features (before the projector) of ``images``, encoder in eval mode.

    Examples:
        >>> features(DigitsEncoder(width=4), torch.rand(3, 1, 32, 32)).shape
        (3, 32)
    """
    encoder.eval()
    chunks = [
        encoder.backbone(images[i : i + batch_size]) for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks).numpy()


def _accuracies(
    classifier: object,
    train: tuple[np.ndarray, np.ndarray],
    tests: list[tuple[np.ndarray, np.ndarray]],
) -> list[float]:
    model = make_pipeline(StandardScaler(), classifier)
    model.fit(*train)
    return [100.0 * float(model.score(x, y)) for x, y in tests]


def _linear(
    train: tuple[np.ndarray, np.ndarray], *tests: tuple[np.ndarray, np.ndarray]
) -> list[float]:
    return _accuracies(LogisticRegression(max_iter=2000), train, list(tests))


def _knn(
    train: tuple[np.ndarray, np.ndarray], *tests: tuple[np.ndarray, np.ndarray]
) -> list[float]:
    return _accuracies(KNeighborsClassifier(n_neighbors=5), train, list(tests))


def evaluate(
    encoder: DigitsEncoder, data: ConfoundedDigits, *, trained_on_foregrounds: bool
) -> dict[str, float]:
    """Every metric of :data:`METRICS` for one frozen encoder.

    Args:
        encoder: The pretrained encoder.
        data: The dataset it was pretrained on.
        trained_on_foregrounds: Whether it was pretrained on foregrounds; decides the paper
            protocol's probe training images.

    Returns:
        Accuracies in percent, keyed by metric name.

    Examples:
        >>> from msr_loss.benchmarks.digits_data import build_confounded_digits
        >>> data = build_confounded_digits(seed=0, max_samples=100)
        >>> scores = evaluate(DigitsEncoder(width=4), data, trained_on_foregrounds=False)
    """
    labels = {name: split.labels.numpy() for name, split in vars(data).items()}
    neutral = features(encoder, data.train_neutral.images)
    test_full = features(encoder, data.test.images)
    train_fg = features(encoder, data.train.foregrounds)
    test_fg = features(encoder, data.test.foregrounds)
    test_corr = features(encoder, data.test_correlated.images)
    pretrain = train_fg if trained_on_foregrounds else features(encoder, data.train.images)
    families = (data.train_neutral.families.numpy(), data.test.families.numpy())
    full_test, fg_test = (test_full, labels["test"]), (test_fg, labels["test"])
    tests = (test_corr, labels["test_correlated"]), full_test, fg_test
    challenge = [
        (features(encoder, split.images), split.labels.numpy())
        for split in (data.test_same, data.test_only_bg)
    ]
    paper_train = (pretrain, labels["train"])
    paper_lin = _linear(paper_train, *tests, *challenge)
    paper_knn = _knn(paper_train, *tests)
    return {
        "bg_decod": _linear((neutral, families[0]), (test_full, families[1]))[0],
        "neutral_shift": _linear((neutral, labels["train_neutral"]), full_test)[0],
        "neutral_fg": _linear((train_fg, labels["train"]), fg_test)[0],
        "paper_lin_corr": paper_lin[0],
        "paper_lin_full": paper_lin[1],
        "paper_lin_fg": paper_lin[2],
        "paper_lin_same": paper_lin[3],
        "paper_lin_bg": paper_lin[4],
        "bg_gap": paper_lin[3] - paper_lin[1],
        "paper_knn_corr": paper_knn[0],
        "paper_knn_full": paper_knn[1],
        "paper_knn_fg": paper_knn[2],
    }
