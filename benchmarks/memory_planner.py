"""The memory planner's predicted training and sampling peaks vs measured ones.

Two U-Nets of the shapes-text config at 32x32 (text cross-attention, bool-masked SDPA): the
config's own (channels 32) and a wider one (channels 64), each trained at a batch where
activations dominate, fp32 and bf16 autocast, gradient checkpointing off and on. Predicted:
``difflab.memory.plan`` (fake tensors, nothing allocated). Measured: real training steps (AdamW, EMA,
clipping) under the profiler's memory events on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
Also the measured activation reduction of checkpointing, and one guided sampling batch.

    OMP_NUM_THREADS=1 python benchmarks/memory_planner.py [--device cpu] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results  # noqa: E402

from difflab import memory  # noqa: E402
from difflab.config import load_config  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shapes-text.yaml"
CASES = [  # name, overrides, training batch
    ("shapes-text c32 32x32", ["data.image_size=32", "eval.batch_size=32"], 32),
    ("shapes-text c64 32x32", ["data.image_size=32", "eval.batch_size=32", "model.channels=64"], 32),
]
MiB = 2 ** 20


def mib(n: int) -> float:
    return round(n / MiB, 1)


def training_rows(name: str, cfg, batch: int, plan, device: str, steps: int) -> list[dict]:
    rows = []
    for est in plan.training:
        measured = memory.measure_training_peak(cfg, batch, steps, precision=est.precision,
                                                checkpointing=est.checkpointing, device=device)
        rows.append({"model": name, "params": plan.parameters, "batch": batch, "precision": est.precision,
                     "checkpointing": "on" if est.checkpointing else "off",
                     "predicted MiB": mib(est.peak), "measured MiB": mib(measured["peak"]),
                     "ratio": round(est.peak / measured["peak"], 3),
                     "pred act MiB": mib(est.fwd_bwd_peak), "meas act MiB": mib(measured["activations"]),
                     "act ratio": round(est.fwd_bwd_peak / measured["activations"], 3)})
    return rows


def reductions(rows: list[dict]) -> list[dict]:
    """1 - activations with checkpointing / without, measured and predicted, per model and precision."""
    out = []
    for r in rows:
        if r["checkpointing"] == "off":
            on = next(o for o in rows if o["checkpointing"] == "on"
                      and (o["model"], o["precision"]) == (r["model"], r["precision"]))
            out.append({"model": r["model"], "precision": r["precision"],
                        "measured act off": r["meas act MiB"], "measured act on": on["meas act MiB"],
                        "measured reduction": f"{1 - on['meas act MiB'] / r['meas act MiB']:.1%}",
                        "predicted reduction": f"{1 - on['pred act MiB'] / r['pred act MiB']:.1%}"})
    return out


def inference_row(name: str, cfg, plan, device: str) -> dict:
    measured = memory.measure_inference_peak(cfg, steps=2, device=device)
    i = plan.inference
    return {"model": name, "samples": i.samples, "rows/forward": i.batch, "predicted MiB": mib(i.peak),
            "measured MiB": mib(measured["peak"]), "ratio": round(i.peak / measured["peak"], 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="measured training steps per case (after a warm-up)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train, infer, plans = [], [], {}
    for name, overrides, batch in CASES:
        cfg = load_config(CONFIG, overrides)
        t0 = time.perf_counter()
        plan = memory.plan(cfg, batch, device=args.device)
        plans[name] = {"seconds": round(time.perf_counter() - t0, 2), "table": memory.format_plan(plan)}
        print(plans[name]["table"], f"\n(planned in {plans[name]['seconds']} s)\n")
        train += training_rows(name, cfg, batch, plan, args.device, args.steps)
        infer.append(inference_row(name, cfg, plan, args.device))
    red = reductions(train)
    for rows in (train, red, infer):
        print(table(rows, list(rows[0])), "\n")
    seconds = round(time.perf_counter() - start, 1)
    print(f"total {seconds} s")
    path = write_results(__file__, {"device": args.device, "threads": args.threads, "steps": args.steps,
                                    "seconds": seconds, "training": train, "checkpointing": red,
                                    "inference": infer, "plans": plans})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
