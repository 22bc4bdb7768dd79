import math

import pytest
import torch

from difflab.metrics import psnr, ssim


def _pair(seed=0, noise=0.2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 3, 24, 20, generator=g, dtype=torch.float64) * 2 - 1
    return x, (x + noise * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)


def test_psnr_ssim_match_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    x, y = _pair()
    ours_ssim, ours_psnr = ssim(x, y), psnr(x, y)
    for i in range(len(x)):
        a, b = x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy()
        ref = metrics.structural_similarity(a, b, data_range=2.0, channel_axis=2, gaussian_weights=True,
                                            sigma=1.5, use_sample_covariance=False)
        assert ours_ssim[i].item() == pytest.approx(ref, rel=1e-10)
        assert ours_psnr[i].item() == pytest.approx(metrics.peak_signal_noise_ratio(a, b, data_range=2.0), rel=1e-10)


def test_identity_noise_and_errors():
    x, y = _pair(noise=0.05)
    _, z = _pair(noise=0.5)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))
    assert math.isinf(psnr(x, x)[0].item())
    assert (ssim(x, y) > ssim(x, z)).all() and (psnr(x, y) > psnr(x, z)).all()
    with pytest.raises(ValueError, match="one shape"):
        ssim(x, y[:, :1])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :8, :8], y[..., :8, :8])
