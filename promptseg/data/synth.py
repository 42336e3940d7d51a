"""The embedded default dataset: a synthetic co-occurrence world in PASCAL VOC 2012 layout.

Why it exists: no dataset or CLIP weights can be downloaded where promptseg is developed and
tested, yet the methods we reproduce only make sense when their failure modes are present. This
world is built so that they are:

- every class co-occurs with its own background *context* (boat-water, train-railway, ...) in
  most of its images, so a classifier's CAM leaks onto the context (what CLIMS and SemPLeS fight);
- every class has two visual *variants*, and captions name the second variant by a synonym
  (mostly "ship", "tram", ..., sometimes the rarer "vessel", "locomotive", ...), so the canonical
  class name is a weaker CLIP prompt for it than a synonym (what POLE exploits), and every POLE
  candidate is a word CLIP has read (a candidate it never saw would get a meaningless embedding);
- the context region of every image is written too (``ContextMasks/``), so the leak is measurable.

Everything is deterministic for a seed: the same seed gives byte-identical files.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ConfigError
from ..io import write_bytes_atomic, write_json_atomic, write_text_atomic
from .images import mask_to_png_image
from .palette import IGNORE_INDEX

Array = np.ndarray
# 2: the web images have labels and a split list (CAM backbone pretraining)
# 3: captions use every synonym (POLE's candidates), not only the variant's first one
WORLD_FORMAT = 3


@dataclass(frozen=True)
class WorldClass:
    """One foreground class: its canonical name, its two variants and its context."""

    name: str
    variants: tuple[str, str]  # caption word of variant 0 (canonical) and variant 1 (synonym)
    synonyms: tuple[str, ...]  # POLE candidates after the canonical name
    context: str  # the background it co-occurs with


WORLD_CLASSES: tuple[WorldClass, ...] = (
    WorldClass("boat", ("boat", "ship"), ("ship", "vessel", "sailboat"), "water"),
    WorldClass("train", ("train", "tram"), ("tram", "locomotive", "railcar"), "railway"),
    WorldClass("cow", ("cow", "bull"), ("bull", "cattle", "calf"), "grass"),
    WorldClass("plane", ("plane", "jet"), ("jet", "aircraft", "airliner"), "sky"),
    WorldClass("car", ("car", "taxi"), ("taxi", "automobile", "cab"), "road"),
    WorldClass("bird", ("bird", "parrot"), ("parrot", "songbird", "finch"), "tree"),
)


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of one generated world; saved in ``classes.json`` so it can be regenerated."""

    seed: int = 0
    train: int = 2000
    val: int = 400
    size: int = 64
    context_prob: float = 0.85  # P(class's own context is drawn | class present)
    synonym_variant_prob: float = 0.5  # P(an object is drawn as its synonym variant)
    canonical_caption_prob: float = 0.15  # P(synonym variant is still captioned by the canonical name)
    rare_synonym_prob: float = 0.3  # P(else it is captioned by a rarer synonym than the variant's word)
    max_objects: int = 3
    jpeg_quality: int = 95
    # CLIP's pretraining corpus stands in for web-scale data: scenes of the same world whose class
    # and context co-occur far less than in the dataset (a dataset bias, not a fact of the world).
    clip_images: int = 3000
    web_context_prob: float = 0.3

    def validate(self) -> None:
        if self.size < 32:
            raise ConfigError(f"size: got {self.size} | expected >= 32 pixels")
        if self.train < 1 or self.val < 1:
            raise ConfigError(f"train/val: got {self.train}/{self.val} | expected >= 1 image each")
        if not 1 <= self.max_objects <= len(WORLD_CLASSES):
            raise ConfigError(f"max_objects: got {self.max_objects} | expected 1..{len(WORLD_CLASSES)}")
        if self.clip_images < 0:
            raise ConfigError(f"clip_images: got {self.clip_images} | expected >= 0")
        for name in ("context_prob", "synonym_variant_prob", "canonical_caption_prob", "rare_synonym_prob",
                     "web_context_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}: got {value} | expected a probability in [0, 1]")


# ----------------------------------------------------------------------------- textures

def _noise(rng: np.random.Generator, h: int, w: int, scale: float) -> Array:
    return rng.normal(0.0, scale, size=(h, w, 1))


