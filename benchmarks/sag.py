"""Self-attention guidance (Hong et al. 2023) on digits: a scale sweep, with the mask it builds.

For each scale, ``--n`` samples (DDIM, 50 steps, seed 0) from an unconditional digits model
(``data.conditional=false``) and from the class-conditional default model at classifier-free
guidance ``--guidance`` (SAG beneath CFG, both branches) are scored by the independent digits
classifier: Fréchet distance of its features against held-out digits, and for the conditional
model the class accuracy. ``coverage`` is the mean share of the image the SAG mask covers (the
middle block's self-attention, thresholded at the uniform share), over all steps.

    difflab train data.conditional=false out=runs/digits-uncond --no-eval
    python benchmarks/sag.py [--uncond-run runs/digits-uncond] [--run runs/digits] [--n 1000]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results  # noqa: E402

import difflab  # noqa: E402
from difflab.generate import SamplingSettings, generate  # noqa: E402
from difflab.guidance import SelfAttentionGuidance  # noqa: E402
from difflab.metrics.digits import DigitsEvaluator  # noqa: E402


def sweep(pipe, evaluator, scales, n, guidance, label) -> list[dict]:
    rows = []
    conditional = pipe.num_classes is not None
    labels = torch.arange(n) % 10
    cond, null = pipe.conds(n, labels if conditional else None)
    for scale in scales:
        t0 = time.time()
        sag = SelfAttentionGuidance(pipe.denoiser, scale)
        s = SamplingSettings(sampler="ddim", steps=50, seed=0, guidance=guidance if conditional else None)
        x = generate(sag, pipe.latent_shape, n, s, cond=cond, null_cond=null, progress=False).clamp(-1, 1)
        row = {"model": label, "sag scale": scale, "frechet": round(evaluator.frechet(x), 3),
               "class accuracy": round(evaluator.accuracy(x, labels), 3) if conditional else "-",
               "coverage": round(sum(sag.coverage) / len(sag.coverage), 3) if sag.coverage else 0.0,
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/digits")
    p.add_argument("--uncond-run", default="runs/digits-uncond")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--scales", default="0,0.25,0.5,0.75,1,1.5")
    p.add_argument("--guidance", type=float, default=3.0)
    args = p.parse_args()
    scales = [float(v) for v in args.scales.split(",")]
    evaluator = DigitsEvaluator()
    rows = sweep(difflab.load(args.uncond_run, device="cpu"), evaluator, scales, args.n, None, "unconditional")
    rows += sweep(difflab.load(args.run, device="cpu"), evaluator, scales, args.n, args.guidance,
                  f"class-conditional, CFG {args.guidance:g}")
    print(table(rows, ["model", "sag scale", "frechet", "class accuracy", "coverage", "seconds"]))
    floor = evaluator.frechet(evaluator.train_data.images)
    print(f"Fréchet floor (real training vs held-out digits): {floor:.3f}")
    print(f"wrote {write_results(__file__, {'settings': vars(args), 'rows': rows, 'frechet_floor': floor})}")


if __name__ == "__main__":
    main()
