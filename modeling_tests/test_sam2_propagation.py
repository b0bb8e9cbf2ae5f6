"""Video masks carried to every frame with a tiny random SAM2 video model (`Sam2VideoPropagator`), alone, through the
pipeline and from the command line; and our torchvision-free preprocessing against SAM2's processor arithmetic."""

import json

import av
import numpy as np
import pytest
import torch
from transformers import Sam2VideoConfig, Sam2VideoModel

from pixelrefer_hf import RegionQAPipeline, cli
from pixelrefer_hf.sam_utils import Sam2FramePreprocessing, Sam2VideoPropagator
from pixelrefer_hf.testing import tiny_model_and_processor

HEIGHT, WIDTH, NUM_FRAMES = 40, 56, 4
QUESTION = "What is <region>?"
# Not SAM2's ImageNet statistics, so that a test notices when the checkpoint's file is ignored.
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run faster on one thread when the test machine's cores are shared; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_sam2_config() -> Sam2VideoConfig:
    """A 64 px SAM2 video model (~1M parameters). Hiera: 16 -> 8 -> 4 -> 2 px grids; SAM2 hard-codes 64 memory
    channels, and the object pointers must be a multiple of them wide, hence the 128-wide FPN / decoder."""
    width = 128
    return Sam2VideoConfig(
        vision_config={
            "model_type": "sam2_vision_model",
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "image_size": [64, 64],
                "hidden_size": 8,
                "num_attention_heads": 1,
                "blocks_per_stage": [1, 1, 2, 1],
                "embed_dim_per_stage": [8, 16, 32, 64],
                "num_attention_heads_per_stage": [1, 1, 1, 1],
                "window_size_per_stage": [4, 4, 4, 2],
                "global_attention_blocks": [3],
                "window_positional_embedding_background_size": [2, 2],
            },
            "backbone_channel_list": [64, 32, 16, 8],
            "backbone_feature_sizes": [[16, 16], [8, 8], [4, 4]],
            "fpn_hidden_size": width,
        },
        prompt_encoder_config={"hidden_size": width, "image_size": 64, "patch_size": 16, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": width, "mlp_dim": 32, "num_attention_heads": 2, "iou_head_hidden_dim": 16},
        image_size=64,
        num_maskmem=3,
        memory_attention_hidden_size=width,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=32,
        memory_attention_rope_feat_sizes=[4, 4],
        memory_encoder_hidden_size=width,
        mask_downsampler_embed_dim=width,
        memory_fuser_embed_dim=width,
        memory_fuser_intermediate_dim=32,
    )


