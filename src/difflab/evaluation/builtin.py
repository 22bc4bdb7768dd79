"""The built-in evaluation of the default jobs: class-conditional digits and text-conditional shapes.

Digits: class accuracy and Fréchet distance in an independent classifier's features
(``difflab.metrics.digits``). Shapes: prompt alignment (colour and shape of single-object prompts)
and Fréchet distance under the shapes attribute classifier (``difflab.metrics.shapes``), plus the
fidelity-vs-alignment curve as ``guidance_sweep.png``. Samples are the evaluation stream of
``evaluation.samples`` (the conditions and seeds every evaluation uses), scored as floats.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from .. import runs
from ..data.shapes import single_object_prompts
from ..generate import SamplingSettings
from ..loading import load
from ..metrics import digits as digits_metrics
from ..metrics import shapes as shapes_metrics
from ..tables import format_table
from .samples import eval_conditions, generate_range


def guidance_scales(e, guidance: float, extra_guidance=None) -> list[float]:
    """``guidance`` first, then the extra scales (default ``eval.extra_guidance``) not already in it."""
    scales = [guidance]
    return scales + [g for g in (e.extra_guidance if extra_guidance is None else extra_guidance) if g not in scales]


def evaluate(run, settings: SamplingSettings | None = None, *, extra_guidance=None, n: int | None = None,
             progress: bool = True, **overrides) -> dict:
    """Evaluate a run at its guidance scale and a sweep of others; writes ``metrics.json``.

    ``settings`` / ``overrides``: ``SamplingSettings`` fields (unset ones from the run's ``eval``
    config; the batch is ``eval.batch_size``); ``guidance`` is the first scale of the sweep."""
    pipe = load(run)
    e = pipe.cfg.eval
    score, references = _scorer(pipe, n)
    s = pipe.settings(SamplingSettings.of(settings, **overrides), batch_size=e.batch_size)
    n = n or e.n_samples
    t0 = time.time()
    sweep = [{"guidance": g, **score(n, replace(s, guidance=g), progress)}
             for g in guidance_scales(e, s.guidance, extra_guidance)]
    state = runs.load_trainer_state(pipe.run)
    metrics = {**sweep[0], **references(n, s.seed), "dataset": pipe.cfg.data.dataset, "sampler": s.sampler,
               "steps": s.steps, "spacing": s.spacing, "n_samples": n, "train_steps": state["step"],
               "train_seconds": round(state.get("seconds", float("nan")), 1),
               "eval_seconds": round(time.time() - t0, 1), "sweep": sweep}
    if pipe.cfg.data.dataset == "shapes":
        metrics["plot"] = str(plot_guidance_sweep(sweep, pipe.run / "guidance_sweep.png"))
    runs.write_metrics(pipe.run, metrics)
    return metrics


def _scorer(pipe, n: int | None):
    """(score(n, settings, progress) -> metrics of n evaluation samples, references(n, seed) -> dict)."""
    cfg = pipe.cfg
    if cfg.data.dataset == "shapes" and pipe.is_text:
        # as many real renders as samples, so the samples' Fréchet and the real-vs-real floor share their bias
        evaluator = shapes_metrics.ShapesEvaluator(cfg.data.image_size, min_objects=1, max_objects=1,
                                                   n_reference=n or cfg.eval.n_samples)

        def score(n, s, progress):
            _, colours, shapes = single_object_prompts(n)  # the prompts of eval_conditions
            return evaluator.score(generate_range(pipe, 0, n, s, progress), colours, shapes)
        return score, lambda n, seed: evaluator.references()
    if cfg.data.dataset == "digits" and pipe.num_classes == 10:
        evaluator = digits_metrics.DigitsEvaluator(cfg.data.holdout)

        def score(n, s, progress):
            return evaluator.score(generate_range(pipe, 0, n, s, progress), eval_conditions(pipe, 0, n)[0]["labels"])
        return score, evaluator.references
    raise ValueError("difflab eval scores class-conditional digits runs and text-conditional shapes runs "
                     f"(this run: data.dataset={cfg.data.dataset}, conditional={cfg.data.conditional})")


def plot_guidance_sweep(sweep: list[dict], path) -> Path:
    """Fidelity (Fréchet distance, lower is better) against prompt alignment, one point per guidance scale."""
    # matplotlib is slow to import and only this plot needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # (as above)
    from matplotlib.ticker import NullFormatter  # (as above)

    rows = sorted(sweep, key=lambda r: r["guidance"])
    fig = Figure(figsize=(5, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([r["frechet"] for r in rows], [r["both_accuracy"] for r in rows], "o-")
    for r in rows:
        ax.annotate(f"w={r['guidance']:g}", (r["frechet"], r["both_accuracy"]), textcoords="offset points",
                    xytext=(4, -10 if r["guidance"] % 2 else 4), fontsize=8)
    ax.set_xscale("log")  # the unguided point sits an order of magnitude away from the guided ones
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("Fréchet distance to real renders (attribute-classifier features, log)")
    ax.set_ylabel("prompt alignment (colour and shape correct)")
    ax.set_title("Classifier-free guidance sweep")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _metrics_rows(m: dict) -> list[tuple[str, ...]]:
    shapes = m.get("dataset") == "shapes"
    cols = ("colour acc.", "shape acc.", "both", "Fréchet") if shapes else ("class acc.", "Fréchet")
    keys = ("colour_accuracy", "shape_accuracy", "both_accuracy", "frechet") if shapes else \
        ("class_accuracy", "frechet_samples")
    rows = [("what", *cols)]
    for s in sorted(m["sweep"], key=lambda r: r["guidance"]) if shapes else m["sweep"]:
        rows.append((f"{m['sampler']}-{m['steps']} guidance {s['guidance']:g}", *(f"{s[k]:.3f}" for k in keys)))
    if shapes:
        rows.append(("real held-out renders", f"{m['classifier_colour_accuracy']:.3f}",
                     f"{m['classifier_shape_accuracy']:.3f}", f"{m['classifier_both_accuracy']:.3f}",
                     f"{m['frechet_floor']:.3f}"))
        rows.append(("uniform noise", "-", "-", "-", f"{m['frechet_noise']:.3f}"))
    else:
        rows.append(("floor: real train vs held-out", "-", f"{m['frechet_floor']:.3f}"))
        rows.append(("baseline: per-class pixel Gaussian", f"{m['baseline_class_accuracy']:.3f}",
                     f"{m['frechet_baseline']:.3f}"))
    return rows


def format_metrics(m: dict) -> str:
    """A small table: one row per guidance scale plus the reference lines."""
    extra = "" if m.get("dataset") == "shapes" else f"; classifier held-out accuracy {m['classifier_heldout_accuracy']:.3f}"
    lines = [format_table(_metrics_rows(m)),
             f"(n = {m['n_samples']} samples{extra}; train {m['train_seconds']} s, eval {m['eval_seconds']} s)"]
    if m.get("plot"):
        lines.append(f"fidelity-vs-alignment plot: {m['plot']}")
    return "\n".join(lines)
