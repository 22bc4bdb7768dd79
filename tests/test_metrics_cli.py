"""`difflab fid-stats`: reference statistics of an image folder, offline."""
import numpy as np
from PIL import Image

from difflab.cli import main
from difflab.data import load_digits, load_image_folder
from difflab.metrics import load_npz
from difflab.metrics.digits import DigitsEvaluator


def test_fid_stats_of_a_digits_folder_equals_direct_statistics(tmp_path, capsys):
    digits = load_digits("heldout")
    for i, img in enumerate(digits.images[:40]):
        Image.fromarray(((img[0] + 1) * 127.5).round().byte().numpy(), mode="L").save(tmp_path / f"{i:03d}.png")
    out = tmp_path / "stats.npz"
    assert main(["fid-stats", str(tmp_path), "--out", str(out), "--extractor", "digits", "--quiet"]) == 0
    stats = load_npz(out)
    feats = DigitsEvaluator().features(load_image_folder(tmp_path, 8, 1, conditional=False).images)
    # the reference goes through 8-bit quantisation like the samples: float32 feature noise, not a bias
    np.testing.assert_allclose(stats["mu"], feats.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats["sigma"], np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-5, atol=1e-5)
    assert stats["n"] == 40 and stats["extractor"] == "digits" and stats["features"].shape == (40, 64)
    assert "wrote" in capsys.readouterr().out


def test_fid_stats_without_inception_weights_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.delenv("DIFFLAB_INCEPTION_WEIGHTS", raising=False)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    assert main(["fid-stats", str(tmp_path), "--out", str(tmp_path / "s.npz"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "DIFFLAB_INCEPTION_WEIGHTS" in err and "weights-inception-2015-12-05-6726825d.pth" in err
