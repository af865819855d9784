"""Non-semantic negatives (Ge et al., NeurIPS 2021): images that keep the texture, not the object.

- :func:`patch_negatives`: batched and on the images' device, for every query view a canvas of
  random crops of that view (patch side drawn in [16/224, 72/224] of the shorter image side, crops
  drawn with replacement), cut back to the view's size. Built on the fly, one per call.
- :func:`texture_negatives` / :func:`synthesize_texture_folder`: offline texture images. The paper
  ran an external synthesiser on two crops of each image (centre and random); here the synthesis is
  a simple patch quilting (Efros and Freeman, 2001) written for this project: blocks from the two
  crops are laid in raster order, each chosen among the best matches of its overlap with what is
  already laid, and joined along a minimum-error boundary cut. Every output pixel is a pixel of
  the image.
- :func:`non_semantic_logits` and :class:`NonSemanticContrastiveLoss`: the loss term. Each query
  gets its own negatives as extra columns ``alpha * cos(q, t) / tau``, merged into its negatives'
  log-sum-exp through the ``extra_negative_logits`` argument of :func:`msr_loss.info_nce` and
  :func:`msr_loss.interventional_loss`.

Encode the negatives like the host method's keys: with the momentum (key) encoder under
``torch.no_grad()`` where there is one (MoCo, BYOL), as in the paper; otherwise (SimCLR) with the
same encoder as the queries, with gradients, as SimCLR's own negatives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from msr_loss._validation import (
    check_choice,
    check_finite,
    check_floating,
    check_real,
    check_temperature,
    compute_dtype,
    without_autocast,
)
from msr_loss.functional import info_nce, interventional_loss
from msr_loss.types import NEGATIVE_SETS

PATCH_RANGE = (16 / 224, 72 / 224)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _check_images(images: object, dims: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() not in dims:
        shapes = " or ".join("(B, C, H, W)" if d == 4 else "(C, H, W)" for d in dims)
        raise ValueError(f"images must have shape {shapes}, got {tuple(images.shape)}")
    if images.numel() == 0:
        raise ValueError(f"images is empty, shape {tuple(images.shape)}")
    return images


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
    images = _check_images(images, (4,))
    if len(patch_range) != 2:
        raise ValueError(f"patch_range must be a pair (low, high), got {patch_range!r}")
    low = check_real("patch_range[0]", patch_range[0], above=0, at_most=1.0)
    high = check_real("patch_range[1]", patch_range[1], above=0, at_most=1.0)
    if low > high:
        raise ValueError(f"patch_range must have low <= high, got {patch_range!r}")
    batch, _, height, width = images.shape
    sizes, top, left = _patch_layout(batch, height, width, (low, high), generator, images.device)
    return _assemble_patches(images, sizes, top, left)


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
    images = _check_images(images, (3, 4))
    crop_fraction = check_real("crop_fraction", crop_fraction, above=0, at_most=1.0)
    block_fraction = check_real("block_fraction", block_fraction, above=0, at_most=1.0)
    overlap_fraction = check_real("overlap_fraction", overlap_fraction, above=0, at_most=0.5)
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
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
        >>> written = synthesize_texture_folder("imagenet/train", "imagenet-texture/train")
    """
    try:
        import numpy as np
        from PIL import Image
    except ImportError as error:
        raise ImportError("synthesize_texture_folder needs Pillow: pip install pillow") from error
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


