"""`msr-loss solo-pretrain` on PyPI's solo-learn 1.0.2 and its real argparse config parser."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from msr_loss.adapters import solo_learn_launcher as launcher

from msr_loss.cli import main as cli_main

solo_methods = pytest.importorskip("solo.methods")
solo_setup = pytest.importorskip("solo.args.setup")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ARGS_1_0_2 = [
    "--dataset", "custom", "--data_dir", "{data}", "--train_dir", "train", "--no_labels",
    "--encoder", "resnet18", "--optimizer", "sgd", "--batch_size", "8", "--gpus", "0,",
    "--accumulate_grad_batches", "1", "--max_epochs", "1", "--lr", "0.1",
    "--brightness", "0.4", "--contrast", "0.4", "--saturation", "0.2", "--hue", "0.1",
    "--crop_size", "32", "--method", "simclr", "--temperature", "0.2",
    "--proj_hidden_dim", "64", "--proj_output_dim", "32",
]  # fmt: skip
# What solo-learn 1.0.2's own main_pretrain.py does up to building the model.
MAIN_PRETRAIN = """
from lightning_fabric.strategies.launchers.subprocess_script import _basic_subprocess_cmd
from solo.args.setup import parse_args_pretrain
from solo.methods import METHODS

args = parse_args_pretrain()
model = METHODS[args.method](**args.__dict__)
print("built", type(model).__name__, "for method", args.method)
print("other DDP ranks run", _basic_subprocess_cmd()[1:])
"""
FLAGS = ["+msr.weight=0.5", "+msr.num_strata=4", "+msr.meta_lr=0.05"]
# A solo-learn checkout whose package differs from the installed one, and a main_pretrain.py
# that reports which package it and a process it starts import.
FAKE_CHECKOUT = {
    "solo/__init__.py": "",
    "solo/args/__init__.py": "",
    "solo/args/pretrain.py": """
        import sys

        def parse_cfg(cfg):
            return {**cfg, "msr": {"enabled": "+msr.enabled=true" in sys.argv}}
        """,
    "solo/methods/__init__.py": """
        class SimCLR:
            def __init__(self, cfg):
                self.cfg = cfg

        METHODS = {"simclr": SimCLR}
        """,
    "main_pretrain.py": """
        import subprocess
        import sys

        import solo
        from solo.args.pretrain import parse_cfg
        from solo.methods import METHODS, SimCLR

        cfg = parse_cfg({"method": "simclr"})
        wrapped = METHODS["simclr"] is not SimCLR and issubclass(METHODS["simclr"], SimCLR)
        print("main_pretrain imports solo from", solo.__file__, "wrapped:", wrapped)
        child = [sys.executable, "-c", "import solo; print(solo.__file__)"]
        started = subprocess.run(child, capture_output=True, text=True, cwd="/", check=True)
        print("a process it starts imports solo from", started.stdout.strip())
        """,
}


@pytest.fixture
def solo_state(monkeypatch, tmp_path):
    """Restores solo-learn's parser and registry; returns a checkout and a dataset folder."""
    monkeypatch.setattr(solo_setup, "parse_args_pretrain", solo_setup.parse_args_pretrain)
    monkeypatch.setitem(solo_methods.METHODS, "simclr", solo_methods.SimCLR)
    monkeypatch.setattr("sys.argv", ["pytest"])
    monkeypatch.setenv("SOLO_LEARN_DIR", "")
    (tmp_path / "data" / "train" / "0").mkdir(parents=True)
    (tmp_path / "solo").mkdir()
    (tmp_path / "solo" / "main_pretrain.py").write_text(textwrap.dedent(MAIN_PRETRAIN))
    args = [a.format(data=tmp_path / "data") for a in ARGS_1_0_2]
    return tmp_path / "solo", args


@pytest.fixture
def fake_checkout(tmp_path):
    """A solo-learn checkout with its own ``solo`` package; returns (checkout, clean env)."""
    checkout = tmp_path / "solo-learn"
    for name, text in FAKE_CHECKOUT.items():
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text(textwrap.dedent(text))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SOLO_LEARN_DIR")}
    return checkout, env


