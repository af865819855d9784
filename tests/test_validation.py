import math

import pytest
import torch

from msr_loss import MetaSemanticRegularizer, info_nce, interventional_loss

Z = torch.randn(4, 8)
STRATA = torch.rand(3, 8)


def call(z1=Z, z2=Z, strata=STRATA, **kwargs):
    options = {"temperature": 0.2, **kwargs}
    return interventional_loss(z1, z2, strata, **options)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"z1": torch.randn(4, 8, 2)}, ValueError, r"shape \(N, D\).*\(4, 8, 2\)"),
        ({"z1": torch.randn(8)}, ValueError, r"shape \(N, D\)"),
        ({"z2": torch.randn(5, 8)}, ValueError, r"same shape.*\(4, 8\) and \(5, 8\)"),
        ({"z1": Z[:1], "z2": Z[:1]}, ValueError, r"at least 2 samples.*N = 1"),
        ({"strata": torch.rand(3, 7)}, ValueError, r"strata have dimension 7.*dimension 8"),
        ({"strata": torch.rand(8)}, ValueError, r"strata must have shape \(n, D\)"),
        ({"strata": torch.rand(0, 8)}, ValueError, r"n >= 1"),
        ({"z1": torch.ones(4, 8, dtype=torch.int64)}, TypeError, r"floating-point.*int64"),
        ({"strata": torch.ones(3, 8, dtype=torch.int32)}, TypeError, r"strata.*int32"),
        ({"z1": Z.numpy()}, TypeError, r"z1 must be a torch.Tensor, got ndarray"),
        ({"z1": Z.clone().index_fill_(0, torch.tensor([1]), math.nan)}, ValueError, r"z1.*NaN"),
        ({"z2": Z.clone().index_fill_(1, torch.tensor([2]), math.inf)}, ValueError, r"z2.*infin"),
        ({"strata": STRATA.clone().fill_(math.nan)}, ValueError, r"strata.*NaN"),
        ({"temperature": 0.0}, ValueError, r"temperature.*> 0.*0.0"),
        ({"temperature": -1.0}, ValueError, r"temperature.*-1.0"),
        ({"temperature": math.inf}, ValueError, r"temperature"),
        ({"temperature": "0.1"}, TypeError, r"temperature must be a float, got str"),
        ({"negatives": "same_view"}, ValueError, r"negatives must be one of.*'same_view'"),
        ({"reduction": "max"}, ValueError, r"reduction must be one of.*'max'"),
        ({"backend": "cuda"}, ValueError, r"backend must be one of.*'cuda'"),
        ({"extra_negative_logits": torch.randn(3, 2)}, ValueError, r"shape \(8, K\)"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, error, message):
    with pytest.raises(error, match=message):
        call(**kwargs)


def test_info_nce_checks_its_inputs_too():
    with pytest.raises(ValueError, match="at least 2 samples"):
        info_nce(Z[:1], Z[:1], temperature=0.1)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(Z, Z, temperature=0)


def test_regularizer_rejects_bad_configuration_and_mismatched_inputs():
    with pytest.raises(ValueError, match="temperature"):
        MetaSemanticRegularizer(8, 4, temperature=-0.5)
    with pytest.raises(ValueError, match="num_strata"):
        MetaSemanticRegularizer(8, 0, temperature=0.5)
    with pytest.raises(ValueError, match="negatives"):
        MetaSemanticRegularizer(8, 2, temperature=0.5, negatives="none")
    msr = MetaSemanticRegularizer(16, 4, temperature=0.5)
    with pytest.raises(ValueError, match=r"strata have dimension 16.*dimension 8"):
        msr(Z, Z)
