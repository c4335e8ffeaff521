"""NMS (kernels.nms): both backends against hand-computed cases, a naive float64 greedy loop and torchvision's
nms / batched_nms, for nms, batched_nms and the fixed-size nms_fixed.

Every test runs on the Triton kernels (through the interpreter on CPU) and on the torch path, chosen by the
``backend`` fixture. N stays at a few hundred: the IoU-mask grid is ceil(N/64)^2 programs per row and the
sweep walks N/64 blocks of 64 interpreted steps.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import use_backend
from kernels.nms import batched_nms, nms, nms_fixed

BACKENDS = ("triton", "torch")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest):
    with use_backend(request.param):
        yield request.param


def clustered_boxes(n: int, dtype: torch.dtype = torch.float32, clusters: int = 6, grid: float | None = None):
    """[n, 4] boxes jittered around a few clusters, so that many IoUs lie near any threshold. With ``grid``, the
    coordinates are multiples of it (exact in the dtype, and after torchvision's class offsets)."""
    centres = torch.rand(clusters, 2, dtype=torch.float64) * 200
    which = torch.randint(0, clusters, (n,))
    ctr = centres[which] + torch.randn(n, 2, dtype=torch.float64) * 6
    size = torch.rand(n, 2, dtype=torch.float64) * 40 + 10
    boxes = torch.cat([ctr - size / 2, ctr + size / 2], dim=1)
    if grid is not None:
        boxes = torch.round(boxes / grid) * grid
    return boxes.to(dtype)


def iou64(a: list[float], b: list[float]) -> float:
    """torchvision's CPU IoU in Python floats (float64): max(0, sides), areas, inter / (area_a + area_b - inter)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def naive_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float, idxs: torch.Tensor | None = None) -> list[int]:
    """Greedy NMS, a plain loop in float64, equal scores taken by increasing index (torchvision's stable sort)."""
    b, s = boxes.double().tolist(), scores.double().tolist()
    cls = idxs.tolist() if idxs is not None else [0] * len(b)
    order = sorted(range(len(b)), key=lambda i: (-s[i], i))
    kept: list[int] = []
    for i in order:
        if all(cls[k] != cls[i] or not iou64(b[k], b[i]) > thr for k in kept):
            kept.append(i)
    return kept


def padded(indices: list[int] | torch.Tensor, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``indices`` truncated to ``max_out`` and padded with 0 / False, as nms_fixed returns a row."""
    idx = torch.as_tensor(indices, dtype=torch.int64)[:max_out]
    keep = torch.zeros(max_out, dtype=torch.int64)
    keep[: len(idx)] = idx
    return keep, torch.arange(max_out) < len(idx)


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed cases.
#
# A = (0, 0, 10, 10), B = (1, 1, 11, 11), C = (20, 20, 30, 30), scores 0.9, 0.8, 0.7.
# IoU(A, B) = 9*9 / (100 + 100 - 81) = 81/119 = 0.6807; C overlaps nothing.
# Threshold 0.5 keeps [A, C]; 0.7 keeps [A, B, C].
#
# Threshold exactly at an IoU: D = (0, 0, 5, 1), E = (2, 0, 10, 1): inter 3, areas 5 and 8, IoU = 3/10. In
# float32 3/10 rounds to 0.30000001192..., which torchvision's CPU kernel compares with the float64 0.3:
# greater, so E is suppressed. In float64 3/10 == 0.3: not greater, E is kept. (torchvision's CUDA kernel
# compares with float(0.3) and keeps E in float32 too.)
# ---------------------------------------------------------------------------------------------------------------


def test_golden(backend):
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert nms(boxes, scores, 0.7).tolist() == [0, 1, 2]
    assert nms(boxes, scores.flip(0), 0.5).tolist() == [2, 1]
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1, 2]
    keep, keep_valid = nms_fixed(boxes[None], scores[None], 0.5, 4)
    assert keep.tolist() == [[0, 2, 0, 0]] and keep_valid.tolist() == [[True, True, False, False]]


def test_threshold_compared_as_torchvision_cpu(backend):
    boxes = torch.tensor([[0.0, 0, 5, 1], [2, 0, 10, 1]])
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.3).tolist() == [0] == torchvision.ops.nms(boxes, scores, 0.3).tolist()
    b64, s64 = boxes.double(), scores.double()
    assert nms(b64, s64, 0.3).tolist() == [0, 1] == torchvision.ops.nms(b64, s64, 0.3).tolist()


# ---------------------------------------------------------------------------------------------------------------
# nms / batched_nms against torchvision
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 65, 150])
@pytest.mark.parametrize("thr", [0.0, 0.5, 1.0])
def test_nms_matches_torchvision(backend, dtype, n, thr):
    boxes, scores = clustered_boxes(n, dtype), torch.rand(n, dtype=dtype)
    out = nms(boxes, scores, thr)
    assert out.dtype == torch.int64
    assert torch.equal(out, torchvision.ops.nms(boxes, scores, thr))
    if dtype == torch.float64:
        assert out.tolist() == naive_nms(boxes, scores, thr)


def test_nms_thresholds(backend):
    """Many thresholds, including ones torchvision compares differently in float32 and float64."""
    boxes, scores = clustered_boxes(120, grid=0.5), torch.rand(120)
    for thr in (0.1, 0.25, 0.3, 1 / 3, 0.45, 0.6, 0.7, 0.95, -0.5, float("nan")):
        assert torch.equal(nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr)), thr


def test_ties_and_duplicates_match_torchvision(backend):
    """Equal scores (8 levels) and exact duplicate boxes: torchvision sorts stably (ties by index), as we do,
    so even tie-breaking matches; the naive loop breaks ties by index too."""
    n = 140
    boxes = clustered_boxes(n, grid=1.0)
    boxes[70:] = boxes[:70]
    scores = torch.randint(0, 8, (n,)).float() / 8
    ref = torchvision.ops.nms(boxes, scores, 0.5)
    assert torch.equal(nms(boxes, scores, 0.5), ref)
    assert ref.tolist() == naive_nms(boxes, scores, 0.5)
    idxs = torch.randint(0, 3, (n,))
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.5), torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))


def test_nan_scores_and_boxes(backend):
    """NaN scores sort first and are kept first; a box with a NaN coordinate neither suppresses nor is
    suppressed (NaN area, so every IoU comparison is False) -- both as in torchvision."""
    n = 90
    boxes, scores = clustered_boxes(n), torch.rand(n)
    scores[[5, 40]] = float("nan")
    boxes[7, 2] = float("nan")
    boxes[8] = boxes[9]  # 8 and 9 identical; 8's twin below gets a NaN coordinate
    boxes[9, 0] = float("nan")
    scores[9] = 1.5
    out = nms(boxes, scores, 0.5)
    assert torch.equal(out, torchvision.ops.nms(boxes, scores, 0.5))
    assert sorted(out[:2].tolist()) == [5, 40] and out[2].item() == 9
    assert 7 in out.tolist() and 8 in out.tolist()


def test_empty_and_one(backend):
    out = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert out.shape == (0,) and out.dtype == torch.int64
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).shape == (0,)
    assert nms(torch.tensor([[1.0, 2, 3, 4]]), torch.tensor([0.3]), 0.5).tolist() == [0]
    keep, keep_valid = nms_fixed(torch.zeros(2, 0, 4), torch.zeros(2, 0), 0.5, 3)
    assert keep.tolist() == [[0] * 3] * 2 and not keep_valid.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_nms_matches_torchvision(backend, dtype):
    """Coordinates on a 1/8 grid: torchvision's class offsets are exact, so its coordinate trick decides as our
    class-aware mask."""
    n = 200
    boxes, scores = clustered_boxes(n, dtype, grid=0.125), torch.rand(n, dtype=dtype)
    idxs = torch.randint(0, 4, (n,))
    out = batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(out, torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))
    if dtype == torch.float64:
        assert out.tolist() == naive_nms(boxes, scores, 0.5, idxs)


def test_batched_nms_matches_torchvision_vanilla_path(backend):
    """Above 4000 coordinates torchvision's CPU batched_nms runs nms per class (its vanilla path)."""
    n = 1100
    boxes, scores = clustered_boxes(n, clusters=30), torch.rand(n)
    idxs = torch.randint(0, 5, (n,), dtype=torch.int32)
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.6), torchvision.ops.batched_nms(boxes, scores, idxs, 0.6))


def tied_batch(n: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` boxes on a 1/8 grid (torchvision's class offsets exact) with 4 score levels (ties everywhere) in 7
    classes."""
    boxes = clustered_boxes(n, clusters=max(6, n // 25), grid=0.125) * (1 + n // 2000)
    return boxes.to(device), (torch.randint(0, 4, (n,)).float() / 4).to(device), torch.randint(0, 7, (n,)).to(device)


def stable_order(keep: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``keep``'s indices by decreasing score, equal scores by increasing index (nms's order)."""
    keep = keep.sort()[0]
    return keep[torch.sort(scores[keep], descending=True, stable=True)[1]]


@pytest.mark.parametrize("n", [1000, 1001])
def test_batched_nms_tie_order_at_torchvision_threshold(backend, n):
    """torchvision's CPU batched_nms: up to 1000 boxes (4000 coordinates) its coordinate trick, so nms's stable
    order; above, nms per class and then its kept indices re-sorted by score with torch's unstable sort, which
    reorders equal scores. Ours gives its indices in its order on both sides, ties included."""
    boxes, scores, idxs = tied_batch(n)
    ref = torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.5), ref)
    if n > 1000:  # what the README says of torchvision: its re-sort moves equal scores out of index order
        assert not torch.equal(ref, stable_order(ref, scores))
    else:
        assert torch.equal(ref, stable_order(ref, scores))


@pytest.mark.parametrize("n", [3000, 20000])
def test_batched_nms_tie_order_large(n):
    """The torch path (the CPU drop-in) at sizes where torchvision runs per class, ties included."""
    boxes, scores, idxs = tied_batch(n)
    with use_backend("torch"):
        assert torch.equal(batched_nms(boxes, scores, idxs, 0.5), torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(backend, dtype):
    """torchvision's CPU nms has no half kernel. On integer coordinates <= 64 every side and area is exact in
    any dtype, so the half result must equal torchvision's float32 one."""
    n = 130
    boxes = clustered_boxes(n, grid=1.0).clamp(0, 64)
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    scores = torch.rand(n)
    ref = torchvision.ops.nms(boxes, scores, 0.5)
    assert torch.equal(nms(boxes.to(dtype), scores, 0.5), ref)
    ref = torchvision.ops.nms(boxes, scores.to(dtype).float(), 0.5)
    assert torch.equal(nms(boxes.to(dtype), scores.to(dtype), 0.5), ref)


def test_half_backends_agree():
    """Random float16 boxes (sides rounded to float16, as torchvision's CUDA kernel): both paths decide alike."""
    boxes, scores = clustered_boxes(100, torch.float16), torch.rand(100)
    with use_backend("torch"):
        ref = nms(boxes, scores, 0.5)
    with use_backend("triton"):
        assert torch.equal(nms(boxes, scores, 0.5), ref)


def test_non_contiguous(backend):
    n = 80
    store = torch.zeros(n, 7)
    store[:, 2:6] = clustered_boxes(n)
    boxes = store[:, 2:6]
    scores = torch.rand(2 * n)[::2]
    assert not boxes.is_contiguous() and not scores.is_contiguous()
    assert torch.equal(nms(boxes, scores, 0.5), torchvision.ops.nms(boxes.contiguous(), scores.contiguous(), 0.5))
    batch = torch.zeros(n, 2, 4)
    batch[:, 0] = boxes.flip(0)
    batch[:, 1] = boxes
    batch_scores = torch.rand(n, 2)
    keep, keep_valid = nms_fixed(batch.transpose(0, 1), batch_scores.t(), 0.5, n)  # strides (4, 8, 1), (1, 2)
    ref = nms_fixed(batch.transpose(0, 1).contiguous(), batch_scores.t().contiguous(), 0.5, n)
    assert torch.equal(keep, ref[0]) and torch.equal(keep_valid, ref[1])


def test_bad_input_names_the_argument():
    boxes, scores = torch.zeros(3, 4), torch.zeros(3)
    with pytest.raises(ValueError, match="boxes"):
        nms(torch.zeros(3, 5), scores, 0.5)
    with pytest.raises(ValueError, match="scores"):
        nms(boxes, torch.zeros(4), 0.5)
    with pytest.raises(TypeError, match="boxes"):
        nms(boxes.long(), scores, 0.5)
    with pytest.raises(ValueError, match="idxs"):
        batched_nms(boxes, scores, torch.zeros(2, dtype=torch.int64), 0.5)
    with pytest.raises(TypeError, match="idxs"):
        batched_nms(boxes, scores, torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="valid"):
        nms_fixed(boxes[None], scores[None], 0.5, 2, valid=torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="valid"):
        nms_fixed(boxes[None], scores[None], 0.5, 2, valid=torch.ones(1, 3))
    with pytest.raises(ValueError, match="max_out"):
        nms_fixed(boxes[None], scores[None], 0.5, -1)
    with pytest.raises(ValueError, match="scores"):
        nms_fixed(boxes[None], scores, 0.5, 2)


# ---------------------------------------------------------------------------------------------------------------
# nms_fixed
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_out", [0, 7, 64, 200])
def test_fixed_matches_torchvision(backend, max_out):
    """Each row: torchvision's nms of the row's valid boxes (batched_nms with idxs), as row indices,
    truncated to max_out and padded with 0 / False."""
    B, N = 3, 150
    boxes = torch.stack([clustered_boxes(N, grid=0.125) for _ in range(B)])
    scores = torch.rand(B, N)
    valid = torch.rand(B, N) > 0.2
    valid[2] = True
    idxs = torch.randint(0, 3, (B, N))
    for kwargs in ({}, {"valid": valid}, {"valid": valid, "idxs": idxs}):
        keep, keep_valid = nms_fixed(boxes, scores, 0.5, max_out, **kwargs)
        assert keep.shape == keep_valid.shape == (B, max_out) and keep.dtype == torch.int64
        for b in range(B):
            rows = torch.nonzero(kwargs["valid"][b])[:, 0] if "valid" in kwargs else torch.arange(N)
            if "idxs" in kwargs:
                kept = torchvision.ops.batched_nms(boxes[b, rows], scores[b, rows], idxs[b, rows], 0.5)
            else:
                kept = torchvision.ops.nms(boxes[b, rows], scores[b, rows], 0.5)
            ref_keep, ref_valid = padded(rows[kept], max_out)
            assert torch.equal(keep[b], ref_keep) and torch.equal(keep_valid[b], ref_valid), (kwargs.keys(), b)


def test_fixed_invalid_boxes_neither_kept_nor_suppress(backend):
    """Box 0 (invalid, best score) covers box 1 exactly: box 1 must survive, box 0 must not appear."""
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60]]])
    scores = torch.tensor([[0.9, 0.8, 0.7, float("nan")]])
    valid = torch.tensor([[False, True, True, False]])
    keep, keep_valid = nms_fixed(boxes, scores, 0.5, 4, valid=valid)
    assert keep.tolist() == [[1, 0, 0, 0]] and keep_valid.tolist() == [[True, False, False, False]]
    keep, keep_valid = nms_fixed(boxes, scores, 0.5, 4)
    assert keep.tolist() == [[3, 0, 0, 0]] and keep_valid.tolist() == [[True, True, False, False]]


def test_fixed_ties_match_torchvision(backend):
    """Rows sort stably, as torchvision's 1-D sort: equal scores by increasing index."""
    B, N = 2, 130
    boxes = torch.stack([clustered_boxes(N, grid=1.0) for _ in range(B)])
    boxes[:, 65:] = boxes[:, :65]
    scores = torch.randint(0, 6, (B, N)).float()
    keep, keep_valid = nms_fixed(boxes, scores, 0.4, N)
    for b in range(B):
        ref_keep, ref_valid = padded(torchvision.ops.nms(boxes[b], scores[b], 0.4), N)
        assert torch.equal(keep[b], ref_keep) and torch.equal(keep_valid[b], ref_valid)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    boxes=st.lists(
        st.tuples(st.integers(0, 40), st.integers(0, 40), st.integers(1, 30), st.integers(1, 30)),
        min_size=1, max_size=70,
    ),
    thr=st.sampled_from([0.0, 0.2, 0.5, 0.8]),
    num_classes=st.integers(1, 3),
    data=st.data(),
)  # fmt: skip
def test_greedy_invariants(backend, boxes, thr, num_classes, data):
    """The defining properties of greedy NMS, with float64 IoUs: kept boxes come by decreasing score, no kept
    box suppresses a later kept box of its class, and every dropped box is suppressed by a kept box of its class
    with a higher score."""
    n = len(boxes)
    b = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes], dtype=torch.float64)
    scores = torch.tensor(data.draw(st.permutations(range(n))), dtype=torch.float64)  # distinct
    idxs = torch.tensor(data.draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n)))
    kept = batched_nms(b, scores, idxs, thr).tolist()
    rows, s, c = b.tolist(), scores.tolist(), idxs.tolist()
    assert all(s[i] > s[j] for i, j in zip(kept, kept[1:], strict=False))
    for pos, j in enumerate(kept):
        assert not any(c[i] == c[j] and iou64(rows[i], rows[j]) > thr for i in kept[:pos])
    for j in set(range(n)) - set(kept):
        assert any(c[i] == c[j] and s[i] > s[j] and iou64(rows[i], rows[j]) > thr for i in kept)


# ---------------------------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------------------------------------------


def test_opcheck(backend):
    boxes, scores = clustered_boxes(40), torch.rand(40)
    idxs = torch.randint(0, 3, (40,))
    torch.library.opcheck(torch.ops.mrcnn.nms.default, (boxes, scores, None, 0.5))
    torch.library.opcheck(torch.ops.mrcnn.nms.default, (boxes, scores, idxs, 0.5))
    bb, ss = torch.stack([boxes, boxes.flip(0)]), torch.stack([scores, scores])
    valid = torch.rand(2, 40) > 0.3
    torch.library.opcheck(torch.ops.mrcnn.nms_fixed.default, (bb, ss, 0.5, 25, None, None))
    torch.library.opcheck(torch.ops.mrcnn.nms_fixed.default, (bb, ss, 0.5, 25, valid, torch.stack([idxs, idxs])))


def test_compile_fullgraph(backend):
    B, N = 2, 70
    boxes = torch.stack([clustered_boxes(N) for _ in range(B)])
    scores, valid = torch.rand(B, N), torch.rand(B, N) > 0.1

    def fixed(boxes, scores, valid):
        keep, keep_valid = nms_fixed(boxes, scores, 0.5, 32, valid=valid)
        kept_scores = torch.where(keep_valid, scores.gather(1, keep), 0.0)
        return keep, keep_valid, kept_scores

    compiled = torch.compile(fixed, fullgraph=True, backend="aot_eager")
    for got, ref in zip(compiled(boxes, scores, valid), fixed(boxes, scores, valid), strict=True):
        assert torch.equal(got, ref)
    flat = torch.compile(lambda b, s: nms(b, s, 0.5), fullgraph=True, backend="aot_eager")
    assert torch.equal(flat(boxes[0], scores[0]), torchvision.ops.nms(boxes[0], scores[0], 0.5))


def test_compile_inductor():
    B, N = 2, 60
    boxes, scores = torch.stack([clustered_boxes(N) for _ in range(B)]), torch.rand(B, N)
    fn = lambda b, s: nms_fixed(b, s * 2.0, 0.5, 20)
    for got, ref in zip(torch.compile(fn, fullgraph=True)(boxes, scores), fn(boxes, scores), strict=True):
        assert torch.equal(got, ref)


# ---------------------------------------------------------------------------------------------------------------
# CUDA: parity with torchvision's CUDA kernel at RPN sizes, no host synchronisation, CUDA graphs
# ---------------------------------------------------------------------------------------------------------------


def rpn_like(batch: int, per_level: int, levels: int, device: str):
    """RPN-like inputs: per image, ``levels * per_level`` proposals with their level as class."""
    n = per_level * levels
    # A 1/8 grid: torchvision's class offsets stay exact (see test_batched_nms_matches_torchvision).
    boxes = torch.stack([clustered_boxes(n, clusters=200, grid=0.125) * 4 for _ in range(batch)]).to(device)
    scores = torch.rand(batch, n, device=device)
    levels_idx = torch.arange(levels, device=device).repeat_interleave(per_level)[None].expand(batch, n)
    return boxes, scores, levels_idx.contiguous()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_matches_torchvision(dtype):
    boxes, scores, idxs = rpn_like(2, 2000, 5, "cuda")
    boxes = boxes.to(dtype)
    for b in range(2):
        assert torch.equal(nms(boxes[b], scores[b], 0.7), torchvision.ops.nms(boxes[b], scores[b], 0.7))
    if dtype == torch.float32:
        keep, keep_valid = nms_fixed(boxes, scores, 0.7, 1000, idxs=idxs)
        for b in range(2):
            ref = torchvision.ops.batched_nms(boxes[b], scores[b], idxs[b], 0.7)
            assert torch.equal(batched_nms(boxes[b], scores[b], idxs[b], 0.7), ref)
            assert torch.equal(keep[b][keep_valid[b]], ref[:1000])


@pytest.mark.cuda
@pytest.mark.parametrize("n", [25000, 25001])
def test_cuda_batched_nms_tie_order_at_torchvision_threshold(n):
    """On CUDA torchvision's batched_nms runs per class above 100000 coordinates (25000 boxes) and re-sorts as on
    the CPU: ours gives its indices in its order on both sides, ties included."""
    boxes, scores, idxs = tied_batch(n, "cuda")
    ref = torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.5), ref)


@pytest.mark.cuda
def test_cuda_fixed_no_host_sync_and_cuda_graph():
    boxes, scores, idxs = rpn_like(2, 2000, 5, "cuda")
    valid = torch.rand(scores.shape, device="cuda") > 0.05
    ref = nms_fixed(boxes, scores, 0.7, 1000, valid=valid, idxs=idxs)  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        nms_fixed(boxes, scores, 0.7, 1000, valid=valid, idxs=idxs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    static = [t.clone() for t in (boxes, scores, valid, idxs)]
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        nms_fixed(static[0], static[1], 0.7, 1000, valid=static[2], idxs=static[3])
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        out = nms_fixed(static[0], static[1], 0.7, 1000, valid=static[2], idxs=static[3])
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(o, r) for o, r in zip(out, ref, strict=True))
    new = rpn_like(2, 2000, 5, "cuda")
    for dst, src in zip(static, (*new[:2], valid, new[2]), strict=True):
        dst.copy_(src)
    graph.replay()
    expected = nms_fixed(*new[:2], 0.7, 1000, valid=valid, idxs=new[2])
    assert all(torch.equal(o, r) for o, r in zip(out, expected, strict=True))
