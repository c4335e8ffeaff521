"""Train a Mask R-CNN: ``python -m mrcnn.train`` (built-in shapes, CPU or GPU) or ``--data coco``.

With no arguments it trains the calibrated shapes preset (ResNet-18, FPN width 64, 128 px images) and
evaluates on the held-out val split; the same command uses the GPU when there is one. Multi-process:
``torchrun --nproc_per_node=N -m mrcnn.train ...`` (DistributedDataParallel, NCCL on GPU, gloo on CPU).

Outputs in ``--out`` (default ``runs/<date-time>``), written by rank 0 only:

* ``log.jsonl``: one JSON object per logged step (``step``, ``epoch``, ``lr``, ``loss`` and the five
  losses, ``grad_norm``, ``images_per_s``, ``step_time`` and ``time`` in seconds, ``skipped``);
* ``loss.png``: the loss curves;
* ``metrics.json``: COCOeval bbox and segm metrics of the latest evaluation and the history of all;
* ``checkpoint.pt``: model, optimizer, scheduler, scaler, step, sampler position, RNG states and the
  config, written atomically (temporary file + ``os.replace``).

Determinism and resume. The data order is a permutation per epoch drawn from ``(seed, epoch)``; the
global batch of step ``s`` is cut into ``world_size * accum_steps`` shards of ``--batch-size`` images,
shard ``k = rank * accum_steps + a``. Before each shard's forward pass the torch RNG (the fg/bg sampling
of the RPN and box heads) is seeded from ``(seed, step, k)``. So a step's computation depends only on
``(seed, step)`` and the weights: ``--resume`` continues bit-for-bit on CPU (checked by the tests), and
it does not depend on how the shards are laid out over processes.

Distributed equivalence. Each loss is a mean over its shard's sampled anchors / RoIs / positives (as in
torchvision), and DDP averages the ranks' gradients. So ``N`` ranks x ``--batch-size b`` computes exactly
what one process computes with ``--batch-size b --accum-steps N`` (same shards, same RNG, gradients
averaged over shards), up to float rounding in the all-reduce: the tests check losses and weights.
It is *not* the same as one process with ``--batch-size N*b``: there each loss is normalised by the
counts of the whole batch (a weighted rather than a plain mean of the shards' losses) and the sampling
draws differ. BatchNorm (trainable in the from-scratch presets) normalises per shard in both layouts;
its running statistics are rank 0's under DDP (``broadcast_buffers``), while accumulation updates them
once per micro-batch.

No host in the loop. A step reads nothing back from the device: the DataLoader workers check and pad the batch
(``collate``), the main process copies it to the device, and the step's losses, gradient norm and learning rate
(a tensor the optimizer reads) stay on the device until the trainer reads them, every ``--log-every`` steps and
before a checkpoint or an evaluation (``mrcnn.step``; tests/mrcnn/test_host_reads.py counts the reads).

Non-finite values. A step whose loss (or, without fp16 loss scaling, gradient) is NaN/inf leaves the weights,
the optimizer state and the BatchNorm buffers as they were, decided on the device (the fused optimizers'
``found_inf``, as ``GradScaler`` skips a step). At the next read training stops with an error naming that step,
before any checkpoint is written after it. Bad ground truth (a NaN box, a label out of range, ...) stops it
earlier, when the step's batch arrives from ``collate``, naming the step, the image and the field
(``engine.BadTargetError``). ``--skip-nonfinite`` goes on instead, printing a line for each such step at the
read, and logs them ``skipped``.

Compilation. ``torch.compile(model, fullgraph=True)`` of the training forward is on by default with CUDA
only. On a 2-core CPU, inductor's first (cold-cache) compile of the shapes preset's training graph took
58 s, and the compiled step was 0.51 s against 0.59 s eager on a quiet machine (0.94 s against 0.95 s on
a busy one): it pays back after 700+ steps at best, about nothing over the 1200-step default, at the price
of a minute's stall and a C++ compiler as a requirement. ``--compile`` opts in.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from .checkpoint import CheckpointError, load_checkpoint, load_training_checkpoint, model_state
from .cli import (
    ArgumentParser,
    Process,
    add_data_args,
    add_device_args,
    base_dataset,
    build_eval_dataset,
    existing_dir,
    existing_file,
    run_cli,
    use_backend,
)
from .config import MaskRCNNConfig, check_field
from .convert import infer_config
from .data import build_dataset
from .engine import NonFiniteError, Trainer, TrainingSetup
from .model import MaskRCNN

__all__ = ["SHAPES_PRESET", "build_config", "cli", "main", "parse_args", "prepare"]


# The shapes preset: sized so that the default run trains from scratch on a 2-core CPU within the time
# and AP budget documented in the README (see ``--help``). Narrow FPN and heads, small images, few
# proposals and sampled RoIs: the 4-conv mask head and RoIAlign backward dominate a CPU step.
SHAPES_PRESET: dict[str, Any] = dict(
    backbone="resnet18",
    fpn_channels=64,
    representation_size=256,
    min_size=128,
    max_size=128,
    max_gt_objects=8,
    anchor_sizes=(16, 32, 64, 128, 256),
    rpn_pre_nms_top_n_train=600,
    rpn_post_nms_top_n_train=300,
    rpn_pre_nms_top_n_test=300,
    rpn_post_nms_top_n_test=150,
    rpn_batch_size_per_image=128,
    box_batch_size_per_image=64,
    box_candidates_per_img=200,
    detections_per_img=20,
)
SHAPES_DEFAULTS = dict(iters=1200, batch_size=4, lr=2e-3, optimizer="adamw", weight_decay=1e-4, warmup_iters=50,
                       train_size=20000)  # fmt: skip
# lr None: torchvision's 0.02 per 16 images, scaled to the global batch (see prepare).
COCO_DEFAULTS = dict(iters=90000, batch_size=2, lr=None, optimizer="sgd", weight_decay=1e-4, warmup_iters=1000,
                     train_size=None)  # fmt: skip

# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _config_override(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` with VALUE a Python literal (or a bare string), checked against the field's type and
    range here, so that ``fpn_channels=wide`` is a usage error rather than a failure deep inside torch."""
    key, sep, value = text.partition("=")
    fields = MaskRCNNConfig.__dataclass_fields__
    if not sep or key not in fields:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, FIELD a MaskRCNNConfig field; got {text!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value  # a bare string such as backbone=resnet34
    return key, _checked(key, parsed, text)


def _checked(field: str, value: Any, text: str) -> Any:
    """``check_field`` as an argparse type: a bad value is a usage error that quotes the argument."""
    try:
        return check_field(field, value)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{text}: {e}") from e


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m mrcnn.train", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_data_args(p)
    p.add_argument("--ann", type=existing_file, help="COCO instances JSON to train on (--data coco)")
    p.add_argument("--images", type=existing_dir, help="image folder of --ann")
    p.add_argument("--train-size", type=int, default=None,
                   help="shapes: training images (default 20000, drawn on the fly); coco: use the first N")  # fmt: skip
    p.add_argument("--out", default=None, help="output folder (default runs/<date-time>)")
    p.add_argument("--iters", type=int, default=None, help="optimizer steps (shapes 1200, coco 90000)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="end this run after this step (with a checkpoint), as if interrupted; --resume goes on")
    p.add_argument("--batch-size", type=int, default=None, help="images per process per micro-batch (shapes 4, coco 2)")
    p.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step (gradients averaged)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=None,
                   help="shapes: adamw, coco: sgd (momentum 0.9)")  # fmt: skip
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="peak learning rate (shapes 2e-3 with adamw; coco 0.02/16 per image with sgd)")  # fmt: skip
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--schedule", choices=("step", "cosine"), default="cosine",
                   help="after warm-up: cosine to 0, or step (x0.1 at 2/3 and 8/9 of --iters)")  # fmt: skip
    p.add_argument("--warmup-iters", type=int, default=None, help="linear warm-up from lr/1000 (shapes 50, coco 1000)")
    p.add_argument("--clip-grad", type=float, default=0.0, help="clip the gradient norm to this (0: no clipping)")
    p.add_argument("--backbone", type=lambda text: _checked("backbone", text, text), default=None,
                   help="torchvision ResNet name (shapes resnet18, coco resnet50)")  # fmt: skip
    p.add_argument("--set", dest="overrides", type=_config_override, action="append", default=[],
                   metavar="FIELD=VALUE", help="set a MaskRCNNConfig field, e.g. --set fpn_channels=128")  # fmt: skip
    p.add_argument("--init", default=None, type=existing_file,
                   help="initial weights: our checkpoint, a torchvision Mask R-CNN checkpoint, or a torchvision "
                   "ResNet (ImageNet) state dict for the backbone")  # fmt: skip
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                   help="autocast dtype; fp16 uses a GradScaler")  # fmt: skip
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile(model, fullgraph=True) for training (default: on with CUDA; off on CPU, "
                   "where inductor's minute of compiling does not pay back over the default run)")  # fmt: skip
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (inductor; aot_eager or eager to debug tracing)")  # fmt: skip
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--no-eval", action="store_true", help="no evaluation at all")
    p.add_argument("--checkpoint-every", type=int, default=500, help="write checkpoint.pt every N steps and at the end")
    p.add_argument("--log-every", type=int, default=None,
                   help="read the steps' losses back and write a log.jsonl line every N steps (default: 1 on CPU, "
                   "20 on CUDA; the steps in between never wait for the device)")  # fmt: skip
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (default: --out/checkpoint.pt)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="weights, data order and sampling")
    add_device_args(p)
    p.add_argument("--workers", type=int, default=None, help="DataLoader processes (default: 1 on CPU, 4 on CUDA)")
    p.add_argument("--skip-nonfinite", action="store_true", help="skip steps with a NaN/inf loss instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    defaults = SHAPES_DEFAULTS if args.data == "shapes" else COCO_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("iters", "batch_size", "accum_steps", "log_every", "checkpoint_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.data == "coco" and not (args.ann and args.images):
        p.error("--data coco needs --ann and --images (and --val-ann, --val-images to evaluate)")
    return args


# ----------------------------------------------------------------------------------------------
# Config, initial weights, data: the run the options describe
# ----------------------------------------------------------------------------------------------


def _is_resnet_state(state: Any) -> bool:
    return isinstance(state, dict) and "conv1.weight" in state and "layer1.0.conv1.weight" in state


def load_init_state(path: str) -> dict[str, torch.Tensor]:
    """``--init``'s weights (the checkpoint itself or its ``"model"`` entry): a torchvision ResNet state dict
    for the backbone, or a Mask R-CNN one; ``CheckpointError`` naming the file otherwise."""
    ckpt = load_checkpoint(path)
    state = ckpt.get("model", ckpt)
    return state if _is_resnet_state(state) else model_state(ckpt, path)


def check_resume_options(args: argparse.Namespace, config: MaskRCNNConfig, path: Path) -> None:
    """A resumed run continues the checkpoint's model: an option that would build another one is an error
    rather than silently ignored (options that agree with the checkpoint are fine)."""
    if args.init:
        raise CheckpointError(f"--init {args.init} with --resume: the run continues from {path}'s weights")
    requested = [(f"--backbone {args.backbone}", "backbone", args.backbone)] if args.backbone else []
    requested += [(f"--set {k}={v!r}", k, v) for k, v in args.overrides]
    conflicts = [f"{option} (the checkpoint has {getattr(config, k)!r})" for option, k, v in requested
                 if getattr(config, k) != v]  # fmt: skip
    if conflicts:
        raise CheckpointError(f"--resume from {path} keeps the checkpoint's config, which conflicts with "
                              f"{'; '.join(conflicts)}: drop these options, or train into a new --out")  # fmt: skip


def build_config(args: argparse.Namespace, num_classes: int, init_state: dict | None) -> MaskRCNNConfig:
    """The preset of ``--data``, then ``--backbone``, then what ``--init``'s weights fix, then ``--set``."""
    fields: dict[str, Any] = dict(SHAPES_PRESET) if args.data == "shapes" else {}
    fields["num_classes"] = num_classes
    if args.data == "shapes" and args.image_size:
        fields["min_size"] = fields["max_size"] = args.image_size
    if args.backbone:
        fields["backbone"] = args.backbone
    elif args.data == "coco":
        fields["backbone"] = "resnet50"
    # From scratch, BatchNorm must train and every layer with it (torchvision does the same for
    # weights=None); pretrained weights get torchvision's frozen BN and 3 trainable stages.
    pretrained = init_state is not None
    fields["frozen_batchnorm"] = pretrained
    fields["trainable_backbone_layers"] = 3 if pretrained else 5
    config = MaskRCNNConfig(**fields)
    if init_state is not None and not _is_resnet_state(init_state):
        head_classes = init_state["roi_heads.box_predictor.cls_score.weight"].shape[0]
        config = dataclasses.replace(infer_config(init_state, config), num_classes=num_classes)
        if head_classes != num_classes:
            print(f"--init has {head_classes} classes, the data {num_classes}: the class-specific layers start fresh")
    return dataclasses.replace(config, **dict(args.overrides))


def _load_init(model: MaskRCNN, state: dict[str, torch.Tensor]) -> None:
    """Initial weights: a ResNet state dict goes to the backbone's body; a Mask R-CNN one everywhere its
    shapes fit (the class-specific predictors are left fresh when the class count differs)."""
    if _is_resnet_state(state):
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        model.backbone.body.load_state_dict(state, strict=True)
        return
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing, unexpected = model.load_state_dict(fitting, strict=False)
    allowed = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")
    bad = [k for k in missing if not k.startswith(allowed)] + list(unexpected)
    if bad:
        raise ValueError(f"--init does not fit the model: {len(bad)} tensors missing or unexpected, e.g. {bad[:3]}")


def build_train_dataset(args: argparse.Namespace) -> Dataset:
    if args.data == "shapes":
        size = args.image_size or SHAPES_PRESET["min_size"]
        return build_dataset("shapes", "train", num_images=args.train_size, image_size=size, seed=args.data_seed)
    dataset = build_dataset("coco", "train", ann_file=args.ann, image_dir=args.images)
    if args.train_size:
        dataset = Subset(dataset, range(min(args.train_size, len(dataset))))
    return dataset


def prepare(args: argparse.Namespace, process: Process,
            build_model: Callable[[MaskRCNNConfig], nn.Module]) -> TrainingSetup:  # fmt: skip
    """What the options make of a run, without changing them: the output folder (``--out``, the resumed
    checkpoint's folder, or a fresh ``runs/<date-time>`` that rank 0 names), the learning rate, the checkpoint
    to continue from, the data, the config and the initial model."""
    checkpoint_path = None
    if args.resume is not None:
        checkpoint_path = Path(args.resume or Path(args.out or ".") / "checkpoint.pt")
    if args.out:
        out = Path(args.out)
    elif checkpoint_path is not None:
        out = checkpoint_path.parent
    else:
        out = Path(process.broadcast(f"runs/{datetime.datetime.now():%Y%m%d-%H%M%S}"))
    # torchvision's 0.02 per 16 images, scaled to the global batch (the COCO default).
    lr = args.lr if args.lr is not None else 0.02 * args.batch_size * args.accum_steps * process.world_size / 16
    checkpoint, config = None, None
    if checkpoint_path is not None:
        checkpoint, config = load_training_checkpoint(checkpoint_path)
        check_resume_options(args, config, checkpoint_path)
    dataset = build_train_dataset(args)
    val_dataset = None if args.no_eval else build_eval_dataset(args, SHAPES_PRESET["min_size"])
    init_state = load_init_state(args.init) if checkpoint is None and args.init else None
    if config is None:
        config = build_config(args, base_dataset(dataset).num_classes + 1, init_state)
    torch.manual_seed(args.seed)  # the initial weights
    model = build_model(config)
    if init_state is not None:
        _load_init(model, init_state)
    if process.is_main:  # only now: a file that cannot be loaded leaves no empty run folder behind
        out.mkdir(parents=True, exist_ok=True)
    return TrainingSetup(out=out, lr=lr, config=config, model=model, dataset=dataset, val_dataset=val_dataset,
                         checkpoint=checkpoint, checkpoint_path=checkpoint_path)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def main(
    argv: Sequence[str] | None = None, *, build_model: Callable[[MaskRCNNConfig], nn.Module] = MaskRCNN
) -> dict[str, Any]:
    """Train as the command line ``argv`` says; returns ``{"out", "step", "metrics", "wall_time", "first_step_s"}``
    (rank 0's metrics of the last evaluation, ``None`` elsewhere; the seconds from the process's start to the end
    of its first step, ``None`` where ``/proc`` is missing).

    ``build_model(config)`` makes the model (``bench/train_compare.py`` passes torchvision's): a module with
    ``config``, ``forward(*batch)`` returning the five losses in training mode for a ``batch`` of
    ``mrcnn.collate(images, targets, config)`` (or of the class's own static ``collate_batch`` with that
    signature, run on the CPU in the DataLoader workers), and ``predict(images)`` in torchvision's output format.
    """
    args = parse_args(argv)
    with Process(args.device) as process, use_backend(args.backend):
        return Trainer(args, process, prepare(args, process, build_model)).run_training()


def cli(argv: Sequence[str] | None = None) -> None:
    """Console entry point: a user's mistake (``mrcnn.cli.run_cli``) or a non-finite step is one ``error:`` line
    and exit status 1."""
    run_cli(main, argv, errors=(NonFiniteError,))


if __name__ == "__main__":
    cli()
