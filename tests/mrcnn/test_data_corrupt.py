"""Corrupted data files: COCO annotation files with broken polygons, RLEs and fields, and broken or unusual
image files, read through the public API as training reads them (``build_dataset`` and every item) and as
``mrcnn.predict`` does (``read_image``).

Unchecked, such input made pycocotools segfault or allocate until the machine ran out of memory. So the
cases run in subprocesses, a group of cases to one (importing torch is most of a group's time), under an
address-space limit and a timeout: a crash or a hang fails the test of the case it happened in, instead of
the test run. Each case ends in a ``ValueError`` naming the broken file and, for annotation files, the
annotation and image ids (or the field), or in its documented result.
"""

from __future__ import annotations

import io
import json
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

if TYPE_CHECKING:  # the runner's own test imports this module in a subprocess: keep torch out of it
    import torch

ROOT = Path(__file__).resolve().parents[2]
# Importing torch maps ~3.5 GiB of address space; pycocotools' runaway allocations go far past 6 GiB.
MEMORY_LIMIT = 6 << 30
# A group takes 5-15 s, mostly importing torch, on a loaded 2-core machine.
TIMEOUT_S = 240
NAN, INF = float("nan"), float("inf")
H, W = 20, 30  # the image every annotation case refers to


# ---------------------------------------------------------------------------------------------------------
# The subprocess runner


