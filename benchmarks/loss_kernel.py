"""The loss microbenchmark behind ``msr-loss bench``: forward+backward time and peak memory.

Compared in the same run, at each batch size N, dimension D and number of strata n:

- ``msr-triton``: this library's ICL-MSR loss with the fused Triton kernel (CUDA only);
- ``msr-torch``: the same loss with the blockwise PyTorch path;
- ``naive``: ICL-MSR written the straightforward way (an n x 2N x D tensor of modulated positives
  and the full 2N x 2N similarity matrix), and ``naive-compiled``, the same under ``torch.compile``;
- ``solo-learn`` and ``lightly``: plain NT-Xent, computed by those (installed) packages;
- ``gemm-floor``: the compute-bound GEMM rate of the machine, measured as the similarity's row
  blocks, (512 x D)(D x M) products, in the operand precision of the run. ``floor_ms`` is
  6 M^2 D FLOPs (M = 2N: one similarity GEMM forward, two backward) at that rate, and
  ``pct_of_floor`` is ``floor_ms`` over the case's fastest time: how close a case comes to the
  time the GEMMs of the dense algorithm alone would need. It exceeds 100 when a case does less:
  ``msr-torch``'s symmetric tiles do about 4 M^2 D.

Each case runs in a fresh subprocess (``--isolation process``; ``none`` runs them all in this
process, without memory figures), ``--rounds`` times in round-robin order so that a change in the
machine's load hits every implementation alike. Time: the minimum, median and maximum over the
rounds' ``--repeats`` forward+backward passes, each run after ``--warmup`` passes (CUDA events on a
GPU, ``time.perf_counter`` on CPU); ``threads`` is the thread count the case itself ran with.
``x_solo_learn`` and ``x_lightly`` compare each case with plain NT-Xent as that library computes
it at the same N and D (median over median): ICL-MSR with n strata against NT-Xent without any.
Peak memory above the inputs: on a GPU,
``torch.cuda.max_memory_allocated``; on CPU (Linux), the resident-set high water mark (``VmHWM``,
reset through ``/proc/self/clear_refs``) minus the resident set before the measured pass; that
pass comes after the timed ones, with glibc's mmap threshold then pinned at 64 KiB (``mallopt``)
and freed memory returned (``malloc_trim``), so that every tensor above 64 KiB is mapped when
allocated and unmapped when freed, and the high water mark sees each one (the largest over rounds).
TFLOP/s counts 6 M^2 D, whatever an implementation actually does.
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

from msr_loss.similarity.precision import resolve_precision
from msr_loss.types import PRECISIONS

IMPLEMENTATIONS = ("msr-triton", "msr-torch", "naive", "naive-compiled", "solo-learn", "lightly")
FLOOR = "gemm-floor"
BASELINES = ("solo-learn", "lightly")
WITHOUT_STRATA = (*BASELINES, FLOOR)
FLOOR_ROWS = 512
COLUMNS = (
    "device",
    "cpu_flags",
    "threads",
    "dtype",
    "precision",
    "tau",
    "negatives",
    "impl",
    "N",
    "D",
    "n",
    "passes",
    "min_ms",
    "median_ms",
    "max_ms",
    "floor_ms",
    "pct_of_floor",
    "peak_mib",
    "peak_in_MxM_fp32",
    "tflops",
    "x_solo_learn",
    "x_lightly",
    "status",
)
TABLE_COLUMNS = (
    "impl",
    "precision",
    "N",
    "D",
    "n",
    "threads",
    "min_ms",
    "median_ms",
    "max_ms",
    "pct_of_floor",
    "peak_mib",
    "peak_in_MxM_fp32",
    "tflops",
    "x_solo_learn",
    "x_lightly",
    "status",
)
RATIO_NOTE = (
    "x_solo_learn, x_lightly: median time over that of plain NT-Xent (no strata) computed by "
    "solo-learn or lightly at the same N and D; pct_of_floor: 6 M^2 D FLOPs at the gemm-floor "
    "rate over the fastest pass (M = 2N)."
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
            z1,
            z2,
            strata,
            temperature=tau,
            negatives=negatives,
            backend=backend,
            precision=spec["precision"],
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


def floor_operands(
    num_images: int, dim: int, precision: str, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (FLOOR_ROWS x D) row block and the (M x D) columns, in the GEMM operand dtype."""
    gen = torch.Generator(device=device).manual_seed(1)
    bf16 = resolve_precision(precision, dtype) == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    rows = torch.randn(FLOOR_ROWS, dim, generator=gen, device=device).to(dtype)
    return rows, torch.randn(2 * num_images, dim, generator=gen, device=device).to(dtype)


def floor_pass(rows: torch.Tensor, columns: torch.Tensor, precision: str) -> float:
    """Seconds for the (512 x D)(D x M) products that cover M rows: 2 M^2 D FLOPs in all."""
    blocks = max(1, columns.shape[0] // rows.shape[0])
    out = rows.new_empty(rows.shape[0], columns.shape[0])
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        if rows.is_cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(blocks):
            torch.mm(rows, columns.T, out=out)
        if rows.is_cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - began) * columns.shape[0] / (blocks * rows.shape[0])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


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


