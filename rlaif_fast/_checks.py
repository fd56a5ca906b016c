"""Input checks shared by the public ops. Each raises ValueError/TypeError naming the value and the fix."""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_tensor(
    name: str,
    x,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    ndim: int | None = None,
    min_ndim: int | None = None,
) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(
                f"{name} has dtype {str(x.dtype).replace('torch.', '')}; expected one of: {allowed}"
            )
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def check_float(name: str, x) -> torch.Tensor:
    return check_tensor(name, x, dtypes=FLOAT_DTYPES)


def check_int(name: str, x) -> torch.Tensor:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        raise TypeError(f"{name} must be an integer tensor (token ids), got {x.dtype}; cast with .long()")
    return check_tensor(name, x, dtypes=INT_DTYPES)


def check_same_shape(**tensors: torch.Tensor) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    k0, v0 = items[0]
    for k, v in items[1:]:
        if v.shape != v0.shape:
            raise ValueError(
                f"{k} has shape {tuple(v.shape)} but {k0} has shape {tuple(v0.shape)}; they must match"
            )


def check_same_device(**tensors: torch.Tensor) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    k0, v0 = items[0]
    for k, v in items[1:]:
        if v.device != v0.device:
            raise ValueError(f"{k} is on {v.device} but {k0} is on {v0.device}; move them to one device")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not (v > 0 or (allow_zero and v == 0)) or v != v:
        rule = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return v


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; use one of {choices}")
