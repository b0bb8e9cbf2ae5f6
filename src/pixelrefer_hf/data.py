"""Region-chat datasets for fine-tuning PixelRefer on `datasets`, and converters from the official annotation JSON.

One row of a region-chat dataset is one training conversation about one image or one video:

* `id` (`string`): a stable name for the row, quoted by every error and warning of [`PixelReferDataCollator`];
* `image` (`Image`, nullable): the image of an image sample;
* `frames` (`List(Image)`): the frames of a video sample (empty for an image sample);
* `timestamps` (`List(float32)`): seconds of each frame (empty for an image sample);
* `regions` (`List(List({"frame": int32, "rle": {"size": [h, w], "counts": str}}))`): per region, in `<region>`
  order, its masks as compressed COCO RLE, one per annotated frame (`frame` is 0 for an image and the position in
  `frames` for a video, so an object annotated on several frames is one region);
* `messages` (`List({"role": str, "content": str})`): the conversation; user turns refer to regions with
  `<region>`, and an `<image>` / `<video>` tag may mark where the visual tokens go (default: the start of the first
  user turn).

Images are stored undecoded (`Image(decode=False)`, a `{"bytes", "path"}` dict) by default: the collator opens them, so
a missing or corrupt file becomes an error that names the row instead of an exception deep inside a data-loader worker.
Masks are kept as compressed RLE strings (a few hundred bytes per mask), which survive `save_to_disk` and parquet
unchanged and decode with the pure-numpy codec of `region_utils` (no pycocotools needed).

The official PixelRefer / VideoRefer-700K / Osprey-style training files (a JSON list of samples with `image` or
`video`, `conversations` of `{"from", "value"}` turns and `masks` as RLE, uncompressed RLE or polygons) convert with
[`load_official_annotations`]. This module is not remote code: it is never copied into a checkpoint folder.
"""

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage
from transformers.utils import logging

from .media_io import DEFAULT_FPS, DEFAULT_MAX_FRAMES, displayed_image_size, read_video
from .processing_pixelrefer import check_region_placeholders
from .region_utils import polygons_to_mask, region_to_mask, rle_decode, rle_encode

logger = logging.get_logger(__name__)

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
# Official `from` values -> chat roles.
_OFFICIAL_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")


def region_chat_features(decode_images: bool = False) -> Features:
    """The `datasets.Features` of a region-chat dataset (see the module docstring).

    Args:
        decode_images (`bool`, *optional*, defaults to `False`):
            Whether `image` / `frames` decode to PIL images when a row is read. Leave it `False` for training: the
            collator then opens the files itself and names the row when one is missing or corrupt.
    """
    rle = {"size": List(Value("int32"), length=2), "counts": Value("string")}
    return Features(
        {
            "id": Value("string"),
            "image": Image(decode=decode_images),
            "frames": List(Image(decode=decode_images)),
            "timestamps": List(Value("float32")),
            "regions": List(List({"frame": Value("int32"), "rle": rle})),
            "messages": List({"role": Value("string"), "content": Value("string")}),
        }
    )


def _image_size(image) -> tuple[int, int] | None:
    """`(H, W)` of an in-memory image, `None` for a path or an undecoded dict (size unknown without opening it)."""
    if isinstance(image, PILImage.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray) and image.ndim == 3:
        return image.shape[0], image.shape[1]
    if isinstance(image, torch.Tensor) and image.ndim == 3:
        # CHW when the first axis looks like channels, else HWC (the processor's rule).
        return tuple(image.shape[1:]) if image.shape[0] in (1, 3, 4) else tuple(image.shape[:2])
    return None


