"""What happens when the Triton kernel cannot run on CUDA: a warning, then the PyTorch path.

A failed import of ``triton`` or a failed compile of a kernel (an unsupported GPU, a Triton
release that breaks the kernel) must not stop a training run that asked for ``backend="auto"``:
the first failure is reported once with a ``RuntimeWarning`` and every later call in the process
takes the PyTorch path.
"""

from __future__ import annotations

import warnings

_FAILURES: list[str] = []


def triton_failed() -> bool:
    """Whether the Triton kernel has failed on CUDA in this process."""
    return bool(_FAILURES)


def record_triton_failure(error: BaseException) -> None:
    """Warns that the kernel failed and switches the process to the PyTorch path."""
    message = f"{type(error).__name__}: {error}".splitlines()[0][:500]
    if not _FAILURES:
        warnings.warn(
            f"the Triton kernel failed on CUDA ({message}); msr-loss uses the PyTorch path "
            "from now on in this process",
            RuntimeWarning,
            stacklevel=3,
        )
    _FAILURES.append(message)
