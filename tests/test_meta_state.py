"""MetaUpdate's state: the call counter and an owned meta optimizer survive a resume."""

import io

import pytest
import torch
from torch import nn

from msr_loss import (
    MetaMaskLoss,
    MetaMaskModel,
    MetaMaskUpdate,
    MetaSemanticRegularizer,
    MetaUpdate,
    info_nce,
    nt_xent,
)

TAU = 0.5


def round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


class MSRRun:
    """An encoder, its SGD, the strata, their Adam and an every-3 meta schedule."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 6))
        self.msr = MetaSemanticRegularizer(6, 3, temperature=TAU)
        self.optimizer = torch.optim.SGD(self.encoder.parameters(), lr=0.1, momentum=0.9)
        self.meta_optimizer = torch.optim.Adam(self.msr.parameters(), lr=0.05)
        self.meta = MetaUpdate(
            self.encoder,
            self.msr.parameters(),
            self.meta_optimizer,
            encoder_optimizer=self.optimizer,
            every=3,
        )

    def state_dict(self):
        return {
            "encoder": self.encoder.state_dict(),
            "msr": self.msr.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "meta": self.meta.state_dict(),
        }

    def load_state_dict(self, state) -> None:
        self.encoder.load_state_dict(state["encoder"])
        self.msr.load_state_dict(state["msr"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.meta.load_state_dict(state["meta"])

    def train(self, batches) -> list[bool]:
        moved = []
        for x1, x2 in batches:

            def loss(f, x1=x1, x2=x2):
                z1, z2 = f(x1), f(x2)
                return nt_xent(z1, z2, temperature=TAU) + self.msr(z1, z2)

            self.optimizer.zero_grad()
            loss(self.encoder).backward()
            self.optimizer.step()

            def meta_loss(f, x1=x1, x2=x2):
                return info_nce(f(x1), f(x2), temperature=TAU)

            moved.append(self.meta.step(loss, meta_loss))
        return moved

    def tensors(self) -> list[torch.Tensor]:
        return [*self.encoder.parameters(), *self.msr.parameters()]


def test_resume_mid_schedule_equals_the_uninterrupted_run():
    batches = torch.randn(8, 2, 10, 6)
    uninterrupted = MSRRun()
    moved = uninterrupted.train(batches)
    assert moved == [True, False, False, True, False, False, True, False]

    first = MSRRun()
    assert first.train(batches[:4]) == moved[:4]
    saved = round_trip(first.state_dict())
    resumed = MSRRun()
    resumed.load_state_dict(saved)
    assert resumed.meta.calls == 4
    assert resumed.train(batches[4:]) == moved[4:]
    for a, b in zip(uninterrupted.tensors(), resumed.tensors(), strict=True):
        assert torch.equal(a, b)


def metamask_run() -> tuple[MetaMaskModel, torch.optim.Optimizer, MetaMaskUpdate]:
    torch.manual_seed(1)
    model = MetaMaskModel(nn.Linear(6, 5), 5, nn.Linear(5, 4), nn.Linear(5, 4))
    optimizer = torch.optim.SGD(model.encoder_parameters(), lr=0.1)
    return model, optimizer, MetaMaskUpdate(model, encoder_optimizer=optimizer, every=2)


def train_metamask(model, optimizer, meta, batches) -> None:
    criterion = MetaMaskLoss(temperature=TAU)
    for x1, x2 in batches:
        (z1, c1), (z2, c2) = model(x1), model(x2)
        optimizer.zero_grad()
        criterion(z1, z2, c1, c2).backward()
        optimizer.step()

        def contrastive(f, x1=x1, x2=x2):
            return criterion.contrastive(f(x1)[1], f(x2)[1])

        meta.step(contrastive, contrastive)


def test_metamask_update_carries_its_own_mask_optimizer():
    batches = torch.randn(6, 2, 8, 6)
    model, optimizer, meta = metamask_run()
    train_metamask(model, optimizer, meta, batches)

    model2, optimizer2, meta2 = metamask_run()
    train_metamask(model2, optimizer2, meta2, batches[:3])
    saved = round_trip(
        {"model": model2.state_dict(), "opt": optimizer2.state_dict(), "meta": meta2.state_dict()}
    )
    assert set(saved["meta"]) == {"calls", "meta_optimizer"}
    assert saved["meta"]["meta_optimizer"]["state"], "the mask's momentum buffer is saved"
    model3, optimizer3, meta3 = metamask_run()
    model3.load_state_dict(saved["model"])
    optimizer3.load_state_dict(saved["opt"])
    meta3.load_state_dict(saved["meta"])
    train_metamask(model3, optimizer3, meta3, batches[3:])
    for a, b in zip(model.parameters(), model3.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_dict_of_a_user_owned_meta_optimizer_is_the_counter_only():
    run = MSRRun()
    run.train(torch.randn(2, 2, 10, 6))
    assert round_trip(run.meta.state_dict()) == {"calls": 2}


def test_load_state_dict_errors():
    run = MSRRun()
    with pytest.raises(ValueError, match="no 'calls'"):
        run.meta.load_state_dict({})
    with pytest.raises(ValueError, match=r"state\['calls'\] must be >= 0"):
        run.meta.load_state_dict({"calls": -1})
    _, _, meta = metamask_run()
    with pytest.raises(ValueError, match="no 'meta_optimizer'"):
        meta.load_state_dict({"calls": 3})
