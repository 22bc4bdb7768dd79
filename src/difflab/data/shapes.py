"""A procedural world of 1-3 flat coloured shapes with captions, attributes, masks, edges and depth.

Every scene is drawn from ``np.random.default_rng([seed, index])`` and rendered analytically at
any resolution: point-in-shape tests on the sub-pixel centres of a grid at least ``SUPERSAMPLE``
times finer (and at least ``SUPERSAMPLED_SIDE`` wide), averaged down (box-filter anti-aliasing),
so a 16x16 render is the 64x64 render average-pooled up to sub-sampling error at boundaries.
Nothing is downloaded and there is no end to the samples.

Conventions
  * coordinates ``x`` (column) and ``y`` (row, downwards) are fractions of the image side in [0, 1];
  * objects are listed back to front: object ``k`` has z-order ``k`` and covers objects ``< k``;
  * an object's ``radius`` is its *equal-area* radius (area = pi r^2 for every shape), so size is
    carried by area and shape only by outline; objects lie entirely inside the image;
  * colours within a scene are distinct (captions can then name objects unambiguously), and a
    centre distance of at least ``MIN_SEPARATION * (r_i + r_j)`` keeps every object mostly visible
    (for two circles at the limit at most ~14% of the farther one is hidden);
  * the coarse position is one of three horizontal bins (thirds) of the object's centre ``x``;
  * the background is a fixed dark grey.
"""
from __future__ import annotations

import functools
import itertools
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

#: bump when renders change, so caches keyed on it (e.g. the attribute classifier) are rebuilt
RENDERER_VERSION = 1

SHAPES = ("circle", "square", "triangle", "diamond")
#: shapes the default world never draws: new concepts for fine-tuning (a LoRA learns "star" from a few renders)
NEW_SHAPES = ("star",)
ALL_SHAPES = SHAPES + NEW_SHAPES
#: RGB in [0, 1]; pairwise distances >= 0.8 so colours stay apart after anti-aliasing and noise
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white")
COLOUR_RGB = np.array([
    [0.90, 0.10, 0.10],  # red
    [0.10, 0.80, 0.10],  # green
    [0.15, 0.25, 1.00],  # blue
    [0.95, 0.90, 0.10],  # yellow
    [0.90, 0.10, 0.90],  # magenta
    [0.10, 0.85, 0.90],  # cyan
    [0.95, 0.95, 0.95],  # white
], dtype=np.float32)
BACKGROUND_RGB = np.array([0.10, 0.10, 0.10], dtype=np.float32)
SIZES = ("small", "large")
#: equal-area radius as a fraction of the image side (small: ~2.7 px at 16x16, still recognisable)
SIZE_RADIUS = (0.17, 0.27)
POSITIONS = ("left", "centre", "right")
POSITION_PHRASE = {"left": "on the left", "centre": "in the centre", "right": "on the right"}
MAX_OBJECTS = 3
MIN_IMAGE_SIZE = 8
#: sub-samples per pixel side: at least SUPERSAMPLE, and enough for a grid of SUPERSAMPLED_SIDE
#: (so small renders anti-alias as finely as a 32x32 one, at the same cost)
SUPERSAMPLE = 4
SUPERSAMPLED_SIDE = 128
#: minimum centre distance as a fraction of the sum of the two equal-area radii
MIN_SEPARATION = 0.8
#: centre offset (fraction of the side) needed before a caption says "left of" / "above" ...
RELATION_MARGIN = 0.15
#: rejection-sampling tries per object before the whole scene is redrawn
PLACEMENT_TRIES = 100

# Outline of each shape relative to its equal-area radius r:
#   square: half-side r sqrt(pi)/2; diamond: half-diagonal r sqrt(pi/2);
#   triangle (equilateral, apex up, centred on its centroid): circumradius r sqrt(4 pi / (3 sqrt 3));
#   star (five points, apex up, inner radius half the outer R): area 5 R (R / 2) sin(pi / 5) = pi r^2.
_SQUARE = np.sqrt(np.pi) / 2
_DIAMOND = np.sqrt(np.pi / 2)
_TRIANGLE = np.sqrt(4 * np.pi / (3 * np.sqrt(3)))
_STAR_INNER = 0.5
_STAR = np.sqrt(np.pi / (5 * _STAR_INNER * np.sin(np.pi / 5)))
#: extent of each shape from its centre as multiples of r: (half-width, above, below)
_EXTENT = {"circle": (1.0, 1.0, 1.0), "square": (_SQUARE,) * 3, "diamond": (_DIAMOND,) * 3,
           "triangle": (_TRIANGLE * np.sqrt(3) / 2, _TRIANGLE, _TRIANGLE / 2),
           "star": (_STAR * np.cos(np.pi / 10), _STAR, _STAR * np.cos(np.pi / 5))}


