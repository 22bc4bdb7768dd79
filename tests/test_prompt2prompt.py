"""Prompt-to-prompt and null-text inversion on tiny untrained text models (pixel and latent), with
every sampler: the mechanics (pairs, token maps, injection, local blend, per-step nulls, hook
nesting). benchmarks/prompt2prompt.py and benchmarks/inversion.py measure the quality on shapes."""
import numpy as np
import pytest
import torch
from PIL import Image

from difflab import editing, runs
from difflab.cli import main
from difflab.conditioning import conditioner_for
from difflab.config import load_config
from difflab.editing.inversion import NULL_TEXT_SOLVERS, inversion_path, solver_step
from difflab.generate import SamplingSettings, generate
from difflab.latents import build_vae
from difflab.loading import Pipeline
from difflab.metrics.reconstruction import psnr
from difflab.nn import AttentionHook, attention_hooks
from difflab.testing import GaussianMixture
from difflab.text import TokenEncoder
from difflab.train.build import build_denoiser, build_unet
from test_text_pipeline import TINY_TEXT

SAMPLERS = ["ddim", "euler", "heun", "dpmpp_2m"]
VAE = ["vae.channels=8", "vae.channel_mult=[1,2]", "vae.groups=4", "vae.latent_channels=3", "data.dataset=shapes",
       "data.conditional=false",
       "data.channels=3", "data.image_size=8"]
SWAP = ("a red circle", "a blue circle")


def _text_pipeline(vae_run=None) -> Pipeline:
    """An untrained tiny MiniLM text model, its weights jittered so that attention matters."""
    torch.manual_seed(0)
    latent = [f"model.vae={vae_run}", "model.channel_mult=[1]", "model.attn_levels=[0]"] if vae_run else []
    cfg = load_config(None, TINY_TEXT + latent)
    conditioner = conditioner_for(cfg, progress=False)
    net = build_unet(cfg, conditioner)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae = None
    if vae_run:
        vae = build_vae(runs.read_config(vae_run, need_weights=False)).eval()
        vae.scaling_factor.fill_(1.0)
    return Pipeline(cfg, build_denoiser(cfg, net), conditioner, None, vae)


@pytest.fixture(scope="module", params=[False, True], ids=["pixel", "latent"])
def pipe(request, tmp_path_factory):
    if not request.param:
        return _text_pipeline()
    vae_run = tmp_path_factory.mktemp("vae")
    runs.write_config(vae_run, load_config(None, VAE))
    return _text_pipeline(vae_run)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=2e-4)


def test_encoders_locate_the_tokens_of_each_word():
    pipe = _text_pipeline()
    encoder = pipe.conditioner.encoder
    assert encoder.word_positions("a red circle") == [("a", [1]), ("red", [2]), ("circle", [3])]
    words = encoder.word_positions("a turquoise dodecahedron")
    assert [w for w, _ in words] == ["a", "turquoise", "dodecahedron"] and words[0][1] == [1]
    assert words[1][1][0] == 2 and words[2][1][0] == words[1][1][-1] + 1  # multi-token words, in order
    cut = encoder.word_positions(" ".join(["red circle"] * 20))  # 40 words past the 32-token limit
    assert len(cut) == 40 and cut[29][1] == [30] and cut[30][1] == []  # [CLS] + 30 words + [SEP]
    tokens = TokenEncoder(["a", "red", "circle"], dim=8, layers=1, heads=1, max_length=3)
    assert tokens.word_positions("A red circle") == [("a", [1]), ("red", [2]), ("circle", [])]  # cut at 3


