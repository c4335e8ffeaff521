"""What the command lines ``mrcnn.train``, ``mrcnn.evaluate``, ``mrcnn.predict`` and ``mrcnn.export`` share: the
console entry point (a user's mistake as one ``error:`` line), the process set-up (CPU environment, device,
torch.distributed, kernels' backend), their device, data and file options, output folders and atomic file
writes."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

import kernels

from ._cpu_env import CPU_ENV, restart_with_cpu_env
from .data import build_dataset

__all__ = [
    "CPU_ENV", "USER_ERRORS", "ArgumentParser", "Process", "add_data_args", "add_device_args", "base_dataset",
    "build_eval_dataset", "device_name", "existing_dir", "existing_file", "non_negative_int", "output_folder",
    "positive_int", "process_age", "reexec_for_cpu", "run_cli", "select_device", "use_backend", "write_json",
    "write_text",
]  # fmt: skip



def reexec_for_cpu() -> None:
    """Re-run this command with the ``CPU_ENV`` variables the user has not set, when torch sees no GPU
    (``mrcnn._cpu_env.restart_with_cpu_env``): the net behind ``mrcnn._cpu_env.restart_before_torch``, which
    restarts ``python -m mrcnn.<command>`` before torch is imported (the variables are read when OpenMP and MKL
    start)."""
    if not torch.cuda.is_available():
        restart_with_cpu_env()


# ----------------------------------------------------------------------------------------------
# Console entry point
# ----------------------------------------------------------------------------------------------

# What a user's mistake raises once the options are parsed: a missing or unreadable file (OSError), a file that
# is not what it should be (ValueError: a bad checkpoint is a CheckpointError, an image PIL cannot decode or bad
# COCO annotations a ValueError naming the file; bad ground truth a BadTargetError), an impossible combination of
# options. The console entry points print these as one line; anything else keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError)


def _one_line(error: BaseException) -> str:
    """The error's message on one line. An error raised in a DataLoader worker arrives with the worker's
    traceback in its message ("Caught ValueError in DataLoader worker process 0. Original Traceback ..."); its
    last line is the error itself ("ValueError: ...", printed without the type)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        return lines[-1].removeprefix(f"{type(error).__name__}: ")
    return " ".join(lines) or type(error).__name__


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None,
            errors: tuple[type[BaseException], ...] = ()) -> None:  # fmt: skip
    """The console entry point of a command: ``main(argv)``, with a user's mistake (``USER_ERRORS``,
    plus ``errors``) printed to stderr as one ``error: ...`` line and exit status 1. Usage errors are
    argparse's (``prog: error: ...``, status 2).

    ``argv=None`` is the real command line: on a machine without a GPU the process first restarts itself with
    ``CPU_ENV`` (``reexec_for_cpu``). Tests pass ``argv`` and run in-process.
    """
    if argv is None:
        reexec_for_cpu()
    try:
        main(argv)
    except (*USER_ERRORS, *errors) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(1) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line, ``prog: error: ...; see prog --help``, exit status 2,
    instead of the whole usage text (24 lines for ``mrcnn.train``) above the one line that matters."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


# ----------------------------------------------------------------------------------------------
# Device, processes, backend
# ----------------------------------------------------------------------------------------------


def device_name(text: str) -> str:
    """An argparse type: a torch device string (``cpu``, ``cuda``, ``cuda:1``) of a device this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu, cuda or cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: only cpu and cuda devices are supported")
    return text


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--backend`` and ``--cuda-graphs``."""
    parser.add_argument("--device", type=device_name, default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                        help="kernels' implementation: auto = Triton on CUDA, torch on CPU")  # fmt: skip
    parser.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                        help="replay CUDA graphs of the training step and of inference, one per padded input size "
                        "(auto: on with CUDA; mrcnn.graphs)")  # fmt: skip


def select_device(name: str | None) -> torch.device:
    """``--device``, or CUDA when there is a GPU, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def use_backend(name: str) -> contextlib.AbstractContextManager:
    """``--backend``: ``kernels.use_backend(name)``, or nothing for ``auto`` (each tensor's own choice)."""
    return kernels.use_backend(name) if name != "auto" else contextlib.nullcontext()


class Process:
    """This process's device, rank and world size. Under ``torchrun`` (``WORLD_SIZE > 1``) it joins the
    process group, NCCL on CUDA and gloo on CPU; as a context manager it leaves the group on exit.

    On CUDA each rank takes GPU ``LOCAL_RANK`` before it joins, so that what the group sets up on the
    current device (NCCL's communicators, ``barrier``) lands on the rank's own GPU rather than on GPU 0.
    """

    def __init__(self, device: str | None) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.distributed = self.world_size > 1
        self.device = select_device(device)
        self.rank = 0
        if self.distributed:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.rank = dist.get_rank()
        self.is_main = self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.distributed:
            dist.destroy_process_group()
            # A reference cycle can still hold the group (through DDP's reducer): one frame of matplotlib's
            # tight_layout does, whose f_back chain reaches the trainer. Left to the interpreter's shutdown, the
            # group's gloo threads outlive Python and now and then abort it (1 of ~90 two-rank runs here, under
            # load: "terminate called without an active exception", SIGABRT on rank 0 only, the rank that plots).
            # Collected here, the group joins its threads while Python is alive.
            gc.collect()


# ----------------------------------------------------------------------------------------------
# Data options
# ----------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def existing_file(text: str) -> str:
    """An argparse type: the path of a file that exists (checked when the options are parsed, before anything is
    loaded or written)."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{'is a folder, not a file' if os.path.isdir(text) else 'no such file'}: "
                                         f"{text}")  # fmt: skip
    return text


def existing_dir(text: str) -> str:
    """An argparse type: the path of a folder that exists."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return text


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The evaluation data options shared by ``mrcnn.train`` and ``mrcnn.evaluate``."""
    parser.add_argument("--data", choices=("shapes", "coco"), default="shapes",
                        help="built-in synthetic shapes (default) or COCO-format files")  # fmt: skip
    parser.add_argument("--val-ann", type=existing_file, help="COCO instances JSON to evaluate on (--data coco)")
    parser.add_argument("--val-images", type=existing_dir, help="image folder of --val-ann")
    parser.add_argument("--val-size", type=positive_int, default=None,
                        help="evaluate on the first N images (shapes: the val split's size, default 200)")  # fmt: skip
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="shapes only: image side in pixels (default: the model's min_size; 128)")  # fmt: skip
    parser.add_argument("--data-seed", type=int, default=0, help="shapes only: the dataset's seed")


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


def base_dataset(dataset: Dataset) -> Any:
    """The dataset under any ``Subset`` wrappers (``--train-size`` / ``--val-size`` cut COCO data with one):
    where ``classes`` and ``label_to_cat`` live."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def output_folder(path: str | os.PathLike) -> Iterator[Path]:
    """The folder ``path`` (made with its parents) for a command's outputs. When the command fails, a folder this
    call made is removed with what was written into it, so a failed run leaves no half-made folder; a folder
    that existed before keeps what it held (and what the command wrote before it failed)."""
    path = Path(path)
    made = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if made:
            shutil.rmtree(path, ignore_errors=True)
        raise


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


def process_age() -> float | None:
    """Seconds since this process started (Linux's ``/proc/self/stat``; None elsewhere): a run's cold start,
    the interpreter's start and imports included."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """JSON to ``path``, atomically (``write_text``)."""
    write_text(json.dumps(obj, indent=1), path)
