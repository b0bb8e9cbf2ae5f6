"""Synthetic region-QA scenes: coloured shapes on textured backgrounds, still and moving.

The demo checkpoints are trained and evaluated on these scenes. Everything is deterministic by seed and needs no
file or download:

* an image scene is 224x224 with 3 to 6 non-overlapping shapes from {circle, square, triangle} x {red, green, blue,
  yellow, purple}, from tiny (8 px across) to large (100 px), on a plain, noisy, striped, checked or graded
  background whose colours are kept unsaturated, so that a shape's colour is never ambiguous;
* a video scene is 8 frames in which 2 to 4 shapes move in straight lines (left, right, up or down) over a still
  background, with a mask of every shape on every frame.

Questions (answers are exact strings, so accuracy is exact match):

| kind | question | answer |
|---|---|---|
| `what` | `What is <region>?` | `a {color} {shape}` |
| `color` | `What color is <region>?` | `{color}` |
| `shape` | `What shape is <region>?` | `{shape}` |
| `larger` | `Is <region> larger than <region>?` | `yes` / `no` (areas differ by at least 1.5x) |
| `direction` | `Which way does <region> move?` | `left` / `right` / `up` / `down` |

[`shapes_region_chat_dataset`] exports training conversations in the region-chat schema of `pixelrefer_hf.data`;
[`shapes_questions`] gives single-turn held-out questions for evaluation. This module is not remote code.
"""

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from PIL import Image as PILImage

from .data import build_region_chat_dataset, make_region_chat_row
from .region_utils import mask_to_box, region_to_mask

COLORS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 210, 30),
    "purple": (135, 50, 175),
}
SHAPES = ("circle", "square", "triangle")
# (row, column) step of one pixel in each direction.
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
QUESTION_KINDS = ("what", "color", "shape", "larger", "direction")
QUESTIONS = {
    "what": "What is <region>?",
    "color": "What color is <region>?",
    "shape": "What shape is <region>?",
    "larger": "Is <region> larger than <region>?",
    "direction": "Which way does <region> move?",
}
# Object size buckets of the evaluation table, by the shape's side / diameter in pixels.
SIZE_BUCKETS = ((0, 16, "<16px"), (16, 32, "16-32px"), (32, 64, "32-64px"), (64, 10_000, ">=64px"))
IMAGE_SIZE = 224
NUM_VIDEO_FRAMES = 8
MIN_SIZE, MAX_SIZE = 8, 100
# Pairs asked "is A larger than B" differ in area by at least this factor, so that the answer is never a judgement.
LARGER_MIN_RATIO = 1.5


def size_bucket(size: int) -> str:
    """The evaluation bucket (`"<16px"`, `"16-32px"`, `"32-64px"`, `">=64px"`) of a shape `size` pixels across."""
    return next(name for low, high, name in SIZE_BUCKETS if low <= size < high)


@dataclass
class ShapeObject:
    """One shape of a scene: what it is, how big, and its mask on every frame (one frame for an image)."""

    shape: str
    color: str
    size: int  # side of the square / diameter of the circle / base and height of the triangle, in pixels
    masks: list[np.ndarray]  # (H, W) bool, one per frame
    direction: str | None = None  # video only

    @cached_property
    def area(self) -> int:
        """Pixels of the shape (the same on every frame); read for every pair a scene's `larger` questions consider."""
        return int(self.masks[0].sum())

    @property
    def name(self) -> str:
        return f"a {self.color} {self.shape}"


@dataclass
class ShapeScene:
    """An image (one frame) or a video (several frames) and its shapes."""

    frames: list[np.ndarray]  # (H, W, 3) uint8
    objects: list[ShapeObject]
    is_video: bool = False
    timestamps: list[float] = field(default_factory=list)


@dataclass
class ShapeQuestion:
    """One single-turn question about a scene, for evaluation."""

    kind: str
    question: str
    answer: str
    object_indices: list[int]  # the scene objects behind the question's `<region>` placeholders, in order
    size: int  # size of the (first) object asked about