def test_token_maps_swap_refine_reweight_and_mark_the_blend_words():
    src = [("a", [1]), ("red", [2]), ("circle", [3])]
    swap = editing.token_map(editing.PromptEdit(*SWAP), src, [("a", [1]), ("blue", [2, 3]), ("circle", [4])], 5, 6)
    assert swap.mapper[2, 2] == swap.mapper[2, 3] == 0.5 and swap.mapper[3, 4] == 1  # one token spread over two
    assert swap.mapper[0, 0] == swap.mapper[4, 5] == 1 and swap.alpha.eq(1).all()  # start and end tokens
    edit = editing.PromptEdit("a red circle", "a big red circle", reweight={"big": 2.0}, blend=("circle",))
    tgt = [("a", [1]), ("big", [2]), ("red", [3]), ("circle", [4])]
    refine = editing.token_map(edit, src, tgt, 5, 6)
    assert refine.mapper[2, 3] == refine.mapper[3, 4] == 1 and refine.mapper[:, 2].sum() == 0  # "big" is new
    assert refine.alpha.tolist() == [1, 1, 0, 1, 1, 1] and refine.weight.tolist() == [1, 1, 2, 1, 1, 1]
    assert refine.source_blend.nonzero().flatten().tolist() == [3] and refine.target_blend[4]
    with pytest.raises(ValueError, match="'square' is in neither prompt"):
        editing.token_map(editing.PromptEdit(*SWAP, blend=("square",)), src, src, 5, 5)
    with pytest.raises(ValueError, match="'green' is not a word of the target"):
        editing.token_map(editing.PromptEdit(*SWAP, reweight={"green": 2}), src, src, 5, 5)
    with pytest.raises(ValueError, match="a word swap needs prompts of equal word counts: 'a red circle' has 3 words"):
        editing.PromptEdit("a red circle", "a big red circle", mode="replace")
    with pytest.raises(ValueError, match=r"cross_steps must lie in \[0, 1\]"):
        editing.PromptEdit(*SWAP, cross_steps=1.5)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sources_are_plain_samples_and_injection_edits_the_target(pipe, sampler):
    kw = dict(steps=4, guidance=3, sampler=sampler, seed=0, progress=False)
    sources, targets = pipe.edit(*SWAP, n=3, batch_size=3, **kw)  # an odd batch size is made even
    _close(sources, pipe(SWAP[0], n=3, **kw))
    plain_target = pipe(SWAP[1], n=3, **kw)
    assert (targets - plain_target).abs().max() > 1e-3  # the source's attention reached the target
    _, untouched = pipe.edit(*SWAP, n=3, cross_steps=0, self_steps=0, **kw)
    _close(untouched, plain_target)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_local_blend_keeps_the_source_outside_the_words_region(sampler):
    pipe = _text_pipeline()
    unet = editing.pipeline.unet_of(pipe.denoiser)
    edit = editing.PromptEdit(*SWAP, blend=("circle",), blend_threshold=0.95, blend_start=0.0)
    model, cond, null, s = pipe.sampling_parts(list(SWAP) * 2, 4, None, steps=6, guidance=3, sampler=sampler, seed=1)
    words = [pipe.conditioner.encoder.word_positions(p) for p in SWAP]
    p2p = editing.PromptToPrompt(unet, edit, editing.token_map(edit, *words, 5, 5))
    x = generate(model, pipe.latent_shape, 4, s, cond=cond, null_cond=null, progress=False, edit=p2p)
    mask = p2p.denoisers[0].mask
    assert mask.shape == (2, 1, 8, 8) and 0 < mask.mean() < 1
    outside = (1 - mask).bool().expand(2, 3, 8, 8)
    _close(x[1::2][outside], x[0::2][outside])
    assert (x[1::2] - x[0::2]).abs().max() > 1e-3
    _, same = pipe.edit(*SWAP, n=2, blend=("circle",), blend_threshold=1.0, blend_start=0.0, steps=6, guidance=3,
                        sampler=sampler, seed=1, progress=False)  # no map exceeds its own maximum: no edit at all
    _close(same, pipe(SWAP[0], n=2, steps=6, guidance=3, sampler=sampler, seed=1, progress=False))


def test_hooks_nest_and_leaving_puts_the_earlier_hook_back():
    unet = editing.pipeline.unet_of(_text_pipeline().denoiser)
    seen = []

    class Tag(AttentionHook):
        def __init__(self, tag):
            self.tag = tag

        def probs(self, name, probs):
            seen.append(self.tag)
            return probs

    outer, inner = Tag("outer"), Tag("inner")
    layer = next(iter(unet.attention_layers().values()))
    with attention_hooks(unet, outer):
        with attention_hooks(unet, inner):
            layer.hook.probs("x", torch.ones(1))
        assert layer.hook is outer
    assert layer.hook is None and seen == ["outer", "inner"]


