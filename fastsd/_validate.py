"""Argument checks shared by the public ops.

Every check reads only tensor metadata (shape, dtype, device), never values, so it costs no host
synchronisation and runs under torch.compile. Errors name the function, the argument and what
was expected.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
from typing import Iterable, Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(fn: str, name: str, value, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None,
           dtypes: Optional[Sequence[torch.dtype]] = None, what: str = "") -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor{what and ' ' + what}, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(
            f"{fn}: {name} must be a {ndim}-D tensor{what and ' ' + what}, got shape {tuple(value.shape)}"
        )
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{fn}: {name} must have at least {min_ndim} dims, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{fn}: {name} must have dtype in ({_dtype_names(dtypes)}), got {value.dtype}")
    return value


def is_real(value) -> bool:
    """A real number, not a bool. float and int first: an ABC isinstance costs about 1 us a call."""
    kind = type(value)
    return kind is float or kind is int or (kind is not bool and isinstance(value, numbers.Real))


def is_integer(value) -> bool:
    """An integer, not a bool (int first, as :func:`is_real`)."""
    kind = type(value)
    return kind is int or (kind is not bool and isinstance(value, numbers.Integral))


def same_device(fn: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    device = ref.device
    for name, t in others.items():
        if t.device != device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {ref_name} is on {ref.device}; they must match")


def unit_interval(fn: str, name: str, value) -> float:
    if not is_real(value):
        raise TypeError(f"{fn}: {name} must be a number in [0, 1], got {type(value).__name__}")
    value = float(value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{fn}: {name} must be in [0, 1], got {value}")
    return value


def positive_int_pair(fn: str, name: str, value) -> Tuple[int, int]:
    """An int or a pair of ints, each >= 1."""
    if is_integer(value):
        value = (int(value), int(value))
    if (
        not isinstance(value, (tuple, list, torch.Size))
        or len(value) != 2
        or not all(is_integer(v) for v in value)
    ):
        raise TypeError(f"{fn}: {name} must be an int or a pair of ints, got {value!r}")
    if min(value) < 1:
        raise ValueError(f"{fn}: {name} must be >= 1, got {tuple(value)}")
    return int(value[0]), int(value[1])


def positive_float(fn: str, name: str, value) -> float:
    if not is_real(value):
        raise TypeError(f"{fn}: {name} must be a positive number, got {type(value).__name__}")
    value = float(value)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value}")
    return value


def generator(fn: str, gen, device: torch.device):
    if gen is None:
        return None
    if not isinstance(gen, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator or None, got {type(gen).__name__}")
    if gen.device.type != device.type:
        raise ValueError(f"{fn}: generator is on {gen.device} but the tensors are on {device}; they must match")
    return gen


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout an op's output keeps: channels_last when x is in it, else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def kernel_asserts(*tensors: torch.Tensor) -> bool:
    """Whether the kernels check their index inputs themselves for these tensors.

    On CUDA tensors the Triton launchers compile their ``tl.device_assert`` checks in (an asynchronous
    device-side assert, like PyTorch's own index checks), and the CUDA C++ mix backend runs its check
    kernel; the interpreter (CPU tensors, tests) ignores ``tl.device_assert``, so there the host glue
    checks instead. fastsd.bench.launches replaces this function while it counts, so the count
    follows the CUDA branch.
    """
    for t in tensors:  # (is_cuda: no torch.device made; a loop, not all() of a generator: 2 us -> 0.3)
        if not t.is_cuda:
            return False
    return True


def device_check(fn: str, ok: torch.Tensor, message: str) -> None:
    """Assert the one-element bool ``ok`` on its device, without a host sync (``message`` names the
    argument and what was expected).

    On CUDA a failure is an asynchronous device-side assert (reported at the next synchronising
    call, like PyTorch's own index checks); on the CPU it raises ValueError at once.
    """
    try:
        torch._assert_async(ok, f"{fn}: {message}")
    except RuntimeError as exc:
        raise ValueError(f"{fn}: {message} ({exc})") from None


def class_indices(fn: str, name: str, t: torch.Tensor, num_classes: int) -> None:
    """Integer class indices in [0, num_classes): on the CPU one reduction (aminmax) and a ValueError
    at once; on CUDA an asynchronous device-side assert (:func:`device_check`, no host sync)."""
    if not t.numel():
        return
    message = f"{name} must be class indices in [0, num_classes={num_classes})"
    if t.is_cpu and not kernel_asserts(t):  # (fastsd.bench.launches counts the CUDA branch)
        lo, hi = torch.aminmax(t)
        lo, hi = lo.item(), hi.item()  # Python numbers: a 0-d tensor's compare makes a tensor (3-4 us)
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{fn}: {message}, got values in [{int(lo)}, {int(hi)}]")
    else:
        device_check(fn, ((t >= 0) & (t < num_classes)).all(), message)


@functools.lru_cache(maxsize=None)
def launcher_takes(launcher, arg: str) -> bool:
    """Whether a Triton launcher takes ``arg``. Issue 12 adds index checks on the device and a saved
    inverse permutation to the launchers in kernels/ (``sorted_partner`` and ``inverse_partner`` in
    patch_swap, ``check_indices`` in pair_kd_loss); the glue uses them where the launchers have them
    and checks on the host where they do not."""
    return arg in inspect.signature(launcher).parameters
