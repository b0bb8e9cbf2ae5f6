"""The bundled demo checkpoints: what ships, that they really answer region questions, and that training learns."""

import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fresh_process import offline_env, run_python
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

import pixelrefer_hf
from pixelrefer_hf import cli
from pixelrefer_hf.demo import (
    CARD_RESULTS_BEGIN,
    DEMO_CHECKPOINTS,
    DEMO_TARGETS,
    demo_checkpoint,
    replace_card_results,
    target_report,
)
from pixelrefer_hf.synthetic import EXAMPLE_SCENE_OBJECTS, normalize_answer, score_shapes_answers, shapes_questions

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(pixelrefer_hf.__file__).parent
EXAMPLE_IMAGE = ROOT / "examples" / "assets" / "shapes.png"
VARIANTS = sorted(DEMO_CHECKPOINTS)
# Held-out scenes for the tests: neither the training seed (0) nor the README evaluation seed (1000).
TEST_SEED = 2024


@pytest.fixture(scope="module", params=VARIANTS)
def demo_pipeline(request):
    return request.param, pipeline("region-qa", model=demo_checkpoint(request.param), trust_remote_code=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_folder_ships_safe_small_weights_and_card_and_no_code(variant):
    folder = Path(demo_checkpoint(variant))
    files = {path.name for path in folder.iterdir()}
    weights = folder / "model.safetensors"
    assert weights.stat().st_size < 25_000_000
    assert not {name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))}, files
    card = (folder / "README.md").read_text()
    assert "This is not a real PixelRefer model" in card and "pixelrefer convert" in card
    assert CARD_RESULTS_BEGIN in card and "(not evaluated yet)" not in card
    config = json.loads((folder / "config.json").read_text())
    assert config["variant"] == variant
    # Shipped inside the package, whose import registers every class: no copies of its modules, and nothing that
    # would make `trust_remote_code=True` look for them.
    assert not [name for name in files if name.endswith(".py")], files
    for name in ("config.json", "processor_config.json", "tokenizer_config.json"):
        assert "auto_map" not in (folder / name).read_text(), name


# Answer sets of the kinds whose answers are not object names: a wrong answer is still one of these.
ANSWER_SETS = {"larger": {"yes", "no"}, "direction": {"left", "right", "up", "down"}}
# Where a bundled checkpoint falls short of `DEMO_TARGETS` (README, "Demo checkpoints", 100 questions per kind: Lite's
# `what` 92%, PixelRefer's direction at chance), the level it is held to instead; None holds only the answer format.
# Every other target is asserted as it is. Drop an entry once a retrained checkpoint meets its target.
SHORTFALLS = {
    "pixelrefer": {"direction": None},
    "pixelrefer-lite": {"what": 0.85},
}
# A model exactly at a bar falls below the passing count on this small set at most this often (a one-sided binomial
# test): 30 questions cannot tell 95% from 93%, so the test fails on results that are unlikely at the bar, not on noise.
SAMPLING_RISK = 0.05


def passing_count(bar: float, total: int, risk: float = SAMPLING_RISK) -> int:
    """The largest count k for which a model whose true accuracy is `bar` scores below k (of `total` independent
    questions) with probability at most `risk`."""
    below = 0.0  # P(score < k)
    for k in range(total + 1):
        chance_of_k = math.comb(total, k) * bar**k * (1 - bar) ** (total - k)
        if below + chance_of_k > risk:
            return k
        below += chance_of_k
    return total


def test_passing_count_is_the_binomial_lower_tail():
    # Binomial(30, 0.95): P(X <= 25) = 0.016, P(X <= 26) = 0.061, so 26 passes and 25 does not.
    assert passing_count(0.95, 30) == 26
    assert passing_count(0.9, 28) == 22  # P(X <= 21) = 0.018, P(X <= 22) = 0.055
    assert passing_count(1.0, 30) == 30 and passing_count(0.0, 30) == 0
    assert passing_count(0.95, 30, risk=0.5) == 29


