import numpy as np
import pytest
import torch
from PIL import Image

from difflab import runs
from difflab.config import ConfigError, load_config
from difflab.data import load_digits, load_image_folder
from difflab.train import train


def test_digits_split_is_stratified_disjoint_and_scaled():
    tr, held, full = load_digits("train"), load_digits("heldout"), load_digits("all")
    assert len(tr) + len(held) == len(full) == 1797
    assert tr.images.shape[1:] == (1, 8, 8) and tr.images.min() == -1 and tr.images.max() == 1
    assert torch.bincount(held.labels).min() >= 34  # every class held out (~20%)
    assert len(tr) == 1437 and torch.bincount(tr.labels).min() >= 139
    with pytest.raises(ValueError, match="train, heldout or all"):
        load_digits("test")


def _write_folder(root, sizes=((20, 12), (9, 30), (16, 16))):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")


def test_image_folder_resizes_crops_and_labels(tmp_path):
    _write_folder(tmp_path)
    data = load_image_folder(tmp_path, image_size=8, channels=3)
    assert data.images.shape == (6, 3, 8, 8) and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.class_names == ["cats", "dogs"] and data.images.abs().max() <= 1
    grey = load_image_folder(tmp_path, image_size=4, channels=1, conditional=False)
    assert grey.images.shape == (6, 1, 4, 4) and grey.labels is None
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="mixes loose images with class sub-folders"):
        load_image_folder(tmp_path, 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "nope", 8)


def test_train_on_an_image_folder(tmp_path, tiny_cfg):
    _write_folder(tmp_path / "imgs")
    cfg = tiny_cfg("data.dataset=folder", f"data.path={tmp_path / 'imgs'}", "data.image_size=8",
                   "data.channels=3", "train.batch_size=4", "train.steps=2")
    run = train(cfg, progress=False)
    assert runs.weights_path(run).exists()


def test_digits_config_must_match_the_data():
    with pytest.raises(ConfigError, match="digits are 8x8 greyscale"):
        load_config(None, ["data.image_size=16"])
