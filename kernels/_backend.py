"""Which implementation serves a tensor: the Triton kernels or the vectorized torch path.

* CUDA tensors run the Triton kernels.
* CPU tensors run the torch implementation of the same math, unless the process runs Triton's
  interpreter (``TRITON_INTERPRET=1`` set before ``kernels`` is imported): then they run the Triton
  kernels on the CPU, which is how CI tests every kernel.
* ``use_backend("torch" | "triton")`` forces one for the ops called inside it (tests compare the two
  paths in one process; benchmarks pin the torch path on CPU).

Also the conventions every op shares: its argument errors (``OpValueError`` / ``OpTypeError``) and its
autocast rule (``register_autocast``).

The interpreter flag is read once, at import, because ``triton.jit`` decides at decoration time
whether a kernel is compiled or interpreted.
"""

from __future__ import annotations

import contextlib
import operator
import os
from collections.abc import Iterator, Sequence

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

_forced: list[str] = []


def backend_for(t: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: the implementation an op would run for tensor ``t``.

    While ``torch.compile`` / ``torch.export`` trace an op (fake tensors), a CPU tensor always takes the
    torch path: interpreted kernels cannot run on fake tensors (``wrap_triton`` needs data pointers), and
    tracing the torch path is what makes a CPU graph or AOTInductor package pure aten. CUDA tensors keep
    the Triton kernels, which inductor then launches from its generated code.
    """
    if t.device.type == "cpu" and is_fake(t):
        return "torch"
    if _forced:
        forced = _forced[-1]
        if forced == "triton" and not (t.is_cuda or (INTERPRET and t.device.type == "cpu")):
            raise RuntimeError(
                f"the Triton backend needs a CUDA tensor or TRITON_INTERPRET=1 for CPU tensors; got {t.device}"
            )
        return forced
    if t.is_cuda:
        return "triton"
    return "triton" if INTERPRET and t.device.type == "cpu" else "torch"


# The forward ops whose torch path traces with fake tensors into static-shape aten ops (tests/kernels/
# test_decompose.py). nms/batched_nms are not among them: their output size is the data's.
TRACEABLE_OPS = ("roi_align", "multiscale_roi_align", "decode_boxes", "encode_boxes", "nms_fixed", "paste_masks")


def cpu_decompositions() -> dict:
    """``{torch.ops.mrcnn.<op>.default: its Python implementation}`` for ``ExportedProgram.run_decompositions``.

    ``torch.export`` keeps each of our ops as one opaque node, which an AOTInductor package could only call
    back through this project. Decomposed with its own implementation, an op is traced on fake CPU tensors,
    which take the torch path (``backend_for``): the graph then holds aten ops only. RoIAlign's adaptive
    sampling has a data-dependent sample grid and raises a ``ValueError`` when traced (a fixed
    ``sampling_ratio`` traces).
    """
    from torch._library.custom_ops import _maybe_get_opdef

    return {getattr(torch.ops.mrcnn, op).default: _maybe_get_opdef(f"mrcnn::{op}")._init_fn for op in TRACEABLE_OPS}


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``"torch"`` or ``"triton"`` for the ops called inside the ``with`` block."""
    if name not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch' or 'triton', got {name!r}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def autotune_configs(configs: Sequence[triton.Config]) -> list[triton.Config]:
    """The configs to autotune over: all on a GPU, the first alone under the interpreter (one
    interpreted run of every config would multiply CI time for nothing)."""
    return list(configs[:1]) if INTERPRET else list(configs)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (gradcheck), everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Bilinear samples per bin side: the cap of the adaptive grid (ceil(bin size)) of RoIAlign and the mask-loss
# targets, and the largest fixed sampling_ratio the ops accept. Only a box over 1024 bins of pixels per side
# reaches it; a finite but absurd box (1e9 pixels) would otherwise loop for hours.
MAX_SAMPLES_PER_SIDE = 1024


class OpValueError(ValueError, RuntimeError):
    """A bad op argument. A ``ValueError``, and a ``RuntimeError`` as torchvision's C++ argument checks
    (``TORCH_CHECK``) raise, so code written against either catches it."""


class OpTypeError(TypeError, RuntimeError):
    """An op argument of the wrong type (or dtype); a ``RuntimeError`` too, as ``OpValueError``."""


class BoxesFormatError(OpValueError, AssertionError):
    """RoI boxes that are neither ``Tensor[K, 5]`` nor ``list[Tensor[L, 4]]``: also an ``AssertionError``, which
    torchvision's box check (``torch._assert``) raises."""


_AUTOCAST_LIB = torch.library.Library("mrcnn", "IMPL")
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def _upcast(value: object, device: str) -> object:
    """torchvision's autocast cast (``cached_cast(kFloat, ...)``): float16/bfloat16 tensors on ``device`` to
    float32, inside lists too; everything else as it is."""
    if isinstance(value, torch.Tensor):
        half = value.dtype in (torch.float16, torch.bfloat16) and value.device.type == device
        return value.float() if half else value
    if isinstance(value, (list, tuple)):
        return type(value)(_upcast(v, device) for v in value)
    return value


def register_autocast(name: str, *, upcast: bool) -> None:
    """The autocast rule of ``torch.ops.mrcnn.<name>`` on CPU and CUDA (torchvision registers one for each of its
    ops on both): the op runs with autocast off, so the torch paths' matmuls are not lowered to half precision.

    ``upcast=True`` is torchvision's rule for ``nms``: float16/bfloat16 inputs are cast to float32 first (the
    kept boxes are those of the float32 boxes). ``upcast=False`` keeps the inputs' dtypes: our kernels read half
    types and accumulate in float32, so a cast would only copy (for RoIAlign, the whole feature pyramid) for
    the same result in the same output dtype.
    """
    op = getattr(torch.ops.mrcnn, name).default
    for device in ("cpu", "cuda"):

        def kernel(_keyset: torch._C.DispatchKeySet, *args: object, device: str = device) -> object:
            with torch.autocast(device, enabled=False):
                return op(*(_upcast(a, device) for a in args)) if upcast else op(*args)

        _AUTOCAST_LIB.impl(name, kernel, _AUTOCAST_KEYS[device], with_keyset=True)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise an ``OpTypeError``/``OpValueError`` naming ``name`` unless ``t`` is a tensor of the given rank,
    dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise OpTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise OpValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise OpTypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if device is not None and t.device != device:
        raise OpValueError(f"{name} is on {t.device} but the input is on {device}; put them on the same device")
    return t


def check_sampling_ratio(sampling_ratio: object) -> int:
    """``sampling_ratio`` as an int (Python or numpy; a float or bool is refused). A fixed ratio takes
    ``ratio**2`` samples per bin: above the adaptive grid's cap it would hang a GPU (10**6 loops 10**12 times
    per bin), so it is refused rather than silently capped."""
    try:
        if isinstance(sampling_ratio, bool):
            raise TypeError
        sampling_ratio = operator.index(sampling_ratio)
    except TypeError:
        raise OpTypeError(f"sampling_ratio must be an int, got {type(sampling_ratio).__name__}") from None
    if sampling_ratio > MAX_SAMPLES_PER_SIDE:
        raise OpValueError(
            f"sampling_ratio must be <= {MAX_SAMPLES_PER_SIDE} samples per bin side (or <= 0: adaptive), "
            f"got {sampling_ratio}"
        )
    return sampling_ratio
