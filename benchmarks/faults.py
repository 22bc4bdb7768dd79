"""Fault injection: does a training run survive kill -9, a full disk, SIGTERM and SIGINT?

A tiny CPU job (``difflab train ... train.log_every=1``) is run once straight through as the
reference, then broken on purpose, many times, and continued with ``difflab train ... --resume``:

* ``kill``       -- kill -9 at a uniform random moment between the first logged step and the end;
* ``in-write``   -- kill -9 inside a checkpoint write (a file under ``<run>/checkpoints/``): a child
  process patches ``difflab.files.atomic_write`` to announce each write and stretch the chosen
  one (half its delay before the data is written into the temporary file, half after, before the
  rename); the kill lands at a uniform moment of that window. Trials cycle over the checkpoint's
  files (model, ema, trainer_state) of random checkpoints;
* ``in-publish`` -- the same inside the write of ``<run>/checkpoint.json`` (the publication);
* ``sigterm`` / ``sigint`` -- the signal at a random moment: exit code 143 / 130, a ``difflab:``
  line on stderr naming it, and a checkpoint of at least the last step logged before the signal;
* ``disk-full``  -- checkpoint writes fail with ENOSPC once ``--full-after`` checkpoints were
  published: exit code 2, one ``difflab: error:`` line, the last checkpoint intact; a resume
  (space freed) finishes. Method ``inject`` raises OSError(ENOSPC) in the child's checkpoint
  writes; method ``tmpfs`` (when ``mount -t tmpfs`` is permitted) trains on a small tmpfs that is
  filled up once the checkpoints were published, and frees it before the resume.

After each fault: the published checkpoint must be loadable (``difflab.load``, model, ema and
trainer state of one step), steps lost (last logged step - published step) <= checkpoint_every,
the resume must exit 0 and end bit-exact (CPU) to the reference, with no ``*.tmp`` left in the
run folder. A per-kind table is printed and every trial written to benchmarks/results/faults.json;
the exit code is 1 when any trial misses an expectation.

    python benchmarks/faults.py [--kill 20 --in-write 12 --sigterm 3 --sigint 2 --seed 0]

(The child entry, used internally: ``python benchmarks/faults.py --child plain|watch|delay|enospc
--marker FILE [--after K] [--delay S] -- <difflab args>``.)
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

SCRIPT = Path(__file__).resolve()
CHILD_MODES = ("plain", "watch", "delay", "enospc")
POINTER = "checkpoint.json"
POLL = 0.005

sys.path.insert(0, str(SCRIPT.parent))
from _common import table, write_results  # noqa: E402


# ------------------------------------------------------------------------------------------ the child

def _announce(marker: str, *fields) -> None:
    with open(marker, "a") as f:
        f.write(" ".join(str(v) for v in (f"{time.time():.6f}", *fields)) + "\n")
        f.flush()


def _write_kind(path, run: Path) -> str | None:
    """``checkpoint`` for a file under ``<run>/checkpoints/``, ``pointer`` for ``<run>/checkpoint.json``."""
    p = Path(os.path.abspath(path))
    if p == run / POINTER:
        return "pointer"
    return "checkpoint" if (run / "checkpoints") in p.parents else None


def _slowed(write, delay: float):
    def slow(tmp):
        time.sleep(delay / 2)  # the temporary file exists, empty
        write(tmp)
        time.sleep(delay / 2)  # the data is written, not yet renamed into place
    return slow


def _no_space(tmp):
    with open(tmp, "wb") as f:
        f.write(b"\0" * 4096)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))


def _install_patch(mode: str, marker: str, after: int, delay: float, run: Path) -> None:
    """Replace ``difflab.files.atomic_write`` by one that announces, stretches or fails checkpoint writes."""
    from difflab import files

    real, seen = files.atomic_write, {"writes": 0, "states": 0}

    def atomic_write(path, write):
        kind = _write_kind(path, run)
        if kind is None:
            return real(path, write)
        seen["writes"] += 1
        n = seen["writes"]
        if mode == "enospc":
            if kind == "checkpoint" and seen["states"] >= after:
                _announce(marker, n, "enospc", path)
                return real(path, _no_space)
            real(path, write)
            seen["states"] += Path(path).name == "trainer_state.pt"
            return None
        _announce(marker, n, "start", path)
        real(path, _slowed(write, delay) if mode == "delay" and n > after else write)
        _announce(marker, n, "done", path)
        return None

    files.atomic_write = atomic_write


def child_main(argv: list[str]) -> int:
    """``--child MODE --marker FILE [--after K] [--delay S] -- <difflab args>``: run difflab, patched.
    ``delay``: announce checkpoint writes, stretch those after the K-th by S seconds; ``watch``:
    announce only; ``enospc``: fail every checkpoint write after K checkpoints were written."""
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="faults.py --child")
    p.add_argument("--child", choices=CHILD_MODES, required=True)
    p.add_argument("--marker", default=os.devnull)
    p.add_argument("--after", type=int, default=0)
    p.add_argument("--delay", type=float, default=0.4)
    opts, difflab_args = p.parse_args(argv[:split]), argv[split + 1:]
    out = next((a.split("=", 1)[1] for a in difflab_args if a.startswith("out=")), "runs/default")
    if opts.child != "plain":
        _install_patch(opts.child, opts.marker, opts.after, opts.delay, Path(os.path.abspath(out)))
    from difflab import cli

    return cli.main(difflab_args)


# ---------------------------------------------------------------------------------------- the parent

@dataclass
class Ctx:
    """What every trial shares: the job, the work folder, the reference run and what was learnt from it."""
    args: argparse.Namespace
    work: Path
    ref: Path | None = None
    span: float = 1.0                      # seconds from the first logged step to the last (reference)
    writes: list = field(default_factory=list)  # (n, path relative to the run) of the reference's writes

    def difflab_args(self, run: Path, resume: bool = False) -> list[str]:
        a = self.args
        return ["train", f"out={run}", f"model.channels={a.channels}", "model.groups=4", "model.head_dim=16",
                "train.batch_size=16", f"train.steps={a.steps}", f"train.checkpoint_every={a.checkpoint_every}",
                "train.log_every=1", "train.sample_every=0", "train.threads=1", "--no-eval", "--quiet",
                *(["--resume"] if resume else [])]

    def folder(self, kind: str, i: int, attempt: int = 1, base: Path | None = None) -> Path:
        f = (base or self.work) / f"{kind}-{i:02d}-{attempt}"
        f.mkdir(parents=True, exist_ok=True)
        return f

    def rng(self, kind: str, i: int) -> random.Random:
        return random.Random(f"{self.args.seed}-{kind}-{i}")


def launch(ctx: Ctx, run: Path, mode="plain", after=0, resume=False, tag="train") -> subprocess.Popen:
    folder = run.parent
    cmd = [sys.executable, str(SCRIPT), "--child", mode, "--marker", str(folder / "marker"), "--after",
           str(after), "--delay", str(ctx.args.write_delay), "--", *ctx.difflab_args(run, resume)]
    with open(folder / f"{tag}.stdout", "w") as out, open(folder / f"{tag}.stderr", "w") as err:
        return subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> int | None:
    """The exit code (None, and the process killed, after ``timeout`` seconds)."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def stderr_lines(run: Path, tag: str) -> list[str]:
    return (run.parent / f"{tag}.stderr").read_text().splitlines()