def shape_mask(shape: str, top: float, left: float, size: int, height: int, width: int) -> np.ndarray:
    """`(height, width)` bool mask of a shape whose bounding box is `size` x `size` at `(top, left)`.

    A pixel belongs to the shape when its centre does. The triangle points up, its base is the box's bottom edge.
    """
    rows = np.arange(height, dtype=np.float64)[:, None] + 0.5 - top  # pixel centres relative to the box
    cols = np.arange(width, dtype=np.float64)[None, :] + 0.5 - left
    inside_box = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
    if shape == "square":
        return inside_box
    if shape == "circle":
        radius = size / 2
        return (rows - radius) ** 2 + (cols - radius) ** 2 <= radius**2
    if shape == "triangle":
        # Apex at the middle of the top edge; the half-width grows linearly to size / 2 at the bottom.
        return inside_box & (np.abs(cols - size / 2) <= rows / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A plain, noisy, striped, checked or graded background in unsaturated colours, `(H, W, 3)` uint8."""

    def muted_color() -> np.ndarray:
        # A grey level plus a small tint: saturation stays far below that of any shape colour.
        return rng.uniform(55, 200) + rng.uniform(-22, 22, size=3)

    base, other = muted_color(), muted_color()
    kind = rng.choice(["plain", "noise", "stripes", "checks", "gradient"])
    rows = np.arange(height)[:, None, None]
    cols = np.arange(width)[None, :, None]
    if kind == "plain":
        image = np.broadcast_to(base, (height, width, 3)).astype(np.float64)
    elif kind == "noise":
        image = base + rng.normal(0, rng.uniform(5, 18), size=(height, width, 1))
    elif kind == "stripes":
        period = int(rng.integers(6, 30))
        along_rows = bool(rng.integers(2))
        phase = (rows if along_rows else cols) // period % 2
        image = np.where(phase == 0, base, other) * np.ones((height, width, 1))
    elif kind == "checks":
        period = int(rng.integers(8, 40))
        phase = (rows // period + cols // period) % 2
        image = np.where(phase == 0, base, other) * np.ones((height, width, 1))
    else:
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (rows * math.sin(angle) + cols * math.cos(angle)) / max(height, width)
        image = base + (other - base) * (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    return np.clip(image, 0, 255).astype(np.uint8)


def _sample_size(rng: np.random.Generator, tiny_fraction: float) -> int:
    """A shape size: `tiny_fraction` of them in [8, 15], the rest log-uniform in [16, 100]."""
    if rng.random() < tiny_fraction:
        return int(rng.integers(MIN_SIZE, 16))
    return round(math.exp(rng.uniform(math.log(16), math.log(MAX_SIZE))))


Box = tuple[float, float, float, float]  # top, left, bottom, right


def _overlaps(box: Box, boxes: list[Box], gap: float) -> bool:
    """Whether `box` (top, left, bottom, right) comes within `gap` pixels of any of `boxes`."""
    top, left, bottom, right = box
    return any(
        top < other_bottom + gap and other_top < bottom + gap and left < other_right + gap and other_left < right + gap
        for other_top, other_left, other_bottom, other_right in boxes
    )


def draw_image_scene(
    rng: np.random.Generator,
    image_size: int = IMAGE_SIZE,
    num_shapes: tuple[int, int] = (3, 6),
    tiny_fraction: float = 0.3,
) -> ShapeScene:
    """A still scene of `num_shapes[0]..num_shapes[1]` non-overlapping shapes (fewer when big shapes fill it)."""
    frame = _background(rng, image_size, image_size)
    wanted = int(rng.integers(num_shapes[0], num_shapes[1] + 1))
    boxes, objects = [], []
    for _ in range(wanted * 30):  # rejection sampling of free boxes
        if len(objects) == wanted:
            break
        size = _sample_size(rng, tiny_fraction)
        top, left = rng.uniform(0, image_size - size, size=2)
        box = (top, left, top + size, left + size)
        if _overlaps(box, boxes, gap=3):
            continue
        shape, color = SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]
        mask = shape_mask(shape, top, left, size, image_size, image_size)
        if not mask.any():
            continue
        boxes.append(box)
        objects.append(ShapeObject(shape=shape, color=color, size=size, masks=[mask]))
    for obj in objects:
        frame[obj.masks[0]] = COLORS[obj.color]
    return ShapeScene(frames=[frame], objects=objects)


def draw_video_scene(
    rng: np.random.Generator,
    image_size: int = IMAGE_SIZE,
    num_frames: int = NUM_VIDEO_FRAMES,
    num_shapes: tuple[int, int] = (2, 4),
) -> ShapeScene:
    """A video of shapes moving in straight lines at constant speed over a still background.

    Each shape's swept area (its box over all frames) is kept apart from the others', so masks never overlap on any
    frame; every shape moves 3 to 7 px per frame in one of the four directions.
    """
    background = _background(rng, image_size, image_size)
    wanted = int(rng.integers(num_shapes[0], num_shapes[1] + 1))
    swept, tracks = [], []
    for _ in range(wanted * 40):
        if len(tracks) == wanted:
            break
        size = round(math.exp(rng.uniform(math.log(10), math.log(60))))
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        step = float(rng.uniform(3, 7))
        travel = step * (num_frames - 1)
        d_row, d_col = DIRECTIONS[direction]
        # Start so that the whole path stays inside the frame.
        row_range = (max(0.0, -d_row * travel), image_size - size - max(0.0, d_row * travel))
        col_range = (max(0.0, -d_col * travel), image_size - size - max(0.0, d_col * travel))
        if row_range[1] <= row_range[0] or col_range[1] <= col_range[0]:
            continue
        top, left = rng.uniform(*row_range), rng.uniform(*col_range)
        end_top, end_left = top + d_row * travel, left + d_col * travel
        box = (min(top, end_top), min(left, end_left), max(top, end_top) + size, max(left, end_left) + size)
        if _overlaps(box, swept, gap=3):
            continue
        swept.append(box)
        tracks.append((size, direction, step, top, left))

    objects, frames = [], [background.copy() for _ in range(num_frames)]
    for size, direction, step, top, left in tracks:
        shape, color = SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]
        d_row, d_col = DIRECTIONS[direction]
        masks = [
            shape_mask(shape, top + d_row * step * t, left + d_col * step * t, size, image_size, image_size)
            for t in range(num_frames)
        ]
        for frame, mask in zip(frames, masks):
            frame[mask] = COLORS[color]
        objects.append(ShapeObject(shape=shape, color=color, size=size, masks=masks, direction=direction))
    return ShapeScene(frames=frames, objects=objects, is_video=True, timestamps=[float(t) for t in range(num_frames)])


def _larger_pairs(objects: list[ShapeObject]) -> list[tuple[int, int]]:
    """Ordered pairs `(i, j)` whose areas differ by at least `LARGER_MIN_RATIO` (either way)."""
    return [
        (i, j)
        for i, a in enumerate(objects)
        for j, b in enumerate(objects)
        if i != j and max(a.area, b.area) >= LARGER_MIN_RATIO * min(a.area, b.area)
    ]


def scene_questions(
    scene: ShapeScene, rng: np.random.Generator, kinds: tuple[str, ...] | None = None, max_pairs: int = 3
) -> list[ShapeQuestion]:
    """Every question of the given kinds that the scene can answer, in a seeded order.

    Still scenes: `what`, `color` and `shape` about every shape and `larger` about up to `max_pairs` pairs drawn from
    both orders of every eligible pair (so "yes" and "no" are equally likely). Video scenes: `direction` about every
    shape.
    """
    if kinds is None:
        kinds = ("direction",) if scene.is_video else ("what", "color", "shape", "larger")
    questions = []
    for index, obj in enumerate(scene.objects):
        answers = {"what": obj.name, "color": obj.color, "shape": obj.shape, "direction": obj.direction}
        for kind in ("what", "color", "shape", "direction"):
            if kind in kinds and answers[kind] is not None:
                questions.append(ShapeQuestion(kind, QUESTIONS[kind], answers[kind], [index], obj.size))
    if "larger" in kinds:
        pairs = _larger_pairs(scene.objects)
        for k in rng.permutation(len(pairs))[:max_pairs]:
            i, j = pairs[k]
            answer = "yes" if scene.objects[i].area > scene.objects[j].area else "no"
            questions.append(ShapeQuestion("larger", QUESTIONS["larger"], answer, [i, j], scene.objects[i].size))
    return [questions[k] for k in rng.permutation(len(questions))]


def draw_scene(rng: np.random.Generator, video: bool, video_shapes: tuple[int, int] = (2, 4)) -> ShapeScene:
    """A still scene, or a video of `video_shapes[0]..video_shapes[1]` moving shapes (fewer when they do not fit)."""
    return draw_video_scene(rng, num_shapes=video_shapes) if video else draw_image_scene(rng)


def box_of_mask(mask: np.ndarray) -> np.ndarray:
    """`(H, W)` bool: the filled bounding box of `mask`, the region a user's box drawn tightly around the shape gives
    (by the rule `pipeline("region-qa")` applies to a box, `region_to_mask`)."""
    return region_to_mask(mask_to_box(mask), mask.shape, "bounding box")


def mask_centre(mask: np.ndarray) -> tuple[float, float]:
    """`(x, y)`: the centre of mass of a non-empty `(H, W)` mask, as fractions of the frame's width and height (the
    place that training read-outs, probes and benchmarks ask of a shape's tokens)."""
    rows, cols = np.nonzero(mask)
    if not len(rows):
        raise ValueError("an empty mask has no centre")
    height, width = mask.shape
    return float(cols.mean() / width), float(rows.mean() / height)


def box_of_region(region):
    """A region entry of `_regions_of` (a mask, or `{frame: mask}`) with every mask replaced by its bounding box."""
    if isinstance(region, dict):
        return {frame: box_of_mask(mask) for frame, mask in region.items()}
    return box_of_mask(region)


def _regions_of(scene: ShapeScene, object_indices: list[int]) -> list:
    """Region entries for `make_region_chat_row`: a mask per image region, `{frame: mask}` per video region."""
    if scene.is_video:
        return [{t: mask for t, mask in enumerate(scene.objects[i].masks)} for i in object_indices]
    return [scene.objects[i].masks[0] for i in object_indices]


def _mix_questions(
    questions: list[ShapeQuestion], rng: np.random.Generator, count: int, kind_weights: dict[str, float]
) -> list[ShapeQuestion]:
    """Up to `count` of `questions`, turn by turn: a kind drawn by `kind_weights` among the kinds still left, then the
    next question of that kind (the input order is already seeded-random)."""
    left: dict[str, list[ShapeQuestion]] = {}
    for question in questions:
        left.setdefault(question.kind, []).append(question)
    chosen = []
    while len(chosen) < count and left:
        kinds = list(left)
        weights = np.array([kind_weights.get(kind, 1.0) for kind in kinds], dtype=np.float64)
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        chosen.append(left[kind].pop(0))
        if not left[kind]:
            del left[kind]
    return chosen


def shapes_region_chat_dataset(
    num_rows: int,
    seed: int = 0,
    video_fraction: float = 0.25,
    max_questions_per_row: int = 4,
    decode_images: bool = False,
    kind_weights: dict[str, float] | None = None,
    max_pairs: int = 3,
    min_questions_per_row: int = 1,
    video_shapes: tuple[int, int] = (2, 4),
    box_fraction: float = 0.0,
    ask_every_moving_shape: bool = False,
):
    """Training conversations about synthetic scenes, in the region-chat schema of `pixelrefer_hf.data`.

    Each row is one scene (a video of `video_shapes` moving shapes with probability `video_fraction`) and a
    conversation of `min_questions_per_row` to `max_questions_per_row` single-region or pair questions (fewer when the
    scene has fewer); every turn names its regions again with `<region>`, so
    a turn can be learned on its own, exactly as the single-turn questions of [`shapes_questions`] are asked.
    Without `kind_weights` the turns are a random subset of the scene's questions (so a kind is asked as often as the
    scene offers it); with them each turn's kind is drawn by weight (`{"larger": 3.0}` asks pair questions about
    three times as often as a single-region kind), from up to `max_pairs` pairs per still scene. Each region a turn
    names is given as its bounding box (a filled rectangle, as a user's box reaches the model) with probability
    `box_fraction`, otherwise as its mask. With `ask_every_moving_shape` a video's conversation asks the direction of
    every shape in it, whatever the drawn count (the video is the costly part of the row; its extra turns are cheap).
    """
    rng = np.random.default_rng(seed)
    # Box draws come from their own stream, so that `box_fraction=0` leaves every row as it was.
    box_rng = np.random.default_rng([seed, 1])
    rows = []
    for index in range(num_rows):
        scene = draw_scene(rng, video=bool(rng.random() < video_fraction), video_shapes=video_shapes)
        # Drawn in this order (questions, then their count) so that the default rows stay those the bundled demo
        # checkpoints were trained on.
        candidates = scene_questions(scene, rng, max_pairs=max_pairs)
        count = int(rng.integers(min_questions_per_row, max_questions_per_row + 1))
        if ask_every_moving_shape and scene.is_video:
            count = len(candidates)
        if kind_weights is None:
            questions = candidates[:count]
        else:
            questions = _mix_questions(candidates, rng, count, kind_weights)
        if not questions:
            continue
        messages, object_indices = [], []
        for question in questions:
            messages.append({"role": "user", "content": question.question})
            messages.append({"role": "assistant", "content": question.answer})
            object_indices.extend(question.object_indices)
        if scene.is_video:
            media = {"frames": [PILImage.fromarray(f) for f in scene.frames], "timestamps": scene.timestamps}
        else:
            media = {"image": PILImage.fromarray(scene.frames[0])}
        regions = _regions_of(scene, object_indices)
        if box_fraction:
            regions = [box_of_region(region) if box_rng.random() < box_fraction else region for region in regions]
        rows.append(make_region_chat_row(messages, regions=regions, id=f"shapes-{seed}-{index}", **media))
    return build_region_chat_dataset(rows, decode_images)


@dataclass
class ShapesEvalItem:
    """One held-out question with its scene, ready for the processor / `pipeline("region-qa")`."""

    scene: ShapeScene
    question: ShapeQuestion

    @property
    def regions(self) -> list:
        return _regions_of(self.scene, self.question.object_indices)

    @property
    def box_regions(self) -> list:
        """The regions as the boxes `[x0, y0, x1, y1]` a user would draw tightly around each shape (per frame for a
        video), instead of masks."""
        if self.scene.is_video:
            return [{t: mask_to_box(mask) for t, mask in region.items()} for region in self.regions]
        return [mask_to_box(mask) for mask in self.regions]

    @property
    def inputs(self) -> dict:
        """Keyword arguments of `pipeline("region-qa")` for this question (regions as masks)."""
        return self.pipeline_inputs(boxes=False)

    def pipeline_inputs(self, boxes: bool = False) -> dict:
        """Keyword arguments of `pipeline("region-qa")` for this question, with the regions as masks or (`boxes`) as
        their bounding boxes."""
        regions = self.box_regions if boxes else self.regions
        if self.scene.is_video:
            return {
                "video": [PILImage.fromarray(f) for f in self.scene.frames],
                "regions": regions,
                "question": self.question.question,
                "video_timestamps": self.scene.timestamps,
            }
        return {
            "image": PILImage.fromarray(self.scene.frames[0]),
            "regions": regions,
            "question": self.question.question,
        }


def shapes_questions(
    seed: int, num_per_kind: int = 50, kinds: tuple[str, ...] = QUESTION_KINDS
) -> list[ShapesEvalItem]:
    """`num_per_kind` held-out single-turn questions of each kind, from scenes drawn with `seed`.

    Use a seed the training set did not use. One question per kind is taken from each scene, so questions of one
    kind come from different scenes.
    """
    rng = np.random.default_rng(seed)
    counts = dict.fromkeys(kinds, 0)
    items = []
    while any(counts[kind] < num_per_kind for kind in kinds):
        video = counts.get("direction", num_per_kind) < num_per_kind and (
            all(counts[k] >= num_per_kind for k in kinds if k != "direction") or rng.random() < 0.25
        )
        scene = draw_scene(rng, video=video)
        taken = set()
        for question in scene_questions(scene, rng):
            if question.kind in kinds and question.kind not in taken and counts[question.kind] < num_per_kind:
                items.append(ShapesEvalItem(scene, question))
                counts[question.kind] += 1
                taken.add(question.kind)
    return items


# The scene of `examples/assets/shapes.png` (README main command): (shape, color, size, top, left) per object. Its boxes
# `[x0, y0, x1, y1]` (end exclusive) are `[left, top, left + size, top + size]`.
EXAMPLE_SCENE_OBJECTS = (
    ("square", "red", 50, 40, 40),
    ("circle", "blue", 60, 120, 30),
    ("triangle", "yellow", 44, 30, 140),
    ("circle", "green", 10, 150, 150),
    ("square", "purple", 12, 110, 180),
    ("triangle", "purple", 36, 170, 100),
)


def example_scene(seed: int = 7) -> ShapeScene:
    """The fixed still scene of `examples/assets/shapes.png`: six shapes (two of them tiny) on a noisy background."""
    rng = np.random.default_rng(seed)
    base = np.array([120.0, 128.0, 118.0])
    frame = np.clip(base + rng.normal(0, 10, size=(IMAGE_SIZE, IMAGE_SIZE, 1)), 0, 255).astype(np.uint8)
    objects = []
    for shape, color, size, top, left in EXAMPLE_SCENE_OBJECTS:
        mask = shape_mask(shape, top, left, size, IMAGE_SIZE, IMAGE_SIZE)
        frame[mask] = COLORS[color]
        objects.append(ShapeObject(shape=shape, color=color, size=size, masks=[mask]))
    return ShapeScene(frames=[frame], objects=objects)


# ---------------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------------

# Questions whose accuracy is also broken down by the size of the object asked about.
SIZE_KINDS = ("what", "color", "shape")


def normalize_answer(text: str) -> str:
    """Exact-match normal form: surrounding blanks, letter case and a final full stop do not count."""
    return text.strip().lower().removesuffix(".").strip()


def score_shapes_answers(items: list[ShapesEvalItem], answers: list[str]) -> dict:
    """Exact-match accuracy of `answers` (one per item) per question kind and, over the `what` / `color` / `shape`
    questions, per object size bucket.

    Returns:
        `dict` with `"kinds"` and `"sizes"`, each `{name: {"correct": int, "total": int, "accuracy": float}}`, and
        `"wrong"`: up to 20 `(question kind, expected, answer)` examples of mistakes.
    """
    if len(items) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(items)} questions")
    kinds: dict[str, list[int]] = {}
    sizes: dict[str, list[int]] = {name: [0, 0] for _, _, name in SIZE_BUCKETS}
    wrong = []
    for item, answer in zip(items, answers):
        question = item.question
        correct = normalize_answer(answer) == normalize_answer(question.answer)
        tally = kinds.setdefault(question.kind, [0, 0])
        tally[0] += correct
        tally[1] += 1
        if question.kind in SIZE_KINDS:
            bucket = sizes[size_bucket(question.size)]
            bucket[0] += correct
            bucket[1] += 1
        if not correct and len(wrong) < 20:
            wrong.append((question.kind, question.answer, answer))

    def summary(tallies: dict[str, list[int]]) -> dict:
        return {
            name: {"correct": c, "total": t, "accuracy": c / t if t else float("nan")}
            for name, (c, t) in tallies.items()
        }

    return {"kinds": summary(kinds), "sizes": summary(sizes), "wrong": wrong}