def assert_ran_the_checkouts_solo(run: subprocess.CompletedProcess, checkout) -> None:
    assert run.returncode == 0, run.stderr
    package = checkout / "solo"
    assert f"main_pretrain imports solo from {package / '__init__.py'} wrapped: True" in run.stdout
    assert f"a process it starts imports solo from {package / '__init__.py'}" in run.stdout
    assert f"running solo-learn from {package} (the checkout's own package)" in run.stderr


def test_the_console_command_run_from_a_checkout_runs_its_solo(fake_checkout):
    checkout, env = fake_checkout
    command = Path(sys.executable).with_name("msr-loss")
    if not command.is_file():
        pytest.skip(f"no msr-loss console script next to {sys.executable}")
    run = subprocess.run(
        [str(command), "solo-pretrain", "+msr.enabled=true"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_ran_the_checkouts_solo(run, checkout)


def test_solo_learn_dir_wins_over_a_solo_imported_before(fake_checkout):
    checkout, env = fake_checkout
    script = (
        "import sys, solo.methods; from msr_loss.cli import main; "
        f"sys.exit(main(['solo-pretrain', '--solo-learn', {str(checkout)!r}, '+msr.enabled=true']))"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=checkout.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_ran_the_checkouts_solo(run, checkout)


def test_without_a_solo_package_the_installed_one_is_named(solo_state, capsys):
    checkout, args = solo_state
    assert launcher.main(["--solo-learn", str(checkout), *args]) == 0
    installed = Path(solo_methods.__file__).parent.parent
    assert (
        f"running solo-learn from {installed} (the installed package; {checkout} has no solo/ "
        "package)" in capsys.readouterr().err
    )


def test_flag_tokens_are_rewritten_for_hydra_and_taken_out_for_argparse():
    assert launcher.hydra_arguments(["msr.weight=1", "+msr.num_strata=2", "++msr.x=1", "a=1"]) == [
        "++msr.weight=1",
        "+msr.num_strata=2",
        "++msr.x=1",
        "a=1",
    ]
    rest, blocks = launcher.take_flag_blocks(
        ["--lr", "0.1", "+msr.meta_mode=exact", "msr.enabled=false", "++msr.meta_lr=1e-3"]
    )
    assert rest == ["--lr", "0.1"]
    assert blocks == {"msr": {"meta_mode": "exact", "enabled": False, "meta_lr": 1e-3}}


def test_a_missing_checkout_is_reported(tmp_path, capsys):
    assert cli_main(["solo-pretrain", "--solo-learn", str(tmp_path), "x=1"]) == 2
    assert "no main_pretrain.py in" in capsys.readouterr().err
    assert launcher.main(["--help"]) == 0
    assert "--solo-learn DIR" in capsys.readouterr().out


def test_launcher_runs_main_pretrain_with_the_wrapped_method(solo_state, capsys):
    checkout, args = solo_state
    assert cli_main(["solo-pretrain", "--solo-learn", str(checkout), *args, *FLAGS]) == 0
    captured = capsys.readouterr()
    assert "built SimCLRWithMSR for method simclr" in captured.out
    assert f"other DDP ranks run {['-m', launcher.MODULE, *args, *FLAGS]}" in captured.out
    assert "SimCLRWithMSR (MSRFlags(weight=0.5, num_strata=4" in captured.err
    assert solo_methods.METHODS["simclr"].__name__ == "SimCLRWithMSR"
    assert os.environ["SOLO_LEARN_DIR"] == str(checkout)


def test_other_ddp_ranks_build_the_wrapped_method_too(solo_state):
    checkout, args = solo_state
    rank = subprocess.run(
        [sys.executable, "-m", launcher.MODULE, *args, *FLAGS],
        env={**os.environ, "SOLO_LEARN_DIR": str(checkout)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rank.returncode == 0, rank.stderr
    assert "built SimCLRWithMSR for method simclr" in rank.stdout


def test_launcher_without_flags_builds_the_plain_method(solo_state, capsys):
    checkout, args = solo_state
    assert launcher.main(["--solo-learn", str(checkout), *args]) == 0
    assert "built SimCLR for method simclr" in capsys.readouterr().out
    assert solo_methods.METHODS["simclr"] is solo_methods.SimCLR


def test_bad_flags_fail_before_training(solo_state):
    checkout, args = solo_state
    with pytest.raises(ValueError, match=r"unknown msr flags \['weigth'\]"):
        launcher.main(["--solo-learn", str(checkout), *args, "+msr.weigth=0.5"])