def wait_for(pred, proc: subprocess.Popen, timeout: float):
    """Poll ``pred()`` until it returns something true (returned) or the process ends (None)."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        value = pred()
        if value:
            return value
        time.sleep(POLL)
    return None


def logged_steps(run: Path) -> list[int]:
    """The steps of the complete lines of ``<run>/metrics.jsonl``."""
    try:
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    steps = []
    for line in text.splitlines(keepends=True):
        try:
            entry = json.loads(line) if line.endswith("\n") else None
        except ValueError:
            entry = None
        if isinstance(entry, dict) and "step" in entry:
            steps.append(int(entry["step"]))
    return steps


def last_logged(run: Path) -> int:
    return max(logged_steps(run), default=0)


def marker_entries(folder: Path) -> list[tuple[float, int, str, str]]:
    """(time, write number, event, path) of each complete line the child announced."""
    try:
        text = (folder / "marker").read_text()
    except FileNotFoundError:
        return []
    entries = []
    for line in text.splitlines(keepends=True):
        parts = line.split(" ", 3)
        if line.endswith("\n") and len(parts) == 4:
            entries.append((float(parts[0]), int(parts[1]), parts[2], parts[3].strip()))
    return entries


def leftovers(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*.tmp"))


def _weights_step(path) -> int | None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        step = (f.metadata() or {}).get("step")
    return None if step is None else int(step)


def inspect(run: Path) -> dict:
    """The published checkpoint's step and whether it is whole: loadable, its files of one step."""
    import difflab
    from difflab import runs

    try:
        step = runs.load_trainer_state(run)["step"]
    except runs.RunFolderError as err:  # nothing published yet: a resume starts from step 0
        return {"published_step": None, "consistent": (run / "config.yaml").is_file(), "problem": str(err)}
    except Exception as err:
        return {"published_step": None, "consistent": False, "problem": f"{type(err).__name__}: {err}"}
    try:
        steps = {w: _weights_step(runs.weights_path(run, w)) for w in ("model", "ema")}
        for w in ("ema", "model"):
            difflab.load(run, weights=w, device="cpu")
    except Exception as err:
        return {"published_step": step, "consistent": False, "problem": f"{type(err).__name__}: {err}"}
    agree = set(steps.values()) == {step}
    return {"published_step": step, "consistent": agree,
            "problem": None if agree else f"steps differ: trainer_state {step}, weights {steps}"}


