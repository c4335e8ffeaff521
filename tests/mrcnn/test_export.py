"""Export: ``python -m mrcnn.export`` writes an AOTInductor package that a Python process which cannot
import ``kernels`` or ``mrcnn`` loads and runs, giving the eager model's detections; the README's snippet runs
as written; bad use gets a clear error.

One package is compiled per test session (about a minute on 2 cores): a ResNet-18 model at 128x160, batch 2.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mrcnn
from kernels._backend import LINEAR_KERNEL_ANALYSIS
from mrcnn.export import export_package, export_program, main, onnx_translations

README = Path(__file__).resolve().parents[2] / "README.md"
TINY = dict(
    num_classes=4, backbone="resnet18", min_size=112, max_size=150, rpn_pre_nms_top_n_test=200,
    rpn_post_nms_top_n_test=60, box_score_thresh=0.0, detections_per_img=12, box_candidates_per_img=80,
)  # fmt: skip
SIZE = (128, 160)
MAX_BATCH = 3  # the package's batch is dynamic, 1 to MAX_BATCH images (exported from an example of 2)
# Runs before anything else in a bare process: neither of our packages can be imported.
NO_PROJECT = "import sys; sys.modules['kernels'] = sys.modules['mrcnn'] = None\n"


def _model() -> mrcnn.MaskRCNN:
    torch.manual_seed(0)
    return mrcnn.MaskRCNN(mrcnn.MaskRCNNConfig(**TINY)).eval()


def _export(folder: Path, out: str) -> Path:
    """``python -m mrcnn.export`` of the tiny model (any batch up to ``MAX_BATCH``) to ``folder / out``."""
    model = _model()
    ckpt = folder / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(), "classes": ["bg", "a", "b", "c"]},
               ckpt)  # fmt: skip
    return main(["--checkpoint", str(ckpt), "--out", str(folder / out), "--batch-size", str(MAX_BATCH),
                 "--image-size", *map(str, SIZE)])  # fmt: skip


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("export"), "model.pt2")


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("onnx"), "model.onnx")


def _batch(batch: int) -> tuple[torch.Tensor, torch.Tensor, mrcnn.Detections]:
    """``(images, image_sizes)`` of ``batch`` random images as ``collate`` pads them to ``SIZE``, and the eager
    model's detections on them."""
    model = _model()
    gen = torch.Generator().manual_seed(batch)
    heights = torch.randint(80, 128, (batch,), generator=gen).tolist()
    widths = torch.randint(100, 160, (batch,), generator=gen).tolist()
    images = [torch.rand(3, h, w, generator=gen) for h, w in zip(heights, widths, strict=True)]
    x, sizes, _ = model.collate(images)
    x = torch.nn.functional.pad(x, (0, SIZE[1] - x.shape[3], 0, SIZE[0] - x.shape[2]))
    with torch.no_grad():
        want = model(x, sizes)
    assert want.valid.any()
    return x, sizes, want


def _assert_detections(got: Sequence[torch.Tensor], want: mrcnn.Detections) -> None:
    """An exported model's five outputs against eager's: boxes within 1e-3 px, scores 1e-4, masks 1e-3."""
    boxes, scores, labels, masks, valid = (t.cpu() for t in got)
    assert torch.equal(valid, want.valid.cpu()) and torch.equal(labels, want.labels.cpu())
    torch.testing.assert_close(boxes, want.boxes.cpu(), rtol=0, atol=1e-3)
    torch.testing.assert_close(scores, want.scores.cpu(), rtol=0, atol=1e-4)
    torch.testing.assert_close(masks, want.masks.cpu(), rtol=0, atol=1e-3)


