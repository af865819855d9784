"""The loss modules: each equals its function, and every setting is checked at construction."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typed_choices import MISSPELT, well_typed

import msr_loss
from msr_loss import (
    InfoNCELoss,
    InterventionalLoss,
    MetaMaskLoss,
    MetaSemanticRegularizer,
    NonSemanticContrastiveLoss,
    NTXentLoss,
    info_nce,
    interventional_loss,
    non_semantic_logits,
    nt_xent,
)


def views(seed: int, n: int, d: int, count: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
        for _ in range(count)
    ]


def same_value_and_gradient(
    module_loss: Callable[[], torch.Tensor],
    function_loss: Callable[[], torch.Tensor],
    inputs: list[torch.Tensor],
) -> None:
    got, want = module_loss(), function_loss()
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got_grads = torch.autograd.grad(got.sum(), inputs)
    want_grads = torch.autograd.grad(want.sum(), inputs)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


CASES = dict(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 9),
    d=st.integers(1, 12),
    temperature=st.floats(0.05, 2.0),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    negatives=st.sampled_from(["cross_view", "all"]),
)


@settings(max_examples=25, deadline=None)
@given(**CASES)
def test_ntxent_module_equals_function(
    seed: int, n: int, d: int, temperature: float, reduction: str, negatives: str
) -> None:
    z1, z2 = views(seed, n, d)
    criterion = NTXentLoss(temperature=temperature, reduction=reduction)  # type: ignore[arg-type]
    same_value_and_gradient(
        lambda: criterion(z1, z2),
        lambda: nt_xent(z1, z2, temperature=temperature, reduction=reduction),  # type: ignore[arg-type]
        [z1, z2],
    )


@settings(max_examples=25, deadline=None)
@given(**CASES)
def test_info_nce_module_equals_function(
    seed: int, n: int, d: int, temperature: float, reduction: str, negatives: str
) -> None:
    z1, z2, extra = views(seed, n, d, 3)
    extra = extra.detach()[:, :3].repeat(2, 1)
    kwargs = dict(temperature=temperature, negatives=negatives, reduction=reduction)
    criterion = InfoNCELoss(**kwargs)  # type: ignore[arg-type]
    same_value_and_gradient(lambda: criterion(z1, z2), lambda: info_nce(z1, z2, **kwargs), [z1, z2])  # type: ignore[arg-type]
    same_value_and_gradient(
        lambda: criterion(z1, z2, extra),
        lambda: info_nce(z1, z2, extra_negative_logits=extra, **kwargs),  # type: ignore[arg-type]
        [z1, z2],
    )


@settings(max_examples=25, deadline=None)
@given(**CASES, num_strata=st.integers(1, 5))
def test_interventional_module_equals_function(
    seed: int, n: int, d: int, temperature: float, reduction: str, negatives: str, num_strata: int
) -> None:
    z1, z2 = views(seed, n, d)
    strata = torch.rand(num_strata, d, dtype=torch.float64, requires_grad=True)
    kwargs = dict(temperature=temperature, negatives=negatives, reduction=reduction)
    criterion = InterventionalLoss(**kwargs)  # type: ignore[arg-type]
    same_value_and_gradient(
        lambda: criterion(z1, z2, strata),
        lambda: interventional_loss(z1, z2, strata, **kwargs),  # type: ignore[arg-type]
        [z1, z2, strata],
    )


@settings(max_examples=20, deadline=None)
@given(**CASES, alpha=st.floats(0.5, 3.0), strata=st.booleans())
def test_non_semantic_module_equals_functions(
    seed: int,
    n: int,
    d: int,
    temperature: float,
    reduction: str,
    negatives: str,
    alpha: float,
    strata: bool,
) -> None:
    z1, z2, t1, t2 = views(seed, n, d, 4)
    a = torch.rand(3, d, dtype=torch.float64) if strata else None
    criterion = NonSemanticContrastiveLoss(
        temperature=temperature,
        alpha=alpha,
        negatives=negatives,  # type: ignore[arg-type]
        reduction=reduction,  # type: ignore[arg-type]
    )

    def by_functions() -> torch.Tensor:
        extra = non_semantic_logits(
            torch.cat([z1, z2]), torch.cat([t1, t2]), temperature=temperature, alpha=alpha
        )
        kwargs = dict(temperature=temperature, negatives=negatives, reduction=reduction)
        if a is None:
            return info_nce(z1, z2, extra_negative_logits=extra, **kwargs)  # type: ignore[arg-type]
        return interventional_loss(z1, z2, a, extra_negative_logits=extra, **kwargs)  # type: ignore[arg-type]

    same_value_and_gradient(lambda: criterion(z1, z2, t1, t2, a), by_functions, [z1, z2, t1, t2])


def test_ntxent_equals_lightly() -> None:
    lightly_loss = pytest.importorskip("lightly.loss")
    z1, z2 = views(3, 8, 16)
    for temperature in (0.1, 0.5):
        ours = NTXentLoss(temperature=temperature)(z1.float(), z2.float())
        theirs = lightly_loss.NTXentLoss(temperature=temperature)(z1.float(), z2.float())
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_modules_are_exported_and_repr_their_settings() -> None:
    for name in ("NTXentLoss", "InfoNCELoss", "InterventionalLoss", "NonSemanticContrastiveLoss"):
        assert name in msr_loss.__all__
    assert NTXentLoss().temperature == 0.5
    text = repr(InfoNCELoss(0.1, negatives="all", backend="torch"))
    assert "temperature=0.1" in text and "'all'" in text and "'torch'" in text
    assert "alpha=3.0" in repr(NonSemanticContrastiveLoss(temperature=0.2, alpha=3.0))
    assert [type(m) for m in well_typed()] == [NTXentLoss, InfoNCELoss, InterventionalLoss]


@pytest.mark.parametrize("misspelt", MISSPELT, ids=lambda f: f.__name__)
def test_misspelt_choice_rejected_when_built_or_called(misspelt: Callable[[], None]) -> None:
    with pytest.raises(ValueError, match="must be one of"):
        misspelt()


BUILDERS: list[Callable[..., torch.nn.Module]] = [
    lambda **kw: NTXentLoss(**kw),
    lambda **kw: InfoNCELoss(0.1, **kw),
    lambda **kw: InterventionalLoss(0.1, **kw),
    lambda **kw: NonSemanticContrastiveLoss(temperature=0.1, **kw),
    lambda **kw: MetaSemanticRegularizer(8, 2, temperature=0.1, **kw),
    lambda **kw: MetaMaskLoss(**kw),
]


@pytest.mark.parametrize("build", BUILDERS)
def test_bad_settings_rejected_at_construction(build: Callable[..., torch.nn.Module]) -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        build(backend="x")
    with pytest.raises(TypeError, match="gather_distributed must be a bool"):
        build(gather_distributed="no")


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), 1e-40])
def test_bad_temperature_rejected_at_construction(temperature: float) -> None:
    for build in (NTXentLoss, InfoNCELoss, InterventionalLoss):
        with pytest.raises(ValueError, match="temperature"):
            build(temperature)
    with pytest.raises(ValueError, match="temperature"):
        NonSemanticContrastiveLoss(temperature=temperature)
