"""Conversion of official-format PixelRefer / PixelRefer-Lite snapshots (tiny, synthetic) with `pixelrefer_hf.convert`."""

import json
import os
import textwrap

import numpy as np
import pytest
import torch
from fixtures.official_checkpoint import write_official_checkpoint
from fresh_process import run_python
from transformers import AutoModelForImageTextToText, AutoProcessor

from pixelrefer_hf import PixelReferProcessor
from pixelrefer_hf.convert import ConversionError, build_parser, convert_checkpoint, main, map_official_key

VARIANTS = ("pixelrefer", "pixelrefer-lite")


def sample_inputs(processor, variant):
    """One image with a mask and a box region, as the processor of `variant` expects them."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(64, 80, 3), dtype=np.uint8)
    mask = np.zeros((64, 80), dtype=bool)
    mask[20:40, 30:60] = True
    text = "<|im_start|>user\n<image>\nCompare <region> and <region>.<|im_end|>\n<|im_start|>assistant\n"
    return processor(text=[text], images=[image], regions=[[mask, [4, 6, 30, 40]]], return_tensors="pt")


def leftovers(parent):
    """Anything the converter left next to its output: staging folders must never survive."""
    return [name for name in os.listdir(parent) if ".partial-" in name]


# ---------------------------------------------------------------------------------------------------------------------
# The key mapping on its own
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "variant", "expected"),
    [
        (
            "model.vision_encoder.vision_encoder.encoder.layers.3.self_attn.q_proj.weight",
            "pixelrefer",
            ("model.vision_model.encoder.layers.3.self_attn.q_proj.weight",),
        ),
        (
            "model.vision_encoder.vision_encoder.post_layernorm.bias",
            "pixelrefer-lite",
            ("model.vision_model.post_layernorm.bias",),
        ),
        ("model.embed_tokens.weight", "pixelrefer", ("model.language_model.embed_tokens.weight",)),
        (
            "model.layers.27.mlp.down_proj.weight",
            "pixelrefer-lite",
            ("model.language_model.layers.27.mlp.down_proj.weight",),
        ),
        ("model.norm.weight", "pixelrefer", ("model.language_model.norm.weight",)),
        ("lm_head.weight", "pixelrefer", ("lm_head.weight",)),
        ("model.mm_projector.readout.2.bias", "pixelrefer", ("model.projector.readout.2.bias",)),
        ("model.mm_projector.readout.0.weight", "pixelrefer-lite", ()),
        ("model.region_encoder.pos_linear.weight", "pixelrefer", ("model.object_tokenizer.position_embedding.weight",)),
        (
            "model.region_encoder.feat_linear.0.weight",
            "pixelrefer-lite",
            ("model.object_tokenizer.projector.readout.0.weight",),
        ),
        ("model.region_encoder.feat_linear.2.bias", "pixelrefer", ("model.object_tokenizer.projector.readout.2.bias",)),
        (
            "model.region_encoder.fusion_attention_local.in_proj_weight",
            "pixelrefer-lite",
            tuple(f"model.object_infusion.local_attention.{p}_proj.weight" for p in "qkv"),
        ),
        (
            "model.region_encoder.fusion_attention_global.in_proj_bias",
            "pixelrefer-lite",
            tuple(f"model.object_infusion.global_attention.{p}_proj.bias" for p in "qkv"),
        ),
        (
            "model.region_encoder.fusion_attention_global.out_proj.weight",
            "pixelrefer-lite",
            ("model.object_infusion.global_attention.out_proj.weight",),
        ),
        ("model.region_encoder.ln_local.weight", "pixelrefer-lite", ("model.object_infusion.local_norm.weight",)),
        ("model.region_encoder.ln_global.bias", "pixelrefer-lite", ("model.object_infusion.global_norm.bias",)),
        ("model.region_encoder.mask_embedding.weight", "pixelrefer-lite", ()),
        # Lite-only modules in a PixelRefer checkpoint, and unknown keys, have no place.
        ("model.region_encoder.fusion_attention_local.in_proj_weight", "pixelrefer", None),
        ("model.region_encoder.ln_local.weight", "pixelrefer", None),
        ("model.region_encoder.mask_embedding.weight", "pixelrefer", None),
        ("model.vision_encoder.other.weight", "pixelrefer", None),
        ("model.region_encoder.extra.weight", "pixelrefer-lite", None),
    ],
)
def test_key_mapping(key, variant, expected):
    assert map_official_key(key, variant) == expected


def test_parser_defaults_and_choices():
    args = build_parser().parse_args(["--official", "a", "--out", "b"])
    assert (args.variant, args.dtype, args.push_to_hub, args.overwrite) == ("auto", "auto", None, False)
    assert args.resize_backend == "opencv"
    for bad in (["--dtype", "int8"], ["--resize-backend", "pil"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--official", "a", "--out", "b", *bad])


# ---------------------------------------------------------------------------------------------------------------------
# Conversion computes what the official weights compute
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_converted_model_equals_the_model_the_official_weights_describe(variant, fmt, tmp_path):
    reference, reference_processor = write_official_checkpoint(tmp_path / "official", variant, fmt, seed=3)
    out = convert_checkpoint(tmp_path / "official", tmp_path / "out")

    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert isinstance(processor, PixelReferProcessor)
    assert model.config.variant == variant
    image_processor = processor.image_processor
    assert (model.config.num_object_tokens, image_processor.max_visual_tokens) == (8, 1024)
    # Written with the region-qa pipeline's code, for use from the hub without the package.
    assert (out / "pipeline_region_qa.py").is_file()
    assert "region-qa" in json.loads((out / "config.json").read_text())["custom_pipelines"]
    assert model.config.legacy_box_position and image_processor.legacy_local_crop_reuse == (
        variant == "pixelrefer-lite"
    )
    assert model.config.image_token_id == reference.config.image_token_id
    assert model.config.region_token_id == reference.config.region_token_id

    ours, expected = model.state_dict(), reference.state_dict()
    assert ours.keys() == expected.keys()
    for key in expected:
        assert torch.equal(ours[key], expected[key]), key

    # A converted checkpoint resizes with OpenCV, like the official code; the reference model's processor does not.
    assert processor.image_processor.resize_backend == "opencv"
    reference_processor.image_processor.resize_backend = "opencv"
    inputs = sample_inputs(processor, variant)
    reference_inputs = sample_inputs(reference_processor, variant)
    for key in reference_inputs:
        assert torch.equal(inputs[key], reference_inputs[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**reference_inputs).logits, atol=1e-5, rtol=1e-5)

    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["repetition_penalty"], generation["top_k"], generation["do_sample"]) == (1.1, 20, True)
    rendered = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is <region>?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert rendered == "<|im_start|>user\n<image>\nWhat is <region>?<|im_end|>\n<|im_start|>assistant\n"
    assert (out / "README.md").read_text().startswith("---\nlicense: apache-2.0")


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_processor_resizes_with_opencv_unless_told_otherwise(variant, tmp_path):
    write_official_checkpoint(tmp_path / "official", variant, "bin")
    default = convert_checkpoint(tmp_path / "official", tmp_path / "default")
    saved = json.loads((default / "processor_config.json").read_text())["image_processor"]
    assert saved["resize_backend"] == "opencv"
    assert AutoProcessor.from_pretrained(default, trust_remote_code=True).image_processor.resize_backend == "opencv"

    assert (
        main(["--official", str(tmp_path / "official"), "--out", str(tmp_path / "numpy"), "--resize-backend", "numpy"])
        == 0
    )
    assert PixelReferProcessor.from_pretrained(tmp_path / "numpy").image_processor.resize_backend == "numpy"


def test_dtype_option_casts_the_weights_and_the_config(tmp_path):
    write_official_checkpoint(tmp_path / "official", "pixelrefer", "bin")
    out = convert_checkpoint(tmp_path / "official", tmp_path / "out", dtype="bfloat16")
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_tied_checkpoint_drops_a_duplicated_lm_head_and_rejects_a_different_one(tmp_path):
    official = tmp_path / "official"
    write_official_checkpoint(official, "pixelrefer", "bin")
    config = json.loads((official / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (official / "config.json").write_text(json.dumps(config))
    weights = torch.load(official / "pytorch_model.bin", weights_only=True)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    torch.save(weights, official / "pytorch_model.bin")
    out = convert_checkpoint(official, tmp_path / "out")
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(model.lm_head.weight, weights["model.embed_tokens.weight"])

    weights["lm_head.weight"] += 1
    torch.save(weights, official / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="Expected lm_head.weight to equal model.embed_tokens.weight"):
        convert_checkpoint(official, tmp_path / "out2")


# Runs in a fresh process where `pixelrefer_hf` cannot be imported: everything comes from the converted folders.
CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    data = np.load("inputs.npz")
    results = {}
    for folder in sys.argv[1:]:
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        inputs = processor(text=[str(data["text"])], images=[data["image"]], regions=[[data["mask"]]], return_tensors="pt")
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False, repetition_penalty=1.0)
        results[folder] = {"module": type(model).__module__, "tokens": tokens[0].tolist()}
    print("RESULT" + json.dumps(results))
    """
)


