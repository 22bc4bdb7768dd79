"""ControlNet on a loaded model: hints from the shapes renderer or from user images, the base
identity an adapter run records, and sampling under control.

The network is ``nn.ControlNet`` (Zhang et al. 2023); here is what surrounds it. Hints are
(N, 1, H, W) maps in [0, 1] at image resolution: the renderer's edge map (object outlines one pixel
wide) or depth map ((z + 1) / 3 inside objects, 0 on the background). ``edge_map`` turns any image
into the first kind (Canny), so a user's picture can steer a model trained on rendered edges.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ..cond import Cond
from ..data.shapes import ShapesData
from ..nn import ControlNet, UNet
from ..runs import weights_sha256

CONTROL_KINDS = ("edges", "depth")


def hints(data: ShapesData, kind: str) -> Tensor:
    """The renderer's hint maps of ``data`` (rendered with ``maps=True``), (N, 1, H, W) in [0, 1]."""
    if kind not in CONTROL_KINDS:
        raise ValueError(f"control kind must be one of {', '.join(CONTROL_KINDS)}, got {kind!r}")
    maps = data.edges if kind == "edges" else data.depth
    if maps is None:
        raise ValueError("the shapes data has no edge or depth maps: load it with maps=True")
    return maps[:, None].float()


def edge_map(images: Tensor, sigma: float = 0.5, low: float = 0.1, high: float = 0.2) -> Tensor:
    """Canny edges (Canny 1986, scikit-image's ``feature.canny``) of images in [-1, 1], (N, C, H, W)
    -> (N, 1, H, W) in {0, 1}: a pixel is an edge where it is one in any colour channel. ``low`` and
    ``high`` are the hysteresis thresholds on the gradient magnitude of the image in [0, 1]; ``sigma``
    the Gaussian smoothing in pixels (small: a 32x32 image has few pixels to spare). The ControlNet
    preprocessor for user images, and the edge detector of the edge-control benchmark."""
    from skimage.feature import canny  # slow import, only for edge maps

    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
    out = torch.zeros(len(x), 1, *x.shape[2:], dtype=torch.bool)
    for i, image in enumerate(x):
        for channel in image:
            out[i, 0] |= torch.from_numpy(canny(channel, sigma=sigma, low_threshold=low, high_threshold=high))
    return out.float()


def build_controlnet(unet: UNet, image_size: int, grid: int) -> ControlNet:
    """A ControlNet for ``unet`` whose hints are ``image_size`` pixels wide while the U-Net's input
    grid is ``grid`` wide (the latent grid of a latent model)."""
    if image_size % grid:
        raise ValueError(f"the image size {image_size} must be a multiple of the U-Net's grid {grid}")
    return ControlNet(unet, hint_channels=1, hint_factor=image_size // grid)


def base_identity(unet: UNet, run) -> dict:
    """What an adapter run records of its base: the folder and the SHA-256 of the weights it trained on."""
    return {"path": str(run), "weights": "ema", "weights_sha256": weights_sha256(unet)}


def check_base(recorded: dict, mine: dict, where) -> None:
    """Refuse a base other than the one ``recorded`` (same folder name, other weights)."""
    if recorded["weights_sha256"] != mine["weights_sha256"]:
        raise ValueError(f"{where} is an adapter for the model trained in {recorded['path']} (weights sha256 "
                         f"{recorded['weights_sha256'][:12]}...), but the model now at {mine['path']} has sha256 "
                         f"{mine['weights_sha256'][:12]}...; point adapter.base at the original run")


def control_rows(control, n: int) -> Tensor:
    """A hint as (n, C, H, W) float: one hint (C, H, W) or (1, C, H, W) for every sample, or n of them."""
    hint = torch.as_tensor(control).float()
    if hint.ndim == 3:
        hint = hint[None]
    if hint.ndim != 4 or len(hint) not in (1, n):
        raise ValueError(f"the control image must be (C, H, W), (1, C, H, W) or ({n}, C, H, W) for {n} "
                         f"samples, got shape {tuple(hint.shape)}")
    return hint.expand(n, *hint.shape[1:])


def with_control(cond: Cond | None, null: Cond | None, control, n: int, device) -> tuple[Cond, Cond | None]:
    """(cond, null) carrying the hint: both of them, so classifier-free guidance is applied to the
    controlled model (as the paper's and diffusers' pipelines do)."""
    hint = control_rows(control, n).to(device)
    cond = replace(cond or Cond(), control=hint)
    if null is not None:
        null = replace(null.expand(n), control=hint)
    return cond, null
