"""Paired timing of the ICL-MSR PyTorch path against its GEMM floor, for a loaded machine.

``msr-loss bench`` takes the fastest pass of each case over rounds; on a machine whose load swings
by several times within seconds, those minima come from different moments. Here every timed pass
of a case runs right after a pass of the floor (6 M^2 D FLOPs as (512 x D)(D x M) float32 GEMMs)
and of the other cases, in one process and one thread, and each pass's time is divided by its own
neighbouring floor pass: the median of those ratios is robust to load that changes slower than a
few seconds.

    python -m msr_loss.benchmarks.floor_pairs --sizes 2048 4096 --pairs 12
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from msr_loss.benchmarks.loss_kernel import floor_operands, floor_pass

from msr_loss import interventional_loss


def _loss_pass(num_images: int, dim: int, strata: int, precision: str) -> Callable[[], float]:
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(num_images, dim, generator=gen).requires_grad_()
    z2 = torch.randn(num_images, dim, generator=gen).requires_grad_()
    weights = torch.rand(strata, dim, generator=gen)

    def timed() -> float:
        z1.grad = z2.grad = None
        began = time.perf_counter()
        loss = interventional_loss(
            z1,
            z2,
            weights,
            temperature=0.2,
            negatives="all",
            precision=precision,  # type: ignore[arg-type]
        )
        loss.backward()
        return time.perf_counter() - began

    return timed


def main(argv: Sequence[str] | None = None) -> int:
    """Prints, per N, the median over pairs of floor time / case time for fp32 and bf16."""
    parser = argparse.ArgumentParser(prog="floor_pairs", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--strata", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{torch.get_num_threads()} thread; median [min, max] over {args.pairs} pairs")
    for size in args.sizes:
        floors = {
            p: floor_operands(size, args.dim, p, torch.float32, torch.device("cpu"))
            for p in ("fp32", "bf16")
        }
        cases = {p: _loss_pass(size, args.dim, args.strata, p) for p in ("fp32", "bf16")}
        ratios: dict[str, list[float]] = {"fp32": [], "bf16": [], "bf16/fp32 GEMM": []}
        for p in cases:
            cases[p]()
        for _ in range(args.pairs):
            floor32 = 3 * floor_pass(*floors["fp32"], "fp32")
            times = {p: case() for p, case in cases.items()}
            floor16 = 3 * floor_pass(*floors["bf16"], "bf16")
            ratios["fp32"].append(floor32 / times["fp32"])
            ratios["bf16"].append(times["fp32"] / times["bf16"])
            ratios["bf16/fp32 GEMM"].append(floor32 / floor16)
        for name, label in (
            ("fp32", "fp32 loss at % of the fp32 GEMM floor"),
            ("bf16", "bf16 loss speed over fp32 loss speed"),
            ("bf16/fp32 GEMM", "bf16 GEMM speed over fp32 GEMM speed"),
        ):
            values = ratios[name]
            scale = 100.0 if name == "fp32" else 1.0
            print(
                f"N={size} D={args.dim} n={args.strata}: {label}: "
                f"{scale * statistics.median(values):.3g} "
                f"[{scale * min(values):.3g}, {scale * max(values):.3g}]"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
