"""One training step on the device, and what the host learns of it later.

A step never waits for the device: its batch arrives collated by the DataLoader workers (``TrainingCollate``),
its decisions stay tensors (``NonFiniteGuard``), and its losses, gradient norm, learning rate and non-finite
flag are one row kept on the device (``StepLog``) until the trainer reads the rows, every ``--log-every`` steps
and before a checkpoint or an evaluation. That read is where a non-finite step is reported, naming its step.

* ``TrainingCollate``: the DataLoader's ``collate_fn`` (worker processes): the model's padded inputs on the CPU,
  or a ``RefusedBatch`` carrying collate's error, which the main process raises as a ``BadTargetError`` naming
  the step.
* ``NonFiniteGuard``: a step whose loss (or, without fp16 loss scaling, gradient norm) is not finite leaves the
  weights, the optimizer state and the BatchNorm buffers as they were, through the fused optimizers'
  ``found_inf`` (as ``GradScaler`` skips a step) and a ``torch.where`` over the buffers.
* ``StepLog``: the device rows, turned into log records by one host read.
* ``run_step``: forward and backward over the micro-batches, clipping and the guarded update; the function
  ``mrcnn.graphs.Captured`` captures as one CUDA graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only

from .config import MaskRCNNConfig
from .transform import collate

__all__ = [
    "LOSS_NAMES", "BadTargetError", "NonFiniteError", "NonFiniteGuard", "RefusedBatch", "StepLog", "StepParts",
    "TrainingCollate", "forward_backward", "run_step", "to_device", "update",
]  # fmt: skip

LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
# A step's row on the device: the five losses (mean over micro-batches and ranks), the gradient norm, the
# non-finite flag (1.0 when the step was not applied) and the learning rate it used.
ROW_FIELDS = (*LOSS_NAMES, "grad_norm", "nonfinite", "lr")


class NonFiniteError(FloatingPointError):
    """A NaN or infinite loss or gradient; the message names the step."""


class BadTargetError(ValueError):
    """A training batch's ground truth that ``collate`` refused (its TypeError or ValueError, chained); the
    message names the step, the batch's image ids, the target's position in the batch and the field."""


# ----------------------------------------------------------------------------------------------
# The batch: collated in the workers, copied to the device in the main process
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RefusedBatch:
    """A batch that collate refused, as the workers return it: the main process, which knows the step, raises it."""

    image_ids: list[int | None]
    error: Exception

    def raise_for(self, step: int) -> None:
        raise BadTargetError(f"step {step}, batch of image_id {self.image_ids}: {self.error}") from self.error


class TrainingCollate:
    """The training DataLoader's ``collate_fn``, run in its worker processes: ``(image, target)`` items ->
    ``collate_batch(images, targets, config)`` on the CPU (``mrcnn.collate`` unless the model class defines its
    own ``collate_batch``), so that the checks of the ground truth (one host read per batch) and the padding
    happen outside the main process. A batch it refuses comes back as a ``RefusedBatch``, with the dataset's
    image ids (collate names the position in the batch and the field)."""

    def __init__(self, config: MaskRCNNConfig, collate_batch: Callable[..., Any] = collate) -> None:
        self.config, self.collate_batch = config, collate_batch

    def __call__(self, items: list[tuple[Tensor, dict[str, Any]]]) -> Any:
        images = [image for image, _ in items]
        targets = [target for _, target in items]
        try:
            return self.collate_batch(images, targets, self.config)
        except (TypeError, ValueError) as e:
            ids = [int(t["image_id"]) if isinstance(t, dict) and "image_id" in t else None for t in targets]
            return RefusedBatch(ids, e)


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of ``batch`` (tuples, lists, dicts) on ``device``, copied without waiting for the copy
    (the DataLoader pins the batch on CUDA)."""
    return tree_map_only(Tensor, lambda t: t.to(device, non_blocking=True), batch)


