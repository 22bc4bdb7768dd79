"""IP-Adapter (Ye et al. 2023) on the shapes world: does the sample show what the image prompt shows?

References are ``--n`` held-out single-object renders (indices from 10,000,000 on). The attribute
classifier of the evaluation (trained on real renders only) reads the colour and shape of each
sample:
  * image prompt and an empty text prompt: agreement with the reference's colour and shape, beside
    the base model's samples for the empty prompt (chance: 1/7 colour, 1/4 shape);
  * a text prompt naming another colour ("a {colour}", the colour after the reference's in the
    vocabulary) with the image prompt: how often the sample has the text's colour and the image's
    shape, over ``--scales`` of ``ip_scale`` and ``--guidances``, and with the image guided apart from the text
    (``image_guidance``, InstructPix2Pix's two scales) over ``--image-guidance``.
Also the trainable parameters as a fraction of the base's.

    difflab train-image-encoder runs/shapes-clip
    difflab train configs/shapes-latent-ip-adapter.yaml
    python benchmarks/ip_adapter.py [--run runs/shapes-latent-ip-adapter] [--n 280] [--out NAME]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results  # noqa: E402

import difflab  # noqa: E402
from difflab.adapters.image_encoder import CONFIG  # noqa: E402
from difflab.data import SHAPES_HELDOUT_START  # noqa: E402
from difflab.data.shapes import COLOURS, SHAPES, ShapesWorld  # noqa: E402
from difflab.metrics.shapes import ShapesEvaluator  # noqa: E402

COLUMNS = ["images", "text", "guidance", "ip scale", "image guidance", "colour = image", "shape = image", "colour = text",
           "text colour + image shape", "seconds"]


def read(evaluator: ShapesEvaluator, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = evaluator.logits(images)
    return z["colour"].argmax(1), z["shape"].argmax(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/shapes-latent-ip-adapter")
    p.add_argument("--n", type=int, default=280)
    p.add_argument("--scales", default="0.3,0.5,0.7,1.0", help="ip_scale values for text + image")
    p.add_argument("--guidances", default="4,2,1.5", help="guidance scales of the text + image rows")
    p.add_argument("--image-guidance", default="1,3",
                   help="image guidance scales for text + image at ip_scale 1 and text guidance 2")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    pipe = difflab.load(args.run)
    size = pipe.cfg.data.image_size
    refs = ShapesWorld(size, 1, 1, pipe.cfg.data.world_seed).load(args.n, start=SHAPES_HELDOUT_START)
    colour, shape = refs.colours[:, 0], refs.shapes[:, 0]
    other = (colour + 1) % len(COLOURS)
    texts = [f"a {COLOURS[c]}" for c in other]
    evaluator = ShapesEvaluator(image_size=size)
    rows = []

    def row(name, text, scale, prompt, **kw):
        start = time.time()
        c, s = read(evaluator, pipe(prompt, n=args.n, seed=0, progress=False, **kw))
        rows.append({"images": name, "text": text, "ip scale": scale, "guidance": kw.get("guidance", pipe.settings().guidance),
                     "image guidance": kw.get("image_guidance", ""),
                     "seconds": round(time.time() - start, 1),
                     "colour = image": round(float((c == colour).float().mean()), 3),
                     "shape = image": round(float((s == shape).float().mean()), 3),
                     "colour = text": round(float((c == other).float().mean()), 3),
                     "text colour + image shape": round(float(((c == other) & (s == shape)).float().mean()), 3)})

    row("base", "empty", "", "")
    row("base", "a {colour}", "", texts)
    row("IP-Adapter", "empty", 1.0, "", image_prompt=refs.images)
    for guidance in [float(g) for g in args.guidances.split(",")]:
        for scale in [float(s) for s in args.scales.split(",")]:
            row("IP-Adapter", "a {colour}", scale, texts, image_prompt=refs.images, ip_scale=scale, guidance=guidance)
    for image_guidance in [float(s) for s in args.image_guidance.split(",")]:
        row("IP-Adapter", "a {colour}", 1.0, texts, image_prompt=refs.images, guidance=2.0,
            image_guidance=image_guidance)
    trainable = sum(p.numel() for p in pipe.ip_adapter.parameters())
    base = sum(p.numel() for p in pipe.denoiser.net.parameters())
    retrieval = json.loads((Path(pipe.cfg.adapter.image_encoder) / CONFIG).read_text())["zero_shot_top1"]
    print(f"{args.run}: {args.n} held-out single-object references; image encoder zero-shot top-1 {retrieval:.3f}")
    print(table(rows, COLUMNS))
    print(f"trainable parameters: {trainable:,} = {100 * trainable / base:.1f}% of the base U-Net's {base:,}")
    path = write_results(__file__, {"run": args.run, "n": args.n, "rows": rows, "trainable": trainable,
                                    "base_parameters": base, "image_encoder_top1": retrieval}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
