"""Feature-space metrics: Fréchet distance, KID, IS, precision/recall and streaming statistics."""
import os
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from difflab.metrics import (StreamingStats, frechet_distance, gaussian_stats, inception_score, kid,
                             load_npz, precision_recall)


def _spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


# ----------------------------------------------------------------------------- Fréchet
def test_frechet_matches_closed_form_random_spd():
    rng = np.random.default_rng(0)
    for _ in range(5):
        d = 8
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _spd(rng, d), _spd(rng, d, 3.0)
        root1 = scipy.linalg.sqrtm(s1).real
        tr_cov = np.trace(scipy.linalg.sqrtm(root1 @ s2 @ root1).real)
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_cov
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = frechet_distance(mu1, s1, mu2, s2)
        assert got == pytest.approx(expected, rel=1e-8)
        assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_commuting_diagonal_closed_form():
    rng = np.random.default_rng(1)
    d1, d2 = rng.uniform(0.1, 5, 8), rng.uniform(0.1, 5, 8)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    expected = ((mu1 - mu2) ** 2).sum() + d1.sum() + d2.sum() - 2 * np.sqrt(d1 * d2).sum()
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-8)


def test_frechet_nonsymmetric_uses_complex_eigenvalues_without_warning(monkeypatch):
    rng = np.random.default_rng(2)
    s1, s2 = _spd(rng, 8), _spd(rng, 8)
    skew = rng.standard_normal((8, 8))
    s1_ns = s1 + 1e-3 * (skew - skew.T)  # not symmetric: other tools' stats, float32 round trips ...
    mu = np.zeros(8)
    expected = np.trace(s1_ns) + np.trace(s2) - 2 * np.sqrt(np.linalg.eigvals(s1_ns @ s2).astype(complex)).sum().real
    calls = []
    eigvals = np.linalg.eigvals
    monkeypatch.setattr(np.linalg, "eigvals", lambda m: calls.append(1) or eigvals(m))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # imaginary part negligible: no warning
        got = frechet_distance(mu, s1_ns, mu, s2)
        assert calls == [1]
        frechet_distance(mu, s1, mu, s2)  # symmetric PSD input: eigh path only
    assert calls == [1]  # the non-symmetric input went through the eigenvalue path
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_indefinite_warns_and_falls_back_to_symmetric_form():
    rng = np.random.default_rng(3)
    s1 = _spd(rng, 8)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    w = rng.uniform(0.5, 2, 8)
    w[0] = -1.0  # an invalid (indefinite) covariance
    s2 = (q * w) @ q.T
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    root1 = scipy.linalg.sqrtm(s1).real
    ev = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum()
    with pytest.warns(RuntimeWarning, match="imaginary part"):
        got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=1e-8)


# ----------------------------------------------------------------------------- torch-fidelity parity
def _two_feature_sets(n=800, d=32, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d) + 0.3
    b = 1.2 * rng.standard_normal((n + 100, d)) @ rng.standard_normal((d, d)) / np.sqrt(d)
    return a, b


def test_fid_matches_torch_fidelity():
    tf_fid = pytest.importorskip("torch_fidelity.metric_fid")
    a, b = _two_feature_sets()
    s1 = tf_fid.fid_features_to_statistics(torch.from_numpy(a))
    s2 = tf_fid.fid_features_to_statistics(torch.from_numpy(b))
    ref = tf_fid.fid_statistics_to_metric(s1, s2, verbose=False)[tf_fid.KEY_METRIC_FID]
    ours = frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    assert abs(ours - ref) <= 1e-6 * abs(ref)
    # the same from float32 features (torch-fidelity's usual input), both sides given identical arrays
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    ref32 = tf_fid.fid_statistics_to_metric(tf_fid.fid_features_to_statistics(torch.from_numpy(a32).double()),
                                            tf_fid.fid_features_to_statistics(torch.from_numpy(b32).double()),
                                            verbose=False)[tf_fid.KEY_METRIC_FID]
    assert frechet_distance(*gaussian_stats(a32), *gaussian_stats(b32)) == pytest.approx(ref32, rel=1e-6)


