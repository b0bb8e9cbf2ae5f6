"""pipeline("region-qa"): single and batched calls, inputs, generation arguments, errors, remote code."""

import json
import math
import os
import textwrap

import numpy as np
import pytest
import torch
from fresh_process import run_python
from PIL import Image
from transformers import pipeline
from transformers.pipelines import PIPELINE_REGISTRY

import pixelrefer_hf
from pixelrefer_hf import RegionQAPipeline
from pixelrefer_hf.testing import tiny_model_and_processor

QUESTION = "What is <region>?"
MAX_NEW_TOKENS = 6


def make_image(seed: int = 0, size: tuple[int, int] = (56, 72)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)


def disc_mask(size: tuple[int, int] = (56, 72)) -> np.ndarray:
    yy, xx = np.mgrid[: size[0], : size[1]]
    return (yy - 25) ** 2 + (xx - 30) ** 2 <= 12**2


@pytest.fixture(scope="module")
def model_and_processor():
    return tiny_model_and_processor("pixelrefer", seed=3)


@pytest.fixture
def pipe(model_and_processor):
    model, processor = model_and_processor
    return RegionQAPipeline(model=model, processor=processor, task="region-qa", max_new_tokens=MAX_NEW_TOKENS)


def reference_answer(model, processor, image, regions, question, video=None, timestamps=None) -> str:
    """The answer of a direct processor + generate call, as the README shows it."""
    content_type = "video" if video is not None else "image"
    messages = [{"role": "user", "content": [{"type": content_type}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    media = {"videos": [video], "video_timestamps": [timestamps]} if video is not None else {"images": [image]}
    inputs = processor(text=[prompt], regions=[regions], return_tensors="pt", **media)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()


class GenerateSpy:
    """Wraps `model.generate` to count calls and record their inputs."""

    def __init__(self, model):
        self.model, self.original, self.calls = model, model.generate, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        output = self.original(**kwargs)
        self.new_token_counts = output.shape[1] - kwargs["input_ids"].shape[1]
        return output


def test_importing_the_package_registers_the_task(model_and_processor):
    assert "region-qa" in PIPELINE_REGISTRY.get_supported_tasks()
    model, processor = model_and_processor
    assert isinstance(pipeline("region-qa", model=model, processor=processor), RegionQAPipeline)


def test_single_call_matches_a_direct_generate_call(pipe, model_and_processor):
    model, processor = model_and_processor
    image, mask = make_image(), disc_mask()
    expected = reference_answer(model, processor, image, [mask], QUESTION)
    assert pipe(image=image, regions=[mask], question=QUESTION) == {"answer": expected}
    assert pipe({"image": image, "regions": [mask], "question": QUESTION}) == {"answer": expected}


def test_image_as_path_pil_and_array_give_the_same_answer(pipe, tmp_path):
    image = make_image(1)
    path = tmp_path / "picture.png"
    Image.fromarray(image).save(path)
    answers = [
        pipe(image=source, regions=[[5, 8, 40, 30]], question=QUESTION)["answer"]
        for source in (image, Image.fromarray(image), str(path), path)
    ]
    assert len(set(answers)) == 1


def test_list_is_answered_in_real_left_padded_batches(pipe, monkeypatch):
    """Items about different pictures: one plain left-padded `generate` per batch (items about one picture share
    it instead, see test_many_questions.py)."""
    batch_size = 2
    mask = disc_mask()
    questions = [
        "What is <region>?",
        "Describe <region> in detail please.",
        "Compare <region> and <region>.",
        "Color of <region>?",
        "Where is <region> in the picture, and what is next to it?",
    ]
    items = [
        {
            "image": make_image(2 + i),
            "regions": [mask] * q.count("<region>") if i % 2 else [[4, 4, 40, 30]] * q.count("<region>"),
            "question": q,
        }
        for i, q in enumerate(questions)
    ]
    one_by_one = [pipe(item) for item in items]
    spy = GenerateSpy(pipe.model)
    monkeypatch.setattr(pipe.model, "generate", spy)
    batched = pipe(items, batch_size=batch_size)

    assert batched == one_by_one
    assert len(spy.calls) == math.ceil(len(items) / batch_size)
    assert [call["input_ids"].shape[0] for call in spy.calls] == [
        min(batch_size, len(items) - start) for start in range(0, len(items), batch_size)
    ]
    # Left padding: every prompt ends in the last column, shorter ones start with padding.
    first = spy.calls[0]["attention_mask"]
    assert bool(first[:, -1].all()) and not bool(first[:, 0].all())


def test_video_frames_and_mixed_batches(pipe, model_and_processor):
    model, processor = model_and_processor
    frames = [make_image(seed) for seed in range(3)]
    region = {0: disc_mask(), 2: [10, 10, 50, 40]}
    question = "Where does <region> go?"
    expected = reference_answer(model, processor, None, [region], question, video=frames, timestamps=[0.0, 0.5, 1.0])
    item = {"video": frames, "regions": [region], "question": question, "video_timestamps": [0.0, 0.5, 1.0]}
    assert pipe(item) == {"answer": expected}
    assert pipe(video=np.stack(frames), regions=[region], question=question, video_timestamps=[0, 0.5, 1]) == {
        "answer": expected
    }
    image_item = {"image": frames[0], "regions": [disc_mask()], "question": QUESTION}
    results = pipe([image_item, item, image_item], batch_size=3)
    assert results[1] == {"answer": expected}
    assert results[0] == results[2] == pipe(image_item)


def test_region_forms_polygon_rle_and_mask_agree(pipe):
    from pixelrefer_hf.region_utils import rle_encode

    image = make_image(4)
    mask = np.zeros((56, 72), dtype=bool)
    mask[10:30, 20:50] = True
    polygon = {"polygons": [[20, 10, 49, 10, 49, 29, 20, 29]]}
    answers = {
        name: pipe(image=image, regions=[region], question=QUESTION)["answer"]
        for name, region in {"mask": mask, "rle": rle_encode(mask), "polygon": polygon, "box": [20, 10, 50, 30]}.items()
    }
    assert len(set(answers.values())) == 1, answers


def test_generation_arguments_pass_through(pipe, monkeypatch):
    spy = GenerateSpy(pipe.model)
    monkeypatch.setattr(pipe.model, "generate", spy)
    pipe(image=make_image(), regions=[disc_mask()], question=QUESTION, max_new_tokens=2, repetition_penalty=1.5)
    assert spy.calls[-1]["max_new_tokens"] == 2 and spy.calls[-1]["repetition_penalty"] == 1.5
    assert spy.new_token_counts <= 2
    pipe(image=make_image(), regions=[disc_mask()], question=QUESTION, do_sample=True, top_k=5)
    assert spy.calls[-1]["do_sample"] is True and spy.calls[-1]["top_k"] == 5


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"image": "/no/such/picture.png", "regions": [[0, 0, 5, 5]], "question": QUESTION}, "cannot read image"),
        ({"image": make_image(), "regions": [[0, 0, 5, 5]] * 2, "question": QUESTION}, "1 <region> placeholder"),
        ({"image": make_image(), "regions": [{"points": [[5, 5]]}], "question": QUESTION}, "needs sam_model"),
        ({"video": [], "regions": [], "question": "What happens?"}, "the video has no frames"),
        ({"image": make_image(), "regions": [np.zeros((56, 72), bool)], "question": QUESTION}, "mask is empty"),
        ({"image": make_image(), "regions": [[0, 0, 5, 5]], "question": "What is <REGION>?"}, "must not contain"),
        ({"video": [make_image()], "regions": [{3: [0, 0, 5, 5]}], "question": QUESTION}, "out of range"),
    ],
)
def test_bad_items_raise_clear_errors_naming_the_item(pipe, item, message):
    with pytest.raises(ValueError, match=message) as single:
        pipe(item)
    assert "item" not in str(single.value).split(":")[0]
    good = {"image": make_image(), "regions": [disc_mask()], "question": QUESTION}
    with pytest.raises(ValueError, match=f"^item 2: .*{message}"):
        pipe([good, good, item], batch_size=3)


