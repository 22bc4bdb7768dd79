"""ControlNet: exact identities at initialisation and scale 0, gradients only in the adapter, a
trained adapter run that loads with its base, samples under control with every sampler and
guidance, resumes bit-exactly and refuses a changed base; the layout metrics."""
import dataclasses
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import difflab
from difflab import runs
from difflab.adapters import edge_map, hints
from difflab.adapters.training import train_adapter
from difflab.cli import main
from difflab.cond import Cond
from difflab.config import ConfigError, load_config
from difflab.data.shapes import ShapesWorld
from difflab.metrics.layout import edge_f1, mask_iou
from difflab.nn import ControlledUNet, ControlNet, UNet
from difflab.train import train
from safetensors.torch import load_file

from test_text_pipeline import TINY_TEXT

ADAPTER = ["adapter.kind=controlnet", "train.steps=4", "train.batch_size=8", "train.warmup=1",
           "train.checkpoint_every=2", "train.sample_every=4", "train.log_every=1", "train.label_dropout=0.5"]


def text_unet(**kw):
    torch.manual_seed(0)
    return UNet(3, channels=16, channel_mult=(1, 2), attn_levels=(1,), head_dim=16, groups=4, context_dim=8,
                **kw).eval()


def text_cond(n, hint=None):
    g = torch.Generator().manual_seed(1)
    return Cond(context=torch.randn(n, 5, 8, generator=g), context_mask=torch.ones(n, 5, dtype=torch.bool),
                control=hint)


def perturbed(controlnet):
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return controlnet


@pytest.mark.parametrize("factor", [1, 2])
def test_controlnet_at_initialisation_leaves_the_base_output_bit_exact(factor):
    unet = text_unet()
    x, t = torch.randn(3, 3, 8, 8), torch.rand(3)
    hint = torch.rand(3, 1, 8 * factor, 8 * factor)
    controlled = ControlledUNet(unet, ControlNet(unet, 1, factor))
    with torch.no_grad():
        assert torch.equal(controlled(x, t, text_cond(3, hint)), unet(x, t, text_cond(3)))
        assert not torch.equal(ControlledUNet(unet, perturbed(ControlNet(unet, 1, factor)))(x, t, text_cond(3, hint)),
                               unet(x, t, text_cond(3)))


def test_control_scale_zero_is_the_base_and_scales_apply_per_level():
    unet = text_unet()
    controlnet = perturbed(ControlNet(unet, 1))
    x, t, hint = torch.randn(2, 3, 8, 8), torch.rand(2), torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        base = unet(x, t, text_cond(2))
        assert torch.equal(ControlledUNet(unet, controlnet, 0.0)(x, t, text_cond(2, hint)), base)
        assert torch.equal(ControlledUNet(unet, controlnet, [0, 0, 0])(x, t, text_cond(2, hint)), base)
        full = ControlledUNet(unet, controlnet, 1.0)(x, t, text_cond(2, hint))
        assert torch.equal(ControlledUNet(unet, controlnet, [1, 1, 1])(x, t, text_cond(2, hint)), full)
        mid_only = ControlledUNet(unet, controlnet, [0, 0, 1])(x, t, text_cond(2, hint))
        assert not torch.equal(mid_only, base) and not torch.equal(mid_only, full)
    with pytest.raises(ValueError, match="one per level, then the middle"):
        ControlledUNet(unet, controlnet, [1, 1])


def test_only_the_controlnet_receives_gradients():
    unet = text_unet().requires_grad_(False)
    controlnet = ControlNet(unet, 1)
    x, t, hint = torch.randn(2, 3, 8, 8), torch.rand(2), torch.rand(2, 1, 8, 8)
    ControlledUNet(unet, controlnet)(x, t, text_cond(2, hint)).square().mean().backward()
    assert all(p.grad is None for p in unet.parameters())
    zero_convs = [p.grad for p in controlnet.zero_convs.parameters()]
    assert all(g is not None for g in zero_convs) and any(g.abs().sum() > 0 for g in zero_convs)
    # the copy starts as the base's encoder and middle, and is not the same tensors
    base = dict(unet.named_parameters())
    for name, p in controlnet.encoder.named_parameters():
        assert torch.equal(p, base[name]) and p.data_ptr() != base[name].data_ptr() and p.requires_grad