def test_converted_folders_generate_in_a_fresh_process_without_the_package(tmp_path):
    image = np.random.default_rng(1).integers(0, 255, size=(56, 70, 3), dtype=np.uint8)
    mask = np.zeros((56, 70), dtype=bool)
    mask[10:30, 12:50] = True
    text = "<|im_start|>user\n<image>\nWhat is <region>?<|im_end|>\n<|im_start|>assistant\n"
    np.savez(tmp_path / "inputs.npz", image=image, mask=mask, text=np.array(text))
    expected = {}
    for variant, fmt in (("pixelrefer", "safetensors"), ("pixelrefer-lite", "bin")):
        reference, processor = write_official_checkpoint(tmp_path / f"official-{variant}", variant, fmt, seed=5)
        out = str(tmp_path / f"out-{variant}")
        assert main(["--official", str(tmp_path / f"official-{variant}"), "--out", out]) == 0
        inputs = processor(text=[text], images=[image], regions=[[mask]], return_tensors="pt")
        with torch.no_grad():
            expected[out] = reference.generate(**inputs, max_new_tokens=6, do_sample=False)[0].tolist()

    results = run_python(CHILD, *expected, cwd=tmp_path)
    for out, tokens in expected.items():
        assert results[out]["module"].startswith("transformers_modules."), results[out]["module"]
        assert results[out]["tokens"] == tokens, out


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one clear line, and no output folder
# ---------------------------------------------------------------------------------------------------------------------


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            config[outer][inner] = value
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def _corrupt_bin(folder):
    (folder / "pytorch_model.bin").write_bytes(b"this is not a checkpoint" * 10)


