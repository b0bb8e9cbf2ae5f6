"""`pixelrefer web`: an interactive Gradio page that asks PixelRefer about regions drawn on an image or a video.

    pixelrefer web                                          # bundled toy model, http://127.0.0.1:7860
    pixelrefer web --model path/to/PixelRefer-7B-hf --sam-model facebook/sam-vit-base \\
        --sam2-model facebook/sam2.1-hiera-tiny --host 0.0.0.0 --port 7860

    >>> from pixelrefer_hf.web_demo import DemoModels, build_app, launch_app
    >>> models = DemoModels.load("demo")            # doctest: +SKIP  (the model loads once, here)
    >>> app = build_app(models)                     # doctest: +SKIP  a gr.Blocks, to launch or mount
    >>> launch_app(app, port=7860)                  # doctest: +SKIP

Image tab: regions come from a box typed as `x0,y0,x1,y1`, from two clicks on the picture (opposite corners), from a
mask brushed in the editor, or, with a SAM checkpoint, from one click on the object (SAM turns it into a mask; brushed
strokes can be refined by SAM too). Video tab: the same on any decoded frame; with a SAM2 video checkpoint a region
drawn on some frames is carried to every frame before PixelRefer answers, and the carried masks are shown.

Everything a visitor does lives in their own `gr.State` (`ImageSession`, `VideoSession`); only the models are shared,
loaded once at start. The event functions below are plain functions of a session, usable without a browser (the tests
call them directly). Needs the `web` extra (`pip install "pixelrefer-hf[web]"`). This module is not remote code.
"""

import copy
import html
import logging as std_logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from transformers.utils import logging

from .media_io import load_image as read_image_file
from .media_io import read_video
from .region_utils import region_to_mask

logger = logging.get_logger(__name__)

INSTALL_HINT = 'the web demo needs Gradio: pip install "pixelrefer-hf[web]" (or pip install "gradio>=6,<7")'
# A web upload is bounded tighter than the processor's default (179 M pixels): one visitor must not be able to make the
# shared server decode a gigapixel picture. `build_app(max_image_pixels=...)` changes it.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_MAX_UPLOAD = "50mb"
DEFAULT_MAX_NEW_TOKENS = 64
IMAGE_QUESTIONS = (
    "What is <region>?",
    "What color is <region>?",
    "What shape is <region>?",
    "Is <region> larger than <region>?",
)
VIDEO_QUESTIONS = ("Which way does <region> move?", "What is <region>?")
# Brush radius in picture pixels: fine enough for the small shapes of the demo scenes.
BRUSH_RADIUS = 6
CLICK_BOX = "box corners"
CLICK_SAM = "SAM point"
NEW_REGION = "new region"
# Overlay colours, one per region number (cycled); chosen to stand apart from the demo scenes' five shape colours.
REGION_COLORS = (
    (255, 0, 255),
    (0, 255, 255),
    (255, 140, 0),
    (0, 255, 0),
    (255, 255, 255),
    (255, 20, 147),
    (30, 144, 255),
    (173, 255, 47),
)
OVERLAY_ALPHA = 0.45
# Small pictures are shown enlarged by a whole factor (nearest neighbour), so that regions and numbers are readable;
# clicks are mapped back to the picture's pixels.
DISPLAY_SIZE = 448
MAX_DISPLAY_SCALE = 4
# System fonts only: the page must render without fetching Google Fonts (offline servers, closed networks).
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
MONO_FONTS = ("ui-monospace", "monospace")
CSS = """
#image-view img, #video-view img { image-rendering: pixelated; }
.region-list { font-size: 0.95em; }
.region-swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em; vertical-align: middle; }
"""


class DemoInputError(ValueError):
    """A request the page refuses, with the message shown to the visitor (no traceback)."""


def _import_gradio():
    # Analytics and the version check phone home; the demo must run on machines without internet.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from error
    return gr


# ---------------------------------------------------------------------------------------------------------------------
# Models: loaded once, shared by every visitor
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class DemoModels:
    """The region-qa pipeline and the optional SAM / SAM2 helpers that every session shares.

    Attributes:
        pipe: a `RegionQAPipeline`.
        name (`str`): what the page calls the model.
        is_toy (`bool`): the bundled demo checkpoint or a tiny random model (the page says so).
        sam_model (`str`, *optional*): SAM checkpoint that turns clicks and brushed strokes into masks.
        sam2_model (`str`, *optional*): SAM2 video checkpoint that carries video regions to every frame.
    """

    pipe: Any
    name: str
    is_toy: bool = False
    sam_model: str | None = None
    sam2_model: str | None = None
    sam_predictor: Any = None
    sam2_propagator: Any = None
    # SAM and SAM2 load lazily on first use; one visitor at a time may run them, so they load once.
    sam_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(
        cls,
        model: str = "demo",
        sam_model: str | None = None,
        sam2_model: str | None = None,
        device: str = "cpu",
    ) -> "DemoModels":
        """Load `model` (a checkpoint folder or repo id, or `demo`, `demo-lite`, `tiny-random[-lite]` as in the
        `pixelrefer` command) and prepare SAM / SAM2 when named."""
        from .cli import DEMO_MODELS, TINY_RANDOM_MODELS, load_model_and_processor
        from .pipeline_region_qa import RegionQAPipeline

        loaded_model, processor = load_model_and_processor(model)
        pipe = RegionQAPipeline(model=loaded_model, processor=processor, task="region-qa", device=device)
        return cls.from_pipeline(
            pipe,
            name=model,
            is_toy=model in DEMO_MODELS or model in TINY_RANDOM_MODELS,
            sam_model=sam_model,
            sam2_model=sam2_model,
            device=device,
        )

    @classmethod
    def from_pipeline(
        cls,
        pipe,
        name: str = "model",
        is_toy: bool = False,
        sam_model: str | None = None,
        sam2_model: str | None = None,
        device: str = "cpu",
    ) -> "DemoModels":
        from .sam_utils import Sam2VideoPropagator, SamMaskPredictor

        return cls(
            pipe=pipe,
            name=name,
            is_toy=is_toy,
            sam_model=sam_model,
            sam2_model=sam2_model,
            sam_predictor=SamMaskPredictor(sam_model, device=device) if sam_model else None,
            sam2_propagator=Sam2VideoPropagator(sam2_model, device=device) if sam2_model else None,
        )

    def segment(self, image: np.ndarray, points=None, box=None, where: str = "region") -> np.ndarray:
        """A SAM mask for a click (`points`) or a box on `image`; a `DemoInputError` without SAM."""
        if self.sam_predictor is None:
            raise DemoInputError(
                "clicking an object needs a SAM model: start the demo with --sam-model (e.g. facebook/sam-vit-base); "
                "without it, draw a box or brush a mask"
            )
        labels = None if points is None else [1] * len(points)
        try:
            with self.sam_lock:
                return self.sam_predictor.predict(image, points=points, labels=labels, box=box, where=where)
        except ValueError as error:  # no object at the click, a checkpoint that does not load, ...
            raise DemoInputError(str(error)) from error

    def propagate(self, frames: list[np.ndarray], regions: list[dict[int, np.ndarray]]) -> list[dict[int, np.ndarray]]:
        """Every region's masks on all frames, as the pipeline computes them with `propagate_regions=True`: the
        given masks as they are, SAM2's elsewhere, frames where SAM2 loses the object left out."""
        wheres = [f"region {number}" for number in range(1, len(regions) + 1)]
        with self.sam_lock:
            tracked = self.sam2_propagator.propagate_objects(frames, regions, wheres, "video")
        return [{t: mask for t, mask in masks.items() if mask.any()} for masks in tracked]


