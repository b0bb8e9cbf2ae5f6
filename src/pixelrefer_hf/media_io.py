"""The one image loader and the one video decoder of the package: training rows, evaluation and inference (the
pipeline, the command line) all read media through `load_image` and `read_video`, so a model sees the same pixels
for the same file whichever way it is used.

* `load_image`: a file path, encoded bytes, a PIL image, an array or a tensor -> `(H, W, 3)` RGB uint8, with the EXIF
  orientation of files applied (region coordinates refer to the picture as viewers display it).
* `read_video` (PyAV, the optional `video` extra): PixelRefer samples videos sparsely (about 1 frame per second, at
  most a few dozen frames), so the file is decoded once and only the frames on a regular time grid are kept, plus any
  frame a region is annotated on. The frames and their times in seconds are what [`PixelReferProcessor`] takes as
  `videos` and `video_timestamps`.

    >>> from pixelrefer_hf.media_io import read_video
    >>> video = read_video("clip.mp4", fps=1.0, max_frames=16)  # doctest: +SKIP
    >>> frames, timestamps = video.frames, video.timestamps  # doctest: +SKIP
"""

import io
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps
from transformers.utils import logging

from .image_processing_pixelrefer import to_rgb_array

try:
    import av
except ImportError:  # the `video` extra is optional; `read_video` says how to install it
    av = None


logger = logging.get_logger(__name__)

INSTALL_HINT = 'reading video files needs PyAV: pip install "pixelrefer-hf[video]" (or pip install av)'
# Frame sampling of every video file read by the package (pipeline, command line, training rows, evaluation).
DEFAULT_FPS = 1.0
DEFAULT_MAX_FRAMES = 32


# EXIF orientations that turn the picture by 90 degrees (width and height swap when it is displayed).
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


def displayed_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """`(width, height)` of an image file as `load_image` gives it (EXIF orientation applied), from its header only.
    Raises what Pillow raises for an unreadable file."""
    with Image.open(path) as opened:
        width, height = opened.size
        if opened.getexif().get(0x0112) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
    return width, height


def load_image(image, where: str, max_pixels: int | None = None) -> np.ndarray:
    """An image -> `(H, W, 3)` RGB uint8.

    Args:
        image: a local file path, a `datasets` image dict (`{"bytes": ..., "path": ...}`), a PIL image, a numpy array
            (HWC or CHW) or a torch tensor. Files and bytes are decoded with their EXIF orientation applied.
        where (`str`): what to name in an error (`"item 3: image"`, `"dataset sample 'a', image"`).
        max_pixels (`int`, *optional*): refuse a file larger than this many pixels from its header, before its
            pixels are decoded (the image processor's `max_image_pixels`; Pillow's own decompression-bomb limit
            applies anyway).
    """
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            source, name = io.BytesIO(image["bytes"]), image.get("path") or "embedded bytes"
        elif image.get("path"):
            source = name = os.fspath(image["path"])
        else:
            raise ValueError(f"{where}: an image dict needs 'bytes' or 'path'")
    elif isinstance(image, (str, os.PathLike)):
        source = name = os.fspath(image)
    else:
        return to_rgb_array(image, where)
    if isinstance(source, str) and not os.path.isfile(source):
        raise ValueError(f"{where}: cannot read image {name!r}: no such file")
    try:
        with Image.open(source) as opened:
            if max_pixels is not None and opened.width * opened.height > max_pixels:
                raise ValueError(
                    f"{where}: image {name!r} is {opened.height}x{opened.width} = {opened.width * opened.height} "
                    f"pixels, more than max_image_pixels={max_pixels} (an image processor option)"
                )
            decoded = ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, Image.DecompressionBombError, SyntaxError) as error:
        # SyntaxError: how some Pillow plugins report a malformed header.
        raise ValueError(f"{where}: cannot read image {name!r}: {error}") from error
    except ValueError as error:
        if str(error).startswith(where):
            raise
        raise ValueError(f"{where}: cannot read image {name!r}: {error}") from error
    return np.asarray(decoded)


@dataclass
class DecodedVideo:
    """Frames sampled from a video file.

    Attributes:
        frames (`list[np.ndarray]`): `(H, W, 3)` RGB uint8 frames in time order.
        timestamps (`list[float]`): presentation time of each frame in seconds, from the start of the stream.
        source_fps (`float | None`): the stream's average frame rate, when the container states one.
        frame_numbers (`list[int]`): the position of each kept frame among all decoded frames of the stream (what
            annotation files call a frame index).
    """

    frames: list[np.ndarray]
    timestamps: list[float]
    source_fps: float | None
    frame_numbers: list[int]


