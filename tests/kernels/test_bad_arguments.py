"""Hostile op arguments: absurd sampling ratios, scales and paddings are refused with an error naming
the argument; coordinates that overflow once scaled give the documented zeros on both backends; and over a space
of hostile RoIAlign calls the Triton kernels (interpreter) and the torch path agree, on a value or on the error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import (
    batched_nms,
    decode_boxes,
    mask_loss,
    multiscale_roi_align,
    paste_masks_in_image,
    roi_align,
    use_backend,
)
from kernels._contract import MAX_SAMPLES_PER_SIDE
from kernels.paste_masks import MAX_PADDING
from kernels.roi_align import MultiScaleRoIAlign, RoIAlign

# The interpreter emulates float ops with numpy, which warns on the overflowing and non-finite coordinates.
pytestmark = pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")

BACKENDS = ("triton", "torch")
F32_MAX = torch.finfo(torch.float32).max


def _features(levels: int = 1) -> list[torch.Tensor]:
    return [torch.randn(1, 2, 16 >> i, 16 >> i) for i in range(levels)]


def _mask_loss_call(sampling_ratio: object) -> torch.Tensor:
    return mask_loss(torch.randn(1, 2, 4, 4), torch.tensor([[0.0, 0, 8, 8]]), torch.ones(1, 1, 8, 8),
                     torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                     torch.ones(1, dtype=torch.int64), torch.ones(1), sampling_ratio=sampling_ratio)  # fmt: skip


SAMPLING_CALLS = {
    "roi_align": lambda sr: roi_align(_features()[0], torch.tensor([[0.0, 0, 0, 8, 8]]), 2, 1.0, sr),
    "RoIAlign": lambda sr: RoIAlign(2, 1.0, sr)(_features()[0], torch.tensor([[0.0, 0, 0, 8, 8]])),
    "op": lambda sr: torch.ops.mrcnn.multiscale_roi_align(_features(), torch.tensor([[0.0, 0, 0, 8, 8]]), None, [1.0],
                                                          2, 2, sr, False, "avg", 224.0, 4.0)[0],  # fmt: skip
    "multiscale": lambda sr: multiscale_roi_align(_features(2), torch.tensor([[0.0, 0, 0, 8, 8]]), 2, [1.0, 0.5], sr),
    "MultiScaleRoIAlign": lambda sr: MultiScaleRoIAlign(["a"], 2, sr)(
        {"a": _features()[0]}, [torch.tensor([[0.0, 0, 8, 8]])], [(16, 16)]
    ),
    "mask_loss": _mask_loss_call,
}


@pytest.mark.parametrize("call", SAMPLING_CALLS.values(), ids=SAMPLING_CALLS.keys())
def test_sampling_ratio_is_bounded_and_an_int(backend_name: str, call) -> None:
    with use_backend(backend_name):
        with pytest.raises(ValueError, match=f"sampling_ratio must be <= {MAX_SAMPLES_PER_SIDE}"):
            call(10**6)
        if call is not SAMPLING_CALLS["op"]:  # the registered op's schema already refuses a float
            with pytest.raises(TypeError, match="sampling_ratio must be an int"):
                call(2.5)
        assert torch.isfinite(call(np.int64(2))).all()  # numpy ints are ints


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_coordinates_overflowing_once_scaled_give_zeros(backend_name: str, pool_mode: str, sampling_ratio: int) -> None:
    """Finite float32 boxes whose scaled coordinates or sizes overflow (3e38 * 4 = inf; -3e38 .. 3e38 spans inf)
    pool zeros and get no gradient, like non-finite boxes, on both backends; a normal RoI beside them pools."""
    x = torch.randn(2, 3, 9, 11, requires_grad=True)
    rois = torch.tensor([
        [0, 3e38, 1.0, 3.2e38, 5.0],
        [1, 1.0, -3e38, 5.0, 3e38],
        [0, -F32_MAX, -F32_MAX, F32_MAX, F32_MAX],
        [1, 0.2, 0.3, 2.0, 1.9],  # 0.8 .. 8 x 1.2 .. 7.6 on the map: pools
    ])  # fmt: skip
    with use_backend(backend_name):
        out = roi_align(x, rois, 3, 4.0, sampling_ratio, pool_mode=pool_mode)
        (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))
    assert out[3].abs().sum() > 0 and torch.isfinite(grad).all()
    with use_backend(backend_name):
        (grad_bad,) = torch.autograd.grad(roi_align(x, rois[:3], 3, 4.0, sampling_ratio, pool_mode=pool_mode), x,
                                          torch.ones(3, 3, 3, 3))  # fmt: skip
    assert torch.equal(grad_bad, torch.zeros_like(grad_bad))


@pytest.mark.parametrize("scale", [math.inf, math.nan, 0.0, -0.25, 1e39, 1e-39])
def test_spatial_scale_outside_float32s_normal_range_is_refused(scale: float) -> None:
    with pytest.raises(ValueError, match="spatial_scale"):
        roi_align(_features()[0], torch.tensor([[0.0, 0, 0, 8, 8]]), 2, scale)


@pytest.mark.parametrize(
    "scales",
    [[1 / 4, 1 / 16], [1 / 8, 1 / 4], [1 / 4, 1 / 6], [0.3, 0.15], [1 / 4, 1 / 8, 1 / 8]],
    ids=["gap", "coarse-first", "not-power-of-two", "not-power-of-two-pair", "repeated"],
)
def test_multilevel_scales_must_be_a_pyramid(scales: list[float]) -> None:
    features = [torch.randn(1, 2, 8, 8) for _ in scales]
    with pytest.raises(ValueError, match="consecutive powers of two"):
        multiscale_roi_align(features, torch.tensor([[0.0, 0, 0, 8, 8]]), 2, scales)


@pytest.mark.parametrize("canonical", [(0.0, 4.0), (math.nan, 4.0), (math.inf, 4.0), (-224.0, 4.0), (224.0, math.inf)])
def test_canonical_level_mapping_must_be_finite(canonical: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="canonical_scale"):
        multiscale_roi_align(_features(2), torch.tensor([[0.0, 0, 0, 8, 8]]), 2, [1.0, 0.5],
                             canonical_scale=canonical[0], canonical_level=canonical[1])  # fmt: skip


@pytest.mark.parametrize("output_size", [2.5, "7", None, (2, 0), (2, 2, 2), True])
def test_output_size_errors_name_the_argument(output_size: object) -> None:
    with pytest.raises(ValueError, match="output_size"):
        roi_align(_features()[0], torch.tensor([[0.0, 0, 0, 8, 8]]), output_size)


def test_decode_clip_nan_is_refused_and_inf_means_no_clamp() -> None:
    deltas, boxes = torch.tensor([[0.0, 0.0, 50.0, 0.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    with pytest.raises(ValueError, match="clip"):
        decode_boxes(deltas, boxes, (1.0, 1.0, 1.0, 1.0), math.nan)
    assert decode_boxes(deltas, boxes, (1.0, 1.0, 1.0, 1.0), math.inf)[0, 0, 2] > 1e20  # exp(50) unclamped


@pytest.mark.parametrize("padding", [10**8, MAX_PADDING + 1, -1, 1.0])
def test_paste_padding_is_bounded(padding: object) -> None:
    with pytest.raises(ValueError, match="padding"):
        paste_masks_in_image(torch.rand(1, 1, 4, 4), torch.tensor([[0.0, 0, 8, 8]]), (16, 16), padding)


def test_batched_nms_of_nothing_is_empty_whatever_the_scores() -> None:
    """As torchvision: empty boxes give an empty int64 result before scores and idxs are looked at."""
    keep = batched_nms(torch.zeros(0, 4), None, None, 0.5)  # type: ignore[arg-type]
    assert keep.shape == (0,) and keep.dtype == torch.int64


# ---------------------------------------------------------------------------------------------------------------
# The two backends agree on hostile RoIAlign calls: the same value (finite), or the same error type.
# ---------------------------------------------------------------------------------------------------------------

COORDS = st.one_of(
    st.floats(-40, 40, width=32),
    st.sampled_from([0.0, -1.0, 1e30, -1e30, 3e38, -3e38, math.inf, -math.inf, math.nan]),
)


# The interpreter loops over a bin's samples one at a time (~0.1 ms each): an adaptive grid at its cap, 1024^2
# samples per bin, runs for hours, and a hostile box (±1e30) reaches it. Such calls take a fixed ratio instead; the
# cap itself is tested along one axis in test_roi_align.py (1024 samples, ~10 s).
INTERPRETER_SAMPLES_PER_BIN = 256


def _adaptive_samples_per_bin(rois: torch.Tensor, output_size: object, spatial_scale: float, aligned: bool) -> int:
    """The largest adaptive grid (samples per bin) of the call's RoIs, by the documented rule, in float32."""
    if not rois.numel() or not isinstance(output_size, (int, tuple)):
        return 0
    ph, pw = output_size if isinstance(output_size, tuple) else (output_size, output_size)
    if min(ph, pw) <= 0:
        return 0
    with np.errstate(over="ignore", invalid="ignore"):
        xy = rois[:, 1:].numpy() * np.float32(spatial_scale) - np.float32(0.5 if aligned else 0.0)
        w, h = xy[:, 2] - xy[:, 0], xy[:, 3] - xy[:, 1]
    finite = np.isfinite(xy).all(1) & np.isfinite(w) & np.isfinite(h)
    if not aligned:
        w, h = np.maximum(w, 1), np.maximum(h, 1)
    grid = [min(math.ceil(hh / ph), MAX_SAMPLES_PER_SIDE) * min(math.ceil(ww / pw), MAX_SAMPLES_PER_SIDE)
            for hh, ww, ok in zip(h, w, finite, strict=True) if ok and hh > 0 and ww > 0]  # fmt: skip
    return max(grid, default=0)


