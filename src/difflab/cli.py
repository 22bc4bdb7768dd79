"""``difflab train | train-vae | finetune | distill | reflow | memory | sample | inpaint | outpaint | img2img |
invert | edit | eval | fid-stats | samplers``. The only module that parses arguments."""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import adapters, devices, distill, editing
from .adapters.image_encoder import CONFIG as IMAGE_ENCODER_CONFIG
from .adapters.image_encoder import ImageEncoderTraining, train_image_encoder
from .adapters.training import FINETUNE_DEFAULTS, LORA_FILE, train_adapter
from .config import ConfigError, load_config, parse_overrides, validate
from .files import save_npz
from .images import load_image, load_mask, load_picture
from .metrics.reconstruction import psnr as psnr_db
from .evaluation import evaluate, evaluate_against_reference, format_evaluation, format_metrics
from .generate import SamplingSettings
from .memory import format_plan, plan
from .pipelines import check_output, fid_stats, load, save_samples
from .interrupts import Interrupted
from .runs import RunFolderError, RunLockedError
from .samplers import SAMPLERS
from .tables import format_table
from .train import TrainingError, evaluate_vae, train, train_vae

DEFAULT_CONFIG = "digits (built-in defaults)"


def _config(args):
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # `difflab train key=value` without a config file
        config, overrides = None, [config] + overrides
    return load_config(config, overrides)


def _train(args) -> None:
    cfg = _config(args)
    if cfg.adapter.kind:
        run = train_adapter(cfg, resume=args.resume, progress=not args.quiet, verify=not args.no_verify)
        print(f"run folder: {run}")
        return
    if cfg.diffusion.parametrization == "consistency":
        run = distill.train_consistency(cfg, resume=args.resume, progress=not args.quiet, verify=not args.no_verify)
    else:
        run = train(cfg, resume=args.resume, progress=not args.quiet, verify=not args.no_verify)
    _report([run], cfg, args)


def _distill(args) -> None:
    cfg = distill.distill_config(args.method, args.teacher, args.overrides, args.out)
    _report(distill.distill(cfg, resume=args.resume, progress=not args.quiet), cfg, args)


def _reflow(args) -> None:
    cfg = distill.distill_config("reflow", args.run, args.overrides, args.out)
    _report(distill.distill(cfg, resume=args.resume, progress=not args.quiet), cfg, args)


def _report(folders, cfg, args) -> None:
    """After training: leave the torchrun group (if any); then, on rank 0 or alone, each run folder
    and its built-in evaluation (class-conditional digits, text shapes) unless --no-eval."""
    if devices.group_is_initialized():
        rank = devices.init_distributed(devices.resolve_device(cfg.train.device)).rank
        devices.destroy_group()
        if rank != 0:
            return
    for run in folders:
        print(f"run folder: {run}")
        data = load_config(Path(run) / "config.yaml").data
        if not args.no_eval and data.dataset in ("digits", "shapes") and data.conditional:
            _print_eval(run, progress=not args.quiet)


def _finetune(args) -> None:
    if not args.lora:
        raise ValueError("difflab finetune trains LoRA layers: pass --lora (full fine-tuning is not offered)")
    out = args.out or f"{str(args.run).rstrip('/')}-lora"
    cfg = load_config(None, FINETUNE_DEFAULTS + [f"out={out}", *args.overrides])
    cfg = validate(replace(cfg, adapter=replace(cfg.adapter, kind="lora", base=str(args.run), images=str(args.images),
                                                caption=args.caption)))  # as given, not read as YAML
    run = train_adapter(cfg, resume=args.resume, progress=not args.quiet)
    print(f"run folder: {run}; LoRA file: {Path(run) / LORA_FILE}")


def _train_image_encoder(args) -> None:
    _at_least_one(args, "steps", "scenes")
    training = ImageEncoderTraining(image_size=args.image_size, steps=args.steps, scenes=args.scenes)
    folder = train_image_encoder(args.out, training, progress=not args.quiet)
    record = json.loads((folder / IMAGE_ENCODER_CONFIG).read_text())
    print(f"image encoder: {folder}; zero-shot top-1 over the 28 single-object captions on held-out renders: "
          f"{record['zero_shot_top1']:.3f}")


