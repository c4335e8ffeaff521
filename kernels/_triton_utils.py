"""What every Triton kernel and launcher shares: whether kernels are interpreted, the autotune space,
``wrap_triton`` for every launch, 64-bit address offsets, and torch's roundings reproduced in Triton.

The kernels compute in float32 (float64 for float64) and must round like torch where torch rounds:
once to the output dtype, and at the intermediate steps where torch computes in the inputs' dtype.
Two things get in the way: Triton's float32 ``/`` is not correctly rounded on GPUs, and its
interpreter (CPU tests) converts float32 -> bfloat16 by truncation instead of rounding.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Iterator, Sequence

import torch
import triton
import triton.language as tl
from torch._library.triton import is_wrap_triton_enabled
from triton.language.extra.cuda import libdevice
from triton.runtime.autotuner import Autotuner

__all__ = [
    "INTERPRET", "TunedLauncher", "autotune_configs", "cast_rn", "ieee_div", "loop_bound", "mul_rn", "offset64",
    "persistent_autotuning", "round_to", "tl_acc_dtype", "wrap_triton",
]  # fmt: skip

# Read once, at import: ``triton.jit`` decides at decoration time whether a kernel is compiled or interpreted.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_configs(configs: Sequence[triton.Config]) -> list[triton.Config]:
    """The configs to autotune over: all on a GPU, the first alone under the interpreter (one
    interpreted run of every config would multiply CI time for nothing)."""
    return list(configs[:1]) if INTERPRET else list(configs)


@contextlib.contextmanager
def persistent_autotuning() -> Iterator[None]:
    """Inside the block, ``triton.autotune`` decorates kernels whose results persist across processes.

    Triton's ``cache_results`` (``Autotuner.check_disk_cache``): the best config of a tuning key is written to
    Triton's cache folder (``TRITON_CACHE_DIR``, default ``~/.triton/cache``) under a hash of Triton's version,
    the GPU target, the kernel's source (and what it calls), the cache-relevant environment, the key and the
    configs, so that a new process skips the benchmarking of every key tuned before. ``triton.autotune`` reads
    the ``TRITON_CACHE_AUTOTUNING`` knob when it decorates; the knob is set for the block only, so other code's
    kernels keep their own choice. Where Triton lacks it (before 3.3), the block does nothing.
    """
    knobs = getattr(triton, "knobs", None)
    if knobs is None or "cache_results" not in inspect.signature(triton.autotune).parameters:
        yield
        return
    with knobs.autotuning.scope():
        knobs.autotuning.cache = True
        yield


def tl_acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """Triton's accumulation dtype for ``dtype`` (``_contract.acc_dtype``): float64 for float64, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def wrap_triton(kernel: object) -> object:
    """``torch.library.wrap_triton(kernel)``: every launch goes through it, so that a graph traced over CUDA tensors
    records the launch (inductor then launches the kernel from its generated code; ``kernels._backend.
    TritonCustomOp``). In eager calls of our ops it is the kernel itself, and an autotuned kernel launches its
    tuned config directly after the first call for a key (``TunedLauncher``).

    Under the interpreter the kernel is returned as it is: torch 2.11's ``wrap_triton`` refuses an interpreted
    kernel (later versions pass it through), and interpreted kernels only ever run eagerly.
    """
    if INTERPRET:
        return kernel
    if isinstance(kernel, Autotuner):
        return _tuned_launcher(kernel)
    return torch.library.wrap_triton(kernel)


class TunedLauncher:
    """An autotuned kernel, launched eagerly without the autotuner's dispatch once a key is tuned.

    ``Autotuner.run`` rebuilds its key on every call from a dict of all ~70 arguments, filtered by membership in
    a list of the ~70 argument names (quadratic): 330 us a call of RoIAlign's forward on this busy 2-core CPU,
    with the launch itself stubbed out. Here the key is the key arguments' values, the tensors' dtypes and the
    constexpr keywords, read by position; the first call of a key goes through ``Autotuner.run`` (which tunes,
    or reads the tuned config from its caches) and records ``best_config``; later calls launch the
    ``JITFunction`` with that config. While a graph is traced (``wrap_triton`` enabled) ``[grid]`` is
    ``torch.library.wrap_triton``'s, so inductor sees the autotuner as before.
    """

    def __init__(self, kernel: Autotuner) -> None:
        self.kernel = kernel
        position = {name: i for i, name in enumerate(kernel.arg_names)}
        self.key_args = [(name, position[name]) for name in kernel.keys]
        self.tuned: dict[tuple, dict[str, object]] = {}  # key -> the tuned config's keyword arguments

    def __getitem__(self, grid: object) -> object:
        if is_wrap_triton_enabled():
            return torch.library.wrap_triton(self.kernel)[grid]
        return functools.partial(self.launch, grid)

    def launch(self, grid: object, *args: object, **kwargs: object) -> None:
        key = (
            tuple(args[i] if i < len(args) else kwargs[name] for name, i in self.key_args),
            tuple(a.dtype for a in args if isinstance(a, torch.Tensor)),
            tuple(kwargs.items()),
        )
        config = self.tuned.get(key)
        if config is None:
            self.kernel.run(*args, grid=grid, warmup=False, **kwargs)
            if self.kernel.best_config.pre_hook is None:
                self.tuned[key] = self.kernel.best_config.all_kwargs()
            return
        self.kernel.fn.run(*args, grid=grid, warmup=False, **kwargs, **config)


