"""Sample-quality metrics."""
from .frechet import frechet_distance, gaussian_stats

__all__ = ["frechet_distance", "gaussian_stats"]
