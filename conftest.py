"""Lets the doctests of ``adapters/`` run on the installed package ``msr_loss.adapters``.

The folder is installed under that name (pyproject's package-dir), so its modules import each
other relatively as ``msr_loss.adapters.*``. Collecting ``adapters/x.py`` would otherwise import a
second copy named ``adapters.x``, with its own flag registry; naming the installed modules under
the folder's name makes the collector find them already imported.
"""

import importlib
import pkgutil
import sys

import msr_loss.adapters

sys.modules["adapters"] = msr_loss.adapters
for _module in pkgutil.iter_modules(msr_loss.adapters.__path__):
    sys.modules[f"adapters.{_module.name}"] = importlib.import_module(
        f"msr_loss.adapters.{_module.name}"
    )
