"""The standard FID/IS Inception-v3 feature extractor, through torch-fidelity, with offline weights.

The network is torch-fidelity's ``FeatureExtractorInceptionV3`` (a port of the TF graph
``inception-2015-12-05`` used by TTUR/FID and the Inception Score). It does the TF1-exact bilinear
resize to 299x299 itself and expects ``uint8`` images of shape (N, 3, H, W); this module maps our
images (float in [-1, 1]) to that input.

Nothing here ever downloads. The weights file is looked up by :func:`find_inception_weights` and its
SHA-256 is checked before it is handed to torch-fidelity (which unpickles it with
``torch.load(weights_only=False)``, so an unverified file must not reach it).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

#: environment variable naming the weights file
INCEPTION_ENV_VAR = "DIFFLAB_INCEPTION_WEIGHTS"
#: where torch-fidelity downloads the weights from (``torch_fidelity.feature_extractor_inceptionv3
#: .URL_INCEPTION_V3`` in torch-fidelity 0.4.0); we never fetch it, it only names the file
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
#: the file name torch-fidelity's ``load_state_dict_from_url`` stores under ``<hub dir>/checkpoints``
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
#: SHA-256 of the official ``weights-inception-2015-12-05-6726825d.pth`` (91.2 MiB).
#: Provenance: torch-fidelity itself documents only the first 8 hex digits, ``6726825d``, through the
#: torch-hub naming convention of the file (``<name>-<sha256[:8]>.pth``). The full digest below is not
#: in torch-fidelity's source; it is taken from third-party records (a project README pinning the
#: torch-fidelity file, and the project's shared reference/metrics.md), it agrees with that prefix, and it was
#: NOT verified against the real file here (no network). Re-check it with ``sha256sum`` on the
#: official file; if it differs, set this constant to the official file's hash (or pass ``sha256=``).
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
#: torch-fidelity's feature names: pool3 (FID/KID/PR) and the bias-free logits (Inception Score)
_TF_FEATURES = ("2048", "logits_unbiased")
#: how far outside [-1, 1] an image may stray (and then be clamped) before it is rejected
RANGE_TOL = 1e-3


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _hub_candidate() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def find_inception_weights(path=None, sha256: str | None = INCEPTION_SHA256) -> Path:
    """Locate (never download) and verify the torch-fidelity Inception-v3 weights file.

    Looked up in order: (1) ``path``; (2) the environment variable ``DIFFLAB_INCEPTION_WEIGHTS``;
    (3) ``torch.hub.get_dir()/checkpoints/weights-inception-2015-12-05-6726825d.pth`` (the torch hub
    cache, i.e. ``$TORCH_HOME/hub/checkpoints``, where torch-fidelity itself would download it).
    An explicit ``path`` or a set env var that points to a missing file is an error: it does not
    fall through to the next place.

    ``sha256``: expected hex digest (default :data:`INCEPTION_SHA256`); ``None`` skips the check.
    Raises ``FileNotFoundError`` (naming the three places and the file name) or ``ValueError``
    (expected vs actual hash).
    """
    hub = _hub_candidate()
    env = os.environ.get(INCEPTION_ENV_VAR) or None
    if path is not None:
        chosen, source = Path(path).expanduser(), "the explicit path argument"
    elif env is not None:
        chosen, source = Path(env).expanduser(), f"${INCEPTION_ENV_VAR}"
    else:
        chosen, source = hub, "the torch hub cache"
    if not chosen.is_file():
        raise FileNotFoundError(
            f"Inception-v3 FID weights not found ({source} -> {chosen} does not exist). Nothing is "
            f"downloaded. Get the file {INCEPTION_FILENAME!r} (from {INCEPTION_URL}) and either\n"
            f"  (1) pass its path explicitly (weights_path= / path=), or\n"
            f"  (2) set the environment variable {INCEPTION_ENV_VAR}=/path/to/{INCEPTION_FILENAME}"
            f"{f' (currently {env!r})' if env else ' (currently unset)'}, or\n"
            f"  (3) put it in the torch hub cache as {hub} "
            f"(torch.hub.get_dir()/checkpoints/{INCEPTION_FILENAME}; $TORCH_HOME moves it).")
    if sha256 is not None:
        actual = sha256_file(chosen)
        if actual.lower() != sha256.lower():
            raise ValueError(
                f"SHA-256 mismatch for Inception weights {chosen} (found via {source}): "
                f"expected {sha256.lower()}, actual {actual}. The file is corrupt or not the "
                f"official {INCEPTION_FILENAME}.")
    return chosen


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1] (C = 1 or 3) or uint8 -> (N, 3, H, W) uint8 in [0, 255]."""
    if not torch.is_tensor(images):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 (greyscale) or 3 (RGB) channels, got shape "
                         f"{tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[2] < 1 or images.shape[3] < 1:
        raise ValueError(f"empty image batch: {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = images
    elif images.is_floating_point():
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or inf")
        lo, hi = images.min().item(), images.max().item()
        if lo < -1 - RANGE_TOL or hi > 1 + RANGE_TOL:
            raise ValueError(f"float images must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]")
        x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    else:
        raise TypeError(f"images must be float in [-1, 1] or uint8, got dtype {images.dtype}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


class InceptionFeatures(nn.Module):
    """torch-fidelity's FID Inception-v3 (``inception-2015-12-05``), frozen, on our image convention.

    ``forward(images)`` takes float images in [-1, 1] of shape (N, 3, H, W) or (N, 1, H, W) (grey,
    repeated to RGB), any H, W (uint8 in [0, 255] is passed through), and returns
    ``{"pool3": (N, 2048) float64, "logits": (N, 1008) float64}``; ``logits`` are the bias-free
    logits torch-fidelity uses for the Inception Score. The float->uint8 mapping is
    ``round((x + 1) * 127.5)``; torch-fidelity then does the TF1-exact bilinear resize to 299.
    """

    def __init__(self, weights_path=None, sha256: str | None = INCEPTION_SHA256, device="cpu"):
        super().__init__()
        try:
            # optional: torch-fidelity is needed only for the Inception features
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("InceptionFeatures needs torch-fidelity (pip install torch-fidelity)") from e
        self.weights_path = find_inception_weights(weights_path, sha256=sha256)
        # always a concrete path: torch-fidelity would download when given None
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", list(_TF_FEATURES),
                                               feature_extractor_weights_path=str(self.weights_path))
        self.net.requires_grad_(False).eval()
        self.to(device)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def train(self, mode: bool = True):  # the extractor is always in eval mode (BatchNorm stats)
        super().train(mode)
        self.net.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = _to_uint8(images).to(self.device)
        pool3, logits = self.net(x)
        return {"pool3": pool3.double(), "logits": logits.double()}

    @torch.no_grad()
    def extract(self, images, batch_size: int = 64) -> dict[str, torch.Tensor]:
        """Features of a (N, C, H, W) tensor, or an iterable of such batches, in chunks of
        ``batch_size``; returns CPU float64 tensors ``{"pool3": (N, 2048), "logits": (N, 1008)}``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batches = [images] if torch.is_tensor(images) else images
        out = {"pool3": [], "logits": []}
        for batch in batches:
            for i in range(0, len(batch), batch_size):
                f = self(batch[i:i + batch_size])
                for k in out:
                    out[k].append(f[k].cpu())
        if not out["pool3"]:
            raise ValueError("no images given")
        return {k: torch.cat(v) for k, v in out.items()}