def _truncate_bin(folder):
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])


def _add_unmapped_key(folder):
    weights = torch.load(folder / "pytorch_model.bin", weights_only=True)
    weights["model.region_encoder.extra_head.weight"] = torch.zeros(2, 2)
    torch.save(weights, folder / "pytorch_model.bin")


def _drop_a_parameter(folder):
    weights = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del weights["model.region_encoder.pos_linear.bias"]
    torch.save(weights, folder / "pytorch_model.bin")


def _tokenizer_without_region(folder):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = folder / name
        path.write_text(path.read_text().replace("<REGION>", "<OBJECT>"))


BAD_BIN_INPUTS = {
    "no config": (lambda folder: (folder / "config.json").unlink(), "with a config.json, found none"),
    "wrong model_type": (
        lambda folder: _edit_config(folder, model_type="qwen2"),
        "Expected model_type 'pixelrefer_qwen2' or 'pixelreferlite_qwen2' .* found 'qwen2'",
    ),
    "corrupted weights": (_corrupt_bin, "Expected a complete PyTorch weight file .* cannot be read"),
    "truncated weights": (_truncate_bin, "Expected a complete PyTorch weight file .* cannot be read"),
    "no weights": (lambda folder: (folder / "pytorch_model.bin").unlink(), "Expected weights in .* found none"),
    "unmapped key": (_add_unmapped_key, "1 official key\\(s\\) with no place .*model.region_encoder.extra_head.weight"),
    "missing parameter": (
        _drop_a_parameter,
        "1 parameter\\(s\\) left without a value: model.object_tokenizer.position_embedding.bias",
    ),
    "sizes contradict weights": (
        lambda folder: _edit_config(folder, **{"vision_encoder_config.intermediate_size": 48}),
        "config.json sizes contradict the weights: .*fc1.weight is \\(64, 32\\) but config.json gives .*\\(48, 32\\)",
    ),
    "missing config field": (
        lambda folder: _edit_config(folder, vision_encoder_config=None),
        "Expected the official config.json to define vision_encoder_config",
    ),
    "tokenizer without <REGION>": (
        _tokenizer_without_region,
        "Expected the tokenizer .* special tokens <image> and <REGION> .* found none for <REGION>",
    ),
}


