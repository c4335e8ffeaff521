"""Export a Mask R-CNN for deployment: ``torch.export`` and an AOTInductor package that runs without this project.

``python -m mrcnn.export --checkpoint CKPT --out model.pt2|model.onnx [--device cpu|cuda] [--batch-size B]
[--image-size H W]`` writes the package (or an ONNX model, below) and, next to it, ``model.json`` (what a caller
needs: the input contract, ``size_divisible``, class names, ``detections_per_img``, mask size).

The package is called as ``runner(images, image_sizes)`` with the two tensors ``mrcnn.collate`` makes
(``images: Tensor[B, 3, H, W]`` normalised and padded, ``image_sizes: Tensor[B, 2]`` int64) and returns the
five ``Detections`` fields ``(boxes [B, D, 4], scores [B, D], labels [B, D], masks [B, D, M, M], valid [B, D])``
in the padded image's pixels. Normalisation (mean/std) and resizing are *not* inside it: ``collate`` does them.
It needs neither ``kernels`` nor ``mrcnn``: ``torch._inductor.aoti_load_package(path)`` in a bare process.

The batch is dynamic: ``--batch-size B`` is the largest batch the package takes, and it takes any batch of 1 to
``B`` images (``B = 1`` exports a fixed batch of one). The image size is fixed at export (``--image-size``):
``MaskRCNN.forward`` has no data-dependent shape, but its top-k sizes are ``min(k, anchors)``, which depend on
the image size. Pad a smaller image to the exported size with zeros after normalisation (as ``collate`` pads)
and give its own size in ``image_sizes``: one package serves every image up to that size. The package does not
check its inputs' shapes.

On CPU every op is decomposed into aten ops (``kernels.cpu_decompositions()``: each op's torch path traced on
fake tensors), so the package holds compiled C++ only. RoIAlign must then use a fixed ``sampling_ratio``
(torchvision's Mask R-CNN uses 2): the adaptive grid's size is data-dependent. On CUDA the ops are
``triton_op``s: AOTInductor traces into them and compiles our Triton kernels into the package (NMS excepted on
torch 2.12-2.14: ``kernels._backend.LINEAR_KERNEL_ANALYSIS``).

``--out model.onnx`` writes an ONNX model instead (``torch.onnx.export(dynamo=True)`` of the CPU program, opset
18; needs ``pip install -e ".[onnx]"``): the same inputs, outputs, dynamic batch and ``model.json``, standard ONNX
operators only (tested with ONNX Runtime's CPU provider). Two aten ops get translations of ours: the stable sort
(none exists) and RoIAlign's ``embedding_bag`` (a scatter-add instead of a loop over its bags).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kernels

from .cli import ArgumentParser, existing_file, output_folder, positive_int, run_cli
from .convert import load_model
from .model import MaskRCNN

__all__ = ["cli", "export_program", "export_package", "package_info", "onnx_translations", "main"]

FORMATS = {".pt2": "mrcnn-aoti-1", ".onnx": "mrcnn-onnx-1"}  # by the output's suffix


class _Outputs(nn.Module):
    """The model's eval forward with a plain tuple out (an AOTInductor package returns a flat list)."""

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(images, image_sizes))


def _check(model: MaskRCNN, batch_size: int, image_size: tuple[int, int], device: torch.device) -> None:
    if model.training:
        raise ValueError("export needs the model in eval mode (model.eval()): the training graph is not exported")
    divisible = model.config.size_divisible
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if len(image_size) != 2 or any(s < divisible or s % divisible for s in image_size):
        raise ValueError(f"image size must be two multiples of size_divisible={divisible}, got {tuple(image_size)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("a CUDA export needs a CUDA device; none is available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device}")


