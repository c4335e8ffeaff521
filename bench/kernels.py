"""Ahead-of-time resource report of every Triton kernel in ``kernels``: registers, spills, shared
memory and occupancy for each autotune config on sm_90 and sm_80, compiled without a GPU.

    python -m bench.kernels                     # writes bench/results/kernels-sm90.md and prints it
    python -m bench.kernels --select first --sm80 first --only roi_align --json out.json

How the argument types of a kernel are known without a GPU, with no per-kernel signature list:

1. Discover. Import every module of ``kernels`` normally (not interpreted) and keep what launches:
   each ``triton.autotune`` / ``triton.heuristics`` object (an autotuner's ``.configs`` holds every
   GPU config) and each ``triton.jit`` function that no other one calls (those are device helpers).
2. Record. Run the op tests ``tests/kernels/test_*.py`` and the benchmark suites ``bench/test_*.py``
   in one pytest subprocess with ``TRITON_INTERPRET=1`` and this module as a plugin. It replaces
   ``InterpretedFunction.run``, the one call every interpreted launch goes through (autotuned or
   not), by a recorder that keeps each distinct launch of a kernel -- tensors by dtype, integers by
   width, constexprs by value -- and does not execute it. Outputs stay as allocated, so most tests
   then fail, which does not matter here: the run takes seconds instead of the minutes the
   interpreter would take. Cases that cannot launch our kernels (the ``torchvision`` provider, the
   ``torch`` backend) are deselected.
3. Select. The tests launch a kernel with many small variations; per kernel and dtype, a greedy
   cover keeps the few launches that include every recorded flag value and the largest block sizes
   (``select``; ``--select first`` keeps the heaviest one only).
4. Compile. For every selected launch x autotune config x target, rebuild Triton's own launch-time
   specialization with the kernel's binder (``create_function_from_signature``, the code
   ``JITFunction.run`` uses), with the config's kwargs as constexprs and its ``num_warps`` /
   ``num_stages`` as options, and call ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
   arch, 32))``. Pointers are taken 16-byte aligned and integers unspecialized (the tiny sizes of a
   test, such as a C == 1 that Triton would fold into a constant, say nothing of real launches).
   Compiles run in parallel and land in Triton's cache, so a second run is fast.
5. Read. Registers and local memory from ``cuobjdump -res-usage`` (Triton's bundled copy) on the
   cubin, shared memory from the compiled metadata. "Spills" are the local memory bytes per thread,
   which is what Triton's ``n_spills`` reports on a GPU (``CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES``).
   Occupancy follows CUDA's occupancy calculator (``cuda_occupancy.h``). Global memory instructions from
   the PTX (``global_memory_ops``): the width in bits of every load, store and atomic (``ld.global.v4.b32``:
   128) and the atomics' memory ordering (``relaxed``, ``acq_rel``), counted per static instruction.

Without a test run, ``record_calls`` records the launches a callable makes (meta tensors will do) and
``compile_launches`` compiles them: ``tests/kernels/test_roi_align_ptx.py`` checks RoIAlign's PTX that way.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import inspect
import json
import math
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RECORD_ENV = "BENCH_KERNELS_RECORD"  # set: this module, loaded as a pytest plugin, records launches there
SOURCE_ENV = "BENCH_KERNELS_SOURCE"  # the label recorded launches get: "coco" (the suites) or "tests"
OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


# ----------------------------------------------------------------------------------------------------
# Targets and occupancy
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Arch:
    """Per-SM limits of one GPU generation (CUDA programming guide, compute capabilities table)."""

    name: str
    capability: int
    gpu: str
    smem_per_sm: int  # bytes, largest carveout
    smem_per_block: int  # bytes, opt-in maximum of one block
    regs_per_sm: int = 65536
    regs_per_block: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    sub_partitions: int = 4  # each SM sub-partition holds a quarter of the register file
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    warp_size: int = 32
    smem_alloc_unit: int = 128
    smem_reserved_per_block: int = 1024  # the runtime reserves 1 KB per block from sm_80 on


SM90 = Arch("sm_90", 90, "H100", smem_per_sm=228 * 1024, smem_per_block=227 * 1024)
SM80 = Arch("sm_80", 80, "A100", smem_per_sm=164 * 1024, smem_per_block=163 * 1024)
ARCHS = {"90": SM90, "80": SM80}


def occupancy(arch: Arch, regs: int, smem: int, num_warps: int) -> tuple[int, float]:
    """(resident blocks per SM, resident warps / max warps) of a kernel on ``arch``, as CUDA's occupancy
    calculator computes it; (0, 0.0) if one block does not fit at all."""
    threads = num_warps * arch.warp_size
    if threads > 1024 or regs > arch.max_regs_per_thread or smem > arch.smem_per_block:
        return 0, 0.0
    by_threads = arch.threads_per_sm // threads
    regs_per_warp = math.ceil(max(regs, 1) * arch.warp_size / arch.reg_alloc_unit) * arch.reg_alloc_unit
    if regs_per_warp * num_warps > arch.regs_per_block:
        return 0, 0.0
    warps_per_partition = (arch.regs_per_sm // arch.sub_partitions) // regs_per_warp
    by_regs = warps_per_partition * arch.sub_partitions // num_warps
    smem_per_block = math.ceil((smem + arch.smem_reserved_per_block) / arch.smem_alloc_unit) * arch.smem_alloc_unit
    by_smem = arch.smem_per_sm // smem_per_block
    blocks = min(arch.blocks_per_sm, by_threads, by_regs, by_smem)
    return blocks, blocks * num_warps * arch.warp_size / arch.threads_per_sm


# ----------------------------------------------------------------------------------------------------
# 1. Discover
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Kernel:
    """A launchable kernel: its ``JITFunction`` and the configs it is compiled with (the autotuner's,
    or ``None`` for a plain ``triton.jit`` kernel, which compiles with the options of its launches)."""

    id: str  # "kernels._roi_align_kernels:_roi_align_fwd_kernel"
    jit: Any
    configs: list[Any] | None


def _jit_id(jit_fn: Any) -> str:
    return f"{jit_fn.fn.__module__}:{jit_fn.fn.__name__}"


def discover(package: str = "kernels") -> tuple[dict[str, Kernel], list[str]]:
    """Every launchable Triton kernel of ``package`` by id, and the modules that fail to import. Must run
    without ``TRITON_INTERPRET`` (interpreted autotuners keep one config and have no ``JITFunction``)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction, KernelInterface

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("discover() needs a process without TRITON_INTERPRET=1")
    problems: list[str] = []
    modules = []
    found = pkgutil.walk_packages(
        importlib.import_module(package).__path__, f"{package}.", onerror=lambda n: problems.append(f"{n}: no import")
    )
    for name in [package, *(m.name for m in found)]:
        try:
            modules.append(importlib.import_module(name))
        except Exception as e:  # noqa: BLE001 - reported; the other modules are still compiled
            problems.append(f"{name}: does not import: {type(e).__name__}: {e}")
    wrapped: dict[str, Kernel] = {}  # under triton.autotune / triton.heuristics: launched for sure
    plain: dict[str, Any] = {}  # bare triton.jit: a kernel or a device helper
    for module in modules:
        for obj in vars(module).values():
            if isinstance(obj, JITFunction):
                plain[_jit_id(obj)] = obj
            elif isinstance(obj, KernelInterface):
                layers = [obj]
                while not isinstance(layers[-1], JITFunction) and hasattr(layers[-1], "fn"):
                    layers.append(layers[-1].fn)
                tuner = next((layer for layer in layers if isinstance(layer, Autotuner)), None)
                jit_fn = layers[-1]
                wrapped[_jit_id(jit_fn)] = Kernel(
                    _jit_id(jit_fn), jit_fn, None if tuner is None else list(tuner.configs)
                )
    # A jit function named in another one's code is a device helper, not a kernel.
    every = [k.jit for k in wrapped.values()] + list(plain.values())
    called = {
        id(fn.__globals__[name])
        for fn in every
        for name in fn.fn.__code__.co_names
        if isinstance(fn.__globals__.get(name), JITFunction)
    }
    kernels = dict(wrapped)
    for kid, jit_fn in plain.items():
        if kid not in kernels and id(jit_fn) not in called:
            kernels[kid] = Kernel(kid, jit_fn, None)
    return dict(sorted(kernels.items())), problems


