"""Sample-quality metrics."""
from .features import StreamingStats, inception_score, kid, load_npz, precision_recall, save_npz
from .frechet import frechet_distance, gaussian_stats, trace_sqrt_product
from .inception import INCEPTION_SHA256, InceptionFeatures, find_inception_weights
from .reconstruction import psnr, ssim

# heavier extractors (attribute classifier, CLIP) load on first use: ``from difflab.metrics.shapes import
# ShapesEvaluator``, ``from difflab.metrics.clip_score import CLIPScorer``

__all__ = ["frechet_distance", "gaussian_stats", "trace_sqrt_product", "kid", "inception_score",
           "precision_recall", "StreamingStats", "save_npz", "load_npz",
           "InceptionFeatures", "find_inception_weights", "INCEPTION_SHA256", "psnr", "ssim"]