@pytest.fixture(scope="module")
def sam2_dir(tmp_path_factory):
    """A tiny random SAM2 video checkpoint with a video preprocessing file, like a hub checkpoint."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Sam2VideoModel(tiny_sam2_config()).eval()
    folder = tmp_path_factory.mktemp("sam2")
    model.save_pretrained(folder)
    preprocessing = {
        "video_processor_type": "Sam2VideoVideoProcessor",
        "size": {"height": 64, "width": 64},
        "image_mean": MEAN,
        "image_std": STD,
        "rescale_factor": 1 / 255,
        "resample": 2,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
    }
    (folder / "video_preprocessor_config.json").write_text(json.dumps(preprocessing))
    return str(folder)


@pytest.fixture(scope="module")
def propagator(sam2_dir):
    return Sam2VideoPropagator(sam2_dir)


@pytest.fixture(scope="module")
def pipe():
    model, processor = tiny_model_and_processor("pixelrefer", seed=4)
    return RegionQAPipeline(model=model, processor=processor, task="region-qa", max_new_tokens=4)


def video(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8) for _ in range(NUM_FRAMES)]


def block_mask(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


# ---------------------------------------------------------------------------------------------------------------------
# Preprocessing: our arithmetic against an independent statement of SAM2's video processor
# ---------------------------------------------------------------------------------------------------------------------


def bilinear_upsample(image: np.ndarray, factor: int, to_uint8: bool = False) -> np.ndarray:
    """Bilinear resize of an `(H, W, ...)` array by an integer factor, written out: output pixel i samples the input
    at (i + 0.5) / factor - 0.5 (pixel centres), clamped to the image, between its two neighbours; along the width
    first, then the height. When enlarging, antialiased resizing is exactly this. `to_uint8`: round halves up to whole
    intensities after each pass, as torchvision's uint8 resize on the CPU does (hence SAM2's video processor)."""

    def along(values: np.ndarray, axis: int) -> np.ndarray:
        size = values.shape[axis]
        source = np.clip((np.arange(size * factor) + 0.5) / factor - 0.5, 0, size - 1)
        low = np.floor(source).astype(int)
        high = np.minimum(low + 1, size - 1)
        weight = (source - low).reshape([-1 if a == axis else 1 for a in range(values.ndim)])
        return np.take(values, low, axis) * (1 - weight) + np.take(values, high, axis) * weight

    def rounded(values: np.ndarray) -> np.ndarray:
        return np.floor(values + 0.5) if to_uint8 else values

    return rounded(along(rounded(along(image.astype(np.float64), 1)), 0))


def test_preprocessing_reads_the_checkpoint_file(sam2_dir, tmp_path):
    preprocessing = Sam2FramePreprocessing.from_checkpoint(sam2_dir, image_size=64)
    assert preprocessing.size == (64, 64) and preprocessing.mask_size == 64
    assert preprocessing.image_mean == pytest.approx(MEAN) and preprocessing.image_std == pytest.approx(STD)
    # Without any preprocessing file: SAM2's ImageNet statistics at the model's size.
    defaults = Sam2FramePreprocessing.from_checkpoint(str(tmp_path), image_size=32)
    assert defaults.size == (32, 32) and defaults.image_mean == pytest.approx([0.485, 0.456, 0.406])
    # The nested form of newer checkpoints (processor_config.json holding a "video_processor").
    nested = {"processor_class": "Sam2VideoProcessor", "video_processor": {"size": {"height": 48, "width": 48}}}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    assert Sam2FramePreprocessing.from_checkpoint(str(tmp_path), image_size=32).size == (48, 48)
    # An image processor's file with a longest edge only: frames are squashed to the model's square input.
    (tmp_path / "processor_config.json").unlink()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"longest_edge": 1024}}))
    assert Sam2FramePreprocessing.from_checkpoint(str(tmp_path), image_size=32).size == (32, 32)
    (tmp_path / "preprocessor_config.json").unlink()
    (tmp_path / "processor_config.json").write_text(json.dumps({"video_processor": {"resample": 1}}))
    with pytest.raises(ValueError, match="processor_config.json of the SAM2 checkpoint.*resample 1"):
        Sam2FramePreprocessing.from_checkpoint(str(tmp_path), image_size=32)


def test_frame_preprocessing_matches_the_processor_formula(sam2_dir):
    preprocessing = Sam2FramePreprocessing.from_checkpoint(sam2_dir, image_size=64)
    mean, std = np.array(MEAN), np.array(STD)
    # Enlarged 32 -> 64: resize to whole intensities, / 255, normalise.
    frame = np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    expected = (bilinear_upsample(frame, 2, to_uint8=True) / 255 - mean) / std
    pixels = preprocessing.frame(frame)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    np.testing.assert_allclose(pixels.permute(1, 2, 0).numpy(), expected, atol=1e-5)
    # Shrunk (antialiased) and squashed from 100 x 70: a uniform colour stays uniform.
    uniform = np.empty((100, 70, 3), dtype=np.uint8)
    uniform[:] = [200, 100, 0]
    expected = (np.array([200, 100, 0]) / 255 - mean) / std
    expected = np.broadcast_to(expected[:, None, None], (3, 64, 64))
    np.testing.assert_allclose(preprocessing.frame(uniform).numpy(), expected, atol=1e-5)


def test_mask_prompt_matches_the_processor_formula(sam2_dir):
    preprocessing = Sam2FramePreprocessing.from_checkpoint(sam2_dir, image_size=64)
    mask = np.zeros((32, 32), dtype=bool)
    mask[5:20, 9:27] = True
    prompt = preprocessing.mask(mask)
    assert prompt.shape == (1, 1, 64, 64)
    np.testing.assert_array_equal(prompt[0, 0].numpy(), (bilinear_upsample(mask, 2) >= 0.5).astype(np.float32))
    # A mask already at the model's size goes in unchanged.
    full = np.random.default_rng(2).random((64, 64)) > 0.5
    np.testing.assert_array_equal(preprocessing.mask(full)[0, 0].numpy(), full.astype(np.float32))


# ---------------------------------------------------------------------------------------------------------------------
# Sam2VideoPropagator
# ---------------------------------------------------------------------------------------------------------------------


def test_propagation_gives_every_frame_a_mask_and_keeps_the_given_one(propagator):
    given = block_mask(8, 30, 10, 40)
    masks = propagator.propagate(video(), {2: given})
    assert sorted(masks) == list(range(NUM_FRAMES))
    assert all(mask.shape == (HEIGHT, WIDTH) and mask.dtype == bool for mask in masks.values())
    np.testing.assert_array_equal(masks[2], given)
    # Deterministic, and a box on the given frame is the same prompt as its mask.
    again = propagator.propagate(video(), {2: [10, 8, 40, 30]})
    for frame_index in range(NUM_FRAMES):
        np.testing.assert_array_equal(again[frame_index], masks[frame_index])


def test_several_objects_share_one_pass(propagator):
    first, second = block_mask(8, 30, 10, 40), block_mask(2, 12, 30, 54)
    # The second object enters SAM2's session first (frame 0), so session order and caller order differ.
    joint = propagator.propagate_objects(video(), [{3: first}, {0: second, 2: first}])
    assert len(joint) == 2 and all(sorted(masks) == list(range(NUM_FRAMES)) for masks in joint)
    np.testing.assert_array_equal(joint[0][3], first)
    np.testing.assert_array_equal(joint[1][0], second)
    np.testing.assert_array_equal(joint[1][2], first)
    # Objects are tracked independently: on its tracked frames the second object comes out as it does alone. (The
    # random model's predictions barely depend on the prompt, about 0.2% of the pixels differ between objects, so
    # the bar is set above that to catch objects swapped in the output.)
    alone = propagator.propagate(video(), {0: second, 2: first})
    for frame_index in (1, 3):
        assert (joint[1][frame_index] == alone[frame_index]).mean() > 0.999


def test_propagation_errors(propagator, tmp_path):
    with pytest.raises(ValueError, match="region 3: frame index 7 is out of range for a video with 4 frames"):
        propagator.propagate(video(), {7: block_mask(0, 5, 0, 5)}, where="region 3")
    with pytest.raises(ValueError, match="region 0, frame 1: mask is empty"):
        propagator.propagate(video(), {1: np.zeros((HEIGHT, WIDTH), dtype=bool)}, where="region 0")
    with pytest.raises(ValueError, match=r"clip, frame 1: all frames must have one size, got \(20, 56\) after"):
        propagator.propagate_objects([video()[0], video()[1][:20]], [{0: block_mask(0, 5, 0, 5)}], video_where="clip")
    sam = tmp_path / "sam"
    sam.mkdir()
    (sam / "config.json").write_text('{"model_type": "sam"}')
    with pytest.raises(ValueError, match="'sam' checkpoint; mask propagation needs a SAM2 video checkpoint"):
        Sam2VideoPropagator(str(sam)).propagate(video(), {0: block_mask(0, 5, 0, 5)})


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline and command line
# ---------------------------------------------------------------------------------------------------------------------


def test_pipeline_answers_with_propagated_regions(pipe, sam2_dir, propagator):
    box = [10, 8, 40, 30]
    item = {"video": video(), "regions": [{1: box}], "question": QUESTION}
    prepared = pipe.preprocess(item, propagate_regions=True, sam2_model=sam2_dir)
    expected = {t: m for t, m in propagator.propagate(video(), {1: box}).items() if m.any()}
    region = prepared["regions"][0]
    assert sorted(region) == sorted(expected) and 1 in region and len(region) > 1
    np.testing.assert_array_equal(region[1], block_mask(8, 30, 10, 40))
    result = pipe(item, propagate_regions=True, sam2_model=sam2_dir)
    assert set(result) == {"answer"} and isinstance(result["answer"], str)
    # An image item in the same call is answered as usual.
    image_item = {"image": video()[0], "regions": [box], "question": QUESTION}
    results = pipe([image_item, item], propagate_regions=True, sam2_model=sam2_dir, batch_size=2)
    assert [set(r) for r in results] == [{"answer"}, {"answer"}]


def test_pipeline_drops_frames_where_sam2_loses_the_object(pipe, monkeypatch):
    def nothing_found(self, frames, objects, wheres=None, video_where="video"):
        # SAM2 sees the object nowhere, except on the frames it was given on.
        empty = np.zeros(frames[0].shape[:2], dtype=bool)
        return [{t: given.get(t, empty) for t in range(len(frames))} for given in objects]

    monkeypatch.setattr(Sam2VideoPropagator, "propagate_objects", nothing_found)
    item = {"video": video(), "regions": [{0: [0, 0, 9, 9], 2: [5, 5, 20, 20]}], "question": QUESTION}
    prepared = pipe.preprocess(item, propagate_regions=True, sam2_model="unused")
    assert sorted(prepared["regions"][0]) == [0, 2]


def test_pipeline_and_cli_errors(pipe, capsys):
    item = {"video": video(), "regions": [{0: [0, 0, 5, 5]}], "question": QUESTION}
    with pytest.raises(ValueError, match="propagate_regions=True needs sam2_model=.*facebook/sam2.1-hiera-tiny"):
        pipe([item], propagate_regions=True, skip_bad_items=True)
    assert cli.main(["ask", "photo.jpg", "--box", "0,0,5,5", "--propagate", "--sam2-model", "x", QUESTION]) == 2
    assert "--propagate carries regions across video frames, but 'photo.jpg' is not a video" in capsys.readouterr().err
    assert cli.main(["ask", "clip.mp4", "--box", "0,0,5,5", "--propagate", QUESTION]) == 2
    assert "--propagate needs --sam2-model" in capsys.readouterr().err


def test_cli_propagates_the_regions_of_a_video_file(sam2_dir, tmp_path, capsys, monkeypatch):
    calls = []
    original = Sam2VideoPropagator.propagate_objects

    def spy(self, frames, objects, *args, **kwargs):
        calls.append((len(frames), [sorted(masks) for masks in objects]))
        return original(self, frames, objects, *args, **kwargs)

    monkeypatch.setattr(Sam2VideoPropagator, "propagate_objects", spy)
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=2)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for frame in video():
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    argv = ["ask", str(path), "--box", "10,8,40,30", "--frame", "1", "--fps", "2", "--max-new-tokens", "3"]
    assert cli.main([*argv, "--propagate", "--sam2-model", sam2_dir, "--json", QUESTION]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"question", "answer", "model"}
    assert calls == [(NUM_FRAMES, [[1]])]
