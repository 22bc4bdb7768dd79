"""The metrics of an evaluation against reference statistics: FID, KID, IS, precision/recall."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..metrics import frechet_distance, inception_score, kid, precision_recall
from .features import KEEP_ROWS, FeatureSet, Reference


METRICS = ("fid", "kid", "is", "pr")


#: KID's subset size (torch-fidelity's default), reduced to the rows available
KID_SUBSET_SIZE = 1000


IS_SPLITS = 10


PR_K = 3


def parse_metrics(metrics) -> list[str]:
    """``"fid,kid"`` or a sequence of names -> a checked list, in the given order without repeats."""
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics)]
    names = list(dict.fromkeys(m for m in names if m))
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ValueError(f"unknown metric(s) {', '.join(bad) or '(none given)'}; expected a comma list of "
                         f"{', '.join(METRICS)}")
    return names


def need_features(ref: Reference, metric: str) -> np.ndarray:
    if ref.features is None:
        raise ValueError(f"{metric} needs raw reference features, but {ref.source} holds only mu/sigma; pass an "
                         f"image folder as the reference, or write the statistics with `difflab fid-stats` "
                         f"(it keeps up to {KEEP_ROWS} rows as 'features')")
    return np.asarray(ref.features, np.float64)


def compute_metrics(samples: FeatureSet, ref: Reference | None, metrics: Sequence[str]) -> dict:
    """Each requested metric as a dict holding its value(s) and the N of each set it used.

    fid: Fréchet distance of the Gaussians (Heusel et al. 2017). kid: mean/std over subsets of the
    unbiased polynomial-kernel MMD^2 (Bińkowski et al. 2018). is: Inception Score over 10 splits
    (Salimans et al. 2016) of the extractor's class logits. pr: improved precision and recall with
    k = 3 (Kynkäänniemi et al. 2019), in the chosen extractor's feature space."""
    out = {}
    for m in metrics:
        if m != "is" and ref is None:
            raise ValueError(f"{m} compares with reference statistics: pass ref=... (--ref)")
        if m == "fid":
            out[m] = {"value": frechet_distance(samples.stats.mean, samples.stats.cov, ref.mu, ref.sigma),
                      "n_samples": samples.n, "n_reference": ref.n}
        elif m == "kid":
            real = need_features(ref, m)
            size = min(KID_SUBSET_SIZE, len(samples.kept), len(real))
            mean, std = kid(samples.kept, real, subset_size=size)
            out[m] = {"mean": mean, "std": std, "n_samples": len(samples.kept), "n_reference": len(real),
                      "subset_size": size, "subsets": 100}
        elif m == "is":
            if samples.logits is None:
                raise ValueError(f"is needs class logits; the {samples.extractor} extractor has none "
                                 "(use --extractor inception or digits)")
            splits = min(IS_SPLITS, samples.n)
            mean, std = inception_score(samples.logits, splits=splits, probs=False)
            out[m] = {"mean": mean, "std": std, "n_samples": samples.n, "splits": splits}
        else:
            real = need_features(ref, m)
            precision, recall = precision_recall(real, samples.kept, k=PR_K)
            out[m] = {"precision": precision, "recall": recall, "n_samples": len(samples.kept),
                      "n_reference": len(real), "k": PR_K}
    return out
