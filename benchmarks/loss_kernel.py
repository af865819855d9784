"""The loss microbenchmark behind ``msr-loss bench``: forward+backward time and peak memory.

Compared in the same run, at each batch size N, dimension D and number of strata n:

- ``msr-triton``: this library's ICL-MSR loss with the fused Triton kernel (CUDA only);
- ``msr-torch``: the same loss with the blockwise PyTorch path;
- ``naive``: ICL-MSR written the straightforward way (an n x 2N x D tensor of modulated positives
  and the full 2N x 2N similarity matrix), and ``naive-compiled``, the same under ``torch.compile``;
- ``solo-learn`` and ``lightly``: plain NT-Xent, computed by those (installed) packages.

Each case runs in a fresh subprocess, ``--rounds`` times in round-robin order so that a change in
the machine's load hits every implementation alike. Time: the median over the rounds of
``--repeats`` forward+backward passes, each run after ``--warmup`` passes (CUDA events on a GPU,
``time.perf_counter`` on CPU). Peak memory above the inputs: on a GPU,
``torch.cuda.max_memory_allocated``; on CPU (Linux), the resident-set high water mark (``VmHWM``,
reset through ``/proc/self/clear_refs``) minus the resident set before the measured pass; that
pass comes after the timed ones, with glibc's mmap threshold then pinned at 64 KiB (``mallopt``)
and freed memory returned (``malloc_trim``), so that every tensor above 64 KiB is mapped when
allocated and unmapped when freed, and the high water mark sees each one (the largest over rounds).
TFLOP/s counts 6 M^2 D with M = 2N (one similarity GEMM forward, two backward), whatever an
implementation actually does.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

IMPLEMENTATIONS = ("msr-triton", "msr-torch", "naive", "naive-compiled", "solo-learn", "lightly")
BASELINES = ("solo-learn", "lightly")
COLUMNS = (
    "impl",
    "N",
    "D",
    "n",
    "median_ms",
    "peak_mib",
    "peak_in_MxM_fp32",
    "tflops",
    "x_solo_learn",
    "x_lightly",
    "status",
)
CPU_DEFAULTS = {"sizes": [256, 1024, 4096], "dims": [128], "strata": [16], "repeats": 3}
GPU_DEFAULTS = {
    "sizes": [256, 1024, 4096, 16384, 65536],
    "dims": [128, 512, 2048],
    "strata": [4, 16, 64],
    "repeats": 10,
}

M_MMAP_THRESHOLD = -3
Step = Callable[[], torch.Tensor]


def naive_icl_msr(
    z1: torch.Tensor, z2: torch.Tensor, strata: torch.Tensor, temperature: float, negatives: str
) -> torch.Tensor:
    """ICL-MSR as the formula reads: n x 2N x D modulated positives, the full similarity matrix."""
    num_images = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    positives = torch.cat([z[num_images:], z[:num_images]])
    modulated = strata[:, None, :] * positives[None]
    positive_logits = F.cosine_similarity(z[None], modulated, dim=-1) / temperature
    similarity = z @ z.T / temperature
    index = torch.arange(z.shape[0], device=z.device)
    negative = (index[:, None] % num_images) != (index[None, :] % num_images)
    if negatives == "cross_view":
        negative &= (index[:, None] // num_images) != (index[None, :] // num_images)
    negative_sum = (torch.exp(similarity) * negative).sum(dim=1)
    probability = (torch.exp(positive_logits) / (torch.exp(positive_logits) + negative_sum)).mean(0)
    return -torch.log(probability).mean()


def make_step(spec: dict, z1: torch.Tensor, z2: torch.Tensor, strata: torch.Tensor) -> Step:
    """The loss of implementation ``spec["impl"]`` on the given inputs, as a closure."""
    impl, tau, negatives = spec["impl"], spec["temperature"], spec["negatives"]
    if impl in ("msr-triton", "msr-torch"):
        from msr_loss import interventional_loss

        backend = "triton" if impl == "msr-triton" else "torch"
        return lambda: interventional_loss(
            z1, z2, strata, temperature=tau, negatives=negatives, backend=backend
        )
    if impl == "naive":
        return lambda: naive_icl_msr(z1, z2, strata, tau, negatives)
    if impl == "naive-compiled":
        compiled = torch.compile(naive_icl_msr, dynamic=False)
        return lambda: compiled(z1, z2, strata, tau, negatives)
    if impl == "solo-learn":
        from solo.losses.simclr import simclr_loss_func

        return lambda: simclr_loss_func(z1, z2, temperature=tau)
    if impl == "lightly":
        from lightly.loss import NTXentLoss

        lightly_loss = NTXentLoss(temperature=tau)
        return lambda: lightly_loss(z1, z2)
    raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _timed_pass(step: Step, inputs: Sequence[torch.Tensor], device: torch.device) -> float:
    for tensor in inputs:
        tensor.grad = None
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step().backward()
        stop.record()
        torch.cuda.synchronize()
        return float(start.elapsed_time(stop)) / 1e3
    began = time.perf_counter()
    step().backward()
    return time.perf_counter() - began


def _peak_bytes(step: Step, inputs: Sequence[torch.Tensor], device: torch.device) -> float:
    for tensor in inputs:
        tensor.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step().backward()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_kib("VmRSS")
        step().backward()
        return float(_proc_kib("VmHWM") - before) * 1024
    except OSError:
        return math.nan


def run_case(spec: dict) -> dict:
    """Times and measures one case in this process; returns the measurements."""
    warnings.filterwarnings("ignore")
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (spec["N"], spec["D"])
    z1 = torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_()
    z2 = torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_()
    strata = torch.rand((spec["n"], spec["D"]), generator=gen, device=device, dtype=dtype)
    step = make_step(spec, z1, z2, strata)
    for _ in range(spec["warmup"]):
        _timed_pass(step, (z1, z2), device)
    times = [_timed_pass(step, (z1, z2), device) for _ in range(spec["repeats"])]
    peak = _peak_bytes(step, (z1, z2), device)
    return {"times_s": times, "peak_bytes": peak}


def _run_in_subprocess(spec: dict, timeout: float) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "msr_loss.benchmarks.loss_kernel", "--case", json.dumps(spec)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"status": "failed: " + ("out of memory" if "out of memory" in tail else tail)}
    return {**json.loads(lines[-1]), "status": "ok"}


def device_name(device: torch.device) -> str:
    """A readable name of the CPU or GPU the benchmark runs on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return platform.processor() or "CPU"


