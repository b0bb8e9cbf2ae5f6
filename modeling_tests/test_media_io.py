"""One image loader and one video decoder (`media_io`) for training rows and inference: the collator and the
pipeline see the same pixels for the same file."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import write_video

from pixelrefer_hf.collator import PixelReferDataCollator
from pixelrefer_hf.data import load_official_annotations
from pixelrefer_hf.media_io import load_image, read_video
from pixelrefer_hf.pipeline_region_qa import RegionQAPipeline
from pixelrefer_hf.region_utils import rle_encode
from pixelrefer_hf.testing import tiny_model_and_processor

VISUAL_KEYS = ("pixel_values", "image_grid_thw", "region_pixel_values", "region_grid_thw", "region_patch_masks")


@pytest.fixture(scope="module")
def pipe():
    model, processor = tiny_model_and_processor("pixelrefer", seed=6)
    return RegionQAPipeline(model=model, processor=processor, task="region-qa")


def pipeline_inputs(pipe, item: dict) -> dict:
    """What the pipeline hands the processor for `item`, encoded (the batch `generate` would get)."""
    prepared = pipe.preprocess(item)
    return pipe.processor(
        text=[prepared["prompt"]],
        images=[prepared["images"]] if prepared["images"] is not None else None,
        videos=[prepared["video"]] if prepared["video"] is not None else None,
        video_timestamps=[prepared["video_timestamps"]] if prepared["video_timestamps"] is not None else None,
        regions=[prepared["regions"]],
        multi_frame_regions=prepared["multi_frame_regions"],
        return_tensors="pt",
    )


def collator_inputs(pipe, tmp_path, sample: dict) -> dict:
    """What the training collator builds from the same file, read as an official annotation."""
    path = tmp_path / "train.json"
    path.write_text(json.dumps([sample]))
    rows = load_official_annotations(path)
    return PixelReferDataCollator(pipe.processor)([rows[0]])


def assert_same_visual_inputs(first: dict, second: dict) -> None:
    for key in VISUAL_KEYS:
        assert torch.equal(first[key], second[key]), key


def test_read_video_keeps_required_frames_beside_the_grid(tmp_path):
    write_video(tmp_path / "v.mp4", num_frames=12, fps=2)
    video = read_video(tmp_path / "v.mp4", fps=1.0, max_frames=None, required_frames=[3])
    assert video.frame_numbers == [0, 2, 3, 4, 6, 8, 10]
    assert video.timestamps == pytest.approx([number / 2 for number in video.frame_numbers])
    assert video.frames[0].shape == (32, 48, 3) and video.frames[0].dtype == np.uint8
    assert abs(int(video.frames[2].mean()) - 27) <= 3  # the pixel value encodes the frame number (t * 9)
    # Required frames do not count towards max_frames, and decoding goes on until the last one.
    capped = read_video(tmp_path / "v.mp4", fps=1.0, max_frames=3, required_frames=[11])
    assert capped.frame_numbers == [0, 4, 8, 11]
    with pytest.raises(ValueError, match="frame 20 is out of range .* with 12 frames"):
        read_video(tmp_path / "v.mp4", required_frames=[20])


def test_the_collator_and_the_pipeline_decode_a_video_file_alike(pipe, tmp_path):
    write_video(tmp_path / "clip.mp4", num_frames=10, fps=4, size=(56, 84))
    mask = np.zeros((56, 84), dtype=bool)
    mask[10:40, 20:60] = True
    sample = {
        "video": ["clip.mp4"],
        "masks": [{"4": rle_encode(mask)}],
        "conversations": [{"from": "human", "value": "<video>\n<region>?"}, {"from": "gpt", "value": "moves"}],
    }
    train = collator_inputs(pipe, tmp_path, sample)
    # The default sampling (1 fps) keeps frames 0, 4 and 8; the annotated frame 4 is one of them (index 1).
    infer = pipeline_inputs(
        pipe, {"video": str(tmp_path / "clip.mp4"), "regions": [{1: mask}], "question": "<region>?"}
    )
    assert train["image_grid_thw"].shape[0] == 3
    assert_same_visual_inputs(train, infer)


def test_the_collator_and_the_pipeline_apply_exif_orientation_alike(pipe, tmp_path):
    pixels = np.zeros((42, 70, 3), dtype=np.uint8)
    pixels[5:20, 10:60] = (250, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: displayed rotated 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "photo.png", exif=exif)
    loaded = load_image(tmp_path / "photo.png", "image")
    assert loaded.shape == (70, 42, 3)  # as viewers display it
    np.testing.assert_array_equal(loaded, np.rot90(pixels, k=-1))

    box = [8, 4, 36, 60]  # x0, y0, x1, y1 on the displayed picture
    mask = np.zeros((70, 42), dtype=bool)
    mask[4:60, 8:36] = True
    sample = {
        "image": "photo.png",
        "masks": [rle_encode(mask)],
        "conversations": [{"from": "human", "value": "<image>\n<region>?"}, {"from": "gpt", "value": "red"}],
    }
    train = collator_inputs(pipe, tmp_path, sample)
    infer = pipeline_inputs(pipe, {"image": str(tmp_path / "photo.png"), "regions": [mask], "question": "<region>?"})
    assert_same_visual_inputs(train, infer)
    boxed = pipeline_inputs(pipe, {"image": str(tmp_path / "photo.png"), "regions": [box], "question": "<region>?"})
    assert torch.equal(boxed["pixel_values"], infer["pixel_values"])


def test_load_image_names_the_file_and_refuses_large_headers(tmp_path):
    with pytest.raises(ValueError, match=r"item 2: image: cannot read image '.*missing.png': no such file"):
        load_image(tmp_path / "missing.png", "item 2: image")
    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="30x40 = 1200 pixels, more than max_image_pixels=1000"):
        load_image(tmp_path / "big.png", "image", max_pixels=1000)
    payload = (tmp_path / "big.png").read_bytes()
    assert load_image({"bytes": payload, "path": None}, "image").shape == (30, 40, 3)


@pytest.mark.parametrize("variant", ["pixelrefer", "pixelrefer-lite"])
def test_a_tracked_video_region_reaches_the_model_alike_in_frame_order(variant):
    """A region given on every frame of a synthetic clip (as the demo checkpoints are trained and asked): the training
    collator and the pipeline give the same prompt (`[Time t:<REGION>...,...]`, frame by frame), the same crops and
    the same boxes, and the boxes follow the motion in frame order."""
    from transformers import pipeline

    from pixelrefer_hf.data import build_region_chat_dataset, make_region_chat_row
    from pixelrefer_hf.demo import demo_checkpoint
    from pixelrefer_hf.synthetic import DIRECTIONS, QUESTIONS, draw_video_scene

    demo = pipeline("region-qa", model=demo_checkpoint(variant), trust_remote_code=True)
    scene = draw_video_scene(np.random.default_rng(3))
    frames = [Image.fromarray(frame) for frame in scene.frames]
    for obj in scene.objects:
        region = dict(enumerate(obj.masks))
        messages = [
            {"role": "user", "content": QUESTIONS["direction"]},
            {"role": "assistant", "content": obj.direction},
        ]
        row = make_region_chat_row(messages, frames=frames, timestamps=scene.timestamps, regions=[region], id="clip")
        batch = PixelReferDataCollator(demo.processor)([build_region_chat_dataset([row])[0]])
        item = {"video": frames, "video_timestamps": scene.timestamps, "regions": [region]}
        inputs = pipeline_inputs(demo, {**item, "question": QUESTIONS["direction"]})
        prompt_length = inputs["input_ids"].shape[1]
        # The training row is the prompt followed by its answer.
        assert torch.equal(batch["input_ids"][0, :prompt_length], inputs["input_ids"][0])
        for key in ("region_pixel_values", "region_grid_thw", "region_patch_masks", "region_boxes"):
            assert torch.equal(batch[key], inputs[key]), key
        text = demo.processor.tokenizer.decode(inputs["input_ids"][0])
        assert [f"Time {t:.1f}:" in text for t in scene.timestamps] == [True] * len(scene.timestamps)
        # Boxes (top, left, bottom, right), one per frame in order, move the way the shape does.
        d_row, d_col = DIRECTIONS[obj.direction]
        edge = inputs["region_boxes"][:, 0] if d_row else inputs["region_boxes"][:, 1]
        steps = torch.diff(edge) * (d_row or d_col)
        assert len(edge) == len(scene.frames) and bool((steps >= 0).all()) and float(steps.sum()) > 0, edge
