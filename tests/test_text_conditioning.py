"""Cross-attention U-Net, classifier-free guidance with negative prompts and rescale, SLD concept guidance."""
import pytest
import torch

from difflab import denoisers, schedules
from difflab.cond import Cond
from difflab.guidance import ClassifierFreeGuidance, SafeGuidance, rescale_guidance
from difflab.nn import UNet


def text_unet(**kw):
    torch.manual_seed(0)
    return UNet(in_channels=3, channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,),
                head_dim=8, groups=4, context_dim=12, pooled_dim=6, **kw)


def text_cond(b, length, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[:, length - 2:] = False  # the last two tokens are padding
    return Cond(context=torch.randn(b, length, 12, generator=g), context_mask=mask,
                pooled=torch.randn(b, 6, generator=g))


def test_cross_attention_reads_text_and_ignores_padding():
    net = text_unet().eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.7])
    cond = text_cond(2, 7, 0)
    out = net(x, t, cond)
    assert out.shape == x.shape
    context = cond.context.clone()
    context[:, -2:] = 1e3  # padding content must not matter
    torch.testing.assert_close(net(x, t, Cond(context=context, context_mask=cond.context_mask, pooled=cond.pooled)),
                               out)
    other = text_cond(2, 7, 1)
    assert (net(x, t, other) - out).abs().max() > 1e-3
    # a longer padded context with the same real tokens gives the same output
    longer = Cond(context=torch.cat([cond.context, torch.randn(2, 3, 12)], 1),
                  context_mask=torch.cat([cond.context_mask, torch.zeros(2, 3, dtype=torch.bool)], 1),
                  pooled=cond.pooled)
    torch.testing.assert_close(net(x, t, longer), out, rtol=1e-5, atol=1e-5)


def test_trim_padding_cuts_only_columns_no_row_attends_and_keeps_the_output():
    cond = text_cond(2, 7, 0)  # the last two tokens of both rows are padding
    cond.context_mask[1, 4] = False  # one row ends earlier: column 4 is still needed by row 0
    trimmed = cond.trim_padding()
    assert trimmed.context.shape == (2, 5, 12) and trimmed.context_mask.shape == (2, 5)
    torch.testing.assert_close(trimmed.context, cond.context[:, :5], rtol=0, atol=0)
    net = text_unet().eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.7])
    torch.testing.assert_close(net(x, t, trimmed), net(x, t, cond), rtol=1e-5, atol=1e-5)  # measured max 5e-7
    full = Cond(context=cond.context, context_mask=torch.ones(2, 7, dtype=torch.bool), pooled=cond.pooled)
    assert full.trim_padding() is full
    empty = Cond(context=cond.context, context_mask=torch.zeros(2, 7, dtype=torch.bool), pooled=cond.pooled)
    assert empty.trim_padding().context.shape[1] == 1


def test_text_unet_without_context_is_a_clear_error():
    with pytest.raises(ValueError, match="context"):
        text_unet()(torch.randn(1, 3, 8, 8), torch.tensor([0.1]), Cond(pooled=torch.zeros(1, 6)))


def test_cond_cat_pads_token_sequences():
    a, b = text_cond(2, 5, 0), text_cond(1, 8, 1)
    c = a.cat(b)
    assert c.context.shape == (3, 8, 12) and c.context_mask.shape == (3, 8)
    assert not c.context_mask[:2, 5:].any() and torch.equal(c.context_mask[2], b.context_mask[0])


@pytest.fixture
def text_denoiser():
    return denoisers.build("edm", text_unet().eval(), schedules.EDM(), 0.5)


def test_cfg_scale_one_and_zero_are_the_two_models(text_denoiser):
    x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([0.5, 2.0, 10.0])
    cond, null = text_cond(3, 6, 0), text_cond(1, 4, 9)
    with torch.no_grad():
        torch.testing.assert_close(ClassifierFreeGuidance(text_denoiser, 1, null)(x, sigma, cond),
                                   text_denoiser(x, sigma, cond))
        torch.testing.assert_close(ClassifierFreeGuidance(text_denoiser, 0, null)(x, sigma, cond),
                                   text_denoiser(x, sigma, null.expand(3)))
        # other scales batch both calls; the result is the linear combination of the two
        x0_c, x0_u = text_denoiser(x, sigma, cond), text_denoiser(x, sigma, null.expand(3))
        torch.testing.assert_close(ClassifierFreeGuidance(text_denoiser, 4, null)(x, sigma, cond),
                                   x0_u + 4 * (x0_c - x0_u), rtol=1e-5, atol=1e-5)
        # a negative prompt per sample takes the null condition's place
        negative = text_cond(3, 5, 3)
        x0_n = text_denoiser(x, sigma, negative)
        torch.testing.assert_close(ClassifierFreeGuidance(text_denoiser, 4, negative)(x, sigma, cond),
                                   x0_n + 4 * (x0_c - x0_n), rtol=1e-5, atol=1e-5)


def test_guidance_rescale_matches_the_conditional_std():
    g = torch.Generator().manual_seed(0)
    x0_cond, x0_guided = torch.randn(4, 3, 8, 8, generator=g), 3 * torch.randn(4, 3, 8, 8, generator=g)
    full = rescale_guidance(x0_guided, x0_cond, 1.0)
    torch.testing.assert_close(full.std((1, 2, 3)), x0_cond.std((1, 2, 3)))
    torch.testing.assert_close(rescale_guidance(x0_guided, x0_cond, 0.0), x0_guided)
    torch.testing.assert_close(rescale_guidance(x0_guided, x0_cond, 0.3), 0.3 * full + 0.7 * x0_guided)


