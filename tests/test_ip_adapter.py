"""IP-Adapter and the shapes world's image encoder: ip_scale 0 is the base bit for bit, only the
adapter trains, kv_ip starts as the text kv; the contrastive loss; an IP-Adapter run end to end
(train, load, sample with an image prompt from Python and the CLI) and its errors."""
import numpy as np
import pytest
import torch
from PIL import Image

import difflab
from difflab import runs
from difflab.adapters.image_encoder import ImageEncoderTraining, embed_images, train_image_encoder
from difflab.adapters.training import train_adapter
from difflab.cli import main
from difflab.cond import Cond
from difflab.config import ConfigError, load_config
from difflab.data.shapes import ShapesWorld
from difflab.metrics.shapes_clip import ShapesCLIPScorer, image_scorer, retrieval_accuracy
from difflab.nn import IPAdaptedUNet, IPAdapter, UNet
from difflab.nn.image_encoder import ImageTower, contrastive_loss
from difflab.train import train

from test_text import build_tiny_clip
from test_text_pipeline import TINY_TEXT


def text_unet():
    torch.manual_seed(0)
    return UNet(3, channels=16, channel_mult=(1, 2), attn_levels=(1,), head_dim=16, groups=4, context_dim=8).eval()


def inputs(n=2, embed_dim=12):
    g = torch.Generator().manual_seed(1)
    cond = Cond(context=torch.randn(n, 5, 8, generator=g), context_mask=torch.ones(n, 5, dtype=torch.bool),
                image_prompt=torch.randn(n, embed_dim, generator=g))
    return torch.randn(n, 3, 8, 8, generator=g), torch.rand(n, generator=g), cond


def test_ip_scale_zero_is_the_base_bit_exact_and_the_image_prompt_reaches_the_output():
    unet = text_unet()
    adapter = IPAdapter(unet, 12, tokens=3)
    x, t, cond = inputs()
    plain = Cond(context=cond.context, context_mask=cond.context_mask)
    with torch.no_grad():
        base = unet(x, t, plain)
        assert torch.equal(IPAdaptedUNet(unet, adapter, 0.0)(x, t, cond), base)
        prompted = IPAdaptedUNet(unet, adapter, 1.0)(x, t, cond)
        assert not torch.equal(prompted, base)
        other = IPAdaptedUNet(unet, adapter, 1.0)(x, t, Cond(context=cond.context, context_mask=cond.context_mask,
                                                             image_prompt=-cond.image_prompt))
        assert not torch.equal(other, prompted)
    assert all(layer.hook is None for layer in unet.attention_layers().values())  # uninstalled after the call
    assert len(adapter.layers) == 6 and all(n.endswith(".cross") for n in adapter.layers)


def test_kv_ip_starts_as_the_text_kv_and_only_the_adapter_trains():
    unet = text_unet().requires_grad_(False)
    adapter = IPAdapter(unet, 12)
    layers = unet.attention_layers()
    for name in adapter.layers:
        ip = adapter.kv_ip[name.replace(".", "_")].weight
        assert torch.equal(ip, layers[name].kv.weight) and ip.data_ptr() != layers[name].kv.weight.data_ptr()
    x, t, cond = inputs()
    IPAdaptedUNet(unet, adapter)(x, t, cond).square().mean().backward()
    assert all(p.grad is None for p in unet.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())


def test_image_prompt_errors():
    unet = text_unet()
    adapter = IPAdapter(unet, 12)
    x, t, cond = inputs()
    with pytest.raises(ValueError, match=r"\(B, 12\) image embeddings, got shape \(2, 5\)"):
        IPAdaptedUNet(unet, adapter)(x, t, Cond(context=cond.context, context_mask=cond.context_mask,
                                                image_prompt=torch.zeros(2, 5)))
    with pytest.raises(ValueError, match="pass the image embedding as cond.image_prompt"):
        IPAdaptedUNet(unet, adapter)(x, t, Cond(context=cond.context, context_mask=cond.context_mask))
    with pytest.raises(ValueError, match="needs a text U-Net"):
        IPAdapter(UNet(3, channels=16, groups=4, head_dim=16), 12)
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\) images"):
        ImageTower(16)(torch.zeros(1, 3, 8, 8))


