"""Sample-quality metrics computed from extracted features, in float64.

All functions take (N, D) feature arrays (numpy arrays or torch tensors); the feature extractor
(Inception, CLIP, a task classifier ...) is the caller's business. Subset sampling and splits
follow torch-fidelity (Obukhov et al.) so that, given the same features and seed, the numbers agree.
"""
from __future__ import annotations

import zipfile

import numpy as np
import torch
import torch.distributed as dist

from ..files import save_npz as write_npz
from .frechet import frechet_distance


def _as_f64(x, name: str = "features") -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be an (N, D) array, got shape {a.shape}")
    return a


# ----------------------------------------------------------------------------- KID
def _mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    """Unbiased MMD^2 estimate with k(a, b) = (gamma a.b + coef0)^degree for equal-size x, y."""
    m = len(x)
    k_xx = (x @ x.T * gamma + coef0) ** degree
    k_yy = (y @ y.T * gamma + coef0) ** degree
    k_xy = (x @ y.T * gamma + coef0) ** degree
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kid(features_a, features_b, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
        gamma: float | None = None, coef0: float = 1, seed: int = 2020) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al., "Demystifying MMD GANs", ICLR 2018).

    Mean and (population) std over ``subsets`` random subsets of ``subset_size`` rows from each
    set of the unbiased MMD^2 with the polynomial kernel k(x, y) = (gamma x.y + coef0)^degree,
    gamma = 1/D by default. Subsets are drawn without replacement exactly as torch-fidelity's
    ``kid_features_to_metric`` does -- ``np.random.RandomState(seed)``, then per subset
    ``choice(N_a, subset_size, replace=False)`` followed by ``choice(N_b, ...)`` -- so with the same
    seed (2020 by default, as torch-fidelity's ``rng_seed``) both pick identical subsets. Computed in float64.
    """
    a, b = _as_f64(features_a, "features_a"), _as_f64(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    if subset_size < 2 or subset_size > min(len(a), len(b)):
        raise ValueError(f"subset_size {subset_size} must be in [2, min(N_a, N_b) = {min(len(a), len(b))}]")
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    rng = np.random.RandomState(seed)  # legacy RNG on purpose: bit-identical subsets to torch-fidelity
    mmds = np.empty(subsets)
    for i in range(subsets):
        xa = a[rng.choice(len(a), subset_size, replace=False)]
        xb = b[rng.choice(len(b), subset_size, replace=False)]
        mmds[i] = _mmd2_unbiased(xa, xb, degree, gamma, coef0)
    return float(mmds.mean()), float(mmds.std())


# ----------------------------------------------------------------------------- IS
def inception_score(logits_or_probs, splits: int = 10, shuffle: bool = True, seed: int = 2020,
                    probs: bool | None = None) -> tuple[float, float]:
    """Inception Score (Salimans et al., "Improved Techniques for Training GANs", NeurIPS 2016).

    exp(E_x KL(p(y|x) || p(y))) on each of ``splits`` contiguous chunks (chunk i = rows
    [i N // splits, (i+1) N // splits)), returned as mean and population std over chunks. As in
    torch-fidelity's ``isc_features_to_metric``, rows are first permuted with
    ``np.random.RandomState(seed).permutation(N)`` when ``shuffle`` (torch-fidelity default seed 2020).
    Input is class logits, or class probabilities when ``probs`` is True (auto-detected when None:
    non-negative rows summing to 1). Computed in float64.
    """
    x = _as_f64(logits_or_probs, "logits_or_probs")
    n = len(x)
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, N={n}], got {splits}")
    if probs is None:
        probs = bool((x >= 0).all() and np.allclose(x.sum(1), 1.0, rtol=0, atol=1e-6))
    if shuffle:
        x = x[np.random.RandomState(seed).permutation(n)]
    if probs:
        p = x / x.sum(1, keepdims=True)
        with np.errstate(divide="ignore"):
            log_p = np.log(p)
    else:
        log_p = x - x.max(1, keepdims=True)
        log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
        p = np.exp(log_p)
    scores = []
    for i in range(splits):
        sl = slice(i * n // splits, (i + 1) * n // splits)
        p_c, log_p_c = p[sl], log_p[sl]
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 * log 0 terms are masked to 0
            log_q = np.log(p_c.mean(0, keepdims=True))
            kl = np.where(p_c > 0, p_c * (log_p_c - log_q), 0.0).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------- precision / recall
def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def _sq_dists(a, na, b, nb) -> np.ndarray:
    """||a_i - b_j||^2 (clipped at 0), built in place: one (len(a), len(b)) float64 buffer."""
    d = a @ b.T
    d *= -2
    d += na[:, None]
    d += nb[None, :]
    return np.maximum(d, 0, out=d)


def _chunk_rows(n_cols: int, max_bytes: int) -> int:
    return max(1, int(max_bytes // (8 * max(n_cols, 1))))


def _kth_nn_sq_radii(x: np.ndarray, k: int, max_bytes: int) -> np.ndarray:
    """Squared distance from each row of x to its k-th nearest other row (self excluded)."""
    nx = _sq_norms(x)
    out = np.empty(len(x))
    step = _chunk_rows(len(x), max_bytes)
    for s in range(0, len(x), step):
        d = _sq_dists(x[s:s + step], nx[s:s + step], x, nx)
        d[np.arange(len(d)), np.arange(s, s + len(d))] = -1.0  # self: sorts first, then is skipped
        out[s:s + step] = np.partition(d, k, axis=1)[:, k]
    return out


def _coverage(points: np.ndarray, centres: np.ndarray, sq_radii: np.ndarray, max_bytes: int) -> float:
    """Fraction of ``points`` inside at least one ball (centre, radius) -- the k-NN manifold."""
    nc, npnt = _sq_norms(centres), _sq_norms(points)
    inside = np.zeros(len(points), dtype=bool)
    step = _chunk_rows(len(centres), max_bytes)
    for s in range(0, len(points), step):
        d = _sq_dists(points[s:s + step], npnt[s:s + step], centres, nc)
        inside[s:s + step] = (d <= sq_radii[None, :]).any(1)
    return float(inside.mean())


def precision_recall(real, fake, k: int = 3, max_bytes: int = 128 * 2**20) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019).

    Each set's manifold is the union of balls around its points with radius = distance to the
    point's k-th nearest neighbour within the same set (self excluded). Precision = fraction of
    fake points inside the real manifold; recall = fraction of real points inside the fake one.
    Pairwise squared distances are computed in float64 in row chunks of at most ``max_bytes``,
    so memory stays bounded: about 2 x ``max_bytes`` of scratch (the chunk and np.partition's copy)
    plus the inputs; 10k x 10k uses 128 MiB chunks by default.
    """
    r, f = _as_f64(real, "real"), _as_f64(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dims differ: {r.shape[1]} vs {f.shape[1]}")
    if not 1 <= k < min(len(r), len(f)):
        raise ValueError(f"k must be in [1, min(N_real, N_fake) - 1], got {k}")
    r_sq, f_sq = _kth_nn_sq_radii(r, k, max_bytes), _kth_nn_sq_radii(f, k, max_bytes)
    return _coverage(f, r, r_sq, max_bytes), _coverage(r, f, f_sq, max_bytes)


# ----------------------------------------------------------------------------- streaming statistics
class StreamingStats:
    """Streaming mean/covariance of features for FID: accumulates n, sum x, sum x x^T in float64.

    ``update`` per batch, ``merge`` other accumulators, ``all_reduce`` across torch.distributed
    ranks; ``mean``/``cov`` equal ``np.mean(x, 0)`` / ``np.cov(x, rowvar=False)`` (unbiased) of all
    rows seen. Memory is O(D^2) regardless of N. The raw-moment form cov = (sum x x^T - n mu mu^T)/(n-1)
    is exact enough in float64 for features with |mean| / std of order 1 (Inception, CLIP ...).
    """

    def __init__(self, dim: int | None = None):
        self.n = 0
        self.sum = None if dim is None else np.zeros(dim)
        self.sum_outer = None if dim is None else np.zeros((dim, dim))

    def _init(self, dim: int):
        if self.sum is None:
            self.sum, self.sum_outer = np.zeros(dim), np.zeros((dim, dim))
        elif self.sum.shape[0] != dim:
            raise ValueError(f"feature dim {dim} does not match accumulated dim {self.sum.shape[0]}")

    def update(self, features) -> "StreamingStats":
        """Add a (B, D) batch of features."""
        x = _as_f64(features)
        self._init(x.shape[1])
        self.n += len(x)
        self.sum += x.sum(0)
        self.sum_outer += x.T @ x
        return self

    def merge(self, other: "StreamingStats") -> "StreamingStats":
        """Add another accumulator's rows to this one (in place); returns self."""
        if other.sum is None:
            return self
        self._init(other.sum.shape[0])
        self.n += other.n
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        return self

    def all_reduce(self, group=None) -> "StreamingStats":
        """Sum n, sum x and sum x x^T over torch.distributed ranks (no-op if not initialised).

        Every rank must have the same feature dim (call with ``StreamingStats(dim)`` on ranks
        that saw no data). Uses a float64 tensor on the current CUDA device for NCCL, else CPU.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self.sum is None:
            raise ValueError("all_reduce needs the feature dim: construct with StreamingStats(dim)")
        device = (torch.device("cuda", torch.cuda.current_device())
                  if dist.get_backend(group) == "nccl" else torch.device("cpu"))
        flat = torch.from_numpy(np.concatenate([[float(self.n)], self.sum, self.sum_outer.ravel()])).to(device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat = flat.cpu().numpy()
        d = self.sum.shape[0]
        self.n = int(round(flat[0]))
        self.sum = flat[1:1 + d].copy()
        self.sum_outer = flat[1 + d:].reshape(d, d).copy()
        return self

    @property
    def mean(self) -> np.ndarray:
        if not self.n:
            raise ValueError("no features accumulated")
        return self.sum / self.n

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (divides by n - 1), like ``np.cov(x, rowvar=False)``."""
        if self.n < 2:
            raise ValueError("covariance needs at least 2 rows")
        mu = self.mean
        c = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return (c + c.T) / 2

    def frechet_distance(self, other: "StreamingStats") -> float:
        """Fréchet distance between the two accumulated Gaussians."""
        return frechet_distance(self.mean, self.cov, other.mean, other.cov)

    def save_npz(self, path, **meta) -> None:
        """Write ``mu``, ``sigma`` (pytorch-fid / clean-fid layout) plus ``n`` and ``meta`` scalars
        (e.g. extractor="inception-v3", resize="clean") atomically: temp file in the same folder,
        then ``os.replace``. Metadata values must be str, int, float or bool (no pickling)."""
        save_npz(path, self.mean, self.cov, n=self.n, **meta)

    @classmethod
    def from_npz(cls, path) -> "StreamingStats":
        """Rebuild an accumulator (mergeable) from a file written with ``n`` (e.g. by save_npz)."""
        d = load_npz(path)
        if "n" not in d:
            raise ValueError(f"{path} has no 'n'; only mu/sigma can be read (use load_npz)")
        mu, sigma, n = d["mu"], d["sigma"], int(d["n"])
        s = cls(len(mu))
        s.n, s.sum, s.sum_outer = n, n * mu, (n - 1) * sigma + n * np.outer(mu, mu)
        return s

    @staticmethod
    def load_npz(path) -> dict:
        """Same as the module-level :func:`load_npz`: dict with ``mu``, ``sigma`` and metadata."""
        return load_npz(path)


def save_npz(path, mu, sigma, **meta) -> None:
    """Atomically write ``mu``/``sigma`` (float64) and scalar metadata to an .npz file."""
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    for key, value in meta.items():
        if key in arrays:
            raise ValueError(f"metadata key {key!r} clashes with the statistics")
        if not isinstance(value, (str, int, float, bool, np.integer, np.floating, np.bool_)):
            raise TypeError(f"metadata {key}={value!r}: only str/int/float/bool scalars are stored")
        arrays[key] = np.asarray(value)
    write_npz(path, **arrays)


def load_npz(path) -> dict:
    """Read an .npz with ``mu`` and ``sigma`` (ours, pytorch-fid's or clean-fid's); returns a dict
    with float64 ``mu``, ``sigma`` and any scalar metadata as Python values."""
    remedy = "make reference statistics with `difflab fid-stats FOLDER --out ref.npz`"
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:  # not an .npz, or a damaged one
        raise ValueError(f"{path}: not a readable .npz of reference statistics ({err}) ({remedy})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds one array (an .npy), not an .npz of reference statistics ({remedy})")
    with z:
        out = {k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files}
    if "mu" not in out or "sigma" not in out:
        raise ValueError(f"{path}: expected the keys 'mu' and 'sigma', found {sorted(out)} ({remedy})")
    out["mu"], out["sigma"] = np.asarray(out["mu"], np.float64), np.asarray(out["sigma"], np.float64)
    return out
