"""``bench/gpu.sh``, the GPU machine's one call, tested before any GPU exists: its ``--dry-run`` runs the same
stages on the CPU (the suites' CPU shapes, quick benchmarks, the interpreter off) and must pass, write the
files the device tool brings back (at most 8, plain names) and report every stage in ``gpu-status.md``.
CI runs it again on the GPU machine's stack (``.ci/run``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.sh"
FILES = {"gpu-status.md", "tests.log", "tests.xml", "ops.json", "ops.log", "profile.log", "model.json", "model.log"}


def test_stage_budgets_fit_the_device_call() -> None:
    """Stage budgets (tests <= 3 min, ops <= 3 min, profile <= 1 min, model <= 2 min) plus a SIGKILL grace each
    stay within the 8 minutes the README's device call plans for (timeout_s 540 leaves a minute for set-up and
    transfers, and the 15-minute budget a rerun of a stage)."""
    text = SCRIPT.read_text()
    budgets = {name: int(re.search(rf"{name}_S:-(?:\$\( *\(\(dry_run\)\) && echo \d+ \|\| echo )?(\d+)", text)[1])
               for name in ("TESTS", "OPS", "PROFILE", "MODEL")}  # fmt: skip
    assert budgets["TESTS"] <= 180 and budgets["OPS"] <= 180 and budgets["MODEL"] <= 120, budgets
    assert budgets["PROFILE"] <= 60, budgets
    grace = int(re.search(r"timeout -s INT -k (\d+)", text)[1])
    assert sum(budgets.values()) + len(budgets) * grace <= 8 * 60, (budgets, grace)


@pytest.mark.slow
def test_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(out), PYTHON=sys.executable, TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]

    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == FILES
    status = (out / "gpu-status.md").read_text()
    for stage in ("tests", "ops", "profile", "model"):
        assert re.search(rf"^\| {stage} \| passed \| \d+ \|$", status, re.M), status

    suite = ET.parse(out / "tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) > 0 and int(suite.get("errors")) == 0 and int(suite.get("failures")) == 0
    ops = json.loads((out / "ops.json").read_text())
    # The model suite has its own stage; the export suite none (AOTInductor compiles for minutes: run it alone).
    suites = {f.name for f in (ROOT / "bench").glob("test_*.py")} - {"test_model.py", "test_export.py"}
    assert set(ops["suites"]) == suites and all(" exit 0," in s for s in ops["suites"].values()), ops["suites"]
    assert {Path(b["fullname"].split("::")[0]).name for b in ops["benchmarks"]} == suites
    model = json.loads((out / "model.json").read_text())
    assert {b["params"]["provider"] for b in model["benchmarks"]} >= {"ours", "torchvision"}
