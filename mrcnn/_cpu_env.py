"""The CPU environment of our commands, set before torch loads (this module imports no torch).

OpenMP and MKL read ``CPU_ENV``'s variables when they start, i.e. when torch is imported, so a command without
a GPU restarts itself once with those the user has not set. ``mrcnn/__init__.py`` calls ``restart_before_torch``
before anything imports torch: for ``python -m mrcnn.<command>`` the restart then costs an interpreter start
instead of a second import of torch and torchvision (3.7 s on a 2-core CPU, where ``python -m mrcnn.predict``
of one image then took 5.4 s instead of 9.3 s: ``bench/results/cpu-cold-start-2026-12-06.md``). Torch cannot
be asked whether there is a GPU before it is imported: a visible NVIDIA or ROCm driver (its device files)
counts as one here, and ``mrcnn.cli.reexec_for_cpu`` (after the imports, asking torch) remains the net for the
rest: a driver without a usable GPU, the console scripts (``mrcnn-train``), ``bench.train_compare``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

__all__ = ["CPU_ENV", "command_module", "missing_cpu_env", "restart_before_torch", "restart_with_cpu_env"]

# Measured on a 2-core machine, one training step of the shapes preset with 2 threads:
#   idle machine:              default 0.37 s, GOMP_SPINCOUNT=10000 0.38 s, OMP_WAIT_POLICY=PASSIVE 0.52 s
#   3 busy processes beside:   default 3.3 s,  GOMP_SPINCOUNT=10000 1.4 s,  OMP_WAIT_POLICY=PASSIVE 1.2 s
# GNU OpenMP's threads spin ~300,000 times before they sleep; on a shared CPU the spinning thread holds
# the core its sibling needs. A short spin keeps the idle speed and most of the loaded one. MKL's GEMMs
# otherwise differ in the last bit between processes (memory alignment), which would break bit-exact
# --resume; strict conditional numerical reproducibility costs nothing measurable here. (Not glibc's
# MALLOC_TRIM_THRESHOLD_: setting it freezes malloc's mmap threshold at 128 KiB, and page faults then
# doubled the step time.)
CPU_ENV = {"GOMP_SPINCOUNT": "10000", "MKL_CBWR": "AUTO,STRICT"}

# Interpreter options whose value is the next argument (``python -X importtime -m ...``).
_OPTIONS_WITH_VALUE = ("-W", "-X", "--check-hash-based-pycs")
_GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/kfd")


def missing_cpu_env() -> dict[str, str]:
    """The variables of ``CPU_ENV`` the environment lacks (no ``GOMP_SPINCOUNT`` when ``OMP_WAIT_POLICY`` is
    set: the user chose how OpenMP waits)."""
    missing = {k: v for k, v in CPU_ENV.items() if k not in os.environ}
    if "OMP_WAIT_POLICY" in os.environ:
        missing.pop("GOMP_SPINCOUNT", None)
    return missing


def command_module(argv: Sequence[str]) -> str | None:
    """The module of a command line ``python [options] -m module [args]`` (``sys.orig_argv``), else None (a
    script, ``-c``, an interactive interpreter)."""
    args = list(argv[1:])
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-m":
            return args[i + 1] if i + 1 < len(args) else None
        if arg.startswith("-m"):
            return arg[2:]
        if arg == "-c" or not arg.startswith("-"):
            return None
        i += 2 if arg in _OPTIONS_WITH_VALUE else 1
    return None


def restart_with_cpu_env() -> None:
    """Run this process's command line again (``sys.orig_argv``: the interpreter's options, ``-m module`` or the
    script, the arguments) with the ``CPU_ENV`` variables it lacks; nothing when it lacks none. ``os.execv``
    keeps the pid, so torchrun still tracks the process."""
    missing = missing_cpu_env()
    if missing:
        os.environ.update(missing)
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def restart_before_torch() -> None:
    """``restart_with_cpu_env`` for ``python -m mrcnn.<command>``, when torch is not imported yet and no GPU
    driver is visible (``CUDA_VISIBLE_DEVICES`` empty or -1 hides one)."""
    if "torch" in sys.modules or not (command_module(sys.orig_argv) or "").startswith("mrcnn."):
        return
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")
    if hidden or not any(os.path.exists(f) for f in _GPU_DEVICE_FILES):
        restart_with_cpu_env()
