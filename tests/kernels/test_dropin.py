"""``patch_torchvision()`` is a drop-in for the ways torchvision's users drive its ops: TorchScript
(a scripted patched Mask R-CNN, scripted ops), FX (``symbolic_trace``, ``create_feature_extractor``), autocast
(nms and RoIAlign under CPU autocast against torchvision's, and its own ``test_autocast_cpu`` cases), quantized
tensors, and the empty / error cases torchvision's own tests and its users rely on. Op-level checks run on both
backends (Triton's interpreter and the torch path); the scripted model runs on the torch path (under the interpreter
it would take minutes)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import kernels
from kernels import batched_nms, multiscale_roi_align, nms, nms_fixed, paste_masks_in_image, roi_align, use_backend

pytestmark = [
    # torch 2.14 deprecates TorchScript, which is exactly what these users still run.
    pytest.mark.filterwarnings("ignore:`torch.jit.script.*` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script.*` is deprecated:DeprecationWarning"),
    # torch 2.14 also deprecates the quantized dtypes, which torchvision's quantized ops still take.
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor.*deprecated:UserWarning"),
]

SMALL = dict(
    num_classes=3, min_size=64, max_size=64, rpn_pre_nms_top_n_test=40, rpn_post_nms_top_n_test=10,
    rpn_pre_nms_top_n_train=40, rpn_post_nms_top_n_train=10, box_batch_size_per_image=8, box_detections_per_img=5,
    box_score_thresh=0.0,
)  # fmt: skip


@pytest.fixture(params=["triton", "torch"])
def backend(request: pytest.FixtureRequest):
    with use_backend(request.param):
        yield request.param


def _features(n: int = 2, c: int = 3, h: int = 10, w: int = 12, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.rand(n, c, h, w, dtype=dtype)


ROIS = torch.tensor([[0, 0.5, 1.0, 7.5, 8.0], [1, 2.0, 0.0, 11.0, 6.5], [0, 4.0, 4.0, 6.0, 9.0]])


def _boxes_with_iou(n: int, iou: float, seed: int) -> tuple[Tensor, Tensor]:
    """Random boxes whose last box overlaps the first just above ``iou``: a decision at the threshold."""
    gen = torch.Generator().manual_seed(seed)
    boxes = torch.rand(n, 4, generator=gen) * 100
    boxes[:, 2:] += boxes[:, :2]
    boxes[-1] = boxes[0]
    x1, _, x2, _ = boxes[0].tolist()
    boxes[-1, 2] += (x2 - x1) * (1 - (iou + 1e-5)) / (iou + 1e-5)
    return boxes, torch.rand(n, generator=gen)


# ---------------------------------------------------------------------------------------------------------------
# TorchScript
# ---------------------------------------------------------------------------------------------------------------


def _tiny_maskrcnn() -> nn.Module:
    torch.manual_seed(0)
    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **SMALL)


def test_scripted_patched_maskrcnn_matches_eager() -> None:
    """``torch.jit.script`` of an unmodified torchvision Mask R-CNN under the patch compiles our ops into the graph
    (training branch included) and gives the eager patched model's detections and losses."""
    model = _tiny_maskrcnn()
    images = [torch.rand(3, 64, 64), torch.rand(3, 56, 64)]
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:40, 10:30] = 1
    masks[1, 30:60, 20:62] = 1
    boxes = torch.tensor([[10.0, 8.0, 30.0, 40.0], [20.0, 30.0, 62.0, 60.0]])
    target = {"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks}
    targets = [target, {k: v[:1].clone() for k, v in target.items()}]
    with kernels.patch_torchvision(), use_backend("torch"):
        scripted = torch.jit.script(model)
        graph = str(scripted.inlined_graph)
        for op in ("multiscale_roi_align", "nms", "decode_boxes", "encode_boxes", "mask_loss", "paste_masks"):
            assert f"mrcnn::{op}" in graph, op
        with torch.no_grad():
            model.eval(), scripted.eval()
            eager = model(images)
            _, detections = scripted(images)
        model.train(), scripted.train()
        torch.manual_seed(5)  # the samplers draw the same subsets in both
        eager_losses = model(images, targets)
        torch.manual_seed(5)
        scripted_losses, _ = scripted(images, targets)
    for ref, out in zip(eager, detections, strict=True):
        assert ref.keys() == out.keys() and len(ref["boxes"]) > 0
        for key in ref:
            torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5, msg=key)
    assert scripted_losses.keys() == eager_losses.keys()
    for key in eager_losses:
        torch.testing.assert_close(scripted_losses[key], eager_losses[key], rtol=1e-5, atol=1e-6, msg=key)


