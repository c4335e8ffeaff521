"""COCO evaluation of a Mask R-CNN: ``python -m mrcnn.evaluate --checkpoint PATH --data shapes|coco``.

Runs the model over a dataset (``model.predict``: torchvision's output format, masks pasted at each
image's own size), converts the detections to COCO results and scores them with pycocotools' COCOeval
for boxes and masks. Prints the table and writes ``metrics.json`` (``{"bbox": {...}, "segm": {...}}``
with AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl) and ``results.json`` (the COCO
results) to ``--out``.

Under ``torchrun`` every rank predicts its share of the images (rank ``r`` takes images ``r``,
``r + world``, ...), rank 0 gathers them, evaluates and writes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from .checkpoint import CheckpointError, load_model
from .cli import (
    Process,
    add_data_args,
    add_device_args,
    base_dataset,
    build_eval_dataset,
    reexec_for_cpu,
    use_backend,
    write_json,
)
from .data import coco_evaluate, coco_ground_truth, collate_list, to_coco_results
from .graphs import cuda_graphs_enabled
from .model import MaskRCNN

__all__ = ["evaluate", "format_metrics", "main", "predict_dataset"]

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


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
    """A Markdown table: one row per IoU type, columns AP, AP50, AP75, APs, APm, APl (in %)."""
    lines = ["| | " + " | ".join(METRIC_NAMES) + " |", "|---" * (len(METRIC_NAMES) + 1) + "|"]
    for iou_type, m in metrics.items():
        lines.append(f"| {iou_type} | " + " | ".join(f"{100 * m[k]:.1f}" for k in METRIC_NAMES) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mrcnn.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--checkpoint", required=True, help="our checkpoint.pt or a torchvision Mask R-CNN one")
    add_data_args(parser)
    parser.add_argument("--out", default=None, help="folder for metrics.json and results.json "
                        "(default: the checkpoint's folder)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    add_device_args(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]] | None:
    args = parse_args(argv)
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
        out_dir = Path(args.out or Path(args.checkpoint).parent)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(metrics, out_dir / "metrics.json")
        write_json(results, out_dir / "results.json")
        print(format_metrics(metrics))
        print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'results.json'}")
        return metrics


def cli() -> None:
    """Console entry point: a bad checkpoint is one line naming it and exit status 1."""
    reexec_for_cpu("mrcnn.evaluate")
    try:
        main()
    except CheckpointError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