def example_inputs(
    batch_size: int, image_size: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [B, 3, H, W], image_sizes [B, 2])``: what ``collate`` gives for ``B`` images of the full size."""
    images = torch.zeros(batch_size, 3, *image_size, device=device)
    return images, torch.tensor([list(image_size)] * batch_size, dtype=torch.int64, device=device)


def export_program(
    model: MaskRCNN, batch_size: int = 1, image_size: tuple[int, int] = (800, 1344), device: str = "cpu"
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` (eval mode) on ``device`` for batches of 1 to ``batch_size`` images of
    ``image_size``; on CPU with every op decomposed into aten ops."""
    dev = torch.device(device)
    _check(model, batch_size, tuple(image_size), dev)
    wrapped = _Outputs(model.to(dev))
    # An example batch of 2 for a dynamic batch: torch.export specializes a dimension of size 1.
    args = example_inputs(min(batch_size, 2), tuple(image_size), dev)
    batch = torch.export.Dim("batch", min=1, max=batch_size) if batch_size > 1 else None
    dynamic = ({0: batch}, {0: batch}) if batch is not None else None
    if dev.type == "cuda":
        return torch.export.export(wrapped, args, dynamic_shapes=dynamic, strict=False)
    with kernels.use_backend("torch"):
        program = torch.export.export(wrapped, args, dynamic_shapes=dynamic, strict=False)
        return program.run_decompositions(kernels.cpu_decompositions())


def package_info(model: MaskRCNN, batch_size: int, image_size: tuple[int, int], device: str,
                 classes: Sequence[str] | None = None, suffix: str = ".pt2") -> dict[str, Any]:  # fmt: skip
    """The ``model.json`` that goes with a package (``suffix`` ``.pt2``) or an ONNX model (``.onnx``)."""
    cfg = model.config
    return {
        "format": FORMATS[suffix],
        "device": str(torch.device(device).type),
        "inputs": {
            "images": f"float32 [B, 3, {image_size[0]}, {image_size[1]}], 1 <= B <= {batch_size}: resized, "
            "normalised with image_mean/image_std, then zero-padded (mrcnn.collate)",
            "image_sizes": "int64 [B, 2]: (h, w) of each resized image before padding",
        },
        "outputs": ["boxes", "scores", "labels", "masks", "valid"],
        "max_batch_size": batch_size,
        "image_size": list(image_size),
        "normalisation_inside": False,
        "image_mean": list(cfg.image_mean),
        "image_std": list(cfg.image_std),
        "min_size": cfg.min_size,
        "max_size": cfg.max_size,
        "size_divisible": cfg.size_divisible,
        "num_classes": cfg.num_classes,
        "classes": list(classes) if classes is not None else None,
        "detections_per_img": cfg.detections_per_img,
        "mask_size": cfg.mask_size,
    }


