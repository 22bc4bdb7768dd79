"""Deterministic inversion and reconstruction: PSNR of real images sent to noise and back.

``--n`` held-out real digits with their labels are inverted up the sampler's grid
(``difflab.editing.invert``, DDIM and DPM-Solver++(2M)) with the same condition and guidance,
then sampled back down with the same sampler; PSNR (images in [-1, 1], peak-to-peak 2) against
the originals at 10, 25, 50 and 100 steps, at guidance 1 (the conditional model) and 3.

    python benchmarks/inversion.py [--run runs/digits] [--n 200]
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
from difflab.metrics.reconstruction import psnr  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/digits")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", default="10,25,50,100")
    p.add_argument("--guidance", default="1,3")
    p.add_argument("--solvers", default="ddim,dpmpp_2m")
    args = p.parse_args()
    pipe = difflab.load(args.run, device="cpu")
    real = load_digits("heldout", pipe.cfg.data.holdout)
    x, labels = real.images[:args.n], real.labels[:args.n].tolist()
    rows = []
    for guidance in map(float, args.guidance.split(",")):
        for solver in args.solvers.split(","):
            for steps in map(int, args.steps.split(",")):
                t0 = time.time()
                kw = dict(labels=labels, guidance=guidance, steps=steps, sampler=solver, progress=False)
                back = pipe.reconstruct(pipe.invert(x, **kw), **kw)
                rows.append({"guidance": guidance, "solver": solver, "steps": steps,
                             "psnr_db": round(psnr(back, x).mean().item(), 2), "seconds": round(time.time() - t0, 1)})
                print(rows[-1], flush=True)
    print(table(rows, ["guidance", "solver", "steps", "psnr_db", "seconds"]))
    print(f"wrote {write_results(__file__, {'settings': vars(args), 'n': len(x), 'rows': rows})}")


if __name__ == "__main__":
    main()