@without_autocast
def non_semantic_logits(
    queries: torch.Tensor,
    negatives: torch.Tensor,
    *,
    temperature: float,
    alpha: float = 2.0,
) -> torch.Tensor:
    """``alpha * cos(q_i, t_ik) / temperature``: each query against its own negatives only.

    The result is what ``extra_negative_logits`` of :func:`msr_loss.info_nce` and
    :func:`msr_loss.interventional_loss` expect when ``queries`` is ``cat([z1, z2])``.

    Args:
        queries: (M, D) query projections (for the symmetric losses, view 1 rows then view 2).
        negatives: (M, D) or (M, K, D) projections of each query's non-semantic negatives.
        temperature: The temperature of the loss they join, > 0.
        alpha: The scale on the similarity (2 in the paper, 3 also reported), > 0.

    Returns:
        (M, K) logits (K = 1 for (M, D) negatives), in float64 for float64 inputs, else float32.

    Examples:
        >>> z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
        >>> t1, t2 = torch.randn(8, 16), torch.randn(8, 16)
        >>> extra = non_semantic_logits(torch.cat([z1, z2]), torch.cat([t1, t2]), temperature=0.2)
        >>> loss = info_nce(z1, z2, temperature=0.2, extra_negative_logits=extra)
    """
    temperature = check_temperature(temperature)
    alpha = check_real("alpha", alpha, above=0)
    queries = check_floating("queries", queries)
    negatives = check_floating("negatives", negatives)
    if queries.dim() != 2:
        raise ValueError(f"queries must have shape (M, D), got {tuple(queries.shape)}")
    grouped = negatives.unsqueeze(1) if negatives.dim() == 2 else negatives
    if grouped.dim() != 3 or grouped.shape[0] != queries.shape[0]:
        raise ValueError(
            f"negatives must have shape ({queries.shape[0]}, D) or ({queries.shape[0]}, K, D), "
            f"got {tuple(negatives.shape)}"
        )
    if grouped.shape[2] != queries.shape[1]:
        raise ValueError(
            f"negatives have dimension {grouped.shape[2]} but the queries have "
            f"dimension {queries.shape[1]}"
        )
    if grouped.device != queries.device:
        raise ValueError(f"queries are on {queries.device} but negatives on {grouped.device}")
    check_finite("queries", queries)
    check_finite("negatives", negatives)
    dtype = compute_dtype(torch.promote_types(queries.dtype, negatives.dtype))
    q = F.normalize(queries.to(dtype), dim=1)
    t = F.normalize(grouped.to(dtype), dim=2)
    return alpha * torch.einsum("md,mkd->mk", q, t) / temperature


class NonSemanticContrastiveLoss(nn.Module):
    """InfoNCE (or the interventional loss) with each anchor's non-semantic negatives added.

    Args:
        temperature: Softmax temperature, > 0.
        alpha: Scale of the non-semantic negatives' similarities (2 in the paper).
        negatives: The in-batch negatives: ``"cross_view"`` or ``"all"`` (NT-Xent).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        gather_distributed: Gather the in-batch negatives from every rank (see
            :func:`msr_loss.info_nce`); each anchor keeps only its own non-semantic negatives.

    Examples:
        >>> criterion = NonSemanticContrastiveLoss(temperature=0.2, negatives="all")
        >>> z1, z2, t1, t2 = (torch.randn(8, 16) for _ in range(4))
        >>> loss = criterion(z1, z2, t1, t2)
    """

    def __init__(
        self,
        *,
        temperature: float,
        alpha: float = 2.0,
        negatives: str = "cross_view",
        backend: str = "auto",
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.alpha = check_real("alpha", alpha, above=0)
        self.negatives = check_choice("negatives", negatives, NEGATIVE_SETS)
        self.backend = backend
        self.gather_distributed = gather_distributed

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        t1: torch.Tensor,
        t2: torch.Tensor,
        strata: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of ``(z1, z2)`` with ``t1`` and ``t2`` as the views' own extra negatives.

        Args:
            z1: (N, D) projections of view 1.
            z2: (N, D) projections of view 2.
            t1: (N, D) or (N, K, D) encoded non-semantic negatives of view 1's images.
            t2: The same for view 2.
            strata: If given, (n, D) strata: the interventional loss instead of InfoNCE.
        """
        extra = non_semantic_logits(
            torch.cat([z1, z2]), torch.cat([t1, t2]), temperature=self.temperature, alpha=self.alpha
        )
        if strata is None:
            return info_nce(
                z1,
                z2,
                temperature=self.temperature,
                negatives=self.negatives,
                backend=self.backend,
                extra_negative_logits=extra,
                gather_distributed=self.gather_distributed,
            )
        return interventional_loss(
            z1,
            z2,
            strata,
            temperature=self.temperature,
            negatives=self.negatives,
            backend=self.backend,
            extra_negative_logits=extra,
            gather_distributed=self.gather_distributed,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, negatives={self.negatives!r}"
