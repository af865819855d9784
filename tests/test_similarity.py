"""The blockwise PyTorch log-sum-exp over negatives, and the backend dispatch."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from msr_loss.similarity import (
    blockwise,
    fallback,
    load_triton_kernels,
    negative_logsumexp,
    triton_installed,
    uses_triton,
)
from msr_loss.similarity.blockwise import chunked_negative_logsumexp
from msr_loss.similarity.geometry import NegativeGeometry, excluded_entries

NEGATIVE_SETS = ["cross_view", "all"]


def plain_negative_lse(zhat: torch.Tensor, batch_size: int, inv_t: float, negatives: str):
    """Row by row from the definition: the columns of other images (and, cross-view, other view)."""
    rows = []
    for r in range(zhat.shape[0]):
        columns = [
            k
            for k in range(zhat.shape[0])
            if k % batch_size != r % batch_size
            and (negatives == "all" or k // batch_size != r // batch_size)
        ]
        logits = torch.stack([zhat[r] @ zhat[k] for k in columns]) * inv_t
        rows.append(torch.logsumexp(logits, dim=0))
    return torch.stack(rows)


def plain_dense(zhat: torch.Tensor, batch_size: int, inv_t: float, negatives: str):
    """The definition with an explicit mask, for sizes where the row loop is too slow."""
    index = torch.arange(zhat.shape[0])
    keep = (index[:, None] % batch_size) != (index[None, :] % batch_size)
    if negatives == "cross_view":
        keep &= (index[:, None] // batch_size) != (index[None, :] // batch_size)
    logits = (zhat @ zhat.T) * inv_t
    return torch.logsumexp(logits.masked_fill(~keep, -math.inf), dim=1)


def unit_rows(seed: int, batch_size: int, dim: int, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(
        torch.randn(2 * batch_size, dim, generator=gen, dtype=torch.float64), dim=1
    ).to(dtype)


def value_and_grad(fn, zhat: torch.Tensor, grad_out: torch.Tensor):
    leaf = zhat.detach().clone().requires_grad_()
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf, grad_out.to(value.dtype))
    return value.detach(), grad


cases = st.tuples(
    st.integers(0, 2**31 - 1),
    st.integers(2, 9),
    st.integers(1, 7),
    st.integers(1, 9),
    st.integers(1, 10),
    st.floats(0.01, 2.0),
    st.sampled_from(NEGATIVE_SETS),
)


@settings(max_examples=60, deadline=None)
@given(cases)
def test_chunked_matches_the_definition_in_float64(case):
    """Ragged row and column tiles; tau below 0.025 takes the shifted path, above it the bounded."""
    seed, batch, dim, chunk, width, temperature, negatives = case
    zhat = unit_rows(seed, batch, dim)
    grad_out = torch.randn(
        2 * batch, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(blockwise, "COLUMN_TILE", width)
        got, got_grad = value_and_grad(
            lambda z: chunked_negative_logsumexp(z, batch, 1 / temperature, negatives, chunk),
            zhat,
            grad_out,
        )
    expected, expected_grad = value_and_grad(
        lambda z: plain_negative_lse(z, batch, 1 / temperature, negatives), zhat, grad_out
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("width", [512, 37])
@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
def test_float32_at_temperature_0_01_over_many_columns(negatives, width, monkeypatch):
    monkeypatch.setattr(blockwise, "COLUMN_TILE", width)
    zhat = unit_rows(1, 300, 16)
    grad_out = torch.randn(600, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got, got_grad = value_and_grad(
        lambda z: negative_logsumexp(z, 300, 0.01, negatives, backend="torch"),
        zhat.float(),
        grad_out,
    )
    expected, expected_grad = value_and_grad(
        lambda z: plain_dense(z, 300, 100.0, negatives), zhat, grad_out
    )
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(got_grad.double(), expected_grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype):
    zhat = unit_rows(3, 20, 12).to(dtype)
    grad_out = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got, got_grad = value_and_grad(
        lambda z: chunked_negative_logsumexp(z, 20, 5.0, "all", 3), zhat, grad_out
    )
    expected, expected_grad = value_and_grad(
        lambda z: plain_dense(z, 20, 5.0, "all"), zhat.double(), grad_out
    )
    assert got.dtype == dtype and got_grad.dtype == dtype
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=expected.abs().max() * 1e-2)
    torch.testing.assert_close(got_grad.double(), expected_grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("width", [512, 3])
@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
def test_twice_differentiable(negatives, width, monkeypatch):
    monkeypatch.setattr(blockwise, "COLUMN_TILE", width)
    zhat = unit_rows(4, 4, 3).requires_grad_()

    def fn(z):
        return chunked_negative_logsumexp(z, 4, 1 / 0.3, negatives, 3)

    assert torch.autograd.gradcheck(fn, (zhat,))
    assert torch.autograd.gradgradcheck(fn, (zhat,))


@pytest.mark.parametrize("width", [512, 7])
@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
def test_graph_building_backward_equals_the_fast_one(negatives, width, monkeypatch):
    monkeypatch.setattr(blockwise, "COLUMN_TILE", width)
    zhat = unit_rows(5, 24, 8).requires_grad_()
    grad_out = torch.randn(48, dtype=torch.float64)
    results = []
    for create_graph in (False, True):
        lse = chunked_negative_logsumexp(zhat, 24, 4.0, negatives, 5)
        (grad,) = torch.autograd.grad(lse, zhat, grad_out, create_graph=create_graph)
        results.append(grad)
    assert results[1].requires_grad
    torch.testing.assert_close(results[0], results[1].detach(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("width", [512, 30])
@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
def test_backward_is_bitwise_deterministic(negatives, width, monkeypatch):
    monkeypatch.setattr(blockwise, "COLUMN_TILE", width)
    zhat = unit_rows(6, 100, 32, torch.float32)
    grad_out = torch.randn(200)
    grads = [
        value_and_grad(
            lambda z: chunked_negative_logsumexp(z, 100, 5.0, negatives, 16), zhat, grad_out
        )[1]
        for _ in range(3)
    ]
    assert all(torch.equal(grads[0], g) for g in grads[1:])


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return out


@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
def test_never_forms_a_matrix_larger_than_one_tile(negatives, monkeypatch):
    batch, chunk, width, dim = 64, 8, 24, 4
    monkeypatch.setattr(blockwise, "COLUMN_TILE", width)
    zhat = unit_rows(7, batch, dim, torch.float32).requires_grad_()
    with LargestTensor() as mode:
        chunked_negative_logsumexp(zhat, batch, 5.0, negatives, chunk).sum().backward()
    assert mode.largest <= max(chunk * width, 2 * batch * dim)


def test_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        negative_logsumexp(unit_rows(0, 3, 4), 3, 0.5, "all", backend="cuda")


@pytest.mark.parametrize(("rows", "batch"), [(6, 2), (4, 1), (2, 1)])
def test_rejects_rows_that_are_not_two_views_of_at_least_two_images(rows, batch):
    with pytest.raises(ValueError, match=r"shape \(2N, D\) with N = num_images >= 2"):
        chunked_negative_logsumexp(torch.zeros(rows, 3), batch, 2.0, "all")


def test_rejects_a_non_positive_chunk():
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        chunked_negative_logsumexp(unit_rows(0, 3, 4), 3, 2.0, "all", 0)


def test_auto_uses_torch_for_cpu_tensors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not uses_triton(unit_rows(0, 3, 4, torch.float32), "auto")
    assert not uses_triton(unit_rows(0, 3, 4, torch.float32), "torch")


@pytest.mark.skipif(not triton_installed(), reason="needs the triton package")
def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"needs CUDA tensors.*TRITON_INTERPRET=1"):
        uses_triton(unit_rows(0, 3, 4, torch.float32), "triton")


@pytest.mark.skipif(not triton_installed(), reason="needs the triton package")
def test_triton_interpreter_switched_on_too_late_is_a_clear_error(monkeypatch):
    import msr_loss.similarity.triton as kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "INTERPRETER", False)
    with pytest.raises(ValueError, match="set it before triton is first imported"):
        uses_triton(unit_rows(0, 3, 4, torch.float32), "triton")


@pytest.mark.skipif(not triton_installed(), reason="needs the triton package")
def test_the_interpreter_variable_set_between_the_imports_is_detected():
    """Set after triton's import, it would interpret our kernels but not Triton's helpers."""
    script = (
        "import os, triton, torch\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import msr_loss.similarity.triton as kernels\n"
        "from msr_loss.similarity import uses_triton\n"
        "assert not kernels.INTERPRETER\n"
        "try:\n"
        "    uses_triton(torch.zeros(4, 2), 'triton')\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "set it before triton is first imported" in done.stdout


@pytest.mark.skipif(not triton_installed(), reason="needs the triton package")
def test_triton_rejects_float64():
    with pytest.raises(TypeError, match=r"float16, bfloat16 and float32.*float64"):
        uses_triton(unit_rows(0, 3, 4), "triton")


def test_triton_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("msr_loss.similarity.triton_installed", lambda: False)
    with pytest.raises(ValueError, match=r"pip install 'msr-loss\[triton\]'"):
        uses_triton(unit_rows(0, 3, 4, torch.float32), "triton")


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 3),
    st.data(),
    st.integers(1, 6),
    st.sampled_from(NEGATIVE_SETS),
)
def test_geometry_reproduces_the_definition_of_the_negatives(local, ranks, data, chunk, negatives):
    """Blocks and excluded entries of one rank's rows give the definition's mask on the batch."""
    rank = data.draw(st.integers(0, ranks - 1))
    total = local * ranks
    geometry = NegativeGeometry(local, total, rank * local, negatives)
    got = torch.zeros(2 * local, 2 * total, dtype=torch.bool)
    width = data.draw(st.integers(1, 2 * total))
    tiled = torch.zeros_like(got)
    for block in geometry.row_blocks(chunk):
        seen = torch.ones(block.rows.stop - block.rows.start, geometry.num_columns)
        excluded_entries(seen, block.first_image, total).fill_(0)
        got[block.rows, block.columns] = seen.bool()
        tiles = list(geometry.tiles(block, width))
        assert [t.columns.start for t in tiles[1:]] == [t.columns.stop for t in tiles[:-1]]
        assert (tiles[0].columns.start, tiles[-1].columns.stop) == (
            block.columns.start,
            block.columns.stop,
        )
        for tile in tiles:
            assert tile.columns.stop - tile.columns.start <= width
            seen = torch.ones(
                block.rows.stop - block.rows.start, tile.columns.stop - tile.columns.start
            )
            tiled[block.rows, tile.columns] = tile.fill_excluded(seen, 0.0).bool()
    rows = torch.cat([torch.arange(local), total + torch.arange(local)]) + rank * local
    cols = torch.arange(2 * total)
    expected = (rows[:, None] % total) != (cols[None, :] % total)
    if negatives == "cross_view":
        expected &= (rows[:, None] // total) != (cols[None, :] // total)
    assert torch.equal(got, expected)
    assert torch.equal(tiled, expected)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 9),
    st.integers(1, 6),
    st.integers(1, 12),
    st.sampled_from(NEGATIVE_SETS),
)
def test_symmetric_tiles_hold_every_seen_entry_once(images, chunk, width, negatives):
    """Each seen (row, column), directly or through a mirrored tile's transpose, exactly once."""
    geometry = NegativeGeometry.single_process(images, negatives)
    counts = torch.zeros(2 * images, 2 * images, dtype=torch.int64)
    for pair in geometry.symmetric_tiles(chunk, width):
        columns = pair.tile.columns
        assert columns.stop - columns.start <= max(width, pair.rows.stop - pair.rows.start)
        seen = torch.ones(pair.rows.stop - pair.rows.start, columns.stop - columns.start)
        seen = pair.tile.fill_excluded(seen, 0.0).long()
        counts[pair.rows, columns] += seen
        if pair.mirrored:
            counts[columns, pair.rows] += seen.T
        else:
            assert pair.rows == columns, "only squares on the diagonal stand for themselves"
    index = torch.arange(2 * images)
    expected = (index[:, None] % images) != (index[None, :] % images)
    if negatives == "cross_view":
        expected &= (index[:, None] // images) != (index[None, :] // images)
    assert torch.equal(counts, expected.long())


def test_symmetric_tiles_need_one_process():
    with pytest.raises(ValueError, match="one process"):
        next(NegativeGeometry(2, 4, 2, "all").symmetric_tiles(2, 2))


def test_a_kernel_failure_on_cuda_warns_once_and_switches_to_pytorch(monkeypatch):
    monkeypatch.setattr(fallback, "_FAILURES", [])
    with pytest.warns(RuntimeWarning, match=r"Triton kernel failed on CUDA \(ImportError: gone\)"):
        fallback.record_triton_failure(ImportError("gone"))
    assert fallback.triton_failed()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fallback.record_triton_failure(RuntimeError("again"))


def test_a_failed_triton_import_falls_back_on_cuda_and_raises_on_cpu(monkeypatch):
    def broken() -> None:
        raise ImportError("no triton here")

    monkeypatch.setattr(fallback, "_FAILURES", [])
    monkeypatch.setattr("msr_loss.similarity._triton_module", broken)
    with pytest.raises(ImportError, match="no triton here"):
        load_triton_kernels(torch.zeros(2, 2))
    cuda_like = SimpleNamespace(is_cuda=True)
    with pytest.warns(RuntimeWarning, match="no triton here"):
        assert load_triton_kernels(cuda_like) is None  # type: ignore[arg-type]
    assert fallback.triton_failed()
