"""Few-step generation on digits (issue 20): quality per step count, and speed at equal quality.

Quality: the built-in digits evaluation (class accuracy and Fréchet distance of the independent
classifier's features, n class-balanced samples, the evaluation's seeds) of

* the teacher (the default job) guided at 3: DDIM at 50 steps (the reference), DDIM at 1, 2 and 4
  steps on its own Karras grid and on ``karras_trailing`` (the grid the students use), and
  DPM++ 2M at increasing step counts until it first passes both bars (below);
* the progressive-distillation students (``<pd>/<n>-steps``, each at its own step count, DDIM);
* the consistency-distillation and consistency-training runs, multistep consistency sampling at
  1, 2, 4 and 8 steps;
* the rectified flow (Euler at 50 steps, guided 3 and unguided; at 1, 2, 4, 8 steps guided 3;
  at 4 unguided) and its reflow (Euler at 1, 2, 4, 8 steps; it learnt the flow guided at 3, so it
  samples unguided), and the reflow of unguided pairs (``distill.guidance=1``, against the flow's
  unguided 4 steps), with Liu et al.'s straightness S along 100-step Euler paths from one noise.

Speed: for each method, the first step count that passes a bar, timed as wall-clock samples per
second for one batch of ``--batch`` samples (classifier-free guidance doubles the teacher's
batch), all interleaved round by round, median over ``--rounds``; the ratio is against the
teacher with DPM++ 2M at its first step count passing the same bar. Two bars: ``--bar`` class
accuracy alone (which the guided teacher passes at 1-2 steps with blurred digits, Fréchet > 100),
and that accuracy with a Fréchet distance at most ``--frechet-factor`` x the teacher's at DDIM-50.
Runs that are absent are skipped.

    python benchmarks/few_step.py [--teacher runs/digits] [--pd runs/digits-progressive] [--cd runs/digits-consistency]
        [--ct runs/digits-ct] [--flow runs/digits-flow] [--reflow runs/digits-flow-reflow]
        [--reflow-unguided runs/digits-flow-reflow-g1]
        [--n 1000] [--bar 0.97] [--frechet-factor 1.5] [--batch 250] [--rounds 5]
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

from difflab import runs as run_folders  # noqa: E402
from difflab.distill import straightness  # noqa: E402
from difflab.evaluation import evaluate  # noqa: E402
from difflab.files import atomic_write  # noqa: E402
from difflab.generate import SamplingSettings, guided  # noqa: E402
from difflab.loading import load  # noqa: E402

DPM_STEPS = [2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30]
FEW = (1, 2, 4, 8)  # the step counts of the consistency and flow runs


def quality(method: str, run, n: int, **settings) -> dict:
    """The built-in evaluation of ``run`` at ``settings``; the run's own ``metrics.json`` is put back."""
    path = Path(run) / run_folders.METRICS
    kept = path.read_bytes() if path.exists() else None
    try:
        m = evaluate(run, SamplingSettings(**settings), extra_guidance=[], n=n, progress=False)
    finally:
        if kept is not None:
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(kept))
        else:
            path.unlink(missing_ok=True)
    return {"method": method, "run": str(run), "sampler": m["sampler"], "steps": m["steps"], "spacing": m["spacing"],
            "guidance": m["guidance"], "class_accuracy": m["class_accuracy"], "frechet": m["frechet_samples"],
            "train_seconds": m["train_seconds"]}


def first_at_bar(rows: list[dict], passes) -> dict | None:
    hits = [r for r in rows if passes(r)]
    return min(hits, key=lambda r: r["steps"]) if hits else None


def teacher_rows(run, n: int, bars: dict) -> tuple[list[dict], list[dict]]:
    """(DDIM rows at 1, 2, 4 steps, DPM++ 2M rows up to the first step count that passes every bar),
    all guided at 3."""
    ddim = [quality("teacher", run, n, sampler="ddim", steps=k, guidance=3.0, spacing=spacing)
            for spacing in ("karras", "karras_trailing") for k in (1, 2, 4)]
    dpm = []
    for k in DPM_STEPS:
        dpm.append(quality("teacher DPM++ 2M", run, n, sampler="dpmpp_2m", steps=k, guidance=3.0))
        if all(passes(dpm[-1]) for passes in bars.values()):
            break
    return ddim, dpm


def progressive_rows(root, n: int) -> list[dict]:
    stages = sorted(Path(root).glob("*-steps"), key=lambda p: -int(p.name.split("-")[0]))
    return [quality("progressive distillation", p, n) for p in stages if (p / "config.yaml").exists()]


