"""The shapes attribute classifier and evaluator: caching, alignment of real renders, input checks."""
import pytest
import torch

from difflab.data.shapes import COLOURS, SHAPES, load_shapes
from difflab.metrics import shapes as shapes_metrics
from difflab.metrics.shapes import HEADS, ShapesEvaluator, ShapesTraining, targets, train_classifier

#: a moderately trained 16 px classifier (single objects only, no blur augmentation; ~8 s on one core)
QUICK = ShapesTraining(steps=400, batch_size=32, singles_steps=400, blur=0.0, noise=0.1)
TINY = ShapesTraining(steps=4, batch_size=8)


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield ShapesEvaluator(16, seed=0, training=QUICK, n_reference=300)


@pytest.fixture(scope="module")
def heldout():
    return load_shapes(400, 16, seed=123, max_objects=1)


def test_targets_mark_every_object():
    data = load_shapes(50, 8, seed=0)
    t = targets(data)
    assert set(t) == set(HEADS)
    assert torch.equal(t["colour"].sum(1).long(), data.counts) and torch.equal(t["pair"].sum(1).long(), data.counts)
    assert torch.equal(t["count"], data.counts - 1)
    i = int((data.counts == 1).nonzero()[0])
    c, s = int(data.colours[i, 0]), int(data.shapes[i, 0])
    assert t["pair"][i, c * len(SHAPES) + s] == 1 and t["shape"][i, s] == 1


def test_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    first = ShapesEvaluator(8, seed=3, training=TINY, n_reference=20)
    assert not first.loaded_from_cache
    files = list((tmp_path / "shapes").glob("classifier-8px-*.safetensors"))
    assert len(files) == 1 and not list((tmp_path / "shapes").glob(".*.tmp"))

    def no_training(*args, **kwargs):
        raise AssertionError("a cache hit must not train")

    monkeypatch.setattr(shapes_metrics, "train_classifier", no_training)
    second = ShapesEvaluator(8, seed=3, training=TINY, n_reference=20)
    assert second.loaded_from_cache
    images = load_shapes(10, 8, seed=9).images
    for head, value in first.logits(images).items():
        assert torch.equal(value, second.logits(images)[head]), head
    other = shapes_metrics.cache_path(8, 4, TINY)  # another seed is another key
    assert other != files[0] and shapes_metrics.cache_path(8, 3, TINY) == files[0]


def test_unreadable_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    path = shapes_metrics.cache_path(8, 0, TINY)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(RuntimeWarning, match="could not load cached shapes classifier"):
        _, cached = shapes_metrics.load_or_train_classifier(8, 0, TINY)
    assert not cached and shapes_metrics.load_or_train_classifier(8, 0, TINY)[1]


def test_training_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = train_classifier(8, seed=1, training=TINY), train_classifier(8, seed=1, training=TINY)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_real_renders_align_with_their_attributes(evaluator, heldout):
    colours, shapes = heldout.colours[:, 0], heldout.shapes[:, 0]
    got = evaluator.alignment(heldout.images, colours, shapes)
    assert got["colour_accuracy"] >= 0.95
    assert got["shape_accuracy"] >= 0.9 and got["both_accuracy"] >= 0.9  # chance: 0.25 and 1/28
    assert got["single_object_rate"] >= 0.9
    names = [COLOURS[c] for c in colours]
    assert evaluator.alignment(heldout.images, names, [SHAPES[s] for s in shapes]) == got
    red = evaluator.contains_colour(heldout.images, "red")
    assert red.dtype == torch.bool and ((red == (colours == COLOURS.index("red"))).float().mean() >= 0.95)
    assert evaluator.contains_shape(heldout.images, "circle").shape == (len(heldout),)


def test_noise_scores_near_chance(evaluator, heldout):
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(heldout.images.shape, generator=g) * 2 - 1
    colours = torch.randint(len(COLOURS), (len(noise),), generator=g)
    shapes = torch.randint(len(SHAPES), (len(noise),), generator=g)
    got = evaluator.score(noise, colours, shapes)
    assert got["colour_accuracy"] < 0.35 and got["both_accuracy"] < 0.2  # chance: 1/7 and 1/28
    refs = evaluator.references()
    assert 0 <= refs["frechet_floor"] < 0.2 * got["frechet"]
    assert refs["frechet_noise"] == pytest.approx(evaluator.frechet(torch.rand(
        300, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1))
    assert evaluator.frechet(heldout.images) < 0.2 * got["frechet"]
    assert refs["classifier_colour_accuracy"] >= 0.95
    assert evaluator.features(heldout.images[:5]).shape == (5, shapes_metrics.FEATURES)


def test_bad_inputs_are_rejected(evaluator):
    good = torch.zeros(2, 3, 16, 16)
    for bad in (torch.zeros(2, 3, 32, 32), torch.zeros(2, 1, 16, 16), torch.zeros(3, 16, 16), good.numpy()):
        with pytest.raises(ValueError, match=r"images must be a \(N, 3, 16, 16\) tensor in \[-1, 1\], got"):
            evaluator.features(bad)
    with pytest.raises(ValueError, match="need one colour per image"):
        evaluator.alignment(good, ["red"], ["circle", "square"])
    with pytest.raises(ValueError, match="colours must be names from"):
        evaluator.alignment(good, ["red", "purple"], ["circle", "square"])
    with pytest.raises(ValueError, match=r"shape indices must lie in \[0, 4\)"):
        evaluator.alignment(good, "red", torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="shapes must be names from"):
        evaluator.contains_shape(good, "star")
    with pytest.raises(ValueError, match="n_reference must be >= 2"):
        ShapesEvaluator(16, training=QUICK, n_reference=1)


def test_gaussian_blur_per_image():
    x = torch.randn(3, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    y = shapes_metrics.gaussian_blur(x, torch.tensor([0.0, 0.7, 1.0]))
    assert torch.allclose(y[0], x[0]) and not torch.allclose(y[1], x[1])
    assert y[2].std() < y[1].std() < x[1].std()  # wider blur, smoother image
    flat = torch.full((1, 3, 9, 9), 0.3)
    assert torch.allclose(shapes_metrics.gaussian_blur(flat, torch.tensor([1.0])), flat)
