"""Outpainting on digits: an 8x8 held-out digit extended to 8x16 and to an 8x32 panorama.

With the class-conditional digits model (the digit's own label, guidance ``--guidance``, DDIM 50),
``fused`` (MultiDiffusion windows, stride 4) and ``iterative`` (window after window, stride 8 for
the panorama's 4 windows, 4 for the 8x16 canvas) are compared on:

* seam score: the mean absolute horizontal step across each seam between the real digit and the
  generated region (and between generated windows), over the same mean step inside real digits
  (1.0 = as smooth as real images);
* validity: the share of generated 8x8 tiles that the independent digits classifier reads as a
  digit with probability >= 0.9, and the share it reads as the requested label.

    python benchmarks/outpainting.py [--run runs/digits] [--n 200]
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
from difflab.metrics.digits import DigitsEvaluator  # noqa: E402


def step(x: torch.Tensor, column: int) -> float:
    return float((x[..., column] - x[..., column - 1]).abs().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/digits")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--guidance", type=float, default=3.0)
    args = p.parse_args()
    pipe = difflab.load(args.run, device="cpu")
    evaluator = DigitsEvaluator(pipe.cfg.data.holdout)
    real = load_digits("heldout", pipe.cfg.data.holdout)
    x, labels = real.images[:args.n], real.labels[:args.n]
    inside = sum(step(x, j) for j in range(1, 8)) / 7
    rows = []
    for width, strides in ((16, {"fused": 4, "iterative": 4}), (32, {"fused": 4, "iterative": 8})):
        for method, stride in strides.items():
            t0 = time.time()
            out = pipe.outpaint(x, size=(8, width), method=method, stride=stride, labels=labels.tolist(),
                                guidance=args.guidance, sampler="ddim", steps=50, seed=0, progress=False)
            assert torch.equal(out[..., :8], x), "known pixels changed"
            tiles = torch.cat([out[..., j:j + 8] for j in range(8, width, 8)])
            with torch.no_grad():
                probs = torch.cat([evaluator.classifier(b).softmax(1) for b in tiles.split(1000)])
            seams = [step(out, j) for j in range(8, width, 8)]
            rows.append({"canvas": f"8x{width}", "method": method, "stride": stride,
                         "seam score": round(sum(seams) / len(seams) / inside, 3),
                         "valid digit": round(float((probs.max(1).values >= 0.9).float().mean()), 3),
                         "requested label": round(float((probs.argmax(1) == labels.repeat(len(seams))).float().mean()), 3),
                         "seconds": round(time.time() - t0, 1)})
            print(rows[-1], flush=True)
    print(table(rows, ["canvas", "method", "stride", "seam score", "valid digit", "requested label", "seconds"]))
    real_valid = float((torch.cat([evaluator.classifier(b).softmax(1) for b in x.split(1000)]).max(1).values >= 0.9)
                       .float().mean())
    print(f"real held-out digits: mean step inside {inside:.3f}; valid digit rate {real_valid:.3f}")
    path = write_results(__file__, {"settings": vars(args), "rows": rows, "inside_step": inside,
                                    "real_valid_rate": real_valid})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
