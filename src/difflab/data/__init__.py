"""Datasets as in-memory tensors: images in [-1, 1] shaped (N, C, H, W), int64 labels or captions or None."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .shapes import ShapesData, ShapesWorld


@dataclass
class ImageData:
    images: Tensor
    labels: Tensor | None
    num_classes: int | None
    class_names: list[str] | None = None
    captions: list[str] | None = None

    def __len__(self) -> int:
        return len(self.images)


def load_digits(split: str = "train", holdout: float = 0.2, seed: int = 0) -> ImageData:
    """scikit-learn's digits (1,797 8x8 greyscale images, 10 classes; ships with the package).

    ``split`` is ``train``, ``heldout`` or ``all``; the split is stratified and fixed by ``seed``.
    Pixel values 0..16 map to [-1, 1].
    """
    # scikit-learn takes a second to import; only the digits need it
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split  # (as above)

    d = sk_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    labels = torch.from_numpy(d.target.astype(np.int64))
    if split != "all":
        if split not in ("train", "heldout"):
            raise ValueError(f"digits split must be train, heldout or all, got {split!r}")
        train_idx, held_idx = train_test_split(np.arange(len(labels)), test_size=holdout,
                                               stratify=d.target, random_state=seed)
        idx = torch.from_numpy(np.sort(train_idx if split == "train" else held_idx))
        images, labels = images[idx], labels[idx]
    return ImageData(images, labels, 10, [str(i) for i in range(10)])


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def load_image_folder(path, image_size: int, channels: int = 3, conditional: bool = True) -> ImageData:
    """Every image under ``path``, resized (shorter side) and centre-cropped to ``image_size``.

    Images directly in ``path`` are unlabelled; images in sub-folders take the
    sub-folder name as their class (when ``conditional``).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    if channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 or 3 for an image folder, got {channels}")
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert(mode)
            scale = image_size / min(im.size)
            w, h = max(image_size, round(im.width * scale)), max(image_size, round(im.height * scale))
            im = im.resize((w, h), Image.BICUBIC)
            left, top = (w - image_size) // 2, (h - image_size) // 2
            arrays.append(np.asarray(im.crop((left, top, left + image_size, top + image_size)), np.float32))
    images = torch.from_numpy(np.stack(arrays)).reshape(len(files), image_size, image_size, channels)
    images = images.permute(0, 3, 1, 2) / 127.5 - 1.0
    classes = sorted({f.parent.relative_to(root).as_posix() for f in files} - {"."})
    if not conditional or not classes:
        return ImageData(images.contiguous(), None, None)
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index.get(f.parent.relative_to(root).as_posix(), -1) for f in files])
    if (labels < 0).any():
        raise ValueError(f"{root} mixes loose images with class sub-folders; put every image in a class folder")
    return ImageData(images.contiguous(), labels, len(classes), classes)


SHAPES_HELDOUT_START = 10_000_000  # held-out shapes scenes are indices from here on, never trained on


def load_shapes_data(data_cfg, split: str = "train", n: int | None = None) -> ImageData:
    """Captioned renders of the procedural shapes world (``difflab.data.shapes``)."""
    scenes = load_shapes_scenes(data_cfg, split, n)
    return ImageData(scenes.images, None, None, captions=scenes.captions)


def load_shapes_scenes(data_cfg, split: str = "train", n: int | None = None, maps: bool = False) -> ShapesData:
    """The scenes of ``load_shapes_data`` with their attributes, and their masks, edge and depth
    maps when ``maps`` (what adapters train on and benchmarks score against)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"shapes split must be train or heldout, got {split!r}")
    world = ShapesWorld(data_cfg.image_size, data_cfg.min_objects, data_cfg.max_objects, data_cfg.world_seed)
    start = 0 if split == "train" else SHAPES_HELDOUT_START
    return world.load(n or data_cfg.scenes, start=start, maps=maps)


def load_data(data_cfg, split: str = "train") -> ImageData:
    """The dataset a DataConfig names. Folder datasets have no held-out split."""
    if data_cfg.dataset == "digits":
        data = load_digits(split, data_cfg.holdout)
    elif data_cfg.dataset == "shapes":
        data = load_shapes_data(data_cfg, split)
    else:
        data = load_image_folder(data_cfg.path, data_cfg.image_size, data_cfg.channels, data_cfg.conditional)
    if not data_cfg.conditional:
        data = ImageData(data.images, None, None)
    return data
