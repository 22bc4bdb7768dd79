"""LoRA through peft: exact identities (fresh, scale 0, merge then unmerge), gradients only in the
adapter, `difflab finetune --lora` end to end with a small file that names its base, and the
star the renderer gained as a concept no base has seen."""
import numpy as np
import pytest
import torch
from PIL import Image

import difflab
from difflab import runs
from difflab.adapters.lora import add_lora, lora_layers, merge_lora, read_lora, set_lora_scale, unmerge_lora
from difflab.adapters.training import LoRATrainer, adapter_config
from difflab.cli import main
from difflab.cond import Cond
from difflab.data.shapes import SHAPES, Scene, ShapeObject, ShapesWorld, _coverage
from difflab.nn import UNet
from difflab.train import train
from difflab.config import load_config

from test_text_pipeline import TINY_TEXT


def text_unet():
    torch.manual_seed(0)
    return UNet(3, channels=16, channel_mult=(1, 2), attn_levels=(1,), head_dim=16, groups=4, context_dim=8).eval()


def inputs(n=2):
    g = torch.Generator().manual_seed(1)
    cond = Cond(context=torch.randn(n, 5, 8, generator=g), context_mask=torch.ones(n, 5, dtype=torch.bool))
    return torch.randn(n, 3, 8, 8, generator=g), torch.rand(n, generator=g), cond


def randomised(unet):
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return unet


@pytest.mark.parametrize("convs", [False, True])
def test_fresh_lora_and_scale_zero_leave_the_base_bit_exact(convs):
    unet = text_unet()
    x, t, cond = inputs()
    with torch.no_grad():
        base = unet(x, t, cond)
        add_lora(unet, rank=2, convs=convs)
        assert torch.equal(unet(x, t, cond), base)
        randomised(unet)
        assert not torch.equal(unet(x, t, cond), base)
        set_lora_scale(unet, 0.0)
        assert torch.equal(unet(x, t, cond), base)
    names = {n.rsplit(".", 1)[-1] for n, m in unet.named_modules() if m in lora_layers(unet)}
    assert names == ({"q", "kv", "out", "conv1", "conv2"} if convs else {"q", "kv", "out"})


def test_merge_then_unmerge_restores_the_base_weights():
    unet = text_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    randomised(add_lora(unet, rank=4, convs=True))
    x, t, cond = inputs()
    with torch.no_grad():
        unmerged = unet(x, t, cond)
        merge_lora(unet)
        torch.testing.assert_close(unet(x, t, cond), unmerged, atol=1e-5, rtol=1e-5)
        unmerge_lora(unet)
    after = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unmerge"):
        merge_lora(unet)
        set_lora_scale(unet, 0.5)


def test_only_lora_weights_receive_gradients():
    unet = add_lora(text_unet(), rank=2)
    x, t, cond = inputs()
    unet(x, t, cond).square().mean().backward()
    for name, p in unet.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    assert any(p.grad.abs().sum() > 0 for n, p in unet.named_parameters() if "lora_B" in n)


