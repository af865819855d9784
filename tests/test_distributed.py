"""Gathered negatives on 2 real gloo ranks against the single-process full-batch computation.

The ranks are spawned once for the module; each runs every case and saves its losses and
gradients, which the tests then compare with the plain computation on the whole batch.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from msr_loss import (
    MetaMaskLoss,
    MetaSemanticRegularizer,
    MetaUpdate,
    NonSemanticContrastiveLoss,
    info_nce,
    interventional_loss,
    nt_xent,
)
from msr_loss.distributed import all_reduce_mean, gather
from msr_loss.similarity import negative_logsumexp
from msr_loss.similarity.gathered import GatheredNegativeLogSumExp, gathered_negative_logsumexp

WORLD = 2
LOCAL = 3
DIM = 5
IN_DIM = 6
TAU = 0.3
META_MODES = ("finite_difference", "exact")

LossCase = Callable[..., torch.Tensor]


def third_view(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """A further view made row by row from the first two, so every rank can make its own rows."""
    return z1.roll(1, dims=1) - 0.5 * z2


CASES: dict[str, LossCase] = {
    "icl_cross_view": lambda z1, z2, w, extra, g: interventional_loss(
        z1, z2, torch.sigmoid(w), temperature=TAU, gather_distributed=g
    ),
    "icl_all": lambda z1, z2, w, extra, g: interventional_loss(
        z1, z2, torch.sigmoid(w), temperature=TAU, negatives="all", gather_distributed=g
    ),
    "icl_sum": lambda z1, z2, w, extra, g: interventional_loss(
        z1, z2, torch.sigmoid(w), temperature=TAU, reduction="sum", gather_distributed=g
    ),
    "icl_none_all": lambda z1, z2, w, extra, g: interventional_loss(
        z1,
        z2,
        torch.sigmoid(w),
        temperature=TAU,
        negatives="all",
        reduction="none",
        gather_distributed=g,
    ),
    "icl_extra_negatives": lambda z1, z2, w, extra, g: interventional_loss(
        z1,
        z2,
        torch.sigmoid(w),
        temperature=TAU,
        extra_negative_logits=extra,
        gather_distributed=g,
    ),
    "info_nce_cross_view": lambda z1, z2, w, extra, g: info_nce(
        z1, z2, temperature=TAU, gather_distributed=g
    ),
    "info_nce_all": lambda z1, z2, w, extra, g: info_nce(
        z1, z2, temperature=TAU, negatives="all", gather_distributed=g
    ),
    "nt_xent": lambda z1, z2, w, extra, g: nt_xent(z1, z2, temperature=TAU, gather_distributed=g),
    "icl_three_views_cross_view": lambda z1, z2, w, extra, g: interventional_loss(
        z1,
        z2,
        torch.sigmoid(w),
        temperature=TAU,
        gather_distributed=g,
        more_views=[third_view(z1, z2)],
    ),
    "icl_three_views_all": lambda z1, z2, w, extra, g: interventional_loss(
        z1,
        z2,
        torch.sigmoid(w),
        temperature=TAU,
        negatives="all",
        gather_distributed=g,
        more_views=[third_view(z1, z2)],
    ),
    "nt_xent_four_views": lambda z1, z2, w, extra, g: nt_xent(
        z1,
        z2,
        temperature=TAU,
        gather_distributed=g,
        more_views=[third_view(z1, z2), third_view(z2, z1)],
    ),
    "metamask_contrastive": lambda z1, z2, w, extra, g: MetaMaskLoss(
        temperature=TAU, gather_distributed=g
    ).contrastive(z1, z2),
    "non_semantic_negatives": lambda z1, z2, w, extra, g: NonSemanticContrastiveLoss(
        temperature=TAU, negatives="all", gather_distributed=g
    )(z1, z2, z1.roll(1, dims=1), z2.roll(2, dims=1), torch.sigmoid(w)),
}


def global_inputs() -> dict[str, torch.Tensor]:
    """The whole batch, drawn identically in every process."""
    gen = torch.Generator().manual_seed(0)
    batch = WORLD * LOCAL

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {
        "z1": draw(batch, DIM),
        "z2": draw(batch, DIM),
        "w": draw(4, DIM),
        "extra": draw(2 * batch, 2),
        "x1": draw(batch, IN_DIM),
        "x2": draw(batch, IN_DIM),
    }


def images_of(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """The rows of ``rank``'s images in an (N, ...) tensor."""
    return tensor[rank * LOCAL : (rank + 1) * LOCAL]