def _run_bare(code: str, cwd: Path) -> str:
    """``code`` in ``python -I`` (no PYTHONPATH, no user site) from ``cwd``, with our packages blocked."""
    done = subprocess.run([sys.executable, "-I", "-c", NO_PROJECT + code], cwd=cwd, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("batch", [1, 2, MAX_BATCH])
def test_package_contract_matches_eager(package: Path, tmp_path: Path, batch: int) -> None:
    """Any batch up to the exported one, in a process that cannot import our packages, gives eager's detections."""
    x, sizes, want = _batch(batch)
    torch.save((x, sizes), tmp_path / "inputs.pt")
    _run_bare(f"""
import torch
runner = torch._inductor.aoti_load_package({str(package)!r})
x, sizes = torch.load("inputs.pt")
torch.save([t.clone() for t in runner(x, sizes)], "outputs.pt")
assert not hasattr(torch.ops, "mrcnn") or not hasattr(torch.ops.mrcnn, "multiscale_roi_align")
""", tmp_path)  # fmt: skip
    _assert_detections(torch.load(tmp_path / "outputs.pt"), want)


@pytest.mark.parametrize("batch", [1, MAX_BATCH])
def test_onnx_model_matches_eager(onnx_model: Path, batch: int) -> None:
    """``--out model.onnx``: standard ONNX operators only, any batch up to the exported one, run by ONNX Runtime
    (which cannot call back into Python), gives eager's detections."""
    import onnx
    import onnxruntime

    graph = onnx.load(str(onnx_model)).graph
    assert {node.domain for node in graph.node} == {""}
    x, sizes, want = _batch(batch)
    session = onnxruntime.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy(), "image_sizes": sizes.numpy()})
    _assert_detections([torch.from_numpy(a) for a in got], want)
    info = json.loads(onnx_model.with_name("model.json").read_text())
    assert info["format"] == "mrcnn-onnx-1" and info["max_batch_size"] == MAX_BATCH


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_onnx_translations_match_torch(index_dtype: torch.dtype) -> None:
    """Our two translations against torch: weighted bags with empty ones (in the middle, at the end) and a
    stable sort with ties, both directions, a negative and a positive axis."""
    import onnxruntime

    class Ops(torch.nn.Module):
        def forward(self, table, rows, offsets, weights, scores):  # noqa: ANN001, ANN202
            bags = torch.nn.functional.embedding_bag(rows, table, offsets, per_sample_weights=weights, mode="sum")
            return bags, *scores.sort(dim=-1, descending=True, stable=True), *scores.sort(dim=0, stable=True)

    gen = torch.Generator().manual_seed(0)
    rows = torch.tensor([1, 2, 4, 5, 4, 3], dtype=index_dtype)
    offsets = torch.tensor([0, 2, 2, 5, 6], dtype=index_dtype)  # bags [0:2], [], [2:5], [5:6], []
    args = (torch.randn(7, 3, generator=gen), rows, offsets, torch.rand(6, generator=gen),
            torch.randint(0, 3, (4, 9), generator=gen).float())  # fmt: skip
    program = torch.onnx.export(Ops().eval(), args, dynamo=True, opset_version=18, verbose=False,
                                custom_translation_table=onnx_translations())  # fmt: skip
    assert "Loop" not in {node.op_type for node in program.model.graph}
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])  # fmt: skip
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {name: a.numpy() for name, a in zip(names, args, strict=True)})
    want = Ops()(*args)
    torch.testing.assert_close(torch.from_numpy(got[0]), want[0], rtol=1e-6, atol=1e-6)
    for g, w in zip(got[1:], want[1:], strict=True):
        assert torch.equal(torch.from_numpy(g), w)


@pytest.mark.parametrize(("head", "backbone"), [("v2", "resnet18"), ("v1", "resnet34")])
def test_other_heads_and_bodies_export(head: str, backbone: str) -> None:
    """The v2 heads and another ResNet body export too; the decomposed program equals eager (run as a module)."""
    torch.manual_seed(0)
    model = mrcnn.MaskRCNN(mrcnn.MaskRCNNConfig(**{**TINY, "head": head, "backbone": backbone})).eval()
    x, sizes = torch.rand(1, 3, *SIZE), torch.tensor([[120, 150]])
    program = export_program(model, 1, SIZE)
    assert not [n for n in program.graph.nodes if n.op == "call_function" and "mrcnn" in str(n.target)]
    with torch.no_grad():
        want = model(x, sizes)
        got = program.module()(x, sizes)
    assert torch.equal(got[4], want.valid) and torch.equal(got[2], want.labels)
    torch.testing.assert_close(got[0], want.boxes, rtol=0, atol=1e-3)
    torch.testing.assert_close(got[3], want.masks, rtol=0, atol=1e-3)


