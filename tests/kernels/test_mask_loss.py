"""Fused mask loss (kernels.mask_loss): torchvision's maskrcnn_loss, a float64 loop reference, a hand-computed
case, gradcheck, opcheck and torch.compile.

Every test that takes the ``backend`` fixture runs on the Triton kernels (through the interpreter on CPU) and on
the vectorized torch path. Grids stay tiny: the forward runs R * ceil(M / 8) programs, the backward
R * ceil(K / 4), at ~3 ms each under the interpreter.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchvision.models.detection.roi_heads import maskrcnn_loss as tv_maskrcnn_loss

from kernels import use_backend
from kernels.mask_loss import EPS, mask_loss, maskrcnn_loss
from tests.reference import mask_target_ref
from tests.tolerances import coordinate_atol, subnormal_atol, tol

BACKENDS = ("triton", "torch")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest):
    with use_backend(request.param):
        yield request.param


# ---------------------------------------------------------------------------------------------------------------
# Float64 loop reference: the targets from tests/reference.py's RoIAlign loops (torchvision's bilinear sampling
# written out plainly), then torch's own binary_cross_entropy_with_logits per RoI.
# ---------------------------------------------------------------------------------------------------------------


def ref_mask_loss(case: dict, binarize: bool = False, aligned: bool = False, sampling_ratio: int = -1, scale=1.0):
    """(loss, d(scale * loss)/d logits) in float64 from the definition in kernels/mask_loss.py."""
    logits = case["logits"].detach().to(torch.float64).requires_grad_(True)
    R, K, M, _ = logits.shape
    masks = case["gt_masks"].to(torch.float64)
    B, G, H, W = masks.shape
    sizes = case.get("mask_sizes")
    num = logits.new_zeros(())
    den = 0.0
    for r in range(R):
        b, g, lab = int(case["image_idx"][r]), int(case["matched_idx"][r]), int(case["labels"][r])
        w = float(case["weights"][r])
        if not (0 <= b < B and 0 <= g < G and 0 <= lab < K and w != 0):
            continue
        h, wd = (H, W) if sizes is None else (min(max(int(sizes[b, 0]), 0), H), min(max(int(sizes[b, 1]), 0), W))
        box = [float(v) for v in case["boxes"][r].to(torch.float64)]
        t = mask_target_ref(masks[b, g, :h, :wd].numpy(), box, M, aligned, sampling_ratio)
        if binarize:
            t = (t >= 0.5).to(torch.float64)
        num = num + w * F.binary_cross_entropy_with_logits(logits[r, lab], t)
        den += w
    loss = num / max(den, EPS)
    (grad,) = torch.autograd.grad(loss * scale, logits) if loss.requires_grad else (torch.zeros_like(logits),)
    return loss.detach(), grad


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def random_case(
    R: int = 6,
    K: int = 3,
    M: int = 5,
    B: int = 2,
    G: int = 3,
    H: int = 9,
    W: int = 11,
    *,
    dtype: torch.dtype = torch.float32,
    box_dtype: torch.dtype = torch.float32,
    with_sizes: bool = False,
) -> dict:
    """Random RoIs on random 0/1 masks; boxes of 0.2 to 8 pixels, many partly outside the masks."""
    xy = torch.rand(R, 2, dtype=torch.float64) * torch.tensor([W + 2.0, H + 2.0]) - 3.0
    wh = torch.rand(R, 2, dtype=torch.float64) * torch.tensor([0.7 * W, 0.7 * H]) + 0.2
    case = dict(
        logits=torch.randn(R, K, M, M, dtype=torch.float64).to(dtype),
        boxes=torch.cat([xy, xy + wh], 1).to(box_dtype),
        gt_masks=(torch.rand(B, G, H, W) > 0.5).to(torch.uint8),
        image_idx=torch.randint(0, B, (R,)),
        matched_idx=torch.randint(0, G, (R,)),
        labels=torch.randint(0, K, (R,)),
        weights=torch.rand(R) + 0.5,
    )
    if with_sizes:
        case["mask_sizes"] = torch.stack([torch.randint(H // 2, H + 1, (B,)), torch.randint(W // 2, W + 1, (B,))], 1)
    return case


def add_special_rows(case: dict) -> dict:
    """Append a padded slot (weight 0, NaN logits), invalid indices of every kind (NaN logits too: they must not
    be read) and a NaN box (target 0)."""
    B, G = case["gt_masks"].shape[:2]
    K = case["logits"].shape[1]
    big = 2**40
    rows = [  # (image_idx, matched_idx, label, weight, nan logits, nan box)
        (0, 0, 0, 0.0, True, False),
        (-1, 0, 0, 1.0, True, False),
        (B, 0, 0, 1.0, True, False),
        (0, G, 0, 1.0, True, False),
        (0, -big, 0, 1.0, True, False),
        (0, 0, K, 1.0, True, False),
        (big, 0, -1, 1.0, True, False),
        (0, 1, 1, 1.0, False, True),
    ]
    n = len(rows)
    logits = torch.randn((n, *case["logits"].shape[1:]), dtype=torch.float64).to(case["logits"].dtype)
    boxes = torch.tensor([[1.0, 1.5, 6.0, 7.0]] * n, dtype=case["boxes"].dtype)
    for i, row in enumerate(rows):
        if row[4]:
            logits[i] = float("nan")
        if row[5]:
            boxes[i, 2] = float("nan")
    out = dict(case)
    out["logits"] = torch.cat([case["logits"], logits])
    out["boxes"] = torch.cat([case["boxes"], boxes])
    out["image_idx"] = torch.cat([case["image_idx"], torch.tensor([r[0] for r in rows])])
    out["matched_idx"] = torch.cat([case["matched_idx"], torch.tensor([r[1] for r in rows])])
    out["labels"] = torch.cat([case["labels"], torch.tensor([r[2] for r in rows])])
    out["weights"] = torch.cat([case["weights"], torch.tensor([r[3] for r in rows])])
    return out


def run(case: dict, scale: float = 1.0, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Our loss and d(scale * loss)/d logits."""
    logits = case["logits"].detach().clone().requires_grad_(True)
    loss = mask_loss(
        logits, case["boxes"], case["gt_masks"], case["image_idx"], case["matched_idx"], case["labels"],
        case["weights"], mask_sizes=case.get("mask_sizes"), **kwargs,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, logits, torch.tensor(scale, dtype=loss.dtype))
    return loss.detach(), grad


