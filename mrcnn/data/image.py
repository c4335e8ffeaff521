"""Reading image files, for training (``CocoDataset``) and prediction (``mrcnn.predict``) alike."""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image

# Pillow's names for 16-bit greyscale (byte orders).
_GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# What PIL raises for a corrupt or truncated file (OSError mostly, ValueError from some decoders) or one
# past its decompression-bomb limit (the warning is made an error while opening, see read_image).
_DECODE_ERRORS = (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning)


def read_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file as ``Tensor[3, h, w]`` float32 in [0, 1].

    Modes:

    * 8-bit ones (RGB, L, P, RGBA, CMYK, 1, ...): PIL's conversion to RGB (alpha dropped), divided by 255;
    * 16-bit greyscale (PNG, TIFF): divided by 65535, the full 16-bit range, not the image's own, so that
      brightness does not depend on content and the file reads as its 8-bit version would, to within
      half a grey level. (Data using fewer bits, e.g. 12-bit sensor values, therefore reads dark.) Mode
      ``I``, as Pillow < 10 opens 16-bit greyscale PNGs, is read the same way when its values lie in
      0..65535; 16-bit colour files come from Pillow as 8-bit, each sample's high byte;
    * other 32-bit integer and float (``F``) images have no standard range: ``ValueError``.

    Args:
        path: the file.
        size: ``(height, width)`` the file must have; compared with the file's header before decoding,
            so a wrong (or huge) file costs nothing.

    Raises ``FileNotFoundError`` for a missing file, and ``ValueError`` naming the file for a wrong size,
    an unsupported mode, a file PIL cannot decode, or one of more pixels than PIL's decompression-bomb
    limit ``PIL.Image.MAX_IMAGE_PIXELS`` (about 89 M; set it higher, or to None, to read larger files).
    PIL itself only warns, and decodes, up to twice that limit; here such a file is refused before decoding.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)  # reads the header only
    except FileNotFoundError:
        raise
    except _DECODE_ERRORS as e:
        raise ValueError(f"cannot decode image {path}: {e}") from e
    with image:
        if size is not None and (image.height, image.width) != tuple(size):
            raise ValueError(
                f"image {path} is {image.height} x {image.width} (height x width), not the expected "
                f"{size[0]} x {size[1]}"
            )
        if image.mode == "F":
            raise ValueError(f"image {path}: mode F (32-bit float) has no standard range; save it as 8 or 16 bits")
        grey16 = image.mode in _GREY16_MODES or image.mode == "I"
        try:
            array = np.asarray(image if grey16 else image.convert("RGB"))  # decodes
        except _DECODE_ERRORS as e:
            raise ValueError(f"cannot decode image {path}: {e}") from e
    if not grey16:
        return torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0))
    if array.size and not (array.min() >= 0 and array.max() <= 65535):
        raise ValueError(
            f"image {path}: mode I (32-bit integer) with values in [{array.min()}, {array.max()}] has no standard "
            "range (read as 16-bit only within 0..65535); save it as 8 or 16 bits"
        )
    grey = array.astype(np.float32) / np.float32(65535.0)
    return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(grey, (3, *grey.shape))))