def _train_vae(args) -> None:
    run = train_vae(_config(args), resume=args.resume, progress=not args.quiet, verify=not args.no_verify)
    print(f"run folder: {run}")
    if not args.no_eval:
        m = evaluate_vae(run)
        ssim = f", SSIM {m['ssim']:.4f}" if "ssim" in m else ""
        print(f"reconstruction of {m['n']} {m['split']} images: PSNR {m['psnr_db']:.2f} dB{ssim}; "
              f"latent scaling factor {m['scaling_factor']:.4f}")
        print(f"metrics written to {Path(run) / 'metrics.json'}")


def _memory(args) -> None:
    _at_least_one(args, "batch_size")
    print(format_plan(plan(_config(args), args.batch_size, device=args.device)))


def _print_eval(run, **kw) -> None:
    metrics = evaluate(run, **kw)
    print(format_metrics(metrics))
    print(f"metrics written to {Path(run) / 'metrics.json'}")


def _eval(args) -> None:
    _at_least_one(args, "n", "steps", "shard_size", "batch_size")
    settings = SamplingSettings(sampler=args.sampler, steps=args.steps, guidance=args.guidance, seed=args.seed)
    if args.ref is None and args.metrics is None:  # the built-in digits / shapes evaluation
        _print_eval(args.run, settings=settings, extra_guidance=args.extra_guidance, n=args.n,
                    progress=not args.quiet)
        return
    if args.extra_guidance is not None:
        raise ValueError("--extra-guidance belongs to the built-in evaluation; with --ref/--metrics run one "
                         "`difflab eval` per guidance scale (--guidance)")
    result = evaluate_against_reference(
        args.run, args.ref, args.n, args.metrics or "fid", args.extractor, shard_size=args.shard_size,
        extractor_weights={"clip": args.clip, "inception": args.inception_weights}, progress=not args.quiet,
        **_set_fields(settings), batch_size=args.batch_size)
    if result is not None:  # rank 0 (or the only process)
        print(format_evaluation(result))
        print(f"metrics written to {result['path']}")


def _set_fields(settings: SamplingSettings) -> dict:
    """The fields of ``settings`` that are set, as keywords."""
    return {k: v for k, v in vars(settings).items() if v is not None and k != "options"}