# ---------------------------------------------------------------------------------------------------------------------
# Per-visitor state
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Region:
    """One region on one image or frame.

    Attributes:
        prompt: what the pipeline receives: a box `[x0, y0, x1, y1]` or an `(H, W)` bool mask.
        mask (`np.ndarray`): `(H, W)` bool, what the page draws (a box's pixels for a box).
        label (`str`): how the region list describes it.
    """

    prompt: Any
    mask: np.ndarray
    label: str


@dataclass
class ImageSession:
    """One visitor's image tab: the picture, its regions in `<region>` order, a first box corner waiting for its
    second click."""

    image: np.ndarray | None = None
    regions: list[Region] = field(default_factory=list)
    corner: tuple[int, int] | None = None


@dataclass
class VideoSession:
    """One visitor's video tab: decoded frames, regions as `{frame_index: Region}` in `<region>` order, and the
    masks SAM2 carried them to (shown once computed, dropped when the regions change)."""

    frames: list[np.ndarray] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)
    regions: list[dict[int, Region]] = field(default_factory=list)
    propagated: list[dict[int, np.ndarray]] | None = None
    corner: tuple[int, int, int] | None = None  # (frame, x, y)
    name: str = ""


def example_image() -> np.ndarray:
    """The README's example picture (`examples/assets/shapes.png`), rebuilt from `pixelrefer_hf.synthetic` so that an
    installed package needs no file."""
    from .synthetic import example_scene

    return example_scene().frames[0]


def example_video(seed: int = 3) -> tuple[list[np.ndarray], list[float]]:
    """A synthetic video of shapes moving in straight lines (8 frames, one per second)."""
    from .synthetic import draw_video_scene

    scene = draw_video_scene(np.random.default_rng(seed))
    return [np.ascontiguousarray(frame) for frame in scene.frames], list(scene.timestamps)


# ---------------------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------------------


def region_color(number: int) -> tuple[int, int, int]:
    """The overlay colour of region `number` (1-based)."""
    return REGION_COLORS[(number - 1) % len(REGION_COLORS)]


