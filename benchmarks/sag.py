"""Self-attention guidance (Hong et al. 2023): a scale sweep on digits and shapes, with the mask it builds.

For each scale (and each blur sigma in ``--blur-sigmas``), ``--n`` samples (DDIM, 50 steps,
seed 0) from an unconditional digits model (``data.conditional=false``), from the
class-conditional digits model at classifier-free guidance ``--guidance`` and from the shapes
text model (single-object prompts cycling over every colour-shape pair, at its ``eval.guidance``)
are scored by the independent classifiers: the Fréchet distance of their features against
held-out real images (for shapes, single-object renders, as the prompts ask), and the class
accuracy (digits) or colour-and-shape alignment (shapes).

Why the mask does (not) help, per row: ``coverage`` is the mean share of the image the SAG mask
covers (the middle block's self-attention, thresholded at the uniform share), over all steps;
``on ink`` is the share of the masked pixels that lie on the final sample's foreground (digits:
pixel > 0; shapes: away from the background colour), beside ``ink`` -- the foreground's share of
the image: a mask that tracks salient detail has ``on ink`` well above ``ink``.

    difflab train data.conditional=false out=runs/digits-uncond --no-eval
    python benchmarks/sag.py [--uncond-run runs/digits-uncond] [--run runs/digits] [--shapes-run runs/shapes-text]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import object_mask, table, write_results  # noqa: E402

import difflab  # noqa: E402
from difflab.data.shapes import single_object_prompts  # noqa: E402
from difflab.generate import SamplingSettings, generate  # noqa: E402
from difflab.guidance import SelfAttentionGuidance  # noqa: E402
from difflab.metrics.digits import DigitsEvaluator  # noqa: E402
from difflab.metrics.shapes import ShapesEvaluator  # noqa: E402

COLUMNS = ["model", "sag scale", "blur sigma", "frechet", "alignment", "coverage", "on ink", "ink", "seconds"]


class MaskRecorder:
    """Wraps a SAG's ``mask`` to sum the masks of every step, per sample."""

    def __init__(self, sag: SelfAttentionGuidance):
        self.total, self.mask = None, sag.mask
        sag.mask = self

    def __call__(self, probs, shape):
        mask = self.mask(probs, shape)  # under CFG in one batch: the conditional rows first
        self.total = mask if self.total is None else self.total + mask
        return mask


def foreground(x: torch.Tensor, shapes_world: bool) -> torch.Tensor:
    if not shapes_world:
        return x[:, :1] > 0
    return object_mask(x)[:, None]


def conditions(pipe, n, guidance):
    """(cond, null, guidance, scorer(images) -> (frechet, alignment))."""
    if pipe.is_text:
        evaluator = ShapesEvaluator(pipe.cfg.data.image_size, min_objects=1, max_objects=1)  # as the prompts
        prompts, colours, shapes = single_object_prompts(n)
        cond, null = pipe.conds(n, prompt=prompts)
        return cond, null, pipe.cfg.eval.guidance, lambda x: (
            evaluator.frechet(x), evaluator.alignment(x, colours, shapes)["both_accuracy"])
    evaluator = DigitsEvaluator()
    labels = torch.arange(n) % 10
    conditional = pipe.num_classes is not None
    cond, null = pipe.conds(n, labels if conditional else None)
    return cond, null, guidance if conditional else None, lambda x: (
        evaluator.frechet(x), evaluator.accuracy(x, labels) if conditional else "-")


def sweep(pipe, scales, blurs, n, guidance, label) -> list[dict]:
    rows = []
    cond, null, guidance, score = conditions(pipe, n, guidance)
    for blur in blurs:
        for scale in scales:
            if scale == 0 and blur != blurs[0]:
                continue  # scale 0 is the plain sampler whatever the blur
            t0 = time.time()
            sag = SelfAttentionGuidance(pipe.denoiser, scale, blur_sigma=blur)
            recorder = MaskRecorder(sag)
            s = SamplingSettings(sampler="ddim", steps=50, seed=0, guidance=guidance, batch_size=n)
            x = pipe.decode(generate(sag, pipe.latent_shape, n, s, cond=cond, null_cond=null, progress=False)).clamp(-1, 1)
            frechet, alignment = score(x)
            ink = foreground(x, pipe.is_text).float()
            masked = None if recorder.total is None else recorder.total[:n]
            on_ink = "-" if masked is None else round(float((masked * ink).sum() / masked.sum().clamp_min(1e-9)), 3)
            rows.append({"model": label, "sag scale": scale, "blur sigma": blur, "frechet": round(frechet, 3),
                         "alignment": alignment if alignment == "-" else round(alignment, 3),
                         "coverage": round(sum(sag.coverage) / len(sag.coverage), 3) if sag.coverage else 0.0,
                         "on ink": on_ink, "ink": round(float(ink.mean()), 3), "seconds": round(time.time() - t0, 1)})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/digits")
    p.add_argument("--uncond-run", default="runs/digits-uncond")
    p.add_argument("--shapes-run", default="runs/shapes-text")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--scales", default="0,0.25,0.5,0.75,1,1.5")
    p.add_argument("--blur-sigmas", default="1,0.5", help="SAG's Gaussian blur sigma (the paper's 1 first)")
    p.add_argument("--guidance", type=float, default=3.0, help="CFG of the class-conditional digits model")
    p.add_argument("--models", default="uncond,cond,shapes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="results name (default: sag)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    scales = [float(v) for v in args.scales.split(",")]
    blurs = [float(v) for v in args.blur_sigmas.split(",")]
    runs = {"uncond": (args.uncond_run, "digits, unconditional"),
            "cond": (args.run, f"digits, class-conditional, CFG {args.guidance:g}"),
            "shapes": (args.shapes_run, "shapes text model, its CFG")}
    rows = []
    for key in args.models.split(","):
        run, label = runs[key]
        rows += sweep(difflab.load(run, device="cpu"), scales, blurs, args.n, args.guidance, label)
    print(table(rows, COLUMNS))
    digits = DigitsEvaluator() if "uncond" in args.models else None
    floor = None if digits is None else digits.frechet(digits.train_data.images)
    print(f"Fréchet floor (real training vs held-out digits): {floor}")
    payload = {"settings": vars(args), "rows": rows, "digits_frechet_floor": floor}
    print(f"wrote {write_results(__file__, payload, args.out)}")


if __name__ == "__main__":
    main()