def torchvision_case(num_images: int = 3, M: int = 6, K: int = 4, same_size: bool = False, dtype=torch.float32):
    """Per-image lists in torchvision's format; image sizes differ unless ``same_size``."""
    proposals, gt_masks, gt_labels, idxs = [], [], [], []
    for i in range(num_images):
        H, W = (12, 10) if same_size else (12 + 3 * i, 10 + 5 * i)
        G, P = 2 + i, 3 + i
        gt_masks.append((torch.rand(G, H, W) > 0.5).to(torch.uint8))
        xy = torch.rand(P, 2, dtype=torch.float64) * torch.tensor([W + 2.0, H + 2.0]) - 3.0
        wh = torch.rand(P, 2, dtype=torch.float64) * torch.tensor([0.8 * W, 0.8 * H]) + 0.3
        proposals.append(torch.cat([xy, xy + wh], 1).to(dtype))
        gt_labels.append(torch.randint(1, K, (G,)))
        idxs.append(torch.randint(0, G, (P,)))
    R = sum(p.shape[0] for p in proposals)
    logits = torch.randn(R, K, M, M, dtype=torch.float64).to(dtype)
    return logits, proposals, gt_masks, gt_labels, idxs


def loss_and_grad(fn, logits: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, *args)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


# ---------------------------------------------------------------------------------------------------------------
# torchvision parity
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["different_sizes", "same_size", "one_image"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_maskrcnn_loss_matches_torchvision(backend: str, layout: str, dtype: torch.dtype) -> None:
    n = 1 if layout == "one_image" else 3
    logits, *lists = torchvision_case(num_images=n, same_size=layout == "same_size", dtype=dtype)
    want, want_grad = loss_and_grad(tv_maskrcnn_loss, logits, *lists)
    got, got_grad = loss_and_grad(maskrcnn_loss, logits, *lists)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, **tol(dtype))
    # Gradients are O(1 / (R*M*M)); compare them at the scale of one pixel's loss.
    scale = logits.shape[0] * logits.shape[-1] ** 2
    torch.testing.assert_close(got_grad * scale, want_grad * scale, **tol(dtype))


