"""Evaluation of a run: the built-in digits / shapes evaluation (``builtin``) and large-sample
evaluation against reference statistics, FID, KID, IS, precision/recall (``reference``). Both draw
the evaluation stream of ``samples`` (the same conditions and per-sample seeds).

    difflab eval --run runs/cifar --n 50000 --ref cifar-train.npz --metrics fid,kid,is,pr
    torchrun --nproc_per_node=8 -m difflab.cli eval --run runs/cifar --n 50000 --ref cifar-train.npz

Samples (the pipeline's images, in [-1, 1]) are generated in shards of ``shard_size`` sample
indices; shard k holds samples [k * shard_size, (k + 1) * shard_size) and is made by rank
k % world_size. Generation is seeded per sample index (``difflab.generate.sample_seeds``), so a
shard's content does not depend on the rank that made it, on the batch size or on the number of
ranks (up to float round-off of batched kernels, which can move a pixel by one 8-bit level).

Shards are stored quantised to 8 bits, ``round((x + 1) * 127.5)`` as uint8 -- exactly what a PNG
of the sample holds and what ``InceptionFeatures`` feeds the network: FID (Heusel et al. 2017) and
the other Inception metrics are defined on 8-bit images. Each shard is written atomically
(``shard_{k:05d}.npz``: ``images`` (m, C, H, W) uint8, ``index`` (m,), ``labels`` or ``prompts``,
and ``meta``, a JSON string with the run, the weights' SHA-256 and train step, sampler, steps,
spacing, guidance, seed, n and shard_size). The default sample folder is
``<run>/eval/samples/<settings hash>``, keyed by a hash of everything that decides the pixels
(weights, model/diffusion/data config, sampler, steps, spacing, guidance, guidance rescale, seed,
shard size; not n): a rerun with the same settings skips finished shards (resumable, and a larger
n reuses the smaller run's shards), other settings get another folder. An explicit folder that
already holds shards of other settings is refused with an error naming the differences.

Features are accumulated shard by shard in float64 :class:`~difflab.metrics.StreamingStats`, so
the N samples never sit in memory for FID. KID and precision/recall need raw features of both
sets: the first ``keep`` (default :data:`KEEP_ROWS` = 10,000) sample rows are kept (samples are
i.i.d., so the first rows are a uniform subset) and the reference keeps a seeded random subset of
as many rows. The Inception Score keeps every sample's class logits (float32; 4 KB per sample for
Inception's 1008 classes, 200 MB at N = 50,000) and follows torch-fidelity's splits.

Extractors (``--extractor``): ``inception`` (the FID network's pool3 2048-d features and its
logits for IS; resizes to 299 itself), ``digits`` (the digits evaluation classifier's 64-d
features and 10-class logits; 8x8 greyscale runs, offline), ``shapes`` (the shapes attribute
classifier's 128-d features; shapes runs, offline; no IS) and ``clip`` (CLIP image embeddings for
CLIP-FID, Kynkäänniemi et al. ICLR 2023; a local CLIP folder from ``clip=`` or
``$DIFFLAB_CLIP_PATH``; no IS). Every number is reported next to the N it was computed on: FID
and KID are biased estimators whose value depends on N (Bińkowski et al. 2018; Chong & Forsyth,
CVPR 2020).
"""
from __future__ import annotations

from .builtin import evaluate, format_metrics, plot_guidance_sweep
from .features import (EXTRACTORS, KEEP_ROWS, WITH_LOGITS, FeatureExtractor, FeatureSet, Reference, build_extractor,
                       check_extractor, load_reference, reference_stats, shard_features)
from .reference import evaluate_against_reference, format_evaluation
from .samples import (SHARD_FORMAT, ShardReport, dequantize, eval_conditions, generate_range, generate_shards,
                      quantize, read_shard, shard_path, shard_ranges, shard_settings)
from .scores import METRICS, compute_metrics, parse_metrics

__all__ = ["EXTRACTORS", "KEEP_ROWS", "METRICS", "SHARD_FORMAT", "WITH_LOGITS", "FeatureExtractor", "FeatureSet",
           "Reference", "ShardReport", "build_extractor", "check_extractor", "compute_metrics", "dequantize",
           "eval_conditions", "evaluate", "evaluate_against_reference", "format_evaluation", "format_metrics",
           "generate_range", "generate_shards", "load_reference", "parse_metrics", "plot_guidance_sweep", "quantize",
           "read_shard", "reference_stats", "shard_features", "shard_path", "shard_ranges", "shard_settings"]