class _PoolBoxes(nn.Module):
    """A user's module around a RoIAlign taking per-image box lists, scripted as torchvision's users do."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, features: Tensor, boxes: list[Tensor]) -> Tensor:
        return self.pool(features, boxes)


def test_scripted_ops_match_eager(backend: str) -> None:
    x = _features().requires_grad_(True)
    box_list = [ROIS[ROIS[:, 0] == i, 1:] for i in range(2)]
    eager = roi_align(x, ROIS, 3, 0.5, 2, True)
    scripted = torch.jit.script(roi_align)(x, ROIS, 3, 0.5, 2, True)
    torch.testing.assert_close(scripted, eager, rtol=0, atol=0)
    (g_eager,) = torch.autograd.grad(eager.sum(), x)
    (g_scripted,) = torch.autograd.grad(scripted.sum(), x)
    torch.testing.assert_close(g_scripted, g_eager, rtol=0, atol=0)
    # The max mode, and torchvision's RoIAlign module (calling ours under the patch) with box lists.
    torch.testing.assert_close(torch.jit.script(roi_align)(x, box_list, [2, 3], 1.0, -1, False, "max"),
                               roi_align(x, box_list, (2, 3), pool_mode="max"), rtol=0, atol=0)  # fmt: skip
    with kernels.patch_torchvision(roi_align=True, multiscale=False, nms=False, box_coder=False, mask_loss=False,
                                   paste_masks=False):  # fmt: skip
        pool = torch.jit.script(_PoolBoxes(torchvision.ops.RoIAlign([2, 2], 0.5, 2)))
    torch.testing.assert_close(pool(x, box_list), roi_align(x, box_list, 2, 0.5, 2), rtol=0, atol=0)
    ours = torch.jit.script(_PoolBoxes(kernels.RoIAlign(2, 0.5, 2, pool_mode="max")))
    torch.testing.assert_close(ours(x, box_list), roi_align(x, box_list, 2, 0.5, 2, pool_mode="max"))

    levels = [torch.rand(1, 2, 16, 16), torch.rand(1, 2, 8, 8)]
    rois = torch.tensor([[0, 1.0, 1.0, 30.0, 40.0], [0, 2.0, 3.0, 9.0, 8.0]])
    torch.testing.assert_close(torch.jit.script(multiscale_roi_align)(levels, rois, [2, 2], [0.25, 0.125], 2),
                               multiscale_roi_align(levels, rois, 2, [0.25, 0.125], 2), rtol=0, atol=0)  # fmt: skip
    pooler = kernels.MultiScaleRoIAlign(["p2", "p3"], 2, 2)
    feats, proposals = {"p2": levels[0], "p3": levels[1]}, [rois[:, 1:]]
    torch.testing.assert_close(torch.jit.script(pooler)(feats, proposals, [(64, 64)]), pooler(feats, proposals,
                               [(64, 64)]), rtol=0, atol=0)  # fmt: skip

    boxes, scores = _boxes_with_iou(60, 0.5, seed=1)
    idxs = torch.randint(0, 3, (60,))
    assert torch.equal(torch.jit.script(nms)(boxes, scores, 0.5), nms(boxes, scores, 0.5))
    assert torch.equal(torch.jit.script(batched_nms)(boxes, scores, idxs, 0.5), batched_nms(boxes, scores, idxs, 0.5))
    masks, paste_boxes = torch.rand(2, 1, 5, 5), torch.tensor([[1.0, 2.0, 9.0, 7.0], [0.0, 0.0, 4.0, 12.0]])
    torch.testing.assert_close(torch.jit.script(paste_masks_in_image)(masks, paste_boxes, (12, 10), 1, 0.5),
                               paste_masks_in_image(masks, paste_boxes, (12, 10), threshold=0.5))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# FX
# ---------------------------------------------------------------------------------------------------------------


class _Heads(nn.Module):
    """A box head over a multi-level pooler, as a user cuts it out of a detection model."""

    def __init__(self, pool: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.pool = pool
        self.head = head

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]):
        return self.head(self.pool(features, proposals, image_shapes))


@pytest.mark.parametrize("pooler", ["torchvision's", "ours"])
def test_feature_extractor_over_patched_pooler(pooler: str) -> None:
    """``create_feature_extractor`` traces a patched model's RoI head: torchvision's MultiScaleRoIAlign stays a leaf
    module (running our op), ours traces as one node; the extracted features equal the eager ones."""
    torch.manual_seed(0)
    model = _tiny_maskrcnn().eval()
    pool = model.roi_heads.box_roi_pool
    if pooler == "ours":
        pool = kernels.MultiScaleRoIAlign(pool.featmap_names, pool.output_size, pool.sampling_ratio)
    heads = _Heads(pool, model.roi_heads.box_head)
    features = {name: torch.rand(1, 256, 16 >> i, 16 >> i) for i, name in enumerate(("0", "1", "2", "3"))}
    proposals = [torch.tensor([[1.0, 2.0, 40.0, 50.0], [10.0, 12.0, 20.0, 19.0], [0.0, 0.0, 63.0, 63.0]])]
    with kernels.patch_torchvision():
        nodes, _ = get_graph_node_names(heads)
        pool_node = next(n for n in nodes if n.startswith("pool"))
        assert sum(n.startswith("pool") for n in nodes) == 1, nodes  # one node, not a trace into the pooler
        extractor = create_feature_extractor(heads, {pool_node: "pooled", nodes[-1]: "representation"})
        with torch.no_grad():
            out = extractor(features, proposals, [(64, 64)])
            pooled = pool(features, proposals, [(64, 64)])
            ref = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(features, proposals, [(64, 64)])
    torch.testing.assert_close(out["pooled"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(out["representation"], model.roi_heads.box_head(pooled), rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref, rtol=1e-5, atol=1e-6)


def test_symbolic_trace_of_roi_modules(backend: str) -> None:
    """``torch.fx.symbolic_trace`` of RoIAlign modules: torchvision's under the patch and ours, each one call."""
    x = _features()
    for module in (torchvision.ops.RoIAlign((2, 3), 0.5, 2, aligned=True), kernels.RoIAlign((2, 3), 0.5, 2, True)):
        with kernels.patch_torchvision():
            graph = torch.fx.symbolic_trace(module)
            assert [n.op for n in graph.graph.nodes] == ["placeholder", "placeholder", "call_function", "output"]
            torch.testing.assert_close(graph(x, ROIS), module(x, ROIS), rtol=0, atol=0)


