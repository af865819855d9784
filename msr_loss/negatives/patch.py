"""Patch-based non-semantic negatives (Ge et al., NeurIPS 2021), batched on the images' device.

For every query view a canvas of random crops of that view (patch side drawn in [16/224, 72/224]
of the shorter image side, crops drawn with replacement), cut back to the view's size; built on
the fly, one per call. Encode them like the host method's keys (see :mod:`msr_loss.negatives`).
"""

from __future__ import annotations

import math

import torch

from msr_loss._validation import check_images, check_real

PATCH_RANGE = (16 / 224, 72 / 224)


def _patch_layout(
    batch: int,
    height: int,
    width: int,
    patch_range: tuple[float, float],
    generator: torch.Generator | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image a patch side ``p`` (B,) and crop corners ``(B, Gy, Gx)`` for a grid of cells."""
    side = min(height, width)
    smallest = max(1, round(patch_range[0] * side))
    largest = max(smallest, round(patch_range[1] * side))
    sizes = torch.randint(smallest, largest + 1, (batch,), generator=generator, device=device)
    cells = (math.ceil(height / smallest), math.ceil(width / smallest))
    uniform = torch.rand(2, batch, *cells, generator=generator, device=device)
    top_range = (height - sizes + 1).view(-1, 1, 1)
    left_range = (width - sizes + 1).view(-1, 1, 1)
    top = torch.minimum((uniform[0] * top_range).long(), top_range - 1)
    left = torch.minimum((uniform[1] * left_range).long(), left_range - 1)
    return sizes, top, left


def _assemble_patches(
    images: torch.Tensor, sizes: torch.Tensor, top: torch.Tensor, left: torch.Tensor
) -> torch.Tensor:
    """Cell ``(gy, gx)`` of image b is its ``p x p`` crop at ``(top, left)[b, gy, gx]``."""
    batch, channels, height, width = images.shape
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    p = sizes.view(-1, 1)
    cell_row, in_row = rows // p, rows % p
    cell_col, in_col = cols // p, cols % p
    cells_across = top.shape[2]
    cell = cell_row[:, :, None] * cells_across + cell_col[:, None, :]
    src_row = top.flatten(1).gather(1, cell.flatten(1)).view(batch, height, width)
    src_col = left.flatten(1).gather(1, cell.flatten(1)).view(batch, height, width)
    source = (src_row + in_row[:, :, None]) * width + src_col + in_col[:, None, :]
    index = source.view(batch, 1, -1).expand(batch, channels, -1)
    return images.flatten(2).gather(2, index).view_as(images)


def patch_negatives(
    images: torch.Tensor,
    *,
    patch_range: tuple[float, float] = PATCH_RANGE,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One patch-based non-semantic negative per image, batched on the images' device.

    For each image a patch side ``p`` is drawn uniformly among the integers from
    ``round(patch_range[0] * S)`` to ``round(patch_range[1] * S)`` (S the shorter side; 16 to 72
    pixels at 224), a grid of ``ceil(H / p) x ceil(W / p)`` cells is filled with independent
    random ``p x p`` crops of the image (with replacement) and cut back to ``H x W``.

    Args:
        images: (B, C, H, W) query views, any dtype.
        patch_range: Smallest and largest patch side as fractions of the shorter side.
        generator: Source of randomness, on the images' device, for reproducible negatives.

    Returns:
        A tensor with the shape, dtype and device of ``images``.

    Examples:
        >>> views = torch.rand(4, 3, 32, 32)
        >>> negatives = patch_negatives(views, generator=torch.Generator().manual_seed(0))
        >>> negatives.shape
        torch.Size([4, 3, 32, 32])
    """
    images = check_images(images, (4,))
    if len(patch_range) != 2:
        raise ValueError(f"patch_range must be a pair (low, high), got {patch_range!r}")
    low = check_real("patch_range[0]", patch_range[0], above=0, at_most=1.0)
    high = check_real("patch_range[1]", patch_range[1], above=0, at_most=1.0)
    if low > high:
        raise ValueError(f"patch_range must have low <= high, got {patch_range!r}")
    batch, _, height, width = images.shape
    sizes, top, left = _patch_layout(batch, height, width, (low, high), generator, images.device)
    return _assemble_patches(images, sizes, top, left)