def _clip_u8(x: Array) -> Array:
    return np.clip(x, 0, 255).astype(np.uint8)


def _water(rng, h, w):
    y = np.arange(h)[:, None, None]
    x = np.arange(w)[None, :, None]
    phase = rng.uniform(0, 2 * np.pi)
    waves = np.sin(x / 3.0 + y * 1.3 + phase) > 0.6
    base = np.array([30, 80, 170]) + rng.normal(0, 10, 3)
    img = base + waves * np.array([60, 70, 60]) + _noise(rng, h, w, 6)
    return _clip_u8(img)


def _railway(rng, h, w):
    base = np.array([120, 100, 80]) + rng.normal(0, 8, 3)
    img = np.broadcast_to(base, (h, w, 3)).astype(float) + _noise(rng, h, w, 8)
    period = int(rng.integers(5, 8))
    offset = int(rng.integers(0, period))
    ties = (np.arange(h) + offset) % period < 2
    img[ties, :, :] = np.array([90, 60, 40])
    for frac in (0.3, 0.7):
        col = int(frac * w)
        img[:, max(col - 1, 0):col + 1, :] = np.array([60, 60, 70])
    return _clip_u8(img)


def _grass(rng, h, w):
    base = np.array([60, 150, 50]) + rng.normal(0, 10, 3)
    img = base + _noise(rng, h, w, 14)
    blades = rng.random((h, w)) < 0.12
    img[blades] = img[blades] * 0.6
    return _clip_u8(img)


def _sky(rng, h, w):
    y = np.linspace(0, 1, h)[:, None, None]
    top = np.array([110, 170, 240]) + rng.normal(0, 8, 3)
    bottom = np.array([190, 220, 250])
    img = top * (1 - y) + bottom * y + np.zeros((1, w, 1))
    for _ in range(int(rng.integers(1, 3))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(2, 5), rng.uniform(4, 9)
        yy, xx = np.ogrid[:h, :w]
        cloud = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        img[cloud] = np.array([250, 250, 250])
    return _clip_u8(img + _noise(rng, h, w, 3))


def _road(rng, h, w):
    base = np.array([70, 70, 75]) + rng.normal(0, 6, 3)
    img = base + _noise(rng, h, w, 6) + np.zeros((h, w, 1))
    period = int(rng.integers(8, 12))
    offset = int(rng.integers(0, period))
    dashes = (np.arange(h) + offset) % period < period // 2
    mid = w // 2
    img[dashes, max(mid - 1, 0):mid + 1, :] = np.array([230, 200, 40])
    return _clip_u8(img)


def _tree(rng, h, w):
    img = np.broadcast_to(np.array([25, 70, 30]), (h, w, 3)).astype(float) + _noise(rng, h, w, 8)
    yy, xx = np.ogrid[:h, :w]
    for _ in range(int(rng.integers(3, 6))):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 7)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[blob] = np.array([40, 110, 40]) + rng.normal(0, 10, 3)
    col = int(rng.integers(0, max(w - 2, 1)))
    img[:, col:col + 2, :] = np.array([100, 70, 40])
    return _clip_u8(img)


def _neutral(rng, h, w):
    base = rng.uniform(150, 230) + rng.normal(0, 12, 3)
    return _clip_u8(base + _noise(rng, h, w, 10) + np.zeros((h, w, 1)))


CONTEXT_TEXTURES: dict[str, Callable[[np.random.Generator, int, int], Array]] = {
    "water": _water,
    "railway": _railway,
    "grass": _grass,
    "sky": _sky,
    "road": _road,
    "tree": _tree,
}

# ----------------------------------------------------------------------------- objects
# Each painter draws one object variant inside the box (x0, y0, x1, y1) on an RGB ImageDraw and,
# with the same geometry, on an "L" ImageDraw holding the class id. Colours jitter per object.


def _jitter(rng, rgb, amount=18):
    return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in rgb)


def _paint(draws, fills, shape, coords):
    for draw, fill in zip(draws, fills, strict=False):
        getattr(draw, shape)(coords, fill=fill)


