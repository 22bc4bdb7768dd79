"""Safety guidance on the shapes world: steer a text-to-image model away from a banned concept.

Acceptance (spec Q37): with "red" banned, the rate of generated images that contain a red
object, for prompts that ask for one ("a red circle", ...), falls >= 5x while shape accuracy for
those prompts stays within 10 points of unguided sampling. Two kinds of guidance, no retraining:

(a) classifier: a noise-aware policy classifier (``difflab.nn.classifier``, trained by ``difflab.train.classifier``), trained on renders with
    the model's own noise-level distribution, pushes each step toward p(safe | x_sigma):
    ClassifierGuidance(target = safe) around the classifier-free-guided model. Two policies:
    "2-class" (contains red / not), whose cheapest safe image is an empty one, and "3-class"
    (contains red / safe object / empty background), which asks for a safe *completion*;
(b) concept: Safe Latent Diffusion guidance (``difflab.guidance.SafeGuidance``) with the banned
    concept as text: the bare word "red" (not a caption the model has seen), or the mean
    embedding of "a red circle", "a red square", ... (``TextConditioner.encode_concept``).

Red presence and shape accuracy are judged by the independent attribute classifier of
``difflab.metrics.shapes`` (trained on real renders only).

    python benchmarks/shapes_safety.py --run runs/shapes-text [--n 400] [--threads 2]
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
from difflab.guidance import ClassifierGuidance  # noqa: E402
from difflab.train.classifier import load_classifier, save_classifier, train_noisy_classifier  # noqa: E402
from difflab.data.shapes import BACKGROUND_RGB, COLOURS, SHAPES, ShapesWorld, prompt  # noqa: E402
from difflab.generate import SamplingSettings, generate  # noqa: E402
from difflab.guidance import ClassifierFreeGuidance, SafeGuidance  # noqa: E402
from difflab.metrics.shapes import ShapesEvaluator  # noqa: E402

RED = COLOURS.index("red")
CLASSIFIER_WORLD_SEED = 77  # renders for the safety classifier: a world of their own


def policy_classifier(pipe, path: Path, scenes: int, steps: int, with_empty: bool):
    """A noise-aware policy, trained once and cached: class 0 = safe object(s), 1 = contains red,
    and (``with_empty``) 2 = empty background, one image in nine."""
    if path.exists():
        return load_classifier(path)
    d = pipe.cfg.data
    data = ShapesWorld(d.image_size, d.min_objects, d.max_objects, CLASSIFIER_WORLD_SEED).load(scenes)
    images, labels = data.images, (data.colours == RED).any(1).long()
    if with_empty:
        empty = torch.tensor(BACKGROUND_RGB * 2 - 1).float().reshape(1, 3, 1, 1).expand(scenes // 8, *images.shape[1:])
        images, labels = torch.cat([images, empty]), torch.cat([labels, torch.full((len(empty),), 2)])
    print(f"training a {3 if with_empty else 2}-class policy on {len(images)} renders")
    clf = train_noisy_classifier(images, labels, 3 if with_empty else 2, pipe.denoiser.schedule, steps=steps,
                                 batch_size=128, lr=2e-3, sigma_data=pipe.cfg.diffusion.sigma_data)
    save_classifier(clf, path)
    return clf


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/shapes-text")
    p.add_argument("--n", type=int, default=400, help="samples per setting (prompts cycle over the shapes)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free scale (default: the run's)")
    p.add_argument("--classifier-scales", default="10,20,50")
    p.add_argument("--concept", default="red")
    p.add_argument("--clf-scenes", type=int, default=20000)
    p.add_argument("--clf-steps", type=int, default=1500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()

    pipe = difflab.load(args.run)
    cfg = pipe.cfg
    g = cfg.eval.guidance if args.guidance is None else args.guidance
    evaluator = ShapesEvaluator(cfg.data.image_size, min_objects=1, max_objects=1)
    shapes = [SHAPES[i % len(SHAPES)] for i in range(args.n)]
    prompts = [prompt("red", s) for s in shapes]
    cond, null = pipe.conds(args.n, prompt=prompts)
    concepts = {repr(args.concept): pipe.conditioner.encode([args.concept]),
                "mean of 'a red <shape>'": pipe.conditioner.encode_concept([prompt("red", s) for s in SHAPES])}
    policies = {k: policy_classifier(pipe, Path(args.run) / f"safety-{k}.safetensors", args.clf_scenes, args.clf_steps,
                                     with_empty=k == "3-class") for k in ("2-class", "3-class")}

    settings = [("unguided (CFG only)", None)]
    for policy, clf in policies.items():
        for s in (float(v) for v in args.classifier_scales.split(",") if v):
            settings.append((f"(a) {policy} policy, scale {s:g}", lambda d, s=s, clf=clf: ClassifierGuidance(
                ClassifierFreeGuidance(d, g, null), clf, s, target=0)))
    sld = {"medium": dict(safety_scale=1000, threshold=0.01, warmup=10, momentum=0.3, beta=0.4),
           "max": dict(safety_scale=5000, threshold=1.0, warmup=0, momentum=0.5, beta=0.7)}
    for concept_name, concept in concepts.items():
        for name, kw in sld.items():
            kw = {**kw, "warmup": round(kw["warmup"] * cfg.eval.steps / 50)}  # the paper's warm-up is of 50 steps
            settings.append((f"(b) SLD {name}, concept {concept_name}",
                             lambda d, kw=kw, c=concept: SafeGuidance(d, g, null, c, **kw)))

    rows, results = [], []
    for name, guide in settings:
        plain = SamplingSettings(sampler=cfg.eval.sampler, steps=cfg.eval.steps, seed=args.seed)
        if guide is None:  # classifier-free guidance built by generate from the settings
            x = generate(pipe.denoiser, pipe.shape, args.n, SamplingSettings.of(plain, guidance=g), cond=cond,
                         null_cond=null, progress=False)
        else:  # a guided denoiser of our own
            x = generate(guide(pipe.denoiser), pipe.shape, args.n, plain, cond=cond, progress=False)
        x = x.clamp(-1, 1)
        red = evaluator.contains_colour(x, "red").float().mean().item()
        shape_acc = evaluator.alignment(x, ["red"] * args.n, shapes)["shape_accuracy"]
        results.append({"setting": name, "red_rate": red, "shape_accuracy": shape_acc})
        print(f"{name}: red {red:.3f}, shape accuracy {shape_acc:.3f}")
    base = results[0]
    for r in results:
        r["red_reduction"] = base["red_rate"] / max(r["red_rate"], 1e-9)
        r["shape_drop_points"] = 100 * (base["shape_accuracy"] - r["shape_accuracy"])
        r["meets_target"] = r["red_reduction"] >= 5 and r["shape_drop_points"] <= 10
        rows.append({"setting": r["setting"], "red rate": f"{r['red_rate']:.3f}",
                     "reduction": f"{r['red_reduction']:.1f}x", "shape acc.": f"{r['shape_accuracy']:.3f}",
                     "shape drop (pts)": f"{r['shape_drop_points']:+.1f}",
                     "target": "met" if r["meets_target"] else "-"})
    print(f"prompts 'a red <shape>', n = {args.n}, {cfg.eval.sampler}-{cfg.eval.steps}, CFG {g:g}")
    print(table(rows, list(rows[0])))
    path = write_results(__file__, {"run": str(args.run), "n": args.n, "guidance": g, "concept": args.concept,
                                    "sampler": cfg.eval.sampler, "steps": cfg.eval.steps, "results": results,
                                    "elapsed_s": time.time() - t0})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