def test_the_star_is_a_new_shape_of_the_same_area_that_the_default_world_never_draws():
    star = Scene((ShapeObject("star", "red", "large", 0.5, 0.5, 0),))
    assert _coverage(star, 128)[1].mean() == pytest.approx(np.pi * 0.27 ** 2, rel=2e-3)
    assert {s.objects[0].shape for s in map(ShapesWorld(16, 1, 1).scene, range(200))} == set(SHAPES)
    stars = ShapesWorld(16, 1, 1, seed=3, shapes=("star",)).load(5)
    assert all(c.endswith("star") or " star " in c for c in stars.captions) and (stars.shapes[:, 0] == 4).all()
    with pytest.raises(ValueError, match="non-empty selection"):
        ShapesWorld(16, shapes=("hexagon",))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = train(load_config(None, TINY_TEXT + [f"out={root / 'base'}"]), progress=False)
    folder = root / "stars"
    folder.mkdir()
    for i, x in enumerate(ShapesWorld(8, 1, 1, seed=5, shapes=("star",)).load(4).images):
        Image.fromarray(((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)).save(folder / f"{i}.png")
    assert main(["finetune", str(base), "train.steps=3", "train.batch_size=4", "train.checkpoint_every=3",
                 "train.sample_every=3", "train.warmup=1", "adapter.prior_images=6", "--lora", "--images", str(folder), "--caption",
                 "a red star", "--out", str(root / "star"), "--quiet"]) == 0
    return base, root / "star", folder


def test_finetune_writes_a_small_lora_file_that_loads_on_its_base(lora_run, tmp_path):
    base_run, run, _ = lora_run
    file = run / "lora.safetensors"
    state, meta = read_lora(file)
    assert meta["base"]["path"] == str(base_run) and meta["caption"] == "a red star"
    assert meta["lora"] == {"rank": 4, "alpha": 4.0, "convs": True}  # finetune's defaults
    assert all("lora_" in k for k in state)
    assert file.stat().st_size < 0.25 * runs.weights_path(base_run).stat().st_size
    base = difflab.load(base_run)
    plain = base("a red star", n=2, steps=3, seed=0, progress=False)
    tuned = difflab.load(run)("a red star", n=2, steps=3, seed=0, progress=False)
    assert not torch.equal(tuned, plain)
    from_file = difflab.load(base_run).load_lora(file)
    assert torch.equal(from_file("a red star", n=2, steps=3, seed=0, progress=False), tuned)
    from_file.set_lora_scale(0.0)
    assert torch.equal(from_file("a red star", n=2, steps=3, seed=0, progress=False), plain)
    out = tmp_path / "s.png"
    assert main(["sample", "--run", str(base_run), "--lora", str(file), "--lora-scale", "0.5", "--prompt",
                 "a red star", "--n", "2", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    assert out.exists() and (run / "samples" / "step_0000003.png").exists()


def test_prior_preservation_adds_the_bases_own_samples_of_its_captions(lora_run, tmp_path):
    base_run, _, folder = lora_run
    cfg = adapter_config(load_config(None, [f"out={tmp_path / 'p'}", "adapter.kind=lora", f"adapter.base={base_run}",
                                            f"adapter.images={folder}", "adapter.caption=a red star",
                                            "adapter.prior_images=6", "train.steps=1"]))
    trainer = LoRATrainer(cfg, progress=False)
    try:
        prior, captions = trainer.prior_samples(6)
        assert len(trainer.data.images) == 8 + 6  # the 4 concept images twice, then the prior
        assert trainer.data.captions == ["a red star"] * 8 + captions and "star" not in " ".join(captions)
        assert torch.equal(trainer.data.images[8:], prior)
        base = difflab.load(base_run)
        torch.testing.assert_close(prior, base(captions, n=6, settings=base.settings(seed=0), progress=False))
    finally:
        trainer.close()


def test_lora_errors(lora_run, tmp_path, capsys):
    base_run, run, folder = lora_run
    other = train(load_config(None, TINY_TEXT + [f"out={tmp_path / 'other'}", "train.seed=1"]), progress=False)
    with pytest.raises(ValueError, match="is a LoRA for the model trained in"):
        difflab.load(other).load_lora(run / "lora.safetensors")
    with pytest.raises(ValueError, match="already has a LoRA"):
        difflab.load(run).load_lora(run / "lora.safetensors")
    with pytest.raises(ValueError, match="not a difflab LoRA file"):
        difflab.load(base_run).load_lora(runs.weights_path(base_run))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        difflab.load(base_run).load_lora(tmp_path / "missing.safetensors")
    assert main(["finetune", str(base_run), "--images", str(folder), "--caption", "x", "--quiet"]) == 2
    assert "pass --lora" in capsys.readouterr().err
    assert main(["finetune", str(base_run), "--lora", "--images", str(tmp_path / "none"), "--caption", "x",
                 "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert main(["sample", "--run", str(base_run), "--lora-scale", "0.5", "--prompt", "a", "--steps", "2",
                 "--out", str(tmp_path / "x.png"), "--quiet"]) == 2
    assert "no LoRA layers" in capsys.readouterr().err