def same_weights(run: Path, ref: Path) -> bool:
    """Model and EMA weights of the two runs' published checkpoints equal bit for bit."""
    import torch
    from safetensors.torch import load_file
    from difflab import runs

    try:
        for w in ("model", "ema"):
            a, b = load_file(str(runs.weights_path(run, w))), load_file(str(runs.weights_path(ref, w)))
            if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
                return False
    except Exception:
        return False
    return True


# ---------------------------------------------------------------------------------------- the checks

def after_fault(ctx: Ctx, run: Path, rec: dict) -> dict:
    """Inspect the folder a fault left, resume it, and record whether it ended like the reference."""
    rec.update(inspect(run))
    rec["steps_lost"] = rec["last_logged_step"] - (rec["published_step"] or 0)
    proc = launch(ctx, run, resume=True, tag="resume")
    rec["resume_exit"] = finish(proc, ctx.args.timeout)
    rec["resume_stderr"] = stderr_lines(run, "resume")[-3:]
    rec["final_step"] = inspect(run)["published_step"]
    rec["bit_exact"] = rec["resume_exit"] == 0 and same_weights(run, ctx.ref)
    rec["leftovers"] = leftovers(run)
    return rec


def judge(ctx: Ctx, rec: dict, max_lost: int | None) -> dict:
    """Append the expectations the record misses to ``rec["failures"]`` and set ``rec["ok"]``."""
    fails = rec.setdefault("failures", [])
    if not rec.get("consistent"):
        fails.append(f"folder not consistent after the fault: {rec.get('problem')}")
    if max_lost is not None and rec.get("steps_lost", 0) > max_lost:
        fails.append(f"{rec['steps_lost']} steps lost (> {max_lost})")
    if rec.get("resume_exit") != 0:
        fails.append(f"resume exited {rec.get('resume_exit')}: {' | '.join(rec.get('resume_stderr', []))}")
    elif rec.get("final_step") != ctx.args.steps:
        fails.append(f"resume ended at step {rec.get('final_step')}, not {ctx.args.steps}")
    if rec.get("resume_exit") == 0 and not rec.get("bit_exact"):
        fails.append("resumed weights differ from the straight run")
    if rec.get("leftovers"):
        fails.append(f"temporary files left after the resume: {rec['leftovers'][:3]}")
    rec["ok"] = not fails
    return rec


