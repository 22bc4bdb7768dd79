"""Sampler quality per NFE on analytic Gaussian mixtures (exact denoiser, float64, no training).

Two problems (``--problem``): ``spectral`` (the default), a mixture of ``--components`` (16) 64-d
Gaussians with a 1/f amplitude spectrum like natural images, means from the same spectrum (K = 1 is
a single such Gaussian); and ``mixture``, four well-separated isotropic blobs in 3-D. They disagree
on which solver wins at few steps, which is the point of showing both: on the blobs the
probability-flow ODE is stiff where the posterior over components switches, and the Karras grid
spends too few steps there.

For every sampler in ``difflab.samplers.SAMPLERS`` (plus DPM++ 2M on the trailing grid and DDIM on
the Karras grid) and NFE
budgets 5/10/20/50, the step count is the largest whose *counted* denoiser evaluations fit the
budget; the NFE actually used is reported. Two errors:

* trajectory error (deterministic samplers): mean L2 distance of the final sample to the exact
  probability-flow ODE solution from the same start (reference: Heun, 2000 steps on a Karras grid
  over the same sigma range, ending like every sampler with x = D(x, sigma_min); its convergence
  is checked against 4000 steps on a subset);
* distribution error (all samplers): sliced Wasserstein-2 distance (random projections, sorted
  1-D W2) between the samples and an exact draw from the mixture of the same size, with the noise
  floor (the same distance between two independent exact draws).

The sigma range is that of the VP ``schedules.linear(1000)`` table (sigma ~0.01 .. ~157): DDIM and
DDPM walk their native "trailing" grid, all others the Karras grid over the same range.

Runs single-threaded by default (``--threads``): the denoiser calls are tiny, and on a shared
machine extra intra-op threads only add contention.

    python benchmarks/sampler_error.py [--problem spectral|mixture] [--dim N] [--components 16]
        [--samples 2048] [--threads 1]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results  # noqa: E402

from difflab import samplers, schedules  # noqa: E402
from difflab.testing import GaussianMixture  # noqa: E402

BUDGETS = (5, 10, 20, 50)
NATIVE_TRAILING = ("ddim", "ddpm")  # discrete-time samplers: their native grid is diffusers' "trailing"
EXTRA_ROWS = [("dpmpp_2m", "trailing"), ("ddim", "karras")]  # each solver on the other one's grid


class Counting:
    """Wraps a denoiser and counts its evaluations."""

    def __init__(self, denoiser):
        self.denoiser, self.n = denoiser, 0

    def __call__(self, x, sigma, cond=None):
        self.n += 1
        return self.denoiser(x, sigma, cond)


def sliced_w2(a, b, proj):
    """Sliced W2: sqrt of the mean over projections of the 1-D squared W2 (sorted samples, equal sizes)."""
    pa, pb = (a @ proj).sort(0).values, (b @ proj).sort(0).values
    return ((pa - pb) ** 2).mean().sqrt().item()


def noise_for(info, seed, shape, sigmas):
    """A seeded noise source for the whole batch (one stream / one Brownian tree over the grid's range)."""
    if not info.stochastic:
        return None
    if info.brownian:
        positive = sigmas[sigmas > 0]
        src = samplers.BrownianNoise([seed], shape, positive.min().item(), positive.max().item(),
                                     dtype=torch.float64)
    else:
        src = samplers.SeededNoise([seed], shape, dtype=torch.float64)
    return lambda sigma, sigma_next: src(sigma, sigma_next)[0]


def run_sampler(name, denoiser, x, sigmas, noise):
    knobs = {"nfe": len(sigmas) - 1} if name == "dpm_fast" else {}  # dpm_fast's budget is `nfe`
    return samplers.get_sampler(name)(denoiser, x.clone(), sigmas, noise=noise, progress=False, **knobs)


def steps_for_budget(name, gm, grid, budget):
    """The largest step count whose counted NFE fits the budget (tried on a 2-sample batch)."""
    x = torch.randn(2, *gm.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def nfe(steps):
        counter = Counting(gm)
        sig = grid(steps)
        run_sampler(name, counter, x * sig[0], sig, lambda s, sn: torch.zeros_like(x))  # NFE only
        return counter.n

    steps = max(1, budget // samplers.sampler_info(name).nfe_per_step)
    used = nfe(steps)
    while steps > 1 and used > budget:
        steps -= 1
        used = nfe(steps)
    while used < budget and steps < budget and (more := nfe(steps + 1)) <= budget:
        steps, used = steps + 1, more
    return steps


def fmt(v):
    return "-" if v is None else f"{v:.2e}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problem", choices=("mixture", "spectral"), default="spectral",
                   help="spectral: GaussianMixture.spectral(dim, components), image-like 1/f Gaussians; "
                        "mixture: GaussianMixture.default(dim), four isotropic blobs")
    p.add_argument("--dim", type=int, default=None, help="data dimension (default 3 for mixture, 64 for spectral)")
    p.add_argument("--components", type=int, default=16,
                   help="spectral only: mixture components, means drawn from the same 1/f spectrum")
    p.add_argument("--samples", type=int, default=2048, help="samples per sampler for the sliced W2")
    p.add_argument("--projections", type=int, default=256)
    p.add_argument("--ref-steps", type=int, default=2000)
    p.add_argument("--floor-pairs", type=int, default=8, help="independent exact-draw pairs for the noise floor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    args.dim = args.dim or {"mixture": 3, "spectral": 64}[args.problem]
    if args.problem == "mixture":
        gm, problem = GaussianMixture.default(args.dim), f"GaussianMixture.default({args.dim})"
    else:
        gm = GaussianMixture.spectral(args.dim, components=args.components)
        problem = f"GaussianMixture.spectral({args.dim}, components={args.components})"
    sched = schedules.linear(1000)
    smin, smax = sched.sigma_min, sched.sigma_max
    shape = (args.samples, *gm.shape)

    z = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    x_start = z * smax  # every grid here starts at sigma_max
    exact = gm.sample(args.samples, torch.Generator().manual_seed(args.seed + 1))
    proj = torch.randn(math.prod(gm.shape), args.projections, generator=torch.Generator().manual_seed(args.seed + 3),
                       dtype=torch.float64)
    proj = proj / proj.norm(dim=0, keepdim=True)
    g_floor = torch.Generator().manual_seed(args.seed + 2)
    floors = sorted(sliced_w2(gm.sample(args.samples, g_floor).flatten(1), gm.sample(args.samples, g_floor).flatten(1),
                              proj) for _ in range(args.floor_pairs))
    floor = floors[len(floors) // 2]

    # Reference: Heun on a fine Karras grid down to sigma_min, then x = D(x, sigma_min), which is what
    # Heun's final Euler step to 0 (and every sampler's step to 0) computes.
    def reference(steps, x):
        x_smin = samplers.sample_heun(gm, x, schedules.karras_grid(steps, smin, smax)[:-1], progress=False)
        return x_smin, gm(x_smin, torch.full((len(x),), smin, dtype=torch.float64))

    ref_smin, ref = reference(args.ref_steps, x_start)
    ref_sw2 = sliced_w2(ref.flatten(1), exact.flatten(1), proj)
    n_check = min(256, args.samples)
    _, ref_fine = reference(2 * args.ref_steps, x_start[:n_check])
    ref_check = (ref_fine - ref[:n_check]).flatten(1).norm(dim=1).mean().item()
    t_ref = time.perf_counter() - t_start

    grids = {"karras": lambda n: sched.sigmas(n, "karras"), "trailing": lambda n: sched.sigmas(n, "trailing")}
    names = list(samplers.SAMPLERS)
    rows_spec = [(n, "trailing" if n in NATIVE_TRAILING else "karras") for n in names] + \
        [r for r in EXTRA_ROWS if r[0] in samplers.SAMPLERS]

    results = []
    for name, grid_name in rows_spec:
        info = samplers.sampler_info(name)
        grid = grids[grid_name]
        rec = {"sampler": name, "grid": grid_name, "stochastic": info.stochastic, "order": info.order,
               "steps": {}, "nfe": {}, "traj": {}, "sw2": {}}
        if name == "dpm_fast":
            rec["traj_vs_sigma_min"] = {}
        for budget in BUDGETS:
            steps = steps_for_budget(name, gm, grid, budget)
            sigmas = grid(steps)
            counter = Counting(gm)
            noise = noise_for(info, args.seed + 100 + budget, shape, sigmas)
            out = run_sampler(name, counter, x_start, sigmas, noise)
            rec["steps"][budget], rec["nfe"][budget] = steps, counter.n
            rec["sw2"][budget] = sliced_w2(out.flatten(1), exact.flatten(1), proj)
            if not info.stochastic:
                rec["traj"][budget] = (out - ref).flatten(1).norm(dim=1).mean().item()
                if name == "dpm_fast":  # it stops at sigma_min without a final denoise
                    rec["traj_vs_sigma_min"][budget] = (out - ref_smin).flatten(1).norm(dim=1).mean().item()
        results.append(rec)

    cols = ["sampler", "grid", "steps", "NFE used"] + [f"traj@{b}" for b in BUDGETS] + [f"SW2@{b}" for b in BUDGETS]
    rows = []
    for r in results:
        row = {"sampler": r["sampler"] + (" (stoch)" if r["stochastic"] else ""), "grid": r["grid"],
               "steps": "/".join(str(r["steps"][b]) for b in BUDGETS),
               "NFE used": "/".join(str(r["nfe"][b]) for b in BUDGETS)}
        row.update({f"traj@{b}": fmt(r["traj"].get(b)) for b in BUDGETS})
        row.update({f"SW2@{b}": fmt(r["sw2"][b]) for b in BUDGETS})
        rows.append(row)
    rows.append({"sampler": "reference ODE solution", "grid": "karras", "steps": str(args.ref_steps),
                 "NFE used": str(2 * args.ref_steps - 1), **{f"SW2@{b}": fmt(ref_sw2) for b in BUDGETS}})
    rows.append({"sampler": f"noise floor (exact vs exact, median of {len(floors)})",
                 **{f"SW2@{b}": fmt(floor) for b in BUDGETS}})
    print(f"{problem}, float64; sigma range [{smin:.4g}, {smax:.4g}] of schedules.linear(1000);"
          f" {args.samples} samples, {args.projections} projections")
    print(f"reference: Heun {args.ref_steps} steps (Karras); mean L2 change at {2 * args.ref_steps} steps on "
          f"{n_check} samples: {ref_check:.2e}")
    print(table(rows, cols))
    print(f"SW2 noise floor over {len(floors)} pairs of exact draws: median {floor:.3f}, range "
          f"[{floors[0]:.3f}, {floors[-1]:.3f}]; differences inside that range are not resolved")
    fast = next((r for r in results if r["sampler"] == "dpm_fast"), None)
    if fast:
        print("dpm_fast stops at sigma_min without a final denoise; its trajectory error against the ODE solution "
              "at sigma_min instead: " + "/".join(fmt(fast["traj_vs_sigma_min"][b]) for b in BUDGETS))

    by_key = {(r["sampler"], r["grid"]): r for r in results}
    dpmpp = by_key.get(("dpmpp_2m", "karras"))
    ratios = {}
    for grid_name in ("trailing", "karras"):
        ddim = by_key.get(("ddim", grid_name))
        if ddim and dpmpp:
            ratios[grid_name] = ratio = ddim["traj"][10] / dpmpp["traj"][10]
            print(f"trajectory error at 10 NFE: DDIM ({grid_name}) {ddim['traj'][10]:.3e} / DPM++ 2M (Karras) "
                  f"{dpmpp['traj'][10]:.3e} = {ratio:.2f}x (target >= 3x: {'met' if ratio >= 3 else 'NOT met'})")
    suspicious = []
    for r in results:
        for kind in ("traj", "sw2"):
            vals = [r[kind][b] for b in BUDGETS if b in r[kind]]
            if not all(math.isfinite(v) for v in vals):
                suspicious.append(f"{r['sampler']}/{r['grid']}: non-finite {kind}")
            elif kind == "traj" and any(b >= a for a, b in zip(vals, vals[1:])):
                suspicious.append(f"{r['sampler']}/{r['grid']}: trajectory error does not fall with NFE: "
                                  + ", ".join(f"{v:.2e}" for v in vals))
    for s in suspicious:
        print("WARNING:", s)
    elapsed = time.perf_counter() - t_start
    print(f"elapsed {elapsed:.1f}s (reference {t_ref:.1f}s)")
    several = args.problem == "spectral" and args.components > 1
    name = f"sampler_error_{args.problem}" + (f"_k{args.components}" if several else "")
    path = write_results(__file__, name=name, payload={
        "problem": {"mixture": problem, "dtype": "float64", "sigma_min": smin,
                    "sigma_max": smax, "schedule": "linear(1000)", "samples": args.samples,
"projections": args.projections, "seed": args.seed},
        "budgets": list(BUDGETS),
        "reference": {"sampler": "heun", "grid": "karras", "steps": args.ref_steps,
                      "check_steps": 2 * args.ref_steps, "check_samples": n_check, "check_mean_l2": ref_check},
        "noise_floor_sw2": floor, "noise_floor_sw2_all": floors, "reference_sw2": ref_sw2,
        "ratio_ddim_over_dpmpp_2m_karras_traj_at_10": ratios,
        "warnings": suspicious, "elapsed_s": elapsed, "rows": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
