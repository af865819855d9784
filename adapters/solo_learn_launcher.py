"""``msr-loss solo-pretrain``: solo-learn's own ``main_pretrain.py`` with the msr-loss flags.

The launcher makes solo-learn's config parser call :func:`msr_loss.adapters.register` on the
parsed config, then runs ``main_pretrain.py`` from the user's solo-learn checkout in this
process, with the user's arguments. On solo-learn main (hydra) the flag blocks stay in the
config (a flag without a leading ``+`` is given ``++`` so that it adds or overrides); on PyPI's
1.0.x (argparse) they are hidden from argparse and attached to the parsed namespace.

The script runs as a ``__main__`` module whose spec names this launcher, so that Lightning's
DDP launcher, which starts the other ranks with ``python -m <__main__.__spec__.name> <argv>``,
starts them through the launcher too (the checkout is passed on in ``SOLO_LEARN_DIR``).

When the checkout holds a ``solo`` package, that package is the one run, even if another
solo-learn is installed: the checkout goes first on ``sys.path`` and on ``PYTHONPATH`` (for the
other ranks and data-loader workers), and a ``solo`` imported earlier from elsewhere is unloaded.
The launcher prints which ``solo`` it imported and from where.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .flags import TERMS
from .solo_learn import register

MODULE = "msr_loss.adapters.solo_learn_launcher"

USAGE = """usage: msr-loss solo-pretrain [--solo-learn DIR] ARGS...

Runs DIR/main_pretrain.py (a solo-learn checkout; default $SOLO_LEARN_DIR, else the current
directory) with ARGS, after registering the msr-loss wrapper for the configured method.
Add the flag block to your usual arguments, e.g.

  msr-loss solo-pretrain --solo-learn ~/solo-learn \\
      --config-path scripts/pretrain/cifar --config-name simclr.yaml \\
      +msr.weight=0.5 +msr.num_strata=16 +msr.temperature=0.2 +msr.meta_lr=0.01
"""


def _split_flag(token: str) -> tuple[str, str, str] | None:
    """``(prefix, "msr.key", value)`` for a flag-block token such as ``+msr.weight=0.5``."""
    prefix = token[: len(token) - len(token.lstrip("+"))]
    body = token[len(prefix) :]
    key, sep, value = body.partition("=")
    if not sep or "." not in key or key.split(".", 1)[0] not in TERMS:
        return None
    return prefix, key, value


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def hydra_arguments(args: Sequence[str]) -> list[str]:
    """``args`` with every flag-block token given ``++`` unless it already has ``+`` or ``++``.

    Examples:
        >>> hydra_arguments(["msr.weight=0.5", "+msr.num_strata=8", "optimizer.lr=0.1"])
        ['++msr.weight=0.5', '+msr.num_strata=8', 'optimizer.lr=0.1']
    """
    out = []
    for token in args:
        split = _split_flag(token)
        out.append(f"++{token}" if split is not None and not split[0] else token)
    return out


def take_flag_blocks(args: Sequence[str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Splits ``args`` into the other arguments and the flag blocks they carried.

    Examples:
        >>> take_flag_blocks(["--method", "simclr", "+msr.weight=0.5", "+msr.enabled=true"])
        (['--method', 'simclr'], {'msr': {'weight': 0.5, 'enabled': True}})
    """
    rest: list[str] = []
    blocks: dict[str, dict[str, Any]] = {}
    for token in args:
        split = _split_flag(token)
        if split is None:
            rest.append(token)
            continue
        flag, key = split[1].split(".", 1)
        blocks.setdefault(flag, {})[key] = _parse_value(split[2])
    return rest, blocks


def _registering(parse: Callable[..., Any], hide_flags: bool) -> Any:
    def parse_and_register(*args: Any, **kwargs: Any) -> Any:
        blocks: dict[str, dict[str, Any]] = {}
        if hide_flags:
            saved = sys.argv
            rest, blocks = take_flag_blocks(saved[1:])
            sys.argv = [saved[0], *rest]
            try:
                config = parse(*args, **kwargs)
            finally:
                sys.argv = saved
        else:
            config = parse(*args, **kwargs)
        for flag, block in blocks.items():
            setattr(config, flag, block)
        method = register(config)
        flags = getattr(method, "_msr_flags", ())
        described = ", ".join(map(repr, flags)) or "no msr-loss flags, the method is unchanged"
        print(f"msr-loss: {method.__name__} ({described})", file=sys.stderr)
        return config

    return parse_and_register


