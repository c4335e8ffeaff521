"""Registration as ``triton_op`` (``kernels._backend.TritonCustomOp``): on CUDA, a compiled graph launches our
Triton kernels itself; everywhere else it keeps one opaque node per op call.

The CUDA side is checked without a GPU: ``tests/kernels/fake_cuda_graphs.py`` traces every op (and a small
model's eval forward) over fake CUDA tensors the way inductor does before lowering, in a process without
``TRITON_INTERPRET``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx

import kernels
from kernels._backend import LINEAR_KERNEL_ANALYSIS

ROOT = Path(__file__).resolve().parents[2]
# The Triton kernels each case must launch: forward and backward of every op family.
EXPECTED = {
    "roi_align": ["_roi_align_fwd_kernel"],
    "roi_align max": ["_roi_align_fwd_kernel"],
    "multiscale_roi_align": ["_roi_align_fwd_kernel"],
    "multiscale_roi_align_backward": ["_roi_align_bwd_kernel"],
    "multiscale_roi_align_backward max": ["_roi_align_bwd_kernel"],
    "multiscale_roi_align_backward deterministic": ["_roi_align_bwd_tiles_kernel"],
    "mask_loss": ["_mask_loss_fwd_kernel"],
    "mask_loss_backward": ["_mask_loss_bwd_kernel"],
    "decode_boxes": ["_decode_boxes_fwd_kernel"],
    "decode_boxes_backward": ["_decode_boxes_bwd_kernel"],
    "encode_boxes": ["_encode_boxes_kernel"],
    "nms_fixed": ["_nms_mask_kernel", "_nms_sweep_kernel"],
    "paste_masks": ["_paste_masks_fwd_kernel"],
}
# Where inductor's kernel analysis is exponential (torch >= 2.12, see kernels._backend), NMS stays an opaque op.
OPAQUE_ON_CUDA = [] if LINEAR_KERNEL_ANALYSIS else ["nms_fixed"]


@pytest.fixture(scope="module")
def cuda_graphs() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-m", "tests.kernels.fake_cuda_graphs"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    return {row["case"]: row for row in rows}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_cuda_graph_launches_our_kernels(cuda_graphs: dict[str, dict], case: str) -> None:
    """Traced over CUDA tensors, each op leaves its Triton launches and no ``mrcnn`` op in the graph. Inductor's
    analysis of each kernel (which tensors it writes) ran for sm_90 and finished (the script's timeout). The call
    chose its backend once."""
    if case in OPAQUE_ON_CUDA:
        assert cuda_graphs[case] == {"case": case, "kernels": [], "mrcnn_ops": [f"mrcnn.{case}_opaque.default"],
                                     "backend_choices": 0}  # fmt: skip
        return
    assert cuda_graphs[case]["mrcnn_ops"] == []
    assert cuda_graphs[case]["kernels"] == EXPECTED[case]
    # The one op call chose its backend once (an eager CUDA call runs the same code).
    assert cuda_graphs[case]["backend_choices"] == 1


def test_cuda_model_graph_has_only_kernels(cuda_graphs: dict[str, dict]) -> None:
    """The model's eval forward on CUDA (what a CUDA AOTInductor package compiles): RPN and box-head decoding and
    NMS, box and mask RoIAlign, all as Triton launches, no ``mrcnn`` op left for Python to serve (but NMS where
    ``OPAQUE_ON_CUDA``)."""
    model = cuda_graphs["model"]
    expected = ["_decode_boxes_fwd_kernel", "_roi_align_fwd_kernel"] + [k for k in EXPECTED["nms_fixed"] if
                                                                      "nms_fixed" not in OPAQUE_ON_CUDA]
    assert sorted(model["kernels"]) == sorted(expected * 2)
    assert model["mrcnn_ops"] == [f"mrcnn.{op}_opaque.default" for op in OPAQUE_ON_CUDA] * 2


def test_cpu_graph_keeps_the_opaque_op() -> None:
    """On CPU a compiled graph is not traced into the op (its torch path can have data-dependent sizes, e.g. the
    adaptive sampling grid): functionalized as inductor does, ``roi_align`` becomes one ``mrcnn::<op>_opaque`` node,
    which runs the interpreter or the torch path as eager calls do."""
    x = torch.randn(1, 3, 12, 12)
    rois = torch.tensor([[0.0, 1.0, 1.0, 9.0, 10.0]])
    f = lambda x, rois: kernels.roi_align(x, rois, 5, 1.0, -1)  # noqa: E731
    gm = make_fx(dispatch_functionalize(f), tracing_mode="fake")(x, rois)
    ours = [str(n.target) for n in gm.graph.nodes if str(n.target).startswith("mrcnn.")]
    assert ours == ["mrcnn.multiscale_roi_align_opaque.default"]
    torch.testing.assert_close(gm(x, rois), f(x, rois), rtol=0, atol=0)