def test_maskrcnn_loss_bool_and_float_masks(backend: str) -> None:
    logits, proposals, gt_masks, gt_labels, idxs = torchvision_case()
    want, want_grad = loss_and_grad(maskrcnn_loss, logits, proposals, gt_masks, gt_labels, idxs)
    for dtype in (torch.bool, torch.float32):
        masks = [m.to(dtype) for m in gt_masks]
        got, got_grad = loss_and_grad(maskrcnn_loss, logits, proposals, masks, gt_labels, idxs)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)


def test_maskrcnn_loss_empty(backend: str) -> None:
    logits = torch.randn(0, 4, 6, 6)
    proposals = [torch.zeros(0, 4), torch.zeros(0, 4)]
    gt_masks = [torch.zeros(2, 10, 12, dtype=torch.uint8), torch.zeros(0, 8, 9, dtype=torch.uint8)]
    gt_labels = [torch.tensor([1, 2]), torch.zeros(0, dtype=torch.int64)]
    idxs = [torch.zeros(0, dtype=torch.int64)] * 2
    want, want_grad = loss_and_grad(tv_maskrcnn_loss, logits, proposals, gt_masks, gt_labels, idxs)
    got, got_grad = loss_and_grad(maskrcnn_loss, logits, proposals, gt_masks, gt_labels, idxs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got_grad.shape == want_grad.shape == (0, 4, 6, 6)


# ---------------------------------------------------------------------------------------------------------------
# Fused op against the float64 loop reference
# ---------------------------------------------------------------------------------------------------------------


def test_golden(backend: str) -> None:
    """Hand-computed: mask rows [1 0 0 0], [0 1 0 1], [1 1 0 0], [0 0 1 1]; M = 2.

    RoI 0: box (0, 0, 4, 4), sampling_ratio 1: bin 2, one sample per bin at y, x in {1, 3}; 3 >= H - 1 sits on
    the last row/column. Targets = mask[1,1], mask[1,3], mask[3,1], mask[3,3] = [[1, 1], [0, 1]].
    RoI 1: box (0, 0, 2, 2), same: samples at {0.5, 1.5}, each the mean of a 2x2 block:
    [[(1+0+0+1)/4, (0+0+1+0)/4], [(0+1+1+1)/4, (1+0+1+0)/4]] = [[0.5, 0.25], [0.75, 0.5]].
    bce(x, t) = log(1 + e^x) - x t. Weights 1 and 3.
    """
    mask = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.uint8)
    logits = torch.zeros(2, 2, 2, 2, dtype=torch.float64)
    logits[0, 1] = torch.tensor([[2.0, -1.0], [0.0, 3.0]])
    logits[1, 0] = torch.tensor([[1.0, 0.0], [-2.0, 0.5]])
    case = dict(
        logits=logits,
        boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 2.0, 2.0]], dtype=torch.float64),
        gt_masks=mask[None, None],
        image_idx=torch.tensor([0, 0]),
        matched_idx=torch.tensor([0, 0]),
        labels=torch.tensor([1, 0]),
        weights=torch.tensor([1.0, 3.0], dtype=torch.float64),
    )

    def bce(x: float, t: float) -> float:
        return math.log1p(math.exp(x)) - x * t

    roi0 = (bce(2, 1) + bce(-1, 1) + bce(0, 0) + bce(3, 1)) / 4
    roi1 = (bce(1, 0.5) + bce(0, 0.25) + bce(-2, 0.75) + bce(0.5, 0.5)) / 4
    got, _ = run(case, sampling_ratio=1)
    torch.testing.assert_close(got, torch.tensor((roi0 + 3 * roi1) / 4, dtype=torch.float64), **tol(torch.float64))
    # Binarised, RoI 1's targets become [[1, 0], [1, 1]].
    roi1_bin = (bce(1, 1) + bce(0, 0) + bce(-2, 1) + bce(0.5, 1)) / 4
    got, _ = run(case, sampling_ratio=1, binarize=True)
    want = torch.tensor((roi0 + 3 * roi1_bin) / 4, dtype=torch.float64)
    torch.testing.assert_close(got, want, **tol(torch.float64))


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("binarize", [False, True])
def test_matches_reference(backend: str, binarize: bool, aligned: bool, sampling_ratio: int) -> None:
    case = add_special_rows(random_case(dtype=torch.float64, box_dtype=torch.float64, with_sizes=aligned))
    scale = 6 * 5 * 5  # gradients at the scale of one pixel's loss
    want, want_grad = ref_mask_loss(case, binarize, aligned, sampling_ratio, scale)
    got, got_grad = run(case, scale, binarize=binarize, aligned=aligned, sampling_ratio=sampling_ratio)
    torch.testing.assert_close(got, want, **tol(torch.float64))
    torch.testing.assert_close(got_grad, want_grad, **tol(torch.float64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes(backend: str, dtype: torch.dtype) -> None:
    case = random_case(dtype=dtype)
    scale = 6 * 5 * 5
    want, want_grad = ref_mask_loss(case, scale=scale)
    got, got_grad = run(case, scale)
    assert got.dtype == dtype and got_grad.dtype == dtype
    torch.testing.assert_close(got.double(), want, **tol(dtype))
    torch.testing.assert_close(got_grad.double(), want_grad, **tol(dtype))


def test_padded_slots_and_invalid_indices(backend: str) -> None:
    """Inactive RoIs: no contribution to either sum, exactly zero gradient, NaN logits there never read.
    (The NaN-box row of add_special_rows is active, target 0: checked against the reference elsewhere.)"""
    case = random_case()
    R = case["logits"].shape[0]
    full = {k: v if k == "gt_masks" else v[:-1] for k, v in add_special_rows(case).items()}
    got, got_grad = run(full)
    want, want_grad = run(case)
    torch.testing.assert_close(got, want, **tol(torch.float32))
    torch.testing.assert_close(got_grad[:R], want_grad, **tol(torch.float32))
    assert torch.equal(got_grad[R:], torch.zeros_like(got_grad[R:]))
    # All slots padded: 0, zero gradient.
    got, got_grad = run(dict(case, weights=torch.zeros(R)))
    assert got.item() == 0.0 and torch.equal(got_grad, torch.zeros_like(got_grad))


def test_mask_sizes_are_clamped(backend: str) -> None:
    """mask_sizes beyond the padded masks are clamped to them; a zero size samples nothing (target 0)."""
    case = random_case(dtype=torch.float64, box_dtype=torch.float64)
    case["mask_sizes"] = torch.tensor([[0, 11], [9 + 7, 11 + 3]])
    want, want_grad = ref_mask_loss(case, scale=6 * 5 * 5)
    got, got_grad = run(case, 6 * 5 * 5)
    torch.testing.assert_close(got, want, **tol(torch.float64))
    torch.testing.assert_close(got_grad, want_grad, **tol(torch.float64))
    _, full_grad = run(dict(case, mask_sizes=torch.tensor([[9, 11], [9, 11]])), 6 * 5 * 5)
    on_image_1 = case["image_idx"] == 1
    torch.testing.assert_close(got_grad[on_image_1], full_grad[on_image_1], rtol=0, atol=0)


def test_no_rois(backend: str) -> None:
    case = random_case(R=0)
    got, got_grad = run(case)
    assert got.item() == 0.0 and got_grad.shape == (0, 3, 5, 5)


def test_weights_scale_invariant(backend: str) -> None:
    case = random_case()
    want, want_grad = run(case)
    got, got_grad = run(dict(case, weights=case["weights"] * 7.0))
    torch.testing.assert_close(got, want, **tol(torch.float32))
    torch.testing.assert_close(got_grad, want_grad, **tol(torch.float32))


def test_layouts_match_contiguous(backend: str) -> None:
    """Permuted / strided logits, boxes, masks and indices are read through their strides."""
    case = random_case(with_sizes=True)
    want, want_grad = run(case)
    R, K, M, _ = case["logits"].shape
    logits = torch.empty(R, M, M, 2 * K).permute(0, 3, 1, 2)[:, ::2]  # channels-last-like and sliced
    logits.copy_(case["logits"])
    boxes = torch.empty(R, 8)[:, 1:8:2]
    boxes.copy_(case["boxes"])
    masks = torch.empty(case["gt_masks"].shape[::-1], dtype=torch.uint8).permute(3, 2, 1, 0)
    masks.copy_(case["gt_masks"])
    strided = {k: torch.stack([v, v], -1)[..., 0] for k, v in case.items() if k not in ("logits", "boxes", "gt_masks")}
    other = dict(case, logits=logits, boxes=boxes, gt_masks=masks, **strided)
    assert not logits.is_contiguous() and not boxes.is_contiguous() and not masks.is_contiguous()
    got, got_grad = run(other)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)


def test_deterministic(backend: str) -> None:
    case = random_case()
    a, ga = run(case)
    b, gb = run(case)
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_adaptive_grid_cap() -> None:
    """An absurd finite box takes at most 1024 samples per bin side (torch path: the interpreter would take
    minutes for 1024^2 samples)."""
    case = random_case(R=1)
    case["boxes"] = torch.tensor([[-1e9, -1e9, 1e9, 1e9]])
    with use_backend("torch"):
        got, _ = run(case)
    assert torch.isfinite(got)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    R=st.integers(1, 4),
    K=st.integers(1, 5),
    M=st.integers(1, 7),
    hw=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    binarize=st.booleans(),
    aligned=st.booleans(),
    sampling_ratio=st.sampled_from([-1, 0, 1, 3]),
    backend_name=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(R, K, M, hw, binarize, aligned, sampling_ratio, backend_name, seed) -> None:
    torch.manual_seed(seed)
    case = random_case(R=R, K=K, M=M, H=hw[0], W=hw[1], dtype=torch.float64, box_dtype=torch.float64)
    want, want_grad = ref_mask_loss(case, binarize, aligned, sampling_ratio, R * M * M)
    with use_backend(backend_name):
        got, got_grad = run(case, R * M * M, binarize=binarize, aligned=aligned, sampling_ratio=sampling_ratio)
    torch.testing.assert_close(got, want, **tol(torch.float64))
    torch.testing.assert_close(got_grad, want_grad, **tol(torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# Autograd, registration, compile, errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binarize", [False, True])
def test_gradcheck(backend: str, binarize: bool) -> None:
    case = random_case(R=2, K=3, M=4, B=1, G=2, H=8, W=8, dtype=torch.float64)
    logits = case["logits"].requires_grad_(True)
    args = [case[k] for k in ("boxes", "gt_masks", "image_idx", "matched_idx", "labels", "weights")]
    fn = lambda x: mask_loss(x, *args, binarize=binarize)
    # fast_mode (a random projection of the Jacobian): the full check evaluates the loss 2 * 96 times, ~10 s
    # under the interpreter; test_matches_reference compares every gradient entry anyway.
    assert torch.autograd.gradcheck(fn, (logits,), fast_mode=True)


def op_args(requires_grad: bool = True) -> tuple:
    case = random_case(R=3, K=3, M=4, B=2, G=2, H=7, W=6, with_sizes=True)
    logits = case["logits"].requires_grad_(requires_grad)
    return (
        logits, case["boxes"], case["gt_masks"], case["image_idx"], case["matched_idx"], case["labels"],
        case["weights"], case["mask_sizes"], False, False, -1,
    )  # fmt: skip


def test_opcheck(backend: str) -> None:
    args = op_args()
    torch.library.opcheck(torch.ops.mrcnn.mask_loss.default, args)
    _, dlogits, weight_sum = torch.ops.mrcnn.mask_loss(*op_args(False))
    bwd_args = (torch.tensor(2.0), dlogits, weight_sum, args[5], 3, torch.float32)
    torch.library.opcheck(torch.ops.mrcnn.mask_loss_backward.default, bwd_args)


def test_compile_fullgraph(backend: str) -> None:
    case = random_case(R=3, K=3, M=4, with_sizes=True)
    keys = ("boxes", "gt_masks", "image_idx", "matched_idx", "labels", "weights")

    def fused(x: torch.Tensor) -> torch.Tensor:
        return mask_loss(x, *[case[k] for k in keys], mask_sizes=case["mask_sizes"], binarize=True)

    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    want, want_grad = loss_and_grad(fused, case["logits"])
    got, got_grad = loss_and_grad(compiled, case["logits"])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)

    logits, *lists = torchvision_case(num_images=2, M=4, K=3)
    compiled = torch.compile(maskrcnn_loss, fullgraph=True, backend="aot_eager")
    want, want_grad = loss_and_grad(maskrcnn_loss, logits, *lists)
    got, got_grad = loss_and_grad(compiled, logits, *lists)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)


def test_bad_arguments_name_the_argument() -> None:
    case = random_case(R=3)

    def call(**overrides):
        c = dict(case, **overrides)
        kwargs = {k: c.pop(k) for k in ("mask_sizes", "sampling_ratio") if k in c}
        return mask_loss(
            c["logits"], c["boxes"], c["gt_masks"], c["image_idx"], c["matched_idx"], c["labels"], c["weights"],
            **kwargs,
        )  # fmt: skip

    bad = [
        (dict(logits=case["logits"][0]), ValueError, "logits"),
        (dict(logits=case["logits"][..., :4]), ValueError, "logits"),
        (dict(logits=case["logits"].to(torch.int32)), TypeError, "logits"),
        (dict(boxes=case["boxes"][:, :3]), ValueError, "boxes"),
        (dict(boxes=case["boxes"][:2]), ValueError, "boxes"),
        (dict(boxes=case["boxes"].to(torch.int64)), TypeError, "boxes"),
        (dict(gt_masks=case["gt_masks"][0]), ValueError, "gt_masks"),
        (dict(gt_masks=case["gt_masks"].to(torch.int32)), TypeError, "gt_masks"),
        (dict(image_idx=case["image_idx"].float()), TypeError, "image_idx"),
        (dict(matched_idx=case["matched_idx"][:2]), ValueError, "matched_idx"),
        (dict(labels=case["labels"][:, None]), ValueError, "labels"),
        (dict(weights=case["weights"][:1]), ValueError, "weights"),
        (dict(weights=case["weights"].to(torch.int64)), TypeError, "weights"),
        (dict(mask_sizes=torch.ones(3, 2, dtype=torch.int64)), ValueError, "mask_sizes"),
        (dict(mask_sizes=torch.ones(2, 2)), TypeError, "mask_sizes"),
        (dict(sampling_ratio=2.0), TypeError, "sampling_ratio"),
        (dict(boxes=case["boxes"].to("meta")), ValueError, "boxes"),
    ]
    for overrides, error, name in bad:
        with pytest.raises(error, match=name):
            call(**overrides)


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_coco_shapes_match_torchvision(dtype: torch.dtype) -> None:
    """256 positives x 80 classes x 28 x 28 on two 800 x 1216 / 800 x 1088 images, against torchvision in fp32
    on the same (rounded) logits."""
    proposals, gt_masks, gt_labels, idxs = [], [], [], []
    for H, W in [(800, 1216), (800, 1088)]:
        G, P = 12, 128
        blocks = torch.rand(G, H // 8, W // 8, device="cuda") > 0.5  # masks with 8-pixel structure
        gt_masks.append(blocks.repeat_interleave(8, 1).repeat_interleave(8, 2).to(torch.uint8))
        xy = torch.rand(P, 2, device="cuda") * torch.tensor([W, H], device="cuda") * 0.8
        wh = torch.rand(P, 2, device="cuda") * 300 + 8
        proposals.append(torch.cat([xy, xy + wh], 1))
        gt_labels.append(torch.randint(1, 80, (G,), device="cuda"))
        idxs.append(torch.randint(0, G, (P,), device="cuda"))
    logits = torch.randn(256, 80, 28, 28, device="cuda").to(dtype)
    want, want_grad = loss_and_grad(tv_maskrcnn_loss, logits.float(), proposals, gt_masks, gt_labels, idxs)
    got, got_grad = loss_and_grad(maskrcnn_loss, logits, proposals, gt_masks, gt_labels, idxs)
    scale = 256 * 28 * 28
    torch.testing.assert_close(got.float(), want, **tol(dtype))
    # At one pixel's scale the gradient is sigmoid(x) - target. Two terms beyond the dtype's rounding: targets
    # sampled at float32 coordinates up to 1216 px (ours and torchvision's round differently; measured on an
    # H200: 6.1e-5 for float32), and, in fp16, gradients of ~5e-6 that are subnormal (measured: 6.0e-3 scaled).
    rtol, atol = tol(dtype).values()
    atol += coordinate_atol(1216) + subnormal_atol(dtype) * scale
    torch.testing.assert_close(got_grad.float() * scale, want_grad * scale, rtol=rtol, atol=atol)