def test_hint_of_the_wrong_size_or_channels_is_a_clear_error():
    unet = text_unet()
    controlled = ControlledUNet(unet, ControlNet(unet, 1, 2))
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    with pytest.raises(ValueError, match=r"1 channel\(s\) of 16x16 pixels .* got shape \(2, 1, 8, 8\)"):
        controlled(x, t, text_cond(2, torch.rand(2, 1, 8, 8)))
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 16, 16\)"):
        controlled(x, t, text_cond(2, torch.rand(2, 3, 16, 16)))
    with pytest.raises(ValueError, match="pass its hint as cond.control"):
        controlled(x, t, text_cond(2))


def test_layout_metrics_are_exact_on_known_maps():
    ref = torch.zeros(1, 8, 8, dtype=torch.bool)
    ref[0, 2, 1:7] = True  # a 6-pixel line
    shifted = torch.roll(ref, 1, dims=1)  # one pixel down: within tolerance 1, not 0
    assert edge_f1(shifted, ref)["f1"].item() == 1.0
    assert edge_f1(shifted, ref, tolerance=0)["f1"].item() == 0.0
    half = ref.clone()
    half[0, 2, 4:7] = False
    r = edge_f1(half, ref)  # 3 detected, all right; of the 6 reference pixels 4 have one within 1 px
    assert r["precision"].item() == 1.0 and r["recall"].item() == pytest.approx(4 / 6)
    assert mask_iou(half, ref).item() == 0.5 and mask_iou(torch.zeros_like(ref), torch.zeros_like(ref)).item() == 1.0


def test_canny_edges_of_renders_match_the_renderer_edges():
    d = ShapesWorld(32).load(16, maps=True)
    assert edge_f1(edge_map(d.images), d.edges)["f1"].mean() > 0.97
    assert hints(d, "edges").shape == (16, 1, 32, 32) and hints(d, "depth").max() == 1.0
    with pytest.raises(ValueError, match="maps=True"):
        hints(ShapesWorld(32).load(2), "edges")


@pytest.fixture(scope="module")
def control_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("control")
    base = train(load_config(None, TINY_TEXT + [f"out={root / 'base'}"]), progress=False)
    adapter = train_adapter(load_config(None, ADAPTER + [f"out={root / 'edges'}", f"adapter.base={base}"]),
                            progress=False)
    return base, adapter


def test_controlnet_run_trains_only_its_weights_and_samples_under_control(control_runs):
    base_run, run = control_runs
    assert runs.read_record(run, runs.BASE_RECORD)["path"] == str(base_run)
    assert not any(k.startswith(("up.", "conv_out")) for k in runs.weights_shapes(runs.weights_path(run)))
    base, pipe = difflab.load(base_run), difflab.load(run)
    assert base.controlnet is None and pipe.controlnet is not None
    assert torch.equal(dict(base.denoiser.named_parameters())["net.conv_out.weight"],
                       dict(pipe.denoiser.named_parameters())["net.conv_out.weight"])  # the base is unchanged
    hint = hints(ShapesWorld(8).load(2, maps=True), "edges")
    for sampler in ("euler", "heun", "dpmpp_2m", "ddim", "euler_ancestral"):
        plain = base("a red circle", n=2, steps=3, sampler=sampler, seed=0, progress=False)
        assert torch.equal(pipe("a red circle", n=2, steps=3, sampler=sampler, seed=0, progress=False), plain)
        assert torch.equal(pipe("a red circle", n=2, steps=3, sampler=sampler, seed=0, control=hint,
                                control_scale=0, progress=False), plain)
        controlled = pipe("a red circle", n=2, steps=3, sampler=sampler, seed=0, control=hint, progress=False)
        assert not torch.equal(controlled, plain)
    one = pipe("a red circle", n=2, steps=3, seed=0, control=hint[:1], progress=False)
    assert torch.equal(one, pipe("a red circle", n=2, steps=3, seed=0, control=hint[:1].expand(2, -1, -1, -1),
                                 progress=False))
    batched = pipe("a red circle", n=2, steps=3, seed=0, control=hint, batch_size=1, progress=False)
    torch.testing.assert_close(batched, pipe("a red circle", n=2, steps=3, seed=0, control=hint, progress=False),
                               atol=1e-5, rtol=1e-4)
    assert (run / "samples" / "step_0000004.png").exists()
    # guidance that hooks the base U-Net's attention composes with the ControlNet around it
    sag = pipe("a red circle", n=2, steps=3, seed=0, control=hint, sag_scale=0.5, progress=False)
    assert sag.isfinite().all() and not torch.equal(sag, pipe("a red circle", n=2, steps=3, seed=0, control=hint,
                                                              progress=False))