def display_scale(size: tuple[int, ...]) -> int:
    """How many screen pixels per picture pixel the page shows a picture of `size` `(H, W, ...)` with."""
    return int(min(MAX_DISPLAY_SCALE, max(1, DISPLAY_SIZE // max(size[0], size[1]))))


def to_picture_pixel(size: tuple[int, ...], x, y) -> tuple[int, int]:
    """A click on the shown (enlarged) picture -> the picture pixel under it."""
    scale = display_scale(size)
    return min(int(x) // scale, size[1] - 1), min(int(y) // scale, size[0] - 1)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def draw_overlay(
    image: np.ndarray,
    masks: list[tuple[int, np.ndarray]],
    faint: list[tuple[int, np.ndarray]] = (),
    corner: tuple[int, int] | None = None,
) -> np.ndarray:
    """`image` with each `(number, mask)` tinted in its region's colour, outlined and numbered; `faint` masks (carried
    by SAM2) are tinted more lightly; `corner` marks a first box corner waiting for the second click."""
    canvas = image.astype(np.float32).copy()
    for alpha, group in ((OVERLAY_ALPHA / 2, faint), (OVERLAY_ALPHA, masks)):
        for number, mask in group:
            color = np.array(region_color(number), dtype=np.float32)
            canvas[mask] = (1 - alpha) * canvas[mask] + alpha * color
    scale = display_scale(image.shape)
    picture = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    font = _font(max(12, min(picture.width, picture.height) // 16))
    labelled = {}
    for number, mask in [*faint, *masks]:
        labelled[number] = mask  # the given mask wins where a region has both
    for number, mask in labelled.items():
        rows, cols = np.nonzero(mask)
        if not len(rows):
            continue
        color = region_color(number)
        x0, y0, x1, y1 = (
            cols.min() * scale,
            rows.min() * scale,
            (cols.max() + 1) * scale - 1,
            (rows.max() + 1) * scale - 1,
        )
        draw.rectangle([x0, y0, x1, y1], outline=color, width=max(1, scale // 2))
        _, top, _, bottom = draw.textbbox((0, 0), str(number), font=font)
        # Above the region when there is room, else inside its top-left corner.
        text_x, text_y = int(x0), int(y0) - (bottom - top) - 4
        if text_y < 0:
            text_y = int(y0) + 2
        left, top, right, bottom = draw.textbbox((text_x, text_y), str(number), font=font)
        draw.rectangle([left - 2, top - 2, right + 2, bottom + 2], fill=(0, 0, 0))
        draw.text((text_x, text_y), str(number), fill=color, font=font)
    if corner is not None:
        x, y = corner[0] * scale + scale // 2, corner[1] * scale + scale // 2
        arm = max(4, min(picture.width, picture.height) // 40)
        draw.line([x - arm, y, x + arm, y], fill=(255, 255, 0), width=2)
        draw.line([x, y - arm, x, y + arm], fill=(255, 255, 0), width=2)
    return np.asarray(picture)


def _region_list_html(entries: list[tuple[int, str]]) -> str:
    if not entries:
        return "<div class='region-list'><i>No regions yet: add a box, a click or a brushed mask.</i></div>"
    rows = []
    for number, text in entries:
        red, green, blue = region_color(number)
        swatch = f"<span class='region-swatch' style='background: rgb({red}, {green}, {blue})'></span>"
        rows.append(
            f"<li>{swatch}<b>region {number}</b> (<code>&lt;region&gt;</code> #{number}): {html.escape(text)}</li>"
        )
    return "<div class='region-list'><ol style='list-style: none; padding-left: 0'>" + "".join(rows) + "</ol></div>"


def image_view(session: ImageSession) -> np.ndarray | None:
    """The picture with the session's regions drawn on it."""
    if session.image is None:
        return None
    masks = [(number, region.mask) for number, region in enumerate(session.regions, start=1)]
    return draw_overlay(session.image, masks, corner=session.corner)


def image_region_list(session: ImageSession) -> str:
    return _region_list_html([(number, region.label) for number, region in enumerate(session.regions, start=1)])


def video_view(session: VideoSession, frame: int) -> np.ndarray | None:
    """Frame `frame` with the regions given on it, and (lighter) the masks SAM2 carried to it."""
    if not session.frames:
        return None
    frame = min(max(int(frame), 0), len(session.frames) - 1)
    given = [(n, region[frame].mask) for n, region in enumerate(session.regions, start=1) if frame in region]
    carried = []
    if session.propagated is not None:
        carried = [
            (n, masks[frame])
            for n, (masks, region) in enumerate(zip(session.propagated, session.regions), start=1)
            if frame in masks and frame not in region
        ]
    corner = session.corner[1:] if session.corner is not None and session.corner[0] == frame else None
    return draw_overlay(session.frames[frame], given, faint=carried, corner=corner)


def video_region_list(session: VideoSession) -> str:
    entries = []
    for number, region in enumerate(session.regions, start=1):
        parts = [f"frame {t}: {region[t].label}" for t in sorted(region)]
        text = "; ".join(parts)
        if session.propagated is not None:
            text += f" (SAM2: on {len(session.propagated[number - 1])} of {len(session.frames)} frames)"
        entries.append((number, text))
    return _region_list_html(entries)


# ---------------------------------------------------------------------------------------------------------------------
# Loading uploads
# ---------------------------------------------------------------------------------------------------------------------


def read_image_upload(path: str | None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """An uploaded file -> `(H, W, 3)` RGB uint8 through the package's one image loader (`media_io.load_image`: EXIF
    orientation applied, more than `max_pixels` pixels refused from the header), with errors that name the file the
    visitor chose rather than the server's temporary copy."""
    if not path:
        raise DemoInputError("no file was uploaded")
    name = os.path.basename(path)
    try:
        return read_image_file(path, name, max_pixels)
    except ValueError as error:
        raise DemoInputError(str(error).replace(repr(path), repr(name)).replace(path, name)) from error


def read_video_upload(
    path: str | None, fps: float, max_frames: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[list[np.ndarray], list[float]]:
    """An uploaded video file -> frames and timestamps (`media_io.read_video`), with errors that name the file the
    visitor chose rather than the server's temporary copy."""
    if not path:
        raise DemoInputError("no file was uploaded")
    name = os.path.basename(path)
    try:
        fps, max_frames = float(fps), int(max_frames)
    except (TypeError, ValueError) as error:
        raise DemoInputError(f"fps and max frames must be numbers, got {fps!r} and {max_frames!r}") from error
    try:
        decoded = read_video(path, fps=fps, max_frames=max_frames, max_pixels=max_pixels)
    except ImportError as error:
        raise DemoInputError(f"this server cannot decode videos: {error}") from error
    except ValueError as error:
        raise DemoInputError(str(error).replace(repr(path), repr(name)).replace(path, name)) from error
    return decoded.frames, decoded.timestamps


# ---------------------------------------------------------------------------------------------------------------------
# Regions
# ---------------------------------------------------------------------------------------------------------------------


def parse_box_text(text: str) -> list[float]:
    """`"x0,y0,x1,y1"` (commas or blanks) -> four numbers."""
    parts = [part for part in (text or "").replace(",", " ").split() if part]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if len(values) != 4 or not all(np.isfinite(values)):
        raise DemoInputError(f"a box is four numbers x0,y0,x1,y1 in pixels, got {text!r}")
    return values


def box_region(box: list[float], image: np.ndarray, where: str = "box") -> Region:
    """A box region, checked against the picture (zero area or entirely outside are refused)."""
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise DemoInputError(f"{where} {_fmt_box(box)}: x1 must exceed x0 and y1 must exceed y0")
    try:
        mask = region_to_mask(list(box), image.shape[:2], where)
    except ValueError as error:
        raise DemoInputError(str(error)) from error
    return Region(prompt=list(box), mask=mask, label=f"box {_fmt_box(box)}")


def _fmt_box(box) -> str:
    return ",".join(f"{v:g}" for v in box)


def brushed_mask(editor_value: dict | None, size: tuple[int, int]) -> np.ndarray:
    """The pixels painted in an ImageEditor value (any layer, any colour), as an `(H, W)` bool mask of the picture."""
    layers = (editor_value or {}).get("layers") or []
    height, width = size
    mask = np.zeros((height, width), dtype=bool)
    for layer in layers:
        if layer is None:
            continue
        layer = np.asarray(layer)
        painted = layer[..., 3] > 0 if layer.ndim == 3 and layer.shape[2] == 4 else np.any(layer > 0, axis=-1)
        if painted.shape != (height, width):
            # The canvas can be scaled relative to the picture; nearest keeps the stroke's pixels binary.
            painted = np.asarray(Image.fromarray(painted).resize((width, height), Image.NEAREST))
        mask |= painted
    return mask


def _with_region(session, update):
    """A copy of `session` changed by `update`: gr.State keeps the old value when an event fails half way."""
    session = copy.copy(session)
    update(session)
    return session


def load_image(session: ImageSession, image: np.ndarray) -> ImageSession:
    """A new picture: its regions start empty."""
    return ImageSession(image=image)


def add_image_box(session: ImageSession, text: str) -> ImageSession:
    if session.image is None:
        raise DemoInputError("upload an image first")
    region = box_region(parse_box_text(text), session.image, f"region {len(session.regions) + 1}: box")
    return ImageSession(image=session.image, regions=[*session.regions, region])


def add_image_click(models: DemoModels, session: ImageSession, mode: str, x: int, y: int) -> tuple[ImageSession, str]:
    """A click on the picture: a box corner (two clicks make a box) or, with SAM, a point on the object. Returns the
    new session and what happened."""
    if session.image is None:
        raise DemoInputError("upload an image first")
    x, y = int(x), int(y)
    if mode == CLICK_SAM:
        number = len(session.regions) + 1
        mask = models.segment(session.image, points=[[x, y]], where=f"region {number}")
        region = Region(prompt=mask, mask=mask, label=f"SAM mask from a click at {x},{y} ({int(mask.sum())} px)")
        return ImageSession(image=session.image, regions=[*session.regions, region]), f"region {number} added"
    if session.corner is None:
        return (
            ImageSession(image=session.image, regions=session.regions, corner=(x, y)),
            f"first corner at {x},{y}: click the opposite corner",
        )
    (cx, cy), number = session.corner, len(session.regions) + 1
    box = [min(cx, x), min(cy, y), max(cx, x) + 1, max(cy, y) + 1]
    region = box_region(box, session.image, f"region {number}: box")
    return ImageSession(image=session.image, regions=[*session.regions, region]), f"region {number} added"


def add_image_brush(
    models: DemoModels, session: ImageSession, editor_value: dict | None, refine_with_sam: bool = False
) -> ImageSession:
    """The brushed pixels as a new region; with `refine_with_sam`, SAM segments the object under the stroke (the
    stroke's bounding box and its most central painted pixel are the prompt)."""
    if session.image is None:
        raise DemoInputError("upload an image first")
    number = len(session.regions) + 1
    mask = brushed_mask(editor_value, session.image.shape[:2])
    if not mask.any():
        raise DemoInputError("nothing is brushed: paint over the object in the brush editor first")
    label = f"brushed mask ({int(mask.sum())} px)"
    if refine_with_sam:
        rows, cols = np.nonzero(mask)
        centre = np.array([rows.mean(), cols.mean()])
        nearest = int(np.argmin((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2))
        box = [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
        point = [int(cols[nearest]), int(rows[nearest])]
        mask = models.segment(session.image, points=[point], box=box, where=f"region {number}")
        label = f"SAM mask from a brushed stroke ({int(mask.sum())} px)"
    region = Region(prompt=mask, mask=mask, label=label)
    return ImageSession(image=session.image, regions=[*session.regions, region])


def _region_number(number, count: int) -> int:
    try:
        number = int(number)
    except (TypeError, ValueError) as error:
        raise DemoInputError("choose the region to remove") from error
    if not 1 <= number <= count:
        raise DemoInputError(f"there is no region {number} (there are {count})")
    return number


def remove_image_region(session: ImageSession, number) -> ImageSession:
    number = _region_number(number, len(session.regions))
    regions = [region for n, region in enumerate(session.regions, start=1) if n != number]
    return ImageSession(image=session.image, regions=regions)


def load_video(session: VideoSession, frames: list[np.ndarray], timestamps: list[float], name: str) -> VideoSession:
    if not frames:
        raise DemoInputError(f"{name}: the video has no frames")
    return VideoSession(frames=frames, timestamps=timestamps, name=name)


def _video_target(session: VideoSession, target) -> int | None:
    """Region index (0-based) a new shape goes to, or `None` for a new region."""
    if target in (None, "", NEW_REGION):
        return None
    number = _region_number(str(target).removeprefix("region "), len(session.regions))
    return number - 1


def _video_with(session: VideoSession, target, frame: int, region: Region) -> VideoSession:
    index = _video_target(session, target)
    regions = [dict(r) for r in session.regions]
    if index is None:
        regions.append({frame: region})
    else:
        regions[index][frame] = region
    return VideoSession(frames=session.frames, timestamps=session.timestamps, regions=regions, name=session.name)


def _check_frame(session: VideoSession, frame) -> int:
    if not session.frames:
        raise DemoInputError("upload a video (or load the example) first")
    frame = int(frame)
    if not 0 <= frame < len(session.frames):
        raise DemoInputError(f"frame {frame} is outside the video (0-{len(session.frames) - 1})")
    return frame


def add_video_box(session: VideoSession, frame, target, text: str) -> VideoSession:
    frame = _check_frame(session, frame)
    region = box_region(parse_box_text(text), session.frames[frame], f"frame {frame}: box")
    return _video_with(session, target, frame, region)


def add_video_click(
    models: DemoModels, session: VideoSession, frame, target, mode: str, x: int, y: int
) -> tuple[VideoSession, str]:
    frame, x, y = _check_frame(session, frame), int(x), int(y)
    if mode == CLICK_SAM:
        mask = models.segment(session.frames[frame], points=[[x, y]], where=f"frame {frame}")
        region = Region(prompt=mask, mask=mask, label=f"SAM mask from a click at {x},{y}")
        return _video_with(session, target, frame, region), f"SAM mask added on frame {frame}"
    if session.corner is None or session.corner[0] != frame:
        waiting = copy.copy(session)
        waiting.corner = (frame, x, y)
        return waiting, f"first corner at {x},{y} on frame {frame}: click the opposite corner"
    _, cx, cy = session.corner
    box = [min(cx, x), min(cy, y), max(cx, x) + 1, max(cy, y) + 1]
    region = box_region(box, session.frames[frame], f"frame {frame}: box")
    return _video_with(session, target, frame, region), f"box added on frame {frame}"


def remove_video_region(session: VideoSession, number) -> VideoSession:
    number = _region_number(number, len(session.regions))
    regions = [region for n, region in enumerate(session.regions, start=1) if n != number]
    return VideoSession(frames=session.frames, timestamps=session.timestamps, regions=regions, name=session.name)


def insert_placeholder(question: str) -> str:
    """The question with one more `<region>` at its end."""
    question = question or ""
    return question + ("" if not question or question.endswith(" ") else " ") + "<region>"


# ---------------------------------------------------------------------------------------------------------------------
# Answering
# ---------------------------------------------------------------------------------------------------------------------


def generation_options(max_new_tokens, do_sample: bool, temperature, top_p) -> dict:
    """`generate` keywords from the settings accordion (sampling parameters only when sampling)."""
    try:
        options = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample)}
    except (TypeError, ValueError) as error:
        raise DemoInputError(f"max new tokens must be a whole number, got {max_new_tokens!r}") from error
    if not 1 <= options["max_new_tokens"] <= 1024:
        raise DemoInputError(f"max new tokens must lie in 1-1024, got {options['max_new_tokens']}")
    if do_sample:
        options.update(temperature=float(temperature), top_p=float(top_p))
    return options


def check_question(question: str, num_regions: int) -> str:
    """Refuse, in the page's words, what the pipeline would refuse: no region, or placeholders that do not match."""
    question = (question or "").strip()
    if not question:
        raise DemoInputError("type a question, with one <region> for each region")
    if num_regions == 0:
        raise DemoInputError("add a region first (a box, a click or a brushed mask), then ask about it as <region>")
    placeholders = question.count("<region>")
    if placeholders != num_regions:
        raise DemoInputError(
            f"the question has {placeholders} <region> placeholder(s) but there are {num_regions} region(s): write "
            "one <region> per region, in the order of the list"
        )
    return question


def stream_answer(pipe, item: dict, **options) -> Iterator[str]:
    """Run `pipe(item)` in a thread and yield the answer as it grows, token by token; the last value is the
    pipeline's final answer. A pipeline error is raised here, after the stream stops."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = pipe(item, streamer=streamer, **options)
        except BaseException as error:  # handed to the page's thread below
            outcome["error"] = error
            # Unblock the reader: generate never started or stopped early, so the streamer would wait forever.
            streamer.end()

    worker = threading.Thread(target=run, name="pixelrefer-web-generate", daemon=True)
    worker.start()
    text = ""
    for piece in streamer:
        text += piece
        if text.strip():
            yield text.strip()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["result"]["answer"]


def ask_image(models: DemoModels, session: ImageSession, question: str, options: dict) -> Iterator[str]:
    """Stream the answer to `question` about the session's regions."""
    if session.image is None:
        raise DemoInputError("upload an image first")
    question = check_question(question, len(session.regions))
    item = {"image": session.image, "regions": [region.prompt for region in session.regions], "question": question}
    yield from _pipeline_errors(stream_answer(models.pipe, item, **options))


def video_item(session: VideoSession, question: str) -> dict:
    regions = [{t: region.prompt for t, region in r.items()} for r in session.regions]
    return {"video": session.frames, "video_timestamps": session.timestamps, "regions": regions, "question": question}


def propagate_video(models: DemoModels, session: VideoSession) -> VideoSession:
    """The session with SAM2's masks of every region on every frame (what the model will see)."""
    if models.sam2_propagator is None:
        raise DemoInputError("carrying regions to every frame needs a SAM2 model: start the demo with --sam2-model")
    masks = [{t: region.mask for t, region in r.items()} for r in session.regions]
    try:
        propagated = models.propagate(session.frames, masks)
    except ValueError as error:
        raise DemoInputError(str(error)) from error
    updated = copy.copy(session)
    updated.propagated = propagated
    return updated


def ask_video(
    models: DemoModels, session: VideoSession, question: str, propagate: bool, options: dict
) -> Iterator[str]:
    if not session.frames:
        raise DemoInputError("upload a video (or load the example) first")
    question = check_question(question, len(session.regions))
    if propagate:
        if models.sam2_model is None:
            raise DemoInputError("carrying regions to every frame needs a SAM2 model: start the demo with --sam2-model")
        options = {**options, "propagate_regions": True, "sam2_model": models.sam2_model}
    yield from _pipeline_errors(stream_answer(models.pipe, video_item(session, question), **options))


def _pipeline_errors(answers: Iterator[str]) -> Iterator[str]:
    """The pipeline's `ValueError`s (bad region, too many frames, ...) as page messages."""
    try:
        yield from answers
    except ValueError as error:
        if isinstance(error, DemoInputError):
            raise
        raise DemoInputError(str(error)) from error


# ---------------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------------


# Status texts are Markdown, which would swallow `<region>` as an HTML tag: messages are escaped.
def _reported(body, render):
    """Run an event's `body`; a `DemoInputError` becomes its message in the page and anything unexpected one line
    (the traceback goes to the server log), both shown through `render(status)`, so the app keeps serving."""
    try:
        return body()
    except DemoInputError as error:
        return render(_error(error))
    except Exception as error:  # the server must keep serving
        return render(_unexpected(error))


def _ok(text: str) -> str:
    return html.escape(f"{text[:1].upper()}{text[1:]}.") if text else ""


def _error(error: BaseException) -> str:
    return f"**Error:** {html.escape(str(error))}"


def _unexpected(error: BaseException) -> str:
    # The visitor sees one line; the traceback goes to the server log.
    logger.error("web demo: unexpected error", exc_info=error)
    failure = html.escape(f"{type(error).__name__}: {error}")
    return f"**Error:** the server failed on this request ({failure}); it keeps serving"


def _model_banner(models: DemoModels) -> str:
    lines = [f"### PixelRefer region questions · model `{models.name}`"]
    if models.is_toy:
        lines.append(
            "**This is a toy model** (the bundled demo checkpoint, trained on synthetic coloured shapes): it names "
            "the colour and shape of a region of a synthetic scene and knows nothing about real photos. Start the "
            "demo with `--model` and a converted checkpoint for real answers."
        )
    helpers = [
        f"SAM `{models.sam_model}`: clicks and brushed strokes become masks"
        if models.sam_model
        else "no SAM model: regions are boxes and brushed masks (`--sam-model` adds click-to-mask)",
        f"SAM2 `{models.sam2_model}`: video regions are carried to every frame"
        if models.sam2_model
        else "no SAM2 model: a video region covers the frames it is drawn on (`--sam2-model` adds propagation)",
    ]
    lines.append(" · ".join(helpers))
    return "\n\n".join(lines)


def build_app(
    models: DemoModels,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    concurrency_limit: int = 1,
    title: str = "PixelRefer web demo",
):
    """The Gradio Blocks of the demo (image and video tabs), queued with `concurrency_limit` requests at a time.

    Launch it with [`launch_app`] (offline settings) or mount it in a FastAPI app with `gr.mount_gradio_app`."""
    gr = _import_gradio()
    try:
        # Gradio imports matplotlib (when installed) inside every event; two first events at once can see a half
        # imported module and fail. Importing it here, once, avoids that race.
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    click_modes = [CLICK_BOX, CLICK_SAM] if models.sam_model else [CLICK_BOX]

    def image_outputs(session: ImageSession, status: str):
        numbers = [str(n) for n in range(1, len(session.regions) + 1)]
        return (
            session,
            image_view(session),
            image_region_list(session),
            gr.update(choices=numbers, value=numbers[-1] if numbers else None),
            status,
        )

    def video_outputs(session: VideoSession, frame, status: str):
        numbers = [str(n) for n in range(1, len(session.regions) + 1)]
        targets = [NEW_REGION, *(f"region {n}" for n in numbers)]
        return (
            session,
            video_view(session, frame or 0),
            video_region_list(session),
            gr.update(choices=numbers, value=numbers[-1] if numbers else None),
            gr.update(choices=targets),
            status,
        )

    def guarded(outputs):
        """Wrap an image event so that a refused request keeps the session and shows its message, never a
        traceback."""

        def wrap(function):
            def run(session, *args):
                try:
                    return function(session, *args)
                except DemoInputError as error:
                    return outputs(session, _error(error))
                except Exception as error:  # the server must keep serving
                    return outputs(session, _unexpected(error))

            run.__name__ = function.__name__
            return run

        return wrap

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(_model_banner(models), elem_id="model-banner")

        def clickable_picture(what: str, elem_id: str, **value) -> gr.Image:
            """The picture a visitor clicks on to add regions (read-only: regions come from clicks and boxes)."""
            sam_hint = ", or a SAM point" if models.sam_model else ""
            return gr.Image(
                label=f"{what} (click: box corners{sam_hint})",
                interactive=False,
                type="numpy",
                height=448,
                elem_id=elem_id,
                buttons=["fullscreen"],
                **value,
            )

        with gr.Tab("Image", id="image-tab"):
            first = example_image()
            image_state = gr.State(ImageSession(image=first))
            with gr.Row():
                with gr.Column(scale=3):
                    image_display = clickable_picture(
                        "Regions", "image-view", value=image_view(ImageSession(image=first))
                    )
                    with gr.Row():
                        image_upload = gr.UploadButton(
                            "Upload an image", file_types=["image"], type="filepath", elem_id="image-upload"
                        )
                        click_mode = gr.Radio(click_modes, value=CLICK_BOX, label="A click on the picture adds")
                    with gr.Tab("Box"):
                        with gr.Row():
                            box_text = gr.Textbox(
                                label="Box x0,y0,x1,y1 (pixels)", placeholder="40,40,90,90", elem_id="box-input"
                            )
                            add_box_button = gr.Button("Add box", elem_id="add-box")
                    with gr.Tab("Brush"):
                        editor = gr.ImageEditor(
                            value={"background": first, "layers": [], "composite": first},
                            label="Brush over an object, then add the mask",
                            type="numpy",
                            image_mode="RGBA",
                            sources=[],
                            transforms=[],
                            layers=False,
                            format="png",
                            brush=gr.Brush(default_size=BRUSH_RADIUS, colors=["#ff00ff"], color_mode="fixed"),
                            elem_id="brush-editor",
                        )
                        with gr.Row():
                            refine = gr.Checkbox(
                                value=False,
                                label="refine the stroke with SAM",
                                interactive=bool(models.sam_model),
                                visible=bool(models.sam_model),
                            )
                            add_brush_button = gr.Button("Add brushed mask", elem_id="add-brush")
                with gr.Column(scale=2):
                    image_regions = gr.HTML(image_region_list(ImageSession(image=first)), elem_id="image-regions")
                    with gr.Row():
                        image_remove_choice = gr.Dropdown([], label="Region", scale=1, elem_id="image-remove-choice")
                        image_remove = gr.Button("Remove", scale=1, elem_id="image-remove")
                        image_clear = gr.Button("Clear all", scale=1, elem_id="image-clear")
                    image_question = gr.Textbox(
                        value="What is <region>?", label="Question", lines=2, elem_id="image-question"
                    )
                    with gr.Row():
                        image_insert = gr.Button("Insert <region>", size="sm", elem_id="image-insert")
                        image_examples = [gr.Button(q, size="sm") for q in IMAGE_QUESTIONS]
                    image_settings = _settings_accordion(gr, "image")
                    image_ask = gr.Button("Ask", variant="primary", elem_id="image-ask")
                    image_answer = gr.Textbox(label="Answer", interactive=False, elem_id="image-answer")
                    image_status = gr.Markdown("", elem_id="image-status")

        with gr.Tab("Video", id="video-tab"):
            video_state = gr.State(VideoSession())
            with gr.Row():
                with gr.Column(scale=3):
                    video_display = clickable_picture("Frame", "video-view")
                    frame_slider = gr.Slider(
                        0, 1, value=0, step=1, label="Frame", interactive=False, elem_id="frame-slider"
                    )
                    with gr.Row():
                        video_upload = gr.UploadButton(
                            "Upload a video", file_types=["video"], type="filepath", elem_id="video-upload"
                        )
                        video_example = gr.Button("Load the example video", elem_id="video-example")
                        video_click_mode = gr.Radio(click_modes, value=CLICK_BOX, label="A click on the frame adds")
                    with gr.Accordion("Decoding", open=False):
                        with gr.Row():
                            video_fps = gr.Number(1.0, label="frames per second", minimum=0.01)
                            video_max_frames = gr.Number(16, label="at most frames", precision=0, minimum=1)
                    with gr.Row():
                        video_target = gr.Dropdown([NEW_REGION], value=NEW_REGION, label="Add to", scale=1)
                        video_box_text = gr.Textbox(
                            label="Box x0,y0,x1,y1 on this frame",
                            placeholder="10,40,50,80",
                            scale=2,
                            elem_id="video-box",
                        )
                        video_add_box = gr.Button("Add box", scale=1, elem_id="video-add-box")
                with gr.Column(scale=2):
                    video_regions = gr.HTML(video_region_list(VideoSession()), elem_id="video-regions")
                    with gr.Row():
                        video_remove_choice = gr.Dropdown([], label="Region", scale=1)
                        video_remove = gr.Button("Remove", scale=1)
                        video_clear = gr.Button("Clear all", scale=1)
                    propagate = gr.Checkbox(
                        value=bool(models.sam2_model),
                        label="carry regions to every frame with SAM2",
                        interactive=bool(models.sam2_model),
                        visible=bool(models.sam2_model),
                    )
                    video_question = gr.Textbox(
                        value="Which way does <region> move?", label="Question", lines=2, elem_id="video-question"
                    )
                    with gr.Row():
                        video_insert = gr.Button("Insert <region>", size="sm")
                        video_examples = [gr.Button(q, size="sm") for q in VIDEO_QUESTIONS]
                    video_settings = _settings_accordion(gr, "video")
                    video_ask = gr.Button("Ask", variant="primary", elem_id="video-ask")
                    video_answer = gr.Textbox(label="Answer", interactive=False, elem_id="video-answer")
                    video_status = gr.Markdown("", elem_id="video-status")

        image_region_outputs = [image_state, image_display, image_regions, image_remove_choice, image_status]
        video_region_outputs = [
            video_state,
            video_display,
            video_regions,
            video_remove_choice,
            video_target,
            video_status,
        ]

        # -- image events ----------------------------------------------------------------------------------------
        @guarded(image_outputs)
        def on_image_upload(session, path):
            image = read_image_upload(path, max_image_pixels)
            return image_outputs(load_image(session, image), _ok(f"loaded {os.path.basename(path)}"))

        def on_image_upload_editor(session):
            # The brush editor paints over the current picture.
            return {"background": session.image, "layers": [], "composite": session.image}

        image_upload.upload(on_image_upload, [image_state, image_upload], image_region_outputs).then(
            on_image_upload_editor, [image_state], [editor]
        )

        @guarded(image_outputs)
        def on_add_box(session, text):
            session = add_image_box(session, text)
            return image_outputs(session, _ok(f"region {len(session.regions)} added"))

        add_box_button.click(on_add_box, [image_state, box_text], image_region_outputs)
        box_text.submit(on_add_box, [image_state, box_text], image_region_outputs)

        def on_image_click(session, mode, evt: gr.SelectData):
            try:
                x, y = to_picture_pixel(session.image.shape, *evt.index) if session.image is not None else (0, 0)
                session, message = add_image_click(models, session, mode, x, y)
                return image_outputs(session, _ok(message))
            except DemoInputError as error:
                return image_outputs(session, _error(error))
            except Exception as error:
                return image_outputs(session, _unexpected(error))

        image_display.select(on_image_click, [image_state, click_mode], image_region_outputs)

        @guarded(image_outputs)
        def on_add_brush(session, editor_value, use_sam):
            session = add_image_brush(models, session, editor_value, bool(use_sam))
            return image_outputs(session, _ok(f"region {len(session.regions)} added"))

        add_brush_button.click(on_add_brush, [image_state, editor, refine], image_region_outputs).then(
            on_image_upload_editor, [image_state], [editor]
        )

        @guarded(image_outputs)
        def on_image_remove(session, number):
            return image_outputs(remove_image_region(session, number), _ok(f"region {number} removed"))

        image_remove.click(on_image_remove, [image_state, image_remove_choice], image_region_outputs)
        image_clear.click(
            lambda session: image_outputs(ImageSession(image=session.image), _ok("regions cleared")),
            [image_state],
            image_region_outputs,
        )
        image_insert.click(insert_placeholder, [image_question], [image_question])
        for button, text in zip(image_examples, IMAGE_QUESTIONS):
            button.click(lambda text=text: text, None, [image_question])

        def on_image_ask(session, question, *settings):
            yield "", "Answering ..."
            started = time.perf_counter()
            try:
                answer = ""
                for answer in ask_image(models, session, question, generation_options(*settings)):
                    yield answer, "Answering ..."
                yield answer, _ok(f"answered in {time.perf_counter() - started:.1f} s")
            except DemoInputError as error:
                yield "", _error(error)
            except Exception as error:
                yield "", _unexpected(error)

        image_ask.click(on_image_ask, [image_state, image_question, *image_settings], [image_answer, image_status])

        # -- video events ----------------------------------------------------------------------------------------
        def video_loaded(session, status):
            last = max(len(session.frames) - 1, 0)
            return (
                *video_outputs(session, 0, status),
                gr.update(minimum=0, maximum=max(last, 1), value=0, interactive=last > 0),
            )

        def video_load_failed(session, status, frame):
            return (*video_outputs(session, frame, status), gr.update())

        video_load_outputs = [*video_region_outputs, frame_slider]

        def on_video_upload(session, path, fps, max_frames, frame):
            try:
                frames, timestamps = read_video_upload(path, fps, max_frames, max_image_pixels)
                name = os.path.basename(path)
                session = load_video(session, frames, timestamps, name)
                return video_loaded(session, _ok(f"decoded {len(frames)} frames of {name}"))
            except DemoInputError as error:
                return video_load_failed(session, _error(error), frame)
            except Exception as error:
                return video_load_failed(session, _unexpected(error), frame)

        video_upload.upload(
            on_video_upload,
            [video_state, video_upload, video_fps, video_max_frames, frame_slider],
            video_load_outputs,
        )

        def on_video_example(session):
            frames, timestamps = example_video()
            return video_loaded(load_video(session, frames, timestamps, "example"), _ok("example video loaded"))

        video_example.click(on_video_example, [video_state], video_load_outputs)
        frame_slider.change(
            lambda session, frame: video_view(session, frame), [video_state, frame_slider], [video_display]
        )

        def on_video_box(session, frame, target, text):
            def body():
                updated = add_video_box(session, frame, target, text)
                return video_outputs(updated, frame, _ok(f"box added on frame {int(frame)}"))

            return _reported(body, lambda status: video_outputs(session, frame, status))

        video_add_box.click(
            on_video_box, [video_state, frame_slider, video_target, video_box_text], video_region_outputs
        )

        def on_video_click(session, frame, target, mode, evt: gr.SelectData):
            def body():
                x, y = to_picture_pixel(session.frames[0].shape, *evt.index) if session.frames else (0, 0)
                updated, message = add_video_click(models, session, frame, target, mode, x, y)
                return video_outputs(updated, frame, _ok(message))

            return _reported(body, lambda status: video_outputs(session, frame, status))

        video_display.select(
            on_video_click, [video_state, frame_slider, video_target, video_click_mode], video_region_outputs
        )

        def on_video_remove(session, frame, number):
            def body():
                return video_outputs(remove_video_region(session, number), frame, _ok(f"region {number} removed"))

            return _reported(body, lambda status: video_outputs(session, frame, status))

        video_remove.click(on_video_remove, [video_state, frame_slider, video_remove_choice], video_region_outputs)
        video_clear.click(
            lambda session, frame: video_outputs(
                VideoSession(frames=session.frames, timestamps=session.timestamps, name=session.name),
                frame,
                _ok("regions cleared"),
            ),
            [video_state, frame_slider],
            video_region_outputs,
        )
        video_insert.click(insert_placeholder, [video_question], [video_question])
        for button, text in zip(video_examples, VIDEO_QUESTIONS):
            button.click(lambda text=text: text, None, [video_question])

        def on_video_ask(session, frame, question, carry, *settings):
            started = time.perf_counter()
            yield session, video_view(session, frame), video_region_list(session), "", "Answering ..."
            try:
                options = generation_options(*settings)
                if carry and session.regions:
                    check_question(question, len(session.regions))
                    session = propagate_video(models, session)
                    yield session, video_view(session, frame), video_region_list(session), "", "Answering ..."
                answer = ""
                for answer in ask_video(models, session, question, bool(carry), options):
                    yield session, gr.update(), gr.update(), answer, "Answering ..."
                yield (
                    session,
                    gr.update(),
                    gr.update(),
                    answer,
                    _ok(f"answered in {time.perf_counter() - started:.1f} s"),
                )
            except DemoInputError as error:
                yield session, gr.update(), gr.update(), "", _error(error)
            except Exception as error:
                yield session, gr.update(), gr.update(), "", _unexpected(error)

        video_ask.click(
            on_video_ask,
            [video_state, frame_slider, video_question, propagate, *video_settings],
            [video_state, video_display, video_regions, video_answer, video_status],
        )

    app.queue(default_concurrency_limit=concurrency_limit)
    return app


def _settings_accordion(gr, prefix: str) -> list:
    with gr.Accordion("Generation settings", open=False):
        max_new_tokens = gr.Slider(
            1, 512, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="max new tokens", elem_id=f"{prefix}-max-new-tokens"
        )
        do_sample = gr.Checkbox(value=False, label="sample (otherwise greedy)")
        temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="temperature (when sampling)")
        top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="top-p (when sampling)")
    return [max_new_tokens, do_sample, temperature, top_p]


def theme():
    """Gradio's default look with system fonts, so that the page never asks Google Fonts for anything."""
    gr = _import_gradio()
    return gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(MONO_FONTS))


def launch_app(
    app,
    host: str = "127.0.0.1",
    port: int = 7860,
    block: bool = True,
    max_file_size: str | int | None = DEFAULT_MAX_UPLOAD,
    quiet: bool = False,
):
    """Serve `app` offline: no share link, no analytics, no server-side rendering (which would start Node.js), uploads
    bounded by `max_file_size`. With `block=False` it returns at once (tests); stop it with `app.close()`."""
    gr = _import_gradio()
    del gr  # imported for its environment setting only
    return app.launch(
        server_name=host,
        server_port=port,
        share=False,
        ssr_mode=False,
        show_error=False,
        prevent_thread_lock=not block,
        max_file_size=max_file_size,
        quiet=quiet,
        theme=theme(),
        css=CSS,
        footer_links=[],
        pwa=False,
        mcp_server=False,
    )


def serve(
    model: str = "demo",
    sam_model: str | None = None,
    sam2_model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str = "cpu",
    concurrency: int = 1,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> None:
    """Load the models once and serve the demo until interrupted (`pixelrefer web`)."""
    _import_gradio()  # fail before loading a large model when Gradio is missing
    std_logging.getLogger("httpx").setLevel(std_logging.WARNING)
    models = DemoModels.load(model, sam_model=sam_model, sam2_model=sam2_model, device=device)
    app = build_app(models, max_image_pixels=max_image_pixels, concurrency_limit=concurrency)
    print(f"Serving the PixelRefer web demo on http://{host}:{port} (Ctrl+C stops it)")
    launch_app(app, host=host, port=port, block=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m pixelrefer_hf.web_demo ...`: the same as `pixelrefer web ...`."""
    import sys

    from .cli import main as cli_main

    return cli_main(["web", *(sys.argv[1:] if argv is None else argv)])


__all__ = [
    "DemoInputError",
    "DemoModels",
    "ImageSession",
    "Region",
    "VideoSession",
    "build_app",
    "launch_app",
    "main",
    "serve",
]


if __name__ == "__main__":
    raise SystemExit(main())
