"""Decode video files into RGB frames and timestamps with PyAV (the optional `video` extra).

PixelRefer samples videos sparsely (the released models were trained on about 1 frame per second, at most a few dozen
frames), so this module decodes the file once and keeps only the frames that fall on a regular time grid. The frames
and their times in seconds are exactly what [`PixelReferProcessor`] takes as `videos` and `video_timestamps`.

    >>> from pixelrefer_hf.video_io import read_video
    >>> frames, timestamps = read_video("clip.mp4", fps=1.0, max_frames=16)  # doctest: +SKIP
"""

import math
import os
from dataclasses import dataclass

import numpy as np
from transformers.utils import logging

try:
    import av
except ImportError:  # the `video` extra is optional; `read_video` says how to install it
    av = None


logger = logging.get_logger(__name__)

INSTALL_HINT = 'reading video files needs PyAV: pip install "pixelrefer-hf[video]" (or pip install av)'


@dataclass
class DecodedVideo:
    """Frames sampled from a video file.

    Attributes:
        frames (`list[np.ndarray]`): `(H, W, 3)` RGB uint8 frames in time order.
        timestamps (`list[float]`): presentation time of each frame in seconds, from the start of the stream.
        source_fps (`float | None`): the stream's average frame rate, when the container states one.
    """

    frames: list[np.ndarray]
    timestamps: list[float]
    source_fps: float | None


def _stream_duration(container, stream) -> float | None:
    """Duration of the video stream in seconds, or `None` when neither the stream nor the container states it."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def read_video(
    path: str | os.PathLike,
    fps: float = 1.0,
    max_frames: int | None = 32,
    show_progress: bool = False,
    max_pixels: int | None = None,
) -> DecodedVideo:
    """Decode `path` and keep about `fps` frames per second, at most `max_frames` of them.

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

    Returns:
        [`DecodedVideo`] with the frames, their timestamps in seconds and the stream's frame rate.

    Raises:
        `ImportError` when PyAV is not installed; `ValueError` naming the file when it cannot be read, holds no video
        stream or yields no frame, or when `fps` / `max_frames` are not positive.
    """
    if av is None:
        raise ImportError(INSTALL_HINT)
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"max_frames must be a positive integer or None, got {max_frames!r}")
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

        frames, timestamps = [], []
        next_time = 0.0
        # `stream.frames` is 0 when the container does not state the frame count.
        progress = logging.tqdm(
            total=stream.frames or None, desc="Decoding video", unit="frame", disable=not show_progress
        )
        try:
            for frame in container.decode(stream):
                progress.update(1)
                time = float(frame.time) if frame.time is not None else len(timestamps) * step
                if time + tolerance < next_time:
                    continue
                frames.append(frame.to_ndarray(format="rgb24"))
                timestamps.append(time)
                # The first grid point after this frame (a source slower than `fps` skips several at once).
                next_time += step * (math.floor((time + tolerance - next_time) / step) + 1)
                if max_frames is not None and len(frames) >= max_frames:
                    break
        except (av.FFmpegError, OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot decode video {path!r}: {error}") from error
        finally:
            progress.close()

    if not frames:
        raise ValueError(f"cannot read video {path!r}: it holds no decodable frame")
    logger.info(f"Decoded {len(frames)} frames from {path} (source {source_fps} fps, sampled every {step:.3f} s)")
    return DecodedVideo(frames=frames, timestamps=timestamps, source_fps=source_fps)


__all__ = ["INSTALL_HINT", "DecodedVideo", "read_video"]