def _labels(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--labels expects comma-separated integers such as 3 or 0,1,2, got {text!r}") from None


def _at_least_one(args, *names: str) -> None:
    """Counts given on the command line (``None``: not given) must be >= 1."""
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def _request(args):
    """(pipe, prompt, labels, settings) of the sampling arguments shared by sample and the edits."""
    _at_least_one(args, "n", "nrow", "batch_size", "steps")
    check_output(args.out)
    pipe = load(args.run, weights=args.weights, verify=not args.no_verify)
    if args.lora:
        pipe.load_lora(args.lora, 1.0 if args.lora_scale is None else args.lora_scale)
    elif args.lora_scale is not None:
        pipe.set_lora_scale(args.lora_scale)
    labels = _labels(args.labels)
    if labels is not None and len(labels) == 1:
        labels = labels * args.n
    if labels is not None and len(labels) != args.n:
        raise ValueError(f"--labels gives {len(labels)} labels for --n {args.n}")
    options = parse_overrides(args.option)  # key=value, values read as YAML; typed by the sampler
    if args.eta is not None:
        options["eta"] = args.eta
    settings = SamplingSettings(sampler=args.sampler, options=options, steps=args.steps, spacing=args.spacing,
                                guidance=args.guidance, guidance_rescale=args.guidance_rescale,
                                negative_prompt=args.negative_prompt, seed=args.seed, batch_size=args.batch_size,
                                sag_scale=args.sag_scale)
    prompt = None if args.prompt is None else (args.prompt.split("|") if "|" in args.prompt else args.prompt)
    return pipe, prompt, labels, settings


def _write(images, args, pipe, labels) -> None:
    used = labels if labels is not None else ([i % pipe.num_classes for i in range(len(images))]
                                              if pipe.num_classes else None)
    for path in save_samples(images, Path(args.out), used, nrow=args.nrow):
        print(f"wrote {path}")


def _sample(args) -> None:
    pipe, prompt, labels, settings = _request(args)
    control, scale = _control(args, pipe), args.control_scale
    image_prompt = None if args.image_prompt is None else load_picture(args.image_prompt)
    images = pipe(prompt, n=args.n, labels=labels, settings=settings, progress=not args.quiet, control=control,
                  control_scale=scale[0] if len(scale) == 1 else scale, image_prompt=image_prompt,
                  ip_scale=args.ip_scale, image_guidance=args.image_guidance)
    _write(images, args, pipe, labels)


def _control(args, pipe):
    """The hint of --control: a grayscale map in [0, 1], or the Canny edges of a picture (--canny)."""
    if args.control is None:
        if args.canny:
            raise ValueError("--canny reads the picture given by --control; pass --control FILE")
        return None
    size = pipe.shape[1]
    if args.canny:
        return adapters.edge_map(load_image(args.control, pipe.shape[0], size))[0]
    return (load_image(args.control, 1, size)[0] + 1) / 2


def _input_image(args, pipe):
    c, size = pipe.shape[0], pipe.shape[1]
    return load_image(args.image, c, size)


def _inpaint(args) -> None:
    pipe, prompt, labels, settings = _request(args)
    image = _input_image(args, pipe)
    mask = load_mask(args.mask, pipe.shape[1])
    images = editing.inpaint(pipe, image, mask, prompt, n=args.n, labels=labels, method=args.method,
                             jump_length=args.jump_length, resamplings=args.resamplings, feather=args.feather,
                             settings=settings, progress=not args.quiet)
    _write(images, args, pipe, labels)


def _outpaint(args) -> None:
    pipe, prompt, labels, settings = _request(args)
    images = editing.outpaint(pipe, _input_image(args, pipe), prompt, size=(args.height, args.width),
                              offset=(args.top, args.left), method=args.method, stride=args.stride, n=args.n,
                              labels=labels, inpaint_method=args.inpaint_method, settings=settings,
                              progress=not args.quiet)
    _write(images, args, pipe, labels)


def _img2img(args) -> None:
    pipe, prompt, labels, settings = _request(args)
    images = editing.img2img(pipe, _input_image(args, pipe), prompt, strength=args.strength, n=args.n, labels=labels,
                             settings=settings, progress=not args.quiet)
    _write(images, args, pipe, labels)


def _invert(args) -> None:
    args.n = 1
    pipe, prompt, labels, settings = _request(args)
    image = _input_image(args, pipe)
    arrays, nulls = {}, None
    if args.null_text:
        if not isinstance(prompt, str):
            raise ValueError("--null-text inverts a text model's image under one --prompt")
        noise, nulls = editing.invert_null_text(pipe, image, prompt, settings=settings, progress=not args.quiet)
        arrays["null_context"] = torch.stack([null.context for null in nulls]).numpy()
        if nulls[0].pooled is not None:
            arrays["null_pooled"] = torch.stack([null.pooled for null in nulls]).numpy()
    else:
        noise = editing.invert_image(pipe, image, prompt, labels=labels, settings=settings, progress=not args.quiet)
    again = editing.reconstruct(pipe, noise, prompt, labels=labels, nulls=nulls, settings=settings, progress=False)
    psnr = psnr_db(again, image).mean().item()
    npz = Path(args.out).with_suffix(".npz")
    if Path(args.out).suffix.lower() != ".npz":  # the grid first: its .npz beside is replaced below
        save_samples(torch.cat([image, again]), Path(args.out), nrow=2)
        print(f"wrote {args.out} (the image, then its reconstruction)")
    save_npz(npz, noise=noise.numpy(), reconstruction=again.numpy(), psnr_db=np.float64(psnr), **arrays)
    kind = " and the per-step null embeddings" if nulls else ""
    print(f"wrote {npz} (noise at sigma_max{kind}, reconstruction); reconstruction PSNR {psnr:.2f} dB")


def _reweights(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        word, _, factor = pair.partition("=")
        try:
            out[word] = float(factor)
        except ValueError:
            raise ValueError(f"--reweight expects WORD=FACTOR such as red=2, got {pair!r}") from None
    return out


def _edit(args) -> None:
    if args.prompt is not None:
        raise ValueError("edit takes --source-prompt and --target-prompt, not --prompt")
    pipe, _, labels, settings = _request(args)
    if labels is not None:
        raise ValueError("edit works on text models: it takes prompts, not --labels")
    image = None if args.image is None else _input_image(args, pipe)
    sources, targets = editing.edit_prompt(
        pipe, args.source_prompt, args.target_prompt, n=args.n, image=image, null_text=not args.no_null_text,
        mode=args.mode, cross_steps=args.cross_steps, self_steps=args.self_steps, reweight=_reweights(args.reweight),
        blend=tuple(w for w in (args.blend or "").split(",") if w), blend_threshold=args.blend_threshold,
        settings=settings, progress=not args.quiet)
    out = Path(args.out)
    if out.suffix.lower() != ".npz":
        save_samples(torch.stack([sources, targets], 1).flatten(0, 1), out, nrow=2)
        print(f"wrote {out} (each row: the source, then its edit)")
    npz = out.with_suffix(".npz")
    save_npz(npz, sources=sources.numpy(), targets=targets.numpy())
    print(f"wrote {npz} (sources, targets)")


def _fid_stats(args) -> None:
    _at_least_one(args, "image_size")
    check_output(args.out, (".npz",))
    meta = fid_stats(args.folder, args.out, extractor=args.extractor, image_size=args.image_size,
                     weights=args.weights, clip=args.clip, progress=not args.quiet)
    print(f"wrote {args.out} ({meta['extractor']} features of {meta['n']} images)")


def _samplers(args) -> None:
    rows = [("name", "NFE/step", "order", "stochastic")]
    rows += [(name, str(i.nfe_per_step), str(i.order), "yes" if i.stochastic else "no") for name, i in sorted(SAMPLERS.items())]
    print(format_table(rows, rule=False))
    print("\norder: of the default formula as an ODE solver (eta = 0 for the stochastic ones).\n"
          "  dpmpp_3m: the references' 3M, second order; taylor_d2=True makes it third order.\n"
          "  unipc: UniP-3 with the UniC corrector; corrector=False gives order 3.")


def _floats(text: str) -> list[float]:
    """A comma-separated list of finite numbers (argparse reports the ValueError)."""
    values = [float(v) for v in text.split(",") if v]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(text)
    return values


_floats.__name__ = "comma-separated numbers"  # argparse names the type in its message


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one ``difflab: error:`` line (exit 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"difflab: error: {message} (see `{self.prog} --help`)\n")


def _config_args(parser) -> None:
    parser.add_argument("config", nargs="?", help=f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=500 model.channels=64")


def _train_args(parser) -> None:
    _config_args(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in the config's out folder")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    parser.add_argument("--no-verify", action="store_true", help="resume without checking the checkpoint's SHA-256")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _student_args(parser, overrides: str, out: str, func) -> None:
    """What ``distill`` and ``reflow`` share, after their own positional argument."""
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {overrides}")
    parser.add_argument("--out", default=None, help=out)
    parser.add_argument("--resume", action="store_true", help="continue (finished halvings are kept)")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation of the students")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=func)


def _training_parsers(sub) -> None:
    t = sub.add_parser("train", help="train a model (default: class-conditional digits), then evaluate it")
    _train_args(t)
    t.set_defaults(func=_train)

    v = sub.add_parser("train-vae", help="train the autoencoder of latent diffusion (config section vae), then "
                                         "report its reconstruction PSNR on held-out images (a folder dataset: "
                                         "its first images)")
    _train_args(v)
    v.set_defaults(func=_train_vae)

    f = sub.add_parser("finetune", help="fine-tune a run on a few images that share a caption: LoRA layers "
                                        "through peft; writes a run folder holding lora.safetensors")
    f.add_argument("run", help="the base run folder (frozen)")
    f.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=600 adapter.rank=8")
    f.add_argument("--lora", action="store_true", help="train LoRA layers (the one method so far)")
    f.add_argument("--images", required=True, help="folder of images at the base's size")
    f.add_argument("--caption", required=True, help="the caption of every image")
    f.add_argument("--out", default=None, help="the LoRA run folder (default: RUN-lora beside RUN)")
    f.add_argument("--resume", action="store_true")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=_finetune)

    d = sub.add_parser("distill", help="few-step students of a teacher run: progressive distillation (a run per "
                                       "halving, <out>/<n>-steps) or consistency distillation; then evaluate them")
    d.add_argument("method", choices=("progressive", "consistency"))
    d.add_argument("--teacher", required=True, help="the teacher run folder (its EMA weights, frozen)")
    _student_args(d, "distill.steps=64 distill.guidance=3",
                  "the student run folder (default: TEACHER-<method> beside TEACHER)", _distill)

    r = sub.add_parser("reflow", help="retrain a rectified-flow run on its own noise-sample pairs (Liu et al. "
                                      "2023): straighter paths for few Euler steps; then evaluate it")
    r.add_argument("run", help="the flow run folder (diffusion.parametrization=flow)")
    _student_args(r, "distill.pairs=20000 train.steps=3000", "the new run folder (default: RUN-reflow beside RUN)",
                  _reflow)

    c = sub.add_parser("train-image-encoder", help="train the shapes world's CLIP-style image encoder (image tower "
                                                   "against the frozen MiniLM); reports zero-shot caption retrieval")
    c.add_argument("out", help="the folder to write")
    c.add_argument("--image-size", type=int, default=32)
    c.add_argument("--steps", type=int, default=ImageEncoderTraining.steps)
    c.add_argument("--scenes", type=int, default=ImageEncoderTraining.scenes)
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=_train_image_encoder)

    m = sub.add_parser("memory", help="predict peak memory of training (fp32/bf16, checkpointing off/on) and "
                                      "sampling for a config, before running it")
    _config_args(m)
    m.add_argument("--batch-size", type=int, default=None, help="training batch (default: train.batch_size)")
    m.add_argument("--device", default=None, help="cpu or cuda (default: the config's train.device)")
    m.set_defaults(func=_memory)


def _sampling_args(s, n: bool = True) -> None:
    s.add_argument("--run", required=True)
    s.add_argument("--lora", default=None, help="a LoRA file (lora.safetensors of `difflab finetune`) for this run")
    s.add_argument("--lora-scale", type=float, default=None, help="LoRA strength (default 1; 0 = the base)")
    if n:
        s.add_argument("--n", type=int, default=64 if s.prog.endswith("sample") else 1)
    s.add_argument("--labels", help="comma-separated class labels (one label = all samples)")
    s.add_argument("--prompt", help="text models: the prompt (or n prompts separated by '|')")
    s.add_argument("--negative-prompt", default=None, help="text models: replaces the empty prompt in guidance")
    s.add_argument("--guidance-rescale", type=float, default=None, help="guidance rescale phi (Lin et al. 2024)")
    s.add_argument("--sampler", default=None, help="see `difflab samplers` (default: the run's eval.sampler)")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--spacing", "--schedule", dest="spacing", default=None,
                   help="sigma grid: trailing, leading, linspace, karras, exponential, uniform")
    s.add_argument("--guidance", type=float, default=None)
    s.add_argument("--sag-scale", type=float, default=None, help="self-attention guidance scale (0 = off)")
    s.add_argument("--eta", type=float, default=None, help="DDIM eta")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a sampler option, repeatable: taylor_d2=true, corrector=false, s_churn=40, ...")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--weights", default="ema", choices=["ema", "model"])
    s.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of the weights (huge models)")
    s.add_argument("--nrow", type=int, default=8)
    s.add_argument("--out", default="samples.png", help="a .png or .jpg grid (the samples beside it as .npz), "
                                                         "or .npz alone")
    s.add_argument("--quiet", action="store_true")