def test_model_json(package: Path) -> None:
    info = json.loads(package.with_name("model.json").read_text())
    assert info["max_batch_size"] == MAX_BATCH and info["image_size"] == list(SIZE) and info["size_divisible"] == 32
    assert info["classes"] == ["bg", "a", "b", "c"] and info["detections_per_img"] == 12 and info["mask_size"] == 28
    assert info["normalisation_inside"] is False and info["outputs"] == ["boxes", "scores", "labels", "masks", "valid"]


def test_readme_snippet_runs_as_written(package: Path, tmp_path: Path) -> None:
    snippet = re.search(r"<!-- export-snippet -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert snippet, "README has no export snippet"
    assert len(snippet.group(1).strip().splitlines()) <= 22
    Image.fromarray((np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    out = _run_bare(f"sys.argv = ['snippet', {str(package)!r}, 'in.png']\n" + snippet.group(1), tmp_path)
    assert "boxes" in out and "labels" in out


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(image_size=(100, 160)), "multiples of size_divisible"),
        (dict(batch_size=0), "batch size"),
        (dict(device="cuda"), "CUDA"),
    ],
)
def test_bad_use_is_refused(kwargs: dict, match: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CUDA case, on a GPU machine too
    with pytest.raises(ValueError, match=match):
        export_program(_model(), **{"image_size": SIZE, **kwargs})


def test_bad_outputs_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before any export: an unknown suffix, an ONNX model of the CUDA program, ONNX without onnxscript."""
    with pytest.raises(ValueError, match=r"\.pt2 package or an \.onnx model"):
        export_package(_model(), tmp_path / "model.zip", image_size=SIZE)
    with pytest.raises(ValueError, match="CPU program"):
        export_package(_model(), tmp_path / "model.onnx", image_size=SIZE, device="cuda")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript raises ImportError
    with pytest.raises(ValueError, match=re.escape('pip install -e ".[onnx]"')):
        onnx_translations()
    assert not list(tmp_path.iterdir())


def test_adaptive_sampling_is_refused_on_cpu() -> None:
    """The op's own error when traced: the adaptive grid's size is the data's (a CUDA export keeps the op)."""
    model = mrcnn.MaskRCNN(mrcnn.MaskRCNNConfig(**{**TINY, "pooler_sampling_ratio": 0})).eval()
    with pytest.raises(ValueError, match="fixed sampling_ratio > 0"):
        export_program(model, image_size=SIZE)


def test_training_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        export_program(_model().train(), image_size=SIZE)


def test_cli_names_a_foreign_checkpoint(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    done = subprocess.run([sys.executable, "-m", "mrcnn.export", "--checkpoint", str(tmp_path / "foreign.pt"),
                           "--out", str(tmp_path / "m.pt2")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1 and "foreign.pt" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.cuda
def test_cuda_package_matches_eager(tmp_path: Path) -> None:
    """On a GPU: the CUDA package (our Triton kernels compiled in by AOTInductor), loaded in a fresh process that
    cannot import our packages, gives the eager model's detections. Where NMS stays an op call (torch 2.12-2.14,
    ``LINEAR_KERNEL_ANALYSIS``), that process imports ``kernels`` instead."""
    model = _model().cuda()
    x, sizes = torch.rand(2, 3, *SIZE, device="cuda"), torch.tensor([list(SIZE)] * 2, device="cuda")
    with torch.no_grad():
        want = model(x, sizes)
    path = export_package(model, tmp_path / "model.pt2", 2, SIZE, "cuda")
    torch.save((x.cpu(), sizes.cpu()), tmp_path / "inputs.pt")
    code = f"""
import torch
runner = torch._inductor.aoti_load_package({str(path)!r})
x, sizes = torch.load("inputs.pt")
torch.save([t.cpu() for t in runner(x.cuda(), sizes.cuda())], "outputs.pt")
"""
    if LINEAR_KERNEL_ANALYSIS:
        _run_bare(code, tmp_path)
    else:
        paths = [str(README.parent), os.environ.get("PYTHONPATH")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        done = subprocess.run([sys.executable, "-c", "import kernels\n" + code], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    _assert_detections(torch.load(tmp_path / "outputs.pt"), want)