# ----------------------------------------------------------------------------------------------------
# 2. Record (runs inside the interpreted pytest subprocesses)
# ----------------------------------------------------------------------------------------------------


def _int_width(value: int) -> str:
    return "i32" if -(2**31) <= value < 2**31 else ("u64" if value >= 2**63 else "i64")


# Integers rebuilt for compiling: values Triton does not specialize on (not 1, not divisible by 16), and for an
# integer recorded divisible by 16 (Triton's one specialization besides 1; it sets vector widths), such values.
_NEUTRAL_INT = {"i32": 17, "i64": 2**40 + 1, "u64": 2**63 + 1}
_NEUTRAL_DIV16 = {"i32": 272, "i64": 2**44 + 16, "u64": 2**63 + 16}


def _encode(value: Any, constexpr: bool) -> dict[str, Any]:
    """The JSON form of one launch argument, reduced to what a production launch would specialize on:
    a tensor by its dtype (compiled as 16-byte aligned, as a fresh allocation is), a non-constexpr
    integer by its width and whether 16 divides it (compiled otherwise unspecialized: the sizes and
    strides of the small test inputs, such as a C == 1 that Triton would turn into a constant, say
    nothing of real launches; a channels-last stride of C = 256 is divisible by 16 in every real one),
    a constexpr by its value."""
    import triton.language as tl

    if isinstance(value, tl.constexpr):
        value = value.value
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        return {"tensor": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, tl.dtype):
        return {"tl": str(value)}
    if not constexpr and isinstance(value, int) and not isinstance(value, bool):
        return {"int": _int_width(value), **({"div16": True} if value % 16 == 0 else {})}
    if not constexpr and isinstance(value, float):
        return {"value": 0.5}
    if value is None or isinstance(value, bool | int | float | str):
        return {"value": value}
    return {"unsupported": type(value).__name__}


