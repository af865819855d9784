"""The flag blocks: every flag checked when the block is read, by name; wrapped-class names."""

from __future__ import annotations

import numpy as np
import pytest
from msr_loss.adapters import (
    FlagBlock,
    MetaMaskFlags,
    MSRFlags,
    NSNegFlags,
    flags_from_config,
    wrap_method,
)

from msr_loss.types import BACKENDS, META_MODES, NEGATIVE_SETS

BLOCKS = {"msr": MSRFlags, "nsneg": NSNegFlags, "metamask": MetaMaskFlags}


@pytest.mark.parametrize(
    ("block", "key", "value", "message"),
    [
        ("msr", "weight", -0.5, "msr.weight must be a finite number and >= 0, got -0.5"),
        ("msr", "num_strata", 0, "msr.num_strata must be >= 1, got 0"),
        ("msr", "temperature", 0.0, "msr.temperature must be"),
        ("msr", "temperature", 1e-40, "msr.temperature is too small"),
        ("msr", "meta_lr", -1.0, "msr.meta_lr must be > 0, got -1.0"),
        ("msr", "meta_lr", float("nan"), "msr.meta_lr must be a finite number"),
        ("msr", "meta_every", 0, "msr.meta_every must be >= 1, got 0"),
        ("msr", "meta_mode", "second_order", "msr.meta_mode must be one of"),
        ("msr", "negatives", "some", "msr.negatives must be one of"),
        ("msr", "backend", "cuda", "msr.backend must be one of"),
        ("msr", "init_std", -1.0, "msr.init_std must be"),
        ("nsneg", "weight", -1.0, "nsneg.weight must be"),
        ("nsneg", "temperature", -0.1, "nsneg.temperature must be"),
        ("nsneg", "alpha", 0.0, "nsneg.alpha must be"),
        ("nsneg", "patch_min", 0.0, "nsneg.patch_min must be"),
        ("nsneg", "patch_max", 1.5, "nsneg.patch_max must be"),
        ("nsneg", "negatives", "none", "nsneg.negatives must be one of"),
        ("nsneg", "backend", "x", "nsneg.backend must be one of"),
        ("metamask", "weight", float("inf"), "metamask.weight must be a finite number"),
        ("metamask", "temperature", 0.0, "metamask.temperature must be"),
        ("metamask", "head_hidden_dim", 0, "metamask.head_hidden_dim must be >= 1"),
        ("metamask", "mask_lr", 0.0, "metamask.mask_lr must be > 0"),
        ("metamask", "mask_momentum", 1.5, "metamask.mask_momentum must be"),
        ("metamask", "mask_weight_decay", -1.0, "metamask.mask_weight_decay must be"),
        ("metamask", "meta_every", 0, "metamask.meta_every must be >= 1"),
        ("metamask", "meta_mode", "x", "metamask.meta_mode must be one of"),
        ("metamask", "backend", "x", "metamask.backend must be one of"),
    ],
)
def test_a_bad_flag_is_refused_when_the_config_is_read_naming_the_flag(block, key, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        flags_from_config({"method": "simclr", block: {key: value}})
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        BLOCKS[block](**{key: value})


def test_patch_range_must_be_ordered():
    with pytest.raises(ValueError, match=r"nsneg\.patch_min must be <= nsneg\.patch_max"):
        flags_from_config({"nsneg": {"patch_min": 0.5, "patch_max": 0.25}})


def test_choices_are_the_libraries_literal_choices():
    for mode in META_MODES:
        assert MSRFlags(meta_mode=mode).meta_mode == MetaMaskFlags(meta_mode=mode).meta_mode
    for negatives in NEGATIVE_SETS:
        assert MSRFlags(negatives=negatives).negatives == NSNegFlags(negatives=negatives).negatives
    for backend in BACKENDS:
        assert NSNegFlags(backend=backend).backend == backend


def test_checked_values_are_kept_as_plain_numbers():
    flags = MSRFlags(weight=np.float32(0.5), num_strata=np.int64(3))
    assert (type(flags.weight), type(flags.num_strata)) == (float, int)
    assert MSRFlags(weight=0.0).weight == 0.0


def test_every_block_shares_one_base():
    for cls in BLOCKS.values():
        assert issubclass(cls, FlagBlock)
        assert cls.from_block({}) == cls()
        assert cls.from_block({"enabled": False}).enabled is False
        assert "__post_init__" not in vars(cls) or cls is NSNegFlags
        assert "from_block" not in vars(cls) and "build" not in vars(cls)


def test_the_wrapped_class_is_named_after_what_was_added():
    solo_methods = pytest.importorskip("solo.methods")
    simclr = solo_methods.SimCLR
    assert wrap_method(simclr, MSRFlags()).__name__ == "SimCLRWithMSR"
    assert wrap_method(simclr, MetaMaskFlags()).__name__ == "SimCLRWithMetaMask"
    assert wrap_method(simclr, NSNegFlags()).__name__ == "SimCLRWithNSNeg"
    every = wrap_method(solo_methods.BarlowTwins, MSRFlags(), NSNegFlags(), MetaMaskFlags())
    assert every.__name__ == "BarlowTwinsWithMSRAndNSNegAndMetaMask"