def test_contrastive_loss_counts_repeated_captions_as_positives():
    ids = torch.tensor([0, 1, 0])
    perfect = torch.tensor([[10.0, -10, 10], [-10, 10, -10], [10, -10, 10]])  # same caption: same row
    # rows of caption 0 spread over its two equal positives (log 2 each); caption 1 is certain (0)
    assert contrastive_loss(perfect, ids).item() == pytest.approx(2 / 3 * np.log(2), abs=1e-4)
    wrong = torch.tensor([[-10.0, 10, -10], [10, -10, 10], [-10, 10, -10]])
    assert contrastive_loss(wrong, ids) > 10


@pytest.fixture(scope="module")
def ip_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ip")
    base = train(load_config(None, TINY_TEXT + [f"out={root / 'base'}"]), progress=False)
    encoder = train_image_encoder(root / "clip", ImageEncoderTraining(image_size=8, scenes=64, steps=4,
                                                                      batch_size=16, dim=12), progress=False)
    adapter = train_adapter(load_config(None, [
        f"out={root / 'ip'}", "adapter.kind=ip_adapter", f"adapter.base={base}", f"adapter.image_encoder={encoder}",
        "adapter.tokens=2", "train.steps=3", "train.batch_size=8", "train.warmup=1", "train.checkpoint_every=3",
        "train.sample_every=3", "train.label_dropout=0.3"]), progress=False)
    return base, encoder, adapter


def test_image_encoder_folder_scores_through_the_clip_scorer_interface(ip_runs):
    _, folder, _ = ip_runs
    scorer = image_scorer(folder)
    assert 0 <= retrieval_accuracy(scorer, 8, n=56) <= 1
    data = ShapesWorld(16).load(3)
    e = embed_images(scorer, data.images)  # resized to the encoder's 8x8
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    cos = scorer.pair_cosines(data.images, data.captions)
    torch.testing.assert_close(cos, (e * scorer.text_features(data.captions, normalize=True)).sum(1))
    assert scorer.score(data.images, data.captions) == pytest.approx(float((100 * cos.clamp(min=0)).mean()), rel=1e-5)
    assert scorer.clip_features(data.images).shape == (3, 12)
    with pytest.raises(FileNotFoundError, match="should be an image encoder"):
        ShapesCLIPScorer(folder.parent / "missing")


