"""The encoder of the confounded-digits benchmark (a small CNN or a timm model) and its views."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _small_cnn(width: int) -> nn.Sequential:
    return nn.Sequential(
        _block(1, width),
        nn.MaxPool2d(2),
        _block(width, 2 * width),
        nn.MaxPool2d(2),
        _block(2 * width, 4 * width),
        nn.MaxPool2d(2),
        _block(4 * width, 8 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def check_backbone(name: str) -> None:
    """Raises ValueError unless ``name`` is ``"cnn"`` or a timm model name.

    Examples:
        >>> check_backbone("cnn")
    """
    if name == "cnn":
        return
    import timm

    if name not in timm.list_models():
        raise ValueError(f"backbone must be 'cnn' or a timm model name, got {name!r}")


def _timm_backbone(name: str) -> tuple[nn.Module, int]:
    import timm

    check_backbone(name)
    model = timm.create_model(name, pretrained=False, in_chans=1, num_classes=0)
    with torch.no_grad():
        width = model.eval()(torch.zeros(1, 1, 32, 32)).shape[-1]
    return model.train(), int(width)


class DigitsEncoder(nn.Module):
    """A backbone (features) followed by a 2-layer MLP projector (projections).

    Args:
        width: Channels of the small CNN's first layer, doubled by each of the next three; its
            feature dimension is ``8 * width``. Ignored for a timm backbone.
        projection_dim: Output dimension of the projector.
        backbone: ``"cnn"``, the 4-layer CNN, or the name of a timm model (e.g.
            ``"resnet10t"``), built untrained with ``in_chans=1`` and no classifier.

    Examples:
        >>> encoder = DigitsEncoder(width=8)
        >>> encoder(torch.rand(2, 1, 32, 32)).shape
        torch.Size([2, 32])
        >>> DigitsEncoder(backbone="resnet10t").feature_dim
        512
    """

    def __init__(self, width: int = 8, projection_dim: int = 32, backbone: str = "cnn") -> None:
        super().__init__()
        if width < 1 or projection_dim < 1:
            raise ValueError(
                f"width and projection_dim must be >= 1, got {width} and {projection_dim}"
            )
        if backbone == "cnn":
            self.backbone: nn.Module = _small_cnn(width)
            self.feature_dim = 8 * width
        else:
            self.backbone, self.feature_dim = _timm_backbone(backbone)
        self.projector = nn.Sequential(
            nn.Linear(self.feature_dim, self.feature_dim),
            nn.ReLU(inplace=True),
            nn.Linear(self.feature_dim, projection_dim),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Projections of a (B, 1, H, W) batch."""
        return self.projector(self.backbone(images))


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random view per image: resized crop, contrast and brightness jitter, pixel noise.

    The crop covers 35-100% of the area with aspect ratio in [3/4, 4/3]; no flips (digits are
    not mirror-symmetric). Draws only from ``generator``, so runs with the same generator state
    see the same views.

    Args:
        images: (B, 1, H, W) batch in [0, 1].
        generator: The source of randomness.

    Returns:
        A (B, 1, H, W) batch of views.

    Examples:
        >>> views = augment(torch.rand(4, 1, 32, 32), torch.Generator().manual_seed(0))
    """
    n = images.shape[0]
    area = _uniform(n, 0.35, 1.0, generator)
    log_ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), generator)
    width = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    height = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    shift_x = (1 - width) * _uniform(n, -1.0, 1.0, generator)
    shift_y = (1 - height) * _uniform(n, -1.0, 1.0, generator)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width, shift_x
    theta[:, 1, 1], theta[:, 1, 2] = height, shift_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, padding_mode="reflection", align_corners=False)
    contrast = _uniform(n, 0.6, 1.4, generator).view(n, 1, 1, 1)
    brightness = _uniform(n, -0.2, 0.2, generator).view(n, 1, 1, 1)
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    views = (views - mean) * contrast + mean + brightness
    return views + 0.05 * torch.randn(views.shape, generator=generator)