def accuracy_table(results: dict[str, dict]) -> str:
    """A markdown table, one row per `name -> score_shapes_answers(...)` result, one column per kind and size."""
    kinds = [kind for kind in QUESTION_KINDS if any(kind in r["kinds"] for r in results.values())]
    buckets = [name for _, _, name in SIZE_BUCKETS]
    header = ["model", *kinds, *(f"{name} (w/c/s)" for name in buckets)]

    def cell(entry: dict | None) -> str:
        if not entry or not entry["total"]:
            return "-"
        return f"{100 * entry['accuracy']:.1f}% ({entry['correct']}/{entry['total']})"

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in results.items():
        cells = [cell(result["kinds"].get(kind)) for kind in kinds] + [cell(result["sizes"].get(b)) for b in buckets]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


__all__ = [
    "COLORS",
    "EXAMPLE_SCENE_OBJECTS",
    "DIRECTIONS",
    "QUESTIONS",
    "QUESTION_KINDS",
    "SHAPES",
    "ShapeObject",
    "ShapeQuestion",
    "ShapeScene",
    "ShapesEvalItem",
    "accuracy_table",
    "box_of_mask",
    "box_of_region",
    "draw_image_scene",
    "draw_scene",
    "draw_video_scene",
    "example_scene",
    "mask_centre",
    "normalize_answer",
    "scene_questions",
    "score_shapes_answers",
    "shape_mask",
    "shapes_questions",
    "shapes_region_chat_dataset",
    "size_bucket",
]
