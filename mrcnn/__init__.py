"""A Mask R-CNN with static shapes on ``kernels``' Triton ops: ``torch.compile(fullgraph=True)`` with zero
graph breaks, torchvision's module names and checkpoints."""

# ruff: noqa: E402
# The restart comes before anything imports torch (mrcnn/_cpu_env.py): the imports below follow it.
from ._cpu_env import restart_before_torch

restart_before_torch()

from .config import MaskRCNNConfig
from .convert import from_torchvision, infer_config, load_model
from .model import MaskRCNN
from .structures import Detections, Targets
from .transform import collate

__all__ = ["MaskRCNN", "MaskRCNNConfig", "Targets", "Detections", "collate", "from_torchvision", "infer_config",
           "load_model"]
