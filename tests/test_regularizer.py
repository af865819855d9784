import torch

from msr_loss import MetaSemanticRegularizer, interventional_loss


def test_forward_is_weighted_interventional_loss_of_sigmoid_strata():
    torch.manual_seed(0)
    msr = MetaSemanticRegularizer(12, 5, temperature=0.3, weight=0.7, negatives="all")
    z1, z2 = torch.randn(6, 12), torch.randn(6, 12)
    expected = 0.7 * interventional_loss(
        z1, z2, torch.sigmoid(msr.logits), temperature=0.3, negatives="all"
    )
    torch.testing.assert_close(msr(z1, z2), expected)
    assert msr.strata.shape == (5, 12)


def test_strata_start_apart_and_inside_the_unit_interval():
    msr = MetaSemanticRegularizer(64, 8, temperature=0.2)
    strata = msr.strata
    assert ((strata > 0) & (strata < 1)).all()
    assert torch.cdist(strata, strata).add(torch.eye(8)).min() > 0.1


def test_gradient_reaches_inputs_and_strata():
    msr = MetaSemanticRegularizer(10, 3, temperature=0.2)
    z1, z2 = torch.randn(5, 10, requires_grad=True), torch.randn(5, 10, requires_grad=True)
    loss = msr(z1, z2)
    assert loss.requires_grad
    loss.backward()
    for grad in (z1.grad, z2.grad, msr.logits.grad):
        assert grad is not None
        assert grad.abs().sum() > 0


def test_state_dict_round_trip():
    msr = MetaSemanticRegularizer(6, 2, temperature=0.2)
    restored = MetaSemanticRegularizer(6, 2, temperature=0.2)
    restored.load_state_dict(msr.state_dict())
    torch.testing.assert_close(restored.strata, msr.strata)