def test_skip_bad_items_keeps_the_other_answers(pipe, monkeypatch):
    good = [{"image": make_image(seed), "regions": [disc_mask()], "question": QUESTION} for seed in range(3)]
    bad = {"image": "/no/such/picture.png", "regions": [[0, 0, 5, 5]], "question": QUESTION}
    expected = [pipe(item) for item in good]
    spy = GenerateSpy(pipe.model)
    monkeypatch.setattr(pipe.model, "generate", spy)
    results = pipe([good[0], bad, good[1], good[2]], batch_size=2, skip_bad_items=True)
    assert results[0] == expected[0] and results[2:] == expected[1:]
    assert results[1]["error"].startswith("item 1: ") and "cannot read image" in results[1]["error"]
    assert [call["input_ids"].shape[0] for call in spy.calls] == [1, 2]
    assert pipe([bad], skip_bad_items=True)[0].keys() == {"error"}


def test_call_arguments_are_checked(pipe):
    assert pipe([]) == []
    with pytest.raises(ValueError, match="not both"):
        pipe({"image": make_image(), "regions": [], "question": "Hi"}, question="Hi")
    with pytest.raises(ValueError, match="box_to_mask"):
        pipe(image=make_image(), regions=[[0, 0, 5, 5]], question=QUESTION, box_to_mask="maybe")
    with pytest.raises(ValueError, match="propagate_regions=True needs sam2_model"):
        pipe(video=[make_image()], regions=[{0: [0, 0, 5, 5]}], question=QUESTION, propagate_regions=True)


