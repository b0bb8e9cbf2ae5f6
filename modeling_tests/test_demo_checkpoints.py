"""The bundled demo checkpoints: what ships, that they really answer region questions, and that training learns."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fresh_process import offline_env, run_python
from transformers import AutoModel, AutoProcessor, pipeline

import pixelrefer_hf
from pixelrefer_hf import cli
from pixelrefer_hf.demo import CARD_RESULTS_BEGIN, DEMO_CHECKPOINTS, demo_checkpoint, replace_card_results
from pixelrefer_hf.synthetic import score_shapes_answers, shapes_questions

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


def test_demo_checkpoints_answer_held_out_questions(demo_pipeline):
    """What / colour / shape questions: at least 90% together and 80% each on 45 held-out questions (README, seed
    1000: 87-100% per kind). The pair (`larger`) and video (`direction`) questions are asked too but not held to a
    bar: both checkpoints answer them near chance (README); this test prints their scores."""
    variant, pipe = demo_pipeline
    items = shapes_questions(TEST_SEED, num_per_kind=15, kinds=("what", "color", "shape"))
    items += shapes_questions(TEST_SEED, num_per_kind=5, kinds=("larger", "direction"))
    outputs = pipe([item.inputs for item in items], batch_size=28, max_new_tokens=6, do_sample=False)
    scores = score_shapes_answers(items, [output["answer"] for output in outputs])
    kinds = scores["kinds"]
    print(variant, {kind: round(entry["accuracy"], 2) for kind, entry in kinds.items()})
    single = [kinds[kind] for kind in ("what", "color", "shape")]
    assert sum(e["correct"] for e in single) / sum(e["total"] for e in single) >= 0.9, (variant, kinds, scores["wrong"])
    for kind in ("what", "color", "shape"):
        assert kinds[kind]["accuracy"] >= 0.8, (variant, kind, scores["wrong"])
    # Answers to the other kinds still come from their answer sets (the format is learned even where the content
    # is not).
    for item, output in zip(items, outputs):
        if item.question.kind == "larger":
            assert output["answer"].strip() in ("yes", "no"), output
        if item.question.kind == "direction":
            assert output["answer"].strip() in ("left", "right", "up", "down"), output


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
    ]
    env = offline_env()
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["steps"] == 6 and summary["perception_steps"] == 24
    first, last = summary["perception_loss_first_last"]
    assert last < first  # stage 1 learns too (means of its first and last 10 steps)
    assert summary["last_logged_loss"] < 0.7 * summary["first_logged_loss"], summary
    assert (output / "README.md").is_file() and not (output / "training_args.bin").exists()
    model = AutoModel.from_pretrained(output, trust_remote_code=True)
    assert model.config.legacy_box_position is False and model.config.num_object_tokens == 8
    assert torch.isfinite(next(model.parameters())).all()
    assert os.path.getsize(output / "model.safetensors") < 25_000_000


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
