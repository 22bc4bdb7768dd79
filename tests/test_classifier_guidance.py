"""Classifier guidance against a Gaussian mixture, where p(y | x, sigma) and E[x0 | x, y] are exact."""
import pytest
import torch
import torch.nn.functional as F

from difflab import Cond
from difflab.guidance import ClassifierGuidance
from difflab.nn import NoiseAwareClassifier
from difflab.train.classifier import load_classifier, noisy_accuracy, save_classifier, train_noisy_classifier
from difflab.samplers import SeededNoise, sampler_info
from difflab.schedules import EDM
from difflab.testing import GaussianMixture

MEANS = [[-2.0, 0.5], [2.0, -0.5]]
STDS = [0.5, 0.3]


def mixture():
    return GaussianMixture(MEANS, STDS, weights=[0.7, 0.3])


class MixtureClassifier:
    """Exact p(k | x, sigma) of a mixture: logits = log posterior over components (each N(mu_k, (s_k^2 + sigma^2) I))."""

    def __init__(self, gm):
        self.gm = gm

    def __call__(self, x, sigma):
        return self.gm.posterior(x, sigma).log()


def component_denoiser(gm, k, x, sigma):
    """E[x0 | x, y=k] = mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)."""
    s2 = gm.stds[k] ** 2
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
    return gm.means[k] + s2 / (s2 + sigma**2) * (x - gm.means[k])


def test_scale_one_is_the_exact_class_posterior_mean():
    gm = mixture()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64) * 3
    sigma = torch.exp(torch.randn(64, generator=g, dtype=torch.float64))  # batched, per-sample sigma
    for k in (0, 1):
        guided = ClassifierGuidance(gm, MixtureClassifier(gm), scale=1.0, target=k)
        torch.testing.assert_close(guided(x, sigma), component_denoiser(gm, k, x, sigma), atol=1e-6, rtol=1e-6)


def test_scale_zero_is_the_plain_denoiser_and_scales_are_linear():
    gm = mixture()
    x = torch.randn(8, 2, dtype=torch.float64)
    sigma = torch.tensor(0.8, dtype=torch.float64)  # a scalar sigma is broadcast to the batch
    clf = MixtureClassifier(gm)
    plain = gm(x, sigma)
    torch.testing.assert_close(ClassifierGuidance(gm, clf, 0.0, target=1)(x, sigma), plain)
    one = ClassifierGuidance(gm, clf, 1.0, target=1)(x, sigma)
    three = ClassifierGuidance(gm, clf, 3.0, target=1)(x, sigma)
    torch.testing.assert_close(three, plain + 3 * (one - plain))


def test_target_from_cond_labels_matches_explicit_targets():
    gm = mixture()
    x = torch.randn(6, 2, dtype=torch.float64)
    sigma = torch.full((6,), 1.5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    clf = MixtureClassifier(gm)
    from_cond = ClassifierGuidance(gm, clf, 2.0)(x, sigma, Cond(labels=labels))
    explicit = ClassifierGuidance(gm, clf, 2.0, target=labels)(x, sigma)
    torch.testing.assert_close(from_cond, explicit)
    for k in (0, 1):
        rows = labels == k
        torch.testing.assert_close(from_cond[rows], ClassifierGuidance(gm, clf, 2.0, target=k)(x, sigma)[rows])


def test_target_errors_name_what_was_expected():
    gm = mixture()
    x = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs a target class"):
        ClassifierGuidance(gm, MixtureClassifier(gm), 1.0)(x, torch.ones(3))
    with pytest.raises(ValueError, match=r"shape \(3,\), got shape \(2,\)"):
        ClassifierGuidance(gm, MixtureClassifier(gm), 1.0, target=torch.tensor([0, 1]))(x, torch.ones(3))
    with pytest.raises(ValueError, match=r"sigma must be a scalar or have shape \(3,\)"):
        ClassifierGuidance(gm, MixtureClassifier(gm), 1.0, target=0)(x, torch.ones(2))


def test_works_under_no_grad_and_leaks_no_graph():
    torch.manual_seed(0)
    clf = NoiseAwareClassifier(1, 3, channels=8, groups=4).eval()
    base = lambda x, sigma, cond=None: x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)  # noqa: E731
    guided = ClassifierGuidance(base, clf, 2.0, target=2)
    x = torch.randn(4, 1, 8, 8)
    sigma = torch.full((4,), 0.7, dtype=torch.float64)
    with torch.no_grad():
        out = guided(x, sigma)
    assert out.grad_fn is None and not out.requires_grad
    assert not torch.allclose(out, base(x, sigma))
    torch.testing.assert_close(out, guided(x, sigma))  # same result with grad enabled outside
    assert all(p.grad is None for p in clf.parameters())  # the classifier's weights are left alone


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m"])
def test_guided_sampling_lands_in_the_target_component(sampler):
    """The unguided mixture puts 30 % of samples in component 1; guidance puts (nearly) all there."""
    gm = mixture()
    sigmas = gm.schedule.sigmas(25, "karras")
    n = 400
    noise = SeededNoise(range(n), (2,), dtype=torch.float64)
    x = noise() * float(sigmas[0])
    fn = sampler_info(sampler).fn
    clf = MixtureClassifier(gm)
    labels = torch.arange(n) % 2
    hits = {}
    for scale in (0.0, 1.0, 4.0):
        guided = ClassifierGuidance(gm, clf, scale)
        out = fn(guided, x, sigmas, Cond(labels=labels), noise=noise, progress=False)
        hits[scale] = (gm.posterior(out, 1e-3).argmax(1) == labels).double().mean()
    assert 0.4 < hits[0.0] < 0.6 and hits[1.0] >= 0.99 and hits[4.0] == 1.0
    # at scale 1 the samples of class 1 follow component 1 itself: N(mu_1, s_1^2 I)
    out = fn(ClassifierGuidance(gm, clf, 1.0, target=1), x, sigmas, noise=noise, progress=False)
    torch.testing.assert_close(out.mean(0), gm.means[1], atol=0.05, rtol=0)
    torch.testing.assert_close(out.std(0), gm.stds[1].expand(2), atol=0.03, rtol=0)


