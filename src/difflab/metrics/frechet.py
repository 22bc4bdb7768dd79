"""Fréchet distance between Gaussians fitted to features (Heusel et al. 2017), in float64.

FID = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))  (Heusel et al., "GANs Trained by a Two
Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS 2017; Dowson & Landau 1982).
"""
from __future__ import annotations

import warnings

import numpy as np

#: relative tolerances deciding whether a covariance counts as symmetric / PSD
SYM_RTOL = 1e-8
PSD_RTOL = 1e-8
#: an imaginary part of tr((S1 S2)^(1/2)) above this fraction of its real part is "non-negligible"
IMAG_RTOL = 1e-6


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of an (N, D) feature array, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be an (N, D) array with N >= 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _is_symmetric(a: np.ndarray, rtol: float = SYM_RTOL) -> bool:
    scale = max(np.abs(a).max(initial=0.0), np.finfo(np.float64).tiny)
    return bool(np.abs(a - a.T).max(initial=0.0) <= rtol * scale)


def _trace_sqrt_symmetric(s1: np.ndarray, s2: np.ndarray) -> tuple[float, bool]:
    """tr((S1^(1/2) S2 S1^(1/2))^(1/2)) via eigh; also whether S1 and that product look PSD."""
    w1, v1 = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    m = root1 @ ((s2 + s2.T) / 2) @ root1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    psd = bool(w1.min(initial=0) >= -PSD_RTOL * max(np.abs(w1).max(initial=0), 1e-300)
               and w.min(initial=0) >= -PSD_RTOL * max(np.abs(w).max(initial=0), 1e-300))
    return float(np.sqrt(np.clip(w, 0, None)).sum()), psd


def trace_sqrt_product(sigma1, sigma2) -> float:
    """tr((S1 S2)^(1/2)) for the Fréchet distance, in float64.

    Main path (both covariances symmetric PSD within ``SYM_RTOL``/``PSD_RTOL``):
    tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)); the argument is symmetric PSD,
    so both square roots come from ``eigh`` and stay real.

    Otherwise (e.g. statistics written by other tools, non-symmetric or indefinite):
    the eigenvalues of S1 S2 are taken with ``np.linalg.eigvals`` as complex numbers, their
    complex square roots are summed (conjugate pairs cancel), and the real part is used only if
    the imaginary part of the sum is negligible (``<= IMAG_RTOL * |real part|``). If it is not,
    a ``RuntimeWarning`` is emitted and the symmetric form on the symmetrised covariances
    (negative eigenvalues clipped to 0) is returned instead -- an imaginary part is never
    dropped silently.
    """
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if _is_symmetric(s1) and _is_symmetric(s2):
        tr, psd = _trace_sqrt_symmetric(s1, s2)
        if psd:
            return tr
    eig = np.linalg.eigvals(s1 @ s2).astype(np.complex128)
    total = np.sqrt(eig).sum()
    if abs(total.imag) <= IMAG_RTOL * max(abs(total.real), 1e-300):
        return float(total.real)
    warnings.warn(
        f"Fréchet distance: tr((S1 S2)^(1/2)) from eigenvalues has a non-negligible imaginary part "
        f"({total.imag:.3g} vs real {total.real:.3g}); the covariances are not symmetric PSD. "
        f"Falling back to the symmetric form on (S+S^T)/2 with negative eigenvalues clipped.",
        RuntimeWarning, stacklevel=3)
    return _trace_sqrt_symmetric(s1, s2)[0]


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))  (Heusel et al. 2017), float64.

    tr((S1 S2)^(1/2)) comes from :func:`trace_sqrt_product`: eigh of the symmetric PSD
    S1^(1/2) S2 S1^(1/2) for symmetric PSD covariances; otherwise complex eigenvalues of S1 S2,
    with a warning and the symmetric fallback when their square roots sum to a non-real number.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    covmean_trace = trace_sqrt_product(s1, s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * covmean_trace)
