"""COCO evaluation of a Mask R-CNN: ``python -m mrcnn.evaluate --checkpoint PATH --data shapes|coco``.

Runs the model over a dataset (``model.predict``: torchvision's output format, masks pasted at each
image's own size), converts the detections to COCO results and scores them with pycocotools' COCOeval
for boxes and masks. Prints the table and writes ``eval_metrics.json`` (``{"bbox": {...}, "segm": {...}}``
with AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl: fractions, -1 where COCOeval had no
ground truth) and ``eval_results.json`` (the COCO results) to ``--out``, by default the checkpoint's folder.
Their names differ from the training run's ``metrics.json``, and an existing file of these names is replaced
only with ``--force``: an evaluation never overwrites a result it did not make.

Under ``torchrun`` every rank predicts its share of the images (rank ``r`` takes images ``r``,
``r + world``, ...), rank 0 gathers them, evaluates and writes.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from .cli import (
    ArgumentParser,
    Process,
    add_data_args,
    add_device_args,
    base_dataset,
    build_eval_dataset,
    existing_file,
    non_negative_int,
    positive_int,
    run_cli,
    use_backend,
    write_json,
)
from .convert import load_model
from .data import coco_evaluate, coco_ground_truth, collate_list, to_coco_results
from .graphs import cuda_graphs_enabled
from .model import MaskRCNN

__all__ = ["OUTPUT_FILES", "cli", "evaluate", "format_metrics", "main", "predict_dataset"]

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
OUTPUT_FILES = ("eval_metrics.json", "eval_results.json")  # not the training run's metrics.json


@torch.no_grad()
def predict_dataset(
    model: MaskRCNN,
    dataset: Dataset,
    *,
    batch_size: int = 2,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], list[int]]:
    """COCO results for this rank's share of ``dataset`` and the image ids it covered.

    ``model`` is the plain module (not DDP-wrapped); it runs in eval mode and is put back in its mode.
    """
    indices = list(range(rank, len(dataset), world_size))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_list)  # fmt: skip
    label_to_cat = base_dataset(dataset).label_to_cat
    results: list[dict[str, Any]] = []
    image_ids: list[int] = []
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="evaluate", unit="batch", dynamic_ncols=True, leave=False)
    for images, targets in loader:
        predictions = model.predict(images)
        ids = [int(t["image_id"]) for t in targets]
        results += to_coco_results(predictions, ids, label_to_cat)
        image_ids += ids
    return results, image_ids


def evaluate(
    model: MaskRCNN,
    dataset: Dataset,
    *,
    batch_size: int = 2,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]] | None:
    """COCOeval (bbox and segm) of ``model`` on ``dataset``: ``(metrics, results)`` on rank 0, ``None``
    on the other ranks. Collective under ``torch.distributed``: every rank must call it."""
    results, image_ids = predict_dataset(model, dataset, batch_size=batch_size, workers=workers, rank=rank,
                                         world_size=world_size, progress=progress)  # fmt: skip
    if world_size > 1:
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, (results, image_ids))
        results = [r for rs, _ in gathered for r in rs]
        image_ids = [i for _, ids in gathered for i in ids]
    if rank != 0:
        return None
    metrics = coco_evaluate(coco_ground_truth(dataset), results, ("bbox", "segm"), image_ids=sorted(image_ids))
    return metrics, results


def format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    """A Markdown table of COCOeval's AP, AP50, AP75, APs, APm, APl per IoU type, as fractions (those of
    ``metrics.json`` and the README), with a line saying what they are, and one explaining COCOeval's -1 where
    it appears."""
    lines = [
        "COCOeval, fractions of 1: AP = mean over IoU thresholds 0.50:0.95, AP50 / AP75 at IoU 0.50 / 0.75; "
        "APs / APm / APl for objects of area < 32^2, 32^2-96^2, > 96^2 px",
        "| | " + " | ".join(METRIC_NAMES) + " |",
        "|---" * (len(METRIC_NAMES) + 1) + "|",
    ]
    for iou_type, m in metrics.items():
        lines.append(f"| {iou_type} | " + " | ".join("-1" if m[k] < 0 else f"{m[k]:.3f}" for k in METRIC_NAMES) + " |")
    if any(m[k] < 0 for m in metrics.values() for k in METRIC_NAMES):
        lines.append("-1: no ground-truth object of that size in the evaluated images (COCOeval's marker, not a score)")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m mrcnn.evaluate", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--checkpoint", required=True, type=existing_file,
                        help="our checkpoint.pt or a torchvision Mask R-CNN one")  # fmt: skip
    add_data_args(parser)
    parser.add_argument("--out", default=None, help=f"folder for {' and '.join(OUTPUT_FILES)} "
                        "(default: the checkpoint's folder)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help=f"replace existing {' and '.join(OUTPUT_FILES)}")
    parser.add_argument("--batch-size", type=positive_int, default=2)
    parser.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    add_device_args(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]] | None:
    """Evaluate as the command line ``argv`` says; returns the metrics (on rank 0; ``None`` on the others).

    Raises ``FileExistsError`` before anything runs when an output file exists and ``--force`` is not given."""
    args = parse_args(argv)
    out_dir = Path(args.out or Path(args.checkpoint).parent)
    existing = [str(out_dir / name) for name in OUTPUT_FILES if (out_dir / name).exists()]
    if existing and not args.force:
        raise FileExistsError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''} (an "
                              "earlier evaluation): pass --force to replace, or --out to write elsewhere")  # fmt: skip
    with Process(args.device) as process:
        model, _ = load_model(args.checkpoint, device=process.device)
        if cuda_graphs_enabled(args.cuda_graphs, process.device, what="inference"):
            model.capture_inference()
        dataset = build_eval_dataset(args, model.config.min_size)
        with use_backend(args.backend):
            out = evaluate(model, dataset, batch_size=args.batch_size, workers=args.workers, rank=process.rank,
                           world_size=process.world_size, progress=process.is_main)  # fmt: skip
        if out is None:
            return None
        metrics, results = out
        metrics_file, results_file = (out_dir / name for name in OUTPUT_FILES)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(metrics, metrics_file)
        write_json(results, results_file)
        print(format_metrics(metrics))
        print(f"wrote {metrics_file} and {results_file}")
        return metrics


def cli(argv: Sequence[str] | None = None) -> None:
    """Console entry point: a user's mistake is one ``error:`` line and exit status 1 (``mrcnn.cli.run_cli``)."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