def _boat(rng, draws, cid, box, variant):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    hull_top = y0 + 0.6 * h
    if variant == 0:  # sailboat: brown hull, white triangular sail
        _paint(draws, (_jitter(rng, (130, 70, 30)), cid), "polygon",
               [(x0, hull_top), (x1, hull_top), (x1 - 0.2 * w, y1), (x0 + 0.2 * w, y1)])
        _paint(draws, (_jitter(rng, (245, 245, 235), 6), cid), "polygon",
               [(x0 + 0.45 * w, y0), (x0 + 0.45 * w, hull_top), (x0 + 0.9 * w, hull_top)])
    else:  # ship: dark red hull, grey cabin, black funnel
        _paint(draws, (_jitter(rng, (150, 20, 30)), cid), "polygon",
               [(x0, hull_top), (x1, hull_top), (x1 - 0.1 * w, y1), (x0 + 0.1 * w, y1)])
        _paint(draws, (_jitter(rng, (180, 180, 180), 8), cid), "rectangle",
               [x0 + 0.2 * w, y0 + 0.3 * h, x0 + 0.75 * w, hull_top])
        _paint(draws, (_jitter(rng, (20, 20, 20), 5), cid), "rectangle",
               [x0 + 0.55 * w, y0, x0 + 0.7 * w, y0 + 0.3 * h])


def _train(rng, draws, cid, box, variant):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if variant == 0:  # locomotive-style train: black body, red cab, chimney
        _paint(draws, (_jitter(rng, (30, 30, 35), 6), cid), "rectangle", [x0, y0 + 0.35 * h, x1, y1])
        _paint(draws, (_jitter(rng, (200, 30, 30)), cid), "rectangle", [x0 + 0.6 * w, y0 + 0.1 * h, x1, y1])
        _paint(draws, (_jitter(rng, (30, 30, 35), 6), cid), "rectangle",
               [x0 + 0.1 * w, y0, x0 + 0.25 * w, y0 + 0.35 * h])
    else:  # tram: tall yellow body with a row of windows
        _paint(draws, (_jitter(rng, (235, 200, 30)), cid), "rectangle", [x0, y0 + 0.1 * h, x1, y1])
        for i in range(3):
            wx0 = x0 + (0.1 + 0.3 * i) * w
            # windows stay object pixels in the mask (fill only on the RGB draw)
            draws[0].rectangle([wx0, y0 + 0.25 * h, wx0 + 0.18 * w, y0 + 0.5 * h], fill=_jitter(rng, (60, 90, 130)))


def _cow(rng, draws, cid, box, variant):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if variant == 0:  # cow: white body with black spots, legs
        body = (_jitter(rng, (240, 240, 235), 6), cid)
    else:  # bull: dark brown body with horns
        body = (_jitter(rng, (90, 50, 25)), cid)
    _paint(draws, body, "ellipse", [x0, y0 + 0.2 * h, x0 + 0.8 * w, y0 + 0.75 * h])
    _paint(draws, body, "ellipse", [x0 + 0.65 * w, y0 + 0.1 * h, x1, y0 + 0.45 * h])
    for lx in (0.15, 0.55):
        _paint(draws, body, "rectangle", [x0 + lx * w, y0 + 0.65 * h, x0 + (lx + 0.1) * w, y1])
    if variant == 0:
        draws[0].ellipse([x0 + 0.2 * w, y0 + 0.3 * h, x0 + 0.4 * w, y0 + 0.5 * h], fill=(15, 15, 15))
    else:
        _paint(draws, ((235, 225, 200), cid), "polygon",
               [(x0 + 0.7 * w, y0 + 0.15 * h), (x0 + 0.72 * w, y0), (x0 + 0.8 * w, y0 + 0.12 * h)])


def _plane(rng, draws, cid, box, variant):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if variant == 0:  # propeller plane: grey fuselage and straight wings
        colour = (_jitter(rng, (150, 150, 160), 8), cid)
        _paint(draws, colour, "ellipse", [x0, y0 + 0.4 * h, x1, y0 + 0.6 * h])
        _paint(draws, colour, "rectangle", [x0 + 0.35 * w, y0, x0 + 0.55 * w, y1])
    else:  # jet: dark swept delta wing
        _paint(draws, (_jitter(rng, (40, 45, 60), 6), cid), "polygon",
               [(x1, y0 + 0.5 * h), (x0, y0), (x0 + 0.25 * w, y0 + 0.5 * h), (x0, y1)])


