import pytest
import torch

from difflab.config import load_config

TINY = ["model.channels=16", "model.groups=4", "model.num_res_blocks=1", "model.head_dim=16",
        "train.batch_size=16", "train.steps=4", "train.warmup=2", "train.checkpoint_every=2",
        "train.sample_every=0", "train.log_every=1", "eval.steps=4", "eval.n_samples=40"]


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*overrides):
        return load_config(None, TINY + [f"out={tmp_path / 'run'}", *overrides])
    return make


class GaussianDenoiser(torch.nn.Module):
    """Exact x0-posterior mean for data x0 ~ N(mu, s^2 I): D = mu + s^2/(s^2+sigma^2) (x - mu)."""

    def __init__(self, mu=0.3, s=0.7, schedule=None):
        super().__init__()
        self.mu, self.s, self.schedule = mu, s, schedule

    def forward(self, x, sigma, cond=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)
