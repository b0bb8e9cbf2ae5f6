"""Many questions about one image or video: the image is encoded once and its prompt prefix prefilled once
(`generate_sharing_image`, used by the pipeline), and PixelRefer-Lite's context images are encoded once per call,
with answers token-identical to separate calls."""

import numpy as np
import pytest
import torch

from pixelrefer_hf.pipeline_region_qa import RegionQAPipeline
from pixelrefer_hf.synthetic import draw_video_scene, example_scene
from pixelrefer_hf.testing import tiny_model_and_processor

QUESTIONS = ["What is <region>?", "What colour is <region>, briefly?", "Is <region> larger than <region>?"]
GREEDY = {"max_new_tokens": 8, "do_sample": False}


@pytest.fixture(scope="module", params=["pixelrefer", "pixelrefer-lite"])
def tiny(request):
    return tiny_model_and_processor(request.param, seed=2)


def image_items() -> list[dict]:
    scene = example_scene()
    masks = [obj.masks[0] for obj in scene.objects]
    regions = [[masks[0]], [masks[1]], [masks[2], masks[3]]]
    return [{"image": scene.frames[0], "regions": r, "question": q} for r, q in zip(regions, QUESTIONS, strict=True)]


def video_items() -> list[dict]:
    scene = draw_video_scene(np.random.default_rng(3), num_frames=4, num_shapes=(3, 3))
    regions = [[{0: obj.masks[0]}] for obj in scene.objects]
    questions = ["Which way does <region> move?", "What is <region>?", "What colour is <region>?"]
    return [
        {"video": scene.frames, "video_timestamps": scene.timestamps, "regions": r, "question": q}
        for r, q in zip(regions, questions, strict=True)
    ]


def encode(processor, items: list[dict]) -> dict:
    """The processor's left-padded batch of pipeline-style items (one chat turn each)."""
    prompts = []
    for item in items:
        kind = "video" if "video" in item else "image"
        content = [{"type": kind}, {"type": "text", "text": item["question"]}]
        prompts.append(
            processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        )
    media = {"videos": [item["video"] for item in items]} if "video" in items[0] else {}
    if "video" in items[0]:
        media["video_timestamps"] = [item["video_timestamps"] for item in items]
    else:
        media["images"] = [item["image"] for item in items]
    # Tiny models take a PixelRefer region on several frames in the timed form; these are one-frame regions.
    return processor(
        text=prompts, regions=[item["regions"] for item in items], padding=True, return_tensors="pt", **media
    )


def assert_matches_separate_calls(model, processor, items: list[dict]) -> None:
    """`generate_sharing_image` on the batch gives each row the tokens of its own single call (up to its EOS)."""
    inputs = encode(processor, items)
    width = inputs["input_ids"].shape[1]
    shared = model.generate_sharing_image(**inputs, **GREEDY)[:, width:]
    for row, item in enumerate(items):
        single = encode(processor, [item])
        expected = model.generate(**single, **GREEDY)[0, single["input_ids"].shape[1] :]
        assert shared[row][: len(expected)].tolist() == expected.tolist(), f"row {row}"


def tower_calls(model) -> list[int]:
    """Patch rows of every vision-tower call, recorded while the returned list lives."""
    rows = []
    original = model.model.encode_images

    def spy(groups):
        rows.append({name: int(group[0].shape[0]) for name, group in groups.items()})
        return original(groups)

    model.model.encode_images = spy
    return rows


@pytest.mark.parametrize("media", ["image", "video"])
def test_sharing_gives_the_tokens_of_separate_calls(tiny, media):
    model, processor = tiny
    assert_matches_separate_calls(model, processor, image_items() if media == "image" else video_items())


@pytest.mark.parametrize("media", ["image", "video"])
def test_the_same_question_about_different_regions(tiny, media):
    """The rows' prompts agree through the first `<REGION>` run (same text, same token counts); the prefix must stop
    before it, since each row's object tokens differ."""
    model, processor = tiny
    items = image_items() if media == "image" else video_items()
    items = [item | {"question": "What is <region>?", "regions": item["regions"][:1]} for item in items]
    assert_matches_separate_calls(model, processor, items)


