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

Non-finite values. A NaN/inf loss (or, without fp16 loss scaling, gradient) stops training with an error
naming the step before the optimizer touches the weights; the last checkpoint stays as it was.
``--skip-nonfinite`` skips such steps instead (no update, BatchNorm statistics restored) and logs them.

Compilation. ``torch.compile(model, fullgraph=True)`` of the training forward is on by default with CUDA
only. On a 2-core CPU, inductor's first (cold-cache) compile of the shapes preset's training graph took
58 s, and the compiled step was 0.51 s against 0.59 s eager on a quiet machine (0.94 s against 0.95 s on
a busy one): it pays back after 700+ steps at best, about nothing over the 1200-step default, at the price
of a minute's stall and a C++ compiler as a requirement. ``--compile`` opts in.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

import kernels

from .checkpoint import (
    CheckpointError,
    atomic_save,
    load_checkpoint,
    load_training_checkpoint,
    model_state,
    rng_state,
    set_rng_state,
)
from .config import MaskRCNNConfig, check_field
from .data import build_dataset, collate_list
from .evaluate import (
    add_data_args,
    build_eval_dataset,
    evaluate,
    format_metrics,
    reexec_for_cpu,
    write_json,
    write_text,
)
from .model import MaskRCNN, infer_config

__all__ = ["NonFiniteError", "SHAPES_PRESET", "Schedule", "ShardSampler", "Trainer", "main", "shard_seed"]

LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")

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
# lr None: torchvision's 0.02 per 16 images, scaled to the global batch (see _train).
COCO_DEFAULTS = dict(iters=90000, batch_size=2, lr=None, optimizer="sgd", weight_decay=1e-4, warmup_iters=1000,
                     train_size=None)  # fmt: skip


class NonFiniteError(FloatingPointError):
    """A NaN or infinite loss or gradient; the message names the step."""


# ----------------------------------------------------------------------------------------------
# Data order, RNG, schedule
# ----------------------------------------------------------------------------------------------


def shard_seed(seed: int, step: int, shard: int) -> int:
    """The torch seed of shard ``shard`` of step ``step``: independent streams for every (seed, step, shard)."""
    return int(np.random.SeedSequence([seed, step, shard]).generate_state(1, dtype=np.uint64)[0] >> 1)


