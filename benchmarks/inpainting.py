"""Semantic completion on digits: does the completed half make the right digit?

The left half (and separately the top half) of ``--n`` held-out real digits is masked and
completed by the digits model without its label (guidance 0: the unconditional model), by
known-region replacement and by RePaint (jump length 10, 10 resamplings: the paper's setting),
with DDIM and DPM-Solver++(2M), 50 steps each. The independent digits classifier (trained on the
training split only) scores each completion against the true label; the floor is the masked
input itself (the unknown half set to the background, -1), the ceiling the full real digit.
``--inpainting-run`` adds an inpainting model (the digits job with ``model.inpainting=true``:
masked image and mask as input channels, trained on random boxes, halves and strokes),
conditioned on the masked image alone (``model``) and with replacement on top (``model+replace``).
The digits' held-out split has 360 images: ``--n`` above that uses all of them.

    difflab train model.inpainting=true out=runs/digits-inpaint --no-eval
    python benchmarks/inpainting.py [--run runs/digits] [--inpainting-run runs/digits-inpaint] [--steps 50]
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
from difflab import editing  # noqa: E402
from difflab.data import load_digits  # noqa: E402
from difflab.metrics.digits import DigitsEvaluator  # noqa: E402

MASKS = {"left half": (slice(None), slice(0, 4)), "top half": (slice(0, 4), slice(None))}


def unknown(name: str) -> torch.Tensor:
    mask = torch.ones(1, 1, 8, 8)
    rows, cols = MASKS[name]
    mask[0, 0, rows, cols] = 0
    return mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/digits")
    p.add_argument("--inpainting-run", default=None)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--jump-length", type=int, default=10)
    p.add_argument("--resamplings", type=int, default=10)
    p.add_argument("--samplers", default="ddim,dpmpp_2m")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = difflab.load(args.run, device="cpu")
    models = [(pipe, m, m) for m in editing.EDITS]
    if args.inpainting_run:
        inpainter = difflab.load(args.inpainting_run, device="cpu")
        models += [(inpainter, "model", "model"), (inpainter, "replace", "model+replace")]
    evaluator = DigitsEvaluator(pipe.cfg.data.holdout)
    real = load_digits("heldout", pipe.cfg.data.holdout)
    x, labels = real.images[:args.n], real.labels[:args.n]
    rows = [{"mask": "-", "method": "ceiling: the real digit", "sampler": "-", "accuracy": evaluator.accuracy(x, labels)}]
    for name in MASKS:
        mask = unknown(name)
        rows.append({"mask": name, "method": "floor: the masked input", "sampler": "-",
                     "accuracy": evaluator.accuracy(editing.composite(x, -torch.ones_like(x), mask), labels)})
        for sampler in args.samplers.split(","):
            for model, method, label in models:
                t0 = time.time()
                out = editing.inpaint(model, x, mask, method=method, jump_length=args.jump_length,
                                      resamplings=args.resamplings, guidance=0, sampler=sampler, steps=args.steps,
                                      seed=0, progress=False)
                assert torch.equal(out * mask, x * mask), "known pixels changed"
                rows.append({"mask": name, "method": label, "sampler": sampler,
                             "accuracy": evaluator.accuracy(out, labels), "seconds": round(time.time() - t0, 1)})
                print(rows[-1], flush=True)
    for r in rows:
        r["accuracy"] = round(r["accuracy"], 3)
    print(table(rows, ["mask", "method", "sampler", "accuracy", "seconds"]))
    settings = {k: v for k, v in vars(args).items()}
    print(f"wrote {write_results(__file__, {'settings': settings, 'rows': rows})}")


if __name__ == "__main__":
    main()
