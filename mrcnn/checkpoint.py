"""Checkpoints: atomic writes, RNG state capture, and loading a model from ours or torchvision's.

A training checkpoint (``mrcnn.train`` writes ``checkpoint.pt``) is a dict::

    {"model": state dict (torchvision's names), "config": MaskRCNNConfig.to_dict(),
     "classes": names by label, "label_to_cat": {label: COCO category id},
     "optimizer", "scheduler", "scaler": state dicts, "step": optimizer steps done,
     "sampler": {"epoch", "batch", "seed"}, "rng": {"torch", "cuda", "numpy", "python"},
     "args": the command line's options}

Everything in it is a tensor, a number, a string, or a list/tuple/dict of those, so that
``torch.load(weights_only=True)`` reads it (numpy's RNG state is stored as a tensor for that reason), and
its ``"model"`` entry is what ``MaskRCNN.from_torchvision_checkpoint`` looks for.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import MaskRCNNConfig
from .model import MaskRCNN, infer_config

__all__ = ["atomic_save", "load_checkpoint", "load_model", "rng_state", "set_rng_state"]


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


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no code runs from the file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def load_model(
    path: str | os.PathLike, config: MaskRCNNConfig | None = None, device: str | torch.device = "cpu"
) -> tuple[MaskRCNN, dict[str, Any]]:
    """A model in eval mode from our training checkpoint or a torchvision Mask R-CNN checkpoint.

    Our checkpoints carry their ``config``; a torchvision state dict (or ``{"model": ...}`` as its
    reference scripts write) gets its architecture fields from the weights (``infer_config``) and the
    rest from ``config`` (default: torchvision's). Returns ``(model, checkpoint)``; the checkpoint's
    other entries (``classes``, ``label_to_cat``, ...) are there when we wrote it.
    """
    ckpt = load_checkpoint(path)
    state = ckpt["model"] if isinstance(ckpt, dict) and "model" in ckpt else ckpt
    if config is None and "config" in ckpt:
        config = config_from_dict(ckpt["config"])
    model = MaskRCNN(infer_config(state, config))
    model.load_state_dict(state, strict=True)
    info = ckpt if "model" in ckpt else {"model": state}
    return model.to(device).eval(), info


def config_from_dict(d: dict[str, Any]) -> MaskRCNNConfig:
    """``MaskRCNNConfig(**d)`` with the tuple fields restored (a checkpoint may hold them as lists)."""
    fields = MaskRCNNConfig.__dataclass_fields__
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown MaskRCNNConfig fields in checkpoint: {unknown}")
    return MaskRCNNConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


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
