"""Classifier guidance on digits: class accuracy of an *unconditional* model steered by a noise-aware classifier.

Acceptance: guidance raises the class accuracy of an unconditional digits model from ~10 %
(chance) to >= 80 % at some scale (Dhariwal & Nichol 2021, Sec. 4).

1. an unconditional digits model (``data.conditional=false``, otherwise the default digits job)
   is trained with the project's trainer, or reused if ``--run`` already holds it;
2. a NoiseAwareClassifier is trained on the digits training split with the model's own
   schedule (same training noise-level distribution) and scored on the held-out split at
   several noise levels;
3. for each scale, ``--n`` samples with targets cycling 0..9 are drawn with
   ``ClassifierGuidance`` (targets travel as ``Cond(labels=...)``, which the unconditional
   U-Net ignores), seeded per sample, and scored by the independent DigitsEvaluator
   (class accuracy; Fréchet distance in its features against held-out digits).

    python benchmarks/classifier_guidance.py [--run runs/digits-uncond] [--n 500] [--threads 1]
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
from difflab import Cond  # noqa: E402
from difflab.guidance import ClassifierGuidance  # noqa: E402
from difflab.train.classifier import (load_classifier, noisy_accuracy, save_classifier,  # noqa: E402
                                      train_noisy_classifier)
from difflab.config import load_config  # noqa: E402
from difflab.data import load_digits  # noqa: E402
from difflab.generate import sample_seeds  # noqa: E402
from difflab.metrics.digits import DigitsEvaluator  # noqa: E402
from difflab.samplers import SeededNoise, sampler_info  # noqa: E402
from difflab.train import build_schedule, train  # noqa: E402
from difflab import runs as ckpt  # noqa: E402

PROBE_SIGMAS = (0.02, 0.1, 0.3, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0)


def unconditional_run(run: Path, threads: int, overrides: list[str]) -> Path:
    """Train the unconditional digits model into ``run`` unless it is already complete there."""
    cfg = load_config(None, ["data.conditional=false", f"out={run}", f"train.threads={threads}", *overrides])
    state = run / "trainer_state.pt"
    if not state.exists():
        print(f"training an unconditional digits model into {run}")
        train(cfg)
    elif ckpt.load_trainer_state(run)["step"] < cfg.train.steps:
        print(f"resuming the unconditional digits model in {run}")
        train(cfg, resume=True)
    else:
        print(f"reusing the unconditional digits model in {run}")
    return run


@torch.no_grad()
def guided_samples(pipe, clf, scale: float, labels: torch.Tensor, sampler: str, steps: int, seed: int,
                   batch_size: int) -> torch.Tensor:
    """Samples seeded per index (as difflab.generate does), steered towards ``labels``."""
    model = ClassifierGuidance(pipe.denoiser, clf, scale)
    fn = sampler_info(sampler).fn
    sigmas = pipe.denoiser.schedule.sigmas(steps, pipe.cfg.eval.spacing or None)
    seeds = sample_seeds(seed, len(labels))
    out = []
    for start in range(0, len(labels), batch_size):
        stop = min(len(labels), start + batch_size)
        noise = SeededNoise(seeds[start:stop], pipe.shape)
        x = noise() * float(sigmas[0])
        out.append(fn(model, x, sigmas, Cond(labels=labels[start:stop]), noise=noise, progress=False))
    return torch.cat(out).clamp(-1, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/digits-uncond"))
    p.add_argument("--train", nargs="*", default=[], help="extra key=value overrides for training the model")
    p.add_argument("--classifier", type=Path, default=None,
                   help="load this noise-aware classifier instead of training one")
    p.add_argument("--clf-steps", type=int, default=2000)
    p.add_argument("--clf-lr", type=float, default=2e-3)
    p.add_argument("--scales", type=float, nargs="+", default=[0, 0.5, 1, 2, 4, 8])
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()

    run = unconditional_run(args.run, args.threads, args.train)
    pipe = difflab.load(run, device="cpu")
    if pipe.num_classes is not None:
        raise SystemExit(f"{run} holds a class-conditional model; this benchmark needs an unconditional one")
    cfg = pipe.cfg
    train_data = load_digits("train", cfg.data.holdout)
    heldout = load_digits("heldout", cfg.data.holdout)

    t_clf = time.time()
    if args.classifier is not None:
        clf = load_classifier(args.classifier)
    else:
        clf = train_noisy_classifier(train_data.images, train_data.labels, 10, build_schedule(cfg),
                                     steps=args.clf_steps, lr=args.clf_lr, seed=args.seed,
                                     sigma_data=cfg.diffusion.sigma_data)
        save_classifier(clf, run.parent / f"{run.name}-classifier.safetensors")
    t_clf = time.time() - t_clf
    probe = [{"sigma": s, "heldout_accuracy": round(noisy_accuracy(clf, heldout.images, heldout.labels, s), 3)}
             for s in PROBE_SIGMAS]
    print("\nnoise-aware classifier, held-out accuracy by noise level")
    print(table(probe, ["sigma", "heldout_accuracy"]))

    evaluator = DigitsEvaluator(cfg.data.holdout)
    labels = torch.arange(args.n) % 10
    rows = []
    for scale in args.scales:
        t = time.time()
        x = guided_samples(pipe, clf, scale, labels, args.sampler, args.steps, args.seed, args.batch_size)
        rows.append({"scale": scale, "class_accuracy": round(evaluator.accuracy(x, labels), 3),
                     "frechet": round(evaluator.frechet(x), 3), "seconds": round(time.time() - t, 1)})
        print(rows[-1], flush=True)
    refs = evaluator.references(args.n, args.seed)

    print(f"\nclassifier guidance, unconditional digits model ({args.sampler}, {args.steps} steps, "
          f"n = {args.n}, targets cycling 0..9)")
    print(table(rows, ["scale", "class_accuracy", "frechet", "seconds"]))
    print(f"Fréchet floor (real train vs held-out) {refs['frechet_floor']:.3f}; "
          f"evaluator held-out accuracy {refs['classifier_heldout_accuracy']:.3f}")
    best = max(rows, key=lambda r: r["class_accuracy"])
    passed = best["class_accuracy"] >= 0.8
    print(f"best accuracy {best['class_accuracy']:.3f} at scale {best['scale']:g}: "
          f"{'PASS' if passed else 'FAIL'} (>= 0.80)")
    path = write_results(__file__, {
        "run": str(run), "train_steps": ckpt.load_trainer_state(run)["step"],
        "sampler": args.sampler, "steps": args.steps, "spacing": cfg.eval.spacing or pipe.denoiser.schedule.spacings[0],
        "n_samples": args.n, "seed": args.seed,
        "classifier": {"steps": args.clf_steps if args.classifier is None else None, "lr": args.clf_lr,
                       "loaded_from": str(args.classifier) if args.classifier else None,
                       "config": clf.config, "train_seconds": round(t_clf, 1), "heldout_by_sigma": probe},
        "rows": rows, "references": refs, "best": best, "accepted": passed,
        "total_seconds": round(time.time() - t0, 1)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