# ----------------------------------------------------------------------------------------------
# Non-finite steps, decided on the device
# ----------------------------------------------------------------------------------------------


def changing_buffers(model: nn.Module) -> list[Tensor]:
    """The buffers a training forward changes: BatchNorm's running statistics and counters."""
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers(False)]


class NonFiniteGuard:
    """Makes a step with a non-finite loss (or gradient norm) a no-op, without reading the flag on the host.

    ``begin()`` before the step's forward passes keeps a copy of the buffers the forwards change;
    ``apply(optimizer, found)`` steps the optimizer with ``found_inf = found`` (the fused SGD and AdamW kernels
    leave parameters and state untouched when it is non-zero, and AdamW takes its step count back) and
    selects the kept buffers where ``found``. With fp16 loss scaling the scaler's own inf check joins ``found``
    for the optimizer (an overflowing gradient skips the update, by design) but not for the buffers or the log.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.buffers = changing_buffers(model)
        self.saved = [torch.empty_like(b) for b in self.buffers]
        self.found = torch.zeros((), dtype=torch.float32, device=device)

    def begin(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def check(self, loss_sums: Tensor, grad_norm: Tensor, *, check_gradient: bool) -> Tensor:
        """``found`` (float32 scalar, 1.0 or 0.0): whether the losses (and the gradient norm) are not finite."""
        bad = ~torch.isfinite(loss_sums).all()
        if check_gradient:
            bad = bad | ~torch.isfinite(grad_norm)
        return self.found.copy_(bad)

    def apply(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, found: Tensor) -> None:
        skip = found
        if scaler.is_enabled():
            per_device = scaler._found_inf_per_device(optimizer)  # recorded by scaler.unscale_
            skip = torch.maximum(found, sum(f.to(found.device, non_blocking=True) for f in per_device.values()))
        optimizer.found_inf = skip
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        if scaler.is_enabled():
            scaler.update()
        keep = found.bool()
        for b, saved in zip(self.buffers, self.saved, strict=True):
            b.copy_(torch.where(keep, saved, b))


# ----------------------------------------------------------------------------------------------
# The step's row, read later
# ----------------------------------------------------------------------------------------------


class StepLog:
    """The rows of the steps not read yet (device tensors) and the host time of the last read.

    ``read()`` reads them all with one ``tolist`` and returns their records. A non-finite step raises a
    ``NonFiniteError`` naming it (after the records before it are returned through ``on_records``), or with
    ``skip_nonfinite`` prints one line and is logged ``skipped``.
    """

    def __init__(self, *, global_batch: int, skip_nonfinite: bool, checkpoint: Path, t_start: float) -> None:
        self.global_batch, self.skip_nonfinite, self.checkpoint = global_batch, skip_nonfinite, checkpoint
        self.t_start = self.t_read = t_start
        self.rows: list[tuple[int, int, Tensor]] = []  # (step, epoch, row)

    def add(self, step: int, epoch: int, row: Tensor) -> None:
        self.rows.append((step, epoch, row))

    def read(self, on_records: Callable[[list[dict[str, Any]]], None]) -> None:
        """Read the pending rows (one host sync) and pass their records to ``on_records``, in step order."""
        if not self.rows:
            return
        pending, self.rows = self.rows, []
        values = torch.stack([row for _, _, row in pending]).tolist()
        now = time.perf_counter()
        step_time = (now - self.t_read) / len(pending)
        self.t_read = now
        records = []
        for (step, epoch, _), v in zip(pending, values, strict=True):
            row = dict(zip(ROW_FIELDS, v, strict=True))
            losses = [row[k] for k in LOSS_NAMES]
            skipped = row["nonfinite"] != 0
            if skipped:
                finite_loss = all(math.isfinite(x) for x in losses)
                what = "loss" if not finite_loss else "gradient norm"
                detail = ", ".join(f"{k}={x:.4g}" for k, x in zip(LOSS_NAMES, losses, strict=True))
                if not self.skip_nonfinite:
                    on_records(records)
                    raise NonFiniteError(
                        f"non-finite {what} at step {step} ({detail}, grad_norm={row['grad_norm']:.4g}); that step "
                        f"did not update the weights and {self.checkpoint} was not written after it. Lower --lr, "
                        "use --clip-grad, or pass --skip-nonfinite to skip such steps."
                    )
                print(f"step {step}: non-finite {what} ({detail}); step skipped", file=sys.stderr, flush=True)
            records.append({
                "step": step, "epoch": epoch, "lr": row["lr"], "loss": sum(losses),
                **dict(zip(LOSS_NAMES, losses, strict=True)), "grad_norm": row["grad_norm"],
                "images_per_s": self.global_batch / step_time, "step_time": step_time,
                "time": now - self.t_start, "skipped": skipped,
            })  # fmt: skip
        on_records(records)


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------


def _autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``--amp``: ``off``, ``bf16`` or ``fp16``."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@dataclasses.dataclass
class StepParts:
    """What a step runs: the module to call (DDP- and compile-wrapped), the DDP wrapper (or None), the
    optimizer with its tensor learning rate, the scaler, the guard and the trainable parameters."""

    train_model: nn.Module
    ddp: nn.parallel.DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    guard: NonFiniteGuard
    params: list[Tensor]
    amp: str
    clip_grad: float
    distributed: bool
    world_size: int


def forward_backward(parts: StepParts, micro_batches: list[Any], seeds: list[int] | None) -> Tensor:
    """Forward and backward over the step's micro-batches (inputs on the device), each after seeding the torch
    RNG with its seed (``None``: the caller seeded once, as before a CUDA graph's replay); gradients accumulate
    as the mean over micro-batches. Returns the five losses summed over the micro-batches (float32 ``[5]``)."""
    sums = None
    n = len(micro_batches)
    for a, inputs in enumerate(micro_batches):
        if seeds is not None:
            torch.manual_seed(seeds[a])
        last = a == n - 1
        with parts.ddp.no_sync() if parts.ddp is not None and not last else contextlib.nullcontext():
            with _autocast(parts.amp, parts.guard.found.device):
                losses = parts.train_model(*inputs)
            stacked = torch.stack([losses[k].float() for k in LOSS_NAMES])
            parts.scaler.scale(stacked.sum() / n).backward()
        sums = stacked.detach() if sums is None else sums + stacked.detach()
    return sums


def run_step(parts: StepParts, micro_batches: list[Any], seeds: list[int] | None = None) -> Tensor:
    """The whole step on the device (what a CUDA graph captures): keep the buffers, forward and backward,
    update. Returns the step's row (``ROW_FIELDS``)."""
    parts.guard.begin()
    loss_sums = forward_backward(parts, micro_batches, seeds)
    return update(parts, loss_sums, len(micro_batches))


def update(parts: StepParts, loss_sums: Tensor, micro_batches: int) -> Tensor:
    """Clipping, the non-finite decision and the guarded optimizer step, with no host read. Returns the step's
    row (``ROW_FIELDS``) and leaves the gradients zeroed."""
    optimizer, scaler = parts.optimizer, parts.scaler
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    grads = [p.grad for p in parts.params if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads)
    if parts.clip_grad > 0:
        torch.nn.utils.clip_grads_with_norm_(parts.params, parts.clip_grad, grad_norm)
    losses = loss_sums / micro_batches
    if parts.distributed:
        dist.all_reduce(losses)
        losses /= parts.world_size
    # fp16 loss scaling produces inf gradients by design: the scaler skips those steps itself.
    found = parts.guard.check(losses, grad_norm, check_gradient=not scaler.is_enabled())
    lr = optimizer.param_groups[0]["lr"]
    row = torch.cat([losses, grad_norm.reshape(1).float(), found.reshape(1), lr.reshape(1).float()])
    parts.guard.apply(optimizer, scaler, found)
    optimizer.zero_grad(set_to_none=False)
    return row