class _Recorder:
    """Keeps the distinct specimens of every launch and skips the launches themselves."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.specimens: dict[str, dict[str, Any]] = {}  # kernel id -> specimen key -> specimen
        self.dirty = False

    def install(self) -> None:
        import torch
        from triton.runtime import interpreter

        recorder = self

        def run(fn: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
            # Not executed: interpreting costs ~3 ms per program and recording needs the arguments only.
            if not warmup:
                recorder.record(fn, args, kwargs)
            # Outputs left as allocated hold whatever memory held: a garbage index then fails a later op, at a
            # point that depended on the suites' order (RoIAlign's recorded COCO launches were 6 or 4 from run to
            # run). Zeros make every run the same; ``.data`` so that autograd's version counters do not notice.
            for value in (*args, *kwargs.values()):
                if isinstance(value, torch.Tensor):
                    value.data.zero_()

        interpreter.InterpretedFunction.run = run

    def record(self, fn: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        params = inspect.signature(fn.fn).parameters
        bound = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
        bound.update(zip(params, args, strict=False))  # the rest come by keyword
        bound.update({k: v for k, v in kwargs.items() if k in params})
        encoded = {n: _encode(bound[n], "constexpr" in str(p.annotation)) for n, p in params.items() if n in bound}
        specimen = {"args": encoded, "options": {k: kwargs[k] for k in OPTION_KEYS if kwargs.get(k) is not None},
                    "source": os.environ.get(SOURCE_ENV, "tests")}  # fmt: skip
        per_kernel = self.specimens.setdefault(f"{fn.fn.__module__}:{fn.fn.__name__}", {})
        key = json.dumps(specimen, sort_keys=True)
        if key not in per_kernel:
            per_kernel[key] = specimen
            self.dirty = True

    def write(self) -> None:
        if self.dirty:
            launches = {kid: list(specimens.values()) for kid, specimens in self.specimens.items()}
            self.path.write_text(json.dumps(launches, indent=1))
            self.dirty = False


_recorder: _Recorder | None = None


def pytest_configure(config: Any) -> None:
    global _recorder
    if not os.environ.get(RECORD_ENV):
        return
    _recorder = _Recorder(os.environ[RECORD_ENV])
    _recorder.install()
    try:  # a property test fails at once here; shrinking that failure would only replay known launches
        from hypothesis import Phase, settings

        settings.register_profile("bench-kernels-record", phases=(Phase.explicit, Phase.generate), database=None)
        settings.load_profile("bench-kernels-record")
    except ImportError:
        pass


COMPILED_OR_THEIRS = ("torchvision", "torchvision_compile", "ours_compile", "ours_cudagraphs", "ours_package")


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Drop the cases that cannot launch a Triton kernel of ours: benchmarks of the ``torchvision``
    provider and tests pinned to the ``torch`` backend (the names DESIGN.md gives them); compiled providers
    (``ours_compile``, ``ours_cudagraphs``, ``ours_package``: the eager provider's launches, and inductor or
    AOTInductor compiling over kernels that do not execute aborts the process); when recording
    the suites at COCO shapes, also their tests that are no benchmark (``test_providers_agree``: the same
    launches, and torchvision's CPU kernels at COCO shapes would take minutes)."""
    if _recorder is None:
        return
    keep, drop = [], []
    coco = os.environ.get(SOURCE_ENV) == "coco"
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        unwanted = params.get("provider") in COMPILED_OR_THEIRS or params.get("backend") == "torch"
        (drop if unwanted or (coco and "benchmark" not in item.fixturenames) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    if _recorder is not None:
        _recorder.write()  # after every test, so that a run cut short by the timeout still counts


SOURCE_DIRS = ("tests/kernels", "bench")


def sources() -> list[Path]:
    """The files whose launches are recorded: the op tests ``tests/kernels/test_<op>.py`` (every dtype
    and flag) and the benchmark suites ``bench/test_<op>.py`` (at COCO shapes, see ``run``)."""
    files = [f for d in SOURCE_DIRS for f in sorted((ROOT / d).glob("test_*.py"))]
    return [f for f in files if f.name not in NOT_RECORDED]


# test_aot.py tests this module; bench/test_export.py launches what the model suite's inference launches.
NOT_RECORDED = ("test_aot.py", "test_export.py")


def is_suite(path: Path) -> bool:
    return path.parent == ROOT / "bench"


# What the report depends on besides Triton: the kernels and their launchers, the suites that launch them (and
# their shapes), and this module (how launches are recorded, compiled and reported). Suites in NOT_RECORDED are
# not hashed.
HASHED = ("kernels/**/*.py", "bench/__init__.py", "bench/conftest.py", "bench/test_*.py", "bench/kernels.py")


def code_of(source: str) -> str:
    """``source`` as the interpreter runs it: parsed and unparsed without comments, docstrings or formatting, so
    that prose edits leave it (and the report's hash) unchanged while any edit of code changes it."""
    import ast

    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def sources_hash() -> str:
    """sha256 over the code (``code_of``) of the files of ``HASHED``, with their paths, in path order: the
    report's header carries it, and a test compares the committed report's with the checkout's. It covers every
    kernel's source, autotune configs and launcher, and the suites' launches; comments and docstrings do not
    count."""
    import hashlib

    digest = hashlib.sha256()
    files = sorted(
        {f for pattern in HASHED for f in ROOT.glob(pattern) if "__pycache__" not in f.parts}
        - {ROOT / "bench" / name for name in NOT_RECORDED}
    )
    for f in files:
        digest.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + code_of(f.read_text()).encode() + b"\0")
    return digest.hexdigest()


