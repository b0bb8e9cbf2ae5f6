"""Video files (PyAV) and points / boxes -> masks with a tiny random SAM, alone and through the pipeline."""

import av
import numpy as np
import pytest
import torch
from transformers import SamConfig, SamModel, SamProcessor
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from pixelrefer_hf import RegionQAPipeline, media_io
from pixelrefer_hf.media_io import read_video
from pixelrefer_hf.sam_utils import SamMaskPredictor, parse_point_region
from pixelrefer_hf.testing import tiny_model_and_processor

HEIGHT, WIDTH = 48, 64
QUESTION = "What is <region>?"


def write_video(path, num_frames: int = 20, fps: int = 10) -> None:
    """A `num_frames` mpeg4 video whose frame i is uniformly red with value 12 * i (an AVI with 0 frames still has
    its video stream; an mp4 without packets has none)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        container.start_encoding()
        for index in range(num_frames):
            frame = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
            frame[..., 0] = 12 * index
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path)
    return path


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    """A tiny random SAM (64 px input) saved with a PIL image processor, like a hub checkpoint."""
    config = SamConfig(
        vision_config={
            "hidden_size": 32,
            "output_channels": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 8,
            "mlp_dim": 64,
            "global_attn_indexes": [1],
            "window_size": 4,
            "num_pos_feats": 8,
        },
        prompt_encoder_config={"hidden_size": 16, "image_size": 64, "patch_size": 8, "mask_input_channels": 4},
        mask_decoder_config={
            "hidden_size": 16,
            "mlp_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 16,
        },
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SamModel(config).eval()
    image_processor = SamImageProcessorPil(
        size={"longest_edge": 64},
        pad_size={"height": 64, "width": 64},
        mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16},
    )
    folder = tmp_path_factory.mktemp("sam")
    model.save_pretrained(folder)
    SamProcessor(image_processor=image_processor).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def pipe():
    model, processor = tiny_model_and_processor("pixelrefer", seed=4)
    return RegionQAPipeline(model=model, processor=processor, task="region-qa", max_new_tokens=4)


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# media_io
# ---------------------------------------------------------------------------------------------------------------------


def test_read_video_samples_at_the_requested_rate(video_path):
    video = read_video(video_path, fps=2, max_frames=None)
    assert video.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert video.source_fps == 10
    assert all(frame.shape == (HEIGHT, WIDTH, 3) and frame.dtype == np.uint8 for frame in video.frames)
    # Frames 0, 5, 10, 15 of the file (red = 12 * index), up to mpeg4 compression error.
    reds = [float(frame[..., 0].mean()) for frame in video.frames]
    assert reds == pytest.approx([0, 60, 120, 180], abs=6)


def test_read_video_spreads_max_frames_over_the_whole_video(video_path):
    assert read_video(video_path, fps=10, max_frames=4).timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert read_video(video_path, fps=2, max_frames=2).timestamps == pytest.approx([0.0, 1.0])
    assert len(read_video(video_path, fps=100, max_frames=None).frames) == 20


def test_read_video_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="missing.mp4.*no such file"):
        read_video(tmp_path / "missing.mp4")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 20)
    with pytest.raises(ValueError, match="cannot read video .*garbage.mp4"):
        read_video(garbage)
    empty = tmp_path / "empty.avi"
    write_video(empty, num_frames=0)
    with pytest.raises(ValueError, match="empty.avi': it holds no decodable frame"):
        read_video(empty)
    silent = tmp_path / "silent.m4a"
    with av.open(str(silent), "w") as container:
        container.add_stream("aac", rate=8000)
        container.start_encoding()
    with pytest.raises(ValueError, match="silent.m4a': the file holds no video stream"):
        read_video(silent)
    with pytest.raises(ValueError, match="fps"):
        read_video(garbage, fps=0)
    monkeypatch.setattr(media_io, "av", None)
    with pytest.raises(ImportError, match=r"pixelrefer-hf\[video\]"):
        read_video(garbage)


def test_pipeline_decodes_video_files_with_their_timestamps(pipe, video_path):
    decoded = read_video(video_path, fps=2, max_frames=3)
    region = {1: [10, 8, 40, 30]}
    item = {"video": str(video_path), "regions": [region], "question": "Where does <region> go?"}
    prepared = pipe.preprocess(item, fps=2, max_frames=3)
    assert prepared["video_timestamps"] == decoded.timestamps
    assert all(np.array_equal(a, b) for a, b in zip(prepared["video"], decoded.frames, strict=True))
    from_file = pipe(item, fps=2, max_frames=3)
    from_frames = pipe(
        video=decoded.frames, video_timestamps=decoded.timestamps, regions=[region], question=item["question"]
    )
    assert from_file == from_frames


def test_pipeline_video_file_errors_name_the_item(pipe, tmp_path):
    empty = tmp_path / "empty.avi"
    write_video(empty, num_frames=0)
    good = {"image": image(), "regions": [[5, 5, 30, 30]], "question": QUESTION}
    with pytest.raises(ValueError, match="^item 1: cannot read video .*empty.avi': it holds no decodable frame"):
        pipe([good, {"video": str(empty), "regions": [], "question": "What happens?"}], batch_size=2)
    results = pipe(
        [{"video": str(tmp_path / "missing.mp4"), "regions": [], "question": "Hi?"}, good], skip_bad_items=True
    )
    assert results[0]["error"].startswith("item 0: cannot read video") and "answer" in results[1]


# ---------------------------------------------------------------------------------------------------------------------
# SAM
# ---------------------------------------------------------------------------------------------------------------------


def test_sam_predictor_matches_a_direct_sam_call(sam_dir):
    picture = image(1)
    mask = SamMaskPredictor(sam_dir).predict(picture, points=[[20.0, 30.0]], labels=[1])
    assert mask.shape == (HEIGHT, WIDTH) and mask.dtype == bool and mask.any()

    model, processor = SamModel.from_pretrained(sam_dir).eval(), SamProcessor.from_pretrained(sam_dir)
    inputs = processor(images=picture, input_points=[[[[20.0, 30.0]]]], input_labels=[[[1]]], return_tensors="pt")
    with torch.no_grad():
        outputs = model(
            pixel_values=inputs["pixel_values"],
            input_points=inputs["input_points"],
            input_labels=inputs["input_labels"],
            multimask_output=True,
        )
    masks = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    expected = masks[0][0, int(outputs.iou_scores[0, 0].argmax())].numpy()
    np.testing.assert_array_equal(mask, expected)


def test_pipeline_turns_points_and_boxes_into_sam_masks(pipe, sam_dir):
    picture = image(2)
    point = {"points": [[20, 30], [40, 10]], "labels": [1, 0]}
    prepared = pipe.preprocess({"image": picture, "regions": [point], "question": QUESTION}, sam_model=sam_dir)
    expected = SamMaskPredictor(sam_dir).predict(picture, [[20.0, 30.0], [40.0, 10.0]], [1, 0])
    np.testing.assert_array_equal(prepared["regions"][0], expected)
    by_point = pipe(image=picture, regions=[point], question=QUESTION, sam_model=sam_dir)
    assert by_point == pipe(image=picture, regions=[expected], question=QUESTION)

    box = [8, 6, 50, 40]
    plain = pipe.preprocess({"image": picture, "regions": [box], "question": QUESTION})["regions"][0]
    segmented = pipe.preprocess(
        {"image": picture, "regions": [box], "question": QUESTION}, sam_model=sam_dir, box_to_mask="sam"
    )["regions"][0]
    assert plain.sum() == 42 * 34
    np.testing.assert_array_equal(segmented, SamMaskPredictor(sam_dir).predict(picture, box=[8.0, 6.0, 50.0, 40.0]))
    assert not np.array_equal(segmented, plain)

    video = [image(3), picture]
    prepared = pipe.preprocess({"video": video, "regions": [{1: point}], "question": QUESTION}, sam_model=sam_dir)
    np.testing.assert_array_equal(prepared["regions"][0][1], expected)


def test_sam_errors(pipe, sam_dir, tmp_path):
    size = (HEIGHT, WIDTH)
    with pytest.raises(ValueError, match="outside the 48x64 image"):
        parse_point_region({"points": [[64, 3]]}, size, "region 0")
    with pytest.raises(ValueError, match="one 0 or 1 per point"):
        parse_point_region({"points": [[3, 3], [4, 4]], "labels": [1]}, size, "region 0")
    with pytest.raises(ValueError, match="at least one point must be on the object"):
        parse_point_region({"points": [[3, 3]], "labels": [0]}, size, "region 0")
    with pytest.raises(ValueError, match="unknown keys"):
        parse_point_region({"points": [[3, 3]], "label": [1]}, size, "region 0")
    with pytest.raises(ValueError, match="box_to_mask='sam' needs sam_model"):
        pipe(image=image(), regions=[[1, 1, 9, 9]], question=QUESTION, box_to_mask="sam")
    with pytest.raises(ValueError, match="region 0: a point region needs sam_model=.*binary mask, a box"):
        pipe(image=image(), regions=[{"points": [[3, 3]]}], question=QUESTION)
    sam2 = tmp_path / "sam2"
    sam2.mkdir()
    (sam2 / "config.json").write_text('{"model_type": "sam2"}')
    with pytest.raises(ValueError, match="'sam2' checkpoint.*torchvision"):
        pipe(image=image(), regions=[{"points": [[3, 3]]}], question=QUESTION, sam_model=str(sam2))
    with pytest.raises(ValueError, match="cannot load the SAM checkpoint"):
        pipe(image=image(), regions=[{"points": [[3, 3]]}], question=QUESTION, sam_model=str(tmp_path / "nothing"))
