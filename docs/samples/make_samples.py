"""Write the sample images in docs/samples/ from data installed with the project (nothing is downloaded).

    .venv/bin/python docs/samples/make_samples.py        # rewrites the files next to this script

- `digit-<label>-<size>px.{png,jpg}`: UCI digits (scikit-learn's `load_digits`, the data set behind
  the demo task `digits-demo`), 8x8 upscaled to sizes from 48 to 128 px, ink bright on black like the
  training images, as gray PNGs and RGB JPEGs;
- `digits/<label>/*.{png,jpg}`: a tiny ImageFolder (three classes, ten images each, 24 to 64 px) for
  `munet tasks register NAME --from docs/samples/digits`;
- `photo-{temple,flower}.jpg`: scikit-learn's two sample photos (china.jpg and flower.jpg, CC BY 2.0,
  see README.md here), shrunk to 192 px wide: colour photos of another size and aspect ratio.

The images are the data set's own (no augmentation) and the output is deterministic: the same
scikit-learn and Pillow give the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent

# (index into load_digits, size, format) for the single images; the indices are each label's first
# example, so the digit is the one the file name says
SINGLE = [(0, 64, "png"), (3, 96, "jpg"), (7, 128, "png"), (9, 48, "jpg")]
FOLDER_LABELS = (0, 1, 7)
FOLDER_PER_CLASS = 10
FOLDER_SIZES = (24, 32, 48, 64)
PHOTO_WIDTH = 192


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    # 0..16 counts of set pixels: scale to 0..255 as munet.data.builtin does
    return np.rint(x.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8), y.astype(int)


def _upscale(img8: np.ndarray, size: int) -> Image.Image:
    # bicubic, like a scan enlarged in an image viewer (nearest would show the 8x8 blocks)
    return Image.fromarray(img8, mode="L").resize((size, size), Image.Resampling.BICUBIC)


def _save(img: Image.Image, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jpg":
        img.convert("RGB").save(path, "JPEG", quality=90, optimize=True)
    else:
        img.save(path, "PNG", optimize=True)


def main() -> list[Path]:
    x, y = _digits()
    written = []
    for label, size, fmt in SINGLE:
        i = int(np.flatnonzero(y == label)[0])
        p = HERE / f"digit-{label}-{size}px.{fmt}"
        _save(_upscale(x[i], size), p, fmt)
        written.append(p)

    for label in FOLDER_LABELS:
        # examples 10.. of each label: not the single images above
        for k, i in enumerate(np.flatnonzero(y == label)[10:10 + FOLDER_PER_CLASS]):
            size = FOLDER_SIZES[k % len(FOLDER_SIZES)]
            fmt = "jpg" if k % 3 == 2 else "png"
            p = HERE / "digits" / str(label) / f"{k:02d}.{fmt}"
            _save(_upscale(x[i], size), p, fmt)
            written.append(p)

    from sklearn.datasets import load_sample_image

    for src, name in (("china.jpg", "temple"), ("flower.jpg", "flower")):
        img = Image.fromarray(load_sample_image(src))
        h = round(img.height * PHOTO_WIDTH / img.width)
        p = HERE / f"photo-{name}.jpg"
        _save(img.resize((PHOTO_WIDTH, h), Image.Resampling.LANCZOS), p, "jpg")
        written.append(p)
    return written


if __name__ == "__main__":
    for p in main():
        print(f"{p.relative_to(HERE.parent.parent)}  {p.stat().st_size} bytes")
