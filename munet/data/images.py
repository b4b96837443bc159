"""Turning whatever a client sends into the input format of a task: uint8 (S, S, 3), S its resolution.

S is the task's input size (its root's: 96 for the ImageNet MobileNetV2 on CPU, 32 for the small ViT).

Conventions (the built-in data sets go through the same functions, so serving sees what training saw):
- gray is repeated to three channels;
- alpha is composited on white, because the colour task (rendered emoji) is drawn on white, so a
  transparent PNG of an emoji looks like its training images;
- any size is stretched to SxS with PIL's bilinear filter, which widens its support when shrinking
  (so it averages like an area filter) and interpolates when enlarging; aspect ratio is not kept.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image, ImageOps

SIZE = 32  # the small ViT root's input size, and the default where no task size applies
MAX_SIDE = 4096
MAX_PIXELS = 4096 * 4096
_CHANNELS = (1, 3, 4)


class InvalidImage(ValueError):
    """The bytes or array are not an image this server can take; the message says why."""


def _check_side(height: int, width: int, max_pixels: int = MAX_PIXELS) -> None:
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise InvalidImage(f"image is {height}x{width}; height and width must each be in 1..{MAX_SIDE}")
    if height * width > max_pixels:
        raise InvalidImage(f"image is {height}x{width} = {height * width} pixels; the limit (max_image_pixels) "
                           f"is {max_pixels}")


def _as_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InvalidImage("float image contains NaN or infinity")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise InvalidImage(f"float image values must lie in [0, 1]; got [{lo:.4g}, {hi:.4g}]")
        return np.rint(arr * 255.0).astype(np.uint8)
    raise InvalidImage(f"image dtype must be uint8 or float in [0, 1]; got {arr.dtype}")


def to_rgb(arr: np.ndarray, size: int = SIZE) -> np.ndarray:
    """One image, (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), uint8 or float in [0, 1] -> uint8 (size, size, 3)."""
    if not isinstance(arr, np.ndarray):
        raise InvalidImage(f"expected a numpy array, got {type(arr).__name__}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        channels = 1
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        channels = arr.shape[2]
    else:
        raise InvalidImage(f"image shape must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {arr.shape}")
    _check_side(arr.shape[0], arr.shape[1])
    arr = np.ascontiguousarray(_as_uint8(arr))

    if channels == 4:
        # integer "over white": out = a*rgb + (255-a)*255, rounded
        rgb = arr[:, :, :3].astype(np.uint16)
        a = arr[:, :, 3:4].astype(np.uint16)
        arr = ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)

    if arr.shape[0] != size or arr.shape[1] != size:
        img = Image.fromarray(arr)  # 2-D uint8 -> "L", (H, W, 3) uint8 -> "RGB"
        arr = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))
    if arr.ndim == 2:
        # resizing one channel and repeating it is 3x cheaper than resizing gray-as-RGB, same result
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.array(arr, dtype=np.uint8, order="C")  # always a fresh, writable array


def batch_to_rgb(images: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Many same-size images, (N, H, W[, C]) -> uint8 (N, size, size, 3); equal to `to_rgb` on each.

    Gray batches (the MNIST-style data sets) take a fast path: PIL's bilinear resize done as two
    matrix products over the whole batch, several times faster than one PIL call per image.
    """
    if not isinstance(images, np.ndarray) or images.ndim not in (3, 4):
        raise InvalidImage(f"batch must be an array (N, H, W) or (N, H, W, C); got {getattr(images, 'shape', None)}")
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if images.ndim == 4:
        if len(images) == 0:
            return np.zeros((0, size, size, 3), np.uint8)
        return np.stack([to_rgb(im, size) for im in images])
    n, h, w = images.shape
    _check_side(h, w)
    images = _as_uint8(images)
    if h > size:
        # PIL may run the passes in another order when it shrinks rows (seen on Pillow 13); the
        # matrix path is only proven bit-identical without that, so take PIL itself here
        return np.stack([to_rgb(im, size) for im in images]) if n else np.zeros((0, size, size, 3), np.uint8)
    out = np.empty((n, size, size, 3), np.uint8)
    ww = _bilinear_weights(w, size).T if w != size else None
    wh = _bilinear_weights(h, size) if h != size else None
    for start in range(0, n, _CHUNK):  # chunks keep the float64 temporaries in cache
        g = images[start:start + _CHUNK].astype(np.float64)
        c = len(g)
        # width first, rounding to uint8 in between, as PIL does
        if ww is not None:
            g = _fixed_point_pass((g.reshape(c * h, w) @ ww).reshape(c, h, size))
        if wh is not None:
            g = _fixed_point_pass(wh @ g)  # (S, h) @ (c, h, S) -> (c, S, S)
        u = g.astype(np.uint8)
        for k in range(3):  # three strided copies: numpy's broadcast into a last axis of 3 is ~10x slower
            out[start:start + c, :, :, k] = u
    return out


_CHUNK = 512
# PIL's 8-bit resampler (libImaging/Resample.c) works in fixed point with this many fraction bits
_PRECISION_BITS = 32 - 8 - 2