def test_the_pipeline_saves_its_code_and_the_model_alone_does_not(pipe, tmp_path):
    """The pipeline travels as transformers' custom pipelines do: written by the pipeline's save_pretrained."""
    pipe.save_pretrained(tmp_path / "pipeline")
    config = json.loads((tmp_path / "pipeline" / "config.json").read_text())
    assert config["custom_pipelines"] == {
        "region-qa": {
            "impl": "pipeline_region_qa.RegionQAPipeline",
            "pt": ["AutoModelForImageTextToText"],
            "type": "multimodal",
        }
    }
    saved = set(os.listdir(tmp_path / "pipeline"))
    assert {"pipeline_region_qa.py", "sam_utils.py", "media_io.py", "processor_config.json"} <= saved
    assert not hasattr(pipe.model.config, "custom_pipelines")  # the in-memory config is left as it was

    pipe.model.save_pretrained(tmp_path / "model")
    pipe.processor.save_pretrained(tmp_path / "model")
    saved = set(os.listdir(tmp_path / "model"))
    assert "custom_pipelines" not in json.loads((tmp_path / "model" / "config.json").read_text())
    assert not saved & {"pipeline_region_qa.py", "sam_utils.py", "media_io.py"}
    assert {"modeling_pixelrefer.py", "processing_pixelrefer.py"} <= saved


CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from transformers import pipeline

    folder = sys.argv[1]
    data = np.load(folder + "/inputs.npz")
    pipe = pipeline("region-qa", model=folder, trust_remote_code=True)
    items = [{"image": data["image"], "regions": [data["mask"]], "question": "What is <region>?"},
             {"image": folder + "/image.png", "regions": [[4, 6, 30, 40]], "question": "And <region>?"}]
    results = pipe(items, batch_size=2, max_new_tokens=6)
    print("RESULT" + json.dumps({"class": type(pipe).__module__ + "." + type(pipe).__name__, "results": results}))
    """
)


def test_fresh_process_without_the_package_runs_the_saved_pipeline_offline(model_and_processor, tmp_path):
    model, processor = model_and_processor
    folder = tmp_path / "checkpoint"
    local = RegionQAPipeline(model=model, processor=processor, task="region-qa")
    local.save_pretrained(folder)
    image, mask = make_image(5), disc_mask()
    np.savez(folder / "inputs.npz", image=image, mask=mask)
    Image.fromarray(image).save(folder / "image.png")
    expected = local(
        [
            {"image": image, "regions": [mask], "question": "What is <region>?"},
            {"image": image, "regions": [[4, 6, 30, 40]], "question": "And <region>?"},
        ],
        max_new_tokens=6,
    )

    result = run_python(CHILD, str(folder), cwd=tmp_path)
    assert result["class"].startswith("transformers_modules.") and result["class"].endswith(".RegionQAPipeline")
    assert result["results"] == expected
    assert pixelrefer_hf.RegionQAPipeline is RegionQAPipeline
