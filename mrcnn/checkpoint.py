"""Checkpoint files: atomic writes, reading ours or torchvision's with errors that name the file, RNG state.

A training checkpoint (``mrcnn.train`` writes ``checkpoint.pt``) is a dict::

    {"model": state dict (torchvision's names), "config": MaskRCNNConfig.to_dict(),
     "classes": names by label, "label_to_cat": {label: COCO category id},
     "optimizer", "scheduler", "scaler": state dicts, "step": optimizer steps done,
     "sampler": {"epoch", "batch", "seed"}, "rng": {"torch", "cuda", "numpy", "python"},
     "args": the command line's options}

Everything in it is a tensor, a number, a string, or a list/tuple/dict of those, so that
``torch.load(weights_only=True)`` reads it (numpy's RNG state is stored as a tensor for that reason), and
its ``"model"`` entry is what ``mrcnn.load_model`` looks for.
Loading names the file in every error: unreadable, not a dict, no Mask R-CNN weights, weights that do not
fit, an invalid config, or (for ``--resume``) not a training checkpoint.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import MaskRCNNConfig

__all__ = [
    "CheckpointError", "atomic_save", "config_from_dict", "load_checkpoint", "load_training_checkpoint",
    "model_state", "rng_state", "set_rng_state",
]  # fmt: skip


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    A crash (or an exception) while writing leaves the previous file at ``path`` untouched: readers see
    either the old checkpoint or the new one, never a torn file. The temporary file is removed on error.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        # The data must be on disk before the rename is, or a power cut could leave an empty file.
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is not the kind expected, or does not fit the command line; the
    message names the file."""


# What ``infer_config`` reads first: present in every Mask R-CNN state dict, ours and torchvision's.
_MASK_RCNN_KEY = "roi_heads.box_predictor.cls_score.weight"
TRAINING_KEYS = ("model", "config", "optimizer", "scheduler", "scaler", "step", "sampler", "rng")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint dict with ``weights_only=True`` (no code runs from the file).

    A missing file raises ``FileNotFoundError``; an unreadable one (empty, truncated, not written by
    ``torch.save``) or one that holds something other than a dict raises ``CheckpointError`` naming it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load's errors for bad files vary: EOFError, RuntimeError, UnpicklingError, ...
        raise CheckpointError(f"cannot read checkpoint {path} (empty, truncated or not a torch.save file): "
                              f"{type(e).__name__}: {e}") from e  # fmt: skip
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def load_training_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], MaskRCNNConfig]:
    """A checkpoint that ``mrcnn.train`` wrote (everything ``--resume`` needs) and its config, or
    ``CheckpointError`` naming the file (a torchvision state dict, for instance, belongs to ``--init``)."""
    ckpt = load_checkpoint(path)
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint of mrcnn.train (it has no {', '.join(missing)}); "
                              "to start from its weights, use --init")  # fmt: skip
    return ckpt, config_from_dict(ckpt["config"], path)


def model_state(ckpt: dict[str, Any], path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The Mask R-CNN state dict in a checkpoint: its ``"model"`` entry (ours, torchvision's reference
    scripts) or the checkpoint itself (a plain state dict); ``CheckpointError`` naming the file otherwise."""
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or _MASK_RCNN_KEY not in state:
        raise CheckpointError(f"{path} holds no Mask R-CNN weights (no {_MASK_RCNN_KEY!r})")
    return state


def config_from_dict(d: Any, path: str | os.PathLike) -> MaskRCNNConfig:
    """The ``MaskRCNNConfig`` a checkpoint stores (``MaskRCNNConfig`` turns its lists back into tuples and
    checks every field); ``CheckpointError`` naming the file ``path`` otherwise."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: its 'config' is a {type(d).__name__}, not a dict of MaskRCNNConfig fields")
    unknown = sorted(set(d) - set(MaskRCNNConfig.__dataclass_fields__))
    if unknown:
        raise CheckpointError(f"{path}: unknown MaskRCNNConfig fields in its 'config': {unknown}")
    try:
        return MaskRCNNConfig(**d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its 'config' is invalid: {e}") from e


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from: torch (CPU and CUDA), numpy's global, python's."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                  "cached": cached},  # fmt: skip
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
