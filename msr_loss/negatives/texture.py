"""Texture-based non-semantic negatives (Ge et al., NeurIPS 2021), synthesised offline on the CPU.

The paper ran an external synthesiser on two crops of each image (centre and random); here the
synthesis is a simple patch quilting (Efros and Freeman, 2001) written for this project: blocks
from the two crops are laid in raster order, each chosen among the best matches of its overlap
with what is already laid, and joined along a minimum-error boundary cut. Every output pixel is a
pixel of the image. :func:`synthesize_texture_folder` runs it over a folder of images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from msr_loss._validation import check_finite, check_images, check_integer, check_real

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _minimum_cut(errors: torch.Tensor) -> torch.Tensor:
    """For a (rows, cols) error surface, a mask True right of the cheapest top-to-bottom path."""
    rows, cols = errors.shape
    cost = errors.clone()
    for r in range(1, rows):
        padded = F.pad(cost[r - 1], (1, 1), value=math.inf)
        cost[r] += torch.minimum(torch.minimum(padded[:-2], padded[1:-1]), padded[2:])
    path = torch.empty(rows, dtype=torch.long)
    path[-1] = int(cost[-1].argmin())
    for r in range(rows - 2, -1, -1):
        lo, hi = max(0, int(path[r + 1]) - 1), min(cols, int(path[r + 1]) + 2)
        path[r] = lo + int(cost[r, lo:hi].argmin())
    return torch.arange(cols)[None, :] >= path[:, None]


def _overlap_errors(
    exemplars: torch.Tensor, energy: torch.Tensor, target: torch.Tensor, known: torch.Tensor
) -> torch.Tensor:
    """Sum of squared differences over ``known`` pixels, for every block position, (E, P, Q).

    ``energy`` is the sum of squared exemplar pixels over ``known`` at every position.
    """
    weight = (target * known)[None]
    cross = F.conv2d(exemplars, weight).squeeze(1)
    return energy - 2 * cross + (weight * weight).sum()


def _quilt(
    exemplars: torch.Tensor,
    height: int,
    width: int,
    block: int,
    overlap: int,
    tolerance: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Image quilting from (E, C, S, S) exemplars into a (C, height, width) texture."""
    count, channels, size, _ = exemplars.shape
    as_float = exemplars.to(torch.float32)
    squared = as_float * as_float
    energies: dict[tuple[bool, bool], torch.Tensor] = {}
    stride = block - overlap
    down = max(1, math.ceil((height - overlap) / stride))
    across = max(1, math.ceil((width - overlap) / stride))
    shape = (channels, down * stride + overlap, across * stride + overlap)
    canvas = torch.zeros(shape, dtype=exemplars.dtype)
    positions = size - block + 1
    for i in range(down):
        for j in range(across):
            y, x = i * stride, j * stride
            known = torch.zeros(1, block, block)
            if i:
                known[:, :overlap] = 1
            if j:
                known[:, :, :overlap] = 1
            region = (slice(None), slice(y, y + block), slice(x, x + block))
            target = canvas[region].to(torch.float32)
            if i or j:
                if (i > 0, j > 0) not in energies:
                    mask = known.expand(channels, -1, -1)[None]
                    energies[i > 0, j > 0] = F.conv2d(squared, mask).squeeze(1)
                energy = energies[i > 0, j > 0]
                errors = _overlap_errors(as_float, energy, target, known).flatten().clamp_min(0)
                good = torch.nonzero(errors <= errors.min() * (1 + tolerance) + 1e-12).flatten()
            else:
                good = torch.arange(count * positions * positions)
            pick = int(good[torch.randint(len(good), (1,), generator=generator)])
            e, rest = divmod(pick, positions * positions)
            py, px = divmod(rest, positions)
            patch_float = as_float[e, :, py : py + block, px : px + block]
            take = torch.ones(block, block, dtype=torch.bool)
            if j:
                diff = ((patch_float - target) ** 2).sum(0)[:, :overlap]
                take[:, :overlap] &= _minimum_cut(diff)
            if i:
                diff = ((patch_float - target) ** 2).sum(0)[:overlap, :]
                take[:overlap, :] &= _minimum_cut(diff.T).T
            patch = exemplars[e, :, py : py + block, px : px + block]
            canvas[region] = torch.where(take, patch, canvas[region])
    return canvas[:, :height, :width]