def test_kid_matches_torch_fidelity():
    tf_kid = pytest.importorskip("torch_fidelity.metric_kid")
    a, b = _two_feature_sets()
    for seed in (0, 2020):
        ref = tf_kid.kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=20,
                                            kid_subset_size=300, rng_seed=seed, verbose=False)
        mean, std = kid(a, b, subsets=20, subset_size=300, seed=seed)
        assert mean == pytest.approx(ref[tf_kid.KEY_METRIC_KID_MEAN], rel=1e-6)
        assert std == pytest.approx(ref[tf_kid.KEY_METRIC_KID_STD], rel=1e-6)
    # non-default kernel parameters
    ref = tf_kid.kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=5, kid_subset_size=200,
                                        kid_kernel_poly_degree=2, kid_kernel_poly_gamma=0.1,
                                        kid_kernel_poly_coef0=0.5, rng_seed=7, verbose=False)
    mean, std = kid(a, b, subsets=5, subset_size=200, degree=2, gamma=0.1, coef0=0.5, seed=7)
    assert mean == pytest.approx(ref[tf_kid.KEY_METRIC_KID_MEAN], rel=1e-6)
    assert std == pytest.approx(ref[tf_kid.KEY_METRIC_KID_STD], rel=1e-6)


def test_inception_score_matches_torch_fidelity():
    tf_isc = pytest.importorskip("torch_fidelity.metric_isc")
    rng = np.random.default_rng(4)
    logits = 3 * rng.standard_normal((1003, 100)) + rng.standard_normal(100)
    for shuffle, seed in ((True, 2020), (True, 5), (False, 0)):
        ref = tf_isc.isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=shuffle, rng_seed=seed)
        mean, std = inception_score(logits, splits=10, shuffle=shuffle, seed=seed)
        assert mean == pytest.approx(ref[tf_isc.KEY_METRIC_ISC_MEAN], rel=1e-6)
        assert std == pytest.approx(ref[tf_isc.KEY_METRIC_ISC_STD], rel=1e-6)
    # probabilities give the same score as their logits (auto-detected)
    probs = torch.from_numpy(logits).softmax(1).numpy()
    assert inception_score(probs)[0] == pytest.approx(inception_score(logits)[0], rel=1e-10)


def test_inception_score_bounds():
    n, c = 500, 10
    uniform_confident = np.eye(c)[np.arange(n) % c]  # one-hot, classes balanced -> IS = C
    assert inception_score(uniform_confident, splits=5, shuffle=False)[0] == pytest.approx(c, rel=1e-12)
    assert inception_score(np.zeros((n, c)), splits=5)[0] == pytest.approx(1.0, rel=1e-12)


# ----------------------------------------------------------------------------- KID properties
def test_kid_unbiased_near_zero_and_positive_when_shifted():
    d, n = 16, 400
    same, shifted = [], []
    for seed in range(8):
        rng = np.random.default_rng(100 + seed)
        a, b, c = rng.standard_normal((n, d)), rng.standard_normal((n, d)), rng.standard_normal((n, d)) + 0.5
        same.append(kid(a, b, subsets=10, subset_size=200, seed=seed)[0])
        shifted.append(kid(a, c, subsets=10, subset_size=200, seed=seed)[0])
    same, shifted = np.array(same), np.array(shifted)
    assert abs(same.mean()) < 3 * same.std() / np.sqrt(len(same))  # unbiased: centred on 0
    assert (same < 0).any()  # an unbiased estimator goes negative sometimes
    assert shifted.min() > 10 * np.abs(same).max()


# ----------------------------------------------------------------------------- precision / recall
def _pr_bruteforce(real, fake, k):
    from scipy.spatial.distance import cdist
    rr, ff, rf = cdist(real, real), cdist(fake, fake), cdist(real, fake)
    r_rad = np.sort(rr, 1)[:, k]
    f_rad = np.sort(ff, 1)[:, k]
    return (rf <= r_rad[:, None]).any(0).mean(), (rf <= f_rad[None, :]).any(1).mean()