class ShardSampler(Sampler[list[int]]):
    """Batches of dataset indices for one rank, from ``start_step`` to ``iters``, ``accum_steps`` per step.

    Epoch ``e`` visits ``torch.randperm(n)`` drawn from ``(seed, e)``; each step takes the next
    ``G = batch_size * accum_steps * world_size`` indices of it (the remainder of an epoch is dropped), and
    this rank's micro-batch ``a`` is the slice ``k = rank * accum_steps + a`` of ``batch_size`` indices.
    """

    def __init__(self, n: int, *, batch_size: int, accum_steps: int, world_size: int, rank: int, seed: int,
                 start_step: int, iters: int) -> None:  # fmt: skip
        self.n, self.batch_size, self.accum_steps = n, batch_size, accum_steps
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.start_step, self.iters = start_step, iters
        self.global_batch = batch_size * accum_steps * world_size
        self.steps_per_epoch = n // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {n} images, fewer than one global batch of {self.global_batch}")

    def position(self, step: int) -> dict[str, int]:
        """Where step ``step`` (0-based) reads: epoch and batch within it."""
        return {"epoch": step // self.steps_per_epoch, "batch": step % self.steps_per_epoch, "seed": self.seed}

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(shard_seed(self.seed, epoch, -1 % 2**31))
        return torch.randperm(self.n, generator=g).tolist()

    def __len__(self) -> int:
        return (self.iters - self.start_step) * self.accum_steps

    def __iter__(self) -> Iterator[list[int]]:
        epoch, perm = None, []
        for step in range(self.start_step, self.iters):
            pos = self.position(step)
            if pos["epoch"] != epoch:
                epoch, perm = pos["epoch"], self._permutation(pos["epoch"])
            start = pos["batch"] * self.global_batch
            for a in range(self.accum_steps):
                k = self.rank * self.accum_steps + a
                yield perm[start + k * self.batch_size : start + (k + 1) * self.batch_size]


@dataclasses.dataclass
class Schedule:
    """Learning-rate factor of step ``s``: linear warm-up from ``warmup_factor`` over ``warmup_iters``, then
    ``step`` (x0.1 at each milestone) or ``cosine`` (to 0 at ``iters``). A dataclass, so that ``LambdaLR``
    stores it in its state dict."""

    kind: str
    iters: int
    warmup_iters: int
    warmup_factor: float = 1e-3
    milestones: tuple[int, ...] = ()

    def __call__(self, s: int) -> float:
        warm = 1.0
        if s < self.warmup_iters:
            alpha = s / self.warmup_iters
            warm = self.warmup_factor * (1 - alpha) + alpha
        if self.kind == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(s, self.iters) / self.iters))
        return warm * 0.1 ** sum(s >= m for m in self.milestones)


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
    p = argparse.ArgumentParser(prog="python -m mrcnn.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_data_args(p)
    p.add_argument("--ann", help="COCO instances JSON to train on (--data coco)")
    p.add_argument("--images", help="image folder of --ann")
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
    p.add_argument("--init", default=None,
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
    p.add_argument("--log-every", type=int, default=1, help="write a log.jsonl line every N steps")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (default: --out/checkpoint.pt)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="weights, data order and sampling")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="kernels' implementation: auto = Triton on CUDA, torch on CPU")  # fmt: skip
    p.add_argument("--workers", type=int, default=None, help="DataLoader processes (default: 1 on CPU, 4 on CUDA)")
    p.add_argument("--skip-nonfinite", action="store_true", help="skip steps with a NaN/inf loss instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    defaults = SHAPES_DEFAULTS if args.data == "shapes" else COCO_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("iters", "batch_size", "accum_steps", "log_every", "checkpoint_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.data == "coco" and not (args.ann and args.images):
        p.error("--data coco needs --ann and --images (and --val-ann, --val-images to evaluate)")
    return args


# ----------------------------------------------------------------------------------------------
# Model, data, optimizer
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


def _base_dataset(dataset: Dataset) -> Any:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def build_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum 0.9) or AdamW; no weight decay on norm layers' and biases' parameters."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    # fused: one kernel over all parameters (-10 % of a CPU step of the shapes preset).
    return torch.optim.AdamW(groups, lr=args.lr, fused=True)


def _params_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's and buffer's bytes: equal on all DDP ranks when they are in sync."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Logging helpers
# ----------------------------------------------------------------------------------------------


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl``. A torn last line (the process died while writing it) is dropped: its
    step comes after the last checkpoint, which is written after the step's line, so a resumed run redoes it.
    A bad line elsewhere is an error naming the file and line."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}: not a JSON record ({e})") from e
    return records


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """Total and per-term losses against the step, log scale; skipped steps left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if not r.get("skipped")]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    steps = [r["step"] for r in rows]
    for name in ("loss", *LOSS_NAMES):
        ax.plot(steps, [r[name] for r in rows], label=name, linewidth=2.0 if name == "loss" else 1.0)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


class _Run:
    """The state of one training process."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.distributed = self.world_size > 1
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.rank = 0
        if self.distributed:
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.rank = dist.get_rank()
        self.device = device
        self.is_main = self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _autocast(args: argparse.Namespace, device: torch.device) -> contextlib.AbstractContextManager:
    if args.amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def main(
    argv: Sequence[str] | None = None, *, build_model: Callable[[MaskRCNNConfig], nn.Module] = MaskRCNN
) -> dict[str, Any]:
    """Train as the command line ``argv`` says; returns ``{"out", "step", "metrics", "wall_time"}`` (rank 0's
    metrics of the last evaluation, ``None`` elsewhere).

    ``build_model(config)`` makes the model (``bench/train_compare.py`` passes torchvision's): a module with
    ``config``, ``collate(images, targets)``, ``forward(*collated)`` returning the five losses in training
    mode, and ``predict(images)`` in torchvision's output format.
    """
    args = parse_args(argv)
    run = _Run(args)
    backend = kernels.use_backend(args.backend) if args.backend != "auto" else contextlib.nullcontext()
    try:
        with backend:
            return Trainer(args, run, build_model).run_training()
    finally:
        if run.distributed:
            dist.destroy_process_group()