def encode_region_mask(region, image_size: tuple[int, int] | None, where: str) -> dict:
    """One region on one frame -> compressed COCO RLE `{"size": [h, w], "counts": str}`.

    `region` is anything `region_utils.region_to_mask` accepts: a binary mask, a COCO RLE (compressed or not), a
    polygon dict `{"polygons": [...]}` or a box `[x0, y0, x1, y1]`. Boxes and polygons need `image_size = (H, W)`;
    masks and RLEs carry their own size, which must match `image_size` when it is known.
    """
    if isinstance(region, dict) and ("counts" in region or "size" in region):
        try:
            mask = rle_decode(region)
        except ValueError as error:
            raise ValueError(f"{where}: invalid COCO RLE: {error}") from error
        size = mask.shape
    elif isinstance(region, (np.ndarray, torch.Tensor, PILImage.Image)) and np.ndim(region) >= 2:
        size = region.size[::-1] if isinstance(region, PILImage.Image) else tuple(region.shape[-2:])
        mask = None
    elif image_size is None:
        raise ValueError(f"{where}: a box or polygon region needs the image size; pass the image itself, not a path")
    else:
        size, mask = image_size, None
    if image_size is not None and tuple(size) != tuple(image_size):
        raise ValueError(f"{where}: the mask is {size[0]}x{size[1]} but the image is {image_size[0]}x{image_size[1]}")
    mask = region_to_mask(region if mask is None else mask, tuple(size), where)
    return rle_encode(mask)


def make_region_chat_row(
    messages: Sequence[dict],
    *,
    image=None,
    frames: Sequence | None = None,
    timestamps: Sequence[float] | None = None,
    regions: Sequence = (),
    id: str | None = None,
) -> dict:
    """Build one row of a region-chat dataset.

    Args:
        messages (`list[dict]`): `{"role": "system" | "user" | "assistant", "content": str}` turns; user turns hold one
            `<region>` per region, in the order of `regions`.
        image (*optional*): the image (PIL, numpy HWC, path or `{"bytes", "path"}` dict) of an image sample.
        frames (*optional*): the frames of a video sample (same forms as `image`).
        timestamps (*optional*): seconds of each frame; defaults to the frame index (1 fps).
        regions: image sample: one mask / RLE / polygon dict / box per region. Video sample: one dict
            `{frame_index: mask | rle | polygons | box}` per region.
        id (`str`, *optional*): the row's name in errors; [`build_region_chat_dataset`] fills in the position.

    Returns:
        `dict`: a row matching [`region_chat_features`], masks encoded as compressed RLE.
    """
    where = f"row {id!r}" if id is not None else "row"
    frames = list(frames) if frames is not None else []
    if image is not None and frames:
        raise ValueError(f"{where}: give an image or video frames, not both")
    if timestamps is None:
        timestamps = [float(t) for t in range(len(frames))]
    elif len(timestamps) != len(frames):
        raise ValueError(f"{where}: {len(timestamps)} timestamps for {len(frames)} frames")
    encoded_regions = []
    for j, region in enumerate(regions):
        region_where = f"{where}, region {j}"
        if frames:
            if not isinstance(region, dict) or "counts" in region or "polygons" in region or not region:
                raise ValueError(f"{region_where}: a video region must be a non-empty dict {{frame_index: mask}}")
            entries = []
            for frame, value in sorted(region.items(), key=lambda item: int(item[0])):
                frame = int(frame)
                if not 0 <= frame < len(frames):
                    raise ValueError(f"{region_where}: frame {frame} is out of range for {len(frames)} frames")
                size = _image_size(frames[frame])
                rle = encode_region_mask(value, size, f"{region_where}, frame {frame}")
                entries.append({"frame": frame, "rle": rle})
            encoded_regions.append(entries)
        else:
            if image is None:
                raise ValueError(f"{where}: regions were given without an image or frames")
            encoded_regions.append([{"frame": 0, "rle": encode_region_mask(region, _image_size(image), region_where)}])
    return {
        "id": id,
        "image": image,
        "frames": frames,
        "timestamps": [float(t) for t in timestamps],
        "regions": encoded_regions,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
    }