def export_package(
    model: MaskRCNN,
    path: str | Path,
    batch_size: int = 1,
    image_size: tuple[int, int] = (800, 1344),
    device: str = "cpu",
    classes: Sequence[str] | None = None,
) -> Path:
    """Write the AOTInductor package ``path`` (``.pt2``) or the ONNX model ``path`` (``.onnx``, CPU program
    only) and ``model.json`` next to it; returns ``path``."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise ValueError(f"the output must be a .pt2 package or an .onnx model, got {path}")
    if path.suffix == ".onnx" and torch.device(device).type != "cpu":
        raise ValueError("an ONNX model is exported from the CPU program (--device cpu); ONNX runtimes run it anywhere")
    program = export_program(model, batch_size, image_size, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".onnx":
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=18, verbose=False,
                                         custom_translation_table=onnx_translations())  # fmt: skip
        onnx_program.save(str(path))
    else:
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    info = package_info(model, batch_size, tuple(image_size), device, classes, path.suffix)
    path.with_name("model.json").write_text(json.dumps(info, indent=1))
    return path


def onnx_translations() -> dict[Any, Callable[..., Any]]:
    """Our ONNX translations of two aten ops (``torch.onnx.export``'s ``custom_translation_table``)."""
    try:
        from onnxscript import opset18 as op
    except ImportError as e:
        raise ValueError('an ONNX export needs onnx and onnxscript: pip install -e ".[onnx]"') from e

    def sort_stable(self: Any, stable: bool | None = None, dim: int = -1, descending: bool = False) -> tuple[Any, Any]:
        # No translation exists. TopK over the whole axis, sorted, puts the lower index first among equal values:
        # a stable sort.
        k = op.Slice(op.Shape(self, start=dim), [0], [1])
        return op.TopK(self, k, axis=dim, largest=descending, sorted=True)

    def embedding_bag(weight: Any, indices: Any, offsets: Any, scale_grad_by_freq: bool = False, mode: int = 0,
                      sparse: bool = False, per_sample_weights: Any = None, include_last_offset: bool = False,
                      padding_idx: int | None = None) -> tuple[Any, Any, Any, Any]:  # fmt: skip
        # RoIAlign's torch path: weighted sums of table rows in bags (one per output bin). onnxscript's own
        # translation loops over the bags (a Loop of ~10^4 iterations) and fails to load for int32 indices.
        # Here: each entry's bag from the offsets (a 1 at each bag's start, cumulated), then one scatter-add.
        if mode != 0 or per_sample_weights is None or include_last_offset or padding_idx is not None:
            raise NotImplementedError("embedding_bag: only sums with per-sample weights are translated")
        # One slot more than entries: empty bags at the end start there.
        zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
        n = op.Shape(indices)
        starts = op.ScatterElements(op.Expand(zero, n + 1), offsets, op.Expand(one, op.Shape(offsets)),
                                    reduction="add")  # fmt: skip
        bag = op.Unsqueeze(op.Slice(op.CumSum(starts, zero), [0], n) - 1, [1])
        rows = op.Mul(op.Gather(weight, indices), op.Unsqueeze(per_sample_weights, [1]))
        bags = op.Concat(op.Shape(offsets), op.Shape(weight, start=1), axis=0)
        out = op.ScatterND(op.Expand(op.CastLike(op.Constant(value_float=0.0), weight), bags), bag, rows,
                           reduction="add")  # fmt: skip
        # The other outputs, as torch's CPU kernel gives them for weighted sums (backward buffers, unused here).
        zeros = op.CastLike(op.Expand(zero, op.Shape(offsets)), indices)
        return out, op.Slice(zeros, [0], [0]), zeros, zeros

    return {torch.ops.aten.sort.stable: sort_stable, torch.ops.aten.embedding_bag.padding_idx: embedding_bag}


def _output_path(text: str) -> str:
    """An argparse type: ``--out``'s file name, ending in one of ``FORMATS``."""
    if Path(text).suffix not in FORMATS:
        raise argparse.ArgumentTypeError(f"must end in .pt2 (AOTInductor package) or .onnx (ONNX model): {text}")
    return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m mrcnn.export", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--checkpoint", required=True, type=existing_file,
                   help="our checkpoint.pt or a torchvision Mask R-CNN one")  # fmt: skip
    p.add_argument(
        "--out",
        required=True,
        type=_output_path,
        help="model.pt2 (AOTInductor package) or model.onnx (ONNX model); model.json is written beside it",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the package runs")
    p.add_argument("--batch-size", type=positive_int, default=1, help="the most images per call (any batch from 1 up)")
    p.add_argument("--image-size", type=positive_int, nargs=2, metavar=("H", "W"), default=None,
                   help="padded input size, multiples of size_divisible (default: max_size rounded up, "
                   "square)")  # fmt: skip
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """Export as the command line ``argv`` says; returns the package's (or ONNX model's) path. A folder made for
    it is removed when the export fails."""
    args = parse_args(argv)
    model, info = load_model(args.checkpoint)
    divisible = model.config.size_divisible
    side = -(-model.config.max_size // divisible) * divisible
    image_size = tuple(args.image_size) if args.image_size else (side, side)
    with output_folder(Path(args.out).parent):
        path = export_package(model, args.out, args.batch_size, image_size, args.device,
                              info.get("classes"))  # fmt: skip
    print(f"wrote {path} and {path.with_name('model.json')}")
    return path


def cli(argv: Sequence[str] | None = None) -> None:
    """Console entry point: a user's mistake is one ``error:`` line and exit status 1 (``mrcnn.cli.run_cli``)."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
