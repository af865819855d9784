"""The ``msr-loss`` console command: one sub-command per job, each imported only when run."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("msr_loss.benchmarks.confounded_digits", "demo_main", "the README's main job"),
    "digits": ("msr_loss.benchmarks.confounded_digits", "main", "the confounded-digits benchmark"),
    "digits-report": (
        "msr_loss.benchmarks.confounded_digits",
        "report_main",
        "the digits report of finished runs (merges runs.csv files)",
    ),
    "bench": ("msr_loss.benchmarks.loss_kernel", "main", "the loss-kernel microbenchmark"),
    "solo-pretrain": (
        "msr_loss.adapters.solo_learn_launcher",
        "main",
        "run solo-learn's main_pretrain.py with the msr-loss flags",
    ),
}


def _usage() -> str:
    lines = ["usage: msr-loss COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<14} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs ``msr-loss COMMAND [ARGS...]``; ``COMMAND --help`` describes each one."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] not in COMMANDS:
        print(f"msr-loss: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[args[0]]
    command = getattr(importlib.import_module(module_name), function_name)
    return int(command(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
