"""Editing: inpainting (replacement, RePaint), image-to-image and inversion, with every sampler, on pixel
and latent models (untrained tiny networks: these tests check the mechanics; benchmarks/inpainting.py
and benchmarks/inversion.py measure the quality)."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY
from difflab import editing, load, runs
from difflab.cli import main
from difflab.config import load_config
from difflab.generate import Edit, SamplingSettings, generate
from difflab.latents import build_vae
from difflab.loading import Pipeline
from difflab.testing import GaussianMixture
from difflab.train import train
from difflab.train.build import build_denoiser, build_unet
from difflab.conditioning import conditioner_for

SAMPLERS = ["ddim", "euler", "heun", "dpmpp_2m"]
VAE = ["vae.channels=8", "vae.channel_mult=[1,2]", "vae.groups=4", "vae.latent_channels=2"]


def _pipeline(vae_run=None) -> Pipeline:
    """An untrained tiny class-conditional digits model, in pixels or in the latents of ``vae_run``
    (a VAE run folder holding only its config: the VAE is untrained too)."""
    torch.manual_seed(0)
    latent = [f"model.vae={vae_run}", "model.channel_mult=[1]", "model.attn_levels=[0]"] if vae_run else []
    cfg = load_config(None, TINY + latent)
    conditioner = conditioner_for(cfg, num_classes=10, progress=False)
    vae = None
    if vae_run:
        vae = build_vae(runs.read_config(vae_run, need_weights=False)).eval()
        vae.scaling_factor.fill_(1.0)
    return Pipeline(cfg, build_denoiser(cfg, build_unet(cfg, conditioner)), conditioner, None, vae)


@pytest.fixture(scope="module", params=[False, True], ids=["pixel", "latent"])
def pipe(request, tmp_path_factory):
    if not request.param:
        return _pipeline()
    vae_run = tmp_path_factory.mktemp("vae")
    runs.write_config(vae_run, load_config(None, VAE + ["data.dataset=digits"]))
    return _pipeline(vae_run)


def _image(n=3):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


def _left_half():
    mask = torch.ones(8, 8)
    mask[:, :4] = 0
    return mask


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("method", editing.EDITS)
def test_inpainting_keeps_the_known_pixels_exactly(pipe, sampler, method):
    x = _image()
    out = pipe.inpaint(x, _left_half(), method=method, jump_length=2, resamplings=2, sampler=sampler, steps=6,
                       guidance=0, progress=False)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(out[..., 4:], x[..., 4:])
    assert not torch.equal(out[..., :4], x[..., :4])


def test_replacement_fills_the_unknown_region_from_the_known_one():
    """With an exact denoiser of two perfectly correlated halves (x_right = x_left), replacement
    completes the left half with the known right half."""
    means = torch.zeros(2, 1, 1, 8)
    means[0], means[1] = 1.0, -1.0
    gm = GaussianMixture(means, [0.05, 0.05])
    known = means[1:].float().expand(4, 1, 1, 8).clone()
    mask = torch.ones(1, 1, 1, 8)
    mask[..., :4] = 0
    edit = editing.Inpaint(known, mask.expand(4, 1, 1, 8))
    out = generate(gm, (1, 1, 8), 4, SamplingSettings(sampler="dpmpp_2m", steps=20), edit=edit, progress=False)
    assert torch.allclose(out[..., :4], torch.full_like(out[..., :4], -1.0), atol=0.2)


def test_the_repaint_path_goes_down_and_back_up_one_index_at_a_time():
    path = editing.repaint_path(20, jump_length=5, resamplings=3)
    assert path[0] == 0 and path[-1] == 20
    assert all(abs(b - a) == 1 for a, b in zip(path, path[1:]))
    ups = sum(b < a for a, b in zip(path, path[1:]))
    assert ups == 3 * 2 * 5  # jumps after 5, 10, 15 steps (none in the first 5 from the top), twice, 5 each
    assert sum(b > a for a, b in zip(path, path[1:])) == 20 + ups
    assert editing.repaint_path(7, 10, 10) == list(range(8))  # shorter than a jump: plain descent
    with pytest.raises(ValueError, match="jump_length and resamplings must be >= 1"):
        editing.repaint_path(10, 0, 3)


def test_an_edit_that_changes_nothing_samples_as_generate_does(pipe):
    s = SamplingSettings(sampler="dpmpp_2m", steps=5, seed=3)
    cond, _ = pipe.conds(4)
    plain = generate(pipe.denoiser, pipe.latent_shape, 4, s, cond=cond, progress=False)
    assert torch.equal(generate(pipe.denoiser, pipe.latent_shape, 4, s, cond=cond, progress=False, edit=Edit()), plain)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_img2img_strength_zero_is_the_image_and_its_grid_starts_part_way(pipe, sampler):
    x = _image(2)
    assert torch.equal(pipe.img2img(x, strength=0, sampler=sampler, steps=6, progress=False), x)
    out = pipe.img2img(x, strength=0.5, sampler=sampler, steps=6, progress=False)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert editing.start_index(6, 0.5) == 3 and editing.start_index(6, 1.0) == 0
    sigmas = torch.linspace(10, 0, 7)
    assert torch.equal(editing.Img2Img(x, 0.5).grid(sigmas), sigmas[3:])
    with pytest.raises(ValueError, match=r"strength must lie in \[0, 1\], got 1.5"):
        pipe.img2img(x, strength=1.5)


@pytest.mark.parametrize("solver", editing.SOLVERS)
def test_inversion_error_shrinks_with_steps_and_dpmpp_2m_beats_ddim(solver):
    gm = GaussianMixture.default(dim=4)
    x0 = gm.means[:2].clone() + 0.05
    errors = []
    for steps in (10, 25, 50, 100):
        sigmas = gm.schedule.sigmas(steps, "karras")
        noise = editing.invert(gm, x0, sigmas, solver=solver, progress=False)
        back = generate(gm, (4,), 2, SamplingSettings(sampler=solver, steps=steps, spacing="karras"),
                        edit=editing.FromState(noise), progress=False).double()
        errors.append(float((back - x0).abs().max()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.05, errors
    if solver == "dpmpp_2m":
        ddim = editing.invert(gm, x0, gm.schedule.sigmas(25, "karras"), solver="ddim", progress=False)
        back = generate(gm, (4,), 2, SamplingSettings(sampler="ddim", steps=25, spacing="karras"),
                        edit=editing.FromState(ddim), progress=False).double()
        assert errors[1] < float((back - x0).abs().max())


@pytest.mark.parametrize("solver", editing.SOLVERS)
def test_a_pipeline_inverts_and_reconstructs(pipe, solver):
    x = _image(2)
    noise = pipe.invert(x, labels=[1, 2], guidance=1, steps=8, sampler=solver, progress=False)
    assert noise.shape == (2, *pipe.latent_shape) and torch.isfinite(noise).all()
    back = pipe.reconstruct(noise, labels=[1, 2], guidance=1, steps=8, sampler=solver, progress=False)
    assert back.shape == x.shape
    with pytest.raises(ValueError, match="inversion is deterministic: it takes no eta"):
        pipe.invert(x, labels=[1, 2], eta=1.0, sampler="ddim")


def test_masks_are_checked_pooled_for_latents_and_feathered_outwards():
    x = _image(2)
    assert editing.check_mask(_left_half(), x).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"mask must be \(H, W\) = \(8, 8\) like the image"):
        editing.check_mask(torch.ones(4, 4), x)
    with pytest.raises(ValueError, match="mask must be binary"):
        editing.check_mask(torch.full((8, 8), 0.5), x)
    with pytest.raises(ValueError, match=r"image must be \(N, 1, 8, 8\) for this model, got \(2, 3, 8, 8\)"):
        editing.check_image(torch.zeros(2, 3, 8, 8), (1, 8, 8))
    with pytest.raises(ValueError, match=r"image values must be finite and lie in \[-1, 1\]"):
        editing.check_image(torch.full((1, 1, 8, 8), 2.0), (1, 8, 8))
    mask = torch.ones(1, 1, 8, 8)
    mask[..., 3, 5] = 0
    pooled = editing.latent_mask(mask, (4, 4))
    assert pooled.sum() == 15 and pooled[0, 0, 1, 2] == 0  # a cell with one unknown pixel is unknown
    soft = editing.feathered(editing.check_mask(_left_half(), x), 2)
    assert torch.equal(soft[..., 4:], torch.ones_like(soft[..., 4:])) and 0 < soft[0, 0, 0, 3] < 1
    assert soft[0, 0, 0, 0] < soft[0, 0, 0, 3]


# ---------------------------------------------------------------------------------------------- faces

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("editing")
    train(load_config(None, TINY + [f"out={root / 'run'}", "train.steps=2"]), progress=False)
    digit = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    Image.fromarray(digit).save(root / "digit.png")
    Image.fromarray(np.stack([digit] * 3, -1)).save(root / "rgb.png")
    Image.fromarray(digit[:4, :4]).save(root / "small.png")
    mask = np.full((8, 8), 255, np.uint8)
    mask[:, :4] = 0
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(digit).save(root / "grey_mask.png")
    Image.fromarray(mask[:4, :4]).save(root / "small_mask.png")
    return root


def test_the_edit_commands_write_their_results(files, capsys):
    r = files
    common = ["--run", str(r / "run"), "--steps", "4", "--quiet"]
    assert main(["inpaint", *common, "--image", str(r / "digit.png"), "--mask", str(r / "mask.png"), "--n", "3",
                 "--method", "repaint", "--jump-length", "2", "--resamplings", "2", "--out", str(r / "inp.png")]) == 0
    images = np.load(r / "inp.npz")["images"]
    known = np.asarray(Image.open(r / "digit.png"), np.float32)[None, None, :, 4:] / 127.5 - 1
    assert images.shape == (3, 1, 8, 8) and np.array_equal(images[..., 4:], np.repeat(known, 3, 0))
    assert main(["img2img", *common, "--image", str(r / "digit.png"), "--strength", "0.5", "--labels", "3",
                 "--out", str(r / "i2i.npz")]) == 0
    assert np.load(r / "i2i.npz")["labels"].tolist() == [3]
    assert main(["invert", *common, "--image", str(r / "digit.png"), "--labels", "1", "--out", str(r / "inv.png")]) == 0
    arrays = np.load(r / "inv.npz")
    assert arrays["noise"].shape == (1, 1, 8, 8) and np.isfinite(arrays["psnr_db"])
    assert "reconstruction PSNR" in capsys.readouterr().out
    assert main(["outpaint", *common, "--image", str(r / "digit.png"), "--width", "16", "--height", "8", "--left", "8",
                 "--method", "iterative", "--out", str(r / "wide.npz")]) == 0
    wide = np.load(r / "wide.npz")["images"]
    digit = np.asarray(Image.open(r / "digit.png"), np.float32) / 127.5 - 1
    assert wide.shape == (1, 1, 8, 16) and np.array_equal(wide[0, 0, :, 8:], digit)


@pytest.mark.parametrize("args,message", [
    ("inpaint --image {r}/rgb.png --mask {r}/mask.png", "expected 1 channel(s) (grayscale) for this model, got mode RGB"),
    ("inpaint --image {r}/small.png --mask {r}/mask.png", "expected 8x8 pixels for this model, got 4x4"),
    ("inpaint --image {r}/digit.png --mask {r}/grey_mask.png", "expected only black (0) and white (255)"),
    ("inpaint --image {r}/digit.png --mask {r}/small_mask.png", "expected 8x8 pixels like the image, got 4x4"),
    ("inpaint --image {r}/digit.png --mask {r}/rgb.png", "expected a grayscale image (white = keep"),
    ("inpaint --image {r}/nothere.png --mask {r}/mask.png", "image {r}/nothere.png does not exist"),
    ("inpaint --image {r}/run/config.yaml --mask {r}/mask.png", "not a readable image"),
    ("inpaint --image {r}/digit.png --mask {r}/mask.png --method foo", "argument --method: invalid choice: 'foo'"),
    ("inpaint --image {r}/digit.png --mask {r}/mask.png --method repaint --jump-length 0",
     "jump_length and resamplings must be >= 1"),
    ("inpaint --image {r}/digit.png --mask {r}/mask.png --feather -1", "feather radius must be >= 0, got -1"),
    ("inpaint --image {r}/digit.png --mask {r}/mask.png --method model", "method 'model' needs an inpainting model"),
    ("inpaint --image {r}/digit.png --mask {r}/mask.png --labels 12", "labels must lie in [0, 9], got 12"),
    ("inpaint --image {r}/digit.png", "the following arguments are required: --mask"),
    ("img2img --image {r}/digit.png --strength 1.5", "strength must lie in [0, 1], got 1.5"),
    ("img2img --image {r}/digit.png --strength -0.1", "strength must lie in [0, 1], got -0.1"),
    ("img2img --image {r}/digit.png --strength 0.01 --steps 10", "strength rounds to no step on this grid"),
    ("invert --image {r}/digit.png --sampler euler_ancestral", "deterministic solvers ddim, euler, heun, dpmpp_2m, got 'euler_ancestral'"),
    ("invert --image {r}/digit.png --eta 1", "inversion is deterministic: it takes no eta"),
    ("invert --image {r}/digit.png --out {r}/x.txt", "expected a .png, .jpg, .jpeg, .npz file name"),
    ("outpaint --image {r}/digit.png --width 4 --height 8", "an 8x8 image at offset (0, 0) does not fit a 8x4 canvas"),
    ("outpaint --image {r}/digit.png --width 16 --height 8 --stride 0", "stride must lie in [1, window = 8], got 0"),
    ("outpaint --image {r}/digit.png --width 16 --height 8 --left 9", "does not fit a 8x16 canvas"),
    ("outpaint --image {r}/digit.png --width 16", "the following arguments are required: --height"),
])
def test_bad_edit_inputs_are_one_error_line(files, capsys, args, message):
    argv = args.format(r=files).split()
    try:
        code = main([argv[0], "--run", str(files / "run"), *argv[1:], "--quiet"])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("difflab: error: "), err
    assert message.format(r=files) in err[0]


# ------------------------------------------------------------------------------------ inpainting model

def test_training_masks_are_seeded_binary_and_of_every_kind():
    a = editing.random_masks(400, (8, 8), torch.Generator().manual_seed(0))
    assert torch.equal(a, editing.random_masks(400, (8, 8), torch.Generator().manual_seed(0)))
    assert a.shape == (400, 1, 8, 8) and ((a == 0) | (a == 1)).all()
    unknown = (1 - a).flatten(1).sum(1)
    assert (unknown == 64).any() and (unknown == 32).any() and ((unknown > 0) & (unknown < 64)).float().mean() > 0.8


def test_an_inpainting_model_trains_resumes_exactly_and_is_conditioned_on_the_known_image(tmp_path):
    def cfg(name, steps):
        return load_config(None, TINY + [f"out={tmp_path / name}", "model.inpainting=true", f"train.steps={steps}"])
    straight = train(cfg("a", 4), progress=False)
    train(cfg("b", 2), progress=False)
    resumed = train(cfg("b", 4), resume=True, progress=False)
    from safetensors.torch import load_file
    wa, wb = (load_file(str(runs.weights_path(r))) for r in (straight, resumed))
    assert wa["conv_in.weight"].shape[1] == 1 + 2 and all(torch.equal(wa[k], wb[k]) for k in wa)
    pipe = load(straight)
    x, mask = _image(2), _left_half()
    out = pipe.inpaint(x, mask, method="model", steps=4, guidance=2, labels=[3, 4], progress=False)
    assert torch.equal(out[..., 4:], x[..., 4:])
    other = pipe.inpaint(-x, mask, method="model", steps=4, guidance=2, labels=[3, 4], progress=False)
    assert not torch.allclose(out[..., :4], other[..., :4])  # the known half reaches the network
    assert pipe(n=2, steps=4).shape == (2, 1, 8, 8)  # no image given: everything unknown
    with pytest.raises(ValueError, match="method 'model' needs an inpainting model"):
        _pipeline().inpaint(x, mask, method="model")


def test_the_unet_checks_its_concatenated_image():
    from difflab.cond import Cond
    from difflab.nn import UNet
    plain, concat = UNet(1, channels=16, groups=4, head_dim=16), UNet(1, channels=16, groups=4, head_dim=16,
                                                                     concat_channels=2)
    x, t = torch.zeros(2, 1, 8, 8), torch.zeros(2)
    with pytest.raises(ValueError, match="this UNet takes no concatenated image"):
        plain(x, t, Cond(image=torch.zeros(2, 2, 8, 8)))
    with pytest.raises(ValueError, match=r"cond.image must be \(B, 2, 8, 8\) for this UNet, got \(2, 1, 8, 8\)"):
        concat(x, t, Cond(image=torch.zeros(2, 1, 8, 8)))
    assert concat(x, t, Cond(image=torch.zeros(2, 2, 8, 8))).shape == x.shape


# ------------------------------------------------------------------------------------------ outpainting

def test_windows_cover_the_canvas_and_the_last_is_flush_with_its_edge():
    assert editing.window_starts(16, 8, 4) == [0, 4, 8] and editing.window_starts(14, 8, 4) == [0, 4, 6]
    assert editing.window_starts(8, 8, 8) == [0]
    assert len(editing.windows((8, 16), (8, 8), (4, 4))) == 3
    with pytest.raises(ValueError, match=r"the canvas \(4\) is smaller than the model's window \(8\)"):
        editing.window_starts(4, 8, 4)
    with pytest.raises(ValueError, match=r"stride must lie in \[1, window = 8\], got 9"):
        editing.window_starts(16, 8, 9)


def test_a_windowed_denoiser_is_the_mean_of_its_windows():
    calls = []

    def position_mean(x, sigma, cond=None):  # a "denoiser" that returns each window's mean everywhere
        calls.append(len(x))
        return x.mean((1, 2, 3), keepdim=True).expand_as(x)

    position_mean.schedule = None
    x = torch.arange(16.0).reshape(1, 1, 1, 16).expand(2, 1, 8, 16).clone()
    out = editing.WindowedDenoiser(position_mean, (8, 8), (4, 4))(x, torch.ones(2))
    assert calls == [6]  # three windows of two samples, in one batch
    assert torch.allclose(out[0, 0, 0, :4], torch.full((4,), 3.5))  # only the first window: mean of 0..7
    assert torch.allclose(out[0, 0, 0, 4:8], torch.full((4,), (3.5 + 7.5) / 2))
    same = editing.WindowedDenoiser(position_mean, (8, 16), (8, 16))(x, torch.ones(2))
    assert torch.equal(same, position_mean(x, None))


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("method", editing.OUTPAINT_METHODS)
def test_outpainting_keeps_the_image_and_fills_the_canvas(pipe, method, sampler):
    x = _image(2)
    out = pipe.outpaint(x, size=(8, 16), offset=(0, 4), method=method, labels=[1, 2], steps=4, sampler=sampler,
                        progress=False)
    assert out.shape == (2, 1, 8, 16) and torch.isfinite(out).all()
    assert torch.equal(out[..., 4:12], x) and not torch.equal(out[..., :4], -torch.ones_like(out[..., :4]))
    with pytest.raises(ValueError, match=r"an 8x8 image at offset \(0, 12\) does not fit a 8x16 canvas"):
        pipe.outpaint(x, size=(8, 16), offset=(0, 12))
    with pytest.raises(ValueError, match="unknown outpainting method 'tile'"):
        pipe.outpaint(x, size=(8, 16), method="tile")


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_self_attention_guidance_runs_with_every_sampler_and_scale_zero_is_plain(pipe, sampler):
    kw = dict(n=2, labels=[1, 2], steps=4, guidance=2, sampler=sampler, seed=0, progress=False)
    plain = pipe(**kw)
    assert torch.equal(pipe(**kw, sag_scale=0.0), plain)
    guided = pipe(**kw, sag_scale=0.75)
    assert torch.isfinite(guided).all() and not torch.equal(guided, plain)
