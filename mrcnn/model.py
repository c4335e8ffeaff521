"""``MaskRCNN``: static shapes end to end, torchvision's module and parameter names, on ``kernels``' ops."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import kernels

from .backbone import build_backbone
from .config import MaskRCNNConfig
from .graphs import Captured
from .roi_heads import RoIHeads
from .rpn import RegionProposalNetwork
from .structures import Detections, Targets
from .transform import collate


class MaskRCNN(nn.Module):
    """Mask R-CNN whose ``forward`` has no data-dependent shape, so ``torch.compile(fullgraph=True)`` and
    CUDA graphs work.

    ``model(images, image_sizes, targets)`` in train mode returns torchvision's five losses;
    ``model(images, image_sizes)`` in eval mode returns ``Detections`` of fixed shape. Inputs come from
    ``mrcnn.collate`` (or ``model.collate``). ``model.predict(list_of_images)`` returns torchvision's
    ``list[dict]``. The state dict is torchvision's ``maskrcnn_resnet50_fpn`` (v1) or ``_v2`` state dict.
    """

    def __init__(self, config: MaskRCNNConfig | None = None) -> None:
        super().__init__()
        self.config = config or MaskRCNNConfig()
        self.backbone = build_backbone(self.config)
        self.rpn = RegionProposalNetwork(self.config, self.backbone.out_channels)
        self.roi_heads = RoIHeads(self.config, self.backbone.out_channels)
        self._captured_inference: Captured | None = None

    def capture_inference(self, enabled: bool = True) -> None:
        """``predict`` on CUDA replays a CUDA graph of the eval forward, one per padded input size, captured
        after one eager run of that size (``mrcnn.graphs.Captured``): the same detections as the eager forward
        of the same padded batch, without the host's launches. Call it once the model is on its device; the
        graphs read the parameters in place, so weights loaded or trained in place are seen."""
        device = next(self.parameters()).device
        self._captured_inference = (
            Captured(lambda inputs: self(*inputs), device=device, what="inference", copy_outputs=True)
            if enabled else None
        )  # fmt: skip

    def collate(self, images: list[Tensor], targets: list[dict] | None = None) -> tuple[Tensor, Tensor, Targets | None]:
        """``mrcnn.collate`` with this model's config, on this model's device."""
        device = next(self.parameters()).device
        images = [im.to(device) for im in images]
        if targets is not None:
            targets = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]
        return collate(images, targets, self.config)

    def forward(
        self, images: Tensor, image_sizes: Tensor, targets: Targets | None = None
    ) -> dict[str, Tensor] | Detections:
        """
        Args:
            images: ``Tensor[B, 3, H, W]`` normalised and padded (``H, W`` multiples of 32).
            image_sizes: ``Tensor[B, 2]`` ``(h, w)`` of each image before padding.
            targets: ``Targets`` (training only).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be Tensor[B, 3, H, W], got {tuple(images.shape)}; use mrcnn.collate")
        if self.config.channels_last == "on" or (self.config.channels_last == "auto" and images.is_cuda):
            # Backbone and FPN keep their input's memory format: the poolers get NHWC features, no copy.
            images = images.contiguous(memory_format=torch.channels_last)
        features = list(self.backbone(images).values())
        image_shape = (images.shape[-2], images.shape[-1])
        proposals, proposal_valid, rpn_losses = self.rpn(image_shape, features, image_sizes, targets)
        # The poolers use P2-P5, at scales of the padded size (torchvision's inference).
        pooled = features[:4]
        scales = kernels.infer_scales(pooled, [image_shape])
        out = self.roi_heads(pooled, scales, proposals, proposal_valid, image_sizes, targets)
        if self.training:
            return {**out, **rpn_losses}
        return out

    @torch.no_grad()
    def predict(self, images: list[Tensor], *, mask_threshold: float | None = None) -> list[dict[str, Tensor]]:
        """torchvision's output format for images of any sizes.

        Returns, per image, ``boxes: Tensor[D, 4]`` and ``masks: Tensor[D, 1, h, w]`` in the original image's
        pixels, ``labels: Tensor[D]`` int64, ``scores: Tensor[D]``; masks are probabilities (or bool when
        ``mask_threshold`` is given). Runs in eval mode and restores the previous mode.
        """
        was_training = self.training
        self.eval()
        try:
            batch, image_sizes, _ = self.collate(images)
            captured = self._captured_inference
            det = captured((batch, image_sizes)) if captured is not None and batch.is_cuda else self(batch, image_sizes)
        finally:
            self.train(was_training)
        results = []
        for i, image in enumerate(images):
            keep = det.valid[i]
            h, w = image.shape[-2:]
            rh, rw = h / float(image_sizes[i, 0]), w / float(image_sizes[i, 1])
            boxes = det.boxes[i][keep] * torch.tensor([rw, rh, rw, rh], device=batch.device)
            masks = kernels.paste_masks_in_image(det.masks[i][keep][:, None], boxes, (h, w), threshold=mask_threshold)
            labels, scores = det.labels[i][keep], det.scores[i][keep]
            results.append({"boxes": boxes, "labels": labels, "scores": scores, "masks": masks})
        return results

