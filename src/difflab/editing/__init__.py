"""Editing with any sampler and any model, pixel or latent: inpainting (replacement, RePaint,
inpainting models), outpainting (fused windows, iterative), image-to-image and deterministic inversion. Each method is a ``generate.Edit`` (or, for inversion,
the ODE run up the grid), so it composes with every sampler, guidance and seed of ``generate``."""
from .img2img import FromState, Img2Img, start_index
from .inpaint import EDITS, Inpaint, KnownRegion, repaint_path
from .inversion import SOLVERS, invert
from .masks import (MASK_KINDS, check_image, check_mask, composite, feathered, inpainting_input, latent_mask,
                    random_masks)
from .outpaint import OUTPAINT_METHODS, WindowedDenoiser, window_starts, windows
from .pipeline import METHODS, img2img, inpaint, invert_image, outpaint, reconstruct

__all__ = ["EDITS", "FromState", "Img2Img", "Inpaint", "KnownRegion", "MASK_KINDS", "METHODS", "SOLVERS", "check_image",
           "check_mask", "composite", "feathered", "img2img", "inpaint", "inpainting_input", "invert", "invert_image",
           "latent_mask", "OUTPAINT_METHODS", "outpaint", "random_masks", "reconstruct", "repaint_path", "start_index",
           "WindowedDenoiser", "window_starts", "windows"]
