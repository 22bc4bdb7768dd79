"""ControlNet (Zhang et al. 2023) on the shapes world: do samples follow the hint?

For ``--n`` held-out scenes (indices from 10,000,000 on: never trained on) the ControlNet run
samples each scene's caption under its hint, and the base model samples the same caption and seed
without one. Edge runs: the Canny edges of each sample (``difflab.adapters.edge_map``: sigma 0.5,
hysteresis 0.1 / 0.2 on the [0, 1] gradient magnitude, any colour channel) against the renderer's
edge map, F1 with a 1-pixel tolerance (``metrics.layout.edge_f1``). Depth runs: the foreground
mask of each sample (pixels more than 0.25 from the background colour) against the hint's object
silhouettes (depth > 0), IoU (``metrics.layout.mask_iou``). Both scores are given for the real
renders of the same scenes (the detector's ceiling) and of other held-out scenes (what unrelated
layouts score: chance for this world, where objects are large and captions place them).

    difflab train configs/shapes-latent-control-edges.yaml
    python benchmarks/controlnet.py --run runs/shapes-latent-control-edges [--n 500] [--out NAME]
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
from difflab import runs  # noqa: E402
from difflab.adapters import edge_map, hints  # noqa: E402
from difflab.data import load_shapes_scenes  # noqa: E402
from difflab.metrics.layout import edge_f1, mask_iou  # noqa: E402

COLUMNS = ["images", "control scale", "edge F1", "precision", "recall", "mask IoU", "seconds"]


def scores(images: torch.Tensor, scenes) -> dict:
    f1 = edge_f1(edge_map(images), scenes.edges)
    iou = mask_iou(object_mask(images), scenes.depth > 0)
    return {"edge F1": f1["f1"].mean().item(), "precision": f1["precision"].mean().item(),
            "recall": f1["recall"].mean().item(), "mask IoU": iou.mean().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a ControlNet run (adapter.kind=controlnet)")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", type=int, default=None, help="default: the run's eval.steps")
    p.add_argument("--guidance", type=float, default=None, help="default: the run's eval.guidance")
    p.add_argument("--scales", default="1.0", help="comma-separated control scales")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", default=None, help="results file name (default: controlnet_<run name>)")
    args = p.parse_args()
    torch.manual_seed(0)
    pipe = difflab.load(args.run)
    kind = runs.read_config(args.run).adapter.control
    scenes = load_shapes_scenes(pipe.cfg.data, "heldout", args.n, maps=True)
    hint = hints(scenes, kind)
    common = dict(n=args.n, steps=args.steps, guidance=args.guidance, seed=0, batch_size=args.batch_size,
                  progress=False)
    rows = [{"images": "real renders", **scores(scenes.images, scenes)},
            {"images": "real renders, other scenes", **scores(scenes.images.roll(1, 0), scenes)}]
    start = time.time()
    base = pipe(scenes.captions, **common)
    rows.append({"images": "base, no control", "seconds": round(time.time() - start, 1), **scores(base, scenes)})
    for scale in [float(s) for s in args.scales.split(",")]:
        start = time.time()
        x = pipe(scenes.captions, control=hint, control_scale=scale, **common)
        rows.append({"images": f"controlnet ({kind})", "control scale": scale,
                     "seconds": round(time.time() - start, 1), **scores(x, scenes)})
    for r in rows:
        r.update({k: round(v, 3) for k, v in r.items() if isinstance(v, float) and k != "seconds"})
    print(f"{args.run}: {kind} control, {args.n} held-out scenes, {pipe.settings(steps=args.steps).sampler}")
    print(table(rows, COLUMNS))
    path = write_results(__file__, {"run": str(args.run), "control": kind, "n": args.n, "rows": rows},
                         args.out or f"controlnet_{Path(args.run).name}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