def test_reprs_are_torchvisions_for_its_arguments() -> None:
    assert repr(kernels.MultiScaleRoIAlign(["0"], (7, 7), 2)) == repr(torchvision.ops.MultiScaleRoIAlign(["0"], 7, 2))
    assert repr(kernels.RoIAlign((7, 7), 0.5, 2)) == repr(torchvision.ops.RoIAlign((7, 7), 0.5, 2))
    assert repr(kernels.MultiScaleRoIAlign(["0"], 7, 2, aligned=True, pool_mode="max")) == (
        "MultiScaleRoIAlign(featmap_names=['0'], output_size=(7, 7), sampling_ratio=2, aligned=True, pool_mode='max')"
    )
    assert repr(kernels.RoIAlign(7, 1.0, -1, pool_mode="max")).endswith("aligned=False, pool_mode='max')")


# ---------------------------------------------------------------------------------------------------------------
# Autocast
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("iou", [0.2, 0.5, 0.8])
def test_nms_under_cpu_autocast_is_torchvisions(backend: str, iou: float) -> None:
    """bf16 boxes are suppressed as their float32 values are (torchvision's autocast rule), also in ``nms_fixed``."""
    boxes, scores = _boxes_with_iou(400, iou, seed=9)
    boxes, scores = boxes.bfloat16(), scores.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torchvision.ops.nms(boxes, scores, iou)
        keep = nms(boxes, scores, iou)
        fixed, fixed_valid = nms_fixed(boxes[None], scores[None], iou, max_out=400)
    assert torch.equal(keep, ref)
    assert torch.equal(keep, nms(boxes.float(), scores.float(), iou))
    assert torch.equal(fixed[0][fixed_valid[0]], ref)
    assert not torch.equal(nms(boxes, scores, iou), ref)  # outside autocast bf16 IoUs decide some boxes otherwise


