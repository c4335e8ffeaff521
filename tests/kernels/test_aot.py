"""Every Triton kernel of ``kernels`` compiles ahead of time for sm_90 and sm_80, and none spills registers.

The kernels, their argument types and their constexpr values come from ``bench.kernels``: it discovers the
kernels, records the launches the op tests and benchmark suites make (interpreted, in a subprocess), and
compiles them with ``triton.compile`` for a GPU target, no GPU needed. This test runs it once, in a
subprocess without ``TRITON_INTERPRET`` (this process has it set by ``tests/conftest.py``, and compiling
needs real ``JITFunction`` objects), as

    python -m bench.kernels --select first --sm80 first --shapes cpu

that is, per kernel and dtype the heaviest recorded launch (the suites at their CPU shapes: recording the
model suite at COCO shapes alone takes minutes) (largest block sizes, most flags), with every
autotune config for sm_90 and the first config for sm_80: about 150 compiles and 1-2 minutes on two cores.
Every config on both targets and a cover of all recorded launches is ``python -m bench.kernels``, which
writes ``bench/results/kernels-sm90.md``.

Registers, spills, shared memory and occupancy of what was compiled are printed in the terminal summary
and stored per test as the ``resources`` property (``--junitxml``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# Kernel modules, found without importing them (this process runs interpreted kernels).
MODULES = sorted(p.stem for p in (ROOT / "kernels").glob("*.py") if "@triton.jit" in p.read_text())


class _Summary:
    """Prints the resource table at the end of the run, whatever the capture mode."""

    def __init__(self, text: str) -> None:
        self.text = text

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.write_sep("=", "Triton kernels compiled ahead of time (tests/kernels/test_aot.py)")
        terminalreporter.write_line(self.text)


@pytest.fixture(scope="module")
def aot(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench.kernels", "--select", "first", "--sm80", "first", "--shapes", "cpu",
           "--json", str(out / "aot.json"), "--out", str(out / "aot.md")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert (out / "aot.json").exists(), f"bench.kernels wrote no results:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads((out / "aot.json").read_text())
    text = (out / "aot.md").read_text()
    request.config.pluginmanager.register(_Summary(text), "test_aot_summary")
    return result


def _in_module(kernel_id: str, module: str) -> bool:
    return kernel_id.split(":")[0] == f"kernels.{module}"


def test_discovery_and_recording(aot: dict[str, Any]) -> None:
    modules_with_kernels = {kid.split(":")[0].removeprefix("kernels.") for kid in aot["kernels"]}
    autotuned = {m for m in MODULES if "@triton.autotune" in (ROOT / "kernels" / f"{m}.py").read_text()}
    assert autotuned <= modules_with_kernels, f"no kernel discovered in {sorted(autotuned - modules_with_kernels)}"
    general = [p for p in aot["problems"] if not any(p.startswith(k) for k in aot["kernels"])]
    assert not general, "\n".join(general)


@pytest.mark.parametrize("module", MODULES)
def test_every_config_compiles_without_spills(aot: dict[str, Any], module: str, record_property: Any) -> None:
    kernels = [kid for kid in aot["kernels"] if _in_module(kid, module)]
    rows = [r for r in aot["rows"] if _in_module(r["kernel"], module)]
    resources = [
        f"sm_{r['arch']} {r['kernel'].split(':')[1]} [{r['config']}, {r['dtype']}]: {r['regs']} regs, "
        f"{r['spills']} B spilled, {r['smem']} B smem, {r['blocks']} blocks/SM"
        for r in rows
        if "error" not in r
    ]
    record_property("resources", "; ".join(resources))
    print("\n".join(resources))

    offenders = [p.splitlines()[0] for p in aot["problems"] if p.startswith(f"kernels.{module}: ")]  # no import
    offenders += [p.splitlines()[0] for p in aot["problems"] if any(p.startswith(k) for k in kernels)]
    offenders += [
        f"sm_{r['arch']} {r['kernel']} [{r['config']}, {r['dtype']}]: {r['error']}" for r in rows if "error" in r
    ]
    for kid in kernels:
        for arch, configs in aot["expected_configs"].get(kid, {}).items():
            compiled = {r["config"] for r in rows if r["kernel"] == kid and r["arch"] == arch and "error" not in r}
            missing = [c for c in configs if c not in compiled]
            if missing and not any(p.startswith(kid) for p in aot["problems"]):
                offenders.append(f"sm_{arch} {kid}: configs not compiled: {missing}")
    offenders += [
        f"sm_{r['arch']} {r['kernel']} [{r['config']}, {r['dtype']}]: {r['spills']} bytes of local memory (spills)"
        for r in rows
        if r.get("spills")
    ]
    assert not offenders, "\n".join(offenders)