@dataclass(frozen=True)
class ShapeObject:
    """One object: vocabulary words, centre (x, y) as fractions of the side, z-order (0 = farthest)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    z: int

    def __post_init__(self):
        for value, vocab in ((self.shape, ALL_SHAPES), (self.colour, COLOURS), (self.size, SIZES)):
            if value not in vocab:
                raise ValueError(f"expected one of {vocab}, got {value!r}")

    @property
    def radius(self) -> float:
        return SIZE_RADIUS[SIZES.index(self.size)]

    @property
    def position(self) -> str:
        """The coarse position: which third of the image holds the centre."""
        return POSITIONS[min(int(self.x * 3), 2)]


@dataclass(frozen=True)
class Scene:
    """Objects back to front; ``objects[k].z == k``."""

    objects: tuple[ShapeObject, ...]

    def __post_init__(self):
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        if [o.z for o in self.objects] != list(range(len(self.objects))):
            raise ValueError(f"objects must be listed back to front with z = 0, 1, ..., "
                             f"got z = {[o.z for o in self.objects]}")


def _check_counts(min_objects: int, max_objects: int) -> None:
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
                         f"got min_objects={min_objects}, max_objects={max_objects}")


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be an integer >= {MIN_IMAGE_SIZE}, got {size!r}")


def _draw_object(rng: np.random.Generator, colour: str, z: int, shapes: tuple[str, ...] = SHAPES) -> ShapeObject:
    """Uniform shape and size; centre uniform over the positions keeping the shape inside the image."""
    shape, size = shapes[rng.integers(len(shapes))], SIZES[rng.integers(len(SIZES))]
    r = SIZE_RADIUS[SIZES.index(size)]
    half, above, below = (r * e for e in _EXTENT[shape])
    x, y = rng.uniform(half, 1 - half), rng.uniform(above, 1 - below)
    return ShapeObject(shape, colour, size, float(x), float(y), z)


def _separated(obj: ShapeObject, others) -> bool:
    return all(np.hypot(obj.x - o.x, obj.y - o.y) >= MIN_SEPARATION * (obj.radius + o.radius) for o in others)


def sample_scene(rng: np.random.Generator, min_objects: int = 1, max_objects: int = 3,
                 shapes: tuple[str, ...] = SHAPES) -> Scene:
    """A scene of ``min_objects..max_objects`` (uniform) objects of ``shapes`` with distinct colours.

    Objects are placed by rejection sampling against ``MIN_SEPARATION``; a crowded scene (e.g.
    three large triangles cannot fit) is redrawn, so multi-object scenes lean towards small objects.
    """
    _check_counts(min_objects, max_objects)
    count = int(rng.integers(min_objects, max_objects + 1))
    colours = [COLOURS[c] for c in rng.choice(len(COLOURS), size=count, replace=False)]
    while True:
        objects: list[ShapeObject] = []
        for z, colour in enumerate(colours):
            for _ in range(PLACEMENT_TRIES):
                obj = _draw_object(rng, colour, z, shapes)
                if _separated(obj, objects):
                    objects.append(obj)
                    break
            else:
                break
        if len(objects) == count:
            return Scene(tuple(objects))


# ----------------------------------------------------------------------------- captions
def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def prompt(colour: str, shape: str) -> str:
    """The canonical short prompt ``"a {colour} {shape}"`` (the commonest single-object caption)."""
    if colour not in COLOURS:
        raise ValueError(f"colour must be one of {COLOURS}, got {colour!r}")
    if shape not in ALL_SHAPES:
        raise ValueError(f"shape must be one of {ALL_SHAPES}, got {shape!r}")
    return _a(f"{colour} {shape}")


def _noun(obj: ShapeObject, with_size: bool) -> str:
    return _a(f"{obj.size} {obj.colour} {obj.shape}" if with_size else f"{obj.colour} {obj.shape}")


def _relation(a: ShapeObject, b: ShapeObject) -> str | None:
    """``a`` relative to ``b`` along the dominant axis, or None when they are too close to tell."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy) and abs(dx) > RELATION_MARGIN:
        return "left of" if dx > 0 else "right of"
    if abs(dy) > abs(dx) and abs(dy) > RELATION_MARGIN:
        return "above" if dy > 0 else "below"  # y grows downwards
    return None


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming every object's colour and shape, in a form drawn from ``rng``.

    One object: half the time the canonical ``prompt`` form ("a red circle"), otherwise with its
    size and/or coarse position ("a small red circle on the left"). Two objects: a spatial relation
    when one is clear ("a red circle left of a blue square"), else a list. Three: a list, ordered
    left to right (and said so) when the centres are well apart.
    """
    objs = scene.objects
    with_size = bool(rng.random() < 0.3)
    if len(objs) == 1:
        o = objs[0]
        form = int(rng.integers(4))  # 0, 1: short; 2: size; 3: position (+ size half the time)
        if form < 2:
            return prompt(o.colour, o.shape)
        if form == 2:
            return _noun(o, True)
        return f"{_noun(o, bool(rng.random() < 0.5))} {POSITION_PHRASE[o.position]}"
    order = [objs[i] for i in rng.permutation(len(objs))]
    if len(objs) == 2 and rng.random() < 0.7 and (rel := _relation(*order)) is not None:
        return f"{_noun(order[0], with_size)} {rel} {_noun(order[1], with_size)}"
    by_x = sorted(objs, key=lambda o: o.x)
    if rng.random() < 0.5 and all(b.x - a.x > RELATION_MARGIN for a, b in itertools.pairwise(by_x)):
        return _join([_noun(o, with_size) for o in by_x]) + ", from left to right"
    return _join([_noun(o, with_size) for o in order])


# ----------------------------------------------------------------------------- rendering
def _inside(obj: ShapeObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Point-in-shape test on broadcast coordinate arrays (vectorised over all sample points)."""
    dx, dy, r = xs - obj.x, ys - obj.y, obj.radius
    if obj.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if obj.shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= r * _SQUARE
    if obj.shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * _DIAMOND
    if obj.shape == "triangle":  # base below the centroid at R/2, slanted edges sqrt(3)|dx| - dy = R
        big_r = r * _TRIANGLE
        return (dy <= big_r / 2) & (np.sqrt(3) * np.abs(dx) - dy <= big_r)
    if obj.shape == "star":
        return _inside_polygon(_star_outline(r * _STAR), dx, dy)
    raise ValueError(f"shape must be one of {ALL_SHAPES}, got {obj.shape!r}")


