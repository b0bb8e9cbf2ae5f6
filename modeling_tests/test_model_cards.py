"""The model cards in model_cards/: metadata, the paper's numbers per variant, and usage snippets that really run.

Every python block of every card runs against a tiny checkpoint converted from a synthetic official snapshot of the
same variant, with the card's repo id replaced by the local folder (and generation shortened), so a card can never
drift from the API.
"""

import re
from pathlib import Path

import numpy as np
import pytest
from fixtures.official_checkpoint import write_official_checkpoint
from huggingface_hub.repocard import metadata_load
from PIL import Image

from pixelrefer_hf import PixelReferConfig
from pixelrefer_hf.convert import CARD_REPO_PREFIX, convert_checkpoint, model_card_text

CARDS_DIR = Path(__file__).resolve().parents[1] / "model_cards"
CARDS = {
    "PixelRefer-2B": ("pixelrefer", 1536, "Qwen2.5-1.5B-Instruct", "89.8 / 82.5"),
    "PixelRefer-7B": ("pixelrefer", 3584, "Qwen2.5-7B-Instruct", "90.5 / 82.7"),
    "PixelRefer-Lite-2B": ("pixelrefer-lite", 1536, "Qwen2.5-1.5B-Instruct", "89.4 / 82.0"),
    "PixelRefer-Lite-7B": ("pixelrefer-lite", 3584, "Qwen2.5-7B-Instruct", "89.6 / 82.5"),
}
# One number per card from each of the paper's Tables 2-6 (VideoRefer-D avg, VideoRefer-Q avg, HC-STVG CIDEr, image s/item).
PAPER_NUMBERS = {
    "PixelRefer-2B": ("| 3.58 |", "| 76.5 |", "| 78.9 |", "| 1.04 |"),
    "PixelRefer-7B": ("| 3.70 |", "| 79.4 |", "| 97.4 |", "| 1.44 |"),
    "PixelRefer-Lite-2B": ("| 3.53 |", "| 65.7 |", "| 91.3 |", "| 0.88 |"),
    "PixelRefer-Lite-7B": ("| 3.64 |", "| 76.9 |", "| 92.7 |", "| 1.10 |"),
}
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def python_snippets(name: str) -> list[str]:
    return PYTHON_BLOCK.findall((CARDS_DIR / f"{name}.md").read_text())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """variant -> a tiny converted checkpoint folder."""
    root = tmp_path_factory.mktemp("cards")
    folders = {}
    for variant in ("pixelrefer", "pixelrefer-lite"):
        write_official_checkpoint(root / f"official-{variant}", variant, "bin", seed=7)
        folders[variant] = convert_checkpoint(root / f"official-{variant}", root / f"converted-{variant}")
    return folders


@pytest.fixture
def media(tmp_path, monkeypatch):
    """The files the snippets open, in a fresh working directory."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, size=(112, 168, 3), dtype=np.uint8)).save(tmp_path / "street.jpg")
    mask = np.zeros((112, 168), dtype=np.uint8)
    mask[30:80, 50:120] = 255
    Image.fromarray(mask).save(tmp_path / "street_mask.png")
    (tmp_path / "frames").mkdir()
    for index in range(8):
        frame = rng.integers(0, 255, size=(84, 112, 3), dtype=np.uint8)
        Image.fromarray(frame).save(tmp_path / "frames" / f"{index:03d}.jpg")
        frame_mask = np.zeros((84, 112), dtype=np.uint8)
        frame_mask[20 + index : 50 + index, 30:70] = 255
        Image.fromarray(frame_mask).save(tmp_path / "frames" / f"{index:03d}_mask.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", list(CARDS))
def test_card_metadata_and_reported_results(name):
    variant, _, llm, lvis = CARDS[name]
    metadata = metadata_load(CARDS_DIR / f"{name}.md")
    assert metadata["license"] == "apache-2.0"
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-text-to-text"
    assert metadata["base_model"] == [f"Alibaba-DAMO-Academy/{name}"]
    assert "Alibaba-DAMO-Academy/PixelRefer-TrainingData" in metadata["datasets"]
    assert {"pixelrefer", "custom_code"} <= set(metadata["tags"])
    text = (CARDS_DIR / f"{name}.md").read_text()
    assert "arXiv 2510.23603" in text and llm in text
    assert f"| {lvis} |" in text
    for number in PAPER_NUMBERS[name]:
        assert number in text, number
    # Each card states only its own variant's numbers.
    for other, (_, _, _, other_lvis) in CARDS.items():
        if other != name:
            assert f"| {other_lvis} |" not in text, other
    assert ("Object-Only" in text) == (variant == "pixelrefer-lite")
    assert len(python_snippets(name)) == 3


@pytest.mark.parametrize("name", list(CARDS))
def test_card_snippets_run_against_a_converted_checkpoint(name, converted, media, capsys):
    variant = CARDS[name][0]
    snippets = python_snippets(name)
    for index, snippet in enumerate(snippets):
        assert f'"{CARD_REPO_PREFIX}{name}"' in snippet, index
        code = snippet.replace(f"{CARD_REPO_PREFIX}{name}", str(converted[variant]))
        code = re.sub(r"max_new_tokens=\d+", "max_new_tokens=3", code)
        exec(compile(code, f"{name}.md snippet {index}", "exec"), {"__name__": "__card__"})  # noqa: S102 (our own card)
        assert capsys.readouterr().out.strip(), f"snippet {index} printed nothing"


@pytest.mark.parametrize("name", list(CARDS))
def test_converter_picks_the_card_of_the_variant_and_names_the_target_repo(name):
    variant, width, _, _ = CARDS[name]
    config = PixelReferConfig(variant=variant, text_config={"model_type": "qwen2", "hidden_size": width})
    text = model_card_text(variant, config, card=None, repo_id="me/converted")
    assert text.startswith("---\nlicense: apache-2.0") and f"# {name} (transformers)" in text
    assert '"me/converted"' in text and CARD_REPO_PREFIX not in text
