"""What inductor sees of our ops on CUDA, traced on a machine without a GPU.

``python -m tests.kernels.fake_cuda_graphs`` (without ``TRITON_INTERPRET``: interpreted kernels cannot be
traced) builds fake CUDA tensors, which need no GPU, and traces every op forward and backward the way inductor
and AOTInductor do before lowering: ``make_fx`` over a functionalized call. It prints one JSON line per case:
the Triton kernels the graph launches (``triton_kernel_wrapper_functional`` nodes, by kernel name) and any
``mrcnn`` op left in it, which a compiled graph could only call back through Python.
``tests/kernels/test_triton_op.py`` runs it in a subprocess.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
import triton
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx
from triton.backends.compiler import GPUTarget

import kernels
import mrcnn
from kernels import backend_for
from tests.calls import counted_calls


def graph_summary(fn: Callable[..., object], *args: object) -> dict[str, list[str] | int]:
    """The Triton kernels and the ``mrcnn`` ops of ``fn(*args)`` traced as inductor traces it, and how many times
    the trace chose a backend (``kernels._backend.backend_for``)."""
    with counted_calls(backend_for) as choices:
        gm = make_fx(dispatch_functionalize(fn), tracing_mode="fake")(*args)
    launched, ours = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if "triton_kernel_wrapper" in name:
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            launched.append(getattr(kernel, "fn", kernel).__name__)
        elif name.startswith("mrcnn."):
            ours.append(name)
    return {"kernels": launched, "mrcnn_ops": ours, "backend_choices": len(choices)}


def cases() -> dict[str, tuple[Callable[..., object], tuple]]:
    """Every op, forward and backward, at small shapes on fake CUDA tensors.

    The backward ops are called directly: the autograd engine would look for a CUDA device. Every tensor is an
    argument of the traced function (a captured fake tensor would not be functionalized).
    """
    cuda = torch.device("cuda")
    ops = torch.ops.mrcnn
    with FakeTensorMode(allow_non_fake_inputs=True):
        feats = [torch.empty(2, 8, 32 >> i, 40 >> i, device=cuda) for i in range(4)]
        rois = torch.empty(16, 5, device=cuda)
        valid = torch.empty(16, dtype=torch.bool, device=cuda)
        pooled = torch.empty(16, 8, 7, 7, device=cuda)
        argmax = torch.empty(16, 8, 7, 7, dtype=torch.int32, device=cuda)
        no_argmax = torch.empty(0, dtype=torch.int32, device=cuda)
        logits = torch.empty(6, 3, 28, 28, device=cuda)
        boxes4 = torch.empty(6, 4, device=cuda)
        gt = torch.empty(2, 3, 40, 48, dtype=torch.uint8, device=cuda)
        idx = torch.empty(6, dtype=torch.int64, device=cuda)
        wts = torch.empty(6, device=cuda)
        loss_grad = torch.empty((), device=cuda)
        dlogits = torch.empty(6, 28, 28, device=cuda)
        deltas = torch.empty(10, 8, device=cuda)
        props = torch.empty(10, 4, device=cuda)
        decoded = torch.empty(10, 2, 4, device=cuda)
        sizes = torch.empty(10, 2, dtype=torch.int64, device=cuda)
        nms_boxes = torch.empty(2, 50, 4, device=cuda)
        nms_scores = torch.empty(2, 50, device=cuda)
        masks = torch.empty(5, 1, 28, 28, device=cuda)
        paste_boxes = torch.empty(5, 4, device=cuda)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    level_sizes = [s for f in feats for s in f.shape[2:]]
    weights = [10.0, 10.0, 5.0, 5.0]
    clip = kernels.BBOX_XFORM_CLIP

    def multiscale_backward(
        g: torch.Tensor, r: torch.Tensor, v: torch.Tensor, a: torch.Tensor, mode: str = "avg"
    ) -> list[torch.Tensor]:
        return ops.multiscale_roi_align_backward(g, r, v, a, scales, 7, 7, 2, False, mode, 224.0, 4.0, 2,
                                                 level_sizes, False)  # fmt: skip

    return {
        "roi_align": (lambda x, r: kernels.roi_align(x, r, 7, 0.25, 2), (feats[0], rois)),
        "roi_align max": (lambda x, r: kernels.roi_align(x, r, 7, 0.25, 2, pool_mode="max"), (feats[0], rois)),
        "multiscale_roi_align_backward max": (
            lambda g, r, v, a: multiscale_backward(g, r, v, a, "max"),
            (pooled, rois, valid, argmax),
        ),
        "multiscale_roi_align": (
            lambda f0, f1, f2, f3, r, v: kernels.multiscale_roi_align([f0, f1, f2, f3], r, 7, scales, 2, v),
            (*feats, rois, valid),
        ),
        "multiscale_roi_align_backward": (multiscale_backward, (pooled, rois, valid, no_argmax)),
        "mask_loss": (
            lambda x, b, m, i, w: kernels.mask_loss(x, b, m, i, i, i, w, sampling_ratio=2),
            (logits, boxes4, gt, idx, wts),
        ),
        "mask_loss_backward": (
            lambda g, d, i: ops.mask_loss_backward(g, d, g, i, 3, torch.float32),
            (loss_grad, dlogits, idx),
        ),
        "decode_boxes": (
            lambda d, p, s: kernels.decode_boxes(d, p, tuple(weights), image_sizes=s),
            (deltas, props, sizes),
        ),
        "decode_boxes_backward": (
            lambda g, d, p, s: ops.decode_boxes_backward(g, d, p, weights, clip, s),
            (decoded, deltas, props, sizes),
        ),
        "encode_boxes": (lambda g, p: kernels.encode_boxes(g, p, tuple(weights)), (props, props)),
        "nms_fixed": (lambda b, s: kernels.nms_fixed(b, s, 0.5, 20), (nms_boxes, nms_scores)),
        "paste_masks": (
            lambda m, b: kernels.paste_masks_in_image(m, b, (60, 80), threshold=0.5),
            (masks, paste_boxes),
        ),
    }


def model_case() -> tuple[Callable[..., object], tuple]:
    """A small ``mrcnn.MaskRCNN``'s eval forward, its parameters and buffers as fake CUDA inputs."""
    config = mrcnn.MaskRCNNConfig(num_classes=4, backbone="resnet18", min_size=112, max_size=150,
                                  rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=60, detections_per_img=12,
                                  box_candidates_per_img=80)  # fmt: skip
    model = mrcnn.MaskRCNN(config).eval()
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        tensors = [mode.from_tensor(t).to("cuda") for t in state.values()]
        images = torch.empty(2, 3, 128, 160, device="cuda")
        image_sizes = torch.empty(2, 2, dtype=torch.int64, device="cuda")

    def forward(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(functional_call(model, dict(zip(state, args[:-2], strict=True)), args[-2:]))

    return forward, (*tensors, images, image_sizes)


class _Sm90:
    """Triton's active driver, as far as tracing asks it: the target an H100/H200 reports. Inductor compiles each
    user kernel to TTIR to find the tensors it writes (``identify_accessed_tensors``); without a driver it would
    assume every input is written and copy them all."""

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: interpreted kernels cannot be traced")
    triton.runtime.driver.set_active(_Sm90())
    for name, (fn, args) in cases().items():
        print(json.dumps({"case": name, **graph_summary(fn, *args)}), flush=True)
    torch.use_deterministic_algorithms(True)
    fn, args = cases()["multiscale_roi_align_backward"]
    print(json.dumps({"case": "multiscale_roi_align_backward deterministic", **graph_summary(fn, *args)}))
    torch.use_deterministic_algorithms(False)
    forward, inputs = model_case()
    print(json.dumps({"case": "model", **graph_summary(forward, *inputs)}))


if __name__ == "__main__":
    main()
