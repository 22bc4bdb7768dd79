"""Prompt-to-prompt on the shapes text model: colour and shape word swaps, judged by the attribute classifier.

For each swap ("a red circle" -> "a blue circle", ...) ``--n`` source images are generated from
seeds 0 .. n-1 and edited (``pipe.edit``: cross-attention injected for ``--cross-steps`` of the
steps, self-attention for ``--self-steps``), with and without a local blend on the object's
word. The baseline regenerates with the target prompt and the same seed. Measures, against the
source image:

* changed: the independent attribute classifier's most probable value of the swapped attribute
  is the target's;
* kept: the other attribute (shape for a colour swap, colour for a shape swap) and the object
  count read the same as in the source image;
* mask IoU: the object mask (pixels more than ``--mask-threshold`` from the background colour in
  any channel, images in [-1, 1]) of the edit against the source's: the mean, and the share of
  edits at IoU >= 0.8. A shape swap cannot keep the mask whole: its ceiling row is the IoU of
  held-out single-object renders against the same objects rendered with the target's shape.

    python benchmarks/prompt2prompt.py [--run runs/shapes-text] [--n 100]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OBJECT_THRESHOLD, object_mask, table, write_results  # noqa: E402

import difflab  # noqa: E402
from difflab.data.shapes import COLOURS, SHAPES, Scene, ShapesWorld, render  # noqa: E402
from difflab.metrics.layout import mask_iou  # noqa: E402
from difflab.metrics.shapes import ShapesEvaluator  # noqa: E402

PROMPT2PROMPT_WORLD = 5  # renders for the shape-swap ceiling
SWAPS = [("a red circle", "a blue circle"), ("a green square", "a yellow square"),
         ("a white triangle", "a red triangle"), ("a red circle", "a red square"),
         ("a blue square", "a blue triangle"), ("a yellow diamond", "a yellow circle")]


def shape_ceiling(source: str, target: str, n: int, size: int, threshold: float) -> dict:
    """Mask IoU of ``n`` single-object renders drawn as ``source`` against the same objects as ``target``."""
    world = ShapesWorld(size, 1, 1, seed=PROMPT2PROMPT_WORLD)
    objects = [dataclasses.replace(world.scene(i).objects[0], shape=source) for i in range(n)]
    as_image = (lambda o: torch.as_tensor(render(Scene((o,)), size)["image"]))
    a = torch.stack([as_image(o) for o in objects])
    b = torch.stack([as_image(dataclasses.replace(o, shape=target)) for o in objects])
    overlap = mask_iou(object_mask(a, threshold), object_mask(b, threshold))
    return {"mask IoU": round(float(overlap.mean()), 3), "IoU>=0.8": round(float((overlap >= 0.8).float().mean()), 3)}


def readings(evaluator, x):
    z = evaluator.logits(x)
    return z["colour"].argmax(1), z["shape"].argmax(1), z["count"].argmax(1)


def measure(evaluator, sources, edits, swap, threshold) -> dict:
    (source, target) = swap
    (sc, ss, sn), (ec, es, en) = readings(evaluator, sources), readings(evaluator, edits)
    colour_swap = source.split()[-1] == target.split()[-1]
    wanted = target.split()[1] if colour_swap else target.split()[2]
    changed = (ec == COLOURS.index(wanted)) if colour_swap else (es == SHAPES.index(wanted))
    kept = ((es == ss) if colour_swap else (ec == sc)) & (en == sn)
    overlap = mask_iou(object_mask(sources, threshold), object_mask(edits, threshold))
    mean = (lambda t: round(float(t.float().mean()), 3))
    return {"changed": mean(changed), "kept": mean(kept), "mask IoU": mean(overlap),
            "IoU>=0.8": mean(overlap >= 0.8)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/shapes-text")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=None, help="default: the run's eval.guidance")
    p.add_argument("--cross-steps", type=float, default=0.8)
    p.add_argument("--self-steps", type=float, default=0.4)
    p.add_argument("--blend-threshold", type=float, default=0.3)
    p.add_argument("--mask-threshold", type=float, default=OBJECT_THRESHOLD)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="results name (default: prompt2prompt)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = difflab.load(args.run, device="cpu")
    evaluator = ShapesEvaluator(pipe.cfg.data.image_size)
    kw = dict(sampler=args.sampler, steps=args.steps, seed=0, progress=False, batch_size=100,
              **({} if args.guidance is None else {"guidance": args.guidance}))
    edit = dict(cross_steps=args.cross_steps, self_steps=args.self_steps)
    rows = []
    for swap in SWAPS:
        shape_word = swap[1].split()[-1]
        methods = {"baseline: same seed": None, "prompt-to-prompt": {},
                   "p2p + local blend": {"blend": (swap[0].split()[-1], shape_word),
                                         "blend_threshold": args.blend_threshold}}
        sources = pipe(swap[0], n=args.n, **kw)
        for method, extra in methods.items():
            t0 = time.time()
            if extra is None:
                edits = pipe(swap[1], n=args.n, **kw)
            else:
                again, edits = pipe.edit(*swap, n=args.n, **edit, **extra, **kw)
                assert torch.allclose(again, sources, atol=1e-3), "the sources are not the plain samples"
            rows.append({"swap": f"{swap[0]} -> {swap[1]}", "method": method,
                         **measure(evaluator, sources, edits, swap, args.mask_threshold),
                         "seconds": round(time.time() - t0, 1)})
            print(rows[-1], flush=True)
        if swap[0].split()[-1] != swap[1].split()[-1]:
            rows.append({"swap": f"{swap[0]} -> {swap[1]}", "method": "ceiling: the renderer's own shape swap",
                         **shape_ceiling(swap[0].split()[-1], swap[1].split()[-1], args.n, pipe.cfg.data.image_size,
                                         args.mask_threshold)})
    columns = ["swap", "method", "changed", "kept", "mask IoU", "IoU>=0.8", "seconds"]
    summary = []
    for method in dict.fromkeys(r["method"] for r in rows if not r["method"].startswith("ceiling")):
        mine = [r for r in rows if r["method"] == method]
        summary.append({"swap": "all six (mean)", "method": method,
                        **{k: round(sum(r[k] for r in mine) / len(mine), 3) for k in columns[2:]}})
    print(table(rows + summary, columns))
    print(f"wrote {write_results(__file__, {'settings': vars(args), 'rows': rows, 'summary': summary}, args.out)}")


if __name__ == "__main__":
    main()
