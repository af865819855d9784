"""Argument checks shared by every loss: one clear error per kind of bad input."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

from msr_loss.types import BACKENDS, NEGATIVE_SETS, REDUCTIONS

_Loss = TypeVar("_Loss", bound=Callable[..., Any])
_Choice = TypeVar("_Choice", bound=str)


def check_real(
    name: str,
    value: object,
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
) -> float:
    """The one check of a real-valued setting: a finite real number within the given bounds.

    Python and NumPy numbers are accepted (``numbers.Real``); ``bool`` is not.

    Args:
        name: The argument's name, as the error message shows it.
        value: The value to check.
        above: Exclusive lower bound.
        at_least: Inclusive lower bound.
        at_most: Inclusive upper bound.

    Returns:
        ``value`` as a Python float.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is not finite or out of bounds.

    Examples:
        >>> import numpy as np
        >>> check_real("alpha", np.float32(0.5), above=0)
        0.5
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    number = float(value)
    bounds = []
    if above is not None:
        bounds.append(f"> {above}")
    if at_least is not None:
        bounds.append(f">= {at_least}")
    if at_most is not None:
        bounds.append(f"<= {at_most}")
    in_range = (
        math.isfinite(number)
        and (above is None or number > above)
        and (at_least is None or number >= at_least)
        and (at_most is None or number <= at_most)
    )
    if not in_range:
        wanted = " and ".join(["a finite number", *bounds]) if bounds else "a finite number"
        raise ValueError(f"{name} must be {wanted}, got {value}")
    return number


def check_integer(name: str, value: object, *, at_least: int | None = None) -> int:
    """The one check of an integer setting (Python or NumPy integers; not ``bool``, not 1.5).

    Examples:
        >>> check_integer("every", 3, at_least=1)
        3
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    number = int(value)
    if at_least is not None and number < at_least:
        raise ValueError(f"{name} must be >= {at_least}, got {number}")
    return number


def check_flag(name: str, value: object) -> bool:
    """The one check of an on/off setting: ``True`` or ``False``, not ``"no"`` or 0.

    Examples:
        >>> check_flag("gather_distributed", False)
        False
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_temperature(temperature: object, name: str = "temperature") -> float:
    """A temperature: finite, > 0, and with an inverse that float32 can hold."""
    value = check_real(name, temperature, above=0)
    if not math.isfinite(1.0 / value) or 1.0 / value > torch.finfo(torch.float32).max:
        raise ValueError(f"{name} is too small: 1/{name} overflows float32, got {value}")
    return value


def check_choice(name: str, value: _Choice, allowed: tuple[str, ...]) -> _Choice:
    """Checks that ``value`` is one of ``allowed``; returns it with its (``Literal``) type."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_loss_choices(negatives: str, reduction: str, backend: str) -> None:
    """Checks the three choices every contrastive loss takes."""
    check_choice("negatives", negatives, NEGATIVE_SETS)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)


def check_floating(name: str, tensor: object) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {tensor.dtype}")
    if tensor.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no values: use a real device")
    return tensor


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raises a ValueError naming ``name`` if ``tensor`` holds a NaN or an infinity.

    One ``aminmax`` pass (NaN propagates into both results): ``isfinite(...).all()`` costs about
    ten times as much on a CPU.
    """
    if torch.compiler.is_compiling() or tensor.numel() == 0:
        return
    if not bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def check_images(images: object, dims: tuple[int, ...]) -> torch.Tensor:
    """Checks a non-empty image tensor with one of the given numbers of dimensions (3 or 4)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() not in dims:
        shapes = " or ".join("(B, C, H, W)" if d == 4 else "(C, H, W)" for d in dims)
        raise ValueError(f"images must have shape {shapes}, got {tuple(images.shape)}")
    if images.numel() == 0:
        raise ValueError(f"images is empty, shape {tuple(images.shape)}")
    return images


def check_views(z1: object, z2: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks two batches of projections of shape (N, D) with N >= 2."""
    z1 = check_floating("z1", z1)
    z2 = check_floating("z2", z2)
    if z1.dim() != 2:
        raise ValueError(f"z1 must have shape (N, D), got a tensor of shape {tuple(z1.shape)}")
    if z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if z1.shape[0] < 2:
        raise ValueError(
            f"a batch needs at least 2 samples to have negatives, got N = {z1.shape[0]}"
        )
    if z1.shape[1] < 1:
        raise ValueError("the projection dimension D must be at least 1")
    if z1.device != z2.device:
        raise ValueError(f"z1 and z2 are on different devices: {z1.device} and {z2.device}")
    check_finite("z1", z1)
    check_finite("z2", z2)
    return z1, z2


def check_strata(strata: object, dim: int, device: torch.device) -> torch.Tensor:
    """Checks an (n, D) tensor of strata against the projection dimension D."""
    strata = check_floating("strata", strata)
    if strata.dim() != 2 or strata.shape[0] < 1:
        raise ValueError(f"strata must have shape (n, D) with n >= 1, got {tuple(strata.shape)}")
    if strata.shape[1] != dim:
        raise ValueError(
            f"strata have dimension {strata.shape[1]} but the projections have dimension {dim}"
        )
    if strata.device != device:
        raise ValueError(f"strata are on {strata.device} but the projections are on {device}")
    check_finite("strata", strata)
    return strata


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype a loss of inputs of ``dtypes`` computes in: float64 if any input is float64.

    float32 and every narrower float compute in float32, whatever the order of the inputs.
    """
    return torch.float64 if torch.float64 in dtypes else torch.float32


def without_autocast(loss: _Loss) -> _Loss:
    """Runs ``loss`` with autocast off on the device of its first tensor argument.

    The losses choose their own compute dtype (:func:`compute_dtype`); inside a ``torch.autocast``
    region their matmuls would otherwise drop back to half precision. A loss with a keyword-only
    ``precision`` argument learns that autocast was on: ``precision="auto"`` (given or by default)
    reaches it as ``"bf16"``, the similarity GEMMs' precision under autocast. Tensors on the
    ``meta`` device (no autocast there) go straight to the loss, whose checks reject them by name.
    """
    takes_precision = "precision" in inspect.signature(loss).parameters

    @functools.wraps(loss)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        device = tensors[0].device.type if tensors else "cpu"
        if device == "meta":
            return loss(*args, **kwargs)
        auto = takes_precision and kwargs.get("precision", "auto") == "auto"
        if auto and torch.is_autocast_enabled(device):
            kwargs["precision"] = "bf16"
        with torch.autocast(device_type=device, enabled=False):
            return loss(*args, **kwargs)

    return cast(_Loss, wrapper)
