"""End to end on tiny random models: processor -> model, both variants, images and videos, batching, generation."""

import numpy as np
import pytest
import torch

from pixelrefer_hf.testing import tiny_model_and_processor

VARIANTS = ["pixelrefer", "pixelrefer-lite"]


def scene(seed: int, height: int = 96, width: int = 128) -> np.ndarray:
    """A textured background with a few coloured rectangles, uint8 HWC."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, height - 20), rng.integers(0, width - 20)
        image[y : y + rng.integers(6, 20), x : x + rng.integers(6, 20)] = rng.integers(100, 255, size=3)
    return image


def ellipse_mask(height: int, width: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def moving_video(num_frames: int = 3, seed: int = 0) -> list[np.ndarray]:
    """Frames in which a square moves right; frame 2 repeats frame 1 exactly (token compression drops it)."""
    base = scene(seed, 84, 112)
    frames = []
    for t in range(num_frames):
        frame = base.copy()
        x = 10 + 20 * min(t, 1)
        frame[30:50, x : x + 20] = (250, 40, 40)
        frames.append(frame)
    return frames


def samples():
    """Three prompts: one image region, two regions (mask + box) on another image, a region on two video frames."""
    video = moving_video()
    return [
        {
            "text": "<|im_start|>user\n<image>\nWhat is <region>?<|im_end|>\n<|im_start|>assistant\n",
            "images": scene(1),
            "regions": [ellipse_mask(96, 128, 40, 60, 12, 20)],
        },
        {
            "text": "<|im_start|>user\n<image>\nIs <region> larger than <region>?<|im_end|>\n<|im_start|>assistant\n",
            "images": scene(2),
            "regions": [ellipse_mask(96, 128, 70, 30, 5, 4), [60, 10, 120, 90]],
        },
        {
            "text": "<|im_start|>user\n<video>\nWhich way does <region> move?<|im_end|>\n<|im_start|>assistant\n",
            "videos": video,
            "regions": [{0: [10, 30, 30, 50], 1: [30, 30, 50, 50]}],
        },
    ]


def batch_inputs(processor, items, padding_side="left"):
    return processor(
        text=[item["text"] for item in items],
        images=[item.get("images") for item in items],
        videos=[item.get("videos") for item in items],
        regions=[item["regions"] for item in items],
        padding=True,
        padding_side=padding_side,
        return_tensors="pt",
    )


@pytest.fixture(scope="module", params=VARIANTS)
def model_and_processor(request):
    return tiny_model_and_processor(request.param, seed=0)


def test_token_counts_and_shapes(model_and_processor):
    model, processor = model_and_processor
    config = model.config
    inputs = batch_inputs(processor, samples())
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (3, inputs["input_ids"].shape[1], config.text_config.vocab_size)
    region_slots = int((inputs["input_ids"] == config.region_token_id).sum())
    assert out.object_hidden_states.shape == (region_slots, config.text_config.hidden_size)
    # 5 crops: the image region, two regions on the second image, the video region on two frames.
    assert inputs["region_grid_thw"].shape == (5, 3)
    if config.is_lite:
        assert region_slots == 5 * config.num_object_tokens
        assert not (inputs["input_ids"] == config.image_token_id).any()
        assert out.image_hidden_states is None
    else:
        image_slots = int((inputs["input_ids"] == config.image_token_id).sum())
        assert out.image_hidden_states.shape == (image_slots, config.text_config.hidden_size)
        # Two images (merge 1) and three video frames (merge 2).
        assert inputs["image_merge_sizes"].tolist() == [1, 1, 2, 2, 2]
        grid = inputs["image_grid_thw"]
        merged = (grid.prod(-1) // inputs["image_merge_sizes"] ** 2).tolist()
        kept = int(inputs["image_keep_mask"].sum())
        assert kept == image_slots
        # The repeated third frame keeps a single token, frames 0 and 1 keep all of theirs (they differ).
        frame_tokens = inputs["image_keep_mask"][sum(merged[:2]) :].split(merged[2:])
        assert [int(f.sum()) for f in frame_tokens][2] == 1
        assert int(frame_tokens[0].sum()) == merged[2]


def test_region_features_without_the_llm_equal_the_forward_object_tokens(model_and_processor):
    model, processor = model_and_processor
    inputs = batch_inputs(processor, samples())
    region_inputs = {key: value for key, value in inputs.items() if key.startswith("region_")}
    with torch.no_grad():
        expected = model(**inputs).object_hidden_states
        got = model.model.get_region_features(**region_inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_video_region_on_several_frames_has_time_stamps(model_and_processor):
    model, processor = model_and_processor
    inputs = batch_inputs(processor, samples()[2:])
    text = processor.decode(inputs["input_ids"][0])
    assert "Time 0.0:" in text and "Time 1.0:" in text
    if not model.config.is_lite:
        assert "Time 0.0s:" in text  # frame time stamps of the global tokens


def test_batch_equals_single_calls(model_and_processor):
    """Each sample gets the same logits and the same generated tokens alone as in a left-padded batch of 3."""
    model, processor = model_and_processor
    items = samples()
    batch = batch_inputs(processor, items)
    with torch.no_grad():
        batch_logits = model(**batch).logits[:, -1]
        batch_tokens = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1] :]
    for i, item in enumerate(items):
        single = batch_inputs(processor, [item])
        with torch.no_grad():
            logits = model(**single).logits[:, -1]
            tokens = model.generate(**single, max_new_tokens=6, do_sample=False)[:, single["input_ids"].shape[1] :]
        torch.testing.assert_close(batch_logits[i : i + 1], logits, atol=1e-4, rtol=1e-4)
        assert batch_tokens[i].tolist() == tokens[0].tolist(), f"sample {i}"


def test_right_padding_gives_the_same_logits_as_left_padding(model_and_processor):
    model, processor = model_and_processor
    left = batch_inputs(processor, samples(), padding_side="left")
    right = batch_inputs(processor, samples(), padding_side="right")
    with torch.no_grad():
        left_logits, right_logits = model(**left).logits, model(**right).logits
    for i in range(3):
        real_left = left_logits[i][left["attention_mask"][i].bool()]
        real_right = right_logits[i][right["attention_mask"][i].bool()]
        torch.testing.assert_close(real_left, real_right, atol=1e-4, rtol=1e-4)


def test_same_input_same_output(model_and_processor):
    model, processor = model_and_processor
    inputs = batch_inputs(processor, samples())
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        second = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(first, second)
    again, _ = tiny_model_and_processor(model.config.variant, seed=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_loss_is_finite_and_ignores_placeholders(model_and_processor):
    model, processor = model_and_processor
    inputs = batch_inputs(processor, samples(), padding_side="right")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss)
    # Supervising the placeholder ids or not makes no difference: the model never trains on them.
    placeholder = (labels == model.config.image_token_id) | (labels == model.config.region_token_id)
    masked = model(**inputs, labels=labels.masked_fill(placeholder, -100)).loss
    torch.testing.assert_close(out.loss, masked)


def test_text_only_prompt_generates(model_and_processor):
    model, processor = model_and_processor
    inputs = processor(text=["<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tokens.shape == (1, inputs["input_ids"].shape[1] + 3)


def test_chat_template_drives_the_model(model_and_processor):
    model, processor = model_and_processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is <region>?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\n<image>\nWhat is <region>?<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(text=prompt, images=scene(3), regions=[[10, 10, 50, 40]], return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize("settings", [{"num_beams": 2}, {"num_beams": 3, "num_return_sequences": 2}])
def test_beam_search_and_several_sequences_per_sample(model_and_processor, settings):
    """generate repeats each sample's images and crops as a whole: batched beams equal single-sample beams."""
    model, processor = model_and_processor
    items = samples()
    batch = batch_inputs(processor, items)
    with torch.no_grad():
        batch_tokens = model.generate(**batch, max_new_tokens=4, do_sample=False, **settings)
    per_sample = settings.get("num_return_sequences", 1)
    assert batch_tokens.shape[0] == len(items) * per_sample
    new_tokens = batch_tokens[:, batch["input_ids"].shape[1] :]
    for i, item in enumerate(items):
        single = batch_inputs(processor, [item])
        with torch.no_grad():
            tokens = model.generate(**single, max_new_tokens=4, do_sample=False, **settings)
        expected = tokens[:, single["input_ids"].shape[1] :].tolist()
        assert new_tokens[i * per_sample : (i + 1) * per_sample].tolist() == expected, f"sample {i}"