def test_classifier_shapes_dims_and_errors():
    torch.manual_seed(0)
    for dims, shape in ((1, (2, 3, 16)), (2, (2, 3, 8, 8)), (3, (2, 3, 4, 8, 8))):
        clf = NoiseAwareClassifier(3, 5, channels=8, groups=4, dims=dims)
        assert clf(torch.randn(shape), torch.tensor([0.1, 10.0])).shape == (2, 5)
        assert clf(torch.randn(shape), 0.5).shape == (2, 5)
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 3, S, S\), got \(2, 1, 8, 8\)"):
        NoiseAwareClassifier(3, 5, channels=8, groups=4)(torch.randn(2, 1, 8, 8), 1.0)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        NoiseAwareClassifier(1, 1)


def _toy_images(n, g):
    """Two classes of 8x8 images: the bright half is the left (0) or the right (1)."""
    labels = torch.arange(n) % 2
    x = torch.full((n, 1, 8, 8), -1.0)
    x[labels == 0, :, :, :4] = 1.0
    x[labels == 1, :, :, 4:] = 1.0
    return x + 0.1 * torch.randn(x.shape, generator=g), labels


def test_training_reduces_the_loss_and_is_deterministic(tmp_path):
    g = torch.Generator().manual_seed(0)
    images, labels = _toy_images(64, g)
    kw = {"schedule": EDM(), "batch_size": 32, "lr": 3e-3, "seed": 0, "channels": 8, "groups": 4, "progress": False}
    init = train_noisy_classifier(images, labels, 2, steps=0, **kw)
    trained = train_noisy_classifier(images, labels, 2, steps=40, **kw)
    again = train_noisy_classifier(images, labels, 2, steps=40, **kw)
    sigma = torch.full((64,), 0.5, dtype=torch.float64)
    x = images + 0.5 * torch.randn(images.shape, generator=g)
    with torch.no_grad():
        loss_init = F.cross_entropy(init(x, sigma), labels)
        loss_trained = F.cross_entropy(trained(x, sigma), labels)
    assert loss_trained < 0.5 * loss_init
    assert noisy_accuracy(trained, images, labels, 0.5) >= 0.95
    for a, b in zip(trained.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    path = save_classifier(trained, tmp_path / "clf.safetensors")
    loaded = load_classifier(path)
    assert loaded.config == trained.config and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma), trained(x, sigma))
    with pytest.raises(FileNotFoundError, match="clf2.json"):
        load_classifier(tmp_path / "clf2.safetensors")


def test_training_data_errors():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        train_noisy_classifier(torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]), 2, EDM(), steps=0)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        train_noisy_classifier(torch.zeros(4, 1, 8, 8), torch.tensor([0, 1]), 2, EDM(), steps=0)