def _stream_duration(container, stream) -> float | None:
    """Duration of the video stream in seconds, or `None` when neither the stream nor the container states it."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def read_video(
    path: str | os.PathLike,
    fps: float = DEFAULT_FPS,
    max_frames: int | None = DEFAULT_MAX_FRAMES,
    show_progress: bool = False,
    max_pixels: int | None = None,
    required_frames: Iterable[int] = (),
) -> DecodedVideo:
    """Decode `path` and keep about `fps` frames per second, at most `max_frames` of them, plus `required_frames`.

    Args:
        path (`str` or `os.PathLike`): a local video file (anything FFmpeg reads: mp4, webm, avi, mkv, gif, ...).
        fps (`float`, *optional*, defaults to 1.0): sampling rate. A frame is kept when its time reaches the next
            point of the grid `0, 1/fps, 2/fps, ...`; a video with fewer frames per second keeps all its frames.
        max_frames (`int`, *optional*, defaults to 32): upper bound on the number of frames. When the stream states
            its duration and the grid would hold more frames, the sampling rate is lowered so that the kept frames
            still span the whole video; otherwise decoding stops after `max_frames` frames. `None` keeps every frame
            of the grid.
        show_progress (`bool`, *optional*, defaults to `False`): show a progress bar over the decoded frames.
        max_pixels (`int`, *optional*): refuse a stream whose frames have more than this many pixels, from its header
            and before any frame is decoded (the image processor's `max_image_pixels`).
        required_frames (iterable of `int`, *optional*): frame numbers (positions among the stream's decoded frames)
            to keep whatever the grid says, e.g. the frames a training annotation draws its regions on. They do not
            count towards `max_frames`.

    Returns:
        [`DecodedVideo`] with the frames, their timestamps in seconds and the stream's frame rate.

    Raises:
        `ImportError` when PyAV is not installed; `ValueError` naming the file when it cannot be read, holds no video
        stream or yields no frame, when a required frame is beyond its last frame, or when `fps` / `max_frames` are
        not positive.
    """
    if av is None:
        raise ImportError(INSTALL_HINT)
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"max_frames must be a positive integer or None, got {max_frames!r}")
    required = sorted({int(number) for number in required_frames})
    if required and required[0] < 0:
        raise ValueError(f"frame numbers must not be negative, got {required[0]}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"cannot read video {path!r}: no such file")

    try:
        container = av.open(path)
    # A damaged header surfaces as an FFmpeg error, or as a UnicodeDecodeError from its metadata strings.
    except (av.FFmpegError, OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read video {path!r}: {error}") from error
    with container:
        if not container.streams.video:
            raise ValueError(f"cannot read video {path!r}: the file holds no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise ValueError(f"cannot read video {path!r}: its video stream has no decoder (unknown or damaged codec)")
        width, height = stream.codec_context.width or 0, stream.codec_context.height or 0
        if max_pixels is not None and width * height > max_pixels:
            raise ValueError(
                f"cannot read video {path!r}: its frames are {height}x{width} = {width * height} pixels, more than "
                f"max_image_pixels={max_pixels} (an image processor option)"
            )
        source_fps = float(stream.average_rate) if stream.average_rate else None
        duration = _stream_duration(container, stream)
        step = 1.0 / fps
        if max_frames is not None and duration is not None and duration * fps > max_frames:
            # Spread the frames over the whole video rather than keeping only its beginning.
            step = duration / max_frames
        # Half a source frame of tolerance, so that a 30 fps stream sampled at 1 fps keeps the frame at 0.9999 s.
        tolerance = 0.5 / source_fps if source_fps else 1e-6

        frames, timestamps, numbers = [], [], []
        num_sampled, num_decoded, last_required = 0, 0, required[-1] if required else -1
        next_time = 0.0
        # `stream.frames` is 0 when the container does not state the frame count.
        progress = logging.tqdm(
            total=stream.frames or None, desc="Decoding video", unit="frame", disable=not show_progress
        )
        try:
            for number, frame in enumerate(container.decode(stream)):
                progress.update(1)
                num_decoded = number + 1
                time = float(frame.time) if frame.time is not None else number / (source_fps or fps)
                on_grid = time + tolerance >= next_time and (max_frames is None or num_sampled < max_frames)
                if on_grid:
                    num_sampled += 1
                    # The first grid point after this frame (a source slower than `fps` skips several at once).
                    next_time += step * (math.floor((time + tolerance - next_time) / step) + 1)
                if on_grid or number in required:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    timestamps.append(time)
                    numbers.append(number)
                if max_frames is not None and num_sampled >= max_frames and number >= last_required:
                    break
        except (av.FFmpegError, OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot decode video {path!r}: {error}") from error
        finally:
            progress.close()

    if not frames:
        raise ValueError(f"cannot read video {path!r}: it holds no decodable frame")
    if required and required[-1] >= num_decoded:
        raise ValueError(f"frame {required[-1]} is out of range for {path!r} with {num_decoded} frames")
    logger.info(f"Decoded {len(frames)} frames from {path} (source {source_fps} fps, sampled every {step:.3f} s)")
    return DecodedVideo(frames=frames, timestamps=timestamps, source_fps=source_fps, frame_numbers=numbers)


__all__ = [
    "DEFAULT_FPS",
    "DEFAULT_MAX_FRAMES",
    "INSTALL_HINT",
    "DecodedVideo",
    "displayed_image_size",
    "load_image",
    "read_video",
]