def _is_inside(path: str | None, folder: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(folder.resolve())


def use_checkout(solo_dir: Path) -> None:
    """Makes ``import solo`` load ``solo_dir``'s own package, if it has one.

    ``solo_dir`` goes first on ``sys.path`` and on ``PYTHONPATH`` (read by processes started from
    this one), and ``solo`` and its submodules are unloaded if they were imported from elsewhere.
    """
    package = solo_dir / "solo"
    if not (package / "__init__.py").is_file():
        return
    entry = str(solo_dir)
    sys.path[:] = [entry, *(p for p in sys.path if p != entry)]
    inherited = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    os.environ["PYTHONPATH"] = os.pathsep.join([entry, *(p for p in inherited if p and p != entry)])
    loaded = sys.modules.get("solo")
    if loaded is not None and not _is_inside(getattr(loaded, "__file__", None), package):
        for name in [n for n in sys.modules if n == "solo" or n.startswith("solo.")]:
            del sys.modules[name]
    importlib.invalidate_caches()


def describe_solo(solo_dir: Path) -> str:
    """One line naming the imported ``solo`` package, its location and whose it is."""
    import solo

    where = Path(solo.__file__ or "?").parent
    if _is_inside(solo.__file__, solo_dir / "solo"):
        whose = "the checkout's own package"
    elif (solo_dir / "solo").is_dir():
        whose = f"not the checkout's: {solo_dir / 'solo'} is not an importable package"
    else:
        whose = f"the installed package; {solo_dir} has no solo/ package"
    return f"msr-loss: running solo-learn from {where} ({whose})"


def install(args: Sequence[str]) -> list[str]:
    """Hooks :func:`register` into solo-learn's config parser; returns the arguments to pass on.

    solo-learn main parses with ``solo.args.pretrain.parse_cfg`` (hydra); PyPI's 1.0.x with
    ``solo.args.setup.parse_args_pretrain`` (argparse), which is shown the arguments without the
    flag tokens while ``sys.argv`` keeps them for the other DDP ranks.
    """
    try:
        from solo.args import pretrain as hydra_parser
    except ImportError:
        from solo.args import setup as argparse_parser

        original = argparse_parser.parse_args_pretrain
        argparse_parser.parse_args_pretrain = _registering(original, hide_flags=True)
        return list(args)
    hydra_parser.parse_cfg = _registering(hydra_parser.parse_cfg, hide_flags=False)
    return hydra_arguments(args)


def run_script(script: Path, args: Sequence[str]) -> None:
    """Runs ``script`` with ``args`` as ``__main__`` under this launcher's module spec."""
    module = types.ModuleType("__main__")
    module.__file__ = str(script)
    module.__spec__ = importlib.util.find_spec(MODULE)
    code = compile(script.read_bytes(), str(script), "exec")
    saved_main, saved_argv, saved_path = sys.modules["__main__"], sys.argv, list(sys.path)
    sys.modules["__main__"] = module
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.parent))
    try:
        exec(code, module.__dict__)
    finally:
        sys.modules["__main__"], sys.argv, sys.path[:] = saved_main, saved_argv, saved_path


def main(argv: list[str] | None = None) -> int:
    """Runs ``msr-loss solo-pretrain [--solo-learn DIR] ARGS...``; returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    parser = argparse.ArgumentParser(
        prog="msr-loss solo-pretrain", add_help=False, allow_abbrev=False
    )
    parser.add_argument("--solo-learn", default=os.environ.get("SOLO_LEARN_DIR") or ".")
    known, rest = parser.parse_known_args(args)
    solo_dir = Path(known.solo_learn).expanduser().resolve()
    script = solo_dir / "main_pretrain.py"
    if not script.is_file():
        print(
            f"msr-loss solo-pretrain: no main_pretrain.py in {solo_dir}; pass the solo-learn "
            f"checkout with --solo-learn DIR or SOLO_LEARN_DIR\n\n{USAGE}",
            file=sys.stderr,
        )
        return 2
    use_checkout(solo_dir)
    try:
        passed_on = install(rest)
    except ImportError as error:
        print(f"msr-loss solo-pretrain: solo-learn is not importable: {error}", file=sys.stderr)
        return 2
    print(describe_solo(solo_dir), file=sys.stderr)
    os.environ["SOLO_LEARN_DIR"] = str(solo_dir)
    try:
        run_script(script, passed_on)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