def _sample_parser(sub) -> None:
    s = sub.add_parser("sample", help="draw samples from a run into a PNG grid and an .npz")
    _sampling_args(s)
    s.add_argument("--control", default=None, help="a ControlNet run's hint: a grayscale map at the image size "
                   "(edges white on black, or depth), or with --canny any image whose edges are the hint")
    s.add_argument("--canny", action="store_true", help="--control is a picture: its Canny edges are the hint")
    s.add_argument("--control-scale", type=_floats, default=[1.0],
                   help="ControlNet strength: one number, or one per level then the middle (comma-separated)")
    s.add_argument("--image-prompt", default=None, help="an IP-Adapter run's image prompt: an RGB image file")
    s.add_argument("--ip-scale", type=float, default=1.0, help="IP-Adapter strength (0 = the text prompt alone)")
    s.add_argument("--image-guidance", type=float, default=None,
                   help="guide the image prompt apart from the text (InstructPix2Pix's two scales; --guidance "
                        "then weighs the text)")
    s.set_defaults(func=_sample)


def _edit_parsers(sub) -> None:
    image = "the input image file (grayscale or RGB as the model, at its size; pixels in [0, 255])"
    p = sub.add_parser("inpaint", help="complete the black region of a mask (white = keep)")
    _sampling_args(p)
    p.add_argument("--image", required=True, help=image)
    p.add_argument("--mask", required=True, help="grayscale, white (255) = keep, black (0) = generate")
    p.add_argument("--method", default="replace", choices=editing.METHODS)
    p.add_argument("--jump-length", type=int, default=10, help="RePaint: steps between jumps back up")
    p.add_argument("--resamplings", type=int, default=10, help="RePaint: passes over each stretch")
    p.add_argument("--feather", type=int, default=0, help="pixels the seam is blended into the generated region")
    p.set_defaults(func=_inpaint)
    p = sub.add_parser("outpaint", help="put an image on a larger canvas and generate the rest")
    _sampling_args(p)
    p.add_argument("--image", required=True, help=image)
    p.add_argument("--width", type=int, required=True, help="canvas width in pixels")
    p.add_argument("--height", type=int, required=True, help="canvas height in pixels")
    p.add_argument("--left", type=int, default=0, help="where the image's left edge lies on the canvas")
    p.add_argument("--top", type=int, default=0, help="where the image's top edge lies on the canvas")
    p.add_argument("--method", default="fused", choices=editing.OUTPAINT_METHODS,
                   help="fused: MultiDiffusion windows; iterative: window after window")
    p.add_argument("--stride", type=int, default=None, help="pixels between windows (default half a window)")
    p.add_argument("--inpaint-method", default="replace", choices=editing.EDITS)
    p.set_defaults(func=_outpaint)
    p = sub.add_parser("img2img", help="SDEdit: noise an image part way and sample it back with the condition")
    _sampling_args(p)
    p.add_argument("--image", required=True, help=image)
    p.add_argument("--strength", type=float, default=0.6, help="0 = the image itself, 1 = ignore it")
    p.set_defaults(func=_img2img)
    p = sub.add_parser("invert", help="DDIM / DPM-Solver++(2M) inversion of an image; reports its reconstruction")
    _sampling_args(p, n=False)
    p.add_argument("--image", required=True, help=image)
    p.add_argument("--null-text", action="store_true",
                   help="text models under guidance: optimise the null embedding per step (Mokady et al. 2023)")
    p.set_defaults(func=_invert, out="inverted.npz")
    p = sub.add_parser("edit", help="prompt-to-prompt: edit generated (or, with --image, inverted) images by "
                                    "changing the prompt")
    _sampling_args(p)
    p.add_argument("--source-prompt", required=True)
    p.add_argument("--target-prompt", required=True)
    p.add_argument("--image", default=None, help=image + "; edited after inversion under the source prompt")
    p.add_argument("--no-null-text", action="store_true", help="with --image under guidance: plain DDIM inversion")
    p.add_argument("--mode", default=None, choices=editing.prompt2prompt.MODES,
                   help="replace (word swap) or refine (words added); default: replace when the word counts agree")
    p.add_argument("--cross-steps", type=float, default=0.8, help="fraction of steps with injected cross-attention")
    p.add_argument("--self-steps", type=float, default=0.4, help="fraction of steps with injected self-attention")
    p.add_argument("--reweight", action="append", default=[], metavar="WORD=FACTOR",
                   help="scale a target word's cross-attention, repeatable")
    p.add_argument("--blend", default=None, help="comma-separated words whose attention bounds the edit (local blend)")
    p.add_argument("--blend-threshold", type=float, default=0.3)
    p.set_defaults(func=_edit, out="edits.png")