@functools.cache
def _tuned_launcher(kernel: Autotuner) -> TunedLauncher:
    """One ``TunedLauncher`` per kernel, so that its tuned keys outlive a call."""
    return TunedLauncher(kernel)


if INTERPRET:

    def loop_bound(n):
        """A run-time loop bound as a Python int (interpreter only).

        Triton <= 3.6's interpreter turns a ``range`` bound into an int with ``int(handle.data)``, and
        every scalar there is a shape-(1,) array, which numpy >= 2.4 refuses to convert ("only
        0-dimensional arrays can be converted to Python scalars"). Plain Python is allowed inside an
        interpreted kernel, so the bound is read here instead; Triton 3.8's interpreter needs nothing.
        """
        return int(n.handle.data.reshape(-1)[0]) if isinstance(n, tl.tensor) else n

else:

    @triton.jit
    def loop_bound(n):
        """The identity when compiled: inlined, so the compiled code is the same as ``range(n)``."""
        return n


if INTERPRET:

    @triton.jit
    def mul_rn(x, y):
        """``x * y`` (numpy, under the interpreter, never fuses a product into an add)."""
        return x * y

else:

    @triton.jit
    def mul_rn(x, y):
        """``x * y`` rounded to nearest, never contracted with a following add into an FMA (PTX ``mul.rn``).

        Where a kernel must round like torch's separate kernels (NMS's IoU, paste's box expansion), every
        inexact product feeding an add goes through this, so the compiled code does not depend on the launch's
        ``enable_fp_fusion=False``, which inductor does not pass on when it launches a user kernel itself.
        """
        return libdevice.mul_rn(x, y)


@triton.jit
def offset64(index, stride):
    """``index * stride`` in 64 bits: the offset of an element from its tensor's base pointer.

    Program ids, ``tl.arange``, loop indices, int32 loads and the int arguments below 2**31 (strides, sizes)
    are int32, and an int32 product wraps silently once it passes 2**31: the mask row of box 370k in
    ``nms_fixed`` (a 17 GB mask fits an H200), or column 3 of a ``[4, N]`` tensor's transpose. So wherever an
    int32 index or a constant meets a stride, the kernels multiply through this function
    (``tests/kernels/test_address_arithmetic.py`` holds it to the exact product); indices built from
    ``tl.program_id(0).to(tl.int64)`` are int64 already.
    """
    return tl.cast(index, tl.int64) * stride


@triton.jit
def ieee_div(x, y):
    """``x / y`` rounded to nearest. Triton's ``/`` is ``div.full.f32`` (2 ulp) for float32."""
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.math.div_rn(x, y)


if INTERPRET:

    @triton.jit
    def cast_rn(x, DTYPE: tl.constexpr):
        """``x`` converted to ``DTYPE`` with round-to-nearest-even, as ``Tensor.to`` and as the compiled
        ``cast_rn`` (a plain ``.to()``): every float store or cast to a half dtype in the kernels goes through it.

        Triton's interpreter converts float32 <-> bfloat16 by truncation (GPUs round), flushes bfloat16
        subnormals to zero both ways, and its "rtne" mode rounds ties up; so bfloat16 is rounded and converted
        on the bits, as c10::BFloat16 does (a NaN becomes c10's NaN: on the bits some NaN payloads would round
        to inf or wrap around to 0). It converts between bfloat16 and anything but float32 on the raw bits, so a
        bfloat16 input is widened to float32 first; float64 goes through float32 to either half dtype, as c10
        converts (numpy would round float64 -> float16 once). float32 -> float16 is numpy's, correctly rounded.
        """
        if x.dtype == tl.bfloat16:
            x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        if tl.bfloat16 == DTYPE or tl.float16 == DTYPE:
            x = x.to(tl.float32)
        if tl.bfloat16 == DTYPE:
            bits = x.to(tl.uint32, bitcast=True)
            bits = tl.where(x == x, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16, 0x7FC0)
            y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            y = x.to(DTYPE)
        return y

else:

    @triton.jit
    def cast_rn(x, DTYPE: tl.constexpr):
        """``x.to(DTYPE)``: compiled, a float32 -> half conversion is ``cvt.rn.f16.f32`` / ``cvt.rn.bf16.f32``
        (round to nearest even). float64 goes through float32 to either half dtype, as c10 converts (a direct
        ``cvt.rn.f16.f64`` rounds once, and differs from ``Tensor.to`` where the float32 value is a tie)."""
        if x.dtype == tl.float64 and (tl.bfloat16 == DTYPE or tl.float16 == DTYPE):
            x = x.to(tl.float32)
        return x.to(DTYPE)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """``x`` (float32/float64) rounded to ``DTYPE``'s precision, kept in ``x``'s dtype (torch's intermediate
    roundings)."""
    return cast_rn(cast_rn(x, DTYPE), x.dtype)
