"""Argument checks shared by every loss: one clear error per kind of bad input."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

_Loss = TypeVar("_Loss", bound=Callable[..., Any])


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_floating(name: str, tensor: object) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {tensor.dtype}")
    return tensor


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32 and every narrower float compute in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def without_autocast(loss: _Loss) -> _Loss:
    """Runs ``loss`` with autocast off on the device of its first tensor argument.

    The losses choose their own compute dtype (:func:`compute_dtype`); inside a ``torch.autocast``
    region their matmuls would otherwise drop back to half precision.
    """

    @functools.wraps(loss)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        device = tensors[0].device.type if tensors else "cpu"
        with torch.autocast(device_type=device, enabled=False):
            return loss(*args, **kwargs)

    return cast(_Loss, wrapper)
