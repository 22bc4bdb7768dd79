"""Draw samples from a Denoiser: seeded per sample, optionally conditional with guidance, in batches."""
from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .cond import Cond
from .guidance import ClassifierFreeGuidance
from .samplers import BrownianNoise, SeededNoise, check_options, sampler_info


def sample_seeds(seed: int, n: int) -> list[int]:
    """Per-sample seeds: sample i of run ``seed`` always gets the same noise stream."""
    return [seed * 1_000_003 + i for i in range(n)]


@torch.no_grad()
def generate(denoiser, shape, n: int, *, cond: Cond | None = None, null_cond: Cond | None = None,
             labels: Tensor | None = None, null_label: int | None = None, sampler: str = "ddim", steps: int = 50,
             spacing: str | None = None, guidance: float = 1.0, guidance_rescale: float = 0.0, guide=None,
             seed: int = 0, first_index: int = 0, batch_size: int = 256, device=None, progress: bool = True,
             **sampler_kwargs) -> Tensor:
    """``n`` samples of ``shape`` (without batch), as float32 on the CPU.

    With a condition (``cond``, n rows, or class ``labels`` (n,)) the model is wrapped in
    classifier-free guidance at ``guidance`` (1 = conditional, 0 = unconditional) against
    ``null_cond`` (or ``null_label``), with guidance rescale ``guidance_rescale``; ``guide``, a
    function of the denoiser returning a denoiser (e.g. ``SafeGuidance`` or ``ClassifierGuidance``),
    replaces that wrapper (it then owns the guidance scale and null condition: ``guidance``,
    ``guidance_rescale`` and ``null_cond`` are not used); it is built once per batch. Results
    depend on (seed, sample index), never on ``batch_size``; ``first_index`` k makes these
    samples k .. k + n - 1 of the seed's stream (shards of one run).
    """
    info = sampler_info(sampler)
    sampler_kwargs = check_options(sampler, sampler_kwargs)
    sigmas = denoiser.schedule.sigmas(steps, spacing)
    if device is None:
        params = list(denoiser.parameters()) if hasattr(denoiser, "parameters") else []
        device = params[0].device if params else torch.device("cpu")
    if labels is not None:
        cond, null_cond = Cond(labels=torch.as_tensor(labels)), Cond(labels=torch.tensor([null_label]))
    if cond is not None and len(cond) != n:
        raise ValueError(f"expected a condition for each of the {n} samples, got {len(cond)} rows")
    if null_cond is not None and len(null_cond) not in (1, n):
        raise ValueError(f"the null / negative condition needs 1 row or one per sample ({n}), got {len(null_cond)}")

    def model_for(start: int, stop: int):
        """The guided denoiser of samples start..stop-1 (per-sample negative prompts sliced to them)."""
        if guide is not None:
            return guide(denoiser)
        if cond is None:
            return denoiser
        null = null_cond if len(null_cond) == 1 else null_cond[start:stop]
        return ClassifierFreeGuidance(denoiser, guidance, null, rescale=guidance_rescale)

    seeds = sample_seeds(seed, first_index + n)[first_index:]
    out = []
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc=f"{sampler} x{steps}"):
        stop = min(n, start + batch_size)
        model = model_for(start, stop)
        if hasattr(model, "reset"):  # stateful guidance (SLD momentum) starts every trajectory afresh
            model.reset()
        noise = SeededNoise(seeds[start:stop], shape, device=device)
        x = noise() * float(sigmas[0])
        if info.brownian:
            positive = sigmas[sigmas > 0]
            noise = BrownianNoise(seeds[start:stop], shape, float(positive.min()), float(positive.max()),
                                  device=device)
        rows = None if cond is None else cond[start:stop].to(device)
        out.append(info.fn(model, x, sigmas, rows, noise=noise, progress=False, **sampler_kwargs).float().cpu())
    return torch.cat(out)