def test_precision_recall():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 8))
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 1000.0, k=3) == (0.0, 0.0)
    y = 1.3 * rng.standard_normal((250, 8)) + 0.3
    p, r = precision_recall(x, y, k=3)
    assert 0 < p < 1 and 0 < r < 1
    ref = _pr_bruteforce(x, y, 3)
    assert (p, r) == pytest.approx(ref, abs=1e-12)
    # tiny chunks give the same answer as one chunk
    assert precision_recall(x, y, k=3, max_bytes=8 * 300 * 7) == (p, r)


# ----------------------------------------------------------------------------- streaming statistics
def test_streaming_stats_50k_by_2048_matches_numpy():
    n, d, bs = 50_000, 2048, 1000
    rng = np.random.default_rng(6)
    batches = [rng.random((bs, d), dtype=np.float32) for _ in range(n // bs)]
    first, second = StreamingStats(), StreamingStats()
    for i, b in enumerate(batches):
        (first if i < len(batches) // 2 else second).update(torch.from_numpy(b) if i % 2 else b)
    whole = first.merge(second)
    assert whole.n == n
    x = np.concatenate(batches)
    mu, sigma = x.mean(0, dtype=np.float64), np.cov(x, rowvar=False)
    del x
    np.testing.assert_allclose(whole.mean, mu, rtol=1e-10, atol=0)
    np.testing.assert_allclose(whole.cov, sigma, rtol=1e-10, atol=1e-10 * np.abs(np.diag(sigma)).max())


def test_streaming_merge_equals_single_pass_and_all_reduce_noop():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1000, 24)) * 2 + 1
    whole = StreamingStats()
    for b in np.array_split(x, 7):
        whole.update(b)
    a, b = StreamingStats().update(x[:333]), StreamingStats().update(x[333:])
    merged = a.merge(b).all_reduce()  # torch.distributed not initialised: no-op
    assert merged.n == whole.n == 1000
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.cov, whole.cov, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(whole.cov, np.cov(x, rowvar=False), rtol=1e-11, atol=1e-12)
    assert whole.frechet_distance(a) == pytest.approx(0.0, abs=1e-8)


def _all_reduce_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x = np.random.default_rng(8).standard_normal((100, 5))
        s = StreamingStats(5).update(x[rank::world]).all_reduce()
        np.savez(os.path.join(out_dir, f"r{rank}.npz"), n=s.n, mu=s.mean, sigma=s.cov)
    finally:
        dist.destroy_process_group()


def test_streaming_all_reduce_two_ranks(tmp_path):
    torch.multiprocessing.spawn(_all_reduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    x = np.random.default_rng(8).standard_normal((100, 5))
    for rank in range(2):
        r = np.load(tmp_path / f"r{rank}.npz")
        assert int(r["n"]) == 100
        np.testing.assert_allclose(r["mu"], x.mean(0), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(r["sigma"], np.cov(x, rowvar=False), rtol=1e-11, atol=1e-14)


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(9)
    s = StreamingStats().update(rng.standard_normal((200, 6)))
    path = tmp_path / "ref_stats.npz"
    s.save_npz(path, extractor="inception-v3-compat", resize="clean")
    assert sorted(os.listdir(tmp_path)) == ["ref_stats.npz"]  # temp file replaced atomically
    d = load_npz(path)
    np.testing.assert_array_equal(d["mu"], s.mean)
    np.testing.assert_array_equal(d["sigma"], s.cov)
    assert (d["extractor"], d["resize"], d["n"]) == ("inception-v3-compat", "clean", 200)
    with np.load(path) as z:  # pytorch-fid / clean-fid readers only need these two keys
        assert z["mu"].shape == (6,) and z["sigma"].shape == (6, 6)
    back = StreamingStats.from_npz(path)
    np.testing.assert_allclose(back.cov, s.cov, rtol=1e-12)
    assert back.merge(s).n == 400
    with pytest.raises(TypeError):
        s.save_npz(tmp_path / "bad.npz", extractor=None)
    assert not (tmp_path / "bad.npz").exists()
