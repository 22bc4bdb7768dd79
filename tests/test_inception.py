"""Offline tests of the torch-fidelity Inception wrapper, with a random-weight fake checkpoint."""
import hashlib

import numpy as np
import pytest
import torch

tfi = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric  # noqa: E402

from difflab.metrics import frechet_distance, gaussian_stats  # noqa: E402
from difflab.metrics.inception import (  # noqa: E402
    INCEPTION_ENV_VAR, INCEPTION_FILENAME, INCEPTION_SHA256, INCEPTION_URL, InceptionFeatures,
    find_inception_weights)


@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory):
    """A randomly initialised torch-fidelity InceptionV3 state dict saved to a file, and its sha256.

    torch-fidelity loads weights inside __init__ (downloading when no path is given), so the
    download function and load_state_dict are patched out while one instance is built."""
    def no_download(*a, **k):
        return {}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tfi, "load_state_dict_from_url", no_download)
        mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # variance-preserving init so activations neither vanish nor blow up
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / m.in_features ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILENAME
    torch.save(net.state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model(fake_weights):
    path, digest = fake_weights
    return InceptionFeatures(path, sha256=digest)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No env var, and an empty torch hub dir."""
    monkeypatch.delenv(INCEPTION_ENV_VAR, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub"


def images(n, c=3, size=32, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, c, size, size, generator=g) * 2 - 1 + shift).clamp(-1, 1)


def test_constants_match_torch_fidelity():
    assert INCEPTION_URL == tfi.URL_INCEPTION_V3
    assert INCEPTION_URL.rsplit("/", 1)[-1] == INCEPTION_FILENAME
    # torch-hub file names carry the first 8 hex digits of the file's sha256
    assert INCEPTION_FILENAME.rsplit("-", 1)[-1].split(".")[0] == INCEPTION_SHA256[:8]
    assert len(INCEPTION_SHA256) == 64 and int(INCEPTION_SHA256, 16) >= 0


def test_explicit_path(fake_weights, clean_env):
    path, digest = fake_weights
    assert find_inception_weights(path, sha256=digest) == path
    assert find_inception_weights(str(path), sha256=None) == path


def test_env_var(fake_weights, clean_env, monkeypatch):
    path, digest = fake_weights
    monkeypatch.setenv(INCEPTION_ENV_VAR, str(path))
    assert find_inception_weights(sha256=digest) == path


def test_torch_hub_cache(fake_weights, monkeypatch, tmp_path):
    path, digest = fake_weights
    monkeypatch.delenv(INCEPTION_ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))  # torch.hub.get_dir() honours it
    ckpt = tmp_path / "th" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / INCEPTION_FILENAME).symlink_to(path)
    found = find_inception_weights(sha256=digest)
    assert found == ckpt / INCEPTION_FILENAME


def test_explicit_path_beats_env(fake_weights, clean_env, monkeypatch, tmp_path):
    path, digest = fake_weights
    monkeypatch.setenv(INCEPTION_ENV_VAR, str(tmp_path / "nope.pth"))
    assert find_inception_weights(path, sha256=digest) == path


def test_wrong_hash(fake_weights, clean_env):
    path, digest = fake_weights
    with pytest.raises(ValueError) as e:
        find_inception_weights(path, sha256="0" * 64)
    assert "0" * 64 in str(e.value) and digest in str(e.value)
    with pytest.raises(ValueError):  # default: the official hash, which a random file cannot have
        InceptionFeatures(path)


def test_missing_everywhere(clean_env):
    with pytest.raises(FileNotFoundError) as e:
        find_inception_weights()
    msg = str(e.value)
    assert INCEPTION_ENV_VAR in msg and INCEPTION_FILENAME in msg
    assert str(clean_env / "checkpoints" / INCEPTION_FILENAME) in msg


def test_env_var_pointing_nowhere(clean_env, monkeypatch, tmp_path):
    monkeypatch.setenv(INCEPTION_ENV_VAR, str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        find_inception_weights()
    with pytest.raises(FileNotFoundError, match=INCEPTION_FILENAME):
        find_inception_weights(tmp_path / "other.pth")


def test_features_shapes_and_determinism(model):
    x = images(4)
    f = model(x)
    assert set(f) == {"pool3", "logits"}
    assert f["pool3"].shape == (4, 2048) and f["logits"].shape == (4, 1008)
    assert f["pool3"].dtype == torch.float64 and f["logits"].dtype == torch.float64
    assert torch.isfinite(f["pool3"]).all() and f["pool3"].std() > 0
    g = model(x.clone())
    assert torch.equal(f["pool3"], g["pool3"]) and torch.equal(f["logits"], g["logits"])
    # batched helper agrees with one big batch (per-image computation is batch-independent)
    h = model.extract(x, batch_size=3)
    torch.testing.assert_close(h["pool3"], f["pool3"], rtol=1e-5, atol=1e-6)
    # same as driving torch-fidelity directly with the uint8 images
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    pool3, logits_unbiased = model.net(u8)
    assert torch.equal(f["pool3"], pool3.double()) and torch.equal(f["logits"], logits_unbiased.double())


def test_greyscale(model):
    x = images(2, c=1, size=20)
    f = model(x)
    assert f["pool3"].shape == (2, 2048)
    assert torch.equal(f["pool3"], model(x.repeat(1, 3, 1, 1))["pool3"])


def test_input_errors(model):
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="channels"):
        model(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model(torch.full((1, 3, 8, 8), 2.0))
    with pytest.raises(ValueError, match="NaN"):
        model(torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(TypeError):
        model(torch.zeros(1, 3, 8, 8, dtype=torch.int32))


def _both_fids(a, b):
    ours = frechet_distance(*gaussian_stats(a.numpy()), *gaussian_stats(b.numpy()))
    theirs = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b),
                                      verbose=False)["frechet_inception_distance"]
    return ours, theirs


def test_fid_matches_torch_fidelity(model):
    a = model.extract(images(8, seed=1), batch_size=4)["pool3"]
    b = model.extract(images(8, seed=2, shift=0.5), batch_size=4)["pool3"]
    c = model.extract(images(8, seed=3), batch_size=8)["pool3"]
    ours, theirs = _both_fids(a, b)  # different distributions (measured rel. diff ~3e-9)
    assert np.isfinite(ours) and ours > 0
    assert abs(ours - theirs) <= 1e-6 * abs(theirs), (ours, theirs)
    # same distribution: the tr sqrt(S1 S2) term dominates. With 8 samples in 2048 dims the
    # covariances have rank 7, and torch-fidelity's eigvals of S1 S2 keeps sqrt of the ~1e-16
    # round-off eigenvalues while our eigh path clips them; measured rel. diff ~4e-7, still <= 1e-6.
    ours, theirs = _both_fids(a, c)
    assert np.isfinite(ours) and ours > 0
    assert abs(ours - theirs) <= 1e-6 * abs(theirs), (ours, theirs)