def test_the_shapes_encoder_is_the_clip_extractor_of_fid_stats(ip_runs, tmp_path):
    _, encoder, _ = ip_runs
    folder = tmp_path / "renders"
    folder.mkdir()
    for i, x in enumerate(ShapesWorld(8).load(6).images):
        Image.fromarray(((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "clip.npz"
    assert main(["fid-stats", str(folder), "--out", str(out), "--extractor", "clip", "--clip", str(encoder),
                 "--image-size", "8", "--quiet"]) == 0
    assert np.load(out)["mu"].shape == (12,)  # the encoder's embedding width


def test_ip_adapter_trains_on_a_real_clip_architecture(ip_runs, tmp_path):
    """A local Hugging Face CLIP folder (here a tiny random one of the real architecture) is the
    path for real CLIP weights: the same adapter, its embeddings from ``CLIPScorer``."""
    base_run, _, _ = ip_runs
    clip = build_tiny_clip(tmp_path / "tiny-clip")
    run = train_adapter(load_config(None, [
        f"out={tmp_path / 'ip'}", "adapter.kind=ip_adapter", f"adapter.base={base_run}", f"adapter.image_encoder={clip}",
        "train.steps=2", "train.batch_size=8", "train.warmup=1", "train.checkpoint_every=2", "train.sample_every=0"]),
        progress=False)
    pipe = difflab.load(run)
    assert pipe.ip_adapter.embed_dim == 24  # the tiny CLIP's projection_dim
    refs = ShapesWorld(8, 1, 1).load(2).images
    assert pipe("", n=2, steps=2, seed=0, image_prompt=refs, progress=False).shape == (2, 3, 8, 8)


def test_ip_adapter_run_samples_with_an_image_prompt(ip_runs, tmp_path):
    base_run, _, run = ip_runs
    base, pipe = difflab.load(base_run), difflab.load(run)
    refs = ShapesWorld(8, 1, 1).load(2).images
    assert pipe.ip_adapter is not None and (run / "samples" / "step_0000003.png").exists()
    assert not any(k.startswith(("down.", "up.", "mid.")) for k in runs.weights_shapes(runs.weights_path(run)))
    for sampler in ("euler", "dpmpp_2m", "ddim", "heun"):
        plain = base("a red circle", n=2, steps=3, sampler=sampler, seed=0, progress=False)
        assert torch.equal(pipe("a red circle", n=2, steps=3, sampler=sampler, seed=0, image_prompt=refs,
                                ip_scale=0.0, progress=False), plain)
        prompted = pipe("a red circle", n=2, steps=3, sampler=sampler, seed=0, image_prompt=refs, progress=False)
        assert not torch.equal(prompted, plain)
    one = pipe("", n=2, steps=3, seed=0, image_prompt=refs[:1], progress=False)
    torch.testing.assert_close(one, pipe("", n=2, steps=3, seed=0, image_prompt=refs[:1].expand(2, -1, -1, -1),
                                         progress=False), atol=1e-5, rtol=1e-4)  # the encoder's batch of 1 or 2
    picture = tmp_path / "ref.png"
    Image.fromarray(((refs[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)).resize((20, 20)).save(picture)
    out = tmp_path / "s.png"
    assert main(["sample", "--run", str(run), "--prompt", "", "--image-prompt", str(picture), "--ip-scale", "0.7",
                 "--n", "2", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    assert out.exists()


def test_image_prompt_guidance_is_instructpix2pix_and_cfg_at_equal_scales(ip_runs):
    from difflab.guidance import ImagePromptGuidance

    def fake(x, sigma, cond):  # a denoiser whose output says which condition it saw
        return x * 0 + cond.context[:, :1, :1, None] + 10 * cond.image_prompt[:, :1, None, None]
    cond = Cond(context=torch.full((1, 1, 1), 1.0), image_prompt=torch.ones(1, 1))
    null = Cond(context=torch.zeros(1, 1, 1), image_prompt=torch.zeros(1, 1))
    x = torch.zeros(1, 1, 2, 2)
    out = ImagePromptGuidance(fake, 3.0, 5.0, null)(x, torch.ones(1), cond)
    assert torch.allclose(out, torch.full_like(x, 0 + 3 * (1 - 0) + 5 * (11 - 1)))
    _, _, run = ip_runs
    pipe = difflab.load(run)
    refs = ShapesWorld(8, 1, 1).load(2).images
    a = pipe("a red circle", n=2, steps=3, seed=0, image_prompt=refs, guidance=3, progress=False)
    b = pipe("a red circle", n=2, steps=3, seed=0, image_prompt=refs, guidance=3, image_guidance=3, progress=False)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    c = pipe("a red circle", n=2, steps=3, seed=0, image_prompt=refs, guidance=3, image_guidance=6, progress=False)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="image_guidance weighs an image prompt"):
        pipe("a red circle", n=1, steps=2, image_guidance=2, progress=False)


def test_ip_adapter_errors(ip_runs, tmp_path):
    base_run, encoder, run = ip_runs
    refs = ShapesWorld(8, 1, 1).load(3).images
    with pytest.raises(ValueError, match="has no IP-Adapter"):
        difflab.load(base_run)("a red circle", n=1, steps=2, image_prompt=refs[:1], progress=False)
    with pytest.raises(ValueError, match="one image prompt for all 2 samples or one per sample, got 3"):
        difflab.load(run)("a red circle", n=2, steps=2, image_prompt=refs, progress=False)
    with pytest.raises(ConfigError, match="set adapter.image_encoder"):
        load_config(None, ["adapter.kind=ip_adapter", f"adapter.base={base_run}"])
    other = train_image_encoder(tmp_path / "clip", ImageEncoderTraining(image_size=8, scenes=64, steps=4,
                                                                        batch_size=16, dim=12, seed=1), progress=False)
    for name in ("image_encoder.safetensors", "image_encoder_config.json"):
        (encoder / name).rename(tmp_path / name)
        (other / name).rename(encoder / name)
    try:
        with pytest.raises(ValueError, match="was trained with the image encoder of"):
            difflab.load(run)
    finally:
        for name in ("image_encoder.safetensors", "image_encoder_config.json"):
            (encoder / name).rename(other / name)
            (tmp_path / name).rename(encoder / name)
