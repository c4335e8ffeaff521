"""Mask R-CNN ops as Triton kernels, with torchvision's signatures.

``import kernels; kernels.roi_align(...)``. CUDA tensors run the Triton kernels, CPU tensors a
vectorized torch implementation of the same math (or the Triton kernels under
``TRITON_INTERPRET=1``); ``backend_for(t)`` says which. Every op is registered under
``torch.ops.mrcnn`` with a fake implementation, so ``torch.compile(fullgraph=True)`` traces through; on CUDA
the compiled graph launches the Triton kernels itself (``_backend.TritonCustomOp``).
"""

from ._backend import backend_for, cpu_decompositions, use_backend
from ._triton_utils import persistent_autotuning

# Autotuning results persist across processes (Triton's on-disk cache): the op modules decorate their kernels
# inside this block, and only those kernels get it.
with persistent_autotuning():
    from .box_coder import BBOX_XFORM_CLIP, BoxCoder, decode_boxes, encode_boxes
    from .mask_loss import mask_loss, maskrcnn_loss
    from .nms import batched_nms, nms, nms_fixed
    from .paste_masks import paste_masks_in_image
    from .patch import patch_torchvision
    from .roi_align import MultiScaleRoIAlign, RoIAlign, infer_scales, multiscale_roi_align, roi_align

__all__ = [
    "backend_for",
    "use_backend",
    "cpu_decompositions",
    "roi_align",
    "RoIAlign",
    "multiscale_roi_align",
    "MultiScaleRoIAlign",
    "infer_scales",
    "BoxCoder",
    "BBOX_XFORM_CLIP",
    "decode_boxes",
    "encode_boxes",
    "nms",
    "batched_nms",
    "nms_fixed",
    "mask_loss",
    "maskrcnn_loss",
    "paste_masks_in_image",
    "patch_torchvision",
]
