"""LoRA personalisation (Hu et al. 2022, through peft): teach a frozen shapes model a shape it never saw.

The renderer gains a five-pointed star that no training scene holds, and no caption the base read
says "star". ``--images`` renders of a red star (one object, random size and place) are written
to a folder and the base is fine-tuned on them with one caption by ``difflab finetune --lora``
(its defaults, timed). Then, from the LoRA run and from the base:
  * the share of ``--n`` samples of the new prompt (and of the same shape in another colour) that
    a 5-way shape classifier, trained here on real renders that include stars, calls a star; the
    classifier's own accuracy on held-out real renders is given beside it;
  * single-object alignment on the 28 old prompts (the attribute classifier of the evaluation):
    the LoRA must not cost the old prompts more than 3 points;
  * the LoRA file's size against the base's weights.

    python benchmarks/lora.py [--base runs/shapes-latent] [--images 10] [--out NAME]
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results  # noqa: E402

import difflab  # noqa: E402
from difflab import runs  # noqa: E402
from difflab.adapters.training import FINETUNE_DEFAULTS, LORA_FILE, train_adapter  # noqa: E402
from difflab.config import load_config  # noqa: E402
from difflab.data.shapes import (ALL_SHAPES, RENDERER_VERSION, Scene, ShapesWorld, render,  # noqa: E402
                                 single_object_prompts)
from difflab.metrics.shapes import ShapesEvaluator, cache_dir  # noqa: E402
from difflab.schedules import build as build_schedule  # noqa: E402
from difflab.train.classifier import load_classifier, noisy_accuracy, save_classifier, train_noisy_classifier  # noqa: E402

STAR_WORLD, CLASSIFIER_WORLD, CHECK_WORLD = 50_000, 60_000, 70_000
SIGMA_READ = 0.002  # the noise level the noise-aware shape classifier reads samples at


def star_images(n: int, size: int, colour: str) -> torch.Tensor:
    """``n`` renders of one star of ``colour`` (size and place as the world draws them)."""
    world = ShapesWorld(size, 1, 1, seed=STAR_WORLD, shapes=("star",))
    objects = [dataclasses.replace(world.scene(i).objects[0], colour=colour) for i in range(n)]
    return torch.stack([torch.as_tensor(render(Scene((o,)), size)["image"]) for o in objects])


def write_folder(images: torch.Tensor, folder: Path) -> None:
    for i, x in enumerate(images):
        pixels = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"star_{i:02d}.png")


def shape_classifier(size: int, steps: int):
    """A noise-aware 5-way shape classifier on single-object renders of every shape, star included
    (cached beside the attribute classifier's weights, keyed by size, steps and renderer version)."""
    path = cache_dir() / f"star_classifier_{size}_{steps}_r{RENDERER_VERSION}.safetensors"
    if path.exists():
        clf = load_classifier(path)
    else:
        data = ShapesWorld(size, 1, 1, seed=CLASSIFIER_WORLD, shapes=ALL_SHAPES).load(6000)
        clf = train_noisy_classifier(data.images, data.shapes[:, 0], len(ALL_SHAPES), build_schedule("edm"),
                                     steps=steps, progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_classifier(clf, path)
    check = ShapesWorld(size, 1, 1, seed=CHECK_WORLD, shapes=ALL_SHAPES).load(1000)
    acc = noisy_accuracy(clf, check.images, check.shapes[:, 0], SIGMA_READ)
    stars = check.shapes[:, 0] == ALL_SHAPES.index("star")
    star_recall = noisy_accuracy(clf, check.images[stars], check.shapes[stars, 0], SIGMA_READ)
    return clf, {"accuracy": acc, "star_recall": star_recall}


@torch.no_grad()
def star_rate(clf, images: torch.Tensor) -> float:
    logits = clf(images, torch.full((len(images),), SIGMA_READ))
    return float((logits.argmax(1) == ALL_SHAPES.index("star")).float().mean())


def finetune(base: str, folder: Path, caption: str, out: str, overrides: list[str]) -> tuple[Path, float]:
    cfg = load_config(None, FINETUNE_DEFAULTS + [f"out={out}", *overrides])
    cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, kind="lora", base=base,
                                                                images=str(folder), caption=caption))
    start = time.time()
    run = train_adapter(cfg, progress=False)
    return run, time.time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="runs/shapes-latent")
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--colour", default="red")
    p.add_argument("--other-colour", default="blue")
    p.add_argument("--n", type=int, default=100, help="samples per star prompt")
    p.add_argument("--old-n", type=int, default=280, help="samples over the 28 old single-object prompts")
    p.add_argument("--classifier-steps", type=int, default=1500)
    p.add_argument("--lora-out", default=None, help="the LoRA run folder (default: BASE-lora-star, replaced)")
    p.add_argument("--override", action="append", default=[], help="key=value for the fine-tune")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    size = runs.read_config(args.base).data.image_size
    caption = f"a {args.colour} star"
    lora_out = Path(args.lora_out or f"{args.base.rstrip('/')}-lora-star")
    if lora_out.exists():
        shutil.rmtree(lora_out)
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(star_images(args.images, size, args.colour), Path(tmp))
        run, seconds = finetune(args.base, Path(tmp), caption, str(lora_out), args.override)
    clf, clf_scores = shape_classifier(size, args.classifier_steps)
    base, tuned = difflab.load(args.base), difflab.load(run)
    rows = []
    prompts, colours, shapes = single_object_prompts(args.old_n)
    evaluator = ShapesEvaluator(image_size=size)
    for name, pipe in (("base", base), ("base + LoRA", tuned)):
        row = {"model": name}
        for prompt, key in ((caption, "new prompt star rate"), (f"a {args.other_colour} star", "other colour star rate")):
            row[key] = round(star_rate(clf, pipe(prompt, n=args.n, seed=0, progress=False)), 3)
        old = evaluator.alignment(pipe(prompts, n=args.old_n, seed=0, progress=False), colours, shapes)
        row.update({"old prompts both": round(old["both_accuracy"], 3), "old colour": round(old["colour_accuracy"], 3),
                    "old shape": round(old["shape_accuracy"], 3)})
        rows.append(row)
    lora_bytes, base_bytes = (run / LORA_FILE).stat().st_size, runs.weights_path(args.base).stat().st_size
    columns = ["model", "new prompt star rate", "other colour star rate", "old prompts both", "old colour", "old shape"]
    print(f"{args.base}: LoRA on {args.images} renders of {caption!r}, fine-tuned in {seconds:.0f} s")
    print(table(rows, columns))
    print(f"shape classifier on real renders: accuracy {clf_scores['accuracy']:.3f}, star recall "
          f"{clf_scores['star_recall']:.3f}; LoRA file {lora_bytes / 1024:.0f} KiB = "
          f"{100 * lora_bytes / base_bytes:.2f}% of the base's {base_bytes / 1024:.0f} KiB")
    path = write_results(__file__, {"base": args.base, "caption": caption, "images": args.images,
                                    "finetune_seconds": seconds, "classifier": clf_scores, "rows": rows,
                                    "lora_bytes": lora_bytes, "base_bytes": base_bytes,
                                    "finetune_overrides": FINETUNE_DEFAULTS + args.override},
                         args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