def _star_outline(outer: float) -> np.ndarray:
    """(10, 2) vertices of a five-pointed star about the origin, apex up (y grows downwards)."""
    k = np.arange(10)
    angle, radius = -np.pi / 2 + k * np.pi / 5, np.where(k % 2, outer * _STAR_INNER, outer)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)


def _inside_polygon(vertices: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Even-odd rule: a point is inside when a ray to its right crosses the outline an odd number of times."""
    inside = np.zeros(np.broadcast(xs, ys).shape, bool)
    for (x1, y1), (x2, y2) in zip(vertices, np.roll(vertices, -1, 0)):
        if y1 == y2:
            continue
        crosses = (y1 > ys) != (y2 > ys)
        inside ^= crosses & (xs < x1 + (ys - y1) * (x2 - x1) / (y2 - y1))
    return inside


def _supersample(size: int) -> int:
    return max(SUPERSAMPLE, -(-SUPERSAMPLED_SIDE // size))


@functools.lru_cache(maxsize=8)
def _pixel_index(size: int) -> np.ndarray:
    """(n, n) index of the output pixel holding each sub-sample, n = size * _supersample(size)."""
    rows = np.arange(size * _supersample(size)) // _supersample(size)
    return rows[:, None] * size + rows[None, :]


def _coverage(scene: Scene, size: int) -> np.ndarray:
    """(K+1, size, size) fraction of each pixel's sub-samples showing background (0) or object k (k+1)."""
    ss = _supersample(size)
    n = size * ss
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    xs, ys = c[None, :], c[:, None]
    layers = len(scene.objects) + 1
    layer = np.zeros((n, n), np.intp)
    for k, obj in enumerate(scene.objects):
        layer[_inside(obj, xs, ys)] = k + 1  # painter's order: later objects cover earlier ones
    # one bincount over (pixel, layer) pairs box-filters all layers at once
    counts = np.bincount((_pixel_index(size) * layers + layer).ravel(), minlength=size * size * layers)
    return (counts.reshape(size, size, layers).transpose(2, 0, 1) / ss**2).astype(np.float32)


def _palette(scene: Scene) -> np.ndarray:
    return np.vstack([BACKGROUND_RGB] + [COLOUR_RGB[COLOURS.index(o.colour)] for o in scene.objects])


def _maps(coverage: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Label map (-1 background, else the object with the most coverage; ties go to the farther
    layer), visible masks, depth ((z + 1) / MAX_OBJECTS, background 0) and edges.

    An edge pixel is the nearer side of a label change between 4-neighbours: object outlines are
    one pixel wide, drawn inside the object, and on the front object where two objects meet.
    """
    label = coverage.argmax(0).astype(np.int64) - 1
    k = len(coverage) - 1
    masks = label[None] == np.arange(k)[:, None, None]
    depth = ((label + 1) / MAX_OBJECTS).astype(np.float32)
    edges = np.zeros(label.shape, bool)
    for a, b, ea, eb in ((label[:, :-1], label[:, 1:], edges[:, :-1], edges[:, 1:]),
                         (label[:-1], label[1:], edges[:-1], edges[1:])):
        differ = a != b
        ea |= differ & (a > b)  # labels are z-orders, so the larger label is the nearer side
        eb |= differ & (b > a)
    return label, masks, depth, edges.astype(np.float32)


def _render_numpy(scene: Scene, size: int, maps: bool = True) -> dict:
    coverage = _coverage(scene, size)
    image = np.einsum("khw,kc->chw", coverage, _palette(scene)) * 2 - 1
    out = {"image": image.astype(np.float32)}
    if maps:
        out["label"], out["masks"], out["depth"], out["edges"] = _maps(coverage)
    return out


def _scene_rng(scene: Scene) -> np.random.Generator:
    """A generator fixed by the scene's content, for captions when no generator is given."""
    return np.random.default_rng(zlib.crc32(repr(scene).encode()))


def render(scene: Scene, size: int = 32, rng: np.random.Generator | None = None) -> dict:
    """Render ``scene`` at ``size`` x ``size``.

    Returns ``image`` (3, H, W) float32 in [-1, 1]; ``masks`` (K, H, W) bool of visible pixels;
    ``label`` (H, W) int64 (-1 background, else the visible object's index); ``edges`` (H, W)
    float32 in {0, 1}; ``depth`` (H, W) float32 ((z + 1) / MAX_OBJECTS, background 0); ``caption``
    (drawn from ``rng``, or from a generator fixed by the scene when ``rng`` is None); ``scene``.
    """
    _check_size(size)
    out = {k: torch.from_numpy(v) for k, v in _render_numpy(scene, int(size)).items()}
    out["caption"] = caption(scene, rng if rng is not None else _scene_rng(scene))
    out["scene"] = scene
    return out


# ----------------------------------------------------------------------------- datasets
@dataclass
class ShapesData:
    """Rendered scenes. Per-object attributes are (N, MAX_OBJECTS), back to front, padded with -1.

    ``shapes``/``colours``/``sizes``/``places`` index ALL_SHAPES/COLOURS/SIZES/POSITIONS; ``positions``
    holds centres (x, y) as fractions of the side; ``masks`` (padded with False), ``edges`` and
    ``depth`` are None unless rendered with ``maps=True``.
    """

    images: Tensor
    captions: list[str]
    shapes: Tensor
    colours: Tensor
    sizes: Tensor
    positions: Tensor
    places: Tensor
    counts: Tensor
    scenes: list[Scene]
    masks: Tensor | None = None
    edges: Tensor | None = None
    depth: Tensor | None = None

    def __len__(self) -> int:
        return len(self.images)


def _attributes(scenes: list[Scene]) -> dict:
    n = len(scenes)
    idx = {k: np.full((n, MAX_OBJECTS), -1, np.int64) for k in ("shapes", "colours", "sizes", "places")}
    positions = np.full((n, MAX_OBJECTS, 2), -1, np.float32)
    for i, scene in enumerate(scenes):
        for k, o in enumerate(scene.objects):
            idx["shapes"][i, k], idx["colours"][i, k] = ALL_SHAPES.index(o.shape), COLOURS.index(o.colour)
            idx["sizes"][i, k], idx["places"][i, k] = SIZES.index(o.size), POSITIONS.index(o.position)
            positions[i, k] = o.x, o.y
    out = {k: torch.from_numpy(v) for k, v in idx.items()}
    out["positions"] = torch.from_numpy(positions)
    out["counts"] = torch.tensor([len(s.objects) for s in scenes], dtype=torch.int64)
    return out


class ShapesWorld:
    """Unlimited scenes: ``world[i]`` is rendered from ``np.random.default_rng([seed, i])`` alone."""

    def __init__(self, image_size: int = 32, min_objects: int = 1, max_objects: int = 3, seed: int = 0,
                 shapes: tuple[str, ...] = SHAPES):
        _check_size(image_size)
        _check_counts(min_objects, max_objects)
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if not shapes or not set(shapes) <= set(ALL_SHAPES):
            raise ValueError(f"shapes must be a non-empty selection of {ALL_SHAPES}, got {shapes!r}")
        self.image_size, self.seed = int(image_size), int(seed)
        self.min_objects, self.max_objects, self.shapes = min_objects, max_objects, tuple(shapes)

    def _rng(self, index) -> np.random.Generator:
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"scene index must be a non-negative integer, got {index!r}")
        return np.random.default_rng([self.seed, int(index)])

    def scene(self, index: int) -> Scene:
        return sample_scene(self._rng(index), self.min_objects, self.max_objects, self.shapes)

    def sample(self, index: int) -> dict:
        """``render`` of scene ``index``, its caption drawn from the same generator."""
        rng = self._rng(index)
        return render(sample_scene(rng, self.min_objects, self.max_objects, self.shapes), self.image_size, rng)

    __getitem__ = sample

    def load(self, n: int, start: int = 0, maps: bool = False) -> ShapesData:
        """Scenes ``start .. start + n - 1`` stacked; masks, edges and depth only if ``maps``."""
        if n < 1:
            raise ValueError(f"number of scenes must be >= 1, got {n}")
        size = self.image_size
        images = np.empty((n, 3, size, size), np.float32)
        masks = np.zeros((n, MAX_OBJECTS, size, size), bool) if maps else None
        edges = np.empty((n, size, size), np.float32) if maps else None
        depth = np.empty((n, size, size), np.float32) if maps else None
        scenes, captions = [], []
        for i in range(n):
            rng = self._rng(start + i)
            scene = sample_scene(rng, self.min_objects, self.max_objects, self.shapes)
            out = _render_numpy(scene, size, maps)
            images[i] = out["image"]
            if maps:
                masks[i, :len(scene.objects)], edges[i], depth[i] = out["masks"], out["edges"], out["depth"]
            scenes.append(scene)
            captions.append(caption(scene, rng))
        as_tensor = (lambda a: None if a is None else torch.from_numpy(a))
        return ShapesData(torch.from_numpy(images), captions, scenes=scenes, masks=as_tensor(masks),
                          edges=as_tensor(edges), depth=as_tensor(depth), **_attributes(scenes))


def load_shapes(n: int, image_size: int = 32, seed: int = 0, min_objects: int = 1, max_objects: int = 3,
                maps: bool = False) -> ShapesData:
    """The first ``n`` scenes of ``ShapesWorld(image_size, min_objects, max_objects, seed)``."""
    return ShapesWorld(image_size, min_objects, max_objects, seed).load(n, maps=maps)


def single_object_prompts(n: int) -> tuple[list[str], list[str], list[str]]:
    """``n`` prompts "a {colour} {shape}" cycling through every colour-shape pair, with their attributes
    (the evaluation's prompts and the text model's sample grids)."""
    pairs = [(c, s) for s in SHAPES for c in COLOURS]
    chosen = [pairs[i % len(pairs)] for i in range(n)]
    return [prompt(c, s) for c, s in chosen], [c for c, _ in chosen], [s for _, s in chosen]
