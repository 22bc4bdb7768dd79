"""Editing with any sampler and any model, pixel or latent: inpainting (replacement, RePaint,
inpainting models), outpainting (fused windows, iterative), image-to-image, deterministic and
null-text inversion, and prompt-to-prompt. Each method is a ``generate.Edit`` (or, for inversion,
the ODE run up the grid), so it composes with every sampler, guidance and seed of ``generate``."""
from .img2img import FromState, Img2Img, start_index
from .inpaint import EDITS, Inpaint, KnownRegion, repaint_path
from .inversion import SOLVERS, NullTextReconstruction, StepNullGuidance, invert, null_text_invert
from .masks import (MASK_KINDS, check_image, check_mask, composite, feathered, inpainting_input, latent_mask,
                    random_masks)
from .outpaint import OUTPAINT_METHODS, WindowedDenoiser, window_starts, windows
from .pipeline import (METHODS, PROMPT_EDIT_OPTIONS, edit_prompt, img2img, inpaint, invert_image, invert_null_text,
                       outpaint, reconstruct)
from .prompt2prompt import AttentionControl, PromptEdit, PromptToPrompt, TokenMap, token_map

__all__ = ["AttentionControl", "EDITS", "FromState", "Img2Img", "Inpaint", "KnownRegion", "MASK_KINDS", "METHODS",
           "NullTextReconstruction", "OUTPAINT_METHODS", "PROMPT_EDIT_OPTIONS", "PromptEdit", "PromptToPrompt", "SOLVERS",
           "StepNullGuidance", "TokenMap", "WindowedDenoiser", "check_image", "check_mask", "composite", "edit_prompt",
           "feathered", "img2img", "inpaint", "inpainting_input", "invert", "invert_image", "invert_null_text",
           "latent_mask", "null_text_invert", "outpaint", "random_masks", "reconstruct", "repaint_path", "start_index",
           "token_map", "window_starts", "windows"]
