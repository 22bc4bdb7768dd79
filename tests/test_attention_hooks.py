"""Attention hooks (every self- and cross-attention layer by a stable name) and self-attention guidance."""
import pytest
import torch

from difflab import denoisers, schedules
from difflab.cond import Cond
from difflab.generate import SamplingSettings, generate
from difflab.guidance import SelfAttentionGuidance
from difflab.nn import AttentionHook, UNet, attention_hooks
from difflab.testing import GaussianMixture


def _unet(**kw):
    torch.manual_seed(0)
    return UNet(1, **{"channels": 16, "groups": 4, "head_dim": 8, "attn_levels": (1,), "num_classes": 10, **kw}).eval()


def _text_unet():
    torch.manual_seed(0)
    return UNet(1, channels=16, groups=4, head_dim=8, attn_levels=(1,), context_dim=12).eval()


def _inputs(text=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g)
    if text:
        mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
        return x, Cond(context=torch.randn(2, 5, 12, generator=g), context_mask=mask)
    return x, Cond(labels=torch.tensor([1, 2]))


class Recorder(AttentionHook):
    def __init__(self):
        self.probs_of, self.shapes = {}, {}

    def qkv(self, name, q, k, v):
        self.shapes[name] = (tuple(q.shape), tuple(k.shape))
        return q, k, v

    def probs(self, name, probs):
        self.probs_of[name] = probs
        return probs


def test_every_attention_layer_has_a_stable_name():
    assert list(_unet().attention_layers()) == ["down.3.attn.self", "down.4.attn.self", "mid.0.attn.self",
                                                "up.0.attn.self", "up.1.attn.self", "up.2.attn.self"]
    names = list(_text_unet().attention_layers())
    assert names[:2] == ["down.3.attn.0.self", "down.3.attn.0.cross"] and len(names) == 12


@pytest.mark.parametrize("text", [False, True], ids=["self-attention", "text"])
def test_a_hook_that_changes_nothing_gives_the_fused_result_and_sees_every_layer(text):
    net = _text_unet() if text else _unet()
    x, cond = _inputs(text)
    t = torch.zeros(2)
    fused = net(x, t, cond)
    rec = Recorder()
    with attention_hooks(net, rec) as names:
        hooked = net(x, t, cond)
    assert torch.allclose(hooked, fused, atol=1e-5) and set(rec.probs_of) == set(names) == set(net.attention_layers())
    assert all(layer.hook is None for layer in net.attention_layers().values())  # removed on exit
    for name, p in rec.probs_of.items():
        assert torch.allclose(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5)
    if text:  # padding tokens get no attention
        cross = rec.probs_of["mid.0.attn.0.cross"]
        assert rec.shapes["mid.0.attn.0.cross"][1][2] == 5 and cross[0, ..., 3:].abs().max() == 0


def test_a_hook_can_replace_probabilities_and_qkv_of_chosen_layers():
    net = _unet()
    x, cond = _inputs()
    t = torch.zeros(2)
    fused = net(x, t, cond)

    class Uniform(AttentionHook):
        def probs(self, name, probs):
            return torch.full_like(probs, 1 / probs.shape[-1])

    with attention_hooks(net, Uniform(), ["mid.0.attn.self"]):
        assert not torch.allclose(net(x, t, cond), fused, atol=1e-4)

    class Zeros(AttentionHook):
        def qkv(self, name, q, k, v):
            return q, k, torch.zeros_like(v)

    with attention_hooks(net, Zeros(), lambda name: name.startswith("up.")):
        assert not torch.allclose(net(x, t, cond), fused, atol=1e-4)
    assert torch.equal(net(x, t, cond), fused)
    with pytest.raises(ValueError, match="no attention layer named mid.7.attn.self; this UNet has down.3.attn.self"):
        with attention_hooks(net, Uniform(), ["mid.7.attn.self"]):
            pass


def _denoiser():
    return denoisers.build("edm", _unet(), schedules.EDM(), 0.5)


def test_sag_scale_zero_is_the_plain_sampler_and_a_scale_changes_samples_finitely():
    d = _denoiser()
    cond = Cond(labels=torch.arange(4) % 10)
    null = Cond(labels=torch.tensor([10]))
    s = SamplingSettings(sampler="dpmpp_2m", steps=6, guidance=2.0)
    plain = generate(d, (1, 8, 8), 4, s, cond=cond, null_cond=null, progress=False)
    assert torch.equal(generate(d, (1, 8, 8), 4, SamplingSettings.of(s, sag_scale=0.0), cond=cond, null_cond=null,
                                progress=False), plain)
    sag = SelfAttentionGuidance(d, scale=0.0)
    assert torch.equal(generate(sag, (1, 8, 8), 4, s, cond=cond, null_cond=null, progress=False), plain)
    guided = generate(d, (1, 8, 8), 4, SamplingSettings.of(s, sag_scale=0.75), cond=cond, null_cond=null,
                      progress=False)
    assert torch.isfinite(guided).all() and not torch.allclose(guided, plain, atol=1e-4)


def test_sag_masks_the_positions_that_receive_most_attention():
    sag = SelfAttentionGuidance(_denoiser(), scale=1.0)
    probs = torch.full((1, 2, 16, 16), 1 / 16)
    probs[..., 5] += 0.5  # every query looks at position 5 more
    probs = probs / probs.sum(-1, keepdim=True)
    mask = sag.mask(probs, (1, 1, 8, 8))
    assert mask.shape == (1, 1, 8, 8) and mask.sum() == 4 and mask[0, 0, 2:4, 2:4].eq(1).all()  # cell (1, 1), 2x2
    x, cond = _inputs()
    out = sag(x, torch.full((2,), 1.0, dtype=torch.float64), cond)
    assert out.shape == x.shape and len(sag.coverage) == 1 and 0 <= sag.coverage[0] <= 1
    with pytest.raises(ValueError, match="needs a denoiser over a difflab UNet"):
        SelfAttentionGuidance(GaussianMixture.default(4))
    with pytest.raises(ValueError, match="needs the U-Net's middle self-attention"):
        SelfAttentionGuidance(denoisers.build("edm", _unet(mid_attn=False, attn_levels=()), schedules.EDM(), 0.5))


def test_sag_and_inpainting_key_their_own_evaluation_samples_and_defaults_keep_the_old_key(tmp_path):
    from conftest import TINY
    from difflab import load
    from difflab.config import load_config
    from difflab.evaluation.samples import settings_of, shard_settings
    from difflab.train import train

    pipe = load(train(load_config(None, TINY + [f"out={tmp_path / 'run'}", "train.steps=2"]), progress=False))
    plain = shard_settings(pipe, SamplingSettings(guidance=3.0))
    assert shard_settings(pipe, SamplingSettings(guidance=3.0, sag_scale=0.0)) == plain and "sag_scale" not in plain
    guided = shard_settings(pipe, SamplingSettings(guidance=3.0, sag_scale=0.5))
    assert guided != plain and settings_of(guided).sag_scale == 0.5
    from difflab.evaluation.samples import _hashed_config
    assert "inpainting" not in _hashed_config(pipe.cfg.to_dict())["model"]  # as before the key existed
    inpainter = load_config(None, TINY + ["model.inpainting=true"]).to_dict()
    assert _hashed_config(inpainter)["model"]["inpainting"] is True