def started(ctx: Ctx, run: Path, proc) -> bool:
    """Wait until the first step was logged (a resume before then starts from step 0 anyway)."""
    return bool(wait_for(lambda: logged_steps(run), proc, ctx.args.timeout))


def kill_trial(ctx: Ctx, i: int) -> dict:
    """kill -9 at a uniform moment of the training phase (drawn again, up to 3 times, when the run
    finished first)."""
    rng, t0 = ctx.rng("kill", i), time.time()
    for attempt in range(1, 4):
        run = ctx.folder("kill", i, attempt) / "run"
        proc = launch(ctx, run)
        if not started(ctx, run, proc):
            finish(proc, 1)
            return judge(ctx, {"kind": "kill", "trial": i, "failures": ["no step was logged"]}, None)
        at = rng.uniform(0, ctx.span)
        time.sleep(at)
        if proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rec = {"kind": "kill", "trial": i, "attempt": attempt, "kill_at_s": round(at, 4),
               "last_logged_step": last_logged(run)}
        rec = after_fault(ctx, run, rec)
        rec["wall_s"] = round(time.time() - t0, 2)
        return judge(ctx, rec, ctx.args.checkpoint_every)
    return judge(ctx, {"kind": "kill", "trial": i, "failures": ["the run finished before each of 3 kills"]}, None)


def write_targets(ctx: Ctx, kind: str) -> list[list[int]]:
    """Write numbers of the reference, grouped by file: checkpoint files (in-write) or the pointer."""
    groups: dict[str, list[int]] = {}
    for n, rel in ctx.writes:
        name, is_pointer = Path(rel).name, rel == POINTER
        if is_pointer == (kind == "in-publish"):
            groups.setdefault(name, []).append(n)
    return [groups[k] for k in sorted(groups)]


def in_write_trial(ctx: Ctx, kind: str, i: int) -> dict:
    """kill -9 at a uniform moment inside the n-th write (a random write of file kind i mod kinds)."""
    rng, t0 = ctx.rng(kind, i), time.time()
    groups = write_targets(ctx, kind)
    if not groups:
        return judge(ctx, {"kind": kind, "trial": i, "failures": ["the reference made no such write"]}, None)
    n = rng.choice(groups[i % len(groups)])
    folder = ctx.folder(kind, i)
    run = folder / "run"
    proc = launch(ctx, run, mode="delay", after=n - 1)
    hit = wait_for(lambda: next((e for e in marker_entries(folder) if e[1] == n), None), proc, ctx.args.timeout)
    if hit is None:
        finish(proc, 1)
        return judge(ctx, {"kind": kind, "trial": i, "write": n, "failures": [f"write {n} never began"]}, None)
    at = rng.uniform(0, ctx.args.write_delay)
    time.sleep(max(0.0, hit[0] + at - time.time()))
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = any(e[1] == n and e[2] == "done" for e in marker_entries(folder))
    rec = {"kind": kind, "trial": i, "write": n, "writing": os.path.relpath(hit[3], run), "kill_at_s": round(at, 4),
           "phase": "temporary file empty" if at < ctx.args.write_delay / 2 else "written, not renamed",
           "inside_write": alive and not done, "last_logged_step": last_logged(run)}
    rec = after_fault(ctx, run, rec)
    rec["wall_s"] = round(time.time() - t0, 2)
    if not rec["inside_write"]:
        rec.setdefault("failures", []).append("the kill did not land inside the write")
    return judge(ctx, rec, ctx.args.checkpoint_every)