def flow_straightness(run, guidance: float, n: int = 256) -> float:
    pipe = load(run)
    labels = torch.arange(n) % pipe.num_classes if pipe.num_classes else None
    settings = pipe.settings(SamplingSettings(guidance=guidance))
    model, cond, null, s = pipe.sampling_parts(n=n, labels=labels, settings=settings)
    noise = torch.randn((n, *pipe.latent_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return straightness(guided(model, s, null), noise, steps=100, cond=cond)


def samples_per_second(rows: list[dict], batch: int, rounds: int) -> list[float]:
    """Interleaved timing of one ``batch``-sample generation per row, median over rounds."""
    pipes = [load(r["run"]) for r in rows]
    labels = torch.arange(batch) % 10
    times = [[] for _ in rows]
    for _ in range(rounds):
        for i, (r, pipe) in enumerate(zip(rows, pipes)):
            s = SamplingSettings(sampler=r["sampler"], steps=r["steps"], spacing=r["spacing"], guidance=r["guidance"],
                                 batch_size=batch, seed=0)
            t0 = time.perf_counter()
            pipe(n=batch, labels=labels, settings=s, progress=False)
            times[i].append(time.perf_counter() - t0)
    return [batch / statistics.median(t) for t in times]


def speed_rows(groups: dict[str, list[dict]], bars: dict, batch: int, rounds: int) -> list[dict]:
    """Per bar and method, the first step count that passes, timed (all interleaved) against the
    teacher with DPM++ 2M at its first passing step count."""
    best = [(bar, method, first_at_bar(rows, passes))
            for bar, passes in bars.items() for method, rows in groups.items()]
    best = [(bar, method, r) for bar, method, r in best if r is not None]
    key = lambda r: (r["run"], r["sampler"], r["steps"], r["guidance"])  # noqa: E731
    unique = list({key(r): r for _, _, r in best}.values())
    rate = dict(zip(map(key, unique), samples_per_second(unique, batch, rounds)))
    reference = {bar: rate[key(r)] for bar, method, r in best if method == "teacher DPM++ 2M"}
    return [{"bar": bar, "method": method, "sampler": r["sampler"], "steps": r["steps"], "guidance": r["guidance"],
             "class_accuracy": r["class_accuracy"], "frechet": r["frechet"], "samples_per_s": round(rate[key(r)], 1),
             "vs_teacher_dpmpp_2m": round(rate[key(r)] / reference[bar], 2) if bar in reference else None}
            for bar, method, r in best]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in (("teacher", "runs/digits"), ("pd", "runs/digits-progressive"),
                          ("cd", "runs/digits-consistency"),
                          ("ct", "runs/digits-ct"), ("flow", "runs/digits-flow"), ("reflow", "runs/digits-flow-reflow"),
                          ("reflow_unguided", "runs/digits-flow-reflow-g1")):
        p.add_argument(f"--{name.replace('_', '-')}", default=default)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--bar", type=float, default=0.97, help="the class-accuracy bar")
    p.add_argument("--frechet-factor", type=float, default=1.5,
                   help="the second bar also asks Fréchet <= this x the teacher's (DDIM-50, guidance 3)")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def student_rows(args) -> tuple[dict[str, list[dict]], list[dict], dict[str, float]]:
    """(rows per few-step method, the flow's reference rows, straightness per model) of the runs present."""
    present = lambda run: (Path(run) / "config.yaml").exists()  # noqa: E731
    groups, extra, straight = {}, [], {}
    if Path(args.pd).is_dir():
        groups["progressive distillation"] = progressive_rows(args.pd, args.n)
    for name, run in (("consistency distillation", args.cd), ("consistency training", args.ct)):
        if present(run):
            groups[name] = [quality(name, run, args.n, sampler="consistency", steps=k) for k in FEW]
    if present(args.flow):
        extra = [quality("rectified flow", args.flow, args.n, sampler="euler", steps=k, guidance=g)
                 for k, g in ((50, 3.0), (50, 1.0), (4, 1.0))]
        groups["rectified flow"] = [quality("rectified flow", args.flow, args.n, sampler="euler", steps=k, guidance=3.0)
                                    for k in FEW]
        straight["rectified flow, guided 3"] = flow_straightness(args.flow, 3.0)
        straight["rectified flow, unguided"] = flow_straightness(args.flow, 1.0)
    for name, run, what in (("reflow", args.reflow, "unguided (it learnt the flow guided at 3)"),
                            ("reflow of unguided pairs", args.reflow_unguided, "unguided")):
        if present(run):
            groups[name] = [quality(name, run, args.n, sampler="euler", steps=k, guidance=1.0) for k in FEW]
            straight[f"{name}, {what}"] = flow_straightness(run, 1.0)
    return groups, extra, straight


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    reference = quality("teacher", args.teacher, args.n, sampler="ddim", steps=50, guidance=3.0)
    frechet_bar = args.frechet_factor * reference["frechet"]
    bars = {f"accuracy >= {args.bar:g}": lambda r: r["class_accuracy"] >= args.bar,
            f"accuracy >= {args.bar:g}, Fréchet <= {frechet_bar:.1f}":
                lambda r: r["class_accuracy"] >= args.bar and r["frechet"] <= frechet_bar}
    ddim, dpm = teacher_rows(args.teacher, args.n, bars)
    students, extra, straight = student_rows(args)
    groups = {"teacher DPM++ 2M": dpm, **students}

    speed = speed_rows(groups, bars, args.batch, args.rounds)  # the bars see unrounded figures
    rows = [reference] + ddim + [r for rows in groups.values() for r in rows] + extra
    for r in rows:
        r["class_accuracy"], r["frechet"] = round(r["class_accuracy"], 3), round(r["frechet"], 3)
    print(table(rows, ["method", "sampler", "steps", "spacing", "guidance", "class_accuracy", "frechet",
                       "train_seconds"]))
    for k, v in straight.items():
        print(f"straightness S, {k}: {v:.5f}")
    print(f"\nspeed at equal quality ({args.batch} samples per call, median of {args.rounds} interleaved rounds):")
    print(table(speed, ["bar", "method", "sampler", "steps", "guidance", "class_accuracy", "frechet", "samples_per_s",
                        "vs_teacher_dpmpp_2m"]))
    for bar in bars:
        missing = [m for m in groups if not any(r["bar"] == bar and r["method"] == m for r in speed)]
        if missing:
            print(f"{bar}: not reached at any step count tried by {', '.join(missing)}")
    teacher_state = run_folders.load_trainer_state(Path(args.teacher))
    path = write_results(__file__, {"args": vars(args), "frechet_bar": frechet_bar, "quality": rows,
                                    "straightness": straight, "speed": speed,
                                    "teacher_train_seconds": teacher_state.get("seconds")})
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
