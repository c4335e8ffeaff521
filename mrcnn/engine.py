"""The training engine behind ``python -m mrcnn.train``: the data order (``ShardSampler``, ``shard_seed``), the
learning-rate ``Schedule``, the optimizer, and the ``Trainer`` that runs the steps (``mrcnn.step``), reads their
results every ``--log-every`` steps, evaluates and writes the outputs. ``mrcnn.train``'s docstring describes what
it guarantees (bit-exact resume, DDP = accumulation, the non-finite policy); ``mrcnn.train`` turns the command
line into a ``TrainingSetup`` for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .checkpoint import CheckpointError, atomic_save, rng_state, set_rng_state
from .cli import Process, base_dataset, process_age, write_json, write_text
from .config import MaskRCNNConfig
from .evaluate import evaluate, format_metrics
from .graphs import Captured, cuda_graphs_enabled
from .step import (
    LOSS_NAMES,
    BadTargetError,
    NonFiniteError,
    NonFiniteGuard,
    RefusedBatch,
    StepLog,
    StepParts,
    TrainingCollate,
    run_step,
    to_device,
)
from .transform import collate

__all__ = [
    "LOSS_NAMES", "BadTargetError", "NonFiniteError", "Schedule", "ShardSampler", "Trainer", "TrainingSetup",
    "build_optimizer", "plot_losses", "read_log", "shard_seed",
]  # fmt: skip

# ----------------------------------------------------------------------------------------------
# Data order, RNG, schedule, optimizer
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


# Eager steps of a new input size before its CUDA graph is captured: the first launches (autotuning, lazy
# initialisation of CUDA libraries) and the optimizer's state happen outside the graph.
CAPTURE_WARMUP_STEPS = 2


def build_optimizer(model: nn.Module, kind: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``kind`` ``sgd`` (momentum 0.9) or ``adamw``; no weight decay on norm layers' and biases' parameters.

    Fused (one kernel over all parameters; AdamW's is -10 % of a CPU step of the shapes preset), because the
    fused kernels take a ``found_inf`` flag (``mrcnn.step.NonFiniteGuard``) and a tensor learning rate: each
    group's ``lr`` is a float32 scalar on the parameters' device that the scheduler fills and the step reads.
    SGD's momentum buffers start as zeros (with no dampening ``0.9 * 0 + g`` is the first step's ``g``), so that a
    skipped first step leaves no uninitialised buffer behind. On CUDA, AdamW is ``capturable`` (its step count
    stays on the device), so that a CUDA graph can hold the update.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    device = next(model.parameters()).device
    groups = [{"params": params, "weight_decay": wd, "lr": torch.tensor(lr, dtype=torch.float32, device=device)}
              for params, wd in ((decay, weight_decay), (no_decay, 0.0))]  # fmt: skip
    if kind == "adamw":
        return torch.optim.AdamW(groups, fused=True, capturable=device.type == "cuda")
    optimizer = torch.optim.SGD(groups, momentum=0.9, fused=True)
    for p in decay + no_decay:
        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return optimizer


def restore_optimizer_settings(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """``build_optimizer``'s settings again after ``optimizer.load_state_dict``, which keeps the checkpoint's
    groups: the fused kernels (AdamW capturable on CUDA), and each group's ``lr`` and ``initial_lr`` as float32
    scalars on ``device`` (a checkpoint holds them on the CPU, or as floats where an older version wrote it)."""
    for group in optimizer.param_groups:
        group["fused"] = True
        if isinstance(optimizer, torch.optim.AdamW):
            group["capturable"] = device.type == "cuda"
        for key in ("lr", "initial_lr"):
            if key in group:
                group[key] = torch.as_tensor(group[key], dtype=torch.float32).to(device)


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


@dataclasses.dataclass
class TrainingSetup:
    """What the options make of a run (``mrcnn.train.prepare``); the ``Trainer`` takes it as it is.

    ``model`` is the initial model (``build_model(config)``, with ``--init``'s weights), on any device;
    ``val_dataset`` is None without evaluation; ``checkpoint`` the training checkpoint read from
    ``checkpoint_path`` to continue from, or None.
    """

    out: Path
    lr: float
    config: MaskRCNNConfig
    model: nn.Module
    dataset: Dataset
    val_dataset: Dataset | None
    checkpoint: dict[str, Any] | None = None
    checkpoint_path: Path | None = None


class Trainer:
    """One training process: model, data, optimizer and outputs from a ``TrainingSetup`` (and its checkpoint
    when resuming); ``run_training()`` trains to the end (or ``--stop-at``). ``args`` are the options of
    ``mrcnn.train``, read and never modified.

    The steps themselves are ``mrcnn.step``'s (eager, or replayed from CUDA graphs: ``mrcnn.graphs``); the trainer
    feeds them the workers' batches, reads their rows every ``--log-every`` steps (and after the first step,
    before a checkpoint, an evaluation or the end) and writes what it read.
    """

    def __init__(self, args: argparse.Namespace, process: Process, setup: TrainingSetup) -> None:
        self.t_start = time.perf_counter()
        self.args, self.process, self.device = args, process, process.device
        self.out, self.lr, self.config = setup.out, setup.lr, setup.config
        self.dataset, self.val_dataset = setup.dataset, setup.val_dataset
        self.model = setup.model.to(self.device)
        self.optimizer = build_optimizer(self.model, args.optimizer, self.lr, args.weight_decay)
        milestones = (int(args.iters * 2 / 3), int(args.iters * 8 / 9))
        self.schedule = Schedule(args.schedule, args.iters, args.warmup_iters, milestones=milestones)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        self.step = 0
        self.records: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        if setup.checkpoint is not None:
            self._restore(setup.checkpoint, setup.checkpoint_path)
        self.ddp, train_model = self._wrap()
        self.sampler = ShardSampler(
            len(self.dataset), batch_size=args.batch_size, accum_steps=args.accum_steps,
            world_size=process.world_size, rank=process.rank, seed=args.seed, start_step=self.step,
            iters=min(args.iters, args.stop_at or args.iters),
        )  # fmt: skip
        if setup.checkpoint is not None and setup.checkpoint["sampler"] != self.sampler.position(self.step):
            raise CheckpointError(
                f"{setup.checkpoint_path}: its data position {setup.checkpoint['sampler']} does not match step "
                f"{self.step}'s {self.sampler.position(self.step)}: resume with the same --batch-size, --accum-steps, "
                "world size and --seed"
            )
        cuda = self.device.type == "cuda"
        self.workers = args.workers if args.workers is not None else (4 if cuda else 1)
        self.log_every = args.log_every if args.log_every is not None else (20 if cuda else 1)
        # The model class may collate its own way (bench/train_compare.py's torchvision model keeps lists).
        collate_fn = TrainingCollate(self.config, getattr(type(self.model), "collate_batch", collate))
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=collate_fn,
                                 num_workers=self.workers, pin_memory=cuda)  # fmt: skip
        self.parts = StepParts(
            train_model=train_model, ddp=self.ddp, optimizer=self.optimizer, scaler=self.scaler,
            guard=NonFiniteGuard(self.model, self.device),
            params=[p for p in self.model.parameters() if p.requires_grad], amp=args.amp,
            clip_grad=args.clip_grad, distributed=process.distributed, world_size=process.world_size,
        )  # fmt: skip
        self.graphs = self._captured_step()
        self.step_log = StepLog(global_batch=self.sampler.global_batch, skip_nonfinite=args.skip_nonfinite,
                                checkpoint=self.out / "checkpoint.pt", t_start=self.t_start)  # fmt: skip

    def _captured_step(self) -> Captured | None:
        """``run_step`` replayed from CUDA graphs when ``--cuda-graphs`` says so, and the evaluations' forward
        too (``MaskRCNN.capture_inference``); else None."""
        capture_inference = getattr(self.model, "capture_inference", None)
        if not cuda_graphs_enabled(self.args.cuda_graphs, self.device, what="the training step",
                                   distributed=self.process.distributed, static_model=capture_inference is not None):
            return None  # fmt: skip
        capture_inference()
        return Captured(lambda inputs: run_step(self.parts, inputs), device=self.device, what="the training step",
                        warmup=CAPTURE_WARMUP_STEPS, reset=self._forget_gradients, copy_outputs=True)  # fmt: skip

    def _restore(self, ckpt: dict[str, Any], path: Path | None) -> None:
        """The state of the checkpoint's step: weights, optimizer, scheduler, scaler, RNGs, and the log records
        and evaluations up to it."""
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"])
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot restore the training state: {type(e).__name__}: {e}") from e
        restore_optimizer_settings(self.optimizer, self.device)
        self.scheduler.base_lrs = [torch.as_tensor(b, dtype=torch.float32).to(self.device)
                                   for b in self.scheduler.base_lrs]  # fmt: skip
        # The schedule's shape follows this command line (so that --iters can extend a run), not the file.
        self.scheduler.lr_lambdas = [self.schedule for _ in self.optimizer.param_groups]
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

    def _wrap(self) -> tuple[nn.parallel.DistributedDataParallel | None, nn.Module]:
        """``(ddp, train_model)``: the model under DDP when distributed, then ``torch.compile`` when asked
        (by default on CUDA only)."""
        ddp = None
        train_model: nn.Module = self.model
        if self.process.distributed:
            device_ids = [self.device] if self.device.type == "cuda" else None
            ddp = train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        use_compile = self.args.compile if self.args.compile is not None else self.device.type == "cuda"
        if use_compile:
            train_model = torch.compile(train_model, fullgraph=True, backend=self.args.compile_backend)
        return ddp, train_model

    # -- one optimizer step -------------------------------------------------------------------------

    def host_batches(self, loader: Iterator[Any]) -> Iterator[Any]:
        """The loader's batches (pinned on CUDA); a batch the workers refused raises its ``BadTargetError`` here,
        naming the step that was to use it."""
        for batch in loader:
            if isinstance(batch, RefusedBatch):
                batch.raise_for(self.step + 1)
            yield batch

    def _forget_gradients(self) -> None:
        """Before a CUDA graph's capture (and after a failed one): no gradient tensors, so that the graph's backward
        allocates its own, and no loss-scaling state of a half-done step."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler._per_optimizer_states.clear()

    def train_step(self, batches: Iterator[Any]) -> None:
        """One optimizer step over this step's micro-batches, queued on the device without reading anything
        back (eagerly, or as a replay of its CUDA graph); its row waits in ``step_log``.

        Eager steps seed the torch RNG before each micro-batch from ``(seed, step, shard)``. A captured step is
        seeded once, from its first shard's seed, and its micro-batches draw one after the other: with
        ``--accum-steps 1`` the same numbers, with more the sampling differs from an eager run's.
        """
        args, rank = self.args, self.process.rank
        micro_batches = [next(batches) for _ in range(args.accum_steps)]
        seeds = [shard_seed(args.seed, self.step, rank * args.accum_steps + a) for a in range(args.accum_steps)]
        self.model.train()
        if self.graphs is not None:
            torch.manual_seed(seeds[0])
            row = self.graphs(micro_batches)
        else:
            row = run_step(self.parts, [to_device(b, self.device) for b in micro_batches], seeds)
        self.scheduler.step()
        self.step += 1
        self.step_log.add(self.step, self.sampler.position(self.step - 1)["epoch"], row)

    # -- evaluation and files -----------------------------------------------------------------------

    def sync_buffers(self) -> None:
        """Rank 0's BatchNorm statistics everywhere (DDP broadcasts them only at the start of a forward)."""
        if self.process.distributed:
            for b in self.model.buffers():
                dist.broadcast(b, 0)

    def save_checkpoint(self) -> None:
        self.sync_buffers()
        if not self.process.is_main:
            return
        base = base_dataset(self.dataset)
        # The options as resolved for this run (its folder and learning rate), not as the command line gave them.
        options = {k: v for k, v in vars(self.args).items() if k not in ("resume", "stop_at")}
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
            "args": {**options, "out": str(self.out), "lr": self.lr},
        }
        atomic_save(state, self.out / "checkpoint.pt")

    def evaluate(self) -> None:
        """COCOeval on the val data (collective); rank 0 writes metrics.json and the loss curve."""
        self.sync_buffers()
        result = evaluate(self.model, self.val_dataset, batch_size=self.args.batch_size,
                          workers=min(self.workers, 2), rank=self.process.rank, world_size=self.process.world_size,
                          progress=self.process.is_main and not self.args.no_progress)  # fmt: skip
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
        digests: list[Any] = [None] * self.process.world_size
        dist.all_gather_object(digests, _params_digest(self.model))
        if self.process.is_main:
            in_sync = len(set(digests)) == 1
            with open(self.out / "log.jsonl", "a") as f:
                record = {"step": self.step, "event": "ddp_replicas", "digests": digests, "in_sync": in_sync}
                f.write(json.dumps(record) + "\n")
            if not in_sync:
                raise RuntimeError(f"DDP replicas diverged: parameter digests {digests}")

    # -- the loop -----------------------------------------------------------------------------------

    def _write_records(self, records: list[dict[str, Any]], log_file: Any, bar: Any) -> None:
        """Rank 0 keeps the records read, writes those of log steps (and the last) and shows the latest."""
        if not self.process.is_main:
            return
        for record in records:
            self.records.append(record)
            if record["step"] % self.log_every == 0 or record["step"] == self.sampler.iters:
                log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        if bar is not None and records:
            r = records[-1]
            bar.set_postfix(loss=f"{r['loss']:.3f}", img_s=f"{r['images_per_s']:.1f}", lr=f"{r['lr']:.2e}",
                            refresh=False)  # fmt: skip

    def run_training(self) -> dict[str, Any]:
        args, is_main, end = self.args, self.process.is_main, self.sampler.iters
        log_file, bar = None, None
        if is_main:
            # The kept records replace the file atomically: truncating it in place would lose the whole log
            # if the process died before rewriting it. New records are appended.
            write_text("".join(json.dumps(r) + "\n" for r in self.records), self.out / "log.jsonl")
            log_file = open(self.out / "log.jsonl", "a")  # noqa: SIM115 (closed in finally)
            if not args.no_progress:
                from tqdm import tqdm

                bar = tqdm(total=end, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        first_step_s = None
        try:
            batches = self.host_batches(iter(self.loader))
            while self.step < end:
                self.train_step(batches)
                if bar is not None:
                    bar.update(1)
                if first_step_s is None:  # the cold start: read (the step has finished), then the clock
                    self.step_log.read(lambda records: self._write_records(records, log_file, bar))
                    first_step_s = process_age()
                evaluate_now = not args.no_eval and (
                    (args.eval_every and self.step % args.eval_every == 0) or self.step == args.iters
                )
                checkpoint_now = self.step % args.checkpoint_every == 0 or self.step == end
                # The only host read of a step: a log step, and before what must not follow a non-finite step.
                if self.step % self.log_every == 0 or evaluate_now or checkpoint_now:
                    self.step_log.read(lambda records: self._write_records(records, log_file, bar))
                if evaluate_now:
                    self.evaluate()
                if checkpoint_now:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if log_file is not None:
                log_file.close()
        if is_main:
            plot_losses(self.records, self.out / "loss.png")
        if self.process.distributed:
            self.check_replicas()
        wall = time.perf_counter() - self.t_start
        if is_main:
            cold = f" (first step done {first_step_s:.1f} s after the process started)" if first_step_s else ""
            print(f"done: {self.step} steps, {wall:.0f} s{cold} -> {self.out}", flush=True)
        metrics = self.history[-1] if self.history and is_main else None
        return {"out": str(self.out), "step": self.step, "metrics": metrics, "wall_time": wall,
                "first_step_s": first_step_s}  # fmt: skip
