"""A Mask R-CNN with static shapes on ``kernels``' Triton ops: ``torch.compile(fullgraph=True)`` with zero
graph breaks, torchvision's module names and checkpoints."""

from .config import MaskRCNNConfig
from .convert import from_torchvision, infer_config, load_model
from .model import MaskRCNN
from .structures import Detections, Targets
from .transform import collate

__all__ = ["MaskRCNN", "MaskRCNNConfig", "Targets", "Detections", "collate", "from_torchvision", "infer_config",
           "load_model"]