def test_pixelrefer_encodes_the_image_and_prefills_its_prefix_once():
    model, processor = tiny_model_and_processor("pixelrefer", seed=2)
    inputs = encode(processor, image_items())
    image_rows = int(inputs["image_grid_thw"][0].prod())
    calls = tower_calls(model)
    prefilled = []
    original_forward = model.model.language_model.forward

    def count_prefill(*args, **kwargs):
        prefilled.append(kwargs["inputs_embeds"].shape[:2])
        return original_forward(*args, **kwargs)

    model.model.language_model.forward = count_prefill
    model.generate_sharing_image(**inputs, **GREEDY)
    # One tower call for the image alone (the prefix), one for the three questions' crops (no image rows).
    assert calls[0] == {"images": image_rows}
    assert "images" not in calls[1] and len(calls) == 2
    # The prefix, once and for one row; then the three questions after it; then one token per step.
    prefix_length = prefilled[0][1]
    assert prefilled[0][0] == 1 and prefix_length > image_rows
    assert prefilled[1] == (3, inputs["input_ids"].shape[1] - prefix_length)
    assert all(shape == (3, 1) for shape in prefilled[2:])


def test_lite_encodes_each_context_image_once_per_call():
    model, processor = tiny_model_and_processor("pixelrefer-lite", seed=2)
    inputs = encode(processor, image_items())
    # Four objects over three questions about one picture: four crops. The global context image is sized by the
    # sample's pixel budget (shared by its crops, as released), so the two one-object questions share one and the
    # two-object question has its own, smaller one.
    assert len(inputs["region_grid_thw"]) == 4
    assert inputs["region_global_index"].tolist() == [0, 0, 1, 1]
    assert inputs["region_global_grid_thw"].tolist() == [[1, 24, 24], [1, 22, 22]]
    other = image_items()[0] | {"image": example_scene(seed=8).frames[0]}
    mixed = encode(processor, [*image_items()[:2], other])
    assert mixed["region_global_index"].tolist() == [0, 0, 1]


def test_rows_with_different_images_take_the_plain_path():
    model, processor = tiny_model_and_processor("pixelrefer", seed=2)
    items = image_items()
    items[1] = items[1] | {"image": np.ascontiguousarray(items[1]["image"][::-1])}
    inputs = encode(processor, items)
    calls = tower_calls(model)
    width = inputs["input_ids"].shape[1]
    shared = model.generate_sharing_image(**inputs, **GREEDY)
    assert len(calls) == 1 and calls[0]["images"] == int(inputs["image_grid_thw"].prod(-1).sum())
    assert torch.equal(shared[:, width:], model.generate(**inputs, **GREEDY)[:, width:])
    # Beam search keeps the plain path too (it encodes once per sample already).
    inputs = encode(processor, image_items())
    beams = {"max_new_tokens": 4, "num_beams": 2, "do_sample": False}
    assert torch.equal(model.generate_sharing_image(**inputs, **beams), model.generate(**inputs, **beams))


@pytest.mark.parametrize("batch_size", [2, 8])
def test_the_pipeline_shares_an_image_within_each_batch(tiny, batch_size):
    model, processor = tiny
    pipe = RegionQAPipeline(model=model, processor=processor, task="region-qa")
    scene = example_scene()
    stranger = {
        "image": np.ascontiguousarray(scene.frames[0][:, ::-1]),
        "regions": [[5, 5, 60, 60]],
        "question": "<region>?",
    }
    items = [*image_items(), stranger, *image_items()[:2]]
    shared_calls = []
    original = model.generate_sharing_image

    def spy(**kwargs):
        shared_calls.append(kwargs["input_ids"].shape[0])
        return original(**kwargs)

    model.generate_sharing_image = spy
    answers = pipe(items, batch_size=batch_size, max_new_tokens=6)
    del model.generate_sharing_image
    assert answers == [pipe(item, max_new_tokens=6) for item in items]
    if model.config.is_lite:
        assert shared_calls == []  # one call per batch; the processor shares the context images
    else:
        # batch 2: [q0, q1] shared, [q2, stranger] plain, [q0, q1] shared; batch 8: the five on one picture shared.
        assert shared_calls == ([2, 2] if batch_size == 2 else [5])
