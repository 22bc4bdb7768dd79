"""The procedural shapes world: determinism, masks/edges/depth against pixels, captions, resolution."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from difflab.data.shapes import (BACKGROUND_RGB, COLOUR_RGB, COLOURS, MAX_OBJECTS, POSITIONS, SHAPES, Scene,
                                 ShapeObject, ShapesWorld, caption, load_shapes, prompt, render, sample_scene)


def _erode(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood lies inside ``mask`` (outside the image counts as outside)."""
    return ~_dilate(~mask, outside=1.0)


def _dilate(mask: torch.Tensor, outside: float = 0.0) -> torch.Tensor:
    padded = F.pad(mask.float()[None], (1, 1, 1, 1), value=outside)
    return F.max_pool2d(padded, 3, 1)[0] > 0.5


def test_same_seed_same_scenes_other_seed_other_scenes():
    a, b = load_shapes(20, 16, seed=3, maps=True), load_shapes(20, 16, seed=3, maps=True)
    for field in ("images", "shapes", "colours", "sizes", "positions", "counts", "masks", "edges", "depth"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.captions == b.captions
    c = load_shapes(20, 16, seed=4)
    assert not torch.equal(a.images, c.images) and a.captions != c.captions


def test_world_index_is_independent_of_what_was_rendered_before():
    world = ShapesWorld(16, seed=5)
    late = world[7]
    data = world.load(10)
    assert torch.equal(data.images[7], late["image"]) and data.captions[7] == late["caption"]
    assert torch.equal(world.load(3, start=7).images[0], late["image"])
    assert world.scene(7) == late["scene"]


def test_attribute_tensors_describe_the_scenes():
    data = load_shapes(30, 16, seed=1)
    assert data.images.shape == (30, 3, 16, 16) and data.images.dtype == torch.float32
    assert data.images.min() >= -1 and data.images.max() <= 1
    for i, scene in enumerate(data.scenes):
        k = len(scene.objects)
        assert data.counts[i] == k and (data.shapes[i, k:] == -1).all() and (data.positions[i, k:] == -1).all()
        for j, o in enumerate(scene.objects):
            assert (SHAPES[data.shapes[i, j]], COLOURS[data.colours[i, j]]) == (o.shape, o.colour)
            assert POSITIONS[data.places[i, j]] == o.position and o.z == j
            assert data.positions[i, j].tolist() == pytest.approx([o.x, o.y])
        assert len({o.colour for o in scene.objects}) == k  # colours are distinct within a scene
    assert set(data.counts.tolist()) == {1, 2, 3}


@pytest.mark.parametrize("size", [16, 32])
def test_masks_agree_with_pixels(size):
    data = load_shapes(40, size, seed=2, maps=True)
    background = torch.from_numpy(BACKGROUND_RGB * 2 - 1)[:, None]
    for i, scene in enumerate(data.scenes):
        image, masks = data.images[i], data.masks[i]
        assert (masks.sum(0) <= 1).all()  # disjoint
        for k, o in enumerate(scene.objects):
            assert masks[k].any()  # every object stays visible
            inner = _erode(masks[k])
            colour = torch.from_numpy(COLOUR_RGB[COLOURS.index(o.colour)] * 2 - 1)[:, None]
            assert torch.allclose(image[:, inner], colour.expand(-1, int(inner.sum())), atol=1e-5)
        far = ~_dilate(_dilate(masks.any(0)))  # a triangle's tip can cover < half of two pixels in a row
        assert torch.allclose(image[:, far], background.expand(-1, int(far.sum())), atol=1e-5)
        assert masks[len(scene.objects):].sum() == 0


def test_edges_lie_on_mask_boundaries_and_depth_follows_z_order():
    data = load_shapes(40, 32, seed=6, maps=True)
    for i, scene in enumerate(data.scenes):
        masks, edges, depth = data.masks[i], data.edges[i], data.depth[i]
        label = torch.full(edges.shape, -1)
        for k in range(len(scene.objects)):
            label[masks[k]] = k
        expected = torch.where(label >= 0, (label + 1).float() / MAX_OBJECTS, torch.zeros(()))
        assert torch.equal(depth, expected)
        assert set(edges.unique().tolist()) <= {0.0, 1.0} and edges.sum() > 0
        # every edge pixel has a 4-neighbour with another label; flat regions carry no edges
        padded = F.pad(label[None].float(), (1, 1, 1, 1), mode="replicate")[0]
        neighbours = torch.stack([padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        boundary = (neighbours != label.float()).any(0)
        assert (edges[~boundary] == 0).all()
        assert (edges[label < 0] == 0).all()  # drawn on the nearer side: never on the background
        for k in range(len(scene.objects)):
            outline = masks[k] & ~_erode(masks[k]) & (boundary)
            interior = _erode(_erode(masks[k]))
            assert (edges[interior] == 0).all()
            # against the background, every outline pixel of an object is an edge
            against_bg = masks[k] & (neighbours == -1).any(0)
            assert (edges[against_bg] == 1).all() and outline.any()


def test_render_occlusion_later_objects_in_front():
    back = ShapeObject("square", "red", "large", 0.5, 0.5, 0)
    front = ShapeObject("circle", "blue", "small", 0.5, 0.5, 1)
    out = render(Scene((back, front)), 32)
    centre = out["image"][:, 16, 16]
    assert torch.allclose(centre, torch.from_numpy(COLOUR_RGB[COLOURS.index("blue")] * 2 - 1))
    assert out["masks"][1, 16, 16] and not out["masks"][0, 16, 16]
    assert out["masks"][0].sum() > 0 and out["depth"][16, 16] == 2 / MAX_OBJECTS
    assert out["label"][0, 0] == -1 and out["depth"][0, 0] == 0


@pytest.mark.parametrize("seed", range(3))
def test_low_resolution_is_the_high_resolution_pooled(seed):
    world_lo, world_hi = ShapesWorld(16, seed=seed), ShapesWorld(64, seed=seed)
    for i in range(10):
        lo, hi = world_lo[i]["image"], world_hi[i]["image"]
        pooled = F.avg_pool2d(hi[None], 4)[0]
        diff = (lo - pooled).abs()
        assert diff.mean() < 0.015 and diff.max() < 0.25  # sub-sampling error at boundaries only


def test_captions_name_every_object():
    data = load_shapes(300, 8, seed=0)
    for scene, text in zip(data.scenes, data.captions):
        for o in scene.objects:
            assert f"{o.colour} {o.shape}" in text
    singles = [t for s, t in zip(data.scenes, data.captions) if len(s.objects) == 1]
    short = [t for s, t in zip(data.scenes, data.captions)
             if len(s.objects) == 1 and t == prompt(s.objects[0].colour, s.objects[0].shape)]
    assert len(short) >= 0.35 * len(singles)  # the prompt form is the commonest single-object caption
    assert any(" on the " in t or " in the centre" in t for t in singles)
    assert any(" left of " in t or " right of " in t or " above " in t or " below " in t for t in data.captions)


def test_caption_relations_are_true():
    rng = np.random.default_rng(0)
    a = ShapeObject("circle", "red", "small", 0.2, 0.5, 0)
    b = ShapeObject("square", "blue", "small", 0.8, 0.5, 1)
    texts = {caption(Scene((a, b)), rng) for _ in range(60)}
    assert "a red circle left of a blue square" in texts and "a blue square right of a red circle" in texts
    assert not any("red circle right of" in t or "blue square left of" in t for t in texts)
    assert prompt("green", "triangle") == "a green triangle"


def test_render_caption_is_fixed_by_the_scene():
    scene = sample_scene(np.random.default_rng(1))
    assert render(scene, 16)["caption"] == render(scene, 32)["caption"]


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="min_objects <= max_objects"):
        ShapesWorld(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="max_objects <= 3"):
        load_shapes(2, max_objects=4)
    with pytest.raises(ValueError, match="1 <= min_objects"):
        sample_scene(np.random.default_rng(0), 0, 2)
    with pytest.raises(ValueError, match="image size must be an integer >= 8, got 4"):
        ShapesWorld(image_size=4)
    with pytest.raises(ValueError, match="image size"):
        render(sample_scene(np.random.default_rng(0)), 7)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        ShapesWorld(seed=-1)
    with pytest.raises(ValueError, match="scene index must be a non-negative integer"):
        ShapesWorld()[-1]
    with pytest.raises(ValueError, match="number of scenes must be >= 1"):
        load_shapes(0)
    with pytest.raises(ValueError, match="colour must be one of"):
        prompt("purple", "circle")
    with pytest.raises(ValueError, match="shape must be one of"):
        prompt("red", "hexagon")  # "star" is a shape since the LoRA issue (NEW_SHAPES)
    with pytest.raises(ValueError, match="expected one of .*'huge'"):
        ShapeObject("circle", "red", "huge", 0.5, 0.5, 0)
    red = ShapeObject("circle", "red", "small", 0.5, 0.5, 1)
    with pytest.raises(ValueError, match=r"back to front with z = 0, 1, ..., got z = \[1\]"):
        Scene((red,))
    with pytest.raises(ValueError, match="a scene holds 1 to 3 objects, got 0"):
        Scene(())