def signal_trial(ctx: Ctx, kind: str, i: int) -> dict:
    """SIGTERM / SIGINT at a uniform moment of the training phase: a clean stop, saved within one step."""
    sig = signal.SIGTERM if kind == "sigterm" else signal.SIGINT
    rng, t0 = ctx.rng(kind, i), time.time()
    for attempt in range(1, 4):
        run = ctx.folder(kind, i, attempt) / "run"
        proc = launch(ctx, run)
        if not started(ctx, run, proc):
            finish(proc, 1)
            return judge(ctx, {"kind": kind, "trial": i, "failures": ["no step was logged"]}, None)
        at = rng.uniform(0, ctx.span)
        time.sleep(at)
        before = last_logged(run)
        if proc.poll() is not None:
            continue
        proc.send_signal(sig)
        code = finish(proc, ctx.args.timeout)
        rec = {"kind": kind, "trial": i, "attempt": attempt, "signal_at_s": round(at, 4), "exit": code,
               "logged_before_signal": before, "last_logged_step": last_logged(run),
               "stderr": stderr_lines(run, "train")[-4:]}
        return judge_signal(ctx, after_fault(ctx, run, rec), sig, t0)
    return judge(ctx, {"kind": kind, "trial": i, "failures": ["the run finished before each of 3 signals"]}, None)


def judge_signal(ctx: Ctx, rec: dict, sig: int, t0: float) -> dict:
    rec["wall_s"] = round(time.time() - t0, 2)
    name = signal.Signals(sig).name
    fails = rec.setdefault("failures", [])
    if rec["exit"] != 128 + sig:
        fails.append(f"exit code {rec['exit']}, not {128 + sig}")
    told = [s for s in rec["stderr"] if s.startswith("difflab:") and (name in s or "interrupt" in s.lower())]
    if not told:
        fails.append(f"no `difflab:` line on stderr names {name}")
    if (rec["published_step"] or 0) < rec["logged_before_signal"]:
        fails.append(f"checkpoint of step {rec['published_step']} < step {rec['logged_before_signal']} "
                     "logged before the signal")
    return judge(ctx, rec, ctx.args.checkpoint_every)


# ----------------------------------------------------------------------------------------- disk full

def judge_disk_full(ctx: Ctx, rec: dict, min_step: int) -> dict:
    fails = rec.setdefault("failures", [])
    errors = [s for s in rec["stderr"] if s.startswith("difflab: error:")]
    if rec["exit"] != 2:
        fails.append(f"exit code {rec['exit']}, not 2")
    if len(errors) != 1:
        fails.append(f"{len(errors)} `difflab: error:` lines on stderr, not 1")
    step, every = rec["published_step"], ctx.args.checkpoint_every
    if step is None or step % every or step < min_step:
        fails.append(f"published checkpoint of step {step}: expected a multiple of {every} >= {min_step}")
    return judge(ctx, rec, None)


def disk_full_inject(ctx: Ctx) -> dict:
    """Every checkpoint write after ``--full-after`` checkpoints raises OSError(ENOSPC)."""
    t0, k = time.time(), ctx.args.full_after
    folder = ctx.folder("disk-full-inject", 0)
    run = folder / "run"
    code = finish(launch(ctx, run, mode="enospc", after=k), ctx.args.timeout)
    failed = [e[3] for e in marker_entries(folder) if e[2] == "enospc"]
    rec = {"kind": "disk-full", "method": "inject", "exit": code, "stderr": stderr_lines(run, "train"),
           "failed_write": os.path.relpath(failed[0], run) if failed else None, "last_logged_step": last_logged(run)}
    rec = after_fault(ctx, run, rec)
    rec["wall_s"] = round(time.time() - t0, 2)
    if rec["published_step"] != k * ctx.args.checkpoint_every:
        rec.setdefault("failures", []).append(f"published step {rec['published_step']}, not the "
                                               f"{k * ctx.args.checkpoint_every} written before the failure")
    return judge_disk_full(ctx, rec, k * ctx.args.checkpoint_every)


def fill(folder: Path) -> int:
    """Write zeros into ``folder/filler`` until the file system is full; returns the bytes written."""
    fd, total = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644), 0
    try:
        for chunk in (1 << 20, 1 << 12, 1 << 9):
            while True:
                try:
                    n = os.write(fd, b"\0" * chunk)
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    break
                total += n
                if n < chunk:
                    break
    finally:
        os.close(fd)
    return total


def mount_tmpfs(mnt: Path, size_mb: int) -> str | None:
    """Mount a tmpfs of ``size_mb`` MiB on ``mnt``; the reason when it cannot be done, else None."""
    mnt.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mnt)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{type(err).__name__}: {err}"
    return None if r.returncode == 0 else (r.stderr.strip() or f"mount exited {r.returncode}")


