"""Per-step sampler overhead of difflab vs diffusers' matching schedulers (time excluding model calls).

Both sides get a near-free "network" that returns a precomputed eps-shaped tensor and times itself
(perf_counter inside the wrapper); overhead = wall time of one full sampling call minus the time
inside the network calls, divided by the step count. Pairs (difflab sampler vs diffusers scheduler):
euler / EulerDiscrete, ddim / DDIM, dpmpp_2m / DPMSolverMultistep (dpmsolver++, order 2),
heun / HeunDiscrete, euler_ancestral / EulerAncestralDiscrete, and unipc / UniPCMultistep (order 2,
bh2) when difflab's registry has ``unipc``. All use the DDPM linear schedule (1000 steps,
beta 1e-4..0.02) and "trailing" timesteps.

* diffusers: ``set_timesteps(steps)``, ``x = noise * init_noise_sigma``, then the standard loop
  ``scale_model_input`` -> model -> ``step(...).prev_sample``.
* difflab (headline, "sampler"): ``schedule.sigmas(steps, "trailing")``, ``x = noise * sigmas[0]``,
  then the sampler with a near-free denoiser that returns a precomputed x0 (the time excluding
  denoiser calls, as difflab splits the work).
* difflab "+EpsDenoiser": the same, but with an ``EpsDenoiser`` around the same eps network as
  diffusers gets, so the parametrisation work (input scaling, c_noise = t(sigma), eps -> x0) that
  diffusers' schedulers do inside ``scale_model_input``/``step`` is counted on difflab's side too.

Runs are interleaved round by round (difflab and diffusers alternate which goes first); each
number is the median over rounds of the mean over ``--iters`` calls. Progress bars are off.
Single-threaded by default (``--threads``) so that a shared machine adds less noise.

    python benchmarks/sampler_overhead.py [--rounds 7] [--iters 3] [--steps 50] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results  # noqa: E402

from difflab import samplers, schedules  # noqa: E402
from difflab.denoisers import EpsDenoiser  # noqa: E402

SHAPES = {"latent 4x4x64x64": (4, 4, 64, 64), "tiny 1x4x8x8": (1, 4, 8, 8)}
BETAS = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
             timestep_spacing="trailing")


def pairs():
    """(difflab sampler, its knobs, diffusers scheduler class name, its extra config)."""
    out = [("euler", {}, "EulerDiscreteScheduler", {}),
           ("ddim", {}, "DDIMScheduler", {}),
           ("dpmpp_2m", {}, "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
           ("heun", {}, "HeunDiscreteScheduler", {}),
           ("euler_ancestral", {}, "EulerAncestralDiscreteScheduler", {})]
    if "unipc" in samplers.SAMPLERS:
        out.append(("unipc", {"order": 2, "variant": "bh2"}, "UniPCMultistepScheduler",
                    {"solver_order": 2, "solver_type": "bh2", "predict_x0": True}))
    return out


class TimedConst:
    """A near-free network: returns a copy of a fixed tensor and accumulates the time spent inside."""

    def __init__(self, value):
        self.value, self.seconds, self.calls = value, 0.0, 0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.value.clone()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def run_difflab(fn, knobs, schedule, steps, noise, model, full):
    model.seconds, model.calls = 0.0, 0
    denoiser = EpsDenoiser(model, schedule) if full else model
    t0 = time.perf_counter()
    sigmas = schedule.sigmas(steps, "trailing")
    x = noise * float(sigmas[0])
    fn(denoiser, x, sigmas, progress=False, **knobs)
    return time.perf_counter() - t0 - model.seconds, model.calls


def run_diffusers(scheduler, steps, noise, model):
    model.seconds, model.calls = 0.0, 0
    t0 = time.perf_counter()
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        out = model(model_in, t)
        x = scheduler.step(out, t, x).prev_sample
    return time.perf_counter() - t0 - model.seconds, model.calls


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=3, help="sampling calls per library per round")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    schedule = schedules.linear(1000)
    cases = []  # (pair, shape name, callables)
    for name, knobs, sched_name, extra in pairs():
        scheduler = getattr(diffusers, sched_name)(**BETAS, **extra)
        fn = samplers.get_sampler(name)
        for shape_name, shape in SHAPES.items():
            g = torch.Generator().manual_seed(0)
            noise = torch.randn(shape, generator=g)
            eps = TimedConst(torch.randn(shape, generator=g) * 0.1)
            x0 = TimedConst(torch.randn(shape, generator=g) * 0.5)
            runs = {"difflab": lambda fn=fn, knobs=knobs, noise=noise, x0=x0: run_difflab(
                        fn, knobs, schedule, args.steps, noise, x0, False),
                    "difflab+EpsDenoiser": lambda fn=fn, knobs=knobs, noise=noise, eps=eps: run_difflab(
                        fn, knobs, schedule, args.steps, noise, eps, True),
                    "diffusers": lambda scheduler=scheduler, noise=noise, eps=eps: run_diffusers(
                        scheduler, args.steps, noise, eps)}
            cases.append(((name, sched_name), shape_name, runs))

    calls = {}
    for pair, shape_name, runs in cases:  # warm-up, and the model-call counts
        for lib, run in runs.items():
            for _ in range(2):
                calls[pair, shape_name, lib] = run()[1]
    per_step = {(pair, shape_name, lib): [] for pair, shape_name, runs in cases for lib in runs}
    t_start = time.perf_counter()
    for r in range(args.rounds):  # interleaved rounds
        for pair, shape_name, runs in cases:
            libs = list(runs) if r % 2 == 0 else list(reversed(runs))
            for lib in libs:
                secs = [runs[lib]()[0] for _ in range(args.iters)]
                per_step[pair, shape_name, lib].append(statistics.mean(secs) / args.steps * 1e6)
    med = {k: statistics.median(v) for k, v in per_step.items()}

    rows = []
    for (name, sched_name), shape_name, _ in cases:
        key = (name, sched_name), shape_name
        ours, ours_full, theirs = (med[(*key, lib)] for lib in ("difflab", "difflab+EpsDenoiser", "diffusers"))
        rows.append({"difflab": name, "diffusers": sched_name, "tensor": shape_name,
                     "model calls": f"{calls[(*key, 'difflab')]}/{calls[(*key, 'diffusers')]}",
                     "difflab us/step": round(ours, 1), "diffusers us/step": round(theirs, 1),
                     "ratio": round(ours / theirs, 3),
                     "difflab+EpsDenoiser us/step": round(ours_full, 1),
                     "ratio +EpsDenoiser": round(ours_full / theirs, 3)})
    print(f"{args.steps} steps, median of {args.rounds} interleaved rounds x {args.iters} calls, "
          f"{torch.get_num_threads()} thread(s), diffusers {diffusers.__version__}; "
          "overhead = wall time minus time inside the model, per step; ratio = difflab / diffusers (lower is better)")
    print(table(rows, list(rows[0])))
    for col in ("ratio", "ratio +EpsDenoiser"):
        worst = max(rows, key=lambda r: r[col])
        print(f"worst {col}: {worst[col]} ({worst['difflab']}, {worst['tensor']}); target <= 1.0: "
              f"{'met' if worst[col] <= 1.0 else 'NOT met'}")
    print(f"{time.perf_counter() - t_start:.1f}s measuring")
    path = write_results(__file__, {
        "steps": args.steps, "rounds": args.rounds, "iters": args.iters, "threads": torch.get_num_threads(),
        "diffusers": diffusers.__version__, "schedule": BETAS, "shapes": {k: list(v) for k, v in SHAPES.items()},
        "pairs": [{"difflab": n, "knobs": k, "diffusers": s, "config": e} for n, k, s, e in pairs()],
        "rows": rows,
        "raw_us_per_step": [{"difflab": k[0][0], "diffusers": k[0][1], "tensor": k[1], "lib": k[2], "rounds": v}
                            for k, v in per_step.items()]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
