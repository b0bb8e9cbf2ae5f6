"""Hostile files: truncated or corrupted images and videos, decompression bombs, damaged or unsafe weight files and
links out of a snapshot. Each case ends in a result or a `ValueError` / `ConversionError` that names the file."""

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from property_settings import fixed
from safetensors.torch import save_file

from pixelrefer_hf import PixelReferImageProcessor, PixelReferProcessor, RegionQAPipeline
from pixelrefer_hf.convert import ConversionError, check_inside_snapshot, load_weight_file, official_weight_files
from pixelrefer_hf.media_io import av, load_image, read_video
from pixelrefer_hf.testing import tiny_model_and_processor

IMAGE = np.random.default_rng(1).integers(0, 256, (20, 28, 3), dtype=np.uint8)


def encoded(fmt: str) -> bytes:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pixelrefer-robustness-{os.getpid()}.{fmt}"
    Image.fromarray(IMAGE).save(path)
    data = path.read_bytes()
    path.unlink()
    return data


PNG, JPEG = encoded("png"), encoded("jpg")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces `width x height` 1-bit pixels, with one empty data chunk: what a decompression
    bomb looks like before its (highly compressible) data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def with_image_processor_options(processor: PixelReferProcessor, **options) -> PixelReferProcessor:
    """`processor` with some image processor options changed (e.g. tighter resource bounds)."""
    image_processor = PixelReferImageProcessor(**{**processor.image_processor.to_dict(), **options})
    return PixelReferProcessor(
        image_processor=image_processor, tokenizer=processor.tokenizer, chat_template=processor.chat_template
    )


def load_outcome(path: Path):
    try:
        return load_image(str(path), "image")
    except ValueError as error:
        assert str(error).startswith("image: cannot read image"), error
        assert str(path) in str(error)
        return error


# --------------------------------------------------------------------------------------------------------------------
# Images on disk
# --------------------------------------------------------------------------------------------------------------------