def build_region_chat_dataset(rows: Iterable[dict], decode_images: bool = False) -> Dataset:
    """A `datasets.Dataset` with [`region_chat_features`] from rows of [`make_region_chat_row`].

    Rows without an `id` get their position (`"0"`, `"1"`, ...), so every error of the collator can be traced back.
    """
    rows = [dict(row, id=str(i) if row.get("id") is None else str(row["id"])) for i, row in enumerate(rows)]
    return Dataset.from_list(rows, features=region_chat_features(decode_images))


_SYNTHETIC_COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
_SYNTHETIC_SHAPES = ("square", "circle")


def synthetic_region_chat_dataset(
    num_samples: int = 16, seed: int = 0, image_size: tuple[int, int] = (56, 84), decode_images: bool = False
) -> Dataset:
    """A small region-chat dataset of coloured squares and circles on grey noise, answerable from the region alone.

    Each row asks `What is <region>?` about one shape and is answered `A <colour> <shape>.`; every fourth row asks about
    two shapes at once. Meant for smoke tests, examples and CPU demos (the words are in the tiny tokenizer's corpus).
    """
    rng = np.random.default_rng(seed)
    height, width = image_size
    row_index = np.arange(height)[:, None]
    col_index = np.arange(width)[None, :]
    rows = []
    for index in range(num_samples):
        image = rng.integers(100, 156, size=(height, width, 3), dtype=np.uint8)
        num_shapes = 2 if index % 4 == 3 else 1
        masks, names = [], []
        for k in range(num_shapes):
            colour = list(_SYNTHETIC_COLOURS)[int(rng.integers(len(_SYNTHETIC_COLOURS)))]
            shape = _SYNTHETIC_SHAPES[int(rng.integers(len(_SYNTHETIC_SHAPES)))]
            side = int(rng.integers(14, min(height, width // 2) - 2))
            # Shapes of a two-shape row sit in different halves of the image, so their masks never overlap.
            top = int(rng.integers(0, height - side + 1))
            left = k * (width // 2) + int(rng.integers(0, width // 2 - side + 1))
            if shape == "square":
                mask = (row_index >= top) & (row_index < top + side) & (col_index >= left) & (col_index < left + side)
            else:
                centre_row, centre_col, radius = top + side / 2, left + side / 2, side / 2
                mask = (row_index + 0.5 - centre_row) ** 2 + (col_index + 0.5 - centre_col) ** 2 <= radius**2
            image[mask] = _SYNTHETIC_COLOURS[colour]
            masks.append(mask)
            names.append(f"a {colour} {shape}")
        if num_shapes == 1:
            question, answer = "What is <region>?", f"{names[0].capitalize()}."
        else:
            question, answer = "What are <region> and <region>?", f"{names[0].capitalize()} and {names[1]}."
        rows.append(
            make_region_chat_row(
                [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                image=PILImage.fromarray(image),
                regions=masks,
                id=f"synthetic-{index}",
            )
        )
    return build_region_chat_dataset(rows, decode_images)


# ---------------------------------------------------------------------------------------------------------------------
# Rows -> processor inputs (used by the collator)
# ---------------------------------------------------------------------------------------------------------------------


def row_regions(row: dict) -> list:
    """The row's regions in the form `PixelReferProcessor` takes: an RLE per image region, `{frame: rle}` per video
    region. Every RLE is decoded once here so that a corrupt one is reported (`"region 1, frame 0: ..."`) before the
    processor runs."""
    is_video = bool(row.get("frames"))
    regions = []
    row_regions_value = row.get("regions")
    if row_regions_value is None:
        row_regions_value = []
    if not isinstance(row_regions_value, (list, tuple)):
        raise ValueError(
            f"'regions' must be a list (per region a list of {{'frame', 'rle'}} masks), got "
            f"{type(row_regions_value).__name__}"
        )
    for j, entries in enumerate(row_regions_value):
        if not isinstance(entries, (list, tuple)) or not all(isinstance(entry, dict) for entry in entries):
            raise ValueError(f"region {j} must be a list of {{'frame', 'rle'}} dicts, got {type(entries).__name__}")
        if not entries:
            raise ValueError(f"region {j} has no mask")
        for entry in entries:
            frame = entry.get("frame")
            if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)):
                raise ValueError(f"region {j}: a mask's 'frame' must be an integer, got {frame!r}")
            try:
                rle_decode(entry["rle"])
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"region {j}, frame {entry.get('frame')}: the RLE does not decode: {error}") from error
        if is_video:
            regions.append({int(entry["frame"]): entry["rle"] for entry in entries})
        else:
            if len(entries) != 1 or entries[0]["frame"] != 0:
                raise ValueError(f"region {j}: an image region must have exactly one mask, on frame 0")
            regions.append(entries[0]["rle"])
    return regions


# ---------------------------------------------------------------------------------------------------------------------
# Official annotation formats
# ---------------------------------------------------------------------------------------------------------------------


def official_mask_to_rle(annotation, height: int | None, width: int | None, where: str) -> dict:
    """One official mask annotation -> compressed COCO RLE.

    Accepted (official_spec §7.2): a compressed RLE `{"size", "counts": str}`, an uncompressed RLE
    `{"size", "counts": list[int]}`, or a list of polygons `[[x0, y0, x1, y1, ...], ...]` (their union), which needs
    the sample's `height` and `width`.
    """
    if isinstance(annotation, dict):
        return encode_region_mask(annotation, None if height is None else (height, width), where)
    if isinstance(annotation, list):
        if height is None or width is None:
            raise ValueError(f"{where}: a polygon mask needs the sample's height and width")
        try:
            mask = polygons_to_mask(annotation, height, width)
        except ValueError as error:
            raise ValueError(f"{where}: invalid polygons: {error}") from error
        return encode_region_mask(mask, (height, width), where)
    raise ValueError(f"{where}: a mask must be an RLE dict or a list of polygons, got {type(annotation).__name__}")


def official_conversation_to_messages(conversations, where: str) -> list[dict]:
    """Official `[{"from": "human" | "gpt", "value": str}]` -> `[{"role", "content"}]`.

    Leading assistant turns are dropped, as the official loader does; a conversation without a user turn followed by an
    assistant turn is an error (nothing would be supervised).
    """
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{where}: the conversation is empty")
    messages = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}, turn {k}: a turn must be a dict with a string 'value'")
        role = _OFFICIAL_ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"{where}, turn {k}: unknown speaker {turn.get('from')!r}; use 'human' or 'gpt'")
        if role == "assistant" and not any(m["role"] == "user" for m in messages):
            continue
        messages.append({"role": role, "content": turn["value"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant answer after a user turn")
    return messages


def _official_frame_key(key, where: str) -> int:
    """A mask's frame key (`"3"` in JSON, or `3`) as an int."""
    try:
        if isinstance(key, (bool, float)):
            raise ValueError
        return int(key)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: a mask frame key must be an integer, got {key!r}") from None


def _official_image_size(path: Path, what: str, where: str) -> tuple[int, int]:
    """`(width, height)` of an image file as `media_io.load_image` will give it (EXIF orientation applied), read from
    its header."""
    if not path.is_file():
        raise ValueError(f"{where}: {what} {path} does not exist")
    try:
        return displayed_image_size(path)
    except (OSError, SyntaxError, PILImage.DecompressionBombError) as error:
        raise ValueError(f"{where}: cannot read {what} {path}: {error}") from error


def convert_official_sample(
    sample: dict,
    index: int,
    media_root: str | Path,
    video_fps: float = DEFAULT_FPS,
    max_frames: int | None = DEFAULT_MAX_FRAMES,
) -> dict:
    """Convert one official annotation (official_spec §7.2) into a region-chat row.

    * `image`: a path relative to `media_root` (or a one-element list); stored as a path, opened by the collator.
    * `video`: a one-element list with a video file (decoded here by `media_io.read_video`, the pipeline's decoder,
      at `video_fps` with at most `max_frames` grid frames, plus every annotated frame, since the processor takes each
      region's crop from the video's own frames), or a list of frame images with `timestamps` (mask frame keys are
      then positions in that list).
    * `masks`: one entry per `<region>`, in order: an RLE / uncompressed RLE / polygon list for an image, a
      `{"<frame>": mask}` dict for a video. Polygons need `height` / `width` (read from the image file when absent).
    * `conversations`: `{"from", "value"}` turns with `<region>` placeholders and optional `<image>` / `<video>` tags.

    The row's `id` is the sample's own `id` when it has one, else its position `index` in the file.
    """
    if not isinstance(sample, dict):
        raise ValueError(f"annotation {index}: a sample must be a JSON object")
    row_id = str(sample["id"]) if sample.get("id") is not None else str(index)
    where = f"annotation {index} (id {row_id!r})" if sample.get("id") is not None else f"annotation {index}"
    media_root = Path(media_root)
    messages = official_conversation_to_messages(sample.get("conversations"), where)
    masks = sample.get("masks")
    masks = [] if masks is None else masks
    if not isinstance(masks, list):
        raise ValueError(f"{where}: 'masks' must be a list (one mask per <region>), got {type(masks).__name__}")
    check_region_placeholders(where, [message["content"] for message in messages], len(masks))
    size = _official_mask_size(sample, where)
    row = {"id": row_id, "image": None, "frames": [], "timestamps": [], "regions": [], "messages": messages}

    if sample.get("image") is not None:
        return {**row, **_official_image_media(sample["image"], masks, size, media_root, where)}
    video = sample.get("video")
    if video is None:
        if masks:
            raise ValueError(f"{where}: masks were given without an image or video")
        return row
    video = [video] if isinstance(video, str) else video
    if not isinstance(video, list) or not video or not all(isinstance(path, str) for path in video):
        raise ValueError(f"{where}: 'video' must be a path or a list of paths")
    for j, mask in enumerate(masks):
        if not isinstance(mask, dict) or not mask or "counts" in mask:
            raise ValueError(f"{where}, region {j}: a video mask must be a dict {{frame_index: mask}}")
    annotated = sorted({_official_frame_key(k, f"{where}, region {j}") for j, mask in enumerate(masks) for k in mask})
    if len(video) == 1:
        media = _official_video_file_media(media_root / video[0], annotated, video_fps, max_frames, where)
    else:
        media = _official_frame_list_media(video, sample.get("timestamps"), annotated, media_root, where)
    position = media.pop("position")
    if media["frames"] and isinstance(media["frames"][0], PILImage.Image):
        size = (media["frames"][0].height, media["frames"][0].width)
    elif masks and None in size and annotated:
        width, height = _official_image_size(Path(media["frames"][annotated[0]]), "frame file", where)
        size = (height, width)
    regions = []
    for j, mask in enumerate(masks):
        entries = sorted(mask.items(), key=lambda item: _official_frame_key(item[0], where))
        regions.append(
            [
                {"frame": position[int(k)], "rle": official_mask_to_rle(m, *size, f"{where}, region {j}")}
                for k, m in entries
            ]
        )
    return {**row, **media, "regions": regions}


def _official_mask_size(sample: dict, where: str) -> tuple[int | None, int | None]:
    """`(height, width)` the sample states for its masks (needed by polygons), each `None` when absent."""
    size = []
    for name in ("height", "width"):
        value = sample.get(name)
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # `480.0` in some JSON files
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: '{name}' must be a positive integer, got {value!r}")
        size.append(value)
    return size[0], size[1]


def _official_image_media(image, masks: list, size: tuple, media_root: Path, where: str) -> dict:
    """The `image` and `regions` of an image sample: the path (opened by the collator) and one RLE per mask."""
    if isinstance(image, list):
        if len(image) != 1:
            raise ValueError(f"{where}: only single-image samples are supported, got {len(image)} images")
        image = image[0]
    if not isinstance(image, str):
        raise ValueError(f"{where}: 'image' must be a path, got {type(image).__name__}")
    image_path = media_root / image
    height, width = size
    if masks and (height is None or width is None):
        width, height = _official_image_size(image_path, "image file", where)
    regions = [
        [{"frame": 0, "rle": official_mask_to_rle(mask, height, width, f"{where}, region {j}")}]
        for j, mask in enumerate(masks)
    ]
    return {"image": str(image_path), "regions": regions}


def _official_video_file_media(
    path: Path, annotated: list[int], fps: float, max_frames: int | None, where: str
) -> dict:
    """Frames of a video file decoded as the pipeline decodes it, plus the annotated frames; `position` maps a
    source frame number to its place among the kept frames."""
    if not path.exists():
        raise ValueError(f"{where}: video file {path} does not exist")
    try:
        video = read_video(path, fps=fps, max_frames=max_frames, required_frames=annotated)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error
    return {
        "frames": [PILImage.fromarray(frame) for frame in video.frames],
        "timestamps": [float(t) for t in video.timestamps],
        "position": {number: k for k, number in enumerate(video.frame_numbers)},
    }


def _official_frame_list_media(
    frames: list[str], timestamps, annotated: list[int], media_root: Path, where: str
) -> dict:
    """A video given as frame image files (opened by the collator); mask frame keys are positions in the list."""
    paths = [str(media_root / frame) for frame in frames]
    timestamps = list(range(len(paths))) if timestamps is None else timestamps
    try:
        timestamps = [float(t) for t in timestamps]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: 'timestamps' must be a list of numbers, one per frame") from error
    if len(timestamps) != len(paths):
        raise ValueError(f"{where}: {len(timestamps)} timestamps for {len(paths)} frames")
    if annotated and not 0 <= annotated[-1] < len(paths):
        raise ValueError(f"{where}: mask frame {annotated[-1]} is out of range for {len(paths)} frames")
    return {"frames": paths, "timestamps": timestamps, "position": {k: k for k in range(len(paths))}}


def load_official_annotations(
    path: str | Path,
    media_root: str | Path | None = None,
    skip_bad_samples: bool = False,
    video_fps: float = DEFAULT_FPS,
    max_frames: int | None = DEFAULT_MAX_FRAMES,
    decode_images: bool = False,
) -> Dataset:
    """Convert an official annotation file (a JSON list, or JSON lines) into a region-chat `Dataset`.

    Args:
        path: the annotation file.
        media_root: folder the `image` / `video` paths are relative to; defaults to the file's folder.
        skip_bad_samples (`bool`, *optional*, defaults to `False`): drop samples that cannot be converted (counted
            in one warning) instead of raising a `ValueError` that names the first one.
        video_fps, max_frames: frame sampling of video files, the pipeline's by default (`media_io.read_video`:
            1 fps, at most 32 grid frames; the official training recipe caps at 180 frames).
        decode_images: see [`region_chat_features`].
    """
    path = Path(path)
    media_root = Path(media_root) if media_root is not None else path.parent
    text = path.read_text()
    try:
        samples = json.loads(text)
    except json.JSONDecodeError:
        samples = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(samples, list):
        raise ValueError(f"{path}: expected a JSON list of samples")
    rows, skipped = [], []
    for index, sample in enumerate(samples):
        try:
            rows.append(convert_official_sample(sample, index, media_root, video_fps, max_frames))
        except ValueError as error:
            if not skip_bad_samples:
                raise ValueError(f"{path}: {error}") from error
            skipped.append(str(error))
    if skipped:
        logger.warning(
            f"{path}: skipped {len(skipped)} of {len(samples)} samples that cannot be converted; first: {skipped[0]}"
        )
    if not rows:
        raise ValueError(f"{path}: no sample could be converted")
    return build_region_chat_dataset(rows, decode_images)


__all__ = [
    "build_region_chat_dataset",
    "convert_official_sample",
    "encode_region_mask",
    "load_official_annotations",
    "make_region_chat_row",
    "official_conversation_to_messages",
    "official_mask_to_rle",
    "region_chat_features",
    "row_regions",
    "synthetic_region_chat_dataset",
]
