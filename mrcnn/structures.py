"""Fixed-shape containers: padded tensors plus a validity mask, never a list of varying tensors.

They are ``NamedTuple``s, so ``torch.compile`` and ``torch.utils._pytree`` treat them as plain tuples.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Targets(NamedTuple):
    """Ground truth of a batch, padded to ``G`` objects per image.

    boxes: ``Tensor[B, G, 4]`` float32 ``(x1, y1, x2, y2)`` in the resized image's pixels.
    labels: ``Tensor[B, G]`` int64, 1..num_classes-1 (0 in padded slots).
    masks: ``Tensor[B, G, H, W]`` uint8, at the padded batch size.
    valid: ``Tensor[B, G]`` bool, False for padded slots.
    """

    boxes: Tensor
    labels: Tensor
    masks: Tensor
    valid: Tensor


class Detections(NamedTuple):
    """Detections of a batch, padded to ``D = detections_per_img``, best score first.

    boxes: ``Tensor[B, D, 4]`` in the resized image's pixels.
    scores: ``Tensor[B, D]``.
    labels: ``Tensor[B, D]`` int64.
    masks: ``Tensor[B, D, M, M]`` mask probabilities in the box frame (M = mask_size, 28).
    valid: ``Tensor[B, D]`` bool.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    masks: Tensor
    valid: Tensor