@pytest.fixture(scope="module")
def held_out_questions():
    """30 held-out questions of every kind (scenes of the test seed), as the README's table asks them."""
    return shapes_questions(TEST_SEED, num_per_kind=30)


def test_demo_checkpoints_meet_their_targets_on_held_out_questions(demo_pipeline, held_out_questions):
    """Every question kind, and the what / colour / shape questions about objects under 16 px, at its target
    (`DEMO_TARGETS`: 95% colour / shape, 90% under 16 px, ...) on 30 questions per kind, or at its `SHORTFALLS`
    level where the checkpoint is known to miss it; a kind fails when its count is one a model at the bar reaches
    less than 5% of the time (`passing_count`: 26/30 for 95%)."""
    variant, pipe = demo_pipeline
    items = held_out_questions
    outputs = pipe([item.inputs for item in items], batch_size=32, max_new_tokens=6, do_sample=False)
    answers = [output["answer"] for output in outputs]
    scores = score_shapes_answers(items, answers)
    measured = {name: (scores["kinds"] | scores["sizes"])[name] for name in DEMO_TARGETS}
    print(variant, {name: f"{entry['correct']}/{entry['total']}" for name, entry in measured.items()})
    assert measured["<16px"]["total"] >= 20, measured  # enough tiny objects for the size target to mean something
    bars = {name: SHORTFALLS[variant].get(name, target) for name, target in DEMO_TARGETS.items()}
    missed = {
        name: f"{entry['correct']}/{entry['total']} (bar {bars[name]:.0%}: at least {needed}/{entry['total']})"
        for name, entry in measured.items()
        if bars[name] is not None and entry["correct"] < (needed := passing_count(bars[name], entry["total"]))
    }
    assert not missed, (variant, missed, scores["wrong"])
    # A wrong answer still comes from its kind's answer set.
    for item, answer in zip(items, answers):
        if item.question.kind in ANSWER_SETS:
            assert normalize_answer(answer) in ANSWER_SETS[item.question.kind], (item.question.kind, answer)


