"""``make gpu-check``: on a CUDA machine, the kernel tests on CUDA and then the timing table.

1. The Triton kernel tests (``tests/test_triton_kernel.py``, which run on CUDA when a GPU is
   present) and every test marked ``cuda`` (every dtype and precision, N up to 65,536), under
   pytest; the log goes to ``tests.log``.
2. ``msr-loss bench`` on the GPU: ICL-MSR with the fused kernel and the PyTorch path in each
   precision, against solo-learn, lightly, the naive loss and the naive loss under
   ``torch.compile``, with the GEMM floor; it writes ``loss_kernel.csv``, ``loss_kernel.md`` and
   ``loss_kernel.png``.

Everything stays within ``--budget`` seconds (8 minutes by default): the tests get at most
``TEST_SHARE`` of it, and the benchmark skips the cases that would start after the rest.
Without CUDA it stops at once with exit status 2 and says why.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

TEST_SHARE = 0.5
NO_CUDA = (
    "gpu-check needs a CUDA GPU and none is visible here (torch.cuda.is_available() is False); "
    "nothing was run. On a CPU-only machine run `make test` and `msr-loss bench` instead."
)
BENCH_SIZES = ("4096", "16384", "65536")
BENCH_PRECISIONS = ("fp32", "tf32", "bf16")


def test_commands() -> list[list[str]]:
    """The pytest runs of step 1: the kernel's test file, then every ``cuda``-marked test."""
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    return [[*pytest, "tests/test_triton_kernel.py"], [*pytest, "-m", "cuda", "tests"]]


def bench_arguments(out_dir: Path, budget_s: float) -> list[str]:
    """The ``msr-loss bench`` arguments of step 2."""
    return [
        "--device",
        "cuda",
        "--sizes",
        *BENCH_SIZES,
        "--dims",
        "128",
        "--strata",
        "16",
        "--precision",
        *BENCH_PRECISIONS,
        "--rounds",
        "3",
        "--repeats",
        "5",
        "--isolation",
        "none",
        "--budget",
        f"{budget_s:.0f}",
        "--out-dir",
        str(out_dir),
    ]


def _run_tests(out_dir: Path, budget_s: float) -> bool:
    log = out_dir / "tests.log"
    passed = True
    began = time.perf_counter()
    with open(log, "w") as handle:
        for command in test_commands():
            left = budget_s - (time.perf_counter() - began)
            handle.write("$ " + " ".join(command) + "\n")
            handle.flush()
            try:
                done = subprocess.run(
                    command, stdout=handle, stderr=subprocess.STDOUT, timeout=left
                )
            except subprocess.TimeoutExpired:
                handle.write(f"timed out after {budget_s:.0f} s\n")
                return False
            # pytest's exit status 5: no test carried the marker yet
            passed = passed and done.returncode in (0, 5)
    print(f"tests {'passed' if passed else 'FAILED'}; log in {log}")
    return passed


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the check; returns 0 if every test passed, 1 if some failed, 2 without CUDA.

    Examples:
        >>> main([]) if not torch.cuda.is_available() else 2  # doctest: +ELLIPSIS
        2
    """
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("gpu-check-results"))
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for everything")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    from msr_loss.benchmarks import loss_kernel

    began = time.perf_counter()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    passed = _run_tests(args.out_dir, TEST_SHARE * args.budget)
    left = args.budget - (time.perf_counter() - began)
    loss_kernel.main(bench_arguments(args.out_dir, 0.8 * left))
    print(f"gpu-check done in {time.perf_counter() - began:.0f} s; results in {args.out_dir}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