@pytest.mark.parametrize("solver", NULL_TEXT_SOLVERS)
def test_solver_steps_down_the_grid_are_the_samplers(solver):
    gm = GaussianMixture.default(dim=4)
    sigmas = gm.schedule.sigmas(8, "karras")
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).double() * float(sigmas[0])
    state, previous = x, None
    for i in range(len(sigmas) - 1):
        sigma = torch.full((3,), float(sigmas[i]), dtype=torch.float64)
        state, previous = solver_step(solver, state, float(sigmas[i]), float(sigmas[i + 1]), gm(state, sigma), previous)
    sampled = generate(gm, (4,), 3, SamplingSettings(sampler=solver, steps=8, spacing="karras"),
                       edit=editing.FromState(x), progress=False)
    torch.testing.assert_close(state.float(), sampled, rtol=1e-5, atol=1e-5)
    path = inversion_path(gm, x[:1] * 0, sigmas, solver=solver, progress=False)
    assert len(path) == len(sigmas) - 1  # one state per positive grid level


@pytest.mark.parametrize("solver", NULL_TEXT_SOLVERS)
def test_null_text_inversion_reconstructs_better_than_plain_inversion_under_guidance(solver):
    pipe = _text_pipeline()
    image = pipe(SWAP[0], n=2, steps=4, guidance=3, seed=0, progress=False)
    kw = dict(steps=12, guidance=3, sampler=solver, progress=False)
    plain = pipe.reconstruct(pipe.invert(image, SWAP[0], **kw), SWAP[0], **kw)
    noise, nulls = pipe.invert_null_text(image, SWAP[0], **kw)
    assert len(nulls) == 12 and not torch.equal(nulls[0].context, nulls[-1].context)  # one null per step
    again = pipe.reconstruct(noise, SWAP[0], nulls=nulls, **kw)
    assert psnr(again, image).mean() > psnr(plain, image).mean() + 3
    with pytest.raises(ValueError, match="gave 12 null conditions for a grid of 6 steps"):
        pipe.reconstruct(noise, SWAP[0], nulls=nulls, **{**kw, "steps": 6})
    with pytest.raises(ValueError, match="one-evaluation solvers ddim, euler, dpmpp_2m, got 'heun'"):
        pipe.invert_null_text(image, SWAP[0], **{**kw, "sampler": "heun"})


def test_an_image_is_edited_from_its_inversion(pipe):
    image = pipe(SWAP[0], n=1, steps=4, guidance=3, seed=0, progress=False)
    kw = dict(steps=6, guidance=3, sampler="ddim", progress=False)
    sources, targets = pipe.edit(*SWAP, image=image, **kw)
    noise, nulls = pipe.invert_null_text(image, SWAP[0], **kw)
    _close(sources, pipe.reconstruct(noise, SWAP[0], nulls=nulls, **kw))  # the source is its reconstruction
    assert sources.shape == targets.shape == image.shape and (targets - sources).abs().max() > 1e-3
    plain, _ = pipe.edit(*SWAP, image=image, null_text=False, **kw)
    _close(plain, pipe.reconstruct(pipe.invert(image, SWAP[0], **kw), SWAP[0], **kw))


def test_the_edit_command_writes_pairs_and_refuses_bad_input(tmp_path, capsys):
    from difflab.train import train
    run = tmp_path / "run"
    train(load_config(None, TINY_TEXT + [f"out={run}", "train.steps=2"]), progress=False)
    common = ["--run", str(run), "--steps", "3", "--guidance", "2", "--quiet"]
    out = tmp_path / "edits.png"
    assert main(["edit", *common, "--source-prompt", "a red circle", "--target-prompt", "a red big circle",
                 "--reweight", "big=2", "--blend", "circle", "--n", "2", "--out", str(out)]) == 0
    assert out.exists() and out.with_suffix(".npz").exists()
    Image.fromarray((np.arange(192).reshape(8, 8, 3) % 256).astype(np.uint8)).save(tmp_path / "s.png")
    assert main(["invert", *common, "--null-text", "--prompt", "a red circle", "--image", str(tmp_path / "s.png"),
                 "--out", str(tmp_path / "inv.npz")]) == 0
    assert "per-step null embeddings" in capsys.readouterr().out
    assert main(["edit", *common, "--source-prompt", "a red circle", "--target-prompt", "a big red circle",
                 "--mode", "replace"]) == 2
    assert main(["edit", *common, "--source-prompt", "a red circle", "--target-prompt", "a blue circle",
                 "--reweight", "blue"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "equal word counts" in err[0] and "WORD=FACTOR" in err[1]
