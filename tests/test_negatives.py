"""Non-semantic negatives: the patch and texture generators and the loss term."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msr_loss import (
    NonSemanticContrastiveLoss,
    info_nce,
    interventional_loss,
    non_semantic_logits,
    patch_negatives,
    synthesize_texture_folder,
    texture_negatives,
)
from msr_loss.negatives.patch import _assemble_patches, _patch_layout
from msr_loss.negatives.texture import _minimum_cut


def coded_images(batch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Pixel values that name their image, channel, row and column."""
    return torch.arange(batch * channels * height * width, dtype=torch.float64).view(
        batch, channels, height, width
    )


def decode(
    values: torch.Tensor, channels: int, height: int, width: int
) -> tuple[torch.Tensor, ...]:
    v = values.long()
    return (
        v // (channels * height * width),
        v // (height * width) % channels,
        v // width % height,
        v % width,
    )


def check_pixels_from_own_image(out: torch.Tensor, images: torch.Tensor) -> None:
    batch, channels, height, width = images.shape
    image, channel, row, col = decode(out, channels, height, width)
    assert torch.equal(image, torch.arange(batch).view(-1, 1, 1, 1).expand_as(image))
    assert torch.equal(channel, torch.arange(channels).view(1, -1, 1, 1).expand_as(channel))
    assert torch.equal(row, row[:, :1].expand_as(row))
    assert torch.equal(col, col[:, :1].expand_as(col))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8])
