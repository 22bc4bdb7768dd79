"""Memory planner: a training step's and a sampling forward's peak memory, predicted before running.

What a training process holds (as ``difflab.train.Trainer`` does, one process, no DDP):

* for the whole run: the weights (fp32, also under bf16/fp16 autocast, which casts per op), the EMA
  copy (``train/ema.py``), AdamW's ``exp_avg`` and ``exp_avg_sq`` (fp32, like the weights) and a
  4-byte ``step`` tensor per parameter tensor. With the gradients that is 4 + 4 + 4 + 8 = 20 bytes
  per parameter: Rajbhandari et al. 2020 (ZeRO, Sec. 3.1) count 16 for mixed-precision Adam with
  fp16 weights and gradients plus fp32 master weights; here the weights are the fp32 master and
  autocast's low-precision copies are transient, so the 4 bytes of fp16 copies become an EMA copy.
* the gradients, from backward until the next step's ``zero_grad(set_to_none=True)``;
* per step: the batch (x0, noise, sigma, the condition), and everything forward and backward
  allocate: the activations autograd saves for backward, the temporaries of each op, autocast's
  low-precision weight copies (cached until the forward ends), and the gradients as they appear.
  With gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost")
  only each U-Net block's inputs are saved and its activations are recomputed block by block in
  backward;
* nothing more in the optimizer step: the fused AdamW (``train.build.adamw``) updates in place.

The weights, EMA, optimizer states, gradients and batch are counted from shapes and dtypes. The
forward/backward is *simulated*: the real network and loss run on fake tensors
(``torch._subclasses.FakeTensorMode``: shapes, dtypes and devices, no data, no memory), under a
``TorchDispatchMode`` that adds up the bytes of every storage an op creates and subtracts them when
the storage is freed (a weakref finalizer on the storage, whose Python object torch keeps exactly as
long as the storage lives). Fake CPU tensors take the same code paths as real ones (autocast, the
SDPA kernel choice, checkpointing's recomputation), so the live-bytes curve is the real one, minus
what kernels allocate internally and never return (oneDNN scratchpads, the CPU flash-attention
kernel's per-thread buffers, cuDNN/cuBLAS workspaces) and minus allocator rounding and caching.

Inference (sampling) holds one set of weights (the EMA model) and, under ``no_grad``, only the
activations alive at once in one denoiser forward at ``eval.batch_size`` rows, doubled under
classifier-free guidance (``ClassifierFreeGuidance`` concatenates the conditional and the null
batch into one forward). The sampler's own state (x, a few earlier predictions) is counted as four
copies of x.

Measurements (to validate the prediction) run real training steps: on CPU the profiler's memory
events (``profile_memory=True``) give the live-bytes curve, on CUDA ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

from .inputs import (PlanError, batch_bytes, conditioning_kwargs, ema_bytes, host_extras, make_net, optimizer_bytes,
                     parameter_bytes, random_batch, random_cond, random_inputs, random_vae, vae_bytes)
from .measure import measure_inference_peak, measure_training_peak
from .plan import (MiB, InferenceEstimate, MemoryPlan, TrainingEstimate, estimate_inference, estimate_training,
                   format_plan, inference_batch, plan)
from .simulate import simulate_decode, simulate_inference, simulate_training
from .tracking import StorageTracker, module_tensors, storage_bytes

__all__ = ["InferenceEstimate", "MemoryPlan", "MiB", "PlanError", "StorageTracker", "TrainingEstimate",
           "batch_bytes", "conditioning_kwargs", "ema_bytes", "estimate_inference", "estimate_training",
           "format_plan", "host_extras", "inference_batch", "make_net", "measure_inference_peak",
           "measure_training_peak", "module_tensors", "optimizer_bytes", "parameter_bytes", "plan", "random_batch",
           "random_cond", "random_inputs", "random_vae", "simulate_decode", "simulate_inference",
           "simulate_training", "storage_bytes", "vae_bytes"]