def test_controlnet_errors(control_runs, tmp_path):
    base_run, run = control_runs
    with pytest.raises(ValueError, match="has no ControlNet"):
        difflab.load(base_run)("a red circle", n=1, steps=2, control=torch.zeros(1, 8, 8), progress=False)
    with pytest.raises(ValueError, match=r"1 channel\(s\) of 8x8 pixels"):
        difflab.load(run)("a red circle", n=1, steps=2, control=torch.zeros(1, 16, 16), progress=False)
    with pytest.raises(ValueError, match=r"\(2, C, H, W\) for 2 samples"):
        difflab.load(run)("a red circle", n=2, steps=2, control=torch.zeros(3, 1, 8, 8), progress=False)
    with pytest.raises(ConfigError, match="is itself an adapter run"):
        train_adapter(load_config(None, ADAPTER + [f"out={tmp_path / 'x'}", f"adapter.base={run}"]), progress=False)
    with pytest.raises(ConfigError, match="set adapter.base"):
        load_config(None, ["adapter.kind=controlnet"])


def test_an_adapter_for_another_base_is_refused(control_runs, tmp_path):
    _, run = control_runs
    other = train(load_config(None, TINY_TEXT + [f"out={tmp_path / 'base'}", "train.seed=1"]), progress=False)
    moved = shutil.copytree(run, tmp_path / "moved")
    cfg = runs.read_config(moved)
    runs.write_config(moved, dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, base=str(other))))
    with pytest.raises(ValueError, match="is an adapter for the model trained in"):
        difflab.load(moved)


def test_controlnet_training_resumes_bit_exactly(control_runs, tmp_path):
    base_run, run = control_runs
    half = ADAPTER + [f"out={tmp_path / 'r'}", f"adapter.base={base_run}"]
    train_adapter(load_config(None, half + ["train.steps=2"]), progress=False)
    train_adapter(load_config(None, half), resume=True, progress=False)
    a, b = load_file(runs.weights_path(run, "model")), load_file(runs.weights_path(tmp_path / "r", "model"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_samples_under_control(control_runs, tmp_path, capsys):
    _, run = control_runs
    hint = tmp_path / "edges.png"
    Image.fromarray((hints(ShapesWorld(8).load(1, maps=True), "edges")[0, 0].numpy() * 255).astype(np.uint8)).save(hint)
    picture = tmp_path / "picture.png"
    Image.fromarray(((ShapesWorld(8).load(1).images[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)).save(picture)
    out = tmp_path / "s.png"
    assert main(["sample", "--run", str(run), "--prompt", "a red circle", "--n", "2", "--steps", "2", "--control",
                 str(hint), "--control-scale", "0.5", "--out", str(out), "--quiet"]) == 0
    assert main(["sample", "--run", str(run), "--prompt", "a red circle", "--n", "2", "--steps", "2", "--control",
                 str(picture), "--canny", "--out", str(tmp_path / "c.png"), "--quiet"]) == 0
    assert out.exists() and (tmp_path / "c.png").exists()
    assert main(["sample", "--run", str(run), "--prompt", "a red circle", "--control", str(picture), "--steps", "2",
                 "--out", str(tmp_path / "e.png"), "--quiet"]) == 2
    assert "expected 1 channel(s)" in capsys.readouterr().err
