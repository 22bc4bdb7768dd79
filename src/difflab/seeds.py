"""Derived seeds (imports nothing from difflab): one rule for every stream that a seed spawns.

Sample ``i`` of a sampling seed, training step ``k`` of a training seed and the dropout of that
step on each rank all draw from generators seeded ``derive_seed(seed, index)``, so a stream never
depends on how the work is batched, resumed or split across ranks.
"""
from __future__ import annotations

SEED_STRIDE = 1_000_003  # a prime larger than any index used: (seed, index) pairs do not collide


def derive_seed(seed: int, index: int) -> int:
    """The seed of item ``index`` of the stream of ``seed``."""
    return seed * SEED_STRIDE + index