def _car(rng, draws, cid, box, variant):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    colour = (200, 30, 30) if variant == 0 else (245, 210, 20)  # red car / yellow taxi
    body = (_jitter(rng, colour), cid)
    _paint(draws, body, "rectangle", [x0, y0 + 0.4 * h, x1, y0 + 0.8 * h])
    _paint(draws, body, "rectangle", [x0 + 0.2 * w, y0 + 0.15 * h, x0 + 0.75 * w, y0 + 0.45 * h])
    for wx in (0.12, 0.68):
        _paint(draws, ((15, 15, 15), cid), "ellipse", [x0 + wx * w, y0 + 0.65 * h, x0 + (wx + 0.22) * w, y1])
    if variant == 1:  # taxi sign on the roof
        _paint(draws, ((20, 20, 20), cid), "rectangle", [x0 + 0.4 * w, y0, x0 + 0.55 * w, y0 + 0.15 * h])


def _bird(rng, draws, cid, box, variant):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if variant == 0:  # small yellow bird with an orange beak
        _paint(draws, (_jitter(rng, (240, 220, 40)), cid), "ellipse", [x0, y0 + 0.2 * h, x0 + 0.8 * w, y1])
        _paint(draws, ((250, 130, 20), cid), "polygon",
               [(x0 + 0.75 * w, y0 + 0.45 * h), (x1, y0 + 0.55 * h), (x0 + 0.75 * w, y0 + 0.65 * h)])
    else:  # parrot: red head, green and blue body
        _paint(draws, (_jitter(rng, (40, 170, 60)), cid), "ellipse", [x0 + 0.1 * w, y0 + 0.3 * h, x0 + 0.7 * w, y1])
        _paint(draws, (_jitter(rng, (220, 30, 30)), cid), "ellipse", [x0 + 0.45 * w, y0, x1, y0 + 0.45 * h])
        _paint(draws, (_jitter(rng, (30, 60, 220)), cid), "polygon",
               [(x0 + 0.1 * w, y0 + 0.6 * h), (x0, y1), (x0 + 0.35 * w, y1)])


PAINTERS = {"boat": _boat, "train": _train, "cow": _cow, "plane": _plane, "car": _car, "bird": _bird}

# ----------------------------------------------------------------------------- captions

def _caption(rng: np.random.Generator, words: list[str], contexts: list[str | None]) -> str:
    parts = []
    order = rng.permutation(len(words))
    for i in order:
        ctx = contexts[i]
        if ctx is not None and rng.random() < 0.5:
            parts.append(f"a {words[i]} on the {ctx}")
        else:
            parts.append(f"a {words[i]}")
    lead = ("a photo of ", "a picture of ", "", "an image of ")[int(rng.integers(0, 4))]
    return lead + " and ".join(parts) + "."


# ----------------------------------------------------------------------------- one image


@dataclass(frozen=True)
class SynthImage:
    image: Array  # H x W x 3 uint8
    mask: Array  # H x W uint8 class ids, 255 on object borders
    context: Array  # H x W uint8, k where class k's context is painted, else 0
    labels: Array  # float32[C]
    captions: tuple[str, ...]
    regions: tuple[dict, ...]  # box [x0, y0, x1, y1) and captions of one object or context strip
    objects: tuple[dict, ...]  # class, variant, box, context_drawn


def _border(mask_ids: Array) -> Array:
    """One-pixel ring around every object (VOC marks object borders 255)."""
    fg = mask_ids > 0
    padded = np.pad(mask_ids, 1, mode="edge")
    h, w = mask_ids.shape
    differs = np.zeros_like(fg)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        differs |= padded[dy:dy + h, dx:dx + w] != mask_ids
    return differs & fg


def _pick_context(rng: np.random.Generator, k: int, cfg: SynthConfig, web: bool) -> str | None:
    """The dataset draws a class's own context with ``context_prob``; the CLIP corpus ("web")
    draws it with ``web_context_prob`` and otherwise another class's context half of the time."""
    own = WORLD_CLASSES[k].context
    if not web:
        return own if rng.random() < cfg.context_prob else None
    if rng.random() < cfg.web_context_prob:
        return own
    if rng.random() < 0.5:
        others = [c.context for c in WORLD_CLASSES if c.context != own]
        return others[int(rng.integers(0, len(others)))]
    return None


