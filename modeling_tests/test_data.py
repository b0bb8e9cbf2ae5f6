"""Region-chat dataset schema, round trips through save_to_disk and parquet, and the official-annotation converters."""

import io
import json
import logging as std_logging
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from datasets import load_dataset, load_from_disk
from PIL import Image
from synthetic_inputs import box_mask
from synthetic_inputs import random_pil_image as random_image

from pixelrefer_hf.collator import PixelReferDataCollator
from pixelrefer_hf.data import (
    build_region_chat_dataset,
    load_official_annotations,
    make_region_chat_row,
    region_chat_features,
    row_regions,
)
from pixelrefer_hf.region_utils import polygons_to_mask, rle_decode, rle_encode
from pixelrefer_hf.testing import tiny_model_and_processor


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major runs, starting with background)."""
    flat = mask.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate(([0], changes, [flat.size]))).tolist()
    if flat[0]:
        counts.insert(0, 0)
    return {"size": list(mask.shape), "counts": counts}


def decoded(row: dict) -> list[list[tuple[int, np.ndarray]]]:
    return [[(entry["frame"], rle_decode(entry["rle"]).astype(bool)) for entry in region] for region in row["regions"]]


@pytest.fixture
def rows():
    image_masks = [box_mask(40, 60, (5, 20), (10, 30)), box_mask(40, 60, (25, 35), (40, 58))]
    video_masks = {0: box_mask(32, 48, (0, 10), (0, 10)), 2: box_mask(32, 48, (10, 30), (20, 40))}
    return (
        [
            make_region_chat_row(
                [
                    {"role": "user", "content": "<image>\nCompare <region> and <region>."},
                    {"role": "assistant", "content": "The first is larger."},
                ],
                image=random_image(40, 60),
                regions=image_masks,
                id="image-0",
            ),
            make_region_chat_row(
                [{"role": "user", "content": "What does <region> do?"}, {"role": "assistant", "content": "It moves."}],
                frames=[random_image(32, 48, seed=t) for t in range(3)],
                timestamps=[0.0, 0.5, 1.0],
                regions=[video_masks],
            ),
        ],
        image_masks,
        video_masks,
    )


def test_rows_encode_regions_as_rle_with_their_frames(rows):
    (image_row, video_row), image_masks, video_masks = rows
    assert [[frame for frame, _ in region] for region in decoded(image_row)] == [[0], [0]]
    for (_, mask), expected in zip([region[0] for region in decoded(image_row)], image_masks, strict=True):
        np.testing.assert_array_equal(mask, expected)
    (video_region,) = decoded(video_row)
    assert [frame for frame, _ in video_region] == [0, 2]
    for frame, mask in video_region:
        np.testing.assert_array_equal(mask, video_masks[frame])
    assert all(isinstance(entry["rle"]["counts"], str) for entry in image_row["regions"][0])
    # Boxes and polygons are rasterised with the image size.
    box_row = make_region_chat_row(
        [{"role": "user", "content": "<region>"}, {"role": "assistant", "content": "ok"}],
        image=random_image(40, 60),
        regions=[[10, 5, 30, 20], {"polygons": [[10, 5, 30, 5, 30, 20, 10, 20]]}],
    )
    np.testing.assert_array_equal(decoded(box_row)[0][0][1], image_masks[0])
    assert decoded(box_row)[1][0][1][8:18, 12:28].all()


def test_row_regions_gives_processor_inputs(rows):
    (image_row, video_row), _, _ = rows
    image_regions = row_regions(image_row)
    assert len(image_regions) == 2 and image_regions[0] == image_row["regions"][0][0]["rle"]
    (video_region,) = row_regions(video_row)
    assert sorted(video_region) == [0, 2]


def test_bad_rows_are_rejected_when_built():
    messages = [{"role": "user", "content": "<region>"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(ValueError, match=r"row 'x', region 0: the mask is 10x10 but the image is 40x60"):
        make_region_chat_row(messages, image=random_image(40, 60), regions=[np.ones((10, 10), bool)], id="x")
    with pytest.raises(ValueError, match=r"region 0: frame 5 is out of range for 2 frames"):
        make_region_chat_row(messages, frames=[random_image(8, 8)] * 2, regions=[{5: np.ones((8, 8), bool)}])
    with pytest.raises(ValueError, match=r"region 0: mask is empty"):
        make_region_chat_row(messages, image=random_image(8, 8), regions=[np.zeros((8, 8), bool)])
    with pytest.raises(ValueError, match="needs the image size"):
        make_region_chat_row(messages, image="some/path.png", regions=[[0, 0, 4, 4]])


def assert_same_dataset(first, second) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a["id"] == b["id"] and a["messages"] == b["messages"] and a["timestamps"] == b["timestamps"]
        assert a["regions"] == b["regions"]
        assert (a["image"] or {}).get("bytes") == (b["image"] or {}).get("bytes")
        assert [f["bytes"] for f in a["frames"]] == [f["bytes"] for f in b["frames"]]


def test_save_to_disk_and_parquet_round_trips(rows, tmp_path):
    dataset = build_region_chat_dataset(rows[0])
    assert dataset.features == region_chat_features()
    assert dataset["id"] == ["image-0", "1"]  # rows without an id get their position

    dataset.save_to_disk(tmp_path / "disk")
    assert_same_dataset(dataset, load_from_disk(tmp_path / "disk"))

    dataset.to_parquet(tmp_path / "data.parquet")
    from_parquet = load_dataset("parquet", data_files=str(tmp_path / "data.parquet"), split="train")
    assert_same_dataset(dataset, from_parquet.cast(region_chat_features()))

    # Masks and pixels survive exactly.
    reloaded = load_from_disk(tmp_path / "disk")
    np.testing.assert_array_equal(decoded(reloaded[0])[0][0][1], rows[1][0])
    original = np.asarray(rows[0][0]["image"])
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(reloaded[0]["image"]["bytes"]))), original)


# ---------------------------------------------------------------------------------------------------------------------
# Official annotation formats
# ---------------------------------------------------------------------------------------------------------------------


def write_video(path: Path, num_frames: int, fps: int, size: tuple[int, int] = (32, 48)) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for t in range(num_frames):
            frame = np.full((*size, 3), (t * 9) % 256, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture
def official(tmp_path):
    """A small official-format annotation file with its media: every mask form of official_spec §7.2."""
    random_image(40, 60).save(tmp_path / "a.png")
    for t in range(4):
        random_image(32, 48, seed=t).save(tmp_path / f"f{t}.png")
    write_video(tmp_path / "clip.mp4", num_frames=10, fps=4)
    mask = box_mask(40, 60, (5, 20), (10, 30))
    polygon = [[10.0, 5.0, 29.0, 5.0, 29.0, 19.0, 10.0, 19.0]]
    frame_mask = box_mask(32, 48, (2, 12), (3, 20))
    samples = [
        {
            "id": "rle",
            "image": "a.png",
            "masks": [rle_encode(mask)],
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is <region>?"},
                {"from": "gpt", "value": "A box."},
            ],
        },
        {
            "image": "a.png",
            "masks": [uncompressed_rle(mask), polygon],
            "height": 40,
            "width": 60,
            "conversations": [
                {"from": "gpt", "value": "dropped"},
                {"from": "human", "value": "<region> vs <region>"},
                {"from": "gpt", "value": "Same."},
            ],
        },
        {
            "image": "a.png",
            "masks": [polygon],  # no height / width: read from the image file
            "conversations": [{"from": "human", "value": "<region>"}, {"from": "gpt", "value": "ok"}],
        },
        {
            "video": ["f0.png", "f1.png", "f2.png", "f3.png"],
            "timestamps": [0, 0.5, 1.0, 1.5],
            "masks": [{"1": rle_encode(frame_mask), "3": rle_encode(frame_mask)}],
            "conversations": [{"from": "human", "value": "<video>\n<region>?"}, {"from": "gpt", "value": "moves"}],
        },
        {
            "video": ["clip.mp4"],
            "masks": [{"6": rle_encode(frame_mask)}],
            "conversations": [{"from": "human", "value": "<video>\n<region>?"}, {"from": "gpt", "value": "moves"}],
        },
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(samples))
    return path, mask, polygon, frame_mask


def test_official_annotations_convert(official):
    path, mask, polygon, frame_mask = official
    dataset = load_official_annotations(path)
    assert dataset["id"] == ["rle", "1", "2", "3", "4"]
    rows = [dataset[i] for i in range(len(dataset))]

    assert rows[0]["messages"] == [
        {"role": "user", "content": "<image>\nWhat is <region>?"},
        {"role": "assistant", "content": "A box."},
    ]
    assert rows[0]["image"]["path"] == str(path.parent / "a.png")
    np.testing.assert_array_equal(decoded(rows[0])[0][0][1], mask)

    # Uncompressed RLE decodes to the same mask; polygons rasterise to their union; the leading gpt turn is dropped.
    assert [m["role"] for m in rows[1]["messages"]] == ["user", "assistant"]
    np.testing.assert_array_equal(decoded(rows[1])[0][0][1], mask)
    np.testing.assert_array_equal(decoded(rows[1])[1][0][1], polygons_to_mask(polygon, 40, 60).astype(bool))
    np.testing.assert_array_equal(decoded(rows[2])[0][0][1], decoded(rows[1])[1][0][1])

    # Frame-list video: mask keys are positions in the list.
    assert len(rows[3]["frames"]) == 4 and rows[3]["timestamps"] == [0.0, 0.5, 1.0, 1.5]
    assert [entry["frame"] for entry in rows[3]["regions"][0]] == [1, 3]

    # Video file at 4 fps, 10 frames: sampled at 1 fps (frames 0, 4, 8) plus the annotated frame 6.
    assert rows[4]["timestamps"] == [0.0, 1.0, 1.5, 2.0]
    assert [entry["frame"] for entry in rows[4]["regions"][0]] == [2]
    np.testing.assert_array_equal(decoded(rows[4])[0][0][1], frame_mask)


BAD_SAMPLES = [
    (
        {
            "image": "a.png",
            "masks": [],
            "conversations": [{"from": "human", "value": "<region>"}, {"from": "gpt", "value": "x"}],
        },
        r"1 <region> placeholder\(s\) but 0 region\(s\)",
    ),
    (
        {
            "image": "a.png",
            "masks": [{"size": [40, 60], "counts": "00"}],
            "conversations": [{"from": "human", "value": "<region>"}, {"from": "gpt", "value": "x"}],
        },
        "region 0: invalid COCO RLE",
    ),
    ({"image": "a.png", "conversations": []}, "the conversation is empty"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": "hi"}]}, "no assistant answer"),
    ({"image": "a.png", "conversations": [{"from": "robot", "value": "hi"}]}, "unknown speaker 'robot'"),
    (
        {
            "image": "missing.png",
            "masks": [[[0, 0, 5, 0, 5, 5]]],
            "conversations": [{"from": "human", "value": "<region>"}, {"from": "gpt", "value": "x"}],
        },
        "image file .*missing.png does not exist",
    ),
    (
        {
            "video": ["missing.mp4"],
            "masks": [{"0": [[0, 0, 5, 0, 5, 5]]}],
            "height": 8,
            "width": 8,
            "conversations": [{"from": "human", "value": "<region>"}, {"from": "gpt", "value": "x"}],
        },
        "video file .*missing.mp4 does not exist",
    ),
]


@pytest.mark.parametrize(("sample", "message"), BAD_SAMPLES)
def test_bad_official_samples_name_the_annotation(tmp_path, sample, message):
    random_image(40, 60).save(tmp_path / "a.png")
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    path = tmp_path / "train.json"
    path.write_text(json.dumps([good, sample]))
    with pytest.raises(ValueError, match=f"train.json: annotation 1[:,] .*{message}"):
        load_official_annotations(path)


def test_skip_bad_official_samples_counts_them(tmp_path, caplog):
    random_image(40, 60).save(tmp_path / "a.png")
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in [good, *[sample for sample, _ in BAD_SAMPLES], good]))
    logger = std_logging.getLogger("pixelrefer_hf")
    logger.addHandler(caplog.handler)
    try:
        dataset = load_official_annotations(path, skip_bad_samples=True)
    finally:
        logger.removeHandler(caplog.handler)
    assert dataset["id"] == ["0", str(len(BAD_SAMPLES) + 1)]
    assert f"skipped {len(BAD_SAMPLES)} of {len(BAD_SAMPLES) + 2} samples" in caplog.text


@pytest.mark.parametrize("variant", ["pixelrefer", "pixelrefer-lite"])
def test_converted_official_rows_train(official, variant):
    """Every converted form (image RLE / polygons, frame list, decoded video file) collates and runs in the model."""
    model, processor = tiny_model_and_processor(variant)
    dataset = load_official_annotations(official[0])
    batch = PixelReferDataCollator(processor)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        output = model(**batch)
    assert torch.isfinite(output.loss)
    assert output.object_hidden_states.shape[0] == int((batch["input_ids"] == processor.region_token_id).sum())
