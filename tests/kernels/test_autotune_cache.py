"""Autotuning results persist across processes: every autotuned kernel of ours is decorated with Triton's
``cache_results`` on, and nobody else's is (the knob is set while ``kernels`` decorates its own only).

Both run in a fresh process without ``TRITON_INTERPRET`` (the interpreter tunes nothing and caches nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_LIST_AUTOTUNERS = """
import json, sys, triton
from triton.runtime.autotuner import Autotuner
import kernels

ours = {f"{name}.{attr}": obj.cache_results for name, module in sys.modules.items() if name.startswith("kernels.")
        for attr, obj in vars(module).items() if isinstance(obj, Autotuner)}


@triton.autotune(configs=[triton.Config({}), triton.Config({}, num_warps=8)], key=[])
@triton.jit
def other(x):
    pass


print(json.dumps({"ours": ours, "other": other.cache_results, "knob": bool(triton.knobs.autotuning.cache)}))
"""

# Tunes the RoIAlign forward once; prints whether the best config came from the disk cache.
_TUNE_ONCE = """
import json, torch, triton
import kernels

hits = []
triton.knobs.autotuning.listener = lambda **kw: hits.append(kw["cache_hit"])
x = torch.randn(1, 256, 50, 68, device="cuda")
boxes = torch.tensor([[0, 1.0, 2.0, 30.0, 40.0]], device="cuda")
kernels.roi_align(x, boxes, (7, 7), 0.25, 2, True)
torch.cuda.synchronize()
print(json.dumps(hits))
"""


def _run(code: str, env: dict[str, str], folder: Path) -> str:
    script = folder / "script.py"  # a file: triton.jit reads its kernels' source
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    env.pop("TRITON_INTERPRET", None)
    env.pop("TRITON_CACHE_AUTOTUNING", None)
    return env


def test_our_autotuned_kernels_cache_their_results_and_only_ours(tmp_path: Path) -> None:
    out = json.loads(_run(_LIST_AUTOTUNERS, _env(), tmp_path))
    assert len(out["ours"]) >= 6 and all(out["ours"].values()), out["ours"]
    assert out["other"] is False and out["knob"] is False


@pytest.mark.cuda
def test_a_second_process_reads_the_tuned_config_from_disk(tmp_path: Path) -> None:
    env = _env(TRITON_CACHE_DIR=str(tmp_path / "cache"))
    first, second = json.loads(_run(_TUNE_ONCE, env, tmp_path)), json.loads(_run(_TUNE_ONCE, env, tmp_path))
    assert first and not any(first), first  # tuned by benchmarking
    assert second and all(second), second  # every key found on disk
    assert list((tmp_path / "cache").rglob("*.autotune.json"))
