"""The sm_90 PTX of RoIAlign's kernels at the COCO launches keeps 16-byte vector loads and relaxed vector atomics.

The launches are those of ``bench/test_roi_align.py`` on a GPU (2 images, P2-P5 of 800x1344, C=256, 1024 RoIs,
sampling ratio 2), made by the launchers on meta tensors and recorded without executing (``bench.kernels.
record_calls``), in a subprocess without ``TRITON_INTERPRET`` (this process has it set by ``tests/conftest.py``):
the issue's two goal cases, 7x7 float32 and 14x14 bfloat16, multi-level, with every autotune config
(``compile_launches``, sm_90, no GPU needed): 28 compiles, ~30 s on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys, torch
from bench.kernels import compile_launches, record_calls
from kernels._roi_align_kernels import backward_triton, forward_triton

scales, shapes = [1 / 4, 1 / 8, 1 / 16, 1 / 32], [(200, 336), (100, 168), (50, 84), (25, 42)]
rois = torch.empty(1024, 5, device="meta")
none = torch.empty(0, dtype=torch.int32, device="meta")

def coco():
    for dtype, out in ((torch.float32, 7), (torch.bfloat16, 14)):
        features = [torch.empty(2, 256, h, w, dtype=dtype, device="meta") for h, w in shapes]
        forward_triton(features, rois, None, scales, (out, out), 2, False, False, (224.0, 4.0))
        grad = torch.empty(1024, 256, out, out, dtype=dtype, device="meta")
        backward_triton(grad, rois, None, none, shapes, 2, False, scales, (out, out), 2, False, False, (224.0, 4.0),
                        False)

rows = compile_launches(record_calls(coco), archs=("90",), workers=2)
json.dump(rows, sys.stdout)
"""


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _label(row: dict) -> str:
    return f"{row['kernel'].split(':')[1]} [{row['config']}, {row['dtype']}, {row['launch']}]"


def test_every_config_compiled(rows: list[dict]) -> None:
    from kernels._roi_align_kernels import _gather_configs

    assert not [f"{_label(r)}: {r['error'][:300]}" for r in rows if "error" in r]
    for kernel in ("_roi_align_fwd_kernel", "_roi_align_bwd_kernel"):
        compiled = [r for r in rows if r["kernel"].endswith(kernel)]
        assert len(compiled) == 2 * len(_gather_configs()), kernel  # float32 7x7 and bfloat16 14x14


def test_forward_gathers_with_vector_loads(rows: list[dict]) -> None:
    """Each of a sample's 4 bilinear corners is one load of 64 or 128 bits (4 or 8 channels per thread); the
    only narrower loads are the RoI's 5 coordinates."""
    for r in rows:
        if r["kernel"].endswith("_roi_align_fwd_kernel"):
            loads = {int(w): n for w, n in r["memory"]["ld"].items()}
            assert sum(n for w, n in loads.items() if w >= 64) >= 4, _label(r)
            assert sum(n for w, n in loads.items() if w < 64) == 5, f"{_label(r)}: {loads}"


def test_backward_atomics_are_relaxed_16_byte_vectors(rows: list[dict]) -> None:
    """Every atomic of the backward is ``atom.global.gpu.relaxed.add.v4.f32``: 4 channels per instruction into the
    float32 buffer, without acquire-release ordering."""
    for r in rows:
        if r["kernel"].endswith("_roi_align_bwd_kernel"):
            atomics = r["memory"]["atom"]
            assert set(atomics) == {"128"} and atomics["128"] >= 4, f"{_label(r)}: {atomics}"
            assert set(r["memory"]["order"]) == {"relaxed"}, f"{_label(r)}: {r['memory']['order']}"