def anchors_of(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """The rows of ``rank``'s anchors in a (2N, ...) per-anchor tensor, view 1 then view 2."""
    batch = WORLD * LOCAL
    return torch.cat([images_of(tensor[:batch], rank), images_of(tensor[batch:], rank)])


def make_models(encoder_seed: int, strata_seed: int) -> tuple[nn.Module, MetaSemanticRegularizer]:
    torch.manual_seed(encoder_seed)
    encoder = nn.Sequential(nn.Linear(IN_DIM, 8), nn.Tanh(), nn.Linear(8, DIM)).double()
    torch.manual_seed(strata_seed)
    msr = MetaSemanticRegularizer(DIM, 3, temperature=TAU, weight=2.0, gather_distributed=True)
    return encoder, msr.double()


def meta_problem(
    encoder: nn.Module, msr: MetaSemanticRegularizer, x1: torch.Tensor, x2: torch.Tensor, g: bool
) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
    msr.gather_distributed = g

    def train_loss(f: Any) -> torch.Tensor:
        z1, z2 = f(x1), f(x2)
        return nt_xent(z1, z2, temperature=TAU, gather_distributed=g) + msr(z1, z2)

    def meta_loss(f: Any) -> torch.Tensor:
        return info_nce(f(x1), f(x2), temperature=TAU, gather_distributed=g)

    return train_loss, meta_loss


def meta_step(mode: str, encoder: nn.Module, msr: MetaSemanticRegularizer, x1, x2, g: bool):
    meta = MetaUpdate(
        encoder,
        msr.parameters(),
        torch.optim.SGD(msr.parameters(), lr=50.0),
        encoder_optimizer=torch.optim.SGD(encoder.parameters(), lr=0.5, momentum=0.9),
        mode=mode,
    )
    meta.step(*meta_problem(encoder, msr, x1, x2, g))
    return msr.logits.detach().clone()


def run_cases(rank: int, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, case in CASES.items():
        local = {
            "z1": images_of(data["z1"], rank).clone().requires_grad_(),
            "z2": images_of(data["z2"], rank).clone().requires_grad_(),
            "w": data["w"].clone().requires_grad_(),
            "extra": anchors_of(data["extra"], rank).clone().requires_grad_(),
        }
        loss = case(*local.values(), True)
        loss.sum().backward()
        grads = {key: (None if t.grad is None else t.grad.clone()) for key, t in local.items()}
        results[name] = {"loss": loss.detach().clone(), "grads": grads}
    return results


def run_ddp(rank: int, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    encoder, msr = make_models(1, 2)
    model = DistributedDataParallel(encoder)
    x = torch.cat([images_of(data["x1"], rank), images_of(data["x2"], rank)])
    z1, z2 = model(x).split(LOCAL)
    loss = nt_xent(z1, z2, temperature=TAU, gather_distributed=True) + msr(z1, z2)
    loss.backward()
    return {
        "loss": loss.detach().clone(),
        "encoder_grads": [p.grad.clone() for p in encoder.parameters()],
        "strata_grad": msr.logits.grad.clone(),
    }


def run_errors(rank: int, data: dict[str, torch.Tensor]) -> dict[str, str]:
    messages = {}
    size = LOCAL + rank
    z1, z2 = data["z1"][:size], data["z2"][:size]
    for name, call in {
        "unequal_batches": lambda: nt_xent(z1, z2, temperature=TAU, gather_distributed=True),
        "triton": lambda: info_nce(
            data["z1"].float(),
            data["z2"].float(),
            temperature=TAU,
            backend="triton",
            gather_distributed=True,
        ),
    }.items():
        try:
            call()
        except ValueError as error:
            messages[name] = str(error)
    return messages


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        data = global_inputs()
        x1, x2 = images_of(data["x1"], rank), images_of(data["x2"], rank)
        meta = {}
        for mode in META_MODES:
            encoder, msr = make_models(3, 4 + rank)
            meta[mode] = meta_step(mode, encoder, msr, x1, x2, True)
        results = {
            "cases": run_cases(rank, data),
            "ddp": run_ddp(rank, data),
            "meta": meta,
            "errors": run_errors(rank, data),
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_gathered_loss_and_gradients_match_the_full_batch(ranks, name):
    data = global_inputs()
    full = {key: data[key].clone().requires_grad_() for key in ("z1", "z2", "w", "extra")}
    expected = CASES[name](*full.values(), False)
    per_rank = [r["cases"][name] for r in ranks]
    losses = [r["loss"] for r in per_rank]
    if expected.dim() == 1:
        close(
            torch.cat(losses), torch.cat([anchors_of(expected.detach(), r) for r in range(WORLD)])
        )
    elif "sum" in name:
        close(sum(losses), expected.detach())
    else:
        close(sum(losses) / WORLD, expected.detach())
    # Each rank gets the gradient of the sum of all ranks' losses (DDP then averages).
    objective = expected.sum() * (WORLD if expected.dim() == 0 and "sum" not in name else 1)
    objective.backward()
    for rank, result in enumerate(per_rank):
        grads = result["grads"]
        close(grads["z1"], images_of(full["z1"].grad, rank))
        close(grads["z2"], images_of(full["z2"].grad, rank))
        if full["extra"].grad is not None:
            close(grads["extra"], anchors_of(full["extra"].grad, rank))
    if full["w"].grad is not None:
        close(sum(r["grads"]["w"] for r in per_rank), full["w"].grad)


def test_ddp_parameter_gradients_equal_the_single_process_gradients(ranks):
    data = global_inputs()
    encoder, msr = make_models(1, 2)
    msr.gather_distributed = False
    z1, z2 = encoder(data["x1"]), encoder(data["x2"])
    loss = nt_xent(z1, z2, temperature=TAU) + msr(z1, z2)
    loss.backward()
    close(sum(r["ddp"]["loss"] for r in ranks) / WORLD, loss.detach())
    for result in ranks:
        for got, param in zip(result["ddp"]["encoder_grads"], encoder.parameters(), strict=True):
            close(got, param.grad)
    close(sum(r["ddp"]["strata_grad"] for r in ranks) / WORLD, msr.logits.grad)


@pytest.mark.parametrize("mode", META_MODES)
def test_meta_update_keeps_strata_in_sync_and_matches_single_process(ranks, mode):
    data = global_inputs()
    encoder, msr = make_models(3, 4)
    before = msr.logits.detach().clone()
    expected = meta_step(mode, encoder, msr, data["x1"], data["x2"], False)
    assert (expected - before).abs().max() > 1e-3
    assert torch.equal(ranks[0]["meta"][mode], ranks[1]["meta"][mode])
    close(ranks[1]["meta"][mode], expected)


def test_bad_distributed_input_raises_on_every_rank(ranks):
    for result in ranks:
        assert "same shape on every rank" in result["errors"]["unequal_batches"]
        assert "needs CUDA tensors" in result["errors"]["triton"]


def test_without_a_process_group_gathering_is_the_single_process_computation():
    data = global_inputs()
    zhat = nn.functional.normalize(torch.cat([data["z1"], data["z2"]]), dim=1)
    close(
        gathered_negative_logsumexp(zhat, WORLD * LOCAL, TAU, "all"),
        negative_logsumexp(zhat, WORLD * LOCAL, TAU, "all"),
    )
    assert gather(data["z1"]) is data["z1"]
    assert all_reduce_mean([data["z1"]])[0] is data["z1"]
    args = (data["z1"], data["z2"], data["w"], data["extra"])
    for case in CASES.values():
        close(case(*args, True), case(*args, False))


@pytest.mark.parametrize("negatives", ["cross_view", "all"])
@pytest.mark.parametrize("chunk", [1, 4, 2 * LOCAL])
def test_one_ranks_rows_against_the_global_columns(negatives, chunk):
    data = global_inputs()
    columns = nn.functional.normalize(torch.cat([data["z1"], data["z2"]]), dim=1)
    full = negative_logsumexp(columns, WORLD * LOCAL, TAU, negatives, backend="torch")

    def rank_rows(rows: torch.Tensor, cols: torch.Tensor, rank: int = 1) -> torch.Tensor:
        return GatheredNegativeLogSumExp.apply(rows, cols, rank * LOCAL, 1 / TAU, negatives, chunk)

    for rank in range(WORLD):
        close(rank_rows(anchors_of(columns, rank), columns, rank), anchors_of(full, rank))
    inputs = (anchors_of(columns, 1).requires_grad_(), columns.clone().requires_grad_())
    assert torch.autograd.gradcheck(rank_rows, inputs)
    assert torch.autograd.gradgradcheck(rank_rows, inputs)