def generate_image(rng: np.random.Generator, cfg: SynthConfig, web: bool = False) -> SynthImage:
    """One scene; ``web=True`` draws it for the CLIP pretraining corpus (weaker co-occurrence)."""
    size = cfg.size
    n_obj = int(rng.choice(np.arange(1, cfg.max_objects + 1), p=_object_count_probs(cfg.max_objects)))
    class_idx = sorted(rng.choice(len(WORLD_CLASSES), size=n_obj, replace=False).tolist())
    order = rng.permutation(class_idx).tolist()
    # split the canvas into n vertical columns of random widths
    cuts = np.sort(rng.uniform(0.3, 0.7, size=n_obj - 1)) if n_obj > 1 else np.array([])
    if n_obj == 3:
        cuts = np.array([rng.uniform(0.28, 0.38), rng.uniform(0.62, 0.72)])
    bounds = [0] + [int(round(c * size)) for c in cuts] + [size]

    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    context = np.zeros((size, size), dtype=np.uint8)
    drawn_ctx: list[str | None] = []  # the context painted in each column, if any
    for col, k in enumerate(order):
        x0, x1 = bounds[col], bounds[col + 1]
        name = _pick_context(rng, k, cfg, web)
        if name is None:
            canvas[:, x0:x1] = _neutral(rng, size, x1 - x0)
        else:
            canvas[:, x0:x1] = CONTEXT_TEXTURES[name](rng, size, x1 - x0)
            if name == WORLD_CLASSES[k].context:
                context[:, x0:x1] = k + 1
        drawn_ctx.append(name)

    rgb = Image.fromarray(canvas)
    ids = Image.new("L", (size, size), 0)
    draws = (ImageDraw.Draw(rgb), ImageDraw.Draw(ids))
    objects, words, ctx_words = [], [], []
    for col, k in enumerate(order):
        x0, x1 = bounds[col], bounds[col + 1]
        wc = WORLD_CLASSES[k]
        col_w = x1 - x0
        side = int(np.clip(rng.uniform(0.55, 0.85) * min(col_w, size * 0.5), 10, size * 0.5))
        ox = x0 + int(rng.integers(0, max(col_w - side, 0) + 1))
        oy = int(rng.integers(2, max(size - side - 2, 3)))
        box = (ox, oy, ox + side - 1, oy + side - 1)
        variant = int(rng.random() < cfg.synonym_variant_prob)
        PAINTERS[wc.name](rng, draws, k + 1, box, variant)
        word = wc.variants[variant]
        if variant == 1 and rng.random() < cfg.canonical_caption_prob:
            word = wc.name
        elif variant == 1 and rng.random() < cfg.rare_synonym_prob:
            word = wc.synonyms[int(rng.integers(1, len(wc.synonyms)))]
        words.append(word)
        ctx_words.append(drawn_ctx[col])
        objects.append({"class": wc.name, "variant": wc.variants[variant], "box": list(box),
                        "context_drawn": drawn_ctx[col] == wc.context, "context": drawn_ctx[col]})

    regions = []
    for col in range(len(order)):
        x0, x1 = bounds[col], bounds[col + 1]
        bx0, by0, bx1, by1 = objects[col]["box"]
        word, ctx = words[col], ctx_words[col]
        regions.append({"box": [max(bx0 - 2, 0), max(by0 - 2, 0), min(bx1 + 3, size), min(by1 + 3, size)],
                        "captions": [f"a photo of a {word}.", f"a {word}."]})
        if ctx is not None:
            regions.append({"box": [x0, 0, x1, size], "captions": [f"a {word} on the {ctx}.", f"a photo of a {word}."]})
            above, below = by0 - 1, size - by1 - 2  # context-only strips above / below the object
            strip = [x0, 0, x1, above] if above >= below else [x0, by1 + 2, x1, size]
            if max(above, below) >= 10 and x1 - x0 >= 10:
                regions.append({"box": strip, "captions": [f"a photo of the {ctx}.", f"the {ctx}."]})

    mask_ids = np.asarray(ids, dtype=np.uint8).copy()
    context[mask_ids > 0] = 0
    mask = mask_ids.copy()
    mask[_border(mask_ids)] = IGNORE_INDEX
    labels = np.zeros(len(WORLD_CLASSES), dtype=np.float32)
    labels[class_idx] = 1.0
    captions = tuple(_caption(rng, words, ctx_words) for _ in range(3))
    return SynthImage(np.asarray(rgb).copy(), mask, context, labels, captions, tuple(regions), tuple(objects))


