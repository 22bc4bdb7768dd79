"""Image-to-image (SDEdit, Meng et al. 2022): noise the image to a sigma of the sampler's grid and
sample down from there; ``strength`` picks how far up the grid that is."""
from __future__ import annotations

from torch import Tensor

from ..generate import Edit


def start_index(steps: int, strength: float) -> int:
    """The grid index sampling starts at: ``steps - round(strength * steps)`` (diffusers' rule), so
    strength 1 starts at sigma_max and strength 0 takes no step at all."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    return steps - round(strength * steps)


class Img2Img(Edit):
    """Start from ``image`` (n, ...) noised with each sample's own noise at the ``strength`` sigma."""

    def __init__(self, image: Tensor, strength: float):
        self.image, self.strength = image, strength
        start_index(1, strength)  # checks it

    def grid(self, sigmas: Tensor) -> Tensor:
        k = start_index(len(sigmas) - 1, self.strength)
        if k == len(sigmas) - 1:
            raise ValueError("strength rounds to no step on this grid; strength 0 returns the image itself")
        return sigmas[k:]

    def start(self, noise, sigmas, rows):
        return self.image[rows] + float(sigmas[0]) * noise()


class FromState(Edit):
    """Start from given states ``x`` at ``sigmas[0]`` (an inversion's result), no noise drawn."""

    def __init__(self, x: Tensor):
        self.x = x

    def start(self, noise, sigmas, rows):
        return self.x[rows].clone()