def texture_negatives(
    images: torch.Tensor,
    *,
    crop_fraction: float = 96 / 224,
    block_fraction: float = 1 / 3,
    overlap_fraction: float = 1 / 6,
    tolerance: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Texture-based non-semantic negatives by patch quilting from two crops of each image.

    For each image, two square crops of side ``crop_fraction * S`` (S the shorter side) are
    taken, one at the centre and one at a random place (the paper's preprocessing cut 96 px
    crops; the default is 96/224 of the side), and a texture of the image's size is quilted from
    them: square blocks of side ``block_fraction`` of the crop, overlapping by
    ``overlap_fraction`` of the block, each drawn at random among the blocks whose overlap error
    is within ``1 + tolerance`` of the best, joined along the minimum-error boundary cut. Runs
    offline on the CPU (a Python loop over blocks; a few seconds per 224 px image).

    Args:
        images: (C, H, W) or (B, C, H, W) images, any dtype, at least 2 x 2.
        crop_fraction: Side of the two crops as a fraction of the shorter image side.
        block_fraction: Side of a quilting block as a fraction of the crop side.
        overlap_fraction: Overlap of neighbouring blocks as a fraction of the block side.
        tolerance: Relative slack on the best overlap error when choosing a block.
        generator: A CPU generator, for reproducible textures.

    Returns:
        A CPU tensor with the shape and dtype of ``images``; every pixel is a pixel of its image.

    Examples:
        >>> image = torch.rand(3, 24, 24)
        >>> texture = texture_negatives(image, generator=torch.Generator().manual_seed(0))
        >>> texture.shape
        torch.Size([3, 24, 24])
    """
    images = check_images(images, (3, 4))
    if images.is_floating_point():
        check_finite("images", images)
    crop_fraction = check_real("crop_fraction", crop_fraction, above=0, at_most=1.0)
    block_fraction = check_real("block_fraction", block_fraction, above=0, at_most=1.0)
    overlap_fraction = check_real("overlap_fraction", overlap_fraction, above=0, at_most=0.5)
    tolerance = check_real("tolerance", tolerance, at_least=0)
    height, width = images.shape[-2:]
    if min(height, width) < 2:
        raise ValueError(f"images must be at least 2x2 pixels, got {height}x{width}")
    crop = min(max(2, round(crop_fraction * min(height, width))), min(height, width))
    block = min(max(2, round(block_fraction * crop)), crop)
    overlap = min(max(1, round(overlap_fraction * block)), block - 1)
    batch = images.reshape(-1, *images.shape[-3:]).cpu()
    textures = []
    for image in batch:
        corner = torch.rand(2, generator=generator, dtype=torch.float64)
        ry = int(corner[0] * (height - crop + 1))
        rx = int(corner[1] * (width - crop + 1))
        cy, cx = (height - crop) // 2, (width - crop) // 2
        exemplars = torch.stack(
            [image[:, cy : cy + crop, cx : cx + crop], image[:, ry : ry + crop, rx : rx + crop]]
        )
        textures.append(_quilt(exemplars, height, width, block, overlap, tolerance, generator))
    return torch.stack(textures).view_as(images)


def synthesize_texture_folder(
    source: str | Path,
    target: str | Path,
    *,
    seed: int = 0,
    suffixes: Sequence[str] = IMAGE_SUFFIXES,
    crop_fraction: float = 96 / 224,
    block_fraction: float = 1 / 3,
    overlap_fraction: float = 1 / 6,
    tolerance: float = 0.1,
) -> list[Path]:
    """Writes a texture negative (PNG, RGB) for every image under ``source`` into ``target``.

    The folder structure is mirrored (``source/a/b.jpg`` -> ``target/a/b.png``); images are
    processed in sorted order, image k with a generator seeded ``seed + k``. Needs Pillow.

    Args:
        source: Folder searched recursively for images.
        target: Output folder, created if needed.
        seed: Base seed.
        suffixes: File suffixes (lower case) counted as images.
        crop_fraction: See :func:`texture_negatives`.
        block_fraction: See :func:`texture_negatives`.
        overlap_fraction: See :func:`texture_negatives`.
        tolerance: See :func:`texture_negatives`.

    Returns:
        The paths written.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "images").mkdir()
        >>> pixels = (torch.rand(24, 24, 3) * 255).to(torch.uint8).numpy()
        >>> Image.fromarray(pixels).save(root / "images" / "a.jpg")
        >>> written = synthesize_texture_folder(root / "images", root / "textures")
        >>> [str(path.relative_to(root)) for path in written]
        ['textures/a.png']
    """
    try:
        import numpy as np
        from PIL import Image
    except ImportError as error:
        raise ImportError("synthesize_texture_folder needs Pillow: pip install pillow") from error
    seed = check_integer("seed", seed, at_least=0)
    source, target = Path(source), Path(target)
    if not source.is_dir():
        raise ValueError(f"source must be an existing folder, got {str(source)!r}")
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    written = []
    for k, path in enumerate(files):
        with Image.open(path) as opened:
            pixels = torch.from_numpy(np.array(opened.convert("RGB"))).permute(2, 0, 1)
        texture = texture_negatives(
            pixels,
            crop_fraction=crop_fraction,
            block_fraction=block_fraction,
            overlap_fraction=overlap_fraction,
            tolerance=tolerance,
            generator=torch.Generator().manual_seed(seed + k),
        )
        out = target / path.relative_to(source).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(texture.permute(1, 2, 0).contiguous().numpy()).save(out)
        written.append(out)
    return written
