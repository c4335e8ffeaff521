"""Our commands on a machine without a GPU run with ``CPU_ENV`` (OpenMP's short spin, MKL's reproducible
GEMMs), which OpenMP and MKL read when torch loads: ``python -m mrcnn.<command>`` restarts itself before it
imports torch (``mrcnn._cpu_env``), so torch and torchvision are imported once, not twice."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mrcnn import _cpu_env
from mrcnn._cpu_env import CPU_ENV, command_module, restart_before_torch
from mrcnn.cli import reexec_for_cpu

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("argv", "module"),
    [
        (["python", "-m", "mrcnn.train", "--iters", "1"], "mrcnn.train"),
        (["python", "-u", "-X", "importtime", "-W", "error", "-m", "mrcnn.evaluate"], "mrcnn.evaluate"),
        (["python", "-mmrcnn.predict", "a.png"], "mrcnn.predict"),
        (["python", "script.py", "-m", "mrcnn.train"], None),
        (["python", "-c", "import mrcnn", "-m", "mrcnn.train"], None),
        (["python"], None),
        (["python", "-m"], None),
    ],
)
def test_command_module(argv: list[str], module: str | None) -> None:
    assert command_module(argv) == module


@pytest.fixture
def restart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[list[str]]:
    """``restart_before_torch`` as in a fresh ``python -X importtime -m mrcnn.train --iters 1`` with none of
    ``CPU_ENV`` set, no GPU driver and torch not imported yet; ``os.execv`` recorded instead of run."""
    calls: list[list[str]] = []
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-X", "importtime", "-m", "mrcnn.train", "--iters", "1"])
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(_cpu_env, "_GPU_DEVICE_FILES", (str(tmp_path / "nvidiactl"),))
    monkeypatch.setattr(os, "execv", lambda path, args: calls.append([path, *args]))
    for name in (*CPU_ENV, "OMP_WAIT_POLICY", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_a_command_restarts_with_the_cpu_environment(restart: list[list[str]]) -> None:
    restart_before_torch()
    assert restart == [[sys.executable, sys.executable, "-X", "importtime", "-m", "mrcnn.train", "--iters", "1"]]
    assert {k: os.environ[k] for k in CPU_ENV} == CPU_ENV


def test_no_restart_where_the_environment_is_set_or_another_program_runs(
    restart: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in CPU_ENV.items():
        monkeypatch.setenv(name, value)
    restart_before_torch()
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the user chose how OpenMP waits: no spin count
    restart_before_torch()
    monkeypatch.delenv("MKL_CBWR")
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-m", "bench", "--quick"])
    restart_before_torch()
    assert restart == [] and "GOMP_SPINCOUNT" not in os.environ


def test_a_visible_gpu_driver_means_no_restart_unless_hidden(
    restart: list[list[str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "nvidiactl").touch()
    restart_before_torch()
    assert restart == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    restart_before_torch()
    assert len(restart) == 1


def test_torch_is_imported_once() -> None:
    """The whole command, as a user runs it without ``CPU_ENV``: torch is imported once (twice when the restart
    came after the imports, ~3.7 s of imports on this CPU), and on a GPU machine there is no restart at all."""
    env = {k: v for k, v in os.environ.items() if k not in CPU_ENV}
    env["PYTHONPROFILEIMPORTTIME"] = "1"  # an environment variable, so the restarted process prints too
    done = subprocess.run([sys.executable, "-m", "mrcnn.predict", "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(re.findall(r"^import time: .*\|\s+torch$", done.stderr, re.M)) == 1
    assert len(re.findall(r"^import time: .*\|\s+mrcnn\._cpu_env$", done.stderr, re.M)) in (1, 2)


def test_the_net_after_the_imports_restarts_a_console_script_as_it_was_run(
    restart: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mrcnn.cli.reexec_for_cpu`` (torch imported, no GPU): a console script restarts as the same script."""
    monkeypatch.setattr(sys, "orig_argv", ["/usr/bin/python3", "/usr/local/bin/mrcnn-train", "--iters", "1"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reexec_for_cpu()
    assert restart == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reexec_for_cpu()
    assert restart == [[sys.executable, sys.executable, "/usr/local/bin/mrcnn-train", "--iters", "1"]]