def _eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="score a run's samples; writes metrics.json")
    # --run-dir / --num-samples: spellings torchrun's own parser does not take for abbreviations of its
    # options (it rejects `--run` as ambiguous with --run-path, `--n` with --nnodes, --nproc-per-node ...)
    e.add_argument("--run", "--run-dir", dest="run", required=True)
    e.add_argument("--sampler", default=None)
    e.add_argument("--steps", type=int, default=None)
    e.add_argument("--guidance", type=float, default=None)
    e.add_argument("--extra-guidance", type=_floats, default=None,
                   help="comma-separated further guidance scales to report")
    e.add_argument("--n", "--num-samples", dest="n", type=int, default=None,
                   help="number of samples (default: the run's eval.n_samples)")
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--ref", default=None, help="reference statistics (.npz from `difflab fid-stats`) or an image "
                                               "folder: score sharded samples against it (difflab.evaluation)")
    e.add_argument("--metrics", default=None, help="with --ref: comma list of fid,kid,is,pr (default fid); "
                                                   "is alone needs no --ref")
    e.add_argument("--extractor", default=None, choices=["inception", "digits", "shapes", "clip"],
                   help="feature extractor (default: the reference's, else inception)")
    e.add_argument("--shard-size", type=int, default=1000, help="samples per resumable shard")
    e.add_argument("--batch-size", type=int, default=None, help="sampling batch (default: the run's eval.batch_size)")
    e.add_argument("--clip", default=None, help="local CLIP folder, or the shapes world's own encoder (train-image-encoder), "
                   "for --extractor clip (else $DIFFLAB_CLIP_PATH)")
    e.add_argument("--inception-weights", default=None,
                   help="Inception weights file (else $DIFFLAB_INCEPTION_WEIGHTS or the torch hub cache)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_eval)


def _fid_stats_parser(sub) -> None:
    f = sub.add_parser("fid-stats", help="reference statistics (mu, sigma) of an image folder as .npz")
    f.add_argument("folder")
    f.add_argument("--out", required=True)
    f.add_argument("--extractor", default="inception", choices=["inception", "digits", "shapes", "clip"])
    f.add_argument("--image-size", type=int, default=None,
                   help="resize/crop size: the evaluated run's image size (default 8 for digits, else 32)")
    f.add_argument("--clip", default=None, help="local CLIP folder, or the shapes world's own encoder (train-image-encoder), "
                   "for --extractor clip (else $DIFFLAB_CLIP_PATH)")
    f.add_argument("--weights", default=None, help="Inception weights file (else $DIFFLAB_INCEPTION_WEIGHTS "
                                                    "or the torch hub cache)")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=_fid_stats)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="difflab", description="Diffusion models: train, sample, evaluate.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    _training_parsers(sub)
    _sample_parser(sub)
    _edit_parsers(sub)
    _eval_parser(sub)
    _fid_stats_parser(sub)
    sub.add_parser("samplers", help="list the samplers").set_defaults(func=_samplers)
    for command in sub.choices.values():  # `difflab sample ... --debug` as well as `difflab --debug sample ...`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


USER_ERRORS = (ConfigError, RunFolderError, RunLockedError, TrainingError, ValueError, OSError)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides accepted after the options too
    (``difflab distill progressive --teacher RUN distill.steps=64``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    if extra and (len(overrides) < len(extra) or not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    return args


def main(argv=None) -> int:
    """Run one command; a user error (a bad input, a damaged file, a full disk) is one ``difflab: error:``
    line and exit code 2, a stop on SIGINT/SIGTERM one line and 128 + the signal (``--debug``: tracebacks)."""
    args = parse_args(argv)
    try:
        args.func(args)
    except Interrupted as stop:
        print(f"difflab: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("difflab: aborted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"difflab: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


def _one_line(err: Exception) -> str:
    if isinstance(err, OSError) and err.strerror and not isinstance(err, RunFolderError):
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())