def test_readme_main_command_answers_with_the_demo_checkpoint(capsys):
    status = cli.main(["ask", str(EXAMPLE_IMAGE), "--box", "40,40,90,90", "What is <region>?"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert captured.out.strip() == "a red square"
    status = cli.main(
        ["ask", str(EXAMPLE_IMAGE), "--model", "demo-lite", "--box", "40,40,90,90", "--json", "What color is <region>?"]
    )
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert json.loads(captured.out)["answer"] == "red"


# The README's boxes of `examples/assets/shapes.png` (`EXAMPLE_SCENE_OBJECTS`) and what it says each demo calls them.
README_BOX_ANSWERS = {
    "pixelrefer": {},
    "pixelrefer-lite": {},
}


def test_readme_boxes_of_the_example_image_get_the_answers_the_readme_gives(demo_pipeline):
    """Asked `What is <region>?` with the README's box of each shape of the example image, the demo model names every
    shape right (`README_BOX_ANSWERS` would hold the exceptions the README names; there are none)."""
    variant, pipe = demo_pipeline
    image = Image.open(EXAMPLE_IMAGE)
    items = [
        {"image": image, "regions": [[left, top, left + size, top + size]], "question": "What is <region>?"}
        for _, _, size, top, left in EXAMPLE_SCENE_OBJECTS
    ]
    answers = [output["answer"] for output in pipe(items, batch_size=8, max_new_tokens=6, do_sample=False)]
    expected = [README_BOX_ANSWERS[variant].get(obj, f"a {obj[1]} {obj[0]}") for obj in EXAMPLE_SCENE_OBJECTS]
    assert answers == expected, (variant, answers)
    # The README's pair: the red square (50 px) is larger than the tiny green circle (10 px), and not the other way.
    square, circle = (
        [left, top, left + size, top + size]
        for _, _, size, top, left in (EXAMPLE_SCENE_OBJECTS[0], EXAMPLE_SCENE_OBJECTS[3])
    )
    pairs = [
        {"image": image, "regions": regions, "question": "Is <region> larger than <region>?"}
        for regions in ([square, circle], [circle, square])
    ]
    assert [output["answer"] for output in pipe(pairs, max_new_tokens=4, do_sample=False)] == ["yes", "no"]


def test_default_model_of_the_command_is_the_demo_checkpoint(capsys):
    assert cli.DEFAULT_MODEL == "demo"
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "variant:      pixelrefer\n" in out


def test_exported_demo_checkpoint_loads_without_the_package(tmp_path):
    """The pipeline's `save_pretrained` writes the remote code (the model's and its own), so an exported copy works,
    through the Auto classes and the pipeline, in a fresh offline process where `pixelrefer_hf` cannot be imported."""
    export = tmp_path / "export"
    pipeline("region-qa", model=demo_checkpoint("pixelrefer-lite")).save_pretrained(export)
    assert (export / "modeling_pixelrefer.py").read_bytes() == (PACKAGE / "modeling_pixelrefer.py").read_bytes()
    code = f"""
        import json
        from transformers import AutoModel, AutoProcessor, pipeline
        path = {str(export)!r}
        model = AutoModel.from_pretrained(path, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        pipe = pipeline("region-qa", model=path, trust_remote_code=True)
        answer = pipe(image={str(EXAMPLE_IMAGE)!r}, regions=[[140, 30, 184, 74]], question="What color is <region>?",
                      max_new_tokens=6)
        result = {{"model": type(model).__name__, "processor": type(processor).__name__, "answer": answer["answer"]}}
        print("RESULT" + json.dumps(result))
    """
    result = run_python(code, cwd=tmp_path)
    assert result == {
        "model": "PixelReferForConditionalGeneration",
        "processor": "PixelReferProcessor",
        "answer": "yellow",
    }
    # The same answer as with the package installed.
    model = AutoModel.from_pretrained(demo_checkpoint("pixelrefer-lite"), trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(demo_checkpoint("pixelrefer-lite"), trust_remote_code=True)
    assert type(model).__module__ == "pixelrefer_hf.modeling_pixelrefer"
    assert type(processor).__module__ == "pixelrefer_hf.processing_pixelrefer"


def test_short_training_from_scratch_lowers_the_loss(tmp_path):
    output = tmp_path / "run"
    command = [
        sys.executable,
        str(ROOT / "examples" / "train_shapes.py"),
        "--output_dir",
        str(output),
        "--max_steps",
        "6",
        "--num_train_rows",
        "24",
        "--per_device_train_batch_size",
        "4",
        "--warmup_steps",
        "0",
        "--logging_steps",
        "1",
        "--threads",
        "1",
        "--perception_steps",
        "24",
        "--perception_batch_size",
        "8",
        "--token_geometry_weight",
        "3",
        "--direction_loss_weight",
        "2",
        "--direction_warmup_videos",
        "2",
        "--direction_warmup_epochs",
        "1",
        "--direction_warmup_batch_size",
        "2",
    ]
    env = offline_env()
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["steps"] == 6 and summary["perception_steps"] == 24
    assert summary["token_geometry"] == {"weight": 3.0, "scale": 8.0, "targets": "area,x,y"}
    assert summary["direction_loss_weight"] == 2.0
    assert summary["direction_warmup"]["videos"] == 2 and summary["direction_warmup"]["prompts"] >= 4
    card = (output / "README.md").read_text()
    assert "a video row's answers weighted 2x in the loss" in card and "Stage 1b, direction warm-up" in card
    first, last = summary["perception_loss_first_last"]
    assert last < first  # stage 1 learns too (means of its first and last 10 steps)
    assert summary["last_logged_loss"] < 0.7 * summary["first_logged_loss"], summary
    assert (output / "README.md").is_file() and not (output / "training_args.bin").exists()
    model = AutoModel.from_pretrained(output, trust_remote_code=True)
    assert model.config.legacy_box_position is False and model.config.num_object_tokens == 8
    assert torch.isfinite(next(model.parameters())).all()
    assert os.path.getsize(output / "model.safetensors") < 25_000_000


def test_per_token_geometry_read_out_cannot_amplify_a_faint_feature():
    """Stage 1's per-token read-out (`train_shapes.py --token_geometry_weight`) sees the token as the LLM's RMSNorm
    does and projects it on unit directions: its outputs ignore the token's scale and the weights' length, and no
    output exceeds sqrt(hidden) (Cauchy-Schwarz), so a target of +-s forces a share s / sqrt(hidden) of every token's
    norm onto that direction."""
    script = runpy.run_path(str(ROOT / "examples" / "train_shapes.py"), run_name="train_shapes")
    torch.manual_seed(0)
    head = script["ObjectPerceptionHead"](16)
    torch.nn.init.zeros_(head.token_geometry_direction.bias)
    tokens = torch.randn(7, 16)
    out = head.token_geometry(tokens)
    assert out.shape == (7, 3)
    torch.testing.assert_close(head.token_geometry(25 * tokens), out)
    with torch.no_grad():
        head.token_geometry_direction.weight.mul_(100)
    torch.testing.assert_close(head.token_geometry(tokens), out)
    assert out.abs().max() <= 4.0 + 1e-4
    # A token that is all along one read-out direction gives exactly sqrt(hidden) there.
    direction = head.token_geometry_direction.weight[1] / head.token_geometry_direction.weight[1].norm()
    assert head.token_geometry(3 * direction[None])[0, 1].item() == pytest.approx(4.0, abs=1e-3)


def test_direction_loss_weight_scales_the_answers_of_video_rows_only(tmp_path):
    """`train_shapes.py --direction_loss_weight`: the loss weights a video row's answer tokens (its direction turns)
    and leaves it the plain token mean of TRL's SFTTrainer at weight 1."""
    from trl import SFTConfig, SFTTrainer

    from pixelrefer_hf.collator import PixelReferDataCollator
    from pixelrefer_hf.demo import demo_config_and_processor
    from pixelrefer_hf.modeling_pixelrefer import PixelReferForConditionalGeneration
    from pixelrefer_hf.synthetic import shapes_region_chat_dataset

    script = runpy.run_path(str(ROOT / "examples" / "train_shapes.py"), run_name="train_shapes")
    config, processor = demo_config_and_processor("pixelrefer-lite")
    torch.manual_seed(0)
    model = PixelReferForConditionalGeneration(config)
    dataset = shapes_region_chat_dataset(12, seed=3, video_fraction=0.5)
    rows = dataset.to_list()
    still, video = next(r for r in rows if not r["frames"]), next(r for r in rows if r["frames"])
    args = SFTConfig(output_dir=str(tmp_path), **{**script["default_training_arguments"](), "max_steps": 1})
    plain_collator = PixelReferDataCollator(processor)
    trainer = script["RowWeightedSFTTrainer"](
        model=model, args=args, train_dataset=dataset, processing_class=processor, data_collator=plain_collator
    )
    plain = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=processor, data_collator=plain_collator
    )

    def loss(weight: float, batch_rows: list[dict], trainer=trainer) -> float:
        batch = script["RowWeightedCollator"](plain_collator, weight)(batch_rows)
        assert batch["loss_weights"].tolist() == [1.0 if not r["frames"] else weight for r in batch_rows]
        if trainer is plain:
            batch.pop("loss_weights")
        with torch.no_grad():
            return float(trainer.compute_loss(model, batch))

    both = [still, video]
    assert loss(1.0, both) == pytest.approx(loss(1.0, both, trainer=plain), rel=1e-5)
    # Linear in the video row's weight, with the still row's share unchanged.
    at_zero, at_one = loss(0.0, both), loss(1.0, both)
    assert at_zero < at_one
    assert loss(5.0, both) == pytest.approx(at_zero + 5 * (at_one - at_zero), rel=1e-5)
    # A batch of still rows only is untouched by the weight.
    assert loss(5.0, [still]) == pytest.approx(loss(1.0, [still], trainer=plain), rel=1e-5)


def test_direction_warmup_caches_one_region_prompts_and_trains_only_the_llm():
    """`train_shapes.py --direction_warmup_videos`: one prompt per moving shape, naming that one region, encoded once;
    the warm-up then changes the LLM and its head and nothing on the object side."""
    from pixelrefer_hf.demo import demo_config_and_processor
    from pixelrefer_hf.modeling_pixelrefer import PixelReferForConditionalGeneration
    from pixelrefer_hf.synthetic import DIRECTIONS, NUM_VIDEO_FRAMES

    script = runpy.run_path(str(ROOT / "examples" / "train_shapes.py"), run_name="train_shapes")
    config, processor = demo_config_and_processor("pixelrefer-lite")
    torch.manual_seed(0)
    model = PixelReferForConditionalGeneration(config)
    prompts = script["direction_prompts"](model, processor, num_videos=3, seed=0, video_shapes=(2, 3))
    assert 6 <= len(prompts) <= 9
    tokenizer = processor.tokenizer
    for embeds, ids, labels in prompts:
        assert embeds.shape == (len(ids), config.text_config.hidden_size) and labels.shape == ids.shape
        text = tokenizer.decode(ids)
        assert text.count("Which way does") == 1 and text.count("Time ") == NUM_VIDEO_FRAMES  # one region
        answer = tokenizer.decode(labels[labels != -100], skip_special_tokens=True).strip()
        assert answer in DIRECTIONS

    before = {name: value.clone() for name, value in model.state_dict().items()}
    summary = script["direction_warmup"](
        model, processor, num_videos=3, epochs=1, batch_size=4, learning_rate=1e-3, seed=0, video_shapes=(2, 3)
    )
    assert summary["prompts"] == len(prompts) and summary["held_out_prompts"] == 1
    assert len(summary["held_out_accuracy_per_epoch"]) == 1
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(name.startswith("model.language_model.") for name in changed)
    assert not [name for name in changed if name.startswith(script["PERCEPTION_PREFIXES"])]


def test_quickstart_example_answers_with_the_demo_checkpoint(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["quickstart.py"])
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert out.split("\n\n")[:3] == [
        "Q: What is <region>?\nA: a red square",
        "Q: What shape is <region>?\nA: circle",
        "Q: What is <region>?\nA: a purple square",  # the 12-pixel square
    ]


def test_card_results_are_replaced_between_markers_and_bad_names_are_refused():
    card = (Path(demo_checkpoint("pixelrefer")) / "README.md").read_text()
    replaced = replace_card_results(card, "| new table |")
    assert "| new table |" in replaced and replaced.count(CARD_RESULTS_BEGIN) == 1
    assert replaced.split(CARD_RESULTS_BEGIN)[0] == card.split(CARD_RESULTS_BEGIN)[0]
    with pytest.raises(ValueError, match="no evaluation markers"):
        replace_card_results("# a card without markers", "| table |")
    with pytest.raises(ValueError, match="variant must be one of"):
        demo_checkpoint("pixelrefer-xl")


def test_target_report_names_every_missed_target_with_its_number():
    def entry(correct: int, total: int) -> dict:
        return {"correct": correct, "total": total, "accuracy": correct / total}

    kinds = {"what": entry(96, 100), "color": entry(100, 100), "shape": entry(94, 100), "larger": entry(90, 100)}
    report = target_report({"kinds": kinds | {"direction": entry(50, 100)}, "sizes": {"<16px": entry(9, 10)}})
    assert report.startswith("Meets its targets on what (target 95%), color (target 95%), larger (target 90%)")
    assert "<16px (target 90%)" in report.split(" Misses ")[0]
    assert "shape: 94.0% against a target of 95%" in report and "direction: 50.0% against a target of 90%" in report
    assert "Misses" not in target_report({"kinds": {"what": entry(1, 1)}, "sizes": {}})
