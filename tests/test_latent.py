"""Latent diffusion: the VAE trainer, latent scaling, the latent cache, a latent model end to end."""
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from difflab import runs
from difflab import memory as M
from difflab.cli import main
from difflab.config import load_config
from difflab.latents import cached_latents, decode_latents, load_vae
from difflab.runs import LATENT_CACHE as CACHE_FILE
from difflab.nn import AutoencoderKL, UNet
from difflab.pipelines import load
from difflab.train import train_vae

VAE_TINY = ["vae.channels=8", "vae.groups=4", "vae.channel_mult=[1,2]", "vae.latent_channels=2",
            "train.batch_size=8", "train.steps=4", "train.warmup=2", "train.checkpoint_every=2",
            "train.sample_every=0", "train.log_every=1", "train.threads=1"]


def tiny_vae(seed=0, **kw):
    torch.manual_seed(seed)
    return AutoencoderKL(channels=8, channel_mult=(1, 2), groups=4, latent_channels=2, **kw)


def test_scaling_factor_round_trips_and_is_never_forgotten():
    vae = tiny_vae().eval()
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    with pytest.raises(ValueError, match="no latent scaling factor"):
        vae.to_latent(x)
    with pytest.raises(ValueError, match="no latent scaling factor"):
        vae.from_latent(torch.zeros(1, 2, 4, 4))
    s = vae.estimate_scaling_factor(x)
    with torch.no_grad():
        z = vae.to_latent(x)
        mean = vae.encode(x).mean
        torch.testing.assert_close(z, mean * s)
        assert z.double().std().item() == pytest.approx(1.0, rel=1e-5)  # what the factor is for
        torch.testing.assert_close(vae.from_latent(z), vae.decode(mean), rtol=0, atol=1e-5)
    fresh = tiny_vae(seed=1)
    fresh.load_state_dict(vae.state_dict())
    assert fresh.scaling_factor.item() == pytest.approx(s)