def _available(impl: str, device: torch.device) -> str | None:
    """None if ``impl`` can run on ``device``, else the reason it is skipped."""
    if impl == "msr-triton":
        from msr_loss.similarity import triton_installed

        if device.type != "cuda" or not triton_installed():
            return "skipped: needs CUDA and triton"
    packages = {"solo-learn": "solo", "lightly": "lightly"}
    if impl in packages and importlib.util.find_spec(packages[impl]) is None:
        return f"skipped: {impl} is not installed"
    return None


def _cases(args: argparse.Namespace) -> list[dict]:
    common = {
        "device": args.device,
        "dtype": args.dtype,
        "temperature": args.temperature,
        "negatives": args.negatives,
        "threads": args.threads,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    cases = []
    for size in args.sizes:
        for dim in args.dims:
            for impl in args.impls:
                for strata in [args.strata[0]] if impl in BASELINES else args.strata:
                    cases.append({**common, "impl": impl, "N": size, "D": dim, "n": strata})
    return cases


def _row(spec: dict, result: dict) -> dict:
    matrix_bytes = 4.0 * (2 * spec["N"]) ** 2
    seconds = statistics.median(result["times_s"]) if "times_s" in result else math.nan
    peak = result.get("peak_bytes", math.nan)
    flops = 6.0 * (2 * spec["N"]) ** 2 * spec["D"]
    return {
        "impl": spec["impl"],
        "N": spec["N"],
        "D": spec["D"],
        "n": "-" if spec["impl"] in BASELINES else spec["n"],
        "median_ms": seconds * 1e3,
        "peak_mib": peak / 2**20,
        "peak_in_MxM_fp32": peak / matrix_bytes,
        "tflops": flops / seconds / 1e12,
        "status": result["status"],
    }


def _add_ratios(rows: list[dict]) -> None:
    for baseline, column in (("solo-learn", "x_solo_learn"), ("lightly", "x_lightly")):
        reference = {(r["N"], r["D"]): r["median_ms"] for r in rows if r["impl"] == baseline}
        for row in rows:
            row[column] = row["median_ms"] / reference.get((row["N"], row["D"]), math.nan)


def _format(value: object) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table with the columns of ``COLUMNS``."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_format(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Median time and peak memory against N, one line per implementation (first D and n)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    first_d = rows[0]["D"]
    strata = [r["n"] for r in rows if r["n"] != "-"]
    for impl in dict.fromkeys(r["impl"] for r in rows if r["status"] == "ok"):
        chosen = [
            r
            for r in rows
            if r["impl"] == impl
            and r["D"] == first_d
            and r["n"] in ("-", strata[0] if strata else "-")
        ]
        sizes = [r["N"] for r in chosen]
        axes[0].plot(sizes, [r["median_ms"] for r in chosen], marker="o", label=impl)
        axes[1].plot(sizes, [r["peak_mib"] for r in chosen], marker="o", label=impl)
    for axis, label in zip(axes, ("forward+backward, median ms", "peak memory, MiB"), strict=True):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("batch size N")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    figure.suptitle(f"loss forward+backward, D = {first_d}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msr-loss bench",
        description="Times forward+backward and measures peak memory of the ICL-MSR loss "
        "(fused Triton, blockwise PyTorch, naive, naive under torch.compile) against NT-Xent as "
        "solo-learn and lightly compute it. Defaults: small on CPU, the full grid on a GPU.",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", help="batch sizes N")
    parser.add_argument("--dims", type=int, nargs="+", help="projection dimensions D")
    parser.add_argument("--strata", type=int, nargs="+", help="numbers of strata n")
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=IMPLEMENTATIONS)
    parser.add_argument("--negatives", choices=("all", "cross_view"), default="all")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, help="timed passes per case and round")
    parser.add_argument(
        "--rounds", type=int, default=1, help="passes over all cases, interleaved in time"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    parser.add_argument("--out-dir", type=Path, default=Path("bench-results"))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; prints the table and writes ``loss_kernel.csv`` and ``loss_kernel.png``.

    Args:
        argv: Command-line arguments (``msr-loss bench --help`` lists them).

    Returns:
        The exit status, 0 on success.

    Examples:
        >>> main(["--sizes", "256", "--impls", "msr-torch", "lightly"])  # doctest: +SKIP
    """
    args = _parser().parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    from tqdm import tqdm

    defaults = GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    device = torch.device(args.device)
    cases = _cases(args)
    results: list[dict] = [{} for _ in cases]
    progress = tqdm(total=len(cases) * args.rounds, desc="msr-loss bench", unit="case")
    for _ in range(args.rounds):
        for spec, result in zip(cases, results, strict=True):
            skipped = _available(spec["impl"], device)
            latest = {"status": skipped} if skipped else _run_in_subprocess(spec, args.timeout)
            if "times_s" in latest:
                latest["times_s"] = result.get("times_s", []) + latest["times_s"]
                latest["peak_bytes"] = max(latest["peak_bytes"], result.get("peak_bytes", 0.0))
            result.update(latest)
            progress.update()
    progress.close()
    rows = [_row(spec, result) for spec, result in zip(cases, results, strict=True)]
    _add_ratios(rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "loss_kernel.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out_dir / "loss_kernel.png")
    threads = args.threads or torch.get_num_threads()
    print(f"device: {device_name(device)}; torch {torch.__version__}; {threads} threads")
    print(f"dtype {args.dtype}, tau {args.temperature}, negatives {args.negatives!r}; ", end="")
    print(
        f"median of {args.rounds} x {args.repeats} passes, each case after {args.warmup} ", end=""
    )
    print("warm-up; M = 2N, TFLOP/s = 6 M^2 D / t")
    print(markdown_table(rows))
    print(f"wrote {args.out_dir / 'loss_kernel.csv'} and {args.out_dir / 'loss_kernel.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