def unmount(mnt: Path) -> None:
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def disk_full_tmpfs(ctx: Ctx) -> dict:
    """Train on a small tmpfs; fill it once ``--full-after`` checkpoints were published (the step after
    the K-th checkpoint is logged); free it and resume."""
    mnt = ctx.work / "tmpfs"
    problem = mount_tmpfs(mnt, ctx.args.tmpfs_mb)
    if problem:
        return {"kind": "disk-full", "method": "tmpfs", "available": False, "reason": problem, "ok": True}
    try:
        return _disk_full_on(ctx, mnt)
    finally:
        unmount(mnt)


def _disk_full_on(ctx: Ctx, mnt: Path) -> dict:
    t0, k, every = time.time(), ctx.args.full_after, ctx.args.checkpoint_every
    run = ctx.folder("disk-full-tmpfs", 0, base=mnt) / "run"
    proc = launch(ctx, run)
    if not wait_for(lambda: last_logged(run) > k * every, proc, ctx.args.timeout):
        finish(proc, ctx.args.timeout)
        rec = {"kind": "disk-full", "method": "tmpfs", "failures": [f"step {k * every + 1} was never logged"]}
        return judge(ctx, rec, None)
    filled_at = last_logged(run)
    filler = fill(mnt)
    code = finish(proc, ctx.args.timeout)
    rec = {"kind": "disk-full", "method": "tmpfs", "available": True, "tmpfs_mb": ctx.args.tmpfs_mb,
           "filled_at_step": filled_at, "filler_bytes": filler, "exit": code,
           "stderr": stderr_lines(run, "train"), "last_logged_step": last_logged(run)}
    (mnt / "filler").unlink()
    rec = after_fault(ctx, run, rec)
    rec["wall_s"] = round(time.time() - t0, 2)
    return judge_disk_full(ctx, rec, k * every)


# ------------------------------------------------------------------------------------------ the run

def reference(ctx: Ctx) -> dict:
    """The straight run: its weights, its training span and the sequence of checkpoint writes."""
    t0 = time.time()
    folder = ctx.folder("reference", 0)
    run = folder / "run"
    code = finish(launch(ctx, run, mode="watch"), ctx.args.timeout)
    if code != 0:
        raise SystemExit(f"the reference run exited {code}: {' | '.join(stderr_lines(run, 'train')[-3:])}")
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    ctx.ref, ctx.span = run, max(0.05, lines[-1].get("seconds", 0) - lines[0].get("seconds", 0))
    ctx.writes = [(n, os.path.relpath(p, run)) for _, n, event, p in marker_entries(folder) if event == "start"]
    if not any(rel != POINTER for _, rel in ctx.writes):
        raise SystemExit("no checkpoint write went through difflab.files.atomic_write: cannot inject faults")
    return {"wall_s": round(time.time() - t0, 2), "training_span_s": round(ctx.span, 3), "log_keys": sorted(lines[0]),
            "checkpoint_writes": len(ctx.writes), "published_step": inspect(run)["published_step"]}


def trials(ctx: Ctx) -> list:
    a = ctx.args
    jobs = [lambda i=i: kill_trial(ctx, i) for i in range(a.kill)]
    jobs += [lambda i=i: in_write_trial(ctx, "in-write", i) for i in range(a.in_write)]
    jobs += [lambda i=i: in_write_trial(ctx, "in-publish", i) for i in range(a.in_publish)]
    jobs += [lambda i=i: signal_trial(ctx, "sigterm", i) for i in range(a.sigterm)]
    jobs += [lambda i=i: signal_trial(ctx, "sigint", i) for i in range(a.sigint)]
    if a.disk_full in ("inject", "both"):
        jobs.append(lambda: disk_full_inject(ctx))
    if a.disk_full in ("tmpfs", "both"):
        jobs.append(lambda: disk_full_tmpfs(ctx))
    return jobs


