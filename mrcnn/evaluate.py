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
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

import kernels

from .checkpoint import CheckpointError, load_model
from .data import build_dataset, coco_evaluate, coco_ground_truth, collate_list, to_coco_results
from .model import MaskRCNN

__all__ = ["evaluate", "format_metrics", "main", "predict_dataset"]

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _base(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


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
    label_to_cat = _base(dataset).label_to_cat
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


def write_text(text: str, path: str | os.PathLike) -> None:
    """``text`` to ``path`` through a temporary file and ``os.replace``: readers, and a process that dies
    while writing, see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """JSON to ``path``, atomically (``write_text``)."""
    write_text(json.dumps(obj, indent=1), path)


def build_eval_dataset(args: argparse.Namespace, config_image_size: int | None = None) -> Dataset:
    """The evaluation dataset named by ``--data`` (``shapes`` val split, or ``--val-ann``/``--val-images``),
    cut to the first ``--val-size`` images when given."""
    if args.data == "shapes":
        size = args.image_size or config_image_size or 128
        dataset: Dataset = build_dataset("shapes", "val", num_images=args.val_size or 200, image_size=size,
                                         seed=args.data_seed)  # fmt: skip
    else:
        if not (args.val_ann and args.val_images):
            raise SystemExit("error: --data coco needs --val-ann and --val-images for evaluation")
        dataset = build_dataset("coco", "val", ann_file=args.val_ann, image_dir=args.val_images)
        if args.val_size:
            dataset = Subset(dataset, range(min(args.val_size, len(dataset))))
    return dataset


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The evaluation data options shared by ``mrcnn.train`` and ``mrcnn.evaluate``."""
    parser.add_argument("--data", choices=("shapes", "coco"), default="shapes",
                        help="built-in synthetic shapes (default) or COCO-format files")  # fmt: skip
    parser.add_argument("--val-ann", help="COCO instances JSON to evaluate on (--data coco)")
    parser.add_argument("--val-images", help="image folder of --val-ann")
    parser.add_argument("--val-size", type=positive_int, default=None,
                        help="evaluate on the first N images (shapes: the val split's size, default 200)")  # fmt: skip
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="shapes only: image side in pixels (default: the model's min_size; 128)")  # fmt: skip
    parser.add_argument("--data-seed", type=int, default=0, help="shapes only: the dataset's seed")


# Set for CPU runs by ``reexec_for_cpu`` where the user has not set them. Measured on a 2-core machine, one
# training step of the shapes preset with 2 threads:
#   idle machine:              default 0.37 s, GOMP_SPINCOUNT=10000 0.38 s, OMP_WAIT_POLICY=PASSIVE 0.52 s
#   3 busy processes beside:   default 3.3 s,  GOMP_SPINCOUNT=10000 1.4 s,  OMP_WAIT_POLICY=PASSIVE 1.2 s
# GNU OpenMP's threads spin ~300,000 times before they sleep; on a shared CPU the spinning thread holds
# the core its sibling needs. A short spin keeps the idle speed and most of the loaded one. MKL's GEMMs
# otherwise differ in the last bit between processes (memory alignment), which would break bit-exact
# --resume; strict conditional numerical reproducibility costs nothing measurable here. (Not glibc's
# MALLOC_TRIM_THRESHOLD_: setting it freezes malloc's mmap threshold at 128 KiB, and page faults then
# doubled the step time.)
CPU_ENV = {"GOMP_SPINCOUNT": "10000", "MKL_CBWR": "AUTO,STRICT"}


def reexec_for_cpu(module: str) -> None:
    """Re-run this command (``python -m module``) with the ``CPU_ENV`` variables the user has not set (no
    ``GOMP_SPINCOUNT`` when ``OMP_WAIT_POLICY`` is set), when there is no GPU.

    They are read when the OpenMP runtime and MKL start, i.e. before ``import torch``: hence the
    restart (``os.execv`` keeps the pid, so torchrun still tracks the process).
    """
    if torch.cuda.is_available():
        return
    missing = {k: v for k, v in CPU_ENV.items() if k not in os.environ}
    if "OMP_WAIT_POLICY" in os.environ:
        missing.pop("GOMP_SPINCOUNT", None)
    if not missing:
        return
    os.environ.update(missing)
    os.execv(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mrcnn.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--checkpoint", required=True, help="our checkpoint.pt or a torchvision Mask R-CNN one")
    add_data_args(parser)
    parser.add_argument("--out", default=None, help="folder for metrics.json and results.json "
                        "(default: the checkpoint's folder)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                        help="kernels' implementation: auto = Triton on CUDA, torch on CPU")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]] | None:
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world_size = 0, 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    try:
        model, _ = load_model(args.checkpoint, device=device)
        dataset = build_eval_dataset(args, model.config.min_size)
        backend = kernels.use_backend(args.backend) if args.backend != "auto" else contextlib.nullcontext()
        with backend:
            out = evaluate(model, dataset, batch_size=args.batch_size, workers=args.workers, rank=rank,
                           world_size=world_size, progress=rank == 0)  # fmt: skip
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
    finally:
        if distributed:
            dist.destroy_process_group()


def cli() -> None:
    """Console entry point: a bad checkpoint is one line naming it and exit status 1."""
    reexec_for_cpu("mrcnn.evaluate")
    try:
        main()
    except CheckpointError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
