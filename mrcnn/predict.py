"""Run a trained Mask R-CNN on image files:
``python -m mrcnn.predict --checkpoint PATH IMAGE... --out DIR [--score-threshold 0.5]``.

Writes, for each image, ``DIR/<name>.png`` (``<name>_1.png``, ... when an earlier input took the name): the
image with its detections' masks, boxes, class names and scores drawn over it; ``DIR/results.json``: the
COCO results of all images (every detection, whatever its score; ``segmentation`` is compressed RLE);
``DIR/images.json``: COCO image records whose ``id`` (the image's position on the command line) is the
results' ``image_id``. Images of any size, on CPU or GPU; the model resizes them as its config says and the
detections come back at each image's own size.

Every input is checked before anything is written (it exists, PIL recognises its format); a file that still
fails to decode stops the command, and an output folder it made is removed.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .cli import (
    ArgumentParser,
    add_device_args,
    existing_file,
    output_folder,
    positive_int,
    process_age,
    run_cli,
    select_device,
    use_backend,
    write_json,
)
from .convert import load_model
from .data import read_image, to_coco_results
from .graphs import cuda_graphs_enabled
from .visualize import draw_detections

__all__ = ["cli", "image_file", "main", "output_names", "read_image"]


def image_file(text: str) -> str:
    """An argparse type: an existing file whose header PIL recognises as an image (the pixels are decoded later,
    by ``read_image``)."""
    existing_file(text)
    try:
        with Image.open(text):
            pass
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise argparse.ArgumentTypeError(f"cannot decode image {text}: {e}") from e
    return text


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
    p = ArgumentParser(prog="python -m mrcnn.predict", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("images", nargs="+", type=image_file, help="image files (PNG, JPEG, ...)")
    p.add_argument("--checkpoint", required=True, type=existing_file,
                   help="our checkpoint.pt or a torchvision Mask R-CNN one")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder (made if missing; files of the same names replaced)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="draw detections scoring at least this")
    p.add_argument("--mask-threshold", type=float, default=0.5, help="mask probability threshold")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images per forward pass")
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
    results: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    names = output_names(args.images)
    first_s = None
    with output_folder(args.out) as out, use_backend(args.backend):
        for start in range(0, len(args.images), args.batch_size):
            paths = args.images[start : start + args.batch_size]
            batch_names = names[start : start + args.batch_size]
            images = [read_image(p) for p in paths]
            records += [{"id": start + i, "file_name": str(p), "height": im.shape[1], "width": im.shape[2]}
                        for i, (p, im) in enumerate(zip(paths, images, strict=True))]  # fmt: skip
            predictions = model.predict([im.to(device) for im in images])
            ids = list(range(start, start + len(paths)))
            results += to_coco_results(predictions, ids, label_to_cat, mask_threshold=args.mask_threshold)
            if start == 0:  # the cold start: the first batch's detections are on the host now
                first_s = process_age()
            for path, name, image, pred in zip(paths, batch_names, images, predictions, strict=True):
                drawn = draw_detections(image, pred, classes, score_threshold=args.score_threshold,
                                        mask_threshold=args.mask_threshold)  # fmt: skip
                Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(out / name)
                kept = int((pred["scores"] >= args.score_threshold).sum())
                print(f"{path}: {kept} detections >= {args.score_threshold} -> {out / name}")
        write_json(results, out / "results.json")
        write_json(records, out / "images.json")
    cold = f"; first detections {first_s:.1f} s after the process started" if first_s is not None else ""
    print(f"wrote {out / 'results.json'} ({len(results)} detections) and {out / 'images.json'}{cold}")
    return results


def cli(argv: Sequence[str] | None = None) -> None:
    """Console entry point: a user's mistake is one ``error:`` line and exit status 1 (``mrcnn.cli.run_cli``)."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