def run_trials(ctx: Ctx) -> list[dict]:
    records, jobs = [], trials(ctx)
    with ThreadPoolExecutor(max_workers=ctx.args.jobs) as pool:
        for rec in pool.map(lambda job: job(), jobs):
            records.append(rec)
            print(f"  {rec['kind']:<10} {rec.get('trial', rec.get('method', '')):<6} "
                  f"{'ok' if rec.get('ok') else 'FAIL'}  {'; '.join(rec.get('failures', []))[:160]}", flush=True)
    return records


def _label(rec: dict) -> str:
    return rec["kind"] + (f" ({rec['method']})" if "method" in rec else "")


def summary(records: list[dict]) -> list[dict]:
    rows = []
    for kind in dict.fromkeys(_label(r) for r in records):
        rs = [r for r in records if _label(r) == kind]
        if all(r.get("available") is False for r in rs):
            rows.append({"kind": kind, "trials": 0, "ok": "unavailable: " + rs[0]["reason"][:60]})
            continue
        lost = [r["steps_lost"] for r in rs if "steps_lost" in r]
        rows.append({"kind": kind, "trials": len(rs), "ok": sum(bool(r.get("ok")) for r in rs),
                     "consistent": sum(bool(r.get("consistent")) for r in rs),
                     "resumed": sum(r.get("resume_exit") == 0 for r in rs),
                     "bit-exact": sum(bool(r.get("bit_exact")) for r in rs),
                     "max steps lost": max(lost) if lost else "", "leftovers": sum(bool(r.get("leftovers")) for r in rs)})
    return rows


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default, text in [("kill", 20, "kill -9 at random moments"),
                                ("in-write", 12, "kill -9 inside a checkpoint file's write"),
                                ("in-publish", 3, "kill -9 inside the write of checkpoint.json"),
                                ("sigterm", 3, "SIGTERM trials"), ("sigint", 2, "SIGINT trials"),
                                ("steps", 40, "train.steps"), ("checkpoint-every", 5, "train.checkpoint_every"),
                                ("channels", 16, "model.channels (a multiple of 4)"), ("seed", 0, "of the draws"),
                                ("full-after", 2, "checkpoints published before the disk is full"),
                                ("tmpfs-mb", 32, "size of the tmpfs of the disk-full trial"),
                                ("jobs", 1, "trials at a time"), ("timeout", 180, "seconds per difflab process")]:
        p.add_argument(f"--{name}", type=int, default=default, help=f"{text} (default {default})")
    p.add_argument("--write-delay", type=float, default=0.4, help="seconds a stretched write takes (default 0.4)")
    p.add_argument("--disk-full", choices=["both", "inject", "tmpfs", "none"], default="both",
                   help="disk-full methods (default both: tmpfs is skipped, and recorded so, where mount is refused)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    import torch

    torch.set_num_threads(1)
    ctx, t0 = Ctx(args, Path(tempfile.mkdtemp(prefix="difflab-faults-"))), time.time()
    try:
        ref = reference(ctx)
        print(f"reference: {args.steps} steps in {ref['wall_s']} s (training {ref['training_span_s']} s), "
              f"{ref['checkpoint_writes']} checkpoint writes; work folder {ctx.work}", flush=True)
        records = run_trials(ctx)
    finally:
        if os.path.ismount(ctx.work / "tmpfs"):
            unmount(ctx.work / "tmpfs")
        if not args.keep:
            shutil.rmtree(ctx.work, ignore_errors=True)
    rows = summary(records)
    print(table(rows, ["kind", "trials", "ok", "consistent", "resumed", "bit-exact", "max steps lost", "leftovers"]))
    failed = [r for r in records if not r.get("ok")]
    print(f"{len(records)} trials in {time.time() - t0:.0f} s; {len(failed)} missed an expectation")
    settings = {k: v for k, v in vars(args).items() if k != "keep"}
    path = write_results(__file__, {"settings": settings, "reference": ref, "summary": rows, "trials": records,
                                    "failed": len(failed), "wall_s": round(time.time() - t0, 1)})
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child_main(sys.argv[1:]))
    sys.exit(main())
