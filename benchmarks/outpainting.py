"""Outpainting: a held-out image extended to twice its width and to a 4-window panorama.

With the digits model (8x8 digits -> 8x16 and 8x32, the digit's own label) or the shapes text
model (16x16 renders -> 16x32 and 16x64, the render's own caption), at guidance ``--guidance``,
DDIM 50 steps, ``fused`` (MultiDiffusion windows, stride a half window) and ``iterative``
(window after window; stride a whole window for the panorama's 4 windows, half a window for the
double width) are compared on:

* seam score: the mean absolute horizontal step across each seam between the real image and
  the generated region (and between generated windows), over the same mean step inside real
  images (1.0 = as smooth as real images);
* validity of each generated window-sized tile: digits: the independent digits classifier reads
  a digit with probability >= 0.9 (and the requested label); shapes: the independent attribute
  classifier sees some colour-shape object with presence probability >= 0.5 (the same rate of
  real renders is printed as the ceiling).

    python benchmarks/outpainting.py [--run runs/digits] [--n 200]
    python benchmarks/outpainting.py --run runs/shapes-text --out outpainting_shapes
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
from difflab.metrics.digits import DigitsEvaluator  # noqa: E402
from difflab.metrics.shapes import ShapesEvaluator  # noqa: E402


def step(x: torch.Tensor, column: int) -> float:
    return float((x[..., column] - x[..., column - 1]).abs().mean())


def digits(pipe, n: int):
    """(images, conditioning keywords, tile -> (valid, requested) bools)."""
    evaluator = DigitsEvaluator(pipe.cfg.data.holdout)
    real = load_digits("heldout", pipe.cfg.data.holdout)
    x, labels = real.images[:n], real.labels[:n]

    @torch.no_grad()
    def judge(tiles, repeats):
        probs = torch.cat([evaluator.classifier(b).softmax(1) for b in tiles.split(1000)])
        return probs.max(1).values >= 0.9, probs.argmax(1) == labels.repeat(repeats)
    return x, {"labels": labels.tolist()}, judge


def shapes(pipe, n: int):
    d = pipe.cfg.data
    evaluator = ShapesEvaluator(d.image_size)
    data = ShapesWorld(d.image_size, d.min_objects, d.max_objects, d.world_seed).load(n, start=d.scenes)

    def judge(tiles, repeats):
        valid = evaluator.presence(tiles)["pair"].flatten(1).amax(1) >= 0.5
        return valid, None
    return data.images, {"prompt": list(data.captions)}, judge


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/digits")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="results name (default: outpainting)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = difflab.load(args.run, device="cpu")
    x, condition, judge = (shapes if pipe.cfg.data.dataset == "shapes" else digits)(pipe, args.n)
    side = x.shape[-1]
    inside = sum(step(x, j) for j in range(1, side)) / (side - 1)
    rows = []
    for width, strides in ((2 * side, {"fused": side // 2, "iterative": side // 2}),
                           (4 * side, {"fused": side // 2, "iterative": side})):
        for method, stride in strides.items():
            t0 = time.time()
            out = pipe.outpaint(x, size=(side, width), method=method, stride=stride, **condition,
                                guidance=args.guidance, sampler="ddim", steps=50, seed=0, progress=False)
            assert torch.equal(out[..., :side], x), "known pixels changed"
            tiles = torch.cat([out[..., j:j + side] for j in range(side, width, side)])
            valid, requested = judge(tiles, width // side - 1)
            seams = [step(out, j) for j in range(side, width, side)]
            rows.append({"canvas": f"{side}x{width}", "method": method, "stride": stride,
                         "seam score": round(sum(seams) / len(seams) / inside, 3),
                         "valid": round(float(valid.float().mean()), 3),
                         "requested label": "-" if requested is None else round(float(requested.float().mean()), 3),
                         "seconds": round(time.time() - t0, 1)})
            print(rows[-1], flush=True)
    print(table(rows, ["canvas", "method", "stride", "seam score", "valid", "requested label", "seconds"]))
    real_valid = float(judge(x, 1)[0].float().mean())
    print(f"real held-out images: mean step inside {inside:.3f}; valid rate {real_valid:.3f}")
    path = write_results(__file__, {"settings": vars(args), "rows": rows, "inside_step": inside,
                                    "real_valid_rate": real_valid}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
