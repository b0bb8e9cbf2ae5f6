"""What a user gets without flags: left-padded batches equal single calls, converted checkpoints penalise repetitions
as the official inference does, generation right after training gives the eval-mode answer, the pipeline needs no
`trust_remote_code` while the package is imported, and the command line answers bad model names in one line."""

import json

import numpy as np
import pytest
import torch
from fixtures.official_checkpoint import write_official_checkpoint
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig, pipeline

from pixelrefer_hf import cli
from pixelrefer_hf.convert import convert_checkpoint
from pixelrefer_hf.demo import demo_checkpoint
from pixelrefer_hf.pipeline_region_qa import RegionQAPipeline
from pixelrefer_hf.testing import tiny_model_and_processor

VARIANTS = ("pixelrefer", "pixelrefer-lite")


def two_prompts(processor):
    """Two prompts of very different lengths (1 and 3 regions), so that padding really happens."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, size=(64, 80, 3), dtype=np.uint8) for _ in range(2)]
    questions = ["What is <region>?", "Compare <region>, <region> and <region> in a few words, please."]
    regions = [[[5, 5, 40, 30]], [[10, 10, 50, 50], [0, 20, 30, 60], [40, 8, 78, 60]]]
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for question in questions
    ]
    return prompts, images, regions


def until_eos(tokens: torch.Tensor, eos_token_id: int) -> list[int]:
    """The answer up to and including its first end-of-sequence token (a batch pads finished rows after it)."""
    tokens = tokens.tolist()
    return tokens[: tokens.index(eos_token_id) + 1] if eos_token_id in tokens else tokens


def assert_batch_equals_single_calls(model, processor):
    prompts, images, regions = two_prompts(processor)
    eos = processor.tokenizer.eos_token_id
    batch = processor(text=prompts, images=images, regions=regions, padding=True, return_tensors="pt")
    attention = batch["attention_mask"]
    assert bool((attention[:, -1] == 1).all()) and not bool(attention.all()), "expected left padding"
    with torch.no_grad():
        batched = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1] :]
        for index in range(2):
            single = processor(
                text=[prompts[index]], images=[images[index]], regions=[regions[index]], return_tensors="pt"
            )
            alone = model.generate(**single, max_new_tokens=6, do_sample=False)[0, single["input_ids"].shape[1] :]
            assert until_eos(batched[index], eos) == until_eos(alone, eos), index


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folders = {}
    for variant in VARIANTS:
        root = tmp_path_factory.mktemp(variant)
        write_official_checkpoint(root / "official", variant, fmt="safetensors")
        convert_checkpoint(root / "official", root / "converted")
        folders[variant] = root / "converted"
    return folders


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_processor_pads_left_and_a_batch_equals_single_calls(variant):
    model, processor = tiny_model_and_processor(variant)
    assert processor.tokenizer.padding_side == "left"
    assert_batch_equals_single_calls(model, processor)


@pytest.mark.parametrize("variant", VARIANTS)
def test_demo_checkpoint_pads_left_and_a_batch_equals_single_calls(variant):
    folder = demo_checkpoint(variant)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert processor.tokenizer.padding_side == "left"
    assert_batch_equals_single_calls(model, processor)


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_checkpoint_pads_left_and_a_batch_equals_single_calls(converted, variant):
    model = AutoModelForImageTextToText.from_pretrained(converted[variant]).eval()
    processor = AutoProcessor.from_pretrained(converted[variant])
    assert processor.tokenizer.padding_side == "left"
    assert_batch_equals_single_calls(model, processor)
    # PixelRefer takes a video region on one frame, as the official code does.
    if variant == "pixelrefer":
        assert processor.image_processor.multi_frame_regions is False


# ---------------------------------------------------------------------------------------------------------------------
# Repetition penalty: generated tokens only, as the official inference (which generates from embeddings alone)
# ---------------------------------------------------------------------------------------------------------------------


def test_converted_generation_config_states_the_official_penalty_scope(converted):
    saved = json.loads((converted["pixelrefer"] / "generation_config.json").read_text())
    assert saved["repetition_penalty_scope"] == "generated"
    assert saved["repetition_penalty"] > 1.0  # the official-format test checkpoint ships one, like the released ones


@pytest.mark.parametrize("variant", VARIANTS)
def test_repetition_penalty_sees_only_generated_tokens_by_default(variant):
    model, processor = tiny_model_and_processor(variant)
    prompts, images, regions = two_prompts(processor)
    inputs = processor(text=prompts, images=images, regions=regions, padding=True, return_tensors="pt")
    options = {"max_new_tokens": 8, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}

    def run(**extra):
        return model.generate(**inputs, **options, **extra)

    plain, default = run(), run(repetition_penalty=5.0)
    # Step 1 has no generated token to penalise: the scores equal the unpenalised ones.
    torch.testing.assert_close(default.scores[0], plain.scores[0], rtol=0, atol=0)
    # Transformers' usual behaviour (prompt penalised too) is one setting away, and does change step 1.
    config = GenerationConfig(**model.generation_config.to_dict())
    config.repetition_penalty_scope = "all"
    everything = run(generation_config=config, repetition_penalty=5.0)
    assert not torch.equal(everything.scores[0], plain.scores[0])

    # The official inference: `generate(inputs_embeds=...)` without token ids, where transformers penalises only the
    # new tokens. Ours from token ids gives the same tokens. One sample at a time: with left padding, transformers
    # 5.23 also skips the first generated tokens of a padded row on that path (it ignores `padding length` tokens).
    for index in range(2):
        single = processor(text=[prompts[index]], images=[images[index]], regions=[regions[index]], return_tensors="pt")
        visual = {k: v for k, v in single.items() if k not in ("input_ids", "attention_mask")}
        embeds, _, _ = model.model.embed_multimodal_inputs(input_ids=single["input_ids"], **visual)
        with pytest.warns(UserWarning, match="only to newly generated tokens"):
            official = model.generate(inputs_embeds=embeds, repetition_penalty=5.0, **options)
        ours = model.generate(**single, repetition_penalty=5.0, **options)
        assert official.sequences.tolist() == ours.sequences[:, single["input_ids"].shape[1] :].tolist(), index
    with pytest.raises(ValueError, match="repetition_penalty_scope"):
        config.repetition_penalty_scope = "prompt"
        run(generation_config=config, repetition_penalty=5.0)


# ---------------------------------------------------------------------------------------------------------------------
# Straight from training to answers
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_pipeline_on_a_model_left_in_training_mode_gives_the_eval_answer(variant):
    """After `trainer.train()` the model (a PEFT wrapper, with gradient checkpointing and LoRA dropout) is left in
    training mode. The pipeline must answer as the same model in eval mode, and leave it in training mode."""
    base, processor = tiny_model_and_processor(variant)
    base.gradient_checkpointing_enable()
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=r".*\.language_model\..*\.(q_proj|v_proj)")
    model = get_peft_model(base, lora)
    with torch.no_grad():  # non-zero adapters, so that dropout on them would change the answer
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    _, images, regions = two_prompts(processor)
    items = [
        {"image": image, "regions": item_regions, "question": question}
        for image, item_regions, question in zip(
            images, regions, ["What is <region>?", "Compare <region>, <region> and <region>."], strict=True
        )
    ]
    pipe = pipeline("region-qa", model=model, processor=processor)
    model.train()
    in_training = pipe(items, max_new_tokens=8)
    assert model.training and base.model.language_model.training  # put back as it was
    model.eval()
    assert pipe(items, max_new_tokens=8) == in_training


# ---------------------------------------------------------------------------------------------------------------------
# Imports, pipeline and command line
# ---------------------------------------------------------------------------------------------------------------------


def test_collator_is_exported_at_the_top_level():
    import pixelrefer_hf
    from pixelrefer_hf.collator import PixelReferDataCollator

    assert pixelrefer_hf.PixelReferDataCollator is PixelReferDataCollator
    with pytest.raises(AttributeError):
        pixelrefer_hf.NoSuchThing  # noqa: B018


def test_pipeline_from_a_folder_needs_no_trust_remote_code_with_the_package_imported(tmp_path):
    model, processor = tiny_model_and_processor("pixelrefer")
    RegionQAPipeline(model=model, processor=processor, task="region-qa").save_pretrained(tmp_path)
    assert "region-qa" in json.loads((tmp_path / "config.json").read_text())["custom_pipelines"]
    item = {"image": two_prompts(processor)[1][0], "regions": [[5, 5, 40, 30]], "question": "What is <region>?"}
    from_folder = pipeline("region-qa", model=str(tmp_path))
    in_memory = pipeline("region-qa", model=model, processor=processor)
    assert from_folder(item, max_new_tokens=6) == in_memory(item, max_new_tokens=6)


@pytest.mark.parametrize(
    ("model_name", "message"),
    [
        ("./does/not/exist", "--model './does/not/exist': no such checkpoint folder"),
        ("org/name", "--model 'org/name': cannot load the checkpoint"),
    ],
)
def test_ask_with_a_model_that_cannot_load_is_one_line(model_name, message, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status = cli.main(["ask", "examples/assets/shapes.png", "--model", model_name, "--box", "1,1,20,20", "<region>?"])
    err = capsys.readouterr().err
    assert status == 2 and message in err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "error" in line]) == 1


def test_ask_reports_an_unreadable_image_before_loading_the_model(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    loaded = []
    monkeypatch.setattr(cli, "load_model_and_processor", lambda name: loaded.append(name))
    status = cli.main(["ask", str(bad), "--box", "1,1,20,20", "<region>?"])
    assert status == 2 and "cannot read image" in capsys.readouterr().err
    assert loaded == []