@fixed(60)
@given(data=st.data())
def test_truncated_or_corrupted_images_load_or_give_an_error_naming_the_file(tmp_path_factory, data):
    original = data.draw(st.sampled_from([PNG, JPEG]))
    damaged = bytearray(original[: data.draw(st.integers(0, len(original)))])
    for _ in range(data.draw(st.integers(0, 3))):
        if damaged:
            damaged[data.draw(st.integers(0, len(damaged) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("img") / "damaged.img"
    path.write_bytes(bytes(damaged))
    result = load_outcome(path)
    if isinstance(result, np.ndarray):
        assert result.dtype == np.uint8 and result.ndim == 3 and result.shape[2] == 3


def test_empty_file_directory_and_missing_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    for path in (tmp_path / "empty.png", tmp_path, tmp_path / "missing.png"):
        assert isinstance(load_outcome(path), ValueError)


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(40_000, 40_000))  # 1.6e9 pixels announced in a file of a few dozen bytes
    assert bomb.stat().st_size < 100
    error = load_outcome(bomb)
    assert isinstance(error, ValueError) and "exceeds limit" in str(error)
    # Below Pillow's limit but above the image processor's own bound, still before decoding.
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(400, 400))
    with pytest.raises(ValueError, match="image: image .* is 400x400 = 160000 pixels, more than max_image_pixels=1000"):
        load_image(str(path), "image", max_pixels=1000)


@pytest.fixture(scope="module")
def model_and_processor():
    return tiny_model_and_processor("pixelrefer", seed=2)


def test_pipeline_names_the_item_of_a_bad_file_and_answers_the_others(model_and_processor, tmp_path):
    model, processor = model_and_processor
    pipe = RegionQAPipeline(model=model, processor=processor, task="region-qa", max_new_tokens=2)
    good = tmp_path / "good.png"
    good.write_bytes(PNG)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(PNG[: len(PNG) // 2])
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(40_000, 40_000))
    item = {"image": str(good), "regions": [[2, 2, 9, 9]], "question": "What is <region>?"}
    single = pipe(item)
    results = pipe(
        [item, {**item, "image": str(truncated)}, {**item, "image": str(bomb)}, item], batch_size=4, skip_bad_items=True
    )
    assert results[0] == results[3] == single
    assert results[1]["error"].startswith("item 1: image: cannot read image") and "truncated" in results[1]["error"]
    assert results[2]["error"].startswith("item 2: image: cannot read image") and "bomb" in results[2]["error"]

    # The image processor's pixel bound is applied to files too.
    bounded = with_image_processor_options(processor, max_image_pixels=100)
    pipe = RegionQAPipeline(model=model, processor=bounded, task="region-qa", max_new_tokens=2)
    with pytest.raises(ValueError, match="item 0: image: image .* is 20x28 = 560 pixels, more than max_image_pixels"):
        pipe([item])


# --------------------------------------------------------------------------------------------------------------------
# Videos on disk
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mp4_bytes(tmp_path_factory) -> bytes:
    av = pytest.importorskip("av")
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for t in range(8):
            frame = np.full((24, 32, 3), 30 * t, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path.read_bytes()


@fixed(30)
@given(data=st.data())
def test_truncated_or_corrupted_videos_decode_or_give_an_error_naming_the_file(tmp_path_factory, mp4_bytes, data):
    damaged = bytearray(mp4_bytes[: data.draw(st.integers(0, len(mp4_bytes)))])
    for _ in range(data.draw(st.integers(0, 3))):
        if damaged:
            damaged[data.draw(st.integers(0, len(damaged) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("vid") / "damaged.mp4"
    path.write_bytes(bytes(damaged))
    try:
        video = read_video(path, fps=4, max_frames=8)
    except ValueError as error:
        assert str(path) in str(error), error
    else:
        assert 1 <= len(video.frames) <= 8 and len(video.timestamps) == len(video.frames)
        assert all(frame.shape == (24, 32, 3) for frame in video.frames)


@pytest.mark.skipif(av is None, reason="needs PyAV (the video extra)")
def test_zero_length_and_missing_videos(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    for path in (tmp_path / "empty.mp4", tmp_path / "missing.mp4", tmp_path):
        with pytest.raises(ValueError, match="cannot read video"):
            read_video(path)


# --------------------------------------------------------------------------------------------------------------------
# Weight files
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def safetensors_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    save_file({"a.weight": torch.arange(12.0).reshape(3, 4), "b.bias": torch.ones(5, dtype=torch.bfloat16)}, path)
    return path.read_bytes()


def safetensors_with_header(header: bytes, length: int | None = None, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + body


HOSTILE_SAFETENSORS = {
    "empty": b"",
    "short length field": b"\x01\x02",
    "header length overflows": safetensors_with_header(b"{}", length=2**64 - 1),
    "header longer than the file": safetensors_with_header(b"{}", length=10**6),
    "header not json": safetensors_with_header(b"not json at all"),
    "header a list": safetensors_with_header(b"[1, 2, 3]"),
    "offsets beyond the data": safetensors_with_header(
        json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}).encode()
    ),
    "shape and offsets disagree": safetensors_with_header(
        json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 4]}}).encode(), body=b"\0" * 4
    ),
    "unknown dtype": safetensors_with_header(
        json.dumps({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}).encode(), body=b"\0"
    ),
    "negative shape": safetensors_with_header(
        json.dumps({"w": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}).encode(), body=b"\0"
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_SAFETENSORS))
def test_hostile_safetensors_give_a_conversion_error_naming_the_file(case, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(HOSTILE_SAFETENSORS[case])
    with pytest.raises(ConversionError, match="Expected a complete safetensors weight file at .*model.safetensors"):
        load_weight_file(path)


@fixed(60)
@given(data=st.data())
def test_truncated_or_corrupted_safetensors_load_or_give_a_conversion_error(tmp_path_factory, safetensors_bytes, data):
    damaged = bytearray(safetensors_bytes[: data.draw(st.integers(0, len(safetensors_bytes)))])
    for _ in range(data.draw(st.integers(0, 2))):
        if damaged:
            # Mostly the length field and the JSON header, where damage changes what is read.
            position = data.draw(st.integers(0, min(len(damaged), 200) - 1))
            damaged[position] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("st") / "shard.safetensors"
    path.write_bytes(bytes(damaged))
    try:
        state_dict = load_weight_file(path)
    except ConversionError as error:
        assert str(path) in str(error)
    else:
        assert all(isinstance(value, torch.Tensor) for value in state_dict.values())


MARKER_NAME = "code-was-executed"


def _leave_a_marker(path: str) -> None:
    Path(path).write_text("unpickling ran code")


class _Callable:
    """Pickles as a call of `_leave_a_marker`: what a malicious `.bin` does with `os.system`."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return _leave_a_marker, (self.path,)


def test_a_bin_holding_a_pickled_callable_is_refused_without_running_it(tmp_path):
    marker = tmp_path / MARKER_NAME
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "payload": _Callable(str(marker))}, path)
    with pytest.raises(ConversionError, match="Expected a complete PyTorch weight file at .*pytorch_model.bin"):
        load_weight_file(path)
    assert not marker.exists()
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ConversionError, match="Expected a state dict of tensors in .*, found a list"):
        load_weight_file(path)


def test_weight_files_pointing_out_of_the_snapshot_are_refused(tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_file({"w": torch.zeros(2)}, outside)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "model.safetensors").symlink_to(outside)
    with pytest.raises(
        ConversionError, match="Expected the weight file 'model.safetensors' to lie inside the snapshot"
    ):
        official_weight_files(snapshot)
    (snapshot / "model.safetensors").unlink()
    index = {"weight_map": {"w": "../outside.safetensors"}}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="to lie inside the snapshot .* pointing to .*outside.safetensors"):
        official_weight_files(snapshot)
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["x"]}))
    with pytest.raises(ConversionError, match="Expected a 'weight_map' of tensor names to file names"):
        official_weight_files(snapshot)


def test_hub_cache_snapshots_may_link_into_their_blobs(tmp_path):
    blobs = tmp_path / "models--org--name" / "blobs"
    revision = tmp_path / "models--org--name" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    revision.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, blobs / "0123abcd")
    (revision / "model.safetensors").symlink_to(Path("../../blobs/0123abcd"))
    assert official_weight_files(revision) == [revision / "model.safetensors"]
    assert check_inside_snapshot(revision, revision / "model.safetensors") == revision / "model.safetensors"
    with pytest.raises(ConversionError, match="outside the snapshot"):
        check_inside_snapshot(revision, tmp_path / "elsewhere.bin")


def test_a_video_larger_than_max_pixels_is_refused_before_decoding(tmp_path, mp4_bytes):
    path = tmp_path / "clip.mp4"
    path.write_bytes(mp4_bytes)
    assert len(read_video(path, fps=4, max_pixels=24 * 32).frames) == 8
    with pytest.raises(ValueError, match="its frames are 24x32 = 768 pixels, more than max_image_pixels=767"):
        read_video(path, fps=4, max_pixels=767)


def test_command_line_mask_that_is_a_decompression_bomb_is_a_clear_error(tmp_path):
    from pixelrefer_hf.cli import parse_region

    bomb = tmp_path / "mask.png"
    bomb.write_bytes(png_header_only(40_000, 40_000))
    with pytest.raises(ValueError, match="--mask .*: cannot read the mask image: .*exceeds limit"):
        parse_region("mask", str(bomb))


def test_pipeline_refuses_too_many_frames_before_converting_them(model_and_processor, tmp_path, mp4_bytes):
    model, processor = model_and_processor
    bounded = with_image_processor_options(processor, max_video_frames=3)
    pipe = RegionQAPipeline(model=model, processor=bounded, task="region-qa", max_new_tokens=2)
    frames = [IMAGE] * 4
    with pytest.raises(ValueError, match="item 0: the video has 4 frames, more than max_video_frames=3"):
        pipe([{"video": frames, "regions": [{0: [1, 1, 5, 5]}], "question": "<region>?"}])
    path = tmp_path / "clip.mp4"
    path.write_bytes(mp4_bytes)
    with pytest.raises(ValueError, match="item 0: max_frames=32 would decode more frames than .*max_video_frames=3"):
        pipe([{"video": str(path), "regions": [{0: [1, 1, 5, 5]}], "question": "<region>?"}])
    assert "answer" in pipe({"video": str(path), "regions": [{0: [1, 1, 5, 5]}], "question": "<region>?"}, max_frames=3)


@pytest.mark.parametrize(
    "length, flips",
    [
        (289, {128: 8}),  # metadata that is not utf-8: PyAV raised UnicodeDecodeError
        (593, {}),  # a stream without a decoder: `stream.codec_context` is None
    ],
)
def test_damaged_videos_found_by_hypothesis_give_errors_naming_the_file(tmp_path, mp4_bytes, length, flips):
    damaged = bytearray(mp4_bytes[:length])
    for position, value in flips.items():
        damaged[position] = value
    path = tmp_path / "damaged.mp4"
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=f"cannot read video '{path}'"):
        read_video(path, fps=4, max_frames=8)
