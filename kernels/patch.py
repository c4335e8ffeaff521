"""``patch_torchvision()``: run an unmodified torchvision detection model on our ops.

Entry points replaced (module attributes, so code that looks them up at call time — all of
torchvision's detection code — picks ours up, including models built before the patch):

=============  ==========================================================================================
roi_align      ``torchvision.ops.roi_align`` (the function), ``torchvision.ops.roi_align.roi_align`` (the
               module's, which ``RoIAlign`` calls) and ``torchvision.ops.poolers.roi_align``
multiscale     ``torchvision.ops.poolers._multiscale_roi_align`` (what ``MultiScaleRoIAlign.forward``
               calls): one multi-level launch instead of one ``roi_align`` + ``where`` per level
nms            ``torchvision.ops.nms`` / ``batched_nms`` and ``torchvision.ops.boxes.nms`` / ``batched_nms``
               (what the RPN and the box head call)
box_coder      the methods ``encode``, ``encode_single``, ``decode``, ``decode_single`` of
               ``torchvision.models.detection._utils.BoxCoder`` (existing instances included)
mask_loss      ``torchvision.models.detection.roi_heads.maskrcnn_loss``
paste_masks    ``paste_masks_in_image`` in ``torchvision.models.detection.roi_heads`` and ``.transform``
               (what ``GeneralizedRCNNTransform.postprocess`` calls)
=============  ==========================================================================================

``patch_torchvision(...)`` applies the patches at once and returns a handle: use it as a context
manager (everything is restored on exit) or call ``.restore()``. Patches nest, and handles may be
restored in any order: an entry point stays patched while any handle that replaced it is live, and goes back
to torchvision's own when the last one is restored.

Every replacement is scriptable and FX-wrapped where torchvision's is, so a patched model can still be scripted
(``torch.jit.script`` resolves these attributes when it compiles a model type: script under the patch) and cut up
with ``create_feature_extractor``.
"""

from __future__ import annotations

import importlib
from types import TracebackType
from typing import Any

# Functions, not modules: ``kernels.roi_align`` (and ``.nms``, ``.mask_loss``) name the functions.
from .box_coder import BoxCoder
from .mask_loss import maskrcnn_loss
from .nms import batched_nms as _batched_nms
from .nms import nms as _nms
from .paste_masks import paste_masks_in_image
from .roi_align import roi_align as _roi_align

__all__ = ["patch_torchvision"]


def _box_coder_methods() -> dict[str, Any]:
    """Our ``BoxCoder``'s methods, which read only ``weights`` and ``bbox_xform_clip`` (torchvision's attributes too):
    as plain functions they are torchvision's methods as well, and TorchScript compiles them as such."""
    return {name: getattr(BoxCoder, name) for name in ("encode", "encode_single", "decode", "decode_single")}


def _targets(
    roi_align: bool, multiscale: bool, nms: bool, box_coder: bool, mask_loss: bool, paste_masks: bool
) -> list[tuple[str, str, Any]]:
    """``(module, attribute, replacement)`` for every entry point the flags select."""
    out: list[tuple[str, str, Any]] = []
    if roi_align:
        out += [
            ("torchvision.ops", "roi_align", _roi_align),
            ("torchvision.ops.roi_align", "roi_align", _roi_align),
            ("torchvision.ops.poolers", "roi_align", _roi_align),
        ]
    if multiscale:
        from ._torchvision import multiscale_roi_align_levels  # imports torchvision

        out.append(("torchvision.ops.poolers", "_multiscale_roi_align", multiscale_roi_align_levels))
    if nms:
        for module in ("torchvision.ops", "torchvision.ops.boxes"):
            out += [(module, "nms", _nms), (module, "batched_nms", _batched_nms)]
    if box_coder:
        out += [("torchvision.models.detection._utils:BoxCoder", k, v) for k, v in _box_coder_methods().items()]
    if mask_loss:
        out.append(("torchvision.models.detection.roi_heads", "maskrcnn_loss", maskrcnn_loss))
    if paste_masks:
        for module in ("torchvision.models.detection.roi_heads", "torchvision.models.detection.transform"):
            out.append((module, "paste_masks_in_image", paste_masks_in_image))
    return out


def _resolve(path: str) -> Any:
    module, _, attr = path.partition(":")
    owner = importlib.import_module(module)
    return getattr(owner, attr) if attr else owner


# Every entry point some live handle has replaced: ``(owner, attribute) -> (original, [(handle, replacement)])``,
# the layers in the order they were applied. A handle's ``restore`` removes its own layer and sets the
# attribute to the newest layer left (or the original): so handles restored in any order leave exactly the
# live handles' patches in place. Restoring saved values instead would, out of order, put an earlier
# handle's replacement back after that handle was gone.
_LAYERS: dict[tuple[Any, str], tuple[Any, list[tuple[_Patch, Any]]]] = {}


class _Patch:
    """Handle of applied patches: a context manager, or ``restore()`` by hand."""

    def __init__(self, targets: list[tuple[str, str, Any]]) -> None:
        self._keys: list[tuple[Any, str]] = []
        for path, attr, replacement in targets:
            owner = _resolve(path)
            key = (owner, attr)
            _LAYERS.setdefault(key, (getattr(owner, attr), []))[1].append((self, replacement))
            self._keys.append(key)
            setattr(owner, attr, replacement)

    def restore(self) -> None:
        """Remove this handle's patches, in any order with other handles (idempotent): each entry point
        goes back to the newest live handle's replacement, or to torchvision's own when none is left."""
        while self._keys:
            key = self._keys.pop()
            original, layers = _LAYERS[key]
            layers[:] = [(handle, r) for handle, r in layers if handle is not self]
            setattr(*key, layers[-1][1] if layers else original)
            if not layers:
                del _LAYERS[key]

    def __enter__(self) -> _Patch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.restore()


def patch_torchvision(
    roi_align: bool = True,
    multiscale: bool = True,
    nms: bool = True,
    box_coder: bool = True,
    mask_loss: bool = True,
    paste_masks: bool = True,
) -> _Patch:
    """Make torchvision's detection models use our ops; see the module docstring for what is replaced.

    ``with kernels.patch_torchvision(): detections = model(images)`` — or
    ``handle = kernels.patch_torchvision(); ...; handle.restore()``.
    """
    return _Patch(_targets(roi_align, multiscale, nms, box_coder, mask_loss, paste_masks))