def test_latent_cache_reused_then_rebuilt_for_another_vae_or_other_images(tmp_path):
    images = torch.rand(5, 3, 8, 8) * 2 - 1
    a, b = tiny_vae(0, scaling_factor=0.7).eval(), tiny_vae(1, scaling_factor=0.7).eval()
    path = tmp_path / CACHE_FILE
    za = cached_latents(a, images, path, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(za, a.to_latent(images))
    save_file({"latents": za + 1}, str(tmp_path / "marked.safetensors"),
              metadata=safe_open(str(path), "pt").metadata())
    (tmp_path / "marked.safetensors").replace(path)  # a valid cache is read, not recomputed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(cached_latents(a, images, path, progress=False), za + 1)
    with pytest.warns(UserWarning, match="built with another VAE; rebuilding"):
        zb = cached_latents(b, images, path, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(zb, b.to_latent(images))
    torch.testing.assert_close(load_file(str(path))["latents"], zb)
    with pytest.warns(UserWarning, match="built with other images; rebuilding"):
        cached_latents(b, images[:4], path, progress=False)


def test_unet_checkpointing_same_outputs_and_grads():
    def run(checkpointing):
        torch.manual_seed(0)
        net = UNet(in_channels=2, channels=16, channel_mult=(1, 2), groups=4, head_dim=16,
                   checkpointing=checkpointing)
        x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
        out = net(x, torch.tensor([0.1, 0.5, 2.0]))
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    (y0, g0), (y1, g1) = run(False), run(True)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _vae_cfg(tmp_path, name="vae", *extra):
    return load_config(None, [f"out={tmp_path / name}", "data.dataset=digits", *VAE_TINY, *extra])


def test_vae_training_resumes_bit_exact_and_saves_its_scaling(tmp_path):
    straight = train_vae(_vae_cfg(tmp_path, "a"), progress=False)
    half = _vae_cfg(tmp_path, "b", "train.steps=2")
    train_vae(half, progress=False)
    resumed = train_vae(_vae_cfg(tmp_path, "b"), resume=True, progress=False)
    wa, wb = load_file(str(runs.weights_path(straight))), load_file(str(runs.weights_path(resumed)))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    vae = load_vae(straight)
    assert torch.isfinite(vae.scaling_factor) and vae.scaling_factor.item() > 0
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


def test_latent_model_end_to_end_and_refuses_another_vae(tmp_path, capsys):
    assert main(["train-vae", f"out={tmp_path / 'vae'}", "data.dataset=digits", *VAE_TINY, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and json.loads((tmp_path / "vae" / "metrics.json").read_text())["n"] == 360
    model = [f"out={tmp_path / 'ldm'}", f"model.vae={tmp_path / 'vae'}", "model.channels=16", "model.groups=4",
             "model.head_dim=16", "model.channel_mult=[1]", "model.attn_levels=[0]", "diffusion.sigma_data=1.0",
             "train.batch_size=16", "train.steps=3", "train.sample_every=3", "train.threads=1",
             "eval.steps=4", "eval.n_samples=20"]
    assert main(["train", *model, "model.channel_mult=[1,2,2,2]", "--quiet", "--no-eval"]) == 2
    assert "the 4x4 latents of 8x8 images must be divisible by the U-Net's downsampling factor" in \
        capsys.readouterr().err
    assert not (tmp_path / "ldm" / CACHE_FILE).exists()  # refused before encoding anything
    assert main(["memory", *model]) == 0
    out = capsys.readouterr().out
    assert "input (2, 4, 4)" in out and " vae " in out and " decode " in out and "then decodes it" in out
    cfg = load_config(None, model + ["eval.batch_size=64"])
    sampling = M.estimate_inference(cfg)[0]
    assert sampling.vae == M.vae_bytes(cfg) > 0 and sampling.decode > 0
    assert sampling.peak == pytest.approx(M.measure_inference_peak(cfg, steps=2)["peak"], rel=0.15)
    configured = M.plan(cfg).configured()
    assert configured.vae == sampling.vae
    assert configured.peak == pytest.approx(M.measure_training_peak(cfg)["peak"], rel=0.25)  # measured 0.975
    # a U-Net small enough that the decode is the larger part (the profiler also sees oneDNN workspaces,
    # which fake tensors do not: measured 0.81 here)
    small = load_config(None, model + ["eval.batch_size=64", "model.channels=8", "model.head_dim=8",
                                       "model.attn_levels=[]", "model.mid_attn=false", "eval.guidance=1.0"])
    sampling = M.estimate_inference(small)[0]
    assert sampling.decode > sampling.activations
    assert sampling.peak == pytest.approx(M.measure_inference_peak(small, steps=2)["peak"], rel=0.25)
    vae, z = load_vae(tmp_path / "vae"), torch.randn(64, 2, 4, 4)
    with M.StorageTracker(ignore=[*vae.parameters(), *vae.buffers(), z]) as tracker:
        images = decode_latents(vae, z)
        del images
    assert M.simulate_decode(cfg, 64)["peak"] == pytest.approx(tracker.peak, rel=0.01)  # the same ops on fakes
    assert main(["train", *model, "--quiet", "--no-eval"]) == 0
    run = tmp_path / "ldm"
    assert (run / CACHE_FILE).exists() and (run / "samples" / "step_0000003.png").exists()
    assert json.loads((run / "vae.json").read_text())["weights_sha256"]
    pipe = load(run)
    assert pipe.latent_shape == (2, 4, 4) and pipe.shape == (1, 8, 8)
    images = pipe(n=4, labels=[1, 2, 3, 4], steps=4, progress=False)
    assert images.shape == (4, 1, 8, 8)
    z = torch.randn(2, 2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(pipe.decode(z), pipe.vae.decode(z / pipe.vae.scaling_factor))
    assert main(["sample", "--run", str(run), "--n", "4", "--steps", "3", "--out", str(tmp_path / "s.png"),
                 "--quiet"]) == 0

    weights = load_file(str(runs.weights_path(tmp_path / "vae")))
    weights["dec_out.bias"] += 0.1  # the same VAE folder, other weights
    save_file(weights, str(runs.weights_path(tmp_path / "vae")))
    with pytest.raises(ValueError, match="trained in the latent space of the VAE"):
        load(run)
    assert main(["train", *model, "train.steps=4", "--resume", "--quiet", "--no-eval"]) == 2
    assert "trained in the latent space of the VAE" in capsys.readouterr().err