def run_case(spec: dict, measure_memory: bool = True) -> dict:
    """Times and measures one case in this process; returns the measurements."""
    warnings.filterwarnings("ignore")
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    threads = torch.get_num_threads()
    if spec["impl"] == FLOOR:
        precision = resolve_precision(spec["precision"], getattr(torch, spec["dtype"]))
        rows, columns = floor_operands(spec["N"], spec["D"], precision, torch.float32, device)
        for _ in range(spec["warmup"]):
            floor_pass(rows, columns, precision)
        times = [3 * floor_pass(rows, columns, precision) for _ in range(spec["repeats"])]
        return {"times_s": times, "peak_bytes": math.nan, "threads": threads}
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
    peak = _peak_bytes(step, (z1, z2), device) if measure_memory else math.nan
    return {"times_s": times, "peak_bytes": peak, "threads": threads}


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


def _run_here(spec: dict, device: torch.device) -> dict:
    """``run_case`` in this process; memory only on a GPU, where the allocator reports it."""
    try:
        return {**run_case(spec, measure_memory=device.type == "cuda"), "status": "ok"}
    except torch.OutOfMemoryError:
        return {"status": "failed: out of memory"}
    except Exception as error:
        return {"status": f"failed: {type(error).__name__}: {error}".splitlines()[0]}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    """A readable name of the CPU or GPU the benchmark runs on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def cpu_flags() -> str:
    """The CPU's matrix and vector units that decide GEMM speed: AMX, AVX-512, AVX-512 BF16.

    Examples:
        >>> cpu_flags().startswith(("amx", "no-amx"))
        True
    """
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    amx = "amx" if {"amx_tile", "amx_bf16"} <= flags else "no-amx"
    vector: list[str] = [flag for flag in ("avx512f", "avx512_bf16") if flag in flags]
    return " ".join([amx, *(vector or ["no-avx512"])])


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
            for precision in args.precision:
                at = {**common, "N": size, "D": dim, "precision": precision}
                for impl in (FLOOR, *args.impls):
                    if (
                        impl not in ("msr-torch", "msr-triton", FLOOR)
                        and precision != args.precision[0]
                    ):
                        continue
                    for strata in [args.strata[0]] if impl in WITHOUT_STRATA else args.strata:
                        cases.append({**at, "impl": impl, "n": strata})
    return cases


def _row(spec: dict, result: dict, machine: dict) -> dict:
    matrix_bytes = 4.0 * (2 * spec["N"]) ** 2
    times = result.get("times_s", [])
    fastest, median, slowest = (
        (min(times), statistics.median(times), max(times)) if times else (math.nan,) * 3
    )
    peak = result.get("peak_bytes", math.nan)
    flops = 6.0 * (2 * spec["N"]) ** 2 * spec["D"]
    precision = spec["precision"] if spec["impl"] in ("msr-torch", "msr-triton", FLOOR) else "-"
    return {
        **machine,
        "threads": result.get("threads", "-"),
        "dtype": spec["dtype"],
        "precision": precision,
        "tau": spec["temperature"],
        "negatives": spec["negatives"],
        "impl": spec["impl"],
        "N": spec["N"],
        "D": spec["D"],
        "n": "-" if spec["impl"] in WITHOUT_STRATA else spec["n"],
        "passes": len(times),
        "min_ms": fastest * 1e3,
        "median_ms": median * 1e3,
        "max_ms": slowest * 1e3,
        "peak_mib": peak / 2**20,
        "peak_in_MxM_fp32": peak / matrix_bytes,
        "tflops": flops / median / 1e12,
        "status": result["status"],
    }


def add_ratios(rows: list[dict]) -> None:
    """Fills ``floor_ms``, ``pct_of_floor`` and the ratios to the NT-Xent baselines."""
    floors = {(r["N"], r["D"], r["precision"]): r["min_ms"] for r in rows if r["impl"] == FLOOR}
    first_floor = {(r["N"], r["D"]): r["min_ms"] for r in reversed(rows) if r["impl"] == FLOOR}
    for row in rows:
        key = (row["N"], row["D"])
        floor = floors.get((*key, row["precision"]), first_floor.get(key, math.nan))
        row["floor_ms"] = floor
        row["pct_of_floor"] = 100.0 * floor / row["min_ms"]
    for baseline, column in (("solo-learn", "x_solo_learn"), ("lightly", "x_lightly")):
        reference = {(r["N"], r["D"]): r["median_ms"] for r in rows if r["impl"] == baseline}
        for row in rows:
            row[column] = row["median_ms"] / reference.get((row["N"], row["D"]), math.nan)


def _format(value: object) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """The rows as a Markdown table, followed by what its ratio columns compare.

    Examples:
        >>> row = {c: 1.0 for c in TABLE_COLUMNS}
        >>> print(markdown_table([row], ["impl", "N"]).splitlines()[2])
        | 1 | 1 |
    """
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_format(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join([*lines, "", RATIO_NOTE])


def plot(rows: list[dict], path: Path) -> None:
    """Median time and peak memory against N: one row of panels per D, one line per impl and n.

    The legend sits to the right of the panels, so that it covers no point.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r["status"] == "ok" and r["impl"] != FLOOR]
    dims = sorted({r["D"] for r in measured}) or [0]
    figure, axes = plt.subplots(len(dims), 2, figsize=(12, 3.6 * len(dims)), squeeze=False)
    lines = dict.fromkeys((r["impl"], r["n"], r["precision"]) for r in measured)
    for (impl, strata, precision), style in zip(lines, _styles(len(lines)), strict=True):
        label = impl + ("" if strata == "-" else f", n={strata}")
        label += "" if precision == "-" else f", {precision}"
        for panel, dim in zip(axes, dims, strict=True):
            chosen = [
                r
                for r in measured
                if (r["impl"], r["n"], r["precision"]) == (impl, strata, precision)
                and r["D"] == dim
            ]
            if not chosen:
                continue
            sizes = [r["N"] for r in chosen]
            panel[0].plot(sizes, [r["median_ms"] for r in chosen], label=label, **style)
            panel[1].plot(sizes, [r["peak_mib"] for r in chosen], label=label, **style)
    for panel, dim in zip(axes, dims, strict=True):
        for axis, what in zip(
            panel, ("forward+backward, median ms", "peak memory, MiB"), strict=True
        ):
            axis.set_xscale("log", base=2)
            if any(value > 0 for line in axis.get_lines() for value in line.get_ydata()):
                axis.set_yscale("log")
            else:
                axis.text(0.5, 0.5, "not measured", ha="center", transform=axis.transAxes)
            axis.set_xlabel("batch size N")
            axis.set_ylabel(what)
            axis.set_title(f"D = {dim}")
            axis.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for panel in axes[1:]:
        more = panel[0].get_legend_handles_labels()
        for handle, label in zip(*more, strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    figure.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    figure.suptitle("loss forward+backward")
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def _styles(count: int) -> list[dict]:
    markers = "osD^v<>ph*"
    return [{"marker": markers[i % len(markers)], "color": f"C{i % 10}"} for i in range(count)]


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
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=PRECISIONS,
        default=["auto"],
        help="GEMM precisions of the msr-* cases (the others run once, at the first)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, help="timed passes per case and round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="passes over all cases, interleaved in time"
    )
    parser.add_argument(
        "--isolation",
        choices=("process", "none"),
        default="process",
        help="a fresh subprocess per case and round (memory measured), or all in this process",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    parser.add_argument(
        "--budget", type=float, default=math.inf, help="seconds; later cases are then skipped"
    )
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
    if args.rounds < 1:
        raise SystemExit("msr-loss bench: --rounds must be at least 1")
    defaults = GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    device = torch.device(args.device)
    cases = _cases(args)
    results = run_rounds(cases, args, device)
    machine = {"device": device_name(device), "cpu_flags": cpu_flags()}
    rows = [_row(spec, result, machine) for spec, result in zip(cases, results, strict=True)]
    add_ratios(rows)
    write_outputs(rows, args.out_dir)
    threads = sorted({str(r["threads"]) for r in rows if r["status"] == "ok"})
    print(f"device: {machine['device']} ({machine['cpu_flags']}); torch {torch.__version__}")
    print(
        f"cases ran with {'/'.join(threads) or '-'} threads; dtype {args.dtype}, "
        f"tau {args.temperature}, negatives {args.negatives!r}; min/median/max over "
        f"{args.rounds} rounds x {args.repeats} passes, each after {args.warmup} warm-up"
    )
    print(markdown_table(rows))
    print(f"wrote loss_kernel.csv, loss_kernel.md and loss_kernel.png in {args.out_dir}")
    return 0


def run_rounds(cases: list[dict], args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Runs every case ``args.rounds`` times, round-robin; merges each case's passes."""
    from tqdm import tqdm

    results: list[dict] = [{} for _ in cases]
    began = time.perf_counter()
    progress = tqdm(total=len(cases) * args.rounds, desc="msr-loss bench", unit="case")
    for _ in range(args.rounds):
        for spec, result in zip(cases, results, strict=True):
            skipped = _available(spec["impl"], device)
            if time.perf_counter() - began > args.budget:
                skipped = skipped or f"skipped: over the {args.budget:.0f} s budget"
            if skipped:
                latest = {"status": result.get("status", skipped)}
            elif args.isolation == "none":
                latest = _run_here(spec, device)
            else:
                latest = _run_in_subprocess(spec, args.timeout)
            if "times_s" in latest:
                latest["times_s"] = result.get("times_s", []) + latest["times_s"]
                latest["peak_bytes"] = max(
                    latest["peak_bytes"], result.get("peak_bytes", -math.inf)
                )
            result.update(latest)
            progress.update()
    progress.close()
    return results


def write_outputs(rows: list[dict], out_dir: Path) -> None:
    """Writes ``loss_kernel.csv`` (every column), ``loss_kernel.md`` and ``loss_kernel.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "loss_kernel.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "loss_kernel.md").write_text(markdown_table(rows) + "\n")
    plot(rows, out_dir / "loss_kernel.png")


if __name__ == "__main__":
    sys.exit(main())