@pytest.mark.parametrize(("x_dtype", "rois_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                     (torch.bfloat16, torch.bfloat16)])  # fmt: skip
def test_roi_align_under_cpu_autocast_is_torchvisions(backend: str, x_dtype: torch.dtype, rois_dtype) -> None:
    """Same output dtype as torchvision (the features'), values within one rounding of the output dtype: we keep
    bf16 features and accumulate in float32 where torchvision casts them to float32 and back."""
    x = _features(dtype=x_dtype).permute(0, 1, 3, 2)
    rois = ROIS.to(rois_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torchvision.ops.roi_align(x, rois, 3, 0.5, -1, True)
        out = roi_align(x, rois, 3, 0.5, -1, True)
    assert out.dtype == ref.dtype == x_dtype
    ulp = 2.0**-7 if x_dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(out.float(), ref.float(), rtol=ulp, atol=ulp)


def _expected_in_dtype(x: Tensor, rois: Tensor, pool: int, aligned: bool) -> Tensor:
    """The reference of torchvision's ``TestRoIAlign`` (spatial scale 1, adaptive grid), computed as it computes:
    geometry and bilinear weights in Python floats; in ``x``'s dtype (each step rounded to it) a sample sums its
    weighted neighbours (x outer, y inner), the bin its samples, then divides by their count. Samples within a
    pixel outside the map are moved onto its border."""
    out = torch.zeros(rois.shape[0], x.shape[1], pool, pool, dtype=x.dtype)
    height, width = x.shape[2:]
    offset = 0.5 if aligned else 0.0
    for r, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        x1, y1, x2, y2 = x1 - offset, y1 - offset, x2 - offset, y2 - offset
        bin_h, bin_w = (y2 - y1) / pool, (x2 - x1) / pool
        grid_h, grid_w = math.ceil(bin_h), math.ceil(bin_w)
        for i in range(pool):
            for j in range(pool):
                val = torch.zeros(x.shape[1], dtype=x.dtype)
                for iy in range(grid_h):
                    y = y1 + i * bin_h + (iy + 0.5) * bin_h / grid_h
                    y = 0.0 if -1 < y <= 0 else height - 1.0 if height - 1 <= y < height else y
                    for ix in range(grid_w):
                        xx = x1 + j * bin_w + (ix + 0.5) * bin_w / grid_w
                        xx = 0.0 if -1 < xx <= 0 else width - 1.0 if width - 1 <= xx < width else xx
                        y0, x0 = math.floor(y), math.floor(xx)
                        sample = torch.zeros(x.shape[1], dtype=x.dtype)
                        for xp, wx in ((x0, 1 - (xx - x0)), (x0 + 1, xx - x0)):
                            for yp, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                                if 0 <= yp < height and 0 <= xp < width:
                                    sample = sample + wx * wy * x[int(b), :, yp, xp]
                        val = val + sample
                out[r, :, i, j] = val / (grid_h * grid_w)
    return out


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rois_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torchvisions_roi_align_autocast_cpu(
    backend: str, aligned: bool, deterministic: bool, x_dtype: torch.dtype, rois_dtype: torch.dtype
) -> None:
    """torchvision's ``TestRoIAlign.test_autocast_cpu`` through the patched ``torchvision.ops.RoIAlign``: a permuted
    [2, 50, 10, 10] map, four integer RoIs, 5 x 5 bins; the output keeps x's dtype and is within 5e-3 (bfloat16),
    1e-5 (float32) of the reference above. A truncating bfloat16 store missed it in 2 of 5000 elements."""
    x = torch.rand(2, 50, 10, 10, dtype=x_dtype).permute(0, 1, 3, 2)
    rois = torch.tensor([[0, 0, 0, 9, 9], [0, 0, 5, 4, 9], [0, 5, 5, 9, 9], [1, 0, 0, 9, 9]], dtype=rois_dtype)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        with kernels.patch_torchvision(), torch.autocast("cpu"):
            y = torchvision.ops.RoIAlign((5, 5), spatial_scale=1, sampling_ratio=-1, aligned=aligned)(x, rois)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert y.dtype == x.dtype
    tol = 5e-3 if x_dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(_expected_in_dtype(x, rois, 5, aligned).to(y), y, rtol=tol, atol=tol)


@pytest.mark.parametrize("iou", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torchvisions_nms_autocast_cpu(backend: str, iou: float, dtype: torch.dtype) -> None:
    """torchvision's ``TestNMS.test_autocast_cpu`` through the patched ``torchvision.ops.nms``: random boxes (the last
    overlapping the first just above ``iou``) in ``dtype`` keep what their float32 values keep. 400 boxes, not its
    1000: the interpreter takes ~10 s per 1000-box call."""
    boxes, scores = _boxes_with_iou(400, iou, seed=0)
    with kernels.patch_torchvision(), torch.autocast("cpu"):
        keep_ref_float = torchvision.ops.nms(boxes.to(dtype).float(), scores.to(dtype).float(), iou)
        keep_dtype = torchvision.ops.nms(boxes.to(dtype), scores.to(dtype), iou)
    torch.testing.assert_close(keep_ref_float, keep_dtype)


def test_mask_loss_and_torch_paths_under_cpu_autocast() -> None:
    """The mask loss comes out in float32 from bf16 logits, as torchvision's; and autocast is off inside every op, so
    the torch paths' matmuls (mask targets, paste) give the same result as outside autocast."""
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 7, 7).bfloat16()
    proposals = [torch.tensor([[1.0, 2.0, 20.0, 18.0], [4.0, 4.0, 12.0, 30.0], [0.0, 0.0, 31.0, 31.0]])]
    gt_masks = [(torch.rand(2, 32, 32) > 0.5).to(torch.uint8)]
    args = (logits, proposals, gt_masks, [torch.tensor([1, 0])], [torch.tensor([0, 1, 1])])
    masks, boxes = torch.rand(2, 1, 6, 6), torch.tensor([[1.0, 2.0, 19.0, 17.0], [0.0, 3.0, 9.0, 25.0]])
    with use_backend("torch"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = torchvision.models.detection.roi_heads.maskrcnn_loss(*args)
            loss = kernels.maskrcnn_loss(*args)
            pasted = paste_masks_in_image(masks, boxes, (24, 20))
        assert loss.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pasted, paste_masks_in_image(masks, boxes, (24, 20)), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Quantized tensors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qdtype", [torch.quint8, torch.qint8, torch.qint32])
@pytest.mark.parametrize("aligned", [False, True])
def test_quantized_roi_align_is_torchvisions(backend: str, qdtype: torch.dtype, aligned: bool) -> None:
    scale, zero_point = 0.5, 10
    gen = torch.Generator().manual_seed(0)
    x = 10 + 20 * torch.rand(1, 2, 8, 8, generator=gen)
    corners = torch.rand(12, 2, generator=gen) * 4
    rois = torch.cat([torch.zeros(12, 1), corners, corners + 1 + torch.rand(12, 2, generator=gen) * 4], dim=1)
    qx = torch.quantize_per_tensor(x, scale, zero_point, qdtype)
    qrois = torch.quantize_per_tensor(rois, scale, zero_point, qdtype)
    ref = torchvision.ops.roi_align(qx, qrois, 3, 1.0, -1, aligned)
    out = roi_align(qx, qrois, 3, 1.0, -1, aligned)
    assert out.dtype == qdtype and out.q_scale() == scale and out.q_zero_point() == zero_point
    # torchvision's kernel computes in float too, in another order: a value at a rounding tie may land one step away.
    steps = (out.int_repr().long() - ref.int_repr().long()).abs()
    assert steps.max() <= 1 and (steps > 0).float().mean() < 0.02


# quint8 at scale 1 clamps coordinates above 255: such boxes have zero area, and the interpreter warns on 0 / 0.
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
def test_quantized_nms_is_torchvisions(backend: str) -> None:
    boxes, scores = _boxes_with_iou(300, 0.5, seed=3)
    qboxes = torch.quantize_per_tensor(boxes, 1.0, 0, torch.quint8)
    qscores = torch.quantize_per_tensor(scores * 100, 1.0, 0, torch.quint8)
    assert torch.equal(nms(qboxes, qscores, 0.5), torchvision.ops.nms(qboxes, qscores, 0.5))


# ---------------------------------------------------------------------------------------------------------------
# Empty and bad arguments, caught as torchvision's users catch them
# ---------------------------------------------------------------------------------------------------------------


def test_batched_nms_of_nothing_is_torchvisions() -> None:
    empty = torch.empty((0,), dtype=torch.int64)
    with kernels.patch_torchvision():
        torch.testing.assert_close(torchvision.ops.batched_nms(empty, None, None, None), empty)


@pytest.mark.parametrize(
    ("boxes", "scores"),
    [(torch.rand(4), torch.rand(3)), (torch.rand(3, 5), torch.rand(3)), (torch.rand(3, 4), torch.rand(3, 2)),
     (torch.rand(3, 4), torch.rand(4)), (torch.rand(3, 4).int(), torch.rand(3))],
    ids=["boxes-1d", "boxes-5-wide", "scores-2d", "scores-length", "int-boxes"],
)  # fmt: skip
def test_nms_argument_errors_are_runtime_errors(boxes: Tensor, scores: Tensor) -> None:
    with kernels.patch_torchvision(), pytest.raises(RuntimeError, match="boxes|scores") as error:
        torchvision.ops.nms(boxes, scores, 0.5)
    assert isinstance(error.value, (ValueError, TypeError))  # ours: the message names the argument


@pytest.mark.parametrize(
    "boxes",
    [torch.tensor([[0.0, 0, 3, 3]]), [torch.tensor([[0.0, 0, 3]])], "boxes"],
    ids=["tensor-4-wide", "list-3-wide", "not-boxes"],
)
def test_roi_box_format_errors_are_torchvisions_assertion(boxes: object) -> None:
    """torchvision checks the box format with ``torch._assert`` (``AssertionError``); ours is that, a ``ValueError``
    and a ``RuntimeError``, naming the boxes."""
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(AssertionError):
        torchvision.ops.roi_align(x, boxes, output_size=(2, 2))
    with pytest.raises(AssertionError, match="boxes|rois") as error:
        roi_align(x, boxes, output_size=(2, 2))
    assert isinstance(error.value, ValueError) and isinstance(error.value, RuntimeError)


def test_other_argument_errors_are_runtime_errors_too() -> None:
    x = torch.rand(1, 2, 8, 8)
    with pytest.raises(RuntimeError, match="sampling_ratio"):
        roi_align(x, ROIS[:1], 2, 1.0, 2.5)
    with pytest.raises(RuntimeError, match="spatial_scale"):
        roi_align(x, ROIS[:1], 2, 0.0)
    with pytest.raises(RuntimeError, match="output_size"):
        roi_align(x, ROIS[:1], (2, 0))
    with pytest.raises(RuntimeError, match="must have dtype"):
        roi_align(x.int(), ROIS[:1], 2)