def _object_count_probs(max_objects: int) -> np.ndarray:
    base = np.array([0.4, 0.35, 0.25, 0.1, 0.1, 0.1][:max_objects], dtype=float)
    return base / base.sum()


# ----------------------------------------------------------------------------- the dataset


def classes_json(cfg: SynthConfig) -> dict:
    """``classes.json``: class names, POLE candidate lists, contexts and the generating config."""
    return {
        "names": [c.name for c in WORLD_CLASSES],
        "synonyms": {c.name: [c.name, *c.synonyms] for c in WORLD_CLASSES},
        "contexts": {c.name: c.context for c in WORLD_CLASSES},
        "variants": {c.name: list(c.variants) for c in WORLD_CLASSES},
        "synth_config": cfg.__dict__,
        "world_format": WORLD_FORMAT,
    }


def write_world(out: str | Path, cfg: SynthConfig, progress: Callable[[int], None] | None = None) -> Path:
    """Write the world under ``out`` in VOC 2012 layout and return ``out``.

    Files: JPEGImages/*.jpg, SegmentationClass/*.png (VOC palette, 255 borders),
    ContextMasks/*.png, ImageSets/Segmentation/{train,val}.txt, cls_labels.npy (dict id ->
    float32[C], string keys), classes.json, captions.jsonl, objects.jsonl. The web images
    (``clip`` split: ImageSets/Segmentation/clip.txt, labels in cls_labels.npy, no masks) stand in
    for web-scale data: CLIP pretrains on their captions and the CAM backbone on their labels, as
    the references start from a CLIP trained on the web and ImageNet weights.
    """
    from .voc import write_image_sets

    cfg.validate()
    out = Path(out)
    for sub in ("JPEGImages", "SegmentationClass", "ContextMasks", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    labels: dict[str, np.ndarray] = {}
    captions, objects = [], []
    splits = {"train": [], "val": [], "clip": []}
    index = 0
    for split, count in (("train", cfg.train), ("val", cfg.val)):
        for _ in range(count):
            image_id = f"synth_{index:06d}"
            index += 1
            sample = generate_image(rng, cfg)
            _save_jpeg(out / "JPEGImages" / f"{image_id}.jpg", sample.image, cfg.jpeg_quality)
            _save_png(out / "SegmentationClass" / f"{image_id}.png", mask_to_png_image(sample.mask))
            _save_png(out / "ContextMasks" / f"{image_id}.png", Image.fromarray(sample.context, mode="L"))
            labels[image_id] = sample.labels
            captions.append(_caption_row(image_id, split, sample))
            objects.append(json.dumps({"id": image_id, "objects": list(sample.objects)}))
            splits[split].append(image_id)
            if progress is not None:
                progress(1)
    for i in range(cfg.clip_images):  # the web stand-in: captions for CLIP, image labels for the CAM backbone
        image_id = f"web_{i:06d}"
        sample = generate_image(rng, cfg, web=True)
        _save_jpeg(out / "JPEGImages" / f"{image_id}.jpg", sample.image, cfg.jpeg_quality)
        captions.append(_caption_row(image_id, "clip", sample))
        labels[image_id] = sample.labels
        splits["clip"].append(image_id)
        if progress is not None:
            progress(1)
    write_image_sets(out, splits, labels)
    write_text_atomic(out / "captions.jsonl", "\n".join(captions) + "\n")
    write_text_atomic(out / "objects.jsonl", "\n".join(objects) + "\n")
    write_json_atomic(out / "classes.json", classes_json(cfg))
    return out


def _caption_row(image_id: str, split: str, sample: SynthImage) -> str:
    return json.dumps({"id": image_id, "split": split, "captions": list(sample.captions),
                       "regions": list(sample.regions)})


def _save_jpeg(path: Path, image: np.ndarray, quality: int) -> None:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    write_bytes_atomic(path, buf.getvalue())


def _save_png(path: Path, img: Image.Image) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    write_bytes_atomic(path, buf.getvalue())