# Starts the child's report lines (a case may print too).
_MARK = "case-report: "


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _run_group(calls: dict[str, dict[str, Any]], timeout_s: float = TIMEOUT_S) -> dict[str, dict[str, Any]]:
    """Run ``calls`` (case name -> call, see ``_child``) in order in one subprocess, under ``MEMORY_LIMIT``
    and ``timeout_s``. Returns each case's outcome: ``{"ok": summary}`` or ``{"error": type, "message": str}``
    as the child reported it; ``{"crashed": how}`` for the case running when the child died or timed out,
    and ``{"not run": why}`` for the cases after it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from {__name__} import _child; _child()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,  # the checkout's mrcnn and tests come first on sys.path
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=_limit_memory,
    )
    try:
        out, err = proc.communicate(json.dumps(calls), timeout=timeout_s)
        rc = proc.returncode
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        how = f"timed out after {timeout_s} s"
    outcomes: dict[str, dict[str, Any]] = {}
    running = None
    for line in out.splitlines():
        if not line.startswith(_MARK):
            continue  # anything else a case printed
        record = json.loads(line.removeprefix(_MARK))
        if "result" in record:
            outcomes[record["case"]] = record["result"]
            running = None
        else:
            running = record["case"]
    if running is not None:
        outcomes[running] = {"crashed": f"{how}; stderr ends: {err[-2000:]}"}
    for name in calls:
        outcomes.setdefault(name, {"not run": f"the subprocess ended ({how}) before it; stderr ends: {err[-2000:]}"})
    return outcomes


def _child() -> None:
    """The subprocess: run the calls read from stdin, printing a line as each starts and its result."""
    for name, call in json.load(sys.stdin).items():
        print(_MARK + json.dumps({"case": name}), flush=True)
        try:
            result = {"ok": _CALLS[call["kind"]](call)}
        except Exception as e:  # the outcome under test, whatever it is
            result = {"error": type(e).__name__, "message": str(e)}
        print(_MARK + json.dumps({"case": name, "result": result}), flush=True)


def _image_summary(image: torch.Tensor) -> dict[str, Any]:
    return {
        "shape": list(image.shape),
        "dtype": str(image.dtype),
        "min": float(image.min()),
        "max": float(image.max()),
        "mean": float(image.double().mean()),
        "first": image[:, 0, 0].tolist(),
    }


def _read_dataset(call: dict[str, Any]) -> list[dict[str, Any]]:
    """What training does with a COCO file: build the dataset, read items (all of them here)."""
    from mrcnn.data import build_dataset

    dataset = build_dataset("coco", "train", ann_file=call["ann"], image_dir=call["images"], skip_empty=False)
    items = []
    for image, target in (dataset[i] for i in range(len(dataset))):
        masks = target["masks"]
        items.append(
            {
                "image_id": target["image_id"],
                "image": _image_summary(image),
                "boxes": target["boxes"].tolist(),
                "mask_sums": masks.flatten(1).sum(1).tolist(),
                "mask_max": int(masks.max()) if masks.numel() else 0,
            }
        )
    return items


def _read_predict(call: dict[str, Any]) -> dict[str, Any]:
    from mrcnn.predict import read_image

    return _image_summary(read_image(call["path"]))


def _segfault(call: dict[str, Any]) -> None:
    import ctypes

    ctypes.string_at(0)


def _sleep(call: dict[str, Any]) -> None:
    import time

    time.sleep(call["seconds"])


def _allocate(call: dict[str, Any]) -> None:
    np.ones(call["bytes"], dtype=np.uint8)


_CALLS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "dataset": _read_dataset,
    "predict": _read_predict,
    "segfault": _segfault,
    "sleep": _sleep,
    "allocate": _allocate,
}


def test_runner_reports_crashes_hangs_and_the_memory_limit():
    """A segfault fails its own case and the cases after it, not the test run; the limit is in force."""
    outcomes = _run_group({"big": {"kind": "allocate", "bytes": 2 * MEMORY_LIMIT}, "crash": {"kind": "segfault"},
                           "after": {"kind": "sleep", "seconds": 0}})  # fmt: skip
    assert outcomes["big"]["error"] == "MemoryError"
    assert outcomes["crash"]["crashed"].startswith("killed by SIGSEGV")
    assert "not run" in outcomes["after"]
    # "not run" too where a loaded machine takes the 2 s to start the child.
    (outcome,) = _run_group({"hang": {"kind": "sleep", "seconds": 60}}, timeout_s=2)["hang"].values()
    assert "timed out after 2 s" in outcome


# ---------------------------------------------------------------------------------------------------------
# The cases


def _coco() -> dict[str, Any]:
    """A valid file: image 7 (``base.png``, 20 x 30) with annotation 42 of category 3, a polygon."""
    return {
        "images": [{"id": 7, "file_name": "base.png", "height": H, "width": W}],
        "categories": [{"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 42, "image_id": 7, "category_id": 3, "bbox": [2, 1, 10, 8],
             "segmentation": [[2, 1, 12, 1, 12, 9, 2, 9]]},
        ],
    }  # fmt: skip


def _png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand: PIL cannot write 16-bit colour or lie about the size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


_RNG = np.random.default_rng(0)
_RGB8 = _RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
_GREY16 = _RNG.integers(0, 65536, (H, W), dtype=np.uint16)
_RGB16 = _RNG.integers(0, 65536, (H, W, 3), dtype=np.uint16)
_RECT = np.zeros((H, W), np.uint8)
_RECT[3:9, 4:15] = 1
_PNG8 = _encoded(Image.fromarray(_RGB8), "PNG")
_JPEG8 = _encoded(Image.fromarray(_RGB8), "JPEG")


@dataclass(frozen=True)
class Case:
    """``change`` breaks ``_coco()`` in place (annotation cases) or ``image`` is the image file's bytes
    (image cases, read through the dataset and through ``read_image``). ``expect`` is a regex the
    ``ValueError``'s message must match (beyond naming the broken file), or a check of the result."""

    group: str
    expect: str | Callable[[Any], None]
    change: Callable[[dict[str, Any]], Any] | None = None
    image: bytes | None = None