class Trainer:
    """One training process: model, data, optimizer and outputs, set up from the options (and the checkpoint
    when resuming); ``run()`` trains to the end (or ``--stop-at``)."""

    def __init__(self, args: argparse.Namespace, run: _Run, build_model: Callable[[MaskRCNNConfig], nn.Module]):
        self.t_start = time.perf_counter()
        self.args, self.run, self.device = args, run, run.device
        # Output folder and checkpoint to resume from (rank 0 names a fresh folder; the others follow).
        resume_path = None
        if args.resume is not None:
            resume_path = Path(args.resume or Path(args.out or ".") / "checkpoint.pt")
            args.out = args.out or str(resume_path.parent)
        if args.out is None:
            args.out = run.broadcast(f"runs/{datetime.datetime.now():%Y%m%d-%H%M%S}")
        self.out = Path(args.out)
        if run.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if args.lr is None:
            args.lr = 0.02 * args.batch_size * args.accum_steps * run.world_size / 16
        ckpt = None
        if resume_path is not None:
            ckpt, self.config = load_training_checkpoint(resume_path)
            check_resume_options(args, self.config, resume_path)
        self.dataset = build_train_dataset(args)
        self.val_dataset = None if args.no_eval else build_eval_dataset(args, SHAPES_PRESET["min_size"])
        init_state = load_init_state(args.init) if ckpt is None and args.init else None
        if ckpt is None:
            self.config = build_config(args, _base_dataset(self.dataset).num_classes + 1, init_state)

        torch.manual_seed(args.seed)  # the initial weights
        self.model = model = build_model(self.config)
        if init_state is not None:
            _load_init(model, init_state)
        model.to(self.device)
        self.optimizer = build_optimizer(args, model)
        milestones = (int(args.iters * 2 / 3), int(args.iters * 8 / 9))
        schedule = Schedule(args.schedule, args.iters, args.warmup_iters, milestones=milestones)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        self.step = 0
        self.records: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        if ckpt is not None:
            try:
                model.load_state_dict(ckpt["model"])
                self.optimizer.load_state_dict(ckpt["optimizer"])
                self.scheduler.load_state_dict(ckpt["scheduler"])
                self.scaler.load_state_dict(ckpt["scaler"])
                set_rng_state(ckpt["rng"])
            except (KeyError, RuntimeError, TypeError, ValueError) as e:
                what = f"{type(e).__name__}: {e}"
                raise CheckpointError(f"{resume_path}: cannot restore the training state: {what}") from e
            # The schedule's shape follows this command line (so that --iters can extend a run), not the file.
            self.scheduler.lr_lambdas = [schedule for _ in self.optimizer.param_groups]
            self.step = ckpt["step"]
            # Anything logged after the checkpoint (a crash between the two) is redone: drop it.
            self.records = [r for r in read_log(self.out / "log.jsonl") if "loss" in r and r["step"] <= self.step]
            metrics_file = self.out / "metrics.json"
            if metrics_file.exists():
                try:
                    history = json.loads(metrics_file.read_text())["history"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise ValueError(f"{metrics_file}: no metrics history to resume ({e!r})") from e
                self.history = [h for h in history if h["step"] <= self.step]

        self.train_model: nn.Module = model
        self.ddp = None
        if run.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device] if self.device.type == "cuda" else None
            )
            self.train_model = self.ddp
        use_compile = args.compile if args.compile is not None else self.device.type == "cuda"
        if use_compile:
            self.train_model = torch.compile(self.train_model, fullgraph=True, backend=args.compile_backend)

        self.sampler = ShardSampler(
            len(self.dataset), batch_size=args.batch_size, accum_steps=args.accum_steps, world_size=run.world_size,
            rank=run.rank, seed=args.seed, start_step=self.step, iters=min(args.iters, args.stop_at or args.iters),
        )  # fmt: skip
        if ckpt is not None and ckpt["sampler"] != self.sampler.position(self.step):
            raise ValueError(
                f"the checkpoint's data position {ckpt['sampler']} does not match step {self.step}'s "
                f"{self.sampler.position(self.step)}: resume with the same --batch-size, --accum-steps, world "
                "size and --seed"
            )
        self.workers = args.workers if args.workers is not None else (4 if self.device.type == "cuda" else 1)
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=collate_list,
                                 num_workers=self.workers, pin_memory=self.device.type == "cuda")  # fmt: skip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.float_buffers = [b for b in model.buffers() if b.is_floating_point()]

    # -- one optimizer step -------------------------------------------------------------------------

    def train_step(self, batches: Iterator[tuple[list, list]]) -> dict[str, Any]:
        """Forward and backward over this step's micro-batches, then the update (or the non-finite policy).
        Returns the step's record (losses averaged over micro-batches and ranks)."""
        args, run, model, device = self.args, self.run, self.model, self.device
        t0 = time.perf_counter()
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        saved_buffers = [b.clone() for b in self.float_buffers] if args.skip_nonfinite else None
        sums = torch.zeros(len(LOSS_NAMES), device=device)
        for a in range(args.accum_steps):
            images, targets = next(batches)
            torch.manual_seed(shard_seed(args.seed, self.step, run.rank * args.accum_steps + a))
            try:
                x, sizes, tgt = model.collate(images, targets)
            except (TypeError, ValueError) as e:
                # collate names the position in the batch; the dataset's image ids say which images those are.
                ids = [int(t["image_id"]) if "image_id" in t else None for t in targets]
                raise type(e)(f"step {self.step + 1}, batch of image_id {ids}: {e}") from e
            last = a == args.accum_steps - 1
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                with _autocast(args, device):
                    losses = self.train_model(x, sizes, tgt)
                stacked = torch.stack([losses[k].float() for k in LOSS_NAMES])
                self.scaler.scale(stacked.sum() / args.accum_steps).backward()
            sums += stacked.detach()
        if args.amp == "fp16":
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, args.clip_grad if args.clip_grad > 0 else math.inf)
        if run.distributed:
            dist.all_reduce(sums)
            sums /= run.world_size
        # One host sync per step: the logged values and the finiteness decision (the same on every rank,
        # since losses are all-reduced and gradients were averaged by DDP).
        values = torch.cat([sums / args.accum_steps, grad_norm.reshape(1).float().to(device)]).tolist()
        loss_values, gn = values[: len(LOSS_NAMES)], values[-1]
        finite_loss = all(math.isfinite(v) for v in loss_values)
        # fp16 loss scaling produces inf gradients by design: the scaler skips those steps itself.
        skipped = not (finite_loss and (math.isfinite(gn) or args.amp == "fp16"))
        if skipped:
            what = "loss" if not finite_loss else "gradient norm"
            detail = ", ".join(f"{k}={v:.4g}" for k, v in zip(LOSS_NAMES, loss_values, strict=True))
            if not args.skip_nonfinite:
                raise NonFiniteError(
                    f"non-finite {what} at step {self.step + 1} ({detail}, grad_norm={gn:.4g}); the weights were "
                    f"not updated and {self.out / 'checkpoint.pt'} is unchanged. Lower --lr, use --clip-grad, or "
                    "pass --skip-nonfinite to skip such steps."
                )
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_copy_(self.float_buffers, saved_buffers)
            print(f"step {self.step + 1}: non-finite {what} ({detail}); step skipped", file=sys.stderr, flush=True)
            if args.amp == "fp16":
                self.scaler.update()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step += 1
        dt = time.perf_counter() - t0
        return {
            "step": self.step, "epoch": self.sampler.position(self.step - 1)["epoch"], "lr": lr,
            "loss": sum(loss_values), **dict(zip(LOSS_NAMES, loss_values, strict=True)), "grad_norm": gn,
            "images_per_s": self.sampler.global_batch / dt, "step_time": dt,
            "time": time.perf_counter() - self.t_start, "skipped": skipped,
        }  # fmt: skip

    # -- evaluation and files -----------------------------------------------------------------------

    def sync_buffers(self) -> None:
        """Rank 0's BatchNorm statistics everywhere (DDP broadcasts them only at the start of a forward)."""
        if self.run.distributed:
            for b in self.model.buffers():
                dist.broadcast(b, 0)

    def save_checkpoint(self) -> None:
        self.sync_buffers()
        if not self.run.is_main:
            return
        base = _base_dataset(self.dataset)
        state = {
            "model": self.model.state_dict(),
            "config": self.config.to_dict(),
            "classes": list(base.classes),
            "label_to_cat": dict(base.label_to_cat),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "sampler": self.sampler.position(self.step),
            "rng": rng_state(),
            "args": {k: v for k, v in vars(self.args).items() if k not in ("resume", "stop_at")},
        }
        atomic_save(state, self.out / "checkpoint.pt")

    def evaluate(self) -> None:
        """COCOeval on the val data (collective); rank 0 writes metrics.json and the loss curve."""
        self.sync_buffers()
        result = evaluate(self.model, self.val_dataset, batch_size=self.args.batch_size,
                          workers=min(self.workers, 2), rank=self.run.rank, world_size=self.run.world_size,
                          progress=self.run.is_main and not self.args.no_progress)  # fmt: skip
        if result is None:
            return
        self.history.append({"step": self.step, **result[0]})
        write_json({**self.history[-1], "history": self.history}, self.out / "metrics.json")
        plot_losses(self.records, self.out / "loss.png")
        n = len(self.val_dataset)
        print(f"step {self.step}: COCO metrics on {n} val images\n{format_metrics(result[0])}", flush=True)

    def check_replicas(self) -> None:
        """Under DDP: every rank's weights and buffers hash the same (logged; an error if not)."""
        self.sync_buffers()
        digests: list[Any] = [None] * self.run.world_size
        dist.all_gather_object(digests, _params_digest(self.model))
        if self.run.is_main:
            in_sync = len(set(digests)) == 1
            with open(self.out / "log.jsonl", "a") as f:
                record = {"step": self.step, "event": "ddp_replicas", "digests": digests, "in_sync": in_sync}
                f.write(json.dumps(record) + "\n")
            if not in_sync:
                raise RuntimeError(f"DDP replicas diverged: parameter digests {digests}")

    # -- the loop -----------------------------------------------------------------------------------

    def run_training(self) -> dict[str, Any]:
        args, is_main, end = self.args, self.run.is_main, self.sampler.iters
        log_file, bar = None, None
        if is_main:
            # The kept records replace the file atomically: truncating it in place would lose the whole log
            # if the process died before rewriting it. New records are appended.
            write_text("".join(json.dumps(r) + "\n" for r in self.records), self.out / "log.jsonl")
            log_file = open(self.out / "log.jsonl", "a")  # noqa: SIM115 (closed in finally)
            if not args.no_progress:
                from tqdm import tqdm

                bar = tqdm(total=end, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        try:
            batches = iter(self.loader)
            while self.step < end:
                record = self.train_step(batches)
                if is_main:
                    self.records.append(record)
                    if self.step % args.log_every == 0 or self.step == end:
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.1f}",
                                        lr=f"{record['lr']:.2e}", refresh=False)  # fmt: skip
                        bar.update(1)
                due = (args.eval_every and self.step % args.eval_every == 0) or self.step == args.iters
                if due and not args.no_eval:
                    self.evaluate()
                if self.step % args.checkpoint_every == 0 or self.step == end:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if log_file is not None:
                log_file.close()
        if is_main:
            plot_losses(self.records, self.out / "loss.png")
        if self.run.distributed:
            self.check_replicas()
        wall = time.perf_counter() - self.t_start
        if is_main:
            print(f"done: {self.step} steps, {wall:.0f} s -> {self.out}", flush=True)
        metrics = self.history[-1] if self.history and is_main else None
        return {"out": str(self.out), "step": self.step, "metrics": metrics, "wall_time": wall}


def cli() -> None:
    """Console entry point: errors as one line and exit status 1."""
    reexec_for_cpu("mrcnn.train")
    try:
        main()
    except (NonFiniteError, CheckpointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