HASH_LINE = "<!-- sources sha256: {} (regenerate: python -m bench.kernels) -->"


def committed_hash(path: Path | None = None) -> str | None:
    """The sources hash in the header of a report (default: the committed one), or None."""
    path = path or RESULTS / "kernels-sm90.md"
    text = path.read_text() if path.exists() else ""
    match = re.search(r"<!-- sources sha256: ([0-9a-f]{64})", text)
    return match.group(1) if match else None


def record_launches(
    files: Sequence[Path], timeout: float = 900, source: str = "tests", shapes: str | None = None
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Run ``files`` with pytest, interpreted, with the recorder; return (kernel id -> specimens labelled
    ``source``, problems). ``shapes`` ("coco" or "cpu") sets the suites' shapes (``bench.coco_shapes``).

    One process for all files: its imports cost more than the tests once no kernel executes. The tests'
    own outcome does not matter (outputs are zeros, so most asserts fail)."""
    problems: list[str] = []
    if not files:
        return {}, problems
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "launches.json"
        env = {**os.environ, "TRITON_INTERPRET": "1", RECORD_ENV: str(out), SOURCE_ENV: source}
        if shapes:
            env["BENCH_SHAPES"] = shapes
        cmd = [sys.executable, "-m", "pytest", "-p", "bench.kernels", *map(str, files), "-q", "--tb=no", "-rE",
               "-p", "no:cacheprovider", "-o", "addopts=", "--benchmark-disable",
               "--continue-on-collection-errors"]  # fmt: skip
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            # Failed tests are expected (nothing executes); a file that does not import is a problem.
            problems += [f"recording launches: {line}" for line in proc.stdout.splitlines()
                         if line.startswith("ERROR ") and "::" not in line]  # fmt: skip
            if proc.returncode not in (0, 1):
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                problems.append(f"recording launches: pytest exit code {proc.returncode}\n{tail}")
        except subprocess.TimeoutExpired:
            problems.append(f"recording launches: timed out after {timeout:.0f} s; kept what was recorded")
        launches = json.loads(out.read_text()) if out.exists() else {}
    return dict(sorted(launches.items())), problems


def _pairs(specimen: dict[str, Any], int_max: dict[str, int]) -> set[tuple[str, str]]:
    """What a specimen covers: each argument's value, except that a constexpr integer counts only at its
    largest recorded value (block sizes and counts: the largest uses the most registers and memory) and
    any float stands for every float (a constant folded into the code)."""
    out = {("options", json.dumps(specimen["options"], sort_keys=True))}
    for name, enc in specimen["args"].items():
        v = enc.get("value")
        if isinstance(v, int) and not isinstance(v, bool) and name in int_max:
            if v == int_max[name]:
                out.add((name, "max"))
        elif isinstance(v, float):
            out.add((name, "float"))
        else:
            out.add((name, json.dumps(enc, sort_keys=True)))
    return out


def select(specimens: Sequence[dict[str, Any]], first_only: bool = False) -> list[dict[str, Any]]:
    """Few specimens that still cover the recorded variety, per dtype: greedily, the specimen covering the
    most uncovered (argument, value) pairs (see ``_pairs``), ties to the largest constexpr integers. With
    ``first_only``, the first pick per dtype: the heaviest single specimen."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in specimens:
        groups.setdefault(dtype_label(s), []).append(s)
    picks = []
    for group in groups.values():
        int_max: dict[str, int] = {}
        for s in group:
            for name, enc in s["args"].items():
                v = enc.get("value")
                if isinstance(v, int) and not isinstance(v, bool):
                    int_max[name] = max(v, int_max.get(name, v))
        covers = [_pairs(s, int_max) for s in group]
        weight = [sum(e["value"] for n, e in s["args"].items() if n in int_max and isinstance(e["value"], int))
                  for s in group]  # fmt: skip
        needed = set().union(*covers)
        while needed:
            best = max(range(len(group)), key=lambda i: (len(covers[i] & needed), weight[i]))
            picks.append(group[best])
            needed -= covers[best]
            if first_only:
                break
    return picks


# ----------------------------------------------------------------------------------------------------
# 3. Compile, 4. read resources
# ----------------------------------------------------------------------------------------------------


class _StandIn:
    """What Triton's binder needs of a tensor: a dtype and an address (16-byte aligned, like a fresh
    allocation; the address only decides the alignment attribute)."""

    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 0


def _decode(enc: dict[str, Any]) -> Any:
    import torch
    import triton.language as tl

    if "tensor" in enc:
        return _StandIn(getattr(torch, enc["tensor"]))
    if "int" in enc:
        return (_NEUTRAL_DIV16 if enc.get("div16") else _NEUTRAL_INT)[enc["int"]]
    if "tl" in enc:
        return tl.dtype(enc["tl"])
    if "value" in enc:
        return enc["value"]
    raise TypeError(f"cannot rebuild a launch argument of type {enc['unsupported']}")


@dataclasses.dataclass
class Job:
    """One compile: a kernel, one recorded specimen with one config, one target."""

    kernel: str
    config: str
    dtype: str
    arch: str
    signature: dict[str, str]
    constexprs: dict[tuple[int, ...], Any]
    attrs: dict[tuple[int, ...], Any]
    options: dict[str, Any]
    launch: str  # the recorded launch's own constexprs, e.g. "OUT_H=14 OUT_W=14 LEVELS=4"
    source: str  # "coco" (a benchmark suite at COCO shapes) or "tests"


def config_options(config: Any) -> dict[str, Any]:
    """The compile options of an autotune config (``num_warps``, ``num_stages``, ...)."""
    return {k: getattr(config, k) for k in OPTION_KEYS if getattr(config, k, None) is not None}


def config_label(config: Any | None, options: dict[str, Any]) -> str:
    """``BLOCK=128 w4 s3``: a config's constexprs, then num_warps and num_stages (of ``options`` when
    ``config`` is ``None``: a plain ``triton.jit`` kernel takes them from its launch)."""
    if config is not None:
        options = config_options(config)
    parts = [f"{k}={v}" for k, v in (config.kwargs.items() if config is not None else ())]
    parts += [f"w{options['num_warps']}"] if "num_warps" in options else []
    parts += [f"s{options['num_stages']}"] if "num_stages" in options else []
    return " ".join(parts) or "default"


_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


def dtype_label(specimen: dict[str, Any]) -> str:
    """The floating dtypes of a launch's tensors, e.g. ``fp16`` or ``fp16/fp32`` (``-`` if none)."""
    dtypes = {e["tensor"] for e in specimen["args"].values() if "tensor" in e}
    return "/".join(_SHORT[d] for d in _SHORT if d in dtypes) or "-"


def launch_label(specimen: dict[str, Any], config: Any | None) -> str:
    """The constexprs a launch chose itself (not the autotune config's), as ``NAME=value`` words."""
    tuned = set(config.kwargs) if config is not None else set()
    words = [f"{n}={e['value']}" for n, e in specimen["args"].items()
             if "value" in e and n not in tuned and not isinstance(e["value"], float)]  # fmt: skip
    return " ".join(words) or "-"


def make_jobs(
    kernel: Kernel, specimens: Iterable[dict[str, Any]], archs: Sequence[str], first_config_archs: set[str]
) -> list[Job]:
    """The compiles of ``kernel``: each specimen x config x arch (one config only for ``first_config_archs``),
    specialized exactly as ``JITFunction.run`` would specialize that launch."""
    from triton._utils import find_paths_if, get_iterable_path
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jobs = []
    for arch in archs:
        backend = make_backend(GPUTarget("cuda", ARCHS[arch].capability, 32))
        binder = create_function_from_signature(kernel.jit.signature, kernel.jit.params, backend)
        configs = kernel.configs or [None]
        for config in configs[:1] if arch in first_config_archs else configs:
            for specimen in specimens:
                args = {name: _decode(enc) for name, enc in specimen["args"].items()}
                options = dict(specimen["options"])
                if config is not None:
                    args.update(config.kwargs)
                    options = config_options(config)
                bound, specialization, _ = binder(**args, **options)
                names = [p.name for p in kernel.jit.params]
                types = [s[0] for s in specialization]
                values = list(bound.values())
                constexpr_paths = find_paths_if(types, lambda _, t: t == "constexpr")
                attr_vals = ["" if s[0] == "constexpr" else s[1] for s in specialization]
                attr_paths = find_paths_if(attr_vals, lambda _, a: isinstance(a, str))
                signature = dict(zip(names, types, strict=True))
                jobs.append(Job(
                    kernel=kernel.id,
                    config=config_label(config, options),
                    dtype=dtype_label(specimen),
                    arch=arch,
                    signature=signature,
                    constexprs={p: get_iterable_path(values, p) for p in constexpr_paths},
                    attrs={p: backend.parse_attr(get_iterable_path(attr_vals, p)) for p in attr_paths},
                    options=options,
                    launch=launch_label(specimen, config),
                    source=specimen.get("source", "tests"),
                ))  # fmt: skip
    unique = {}
    for job in jobs:  # specimens that differ only in unspecialized values compile to the same kernel
        unique.setdefault(repr((job.arch, job.config, job.signature, job.constexprs, job.attrs, job.launch)), job)
    return list(unique.values())


def cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_GLOBAL_OP = re.compile(r"\b(ld|st|atom|red)\.global((?:\.[\w:]+)+)")
_PTX_TYPE = re.compile(r"(?:b|f|s|u|bf)(\d+)(x2)?")
_ORDERINGS = ("relaxed", "acquire", "release", "acq_rel", "sc")


def global_memory_ops(ptx: str) -> dict[str, dict[str, int]]:
    """Static counts of the global memory instructions in ``ptx``: ``{"ld": {bits: n}, "st": {...}, "atom":
    {...}, "order": {ordering: n}}``. Bits are the instruction's width (vector lanes x element bits:
    ``ld.global.v4.b32`` is 128, ``atom.global.gpu.relaxed.add.v4.f32`` 128); ``atom`` counts ``atom`` and
    ``red``, and ``order`` their memory ordering (PTX's default, when none is written, is ``relaxed``)."""
    out: dict[str, dict[str, int]] = {"ld": {}, "st": {}, "atom": {}, "order": {}}
    for op, suffix in _GLOBAL_OP.findall(ptx):
        parts = suffix.split(".")[1:]
        lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        types = [m for p in parts if (m := _PTX_TYPE.fullmatch(p))]
        bits = int(types[-1].group(1)) * (2 if types[-1].group(2) else 1) if types else 0
        kind = "atom" if op in ("atom", "red") else op
        out[kind][str(lanes * bits)] = out[kind].get(str(lanes * bits), 0) + 1
        if kind == "atom":
            order = next((p for p in parts if p in _ORDERINGS), "relaxed")
            out["order"][order] = out["order"].get(order, 0) + 1
    return out


def memory_label(counts: dict[str, int]) -> str:
    """``{"128": 8, "32": 1}`` as ``128x8 32x1`` (widest first), ``-`` if empty."""
    return " ".join(f"{w}x{n}" for w, n in sorted(counts.items(), key=lambda kv: -int(kv[0]))) or "-"


def _compile(job: Job) -> dict[str, Any]:
    """Compile ``job`` and read its resources; the error text instead if it does not compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row: dict[str, Any] = {"kernel": job.kernel, "config": job.config, "dtype": job.dtype, "arch": job.arch,
                           "num_warps": job.options.get("num_warps", 4), "signature": job.signature,
                           "launch": job.launch, "source": job.source,
                           "constexprs": {str(k): repr(v) for k, v in job.constexprs.items()}}  # fmt: skip
    try:
        src = ASTSource(
            fn=_KERNELS[job.kernel].jit, signature=job.signature, constexprs=job.constexprs, attrs=job.attrs
        )
        compiled = triton.compile(src, target=GPUTarget("cuda", ARCHS[job.arch].capability, 32), options=job.options)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True)
        regs, stack, _, local = map(int, _RES_USAGE.search(usage.stdout).groups())
        row["memory"] = global_memory_ops(compiled.asm["ptx"])
    except Exception as e:  # noqa: BLE001 - a compile error is a result to report, not a crash
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
        return row
    blocks, occ = occupancy(ARCHS[job.arch], regs, compiled.metadata.shared, row["num_warps"])
    row.update(regs=regs, spills=local, stack=stack, smem=compiled.metadata.shared, blocks=blocks, occupancy=occ)
    return row


_KERNELS: dict[str, Kernel] = {}  # set before the worker pool forks, read by the workers


def record_calls(call: Any, source: str = "coco") -> dict[str, list[dict[str, Any]]]:
    """The launches of autotuned kernels that ``call()`` makes, recorded as the interpreted recording does
    (labelled ``source``) and not executed: no GPU needed, and ``call`` may pass meta tensors of real shapes.
    Needs a process without ``TRITON_INTERPRET``, as ``discover``."""
    import torch
    from triton.runtime.autotuner import Autotuner

    recorder = _Recorder(os.devnull)
    saved = Autotuner.run, torch.library.wrap_triton
    Autotuner.run = lambda tuner, *args, **kwargs: recorder.record(tuner.fn, args, kwargs)
    # wrap_triton's wrapper dispatches meta tensors to a fake kernel that launches nothing.
    torch.library.wrap_triton = lambda kernel: kernel
    try:
        call()
    finally:
        Autotuner.run, torch.library.wrap_triton = saved
    launches = {kid: list(specimens.values()) for kid, specimens in recorder.specimens.items()}
    for specimens in launches.values():
        for specimen in specimens:
            specimen["source"] = source
    return launches


def compile_launches(
    launches: dict[str, list[dict[str, Any]]], archs: Sequence[str] = ("90",), workers: int | None = None
) -> list[dict[str, Any]]:
    """Compile every recorded launch of ``launches`` (kernel id -> specimens, as ``record_calls`` returns) with
    every autotune config of its kernel for ``archs``: the rows of ``run``, PTX memory instructions included."""
    found, _ = discover()
    jobs = [job for kid, specimens in launches.items() for job in make_jobs(found[kid], specimens, archs, set())]
    return compile_all(found, jobs, workers)


def compile_all(kernels: dict[str, Kernel], jobs: list[Job], workers: int | None = None) -> list[dict[str, Any]]:
    """Compile ``jobs`` in parallel (forked workers inherit ``kernels``); rows in job order."""
    _KERNELS.clear()
    _KERNELS.update(kernels)
    workers = min(workers or os.cpu_count() or 1, max(len(jobs), 1))
    if workers == 1:
        return [_compile(job) for job in jobs]
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return list(pool.map(_compile, jobs))


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def _matches(name: str, only: Sequence[str] | None) -> bool:
    return not only or any(o in name for o in only)


def run(
    archs: Sequence[str] = ("90", "80"),
    sm80: str = "all",
    selection: str = "cover",
    only: Sequence[str] | None = None,
    workers: int | None = None,
    shapes: str = "coco",
) -> dict[str, Any]:
    """Discover, record, select, compile. Returns ``{"triton", "selection", "sm80", "shapes", "kernels",
    "expected_configs", "rows", "problems", "seconds"}``: the options, the kernel ids, the config labels
    each target had to compile per autotuned kernel, one row per compile, a problem per kernel that could
    not be compiled from a recorded launch, and the time spent recording and compiling.

    The launches: every distinct one of the benchmark suites at ``shapes`` (``"coco"``: their COCO shapes,
    as on a GPU; ``selection == "first"``: the heaviest per dtype only), recorded in parallel with those of
    the op tests, which stand in (through ``selection``) only for kernels no suite launches."""
    import triton

    start = time.perf_counter()
    found, problems = discover()
    kernels = {k: v for k, v in found.items() if _matches(k.split(":")[0], only)}
    files = [f for f in sources() if _matches(f.stem, only)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two pytest processes
        suites_run = pool.submit(record_launches, [f for f in files if is_suite(f)], source="coco", shapes=shapes)
        tests_run = pool.submit(record_launches, [f for f in files if not is_suite(f)], source="tests")
        (suite_launches, suite_problems), (test_launches, test_problems) = suites_run.result(), tests_run.result()
    problems += suite_problems + test_problems
    recorded = time.perf_counter()
    first_config = {"80"} if sm80 == "first" else set()
    jobs: list[Job] = []
    for kid, kernel in kernels.items():
        if kid not in suite_launches and kid not in test_launches:
            problems.append(f"{kid}: never launched by {', '.join(d + '/test_*.py' for d in SOURCE_DIRS)}")
            continue
        try:
            if kid in suite_launches:
                picked = select(suite_launches[kid], first_only=True) if selection == "first" else suite_launches[kid]
            else:
                picked = select(test_launches[kid], first_only=selection == "first")
            jobs += make_jobs(kernel, picked, archs, first_config)
        except Exception as e:  # noqa: BLE001 - reported with the kernel's name
            problems.append(f"{kid}: cannot specialize its recorded launches: {type(e).__name__}: {e}")
    rows = compile_all(kernels, jobs, workers)
    seconds = {"record": recorded - start, "compile": time.perf_counter() - recorded}
    # The configs each target had to compile, per autotuned kernel (plain kernels have no list).
    expected = {
        kid: {a: [config_label(c, {}) for c in (k.configs[:1] if a in first_config else k.configs)] for a in archs}
        for kid, k in kernels.items()
        if k.configs is not None
    }
    return {"triton": triton.__version__, "selection": selection, "sm80": sm80, "shapes": shapes,
            "sources_hash": sources_hash(),
            "kernels": sorted(kernels),
            "expected_configs": expected, "rows": rows, "problems": problems, "seconds": seconds}  # fmt: skip


def _short(kernel_id: str) -> str:
    module, name = kernel_id.split(":")
    return f"{module.rsplit('.', 1)[-1]}:{name}"


def worst_case(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (kernel, config, dtype, arch): the worst over its specializations (most registers,
    spills and shared memory, fewest blocks), with the number of specializations and the launch (its
    own constexprs) of the worst one."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["arch"], r["kernel"], r["config"], r["dtype"]), []).append(r)
    out = []
    for (arch, kernel, config, dtype), rs in groups.items():
        worst = min(rs, key=lambda r: (r["blocks"], -r["regs"], -r["spills"]))
        memory: dict[str, dict[str, int]] = {}
        for r in rs:  # per width, the most instructions any specialization has
            for kind, counts in r.get("memory", {}).items():
                for width, n in counts.items():
                    memory.setdefault(kind, {})[width] = max(n, memory.get(kind, {}).get(width, 0))
        out.append({"arch": arch, "kernel": kernel, "config": config, "dtype": dtype, "variants": len(rs),
                    "regs": max(r["regs"] for r in rs), "spills": max(r["spills"] for r in rs),
                    "smem": max(r["smem"] for r in rs), "blocks": worst["blocks"],
                    "occupancy": worst["occupancy"], "launch": worst.get("launch", "-"),
                    "source": worst.get("source", "tests"), "memory": memory})  # fmt: skip
    return out


FLOOR_WARPS = 16  # resident warps per SM: 25 % of sm_90's 64


def below_floor(rows: Iterable[dict[str, Any]], arch: str = "90") -> list[dict[str, Any]]:
    """The launches of the suites at COCO shapes for which no autotune config of the kernel compiles, on
    ``arch``, with no spills and at least ``FLOOR_WARPS`` resident warps per SM: one entry per (kernel,
    dtype, launch), with the best config there is (fewest spills, then most resident warps). Empty when
    every kernel's autotune space offers such a config at every COCO launch."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r["arch"] == arch and r.get("source") == "coco" and "error" not in r:
            groups.setdefault((r["kernel"], r["dtype"], r["launch"]), []).append(r)
    out = []
    for (kernel, dtype, launch), rs in sorted(groups.items()):
        if any(r["spills"] == 0 and r["blocks"] * r["num_warps"] >= FLOOR_WARPS for r in rs):
            continue
        best = min(rs, key=lambda r: (r["spills"], -r["blocks"] * r["num_warps"]))
        out.append({"kernel": kernel, "dtype": dtype, "launch": launch, "config": best["config"],
                    "regs": best["regs"], "spills": best["spills"], "warps": best["blocks"] * best["num_warps"],
                    "occupancy": best["occupancy"]})  # fmt: skip
    return out


def markdown(result: dict[str, Any]) -> str:
    launches = {"cover": "a cover of the recorded launches (every flag value, the largest block sizes)",
                "first": "the heaviest recorded launch"}[result["selection"]]  # fmt: skip
    configs = "every autotune config" + (" (sm_80: the first)" if result["sm80"] == "first" else "")
    suites = "every launch" if result["selection"] != "first" else "the heaviest launch per dtype"
    lines = [
        HASH_LINE.format(result.get("sources_hash") or sources_hash()),
        "# Triton kernels: registers, spills, shared memory, occupancy",
        "",
        f"Compiled ahead of time without a GPU by `python -m bench.kernels` (triton {result['triton']}), with "
        f"{configs}: {suites} of the benchmark suites `bench/test_*.py` at their {result['shapes'].upper()} "
        "shapes (`from` COCO), recorded on the CPU without executing a kernel;",
        f"for a kernel no suite launches, {launches} of the op tests `tests/kernels` (`from` tests).",
        "A row is the worst case over those launches (`var` counts them; `worst launch`: the launch's own",
        "constexprs, i.e. output size, levels, mode, block sizes). Spills: local-memory bytes per thread;",
        "smem: shared memory of one block; occupancy: resident warps / 64, from registers, shared memory,",
        "threads and 32 blocks per SM as CUDA's occupancy calculator computes it. Plain `triton.jit` kernels",
        "show the options of their launch (`default`: 4 warps). `ld`, `st`, `atom`: the global loads, stores",
        "and atomics of the PTX as `bits x instructions` (128: a 16-byte vector; the most of each width over",
        "the launches), `order`: the atomics' memory ordering.",
    ]
    summary = worst_case(result["rows"])
    for arch in dict.fromkeys(r["arch"] for r in result["rows"]):
        a = ARCHS[arch]
        lines += ["", f"## {a.name} ({a.gpu}: 65536 regs, {a.threads_per_sm} threads, "
                  f"{a.smem_per_sm // 1024} KB shared memory, {a.blocks_per_sm} blocks per SM)", "",
                  "| kernel | config | dtype | from | var | regs/thread | spills (B) | smem (B) | blocks/SM "
                  "| occupancy | ld | st | atom | order | worst launch |",
                  "|---|---|---|---|--:|--:|--:|--:|--:|--:|---|---|---|---|---|"]  # fmt: skip
        for r in sorted((r for r in summary if r["arch"] == arch), key=lambda r: (r["kernel"], r["dtype"])):
            source = "COCO" if r["source"] == "coco" else "tests"
            mem = {kind: memory_label(r["memory"].get(kind, {})) for kind in ("ld", "st", "atom")}
            order = " ".join(f"{o}x{n}" for o, n in sorted(r["memory"].get("order", {}).items())) or "-"
            lines.append(f"| {_short(r['kernel'])} | {r['config']} | {r['dtype']} | {source} | {r['variants']} "
                         f"| {r['regs']} | {r['spills']} | {r['smem']} | {r['blocks']} | {r['occupancy']:.0%} "
                         f"| {mem['ld']} | {mem['st']} | {mem['atom']} | {order} | {r['launch']} |")  # fmt: skip
    if any(r["arch"] == "90" for r in result["rows"]):
        low = below_floor(result["rows"])
        lines += ["", f"## Occupancy floor (sm_90): a config with no spills and >= {FLOOR_WARPS} resident warps "
                  "per SM at every COCO launch", ""]  # fmt: skip
        if not low:
            lines.append("Every kernel's autotune space offers one at every COCO launch.")
        else:
            lines += [f"{len(low)} launches fall below it (the best config each has):", "",
                      "| kernel | dtype | launch | best config | regs/thread | spills (B) | warps/SM | occupancy |",
                      "|---|---|---|---|--:|--:|--:|--:|"]  # fmt: skip
            lines += [f"| {_short(r['kernel'])} | {r['dtype']} | {r['launch']} | {r['config']} | {r['regs']} "
                      f"| {r['spills']} | {r['warps']} | {r['occupancy']:.0%} |" for r in low]  # fmt: skip
    errors = [r for r in result["rows"] if "error" in r]
    if errors or result["problems"]:
        lines += ["", "## Problems", ""]
        lines += [f"- {p.splitlines()[0]}" for p in result["problems"]]
        lines += [f"- {r['arch']} {_short(r['kernel'])} [{r['config']}, {r['dtype']}]: {r['error'].splitlines()[0]}"
                  for r in errors]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90,80", help="compute capabilities, comma-separated (90, 80)")
    parser.add_argument("--sm80", choices=("all", "first"), default="all", help="configs to compile for sm_80")
    parser.add_argument(
        "--select",
        choices=("cover", "first"),
        default="cover",
        help="launches to compile per kernel and dtype: a cover of the recorded variety, or the heaviest one",
    )
    parser.add_argument("--shapes", choices=("coco", "cpu"), default="coco", help="the suites' shapes to record")
    parser.add_argument("--only", default="", help="kernel modules, comma-separated substrings (e.g. roi_align,nms)")
    parser.add_argument("--out", type=Path, default=RESULTS / "kernels-sm90.md", help="markdown table to write")
    parser.add_argument("--json", type=Path, help="also write every compile as JSON here")
    parser.add_argument("--workers", type=int, help="parallel compiles (default: CPU count)")
    args = parser.parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    result = run(archs, args.sm80, args.select, [m for m in args.only.split(",") if m], args.workers, args.shapes)
    text = markdown(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    print(text)
    print(f"{len(result['rows'])} compiles; recording took {result['seconds']['record']:.0f} s, compiling "
          f"{result['seconds']['compile']:.0f} s", file=sys.stderr)  # fmt: skip
    return 1 if result["problems"] or any("error" in r for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