def _ann(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["annotations"][0].update(fields)


def _img(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["images"][0].update(fields)


def _where(message: str) -> str:
    """The regex of an error about annotation 42 of image 7."""
    return r"annotation 42 \(image 7\): .*" + message


def _masks(*sums: int) -> Callable[[Any], None]:
    """The documented result: one item whose masks have these pixel counts, values 0 or 1."""

    def check(items: list[dict[str, Any]]) -> None:
        assert [item["mask_sums"] for item in items] == [list(sums)]
        assert items[0]["mask_max"] <= 1

    return check


def _pixels(expected: np.ndarray) -> Callable[[Any], None]:
    """The documented result for an image whose ``[3, h, w]`` float values should be ``expected``."""

    def check(result: Any) -> None:
        summary = result[0]["image"] if isinstance(result, list) else result
        assert summary["shape"] == list(expected.shape) and summary["dtype"] == "torch.float32"
        np.testing.assert_allclose(summary["first"], expected[:, 0, 0], rtol=0, atol=1e-7)
        for stat in ("min", "max", "mean"):
            np.testing.assert_allclose(summary[stat], getattr(expected, stat)(), rtol=0, atol=1e-6)

    return check


def _zigzag(points: int) -> list[float]:
    """Corner to corner and back, ``points`` times: in bounds, but an outline of ``points`` x 30 px."""
    return [v for i in range(points) for v in ((0, 0) if i % 2 else (W, H))]


def _polygons(*parts: Any) -> Callable[[dict[str, Any]], None]:
    return _ann(segmentation=list(parts))


def _rle(counts: Any, size: Any = (H, W)) -> Callable[[dict[str, Any]], None]:
    return _ann(segmentation={"size": list(size) if isinstance(size, tuple) else size, "counts": counts})


def _compressed(mask: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(mask))["counts"].decode("ascii")


def _tiff(array: np.ndarray) -> bytes:
    return _encoded(Image.fromarray(array), "TIFF")


_INT32_WIDE = np.array([[-1] * W] * (H - 1) + [[65536] * W], np.int32)
_GREY16_RGB = np.broadcast_to(_GREY16 / 65535, (3, H, W))

# fmt: off
CASES: dict[str, Case] = {
    # Polygons: pycocotools casts coordinates to int unchecked (NaN and 1e9 segfaulted or exhausted
    # memory) and drops an odd last value.
    "polygon_nan": Case("segmentation", _where(r"polygon 0, point 1 \(nan, 1\): not a pair of finite numbers"),
                        _polygons([1, 1, NAN, 1, 5, 5])),
    "polygon_inf": Case("segmentation", _where(r"polygon 0, point 2 \(5, inf\)"), _polygons([1, 1, 5, 1, 5, INF])),
    "polygon_minus_inf": Case("segmentation", _where(r"point 0 \(-inf, 1\)"), _polygons([-INF, 1, 5, 1, 5, 5])),
    "polygon_huge": Case("segmentation",
                         _where(r"polygon 0, point 1 \(1000000000.0, 1\): .*within one image size of the 20 x 30 "
                                r"image \(x in \[-30, 60\], y in \[-20, 40\]\)"),
                         _polygons([1, 1, 1e9, 1, 5, 5])),
    "polygon_huge_negative": Case("segmentation", _where(r"point 2 \(5, -1000000000\)"),
                                  _polygons([1, 1, 5, 1, 5, -1_000_000_000])),
    "polygon_second_part": Case("segmentation", _where(r"polygon 1, point 0"),
                                _polygons([2, 1, 12, 1, 12, 9], [1e9, 1, 5, 1, 5, 5])),
    "polygon_odd": Case("segmentation", _where(r"polygon 0 has an odd number of values \(7\)"),
                        _polygons([1, 1, 10, 1, 10, 10, 3])),
    "polygon_strings": Case("segmentation", _where(r"point 0 \('1', '1'\): not a pair of finite numbers"),
                            _polygons(["1", "1", "10", "1", "10", "10"])),
    "polygon_null": Case("segmentation", _where(r"point 1 \(10, None\)"), _polygons([1, 1, 10, None, 10, 10])),
    "polygon_bool": Case("segmentation", _where(r"point 0 \(True, 1\)"), _polygons([True, 1, 10, 1, 10, 10])),
    "polygon_nested": Case("segmentation", _where(r"point 0 \(\[1, 2\], \[3, 4\]\)"),
                           _polygons([[1, 2], [3, 4], [5, 6], [7, 8]])),
    "polygon_flat": Case("segmentation", _where(r"polygon 0 must be a list of coordinates; got 1"),
                         _polygons(1, 1, 10, 1, 10, 10)),
    "polygon_long_outline": Case("segmentation", _where(r"polygon 0: its outline of 12000 px is longer than 50 x "
                                                        r"\(height \+ width\) = 2500 px"),
                                 _polygons(_zigzag(400))),
    # Documented results: clipped to the image; parts of fewer than 3 points ignored; no polygon, no pixels.
    "polygon_outside": Case("segmentation", _masks(H * W), _polygons([-30, -20, 60, -20, 60, 40, -30, 40])),
    "polygon_two_points": Case("segmentation", _masks(0), _polygons([1, 1, 5, 5])),
    "polygon_none": Case("segmentation", _masks(0), _polygons()),
    # Uncompressed RLE: pycocotools decoded runs short of h x w into uninitialised memory.
    "rle_short": Case("segmentation", _where(r"RLE runs add up to 10 pixels, not the image's 20 x 30 = 600"),
                      _rle([5, 5])),
    "rle_long": Case("segmentation", _where(r"add up to 1010 pixels"), _rle([5, 5, 1000])),
    "rle_huge_run": Case("segmentation", _where(r"add up to 1099511627776 pixels"), _rle([2**40])),
    "rle_negative": Case("segmentation", _where(r"RLE counts must be non-negative integers; run 0 is -5"),
                         _rle([-5, 605])),
    "rle_float": Case("segmentation", _where(r"run 0 is 300.0"), _rle([300.0, 300])),
    "rle_strings": Case("segmentation", _where(r"run 1 is '300'"), _rle([300, "300"])),
    "rle_null_run": Case("segmentation", _where(r"run 1 is None"), _rle([300, None, 300])),
    "rle_counts_null": Case("segmentation", _where(r"RLE counts must be a list of run lengths or a compressed RLE "
                                                   r"string; got None"), _rle(None)),
    "rle_counts_number": Case("segmentation", _where(r"RLE counts must be .*got 600"), _rle(600)),
    "rle_size_null": Case("segmentation", _where(r"RLE size None differs from the image's \[height, width\] "
                                                 r"\[20, 30\]"), _rle([600], size=None)),
    "rle_size_float": Case("segmentation", _where(r"RLE size \[20.0, 30.0\] differs"), _rle([600], size=[20.0, 30.0])),
    "rle_size_short": Case("segmentation", _where(r"RLE size \[20\] differs"), _rle([600], size=[20])),
    "rle_full": Case("segmentation", _masks(H * W), _rle([0, H * W])),
    # Compressed RLE strings: parsed here first; pycocotools parses them unchecked.
    "rle_string_garbage": Case("segmentation", _where(r"compressed RLE counts: character '~' at 0 is outside "
                                                      r"'0'..'o'"), _rle("~~~~")),
    "rle_string_nul": Case("segmentation", _where(r"character '\\x00' at 1"), _rle("0\x000")),
    "rle_string_non_ascii": Case("segmentation", _where(r"character 'é' at 1"), _rle("0é0")),
    "rle_string_unterminated": Case("segmentation", _where(r"the string ends inside a value"),
                                    _rle(_compressed(_RECT) + "a")),
    "rle_string_long_value": Case("segmentation", _where(r"a value longer than 6 characters ends at 5"),
                                  _rle("oooooo0")),
    "rle_string_negative": Case("segmentation", _where(r"run 0 is -1"), _rle("O")),
    "rle_string_other_size": Case("segmentation", _where(r"add up to 100 pixels"), _rle(_compressed(_RECT[:10, :10]))),
    "rle_string_empty": Case("segmentation", _where(r"add up to 0 pixels"), _rle("")),
    "rle_string": Case("segmentation", _masks(int(_RECT.sum())), _rle(_compressed(_RECT))),
    # Other fields: each error names the file and the record (and the field).
    "bbox_null": Case("record", _where(r"bbox must be \[x, y, w, h\], four finite numbers; got \[2, None, 10, 8\]"),
                      _ann(bbox=[2, None, 10, 8])),
    "bbox_string": Case("record", _where(r"bbox must be .*got \['2', 1, 10, 8\]"), _ann(bbox=["2", 1, 10, 8])),
    "bbox_nan": Case("record", _where(r"bbox must be .*got \[2, 1, nan, 8\]"), _ann(bbox=[2, 1, NAN, 8])),
    "bbox_inf": Case("record", _where(r"bbox must be .*got \[2, 1, 10, inf\]"), _ann(bbox=[2, 1, 10, INF])),
    "bbox_three": Case("record", _where(r"bbox must be .*got \[2, 1, 10\]"), _ann(bbox=[2, 1, 10])),
    "bbox_null_list": Case("record", _where(r"bbox must be .*got None"), _ann(bbox=None)),
    "iscrowd_string": Case("record", _where(r"iscrowd must be 0 or 1; got '0'"), _ann(iscrowd="0")),
    "area_string": Case("record", _where(r"area must be a finite number >= 0; got '10'"), _ann(area="10")),
    "area_nan": Case("record", _where(r"area must be .*got nan"), _ann(area=NAN)),
    "height_null": Case("record", r": image 7: height and width must be positive integers; got None and 30",
                        _img(height=None)),
    "height_string": Case("record", r": image 7: height and width .*got '20' and 30", _img(height="20")),
    "width_float": Case("record", r": image 7: height and width .*got 20 and 30.0", _img(width=30.0)),
    "height_zero": Case("record", r": image 7: height and width .*got 0 and 30", _img(height=0)),
    "size_huge": Case("record", r": image 7: 1000000 x 1000000 = 1000000000000 pixels is more than 89478485",
                      _img(height=10**6, width=10**6)),
    "file_name_null": Case("record", r": image 7: file_name must be a non-empty string; got None",
                           _img(file_name=None)),
    "image_missing_field": Case("record", r": image 7: missing \['height'\]", lambda d: d["images"][0].pop("height")),
    "image_record_null": Case("record", r": image record without an 'id': None", lambda d: d["images"].append(None)),
    "image_ids_mixed": Case("record", r": image id '8' is not an integer",
                            lambda d: d["images"].append({**d["images"][0], "id": "8"})),
    "annotation_id_float": Case("record", r": annotation id 42.0 is not an integer", _ann(id=42.0)),
    "annotation_image_id_string": Case("record", r": annotation 42: image_id '7' has no image record",
                                       _ann(image_id="7")),
    "annotation_image_id_null": Case("record", r": annotation 42: image_id None has no image record",
                                     _ann(image_id=None)),
    "annotation_category_id_string": Case("record", r": annotation 42: category_id '3' has no category record",
                                          _ann(category_id="3")),
    "category_name_null": Case("record", r": category 3: 'name' must be a string; got None",
                               lambda d: d["categories"][0].update(name=None)),
    "annotations_null": Case("record", r": 'annotations' must be a list; got None",
                             lambda d: d.update(annotations=None)),
    "annotations_object": Case("record", r": 'annotations' must be a list; got \{\}",
                               lambda d: d.update(annotations={})),
    "categories_null": Case("record", r": 'categories' must be a list; got None", lambda d: d.update(categories=None)),
    "images_null": Case("record", r"is not a COCO annotation file: expected an object with an 'images' list",
                        lambda d: d.update(images=None)),
    "annotations_absent": Case("record", _masks(), lambda d: d.pop("annotations")),
    # Image files, each read through the dataset (its record says 20 x 30) and through read_image.
    "image_garbage": Case("image", r"cannot decode image .*: cannot identify image file", image=b"not an image"),
    "image_empty": Case("image", r"cannot decode image", image=b""),
    "image_truncated_png": Case("image", r"cannot decode image .*truncated", image=_PNG8[: len(_PNG8) // 2]),
    "image_truncated_jpeg": Case("image", r"cannot decode image .*truncated", image=_JPEG8[: len(_JPEG8) // 2]),
    "image_bomb": Case("image", r"cannot decode image .*: Image size \(10000000000 pixels\) exceeds limit .*"
                                r"decompression bomb", image=_png(100_000, 100_000, 8, 0, b"\0" * 100_001)),
    "image_float": Case("image", r"mode F \(32-bit float\) has no standard range",
                        image=_tiff(_GREY16.astype(np.float32))),
    "image_int32_wide": Case("image", r"mode I \(32-bit integer\) with values in \[-1, 65536\] has no standard",
                             image=_tiff(_INT32_WIDE)),
    # Documented results: 16-bit greyscale by the full 16-bit range (not white, as PIL's RGB conversion
    # makes it); 32-bit integers within that range likewise (Pillow < 10 opens 16-bit PNGs so); 16-bit
    # colour by each sample's high byte, as Pillow reads it.
    "image_grey16": Case("image", _pixels(_GREY16_RGB), image=_encoded(Image.fromarray(_GREY16), "PNG")),
    "image_int32_16bit": Case("image", _pixels(_GREY16_RGB), image=_tiff(_GREY16.astype(np.int32))),
    "image_rgb16": Case("image", _pixels((_RGB16 >> 8).transpose(2, 0, 1) / 255),
                        image=_png(W, H, 16, 2, b"".join(b"\0" + row.astype(">u2").tobytes() for row in _RGB16))),
    "image_rgb8": Case("image", _pixels(_RGB8.transpose(2, 0, 1) / 255), image=_PNG8),
}
# Only the dataset knows the size to expect, and checks it before decoding.
DATASET_ONLY = {"image_size_mismatch": Case("image", r"is 9000 x 9000 \(height x width\), not the expected 20 x 30",
                                            image=_png(9000, 9000, 8, 0, b"\0" * 100))}
# fmt: on


def _calls(name: str, case: Case, folder: Path) -> dict[str, dict[str, Any]]:
    """Write the case's files into ``folder``; returns its calls by case name (image cases have two), each
    with the file the error must name under ``"names"``."""
    os.makedirs(folder / "images", exist_ok=True)
    data = _coco()
    if case.image is None:
        Image.fromarray(_RGB8).save(folder / "images" / "base.png")
        case.change(data)
    else:
        image = folder / "images" / f"{name}.img"
        image.write_bytes(case.image)
        data["images"][0]["file_name"] = image.name
    ann = folder / f"{name}.json"
    ann.write_text(json.dumps(data))  # writes NaN and Infinity as JSON readers (json.load) take them
    calls = {name: {"kind": "dataset", "ann": str(ann), "images": str(folder / "images"), "names": ann.name}}
    if case.image is not None:
        calls[name].update(names=image.name, also=r": image id 7: ")
        if name not in DATASET_ONLY:
            calls[f"{name}[predict]"] = {"kind": "predict", "path": str(image), "names": image.name}
    return calls


ALL_CASES = {**CASES, **DATASET_ONLY}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> Callable[[str], tuple[dict[str, Any], dict[str, Any]]]:
    """Case name -> (outcome, call); each group's subprocess runs once, when its first case is asked for."""
    runs: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}

    def outcome(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        group = ALL_CASES[name.removesuffix("[predict]")].group
        if group not in runs:
            folder = tmp_path_factory.mktemp(group)
            calls = {k: v for n, c in ALL_CASES.items() if c.group == group for k, v in _calls(n, c, folder).items()}
            runs[group] = (_run_group(calls), calls)
        results, calls = runs[group]
        return results[name], calls[name]

    return outcome


@pytest.mark.parametrize("name", [*ALL_CASES, *(f"{n}[predict]" for n, c in CASES.items() if c.image is not None)])
def test_corrupted_file(name, outcomes):
    outcome, call = outcomes(name)
    expect = ALL_CASES[name.removesuffix("[predict]")].expect
    if isinstance(expect, str):
        assert outcome.get("error") == "ValueError", outcome
        message = outcome["message"]
        assert call["names"] in message and re.search(expect, message), message
        assert "also" not in call or re.search(call["also"], message), message
    else:
        assert "ok" in outcome, outcome
        expect(outcome["ok"])


# Values below 2**24: pycocotools' rleToString allocates 6 chars per count, and a count (or difference) of
# 2**24 or more takes 6 chars plus the terminating NUL, a heap overflow that aborted a test run.
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**24 - 1), min_size=1, max_size=12))
def test_rle_string_parsed_as_pycocotools_writes_it(counts):
    """pycocotools' own compressed strings (large values, differences to the value two before of either
    sign) parse back to their runs; the corrupted cases above cover the strings it would misread."""
    from mrcnn.data.coco import _rle_string_counts

    string = mask_utils.frPyObjects({"size": [1, sum(counts)], "counts": counts}, 1, sum(counts))["counts"]
    assert _rle_string_counts(string.decode("ascii")) == counts