@pytest.mark.parametrize("case", list(BAD_BIN_INPUTS))
def test_bad_official_snapshot_gives_one_clear_error_and_no_output(case, tmp_path):
    official = tmp_path / "official"
    write_official_checkpoint(official, "pixelrefer", "bin")
    damage, message = BAD_BIN_INPUTS[case]
    damage(official)
    with pytest.raises(ConversionError, match=message) as error:
        convert_checkpoint(official, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_sharded_safetensors_with_a_missing_or_truncated_shard(tmp_path):
    official = tmp_path / "official"
    write_official_checkpoint(official, "pixelrefer-lite", "safetensors")
    shard = official / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ConversionError, match="Expected a complete safetensors weight file at .*00002-of-00003"):
        convert_checkpoint(official, tmp_path / "out")
    shard.unlink()
    with pytest.raises(ConversionError, match="found 1 missing: model-00002-of-00003.safetensors"):
        convert_checkpoint(official, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_not_a_folder_and_wrong_variant(tmp_path):
    with pytest.raises(ConversionError, match="Expected an official PixelRefer snapshot folder, found no folder"):
        convert_checkpoint(tmp_path / "nothing", tmp_path / "out")
    write_official_checkpoint(tmp_path / "official", "pixelrefer", "bin")
    with pytest.raises(
        ConversionError, match="Expected a pixelrefer-lite checkpoint .* found model_type 'pixelrefer_qwen2'"
    ):
        convert_checkpoint(tmp_path / "official", tmp_path / "out", variant="pixelrefer-lite")


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    write_official_checkpoint(tmp_path / "official", "pixelrefer", "bin")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="to be absent or empty, found files in it; pass --overwrite"):
        convert_checkpoint(tmp_path / "official", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    convert_checkpoint(tmp_path / "official", tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "config.json").is_file() and not (tmp_path / "out" / "keep.txt").exists()


def test_failure_while_writing_leaves_no_half_written_output(tmp_path, monkeypatch):
    write_official_checkpoint(tmp_path / "official", "pixelrefer-lite", "bin")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PixelReferProcessor, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(tmp_path / "official", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_command_line_reports_one_line_and_exit_status(tmp_path, capsys):
    write_official_checkpoint(tmp_path / "official", "pixelrefer", "bin")
    _edit_config(tmp_path / "official", model_type="llava")
    assert main(["--official", str(tmp_path / "official"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Expected model_type") and "found 'llava'" in err[0]


def test_push_to_hub_uploads_the_finished_folder(tmp_path, monkeypatch):
    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], sorted(os.listdir(kwargs["folder_path"]))))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    write_official_checkpoint(tmp_path / "official", "pixelrefer", "bin")
    convert_checkpoint(tmp_path / "official", tmp_path / "out", push_to_hub="me/PixelRefer-tiny")
    assert [call[:2] for call in calls] == [
        ("create_repo", "me/PixelRefer-tiny"),
        ("upload_folder", "me/PixelRefer-tiny"),
    ]
    assert {"config.json", "model.safetensors", "README.md", "modeling_pixelrefer.py"} <= set(calls[1][2])