@functools.lru_cache(maxsize=64)
def _bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """The (out, in) matrix of PIL's fixed-point bilinear coefficients, as exact float64 integers.

    Reproducing PIL exactly (tests compare against it) lets a whole batch resize as two matrix
    products instead of one PIL call per image, with bit-identical output.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear (triangle) filter has support 1
    m = np.zeros((out_size, in_size), np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        xs = np.arange(xmin, xmax)
        k = np.maximum(1.0 - np.abs((xs - center + 0.5) / filterscale), 0.0)
        if k.sum() != 0.0:
            k = k / k.sum()
        m[xx, xmin:xmax] = np.where(k < 0, np.trunc(-0.5 + k * (1 << _PRECISION_BITS)),
                                    np.trunc(0.5 + k * (1 << _PRECISION_BITS)))
    return m


def _fixed_point_pass(acc: np.ndarray) -> np.ndarray:
    # products < 2^30 and few terms per sum: float64 holds every value exactly, so this is PIL's
    # integer arithmetic, floor and clip included
    acc += float(1 << (_PRECISION_BITS - 1))
    acc *= 1.0 / (1 << _PRECISION_BITS)  # a power of two: exact
    np.floor(acc, out=acc)
    return np.clip(acc, 0, 255, out=acc)


def _pil_to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("L", "RGB", "RGBA"):
        return np.asarray(img)
    if mode.startswith("I;16") or mode == "I":
        # 16-bit PNG/TIFF: keep the top byte rather than letting convert("L") clip at 255
        wide = np.asarray(img).astype(np.int64)
        return (np.clip(wide, 0, 65535) // 257).astype(np.uint8)
    if mode == "F":
        return np.asarray(img.convert("L"))
    if "A" in mode or "a" in mode or "transparency" in img.info:
        return np.asarray(img.convert("RGBA"))  # LA, PA, La, RGBa, palette or gray with a transparent key
    if mode == "1":
        return np.asarray(img.convert("L"))
    return np.asarray(img.convert("RGB"))  # P, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes, size: int = SIZE, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, GIF, WebP, BMP, TIFF: anything PIL opens) -> uint8 (size, size, 3)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImage(f"expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidImage("image bytes are empty")
    try:
        # PIL's bomb check in open() raises above 2x MAX_IMAGE_PIXELS; the side limit below, read
        # from the header before any pixel is decoded, is far tighter (4096^2 < MAX_IMAGE_PIXELS)
        with Image.open(io.BytesIO(bytes(data))) as img:
            _check_side(img.height, img.width, max_pixels)  # from the header: nothing decoded yet
            if img.format == "JPEG" and min(img.height, img.width) >= 2 * size:
                # JPEG can decode at 1/2, 1/4 or 1/8 scale directly: a 4000 px photo served at 96 px
                # decodes in a fraction of the time and memory (never below twice the target size)
                img.draft(img.mode, (2 * size, 2 * size))
            img.load()
            img = ImageOps.exif_transpose(img)
            arr = _pil_to_array(img)
    except InvalidImage:
        raise
    except Image.DecompressionBombError as e:
        raise InvalidImage(f"image refused as a decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise InvalidImage("bytes are not an image format that can be decoded (tried PNG, JPEG, GIF, "
                           "WebP, BMP, TIFF and the other formats PIL knows)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        # truncated or corrupt files surface as any of these from the format plugins
        raise InvalidImage(f"image could not be decoded: {e}") from None
    return to_rgb(arr, size)


def from_raw(data: bytes, height: int, width: int, channels: int, size: int = SIZE,
             max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Raw row-major uint8 pixels (H, W, C), C in {1, 3, 4} -> uint8 (size, size, 3)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImage(f"expected raw pixel bytes, got {type(data).__name__}")
    for name, v in (("height", height), ("width", width), ("channels", channels)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InvalidImage(f"{name} must be an integer, got {v!r}")
    if channels not in _CHANNELS:
        raise InvalidImage(f"channels must be 1, 3 or 4; got {channels}")
    _check_side(int(height), int(width), max_pixels)
    expected = int(height) * int(width) * int(channels)
    if len(data) != expected:
        raise InvalidImage(f"raw image has {len(data)} bytes; {height}x{width}x{channels} needs {expected}")
    arr = np.frombuffer(data, dtype=np.uint8).reshape(int(height), int(width), int(channels))
    return to_rgb(arr, size)


def to_model_input(batch_u8: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 in [0, 1], C-contiguous (the first module's input)."""
    if not isinstance(batch_u8, np.ndarray) or batch_u8.dtype != np.uint8:
        raise InvalidImage(f"batch must be a uint8 array, got {getattr(batch_u8, 'dtype', type(batch_u8))}")
    if batch_u8.ndim != 4 or batch_u8.shape[3] != 3 or batch_u8.shape[1] != batch_u8.shape[2]:
        raise InvalidImage(f"batch shape must be (N, S, S, 3); got {batch_u8.shape}")
    s = batch_u8.shape[1]
    out = np.empty((batch_u8.shape[0], 3, s, s), dtype=np.float32)
    # divide, not multiply by 1/255: 255 must map to exactly 1.0
    np.divide(batch_u8.transpose(0, 3, 1, 2), np.float32(255.0), out=out)
    return out
