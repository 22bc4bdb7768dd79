"""UniPC: unified predictor-corrector multistep sampler (Zhao et al. 2023, arXiv:2302.04867)."""
from __future__ import annotations

import math

import torch

from .sampling import _denoise, _report, _steps


def _uni_update(x, lam_t, hist, variant, x0_t=None):
    """One UniP step (``x0_t`` None) or UniC correction (``x0_t`` = D at the predicted x_t), in VE form.

    ``hist`` is [(lambda_k, x0_k)], oldest first, ending at the start point s = s_0 of ``x``.
    Data-prediction update with h = lambda_t - lambda_s, lambda = -log sigma:
        x_t = e^{-h} x_s + (1 - e^{-h}) x0_s - B(-h) sum_m rho_m D_m,   D_m = (x0_m - x0_s) / r_m,
    r_m = (lambda_m - lambda_s) / h (r = 1 for x0_t), rho solving R rho = b with R_km = r_m^k,
    b_k = (k+1)! (-h) phi_{k+2}(-h) / B(-h). One unknown uses rho = 1/2, as the reference code.
    """
    (lam_s, m0), h = hist[-1], lam_t - hist[-1][0]
    pts = [((lam - lam_s) / h, m) for lam, m in reversed(hist[:-1])]  # most recent first
    if x0_t is not None:
        pts.append((1.0, x0_t))
    hh = -h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    x = math.exp(hh) * x - math.expm1(hh) * m0
    if not pts:
        return x
    rhos = [0.5]
    if len(pts) > 1:
        phi, fact, b = math.expm1(hh) / hh - 1, 1, []
        for k in range(1, len(pts) + 1):
            b.append(phi * fact / b_h)
            fact *= k + 1
            phi = phi / hh - 1 / fact
        R = torch.tensor([[r**k for r, _ in pts] for k in range(len(pts))], dtype=torch.float64)
        rhos = torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()
    return x - b_h * sum(rho * (m - m0) / r for rho, (r, m) in zip(rhos, pts))


@torch.no_grad()
def sample_unipc(denoiser, x, sigmas, cond=None, *, order=3, variant="bh2", lower_order_final=True,
                 corrector=True, noise=None, callback=None, progress=True):
    """UniPC-p multistep sampler, data (x0) prediction, B(h) = h ("bh1") or e^h - 1 ("bh2").

    Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
    Diffusion Models": UniP-p predictor + UniC-p corrector in their multistep B(h) form, as in
    the official code (uni_pc.py, ``multistep_uni_pc_bh_update``) and diffusers'
    ``UniPCMultistepScheduler``, written in sigma (VE) space. At each sigma_i: evaluate
    x0_hat = D(x, sigma_i); if a predictor step led here, correct x with UniC using that same
    evaluation (no extra NFE); then predict x at sigma_{i+1} with UniP of order
    p = min(order, i + 1, N - i): warm-up, and (like diffusers and the official code, for any N)
    lower order at the end if ``lower_order_final``. The step to sigma = 0 (lambda = +inf) is
    x = x0_hat, the order-1 limit, with no corrector. ``corrector=False`` runs UniP-p alone (order p;
    diffusers' ``disable_corrector`` at every step); the corrector lifts the order to p + 1.
    Deterministic: ``noise`` is accepted for the shared signature and unused.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unknown UniPC variant {variant!r}; "
                         "expected 'bh1' (B(h) = h) or 'bh2' (B(h) = e^h - 1)")
    n, hist, used, x_prev = len(sigmas) - 1, [], None, None
    for i, sigma, sigma_next in _steps(sigmas, progress):
        lam, x0_hat = -math.log(sigma), _denoise(denoiser, x, sigma, cond)
        if used and corrector:  # UniC with the evaluation at the predicted point
            x = _uni_update(x_prev, lam, used, variant, x0_hat)
        hist = (hist + [(lam, x0_hat)])[-order:]
        _report(callback, x, i, sigma, sigma_next, x0_hat)
        if sigma_next == 0:
            x = x0_hat
            continue
        p = min(order, len(hist), n - i if lower_order_final else order)
        used, x_prev = hist[-p:], x
        x = _uni_update(x, -math.log(sigma_next), used, variant)
    return x