def test_patch_negatives_shape_dtype_device(dtype: torch.dtype) -> None:
    images = (torch.rand(3, 3, 20, 28) * 255).to(dtype)
    out = patch_negatives(images, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert out.dtype == dtype
    assert out.device == images.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_patch_negatives_stay_on_the_gpu() -> None:
    images = torch.rand(4, 3, 32, 32, device="cuda")
    out = patch_negatives(images, generator=torch.Generator("cuda").manual_seed(0))
    assert out.device == images.device
    check_pixels_from_own_image(out.double().cpu(), images.double().cpu())


def test_patch_negatives_use_only_pixels_of_their_own_image() -> None:
    images = coded_images(4, 3, 24, 24)
    out = patch_negatives(images, generator=torch.Generator().manual_seed(1))
    check_pixels_from_own_image(out, images)


def test_patch_negatives_destroy_global_structure_but_keep_local() -> None:
    images = coded_images(8, 1, 64, 64)
    out = patch_negatives(images, generator=torch.Generator().manual_seed(2))
    _, _, row, col = decode(out, 1, 64, 64)
    in_place = (row == torch.arange(64).view(-1, 1)) & (col == torch.arange(64))
    assert in_place.double().mean() < 0.2
    assert (out != images).flatten(1).any(dim=1).all()
    right_neighbour = (row[..., 1:] == row[..., :-1]) & (col[..., 1:] == col[..., :-1] + 1)
    largest_patch = round(72 / 224 * 64)
    assert right_neighbour.double().mean() > 1 - 1 / 5
    assert right_neighbour.double().mean() < 1 - 1 / (2 * largest_patch)


def test_patch_negatives_are_reproducible_under_a_seed() -> None:
    images = torch.rand(4, 3, 32, 32)
    first = patch_negatives(images, generator=torch.Generator().manual_seed(7))
    again = patch_negatives(images, generator=torch.Generator().manual_seed(7))
    other = patch_negatives(images, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_patch_sizes_follow_the_paper_at_224() -> None:
    gen = torch.Generator().manual_seed(0)
    sizes, top, left = _patch_layout(2000, 224, 224, (16 / 224, 72 / 224), gen, torch.device("cpu"))
    assert sizes.min() == 16 and sizes.max() == 72
    assert top.shape == left.shape == (2000, 14, 14)
    assert (top >= 0).all() and (top + sizes.view(-1, 1, 1) <= 224).all()
    assert (left >= 0).all() and (left + sizes.view(-1, 1, 1) <= 224).all()


def loop_reference(
    images: torch.Tensor, sizes: torch.Tensor, top: torch.Tensor, left: torch.Tensor
) -> torch.Tensor:
    """The released algorithm for given draws: fill a grid canvas with crops, cut it back."""
    _, channels, height, width = images.shape
    outs = []
    for b, image in enumerate(images):
        p = int(sizes[b])
        down, across = -(-height // p), -(-width // p)
        canvas = torch.zeros(channels, down * p, across * p, dtype=images.dtype)
        for i in range(down):
            for j in range(across):
                y, x = int(top[b, i, j]), int(left[b, i, j])
                canvas[:, i * p : (i + 1) * p, j * p : (j + 1) * p] = image[:, y : y + p, x : x + p]
        outs.append(canvas[:, :height, :width])
    return torch.stack(outs)


@settings(max_examples=20, deadline=None)
@given(
    height=st.integers(4, 40),
    width=st.integers(4, 40),
    low=st.floats(0.05, 0.5),
    spread=st.floats(0, 0.5),
    seed=st.integers(0, 2**16),
)
def test_patch_assembly_matches_the_loop_reference(
    height: int, width: int, low: float, spread: float, seed: int
) -> None:
    images = torch.rand(3, 2, height, width)
    gen = torch.Generator().manual_seed(seed)
    layout = _patch_layout(3, height, width, (low, low + spread), gen, images.device)
    assert torch.equal(_assemble_patches(images, *layout), loop_reference(images, *layout))


def test_patch_negatives_reject_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        patch_negatives(torch.rand(3, 8, 8))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        patch_negatives([[1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="low <= high"):
        patch_negatives(torch.rand(1, 3, 8, 8), patch_range=(0.5, 0.2))
    with pytest.raises(ValueError, match=r"patch_range\[0\]"):
        patch_negatives(torch.rand(1, 3, 8, 8), patch_range=(0.0, 0.2))


def test_minimum_cut_finds_the_cheapest_connected_path() -> None:
    errors = torch.rand(5, 4, generator=torch.Generator().manual_seed(0))
    best = min(
        sum(float(errors[r, c]) for r, c in enumerate(path))
        for path in itertools.product(range(4), repeat=5)
        if all(abs(a - b) <= 1 for a, b in itertools.pairwise(path))
    )
    take = _minimum_cut(errors)
    path = [int(row.nonzero()[0]) for row in take]
    assert all(abs(a - b) <= 1 for a, b in itertools.pairwise(path))
    assert sum(float(errors[r, c]) for r, c in enumerate(path)) == pytest.approx(best)
    assert all(row[c:].all() and not row[:c].any() for row, c in zip(take, path, strict=True))


def test_texture_negatives_quilt_pixels_of_the_image() -> None:
    images = coded_images(2, 3, 20, 22)
    out = texture_negatives(images, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    check_pixels_from_own_image(out, images)
    assert (out != images).flatten(1).any(dim=1).all()
    again = texture_negatives(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_texture_negatives_keep_uint8_and_single_images() -> None:
    image = (torch.rand(3, 16, 16) * 255).to(torch.uint8)
    out = texture_negatives(image, generator=torch.Generator().manual_seed(1))
    assert out.shape == image.shape and out.dtype == torch.uint8
    colours = {tuple(p) for p in image.flatten(1).T.tolist()}
    assert {tuple(p) for p in out.flatten(1).T.tolist()} <= colours
    with pytest.raises(ValueError, match="overlap_fraction"):
        texture_negatives(image, overlap_fraction=0.8)
    with pytest.raises(ValueError, match="at least 2x2"):
        texture_negatives(torch.rand(3, 1, 5))


def test_texture_folder_mirrors_the_tree(tmp_path: object) -> None:
    Image = pytest.importorskip("PIL.Image")
    np = pytest.importorskip("numpy")
    source, target = tmp_path / "src", tmp_path / "dst"  # type: ignore[operator]
    (source / "cls").mkdir(parents=True)
    rng = np.random.default_rng(0)
    pictures = {
        "a.png": rng.integers(0, 255, (18, 20, 3), dtype=np.uint8),
        "cls/b.bmp": rng.integers(0, 255, (16, 16, 3), dtype=np.uint8),
    }
    for name, pixels in pictures.items():
        Image.fromarray(pixels).save(source / name)
    (source / "notes.txt").write_text("not an image")
    written = synthesize_texture_folder(source, target, seed=3)
    assert sorted(p.relative_to(target).as_posix() for p in written) == ["a.png", "cls/b.png"]
    for name, pixels in pictures.items():
        out = np.array(Image.open((target / name).with_suffix(".png")))
        assert out.shape == pixels.shape
        assert {tuple(p) for p in out.reshape(-1, 3)} <= {tuple(p) for p in pixels.reshape(-1, 3)}
    with pytest.raises(ValueError, match="existing folder"):
        synthesize_texture_folder(tmp_path / "missing", target)  # type: ignore[operator]


def reference_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    t1: torch.Tensor,
    t2: torch.Tensor,
    tau: float,
    alpha: float,
    negatives: str,
    strata: torch.Tensor | None = None,
) -> torch.Tensor:
    """SPEC 4 with SPEC 1: each anchor's denominator gains exp(alpha cos(q, t_k) / tau)."""

    def cos(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (u @ v) / (u.norm() * v.norm())

    views, own = {1: z1, 2: z2}, {1: t1, 2: t2}
    n = z1.shape[0]
    cells = strata if strata is not None else torch.ones(1, z1.shape[1], dtype=z1.dtype)
    terms = []
    for j in (1, 2):
        for i in range(n):
            anchor, positive = views[j][i], views[3 - j][i]
            neg = sum(
                torch.exp(cos(anchor, views[v][k]) / tau)
                for k in range(n)
                for v in (1, 2)
                if k != i and (negatives == "all" or v != j)
            )
            extra = own[j][i].reshape(-1, z1.shape[1])
            neg = neg + sum(torch.exp(alpha * cos(anchor, t) / tau) for t in extra)
            prob = sum(
                torch.exp(cos(anchor, a * positive) / tau)
                / (torch.exp(cos(anchor, a * positive) / tau) + neg)
                for a in cells
            ) / len(cells)
            terms.append(-torch.log(prob))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("negatives", ["cross_view", "all"])
@pytest.mark.parametrize("per_query", [None, 3])
@pytest.mark.parametrize("with_strata", [False, True])
def test_loss_matches_reference_and_reaches_the_query(
    negatives: str, per_query: int | None, with_strata: bool
) -> None:
    gen = torch.Generator().manual_seed(5)
    n, d = 4, 6
    shape = (n, d) if per_query is None else (n, per_query, d)
    z1, z2 = (torch.randn(n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    t1, t2 = (torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(2))
    strata = torch.rand(3, d, generator=gen, dtype=torch.float64) if with_strata else None
    z1.requires_grad_()
    criterion = NonSemanticContrastiveLoss(temperature=0.3, alpha=2.0, negatives=negatives)
    got = criterion(z1, z2, t1, t2, strata)
    expected = reference_loss(z1, z2, t1, t2, 0.3, 2.0, negatives, strata)
    assert got.item() == pytest.approx(expected.item(), rel=1e-10)
    (grad,) = torch.autograd.grad(got, z1)
    (expected_grad,) = torch.autograd.grad(expected, z1)
    assert torch.allclose(grad, expected_grad, rtol=1e-8, atol=1e-12)
    if strata is None:
        plain = info_nce(z1, z2, temperature=0.3, negatives=negatives)
    else:
        plain = interventional_loss(z1, z2, strata, temperature=0.3, negatives=negatives)
    (plain_grad,) = torch.autograd.grad(plain, z1)
    assert not torch.allclose(grad, plain_grad)


def test_logits_pair_each_query_with_its_own_negatives() -> None:
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 2, 4, generator=gen, dtype=torch.float64)
    logits = non_semantic_logits(q, t, temperature=0.1, alpha=3.0)
    assert logits.shape == (5, 2)
    for m in range(5):
        for k in range(2):
            cos = torch.dot(q[m], t[m, k]) / (q[m].norm() * t[m, k].norm())
            assert logits[m, k].item() == pytest.approx(3.0 * cos.item() / 0.1)
    single = non_semantic_logits(q, t[:, 0], temperature=0.1)
    assert torch.allclose(single[:, 0], logits[:, 0] * 2 / 3)
    assert torch.autograd.gradcheck(
        lambda a, b: non_semantic_logits(a, b, temperature=0.5), (q, t.requires_grad_())
    )
    assert non_semantic_logits(q.float(), t.float(), temperature=0.1).dtype == torch.float32


def test_logits_reject_bad_input() -> None:
    q, t = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"\(4, D\) or \(4, K, D\)"):
        non_semantic_logits(q, t[:3], temperature=0.1)
    with pytest.raises(ValueError, match="dimension 2 but the queries have dimension 3"):
        non_semantic_logits(q, t[:, :2], temperature=0.1)
    with pytest.raises(ValueError, match="alpha"):
        non_semantic_logits(q, t, temperature=0.1, alpha=0.0)
    with pytest.raises(TypeError, match="alpha"):
        NonSemanticContrastiveLoss(temperature=0.1, alpha="2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negatives"):
        NonSemanticContrastiveLoss(temperature=0.1, negatives="some")
    with pytest.raises(TypeError, match="floating"):
        non_semantic_logits(q.long(), t, temperature=0.1)
