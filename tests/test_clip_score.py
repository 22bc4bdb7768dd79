"""Offline tests of the CLIP score / CLIP feature extractor with a tiny random-weight CLIPModel."""
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from difflab.metrics.clip_score import CLIPScorer  # noqa: E402
from difflab.metrics.frechet import gaussian_stats  # noqa: E402
from test_text import build_tiny_clip  # noqa: E402  (tests/ is on sys.path under pytest)

CAPTIONS = ["a cat", "a red dog", "", "a dog and a cat"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.set_num_threads(1)
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def scorer(folder):
    return CLIPScorer(folder)


@pytest.fixture(scope="module")
def float_scorer(folder):
    return CLIPScorer(folder, quantize=False)


def images(n=4, h=40, w=56, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g) * 2 - 1


def test_shapes(scorer):
    x = images()
    assert scorer.pixel_values(x).shape == (4, 3, 32, 32)
    assert scorer.image_features(x).shape == (4, 24) and scorer.text_features(CAPTIONS).shape == (4, 24)
    torch.testing.assert_close(scorer.image_features(x, normalize=True).norm(dim=1), torch.ones(4))
    feats = scorer.clip_features([x, images(3, 32, 32, c=1, seed=1)], batch_size=2)
    assert feats.shape == (7, 24) and feats.dtype == torch.float64 and feats.device.type == "cpu"
    mu, sigma = gaussian_stats(feats)
    assert mu.shape == (24,) and sigma.shape == (24, 24) and np.isfinite(sigma).all()


@pytest.mark.parametrize("h, w", [(40, 56), (64, 48), (16, 16), (32, 32)])
def test_float_preprocessing_equals_the_image_processor(float_scorer, h, w):
    """quantize=False: the processor on float [0, 1] input (do_rescale=False) -- float precision."""
    x = images(h=h, w=w)
    ref = float_scorer.processor(images=list((x + 1) / 2), do_rescale=False, return_tensors="pt")
    torch.testing.assert_close(float_scorer.pixel_values(x), ref["pixel_values"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("h, w", [(40, 56), (64, 48), (16, 16), (200, 120)])
def test_quantized_preprocessing_equals_the_8bit_processors(scorer, h, w):
    """quantize=True: the processor on uint8 input, and the PIL processor -- within one 8-bit level
    on a small fraction of the pixels (fixed-point rounding), on worst-case noise images."""
    x = images(h=h, w=w)
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    refs = [scorer.processor(images=list(u8), return_tensors="pt")["pixel_values"]]
    if hasattr(transformers, "CLIPImageProcessorPil"):
        from PIL import Image
        pil = transformers.CLIPImageProcessorPil.from_pretrained(scorer.path, local_files_only=True)
        refs.append(pil(images=[Image.fromarray(i.permute(1, 2, 0).numpy()) for i in u8],
                        return_tensors="pt")["pixel_values"])
    std = torch.tensor(scorer.processor.image_std).view(1, 3, 1, 1)
    ours = scorer.pixel_values(x)
    for ref in refs:
        levels = ((ours - ref) * std * 255).abs()
        assert levels.max() < 1 + 1e-3 and (levels > 1e-3).float().mean() < 0.02


def test_score_equals_the_formula(float_scorer, folder):
    """100 max(cos, 0) from CLIPModel.get_image_features/get_text_features run directly."""
    from transformers import CLIPModel, CLIPTokenizer
    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    x = images()
    pixels = float_scorer.processor(images=list((x + 1) / 2), do_rescale=False, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels["pixel_values"])
        txt = model.get_text_features(**tok(CAPTIONS, padding=True, return_tensors="pt"))
    img, txt = (f if torch.is_tensor(f) else f.pooler_output for f in (img, txt))
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    torch.testing.assert_close(float_scorer.pair_cosines(x, CAPTIONS), cos, atol=1e-5, rtol=1e-5)
    per_pair = float_scorer.pair_scores(x, CAPTIONS)
    assert ((per_pair >= 0) & (per_pair <= 100)).all()
    expected = (100 * cos.clamp(min=0)).mean().item()
    assert float_scorer.score(x, CAPTIONS, batch_size=3) == pytest.approx(expected, abs=1e-3)
    torchmetrics_style = max((100 * cos).mean().item(), 0.0)
    assert float_scorer.score(x, CAPTIONS, clamp="mean") == pytest.approx(torchmetrics_style, abs=1e-3)


def test_clamp_per_pair_vs_torchmetrics_mean(scorer, monkeypatch):
    """Negative cosines: Hessel et al. clamp each pair, torchmetrics clamps the mean."""
    monkeypatch.setattr(scorer, "pair_cosines", lambda x, c: torch.tensor([-0.5, 0.2]))
    assert scorer.score(images(2), CAPTIONS[:2]) == pytest.approx(10.0)
    assert scorer.score(images(2), CAPTIONS[:2], clamp="mean") == 0.0
    assert scorer.pair_scores(images(2), CAPTIONS[:2]).tolist() == pytest.approx([0.0, 20.0])


def test_score_range_and_identical_pairs(scorer):
    x = images()
    s = scorer.score(x, CAPTIONS)
    assert 0 <= s <= 100
    same = scorer.score(x[:1].expand(3, -1, -1, -1), ["a cat"] * 3)
    assert same == pytest.approx(scorer.pair_scores(x[:1], ["a cat"]).item(), abs=1e-3)


def test_errors(scorer, tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download openai/clip-vit-base-patch32"):
        CLIPScorer(tmp_path / "missing")
    with pytest.raises(ValueError, match="one caption per image"):
        scorer.score(images(), CAPTIONS[:3])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        scorer.image_features(images() * 3)
    with pytest.raises(ValueError, match="clamp"):
        scorer.score(images(), CAPTIONS, clamp="none")


def test_image_processor_file_is_required(folder, tmp_path):
    import shutil
    copy = tmp_path / "no-processor"
    shutil.copytree(folder, copy)
    (copy / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        CLIPScorer(copy)