class AffineText:
    """D(x, sigma, cond) = x * a + pooled-dependent offset: simple enough to check SLD by hand."""

    def __call__(self, x, sigma, cond):
        return 0.5 * x + cond.pooled[:, :1, None, None]


def conds():
    def c(v, b=1):
        return Cond(context=torch.zeros(b, 2, 4), context_mask=torch.ones(b, 2, dtype=torch.bool),
                    pooled=torch.full((b, 6), float(v)))
    return c(1.0, 2), c(0.0), c(1.02)  # prompt, null, unsafe concept close to the prompt


def test_sld_without_safety_is_cfg_and_with_it_follows_the_paper():
    prompt, null, concept = conds()
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    model = AffineText()
    cfg = ClassifierFreeGuidance(model, 7.5, null)
    sld_off = SafeGuidance(model, 7.5, null, concept, safety_scale=0.0, momentum=0.0)
    sigmas = [5.0, 3.0, 1.0]
    for s in sigmas:
        sig = torch.full((2,), s)
        torch.testing.assert_close(sld_off(x, sig, prompt), cfg(x, sig, prompt))
    # by hand: eps_p - eps_S = (D_S - D_p)/sigma = 0.02/sigma < threshold for sigma >= 2 -> mu = min(1000*0.02/s, 1)
    sld = SafeGuidance(model, 7.5, null, concept, warmup=1, momentum=0.5, beta=0.7, threshold=0.01)
    nu = torch.zeros_like(x)
    for i, s in enumerate(sigmas):
        sig = torch.full((2,), s)
        d_p, d_u, d_s = 0.5 * x + 1.0, 0.5 * x, 0.5 * x + 1.02
        eps_p, eps_u, eps_s = (x - d_p) / s, (x - d_u) / s, (x - d_s) / s
        diff = eps_p - eps_s
        mu = torch.where(diff >= 0.01, 0.0, (1000 * diff.abs()).clamp(max=1))
        gamma = mu * (eps_s - eps_u) + 0.5 * nu
        nu = 0.7 * nu + 0.3 * gamma
        direction = eps_p - eps_u - (gamma if i >= 1 else 0)
        torch.testing.assert_close(sld(x, sig, prompt), x - s * (eps_u + 7.5 * direction))
    # a second call at the same level (Heun's corrector, churn) reuses the level's momentum
    again = sld(x, torch.full((2,), 1.0), prompt)
    torch.testing.assert_close(again, x - 1.0 * (eps_u + 7.5 * direction))
    # reset() starts a new trajectory
    sld.reset()
    sld(x, torch.full((2,), 5.0), prompt)
    assert sld._levels == 1


def test_guidance_interval_switches_by_sigma():
    from difflab.guidance import GuidanceInterval

    guided, plain = (lambda x, s, c=None: x + 1), (lambda x, s, c=None: x - 1)
    w = GuidanceInterval(guided, plain, sigma_lo=0.5, sigma_hi=2.0)
    x = torch.zeros(2, 1)
    assert (w(x, torch.tensor([1.0, 1.0])) == 1).all()
    assert (w(x, torch.tensor([3.0, 3.0])) == -1).all() and (w(x, torch.tensor(0.1)) == -1).all()
    with pytest.raises(ValueError, match="sigma_lo"):
        GuidanceInterval(guided, plain, 2.0, 1.0)


def test_generate_slices_per_sample_negative_prompts_by_batch(text_denoiser):
    from difflab.generate import generate

    from difflab.generate import SamplingSettings

    cond, negative = text_cond(5, 6, 0), text_cond(5, 4, 1)
    kw = dict(cond=cond, null_cond=negative, progress=False)
    settings = SamplingSettings(guidance=3, sampler="dpmpp_2m", steps=3, seed=0)
    whole = generate(text_denoiser, (3, 8, 8), 5, SamplingSettings.of(settings, batch_size=5), **kw)
    torch.testing.assert_close(generate(text_denoiser, (3, 8, 8), 5, SamplingSettings.of(settings, batch_size=2), **kw),
                               whole, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="1 row or one per sample"):
        generate(text_denoiser, (3, 8, 8), 5, cond=cond, null_cond=text_cond(2, 4, 1), progress=False)
    with pytest.raises(ValueError, match="cannot expand"):
        text_cond(2, 4, 1).expand(5)


def test_sampling_settings_resolve_and_generate_takes_guidance_only_with_a_null_condition():
    from difflab.generate import DEFAULTS, SamplingSettings, generate
    from difflab.testing import GaussianMixture

    s = SamplingSettings.of(SamplingSettings(steps=7), sampler="euler", eta=0.5)
    assert (s.sampler, s.steps, s.options) == ("euler", 7, {"eta": 0.5})
    full = s.resolve(SamplingSettings(sampler="ddim", steps=50, seed=3, options={"eta": 0.1})).resolve(DEFAULTS)
    assert (full.sampler, full.steps, full.seed, full.options, full.batch_size) == ("euler", 7, 3, {"eta": 0.5}, 256)
    gm = GaussianMixture.default(2)
    with pytest.raises(ValueError, match="need null_cond"):
        generate(gm, (2,), 4, SamplingSettings(guidance=3.0, steps=2), progress=False)
    assert generate(gm, (2,), 4, SamplingSettings(steps=2), progress=False).shape == (4, 2)
