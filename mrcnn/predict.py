"""Run a trained Mask R-CNN on image files:
``python -m mrcnn.predict --checkpoint PATH IMAGE... --out DIR [--score-threshold 0.5]``.

Writes, for each image, ``DIR/<name>.png`` (``<name>_1.png``, ... when an earlier input took the name): the
image with its detections' masks, boxes, class names and scores drawn over it; ``DIR/results.json``: the
COCO results of all images (every detection, whatever its score; ``segmentation`` is compressed RLE);
``DIR/images.json``: COCO image records whose ``id`` (the image's position on the command line) is the
results' ``image_id``. Images of any size, on CPU or GPU; the model resizes them as its config says and the
detections come back at each image's own size.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .checkpoint import CheckpointError, load_model
from .cli import add_device_args, reexec_for_cpu, select_device, use_backend, write_json
from .data import read_image, to_coco_results
from .graphs import cuda_graphs_enabled
from .visualize import draw_detections

__all__ = ["main", "output_names", "read_image"]


def output_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """A distinct ``.png`` name per input: its stem, or ``stem_1``, ``stem_2``, ... when an earlier input took
    that name, whether from the same stem (``a/x.png``, ``b/x.png``) or as its own (``x_1.png`` after them).
    Names are compared case-insensitively, as macOS and Windows file systems do."""
    taken: set[str] = set()
    names = []
    for path in paths:
        stem = name = Path(path).stem
        k = 0
        while name.casefold() in taken:
            k += 1
            name = f"{stem}_{k}"
        taken.add(name.casefold())
        names.append(f"{name}.png")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mrcnn.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--checkpoint", required=True, help="our checkpoint.pt or a torchvision Mask R-CNN one")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--score-threshold", type=float, default=0.5, help="draw detections scoring at least this")
    p.add_argument("--mask-threshold", type=float, default=0.5, help="mask probability threshold")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    add_device_args(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Predict, draw and write; returns the COCO results (all detections, whatever their score)."""
    args = parse_args(argv)
    device = select_device(args.device)
    model, info = load_model(args.checkpoint, device=device)
    if cuda_graphs_enabled(args.cuda_graphs, device, what="inference"):
        model.capture_inference()
    classes = info.get("classes")
    label_to_cat = info.get("label_to_cat") or {k: k for k in range(1, model.config.num_classes)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    names = output_names(args.images)
    with use_backend(args.backend):
        for start in range(0, len(args.images), args.batch_size):
            paths = args.images[start : start + args.batch_size]
            batch_names = names[start : start + args.batch_size]
            images = [read_image(p) for p in paths]
            records += [{"id": start + i, "file_name": str(p), "height": im.shape[1], "width": im.shape[2]}
                        for i, (p, im) in enumerate(zip(paths, images, strict=True))]  # fmt: skip
            predictions = model.predict([im.to(device) for im in images])
            ids = list(range(start, start + len(paths)))
            results += to_coco_results(predictions, ids, label_to_cat, mask_threshold=args.mask_threshold)
            for path, name, image, pred in zip(paths, batch_names, images, predictions, strict=True):
                drawn = draw_detections(image, pred, classes, score_threshold=args.score_threshold,
                                        mask_threshold=args.mask_threshold)  # fmt: skip
                Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(out / name)
                kept = int((pred["scores"] >= args.score_threshold).sum())
                print(f"{path}: {kept} detections >= {args.score_threshold} -> {out / name}")
    write_json(results, out / "results.json")
    write_json(records, out / "images.json")
    print(f"wrote {out / 'results.json'} ({len(results)} detections) and {out / 'images.json'}")
    return results


def cli() -> None:
    """Console entry point: a bad checkpoint is one line naming it and exit status 1."""
    reexec_for_cpu("mrcnn.predict")
    try:
        main()
    except CheckpointError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
