"""Training, ours against torchvision: the same data, data order, schedule, budget and initial weights.

``python -m bench.train_compare [--quick] [--iters N] [--out DIR] [-- extra mrcnn.train options]``

Both models go through ``mrcnn.train.main`` (so the loop, optimizer, sampling seeds, evaluation and logs
are the same code); only the model differs:

* ``ours``: ``mrcnn.MaskRCNN`` (static shapes, ``kernels``' ops; ``torch.compile`` on CUDA by default);
* ``torchvision``: ``torchvision.models.detection.MaskRCNN`` built from the same ``MaskRCNNConfig`` (same
  ResNet-FPN, anchors, RPN and RoI-head sizes, heads of the same widths), loaded with our model's initial
  weights (the state dicts share their names), always eager (it does not compile with ``fullgraph``).

Prints one table: steps, training time (the sum of step times), images/s, process CPU time, wall time
with evaluation, and COCO bbox/segm AP on the held-out split. ``--quick`` is a smoke test (tiny images,
4 steps). The default budget, 300 steps of the shapes preset, takes a few minutes per model on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNNBase
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from mrcnn import MaskRCNN, MaskRCNNConfig, train
from mrcnn.backbone import build_backbone
from mrcnn.cli import reexec_for_cpu

QUICK = [
    "--image-size", "64", "--train-size", "64", "--val-size", "4", "--batch-size", "2", "--iters", "4",
    "--warmup-iters", "2", "--set", "fpn_channels=32", "--set", "representation_size=64",
    "--set", "rpn_pre_nms_top_n_train=100", "--set", "rpn_post_nms_top_n_train=50",
    "--set", "rpn_pre_nms_top_n_test=100", "--set", "rpn_post_nms_top_n_test=50",
    "--set", "box_batch_size_per_image=32", "--set", "detections_per_img=10",
]  # fmt: skip


def _as_lists(images: list[Tensor], targets: list[dict], config: MaskRCNNConfig) -> tuple:
    """torchvision's model resizes and pads itself: its training batch stays two lists."""
    return images, None, targets


class TorchvisionMaskRCNN(TorchvisionMaskRCNNBase):
    """torchvision's Mask R-CNN built from a ``MaskRCNNConfig`` (v1 heads), with the interface that
    ``mrcnn.train`` drives: ``collate_batch``, ``forward(images, image_sizes, targets)`` and ``predict``."""

    collate_batch = staticmethod(_as_lists)

    def __init__(self, config: MaskRCNNConfig) -> None:
        if config.head != "v1":
            raise ValueError("the comparison builds torchvision's v1 heads")
        c, width, levels = config, config.fpn_channels, ["0", "1", "2", "3"]
        super().__init__(
            build_backbone(c), num_classes=None, min_size=c.min_size, max_size=c.max_size,
            image_mean=list(c.image_mean), image_std=list(c.image_std),
            rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in c.anchor_sizes),
                                                 (c.aspect_ratios,) * len(c.anchor_sizes)),
            rpn_head=RPNHead(width, len(c.aspect_ratios)),
            rpn_pre_nms_top_n_train=c.rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=c.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=c.rpn_post_nms_top_n_train, rpn_post_nms_top_n_test=c.rpn_post_nms_top_n_test,
            rpn_nms_thresh=c.rpn_nms_thresh, rpn_fg_iou_thresh=c.rpn_fg_iou_thresh,
            rpn_bg_iou_thresh=c.rpn_bg_iou_thresh, rpn_batch_size_per_image=c.rpn_batch_size_per_image,
            rpn_positive_fraction=c.rpn_positive_fraction, rpn_score_thresh=c.rpn_score_thresh,
            box_roi_pool=MultiScaleRoIAlign(levels, c.box_roi_size, c.pooler_sampling_ratio),
            box_head=TwoMLPHead(width * c.box_roi_size**2, c.representation_size),
            box_predictor=FastRCNNPredictor(c.representation_size, c.num_classes),
            box_score_thresh=c.box_score_thresh, box_nms_thresh=c.box_nms_thresh,
            box_detections_per_img=c.detections_per_img, box_fg_iou_thresh=c.box_fg_iou_thresh,
            box_bg_iou_thresh=c.box_bg_iou_thresh, box_batch_size_per_image=c.box_batch_size_per_image,
            box_positive_fraction=c.box_positive_fraction, bbox_reg_weights=c.bbox_reg_weights,
            mask_roi_pool=MultiScaleRoIAlign(levels, c.mask_roi_size, c.pooler_sampling_ratio),
            mask_head=MaskRCNNHeads(width, [width] * 4, 1),
            mask_predictor=MaskRCNNPredictor(width, width, c.num_classes),
        )  # fmt: skip
        self.config = config
        # The same initial weights as ours: build ours from the same RNG state and copy them.
        self.load_state_dict(MaskRCNN(config).state_dict(), strict=True)

    def forward(self, images, image_sizes=None, targets=None):  # noqa: ANN001 (torchvision's types)
        return super().forward(images, targets)

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            return super().forward([im.to(device) for im in images])
        finally:
            self.train(was_training)


def _summary(out: Path, wall: float, cpu: float) -> dict:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    metrics = json.loads((out / "metrics.json").read_text())
    train_time = sum(r["step_time"] for r in records)
    last = records[-20:]
    return {
        "steps": len(records),
        "train_s": train_time,
        "images_per_s": sum(r["images_per_s"] * r["step_time"] for r in records) / train_time,
        "cpu_s": cpu,
        "wall_s": wall,
        "bbox_AP": metrics["bbox"]["AP"],
        "segm_AP": metrics["segm"]["AP"],
        "segm_AP50": metrics["segm"]["AP50"],
        "final_loss": sum(r["loss"] for r in last) / len(last),
    }


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.train_compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny images, 4 steps")
    parser.add_argument("--iters", type=int, default=None, help="steps per model (default 300; --quick 4)")
    parser.add_argument("--out", default=f"runs/train_compare-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--providers", default="ours,torchvision", help="comma-separated, run in this order")
    parser.add_argument("extra", nargs="*", help="more mrcnn.train options (after --)")
    args = parser.parse_args(argv)
    base = [*QUICK] if args.quick else []
    iters = args.iters or (4 if args.quick else 300)
    base += ["--iters", str(iters), "--no-progress", *args.extra]
    builders = {"ours": MaskRCNN, "torchvision": TorchvisionMaskRCNN}
    results = {}
    for name in args.providers.split(","):
        out = Path(args.out) / name
        extra = ["--no-compile"] if name == "torchvision" else []
        w0, c0 = time.perf_counter(), time.process_time()
        train.main([*base, *extra, "--out", str(out)], build_model=builders[name])
        results[name] = _summary(out, time.perf_counter() - w0, time.process_time() - c0)
    threads = torch.get_num_threads()
    device = f"cuda: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else f"cpu, {threads} threads"
    print(f"\nMask R-CNN training, {iters} steps each, {device}, torch {torch.__version__}")
    print("| model | steps | train s | images/s | CPU s | wall s (with eval) | bbox AP | segm AP | segm AP50 | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['steps']} | {r['train_s']:.0f} | {r['images_per_s']:.2f} | {r['cpu_s']:.0f} | "
              f"{r['wall_s']:.0f} | {100 * r['bbox_AP']:.1f} | {100 * r['segm_AP']:.1f} | {100 * r['segm_AP50']:.1f} | "
              f"{r['final_loss']:.3f} |")  # fmt: skip
    (Path(args.out) / "summary.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    reexec_for_cpu()  # the same CPU environment as python -m mrcnn.train
    main(sys.argv[1:])
