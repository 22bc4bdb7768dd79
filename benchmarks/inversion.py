"""Deterministic and null-text inversion: PSNR of held-out real images sent to noise and back.

``--n`` held-out real images with their condition (a digit's label, or a shapes render's own
caption for a text model; held-out renders are the world's scenes after the training ones) are
inverted up the sampler's grid (``pipe.invert``: DDIM and DPM-Solver++(2M)) with the same
condition and guidance, then sampled back down with the same sampler; PSNR (images in [-1, 1],
peak-to-peak 2) against the originals at 10, 25, 50 and 100 steps, at guidance 1 and 3. For a
text model at guidance > 1 null-text inversion (``pipe.invert_null_text``, Mokady et al. 2023:
10 Adam steps per grid step at most) is measured beside plain inversion at the same guidance, at
``--null-text-steps``. For a latent model the VAE's own reconstruction PSNR is the ceiling.

    python benchmarks/inversion.py [--run runs/digits] [--n 200]
    python benchmarks/inversion.py --run runs/shapes-text --out inversion_shapes
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
from difflab.data import load_digits  # noqa: E402
from difflab.data.shapes import ShapesWorld  # noqa: E402
from difflab.metrics.reconstruction import psnr  # noqa: E402


def held_out(pipe, n: int) -> tuple[torch.Tensor, dict]:
    """(images, the keywords that condition on them)."""
    d = pipe.cfg.data
    if d.dataset == "shapes":
        data = ShapesWorld(d.image_size, d.min_objects, d.max_objects, d.world_seed).load(n, start=d.scenes)
        return data.images, {"prompt": list(data.captions)}
    real = load_digits("heldout", d.holdout)
    return real.images[:n], {"labels": real.labels[:n].tolist()}


def mean_psnr(a, b) -> float:
    return round(psnr(a, b).mean().item(), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/digits")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", default="10,25,50,100")
    p.add_argument("--guidance", default="1,3")
    p.add_argument("--solvers", default="ddim,dpmpp_2m")
    p.add_argument("--null-text-steps", default="10,25,50", help="steps for null-text inversion (text models)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="results name (default: inversion)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = difflab.load(args.run, device="cpu")
    x, condition = held_out(pipe, args.n)
    rows = []
    for guidance in map(float, args.guidance.split(",")):
        for solver in args.solvers.split(","):
            for steps in map(int, args.steps.split(",")):
                t0 = time.time()
                kw = dict(**condition, guidance=guidance, steps=steps, sampler=solver, progress=False)
                back = pipe.reconstruct(pipe.invert(x, **kw), **kw)
                rows.append({"guidance": guidance, "solver": solver, "steps": steps, "method": "DDIM inversion",
                             "psnr_db": mean_psnr(back, x), "seconds": round(time.time() - t0, 1)})
                print(rows[-1], flush=True)
                if not (pipe.is_text and guidance > 1 and str(steps) in args.null_text_steps.split(",")):
                    continue
                t0 = time.time()
                noise, nulls = pipe.invert_null_text(x, **kw)
                back = pipe.reconstruct(noise, nulls=nulls, **kw)
                rows.append({"guidance": guidance, "solver": solver, "steps": steps, "method": "null-text inversion",
                             "psnr_db": mean_psnr(back, x), "seconds": round(time.time() - t0, 1)})
                print(rows[-1], flush=True)
    ceiling = None
    if pipe.vae is not None:
        ceiling = mean_psnr(pipe.decode(pipe.encode(x)).clamp(-1, 1), x)
        rows.append({"method": "ceiling: VAE reconstruction", "psnr_db": ceiling})
    print(table(rows, ["guidance", "solver", "steps", "method", "psnr_db", "seconds"]))
    payload = {"settings": vars(args), "n": len(x), "rows": rows, "vae_ceiling_db": ceiling}
    print(f"wrote {write_results(__file__, payload, args.out)}")


if __name__ == "__main__":
    main()