@st.composite
def hostile_calls(draw) -> dict:
    k = draw(st.integers(0, 3))
    rois = [[float(draw(st.sampled_from([0, 1, -1, 2, 0.5, math.nan])))] + [draw(COORDS) for _ in range(4)]
            for _ in range(k)]  # fmt: skip
    call = dict(
        rois=torch.tensor(rois, dtype=torch.float32).reshape(k, 5),
        output_size=draw(st.sampled_from([1, 2, (1, 3), 0, 2.5])),
        spatial_scale=draw(st.sampled_from([1.0, 0.25, 4.0, 1e30, 1e39, 0.0, math.inf])),
        sampling_ratio=draw(st.sampled_from([-1, 0, 1, 2, MAX_SAMPLES_PER_SIDE + 1])),
        aligned=draw(st.booleans()),
        pool_mode=draw(st.sampled_from(["avg", "max"])),
    )
    adaptive = call["sampling_ratio"] <= 0
    samples = _adaptive_samples_per_bin(call["rois"], call["output_size"], call["spatial_scale"], call["aligned"])
    if adaptive and samples > INTERPRETER_SAMPLES_PER_BIN:
        call["sampling_ratio"] = draw(st.sampled_from([1, 2]))
    return call


def _run(backend: str, x: torch.Tensor, call: dict) -> tuple[str, torch.Tensor | None, torch.Tensor | None]:
    try:
        with use_backend(backend):
            leaf = x.detach().requires_grad_(True)
            out = roi_align(leaf, call["rois"], call["output_size"], call["spatial_scale"], call["sampling_ratio"],
                            call["aligned"], pool_mode=call["pool_mode"])  # fmt: skip
            (grad,) = torch.autograd.grad(out, leaf, torch.ones_like(out), allow_unused=True)
        return "ok", out.detach(), grad
    except (TypeError, ValueError) as error:
        return type(error).__name__, None, None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=hostile_calls())
def test_backends_agree_on_hostile_calls(call: dict) -> None:
    x = torch.randn(2, 2, 5, 7)
    (t_status, t_out, t_grad), (p_status, p_out, p_grad) = _run("triton", x, call), _run("torch", x, call)
    assert t_status == p_status, call
    if t_status == "ok":
        assert torch.isfinite(t_out).all() and torch.isfinite(p_out).all(), call
        torch.testing.assert_close(t_out, p_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t_grad, p_grad, rtol=1e-5, atol=1e-5)
