"""The benchmark readers of `pixelrefer eval` on fixture files in each official format (written by
`pixelrefer_hf.evaluation.shapes`), their prompts, bad annotation files, and the registry's judge import guard."""

import importlib.abc
import importlib.util
import json
import sys

import numpy as np
import pytest

from pixelrefer_hf.evaluation import EvalDataError
from pixelrefer_hf.evaluation.base import Benchmark, published_numbers
from pixelrefer_hf.evaluation.benchmarks import benchmark_classes, get_benchmark
from pixelrefer_hf.evaluation.shapes import (
    write_category_set,
    write_hcstvg_set,
    write_refl4_set,
    write_vg_set,
    write_videorefer_q_set,
)
from pixelrefer_hf.region_utils import region_to_mask


def test_lvis_and_paco_read_osprey_category_files_with_the_official_prompts(tmp_path):
    path = write_category_set(tmp_path, seed=3, num_images=2)
    entries = json.loads(path.read_text())
    items = get_benchmark("lvis").load(path)
    assert len(items) == sum(len(entry["categories"]) for entry in entries)
    assert items[0].question == "What is the category of <region>? Using only one word or phrase."
    assert [item.reference for item in items[: len(entries[0]["categories"])]] == entries[0]["categories"]
    # COCO images are looked up under val2017/ of the image root.
    assert items[0].image == str(tmp_path / "val2017" / entries[0]["file_name"])
    mask = region_to_mask(items[0].regions[0], (224, 224), "test")
    assert mask.sum() == entries[0]["annotations"][0]["area"]
    paco = get_benchmark("paco").load(write_category_set(tmp_path / "paco", seed=3, num_images=1, paco=True))
    assert "category:subcategory" in paco[0].question and ":" in paco[0].reference
    assert len({item.id for item in items}) == len(items)


def test_vg_asks_about_the_box_and_refl4_keeps_the_objects365_part(tmp_path):
    vg_path = write_vg_set(tmp_path / "vg", seed=4, num_images=1)
    entry = json.loads(vg_path.read_text())[0]
    item = get_benchmark("vg").load(vg_path)[0]
    x, y, w, h = entry["boxes"][0]
    assert item.regions == [[x, y, x + w, y + h]]  # the official box mask, mask[y:y+h, x:x+w]
    assert item.question == "Please describe <region> briefly." and item.reference == [entry["caption"]]
    refl4_path = write_refl4_set(tmp_path / "refl4", seed=4, num_images=2)
    lines = [json.loads(line) for line in refl4_path.read_text().splitlines()]
    items = get_benchmark("refl4").load(refl4_path)
    assert len(items) == sum("objects365" in line["file_name"] for line in lines) < len(lines)
    assert items[0].question == "Please describe <region> in brief."


def test_video_benchmarks_read_frame_indices_and_compose_the_question(tmp_path):
    hc_path = write_hcstvg_set(tmp_path / "hc", seed=5, num_videos=1, frame_idx=3)
    hc = get_benchmark("hc-stvg").load(hc_path)
    assert hc[0].question == "Please describe the object <region> in brief in the video."
    assert list(hc[0].regions[0]) == [3] and hc[0].video.endswith("videos/5_0")
    q_path = write_videorefer_q_set(tmp_path / "q", seed=5, num_videos=1, frame_idx=3)
    entry = json.loads(q_path.read_text())[0]
    item = get_benchmark("videorefer-q").load(q_path)[0]
    assert item.question == (
        "Which way does <region> move? (A) left (B) right (C) up (D) down. "
        "Answer with the option's letter from the given choices directly."
    )
    # Single-frame mode: only the mask on frame_idx ("3", a string in the file) is given.
    assert list(item.regions[0]) == [3] and item.reference == entry["Answer"]
    assert item.meta["type"] == "Sequential Questions" and item.meta["letters"] == "ABCD"
    # PixelRefer-Lite's protocol: every annotated frame (the fixture annotates frames 0 and 3).
    all_frames = get_benchmark("videorefer-q-allframe").load(q_path)[0]
    assert list(all_frames.regions[0]) == [0, 3] and all_frames.question == item.question


def test_bad_annotation_files_name_the_file_and_the_item(tmp_path):
    lvis = get_benchmark("lvis")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"file_name": "a.png", ')
    with pytest.raises(EvalDataError, match=r"broken\.json: malformed JSON"):
        lvis.load(broken)
    with pytest.raises(EvalDataError, match=r"missing\.json: no such annotation file"):
        lvis.load(tmp_path / "missing.json")
    path = write_category_set(tmp_path, seed=6, num_images=2)
    entries = json.loads(path.read_text())
    del entries[1]["annotations"][0]["segmentation"]
    path.write_text(json.dumps(entries))
    with pytest.raises(EvalDataError, match=r"lvis_val_category\.json, item 1-0: missing field 'segmentation'"):
        lvis.load(path)
    entries[1]["categories"] = "dog"
    path.write_text(json.dumps(entries))
    with pytest.raises(EvalDataError, match=r"item entry 1: field 'categories' must be list, got str"):
        lvis.load(path)
    q_path = write_videorefer_q_set(tmp_path / "q", seed=6, num_videos=1)
    q_entries = json.loads(q_path.read_text())
    q_entries[0]["Question"] = "Which way does <region> move, and <region>?"
    q_path.write_text(json.dumps(q_entries))
    with pytest.raises(EvalDataError, match=r"item 0: the text has 2 <region> placeholder\(s\) but 1 region\(s\)"):
        get_benchmark("videorefer-q").load(q_path)
    refl4 = tmp_path / "r.json"
    refl4.write_text('{"file_name": "objects365/a.png", "caption": "x", "bbox": [0, 0, 4, 4]}\n{"file_name"\n')
    with pytest.raises(EvalDataError, match=r"r\.json, item line 2: malformed JSON"):
        get_benchmark("refl4").load(refl4)


def test_registry_lists_the_benchmarks_and_refuses_unknown_names():
    names = set(benchmark_classes())
    assert {"lvis", "paco", "vg", "refl4", "hc-stvg", "videorefer-q"} <= names
    with pytest.raises(ValueError, match="unknown benchmark 'lvs'; choose one of lvis, paco"):
        get_benchmark("lvs")
    for cls in benchmark_classes().values():
        assert cls.name and cls.description and isinstance(published_numbers(cls.name), dict)


JUDGED = "pixelrefer_hf.evaluation.judged"


def load_benchmarks_copy():
    """A fresh execution of benchmarks.py (under another name, same package), so that its judge import runs again."""
    import pixelrefer_hf.evaluation.benchmarks as original

    spec = importlib.util.spec_from_file_location("pixelrefer_hf.evaluation._benchmarks_probe", original.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FailingImport(importlib.abc.MetaPathFinder):
    """Makes `judged` fail as if a dependency of it were missing."""

    def find_spec(self, name, path=None, target=None):
        if name == JUDGED:
            raise ModuleNotFoundError("No module named 'openai'", name="openai")
        return None


def test_judged_benchmarks_are_picked_up_when_present_and_only_their_absence_is_tolerated(monkeypatch):
    class FakeJudged(Benchmark):
        name = "fake-judged"
        description = "a judged benchmark"
        needs_judge = True

    configured = FakeJudged()
    configured.name = "fake-judged-lite"  # an instance registered under a name of its own
    fake = type(sys)("judged")
    fake.JUDGED_BENCHMARKS = [FakeJudged, configured]
    monkeypatch.setitem(sys.modules, JUDGED, fake)
    probe = load_benchmarks_copy()
    assert {"fake-judged", "fake-judged-lite", "lvis"} <= set(probe.benchmark_classes())
    fresh = probe.get_benchmark("fake-judged-lite")
    assert isinstance(fresh, FakeJudged) and fresh is not configured and fresh.name == "fake-judged-lite"

    monkeypatch.setitem(sys.modules, JUDGED, None)  # the module does not exist
    assert load_benchmarks_copy().JUDGED_BENCHMARKS == []

    monkeypatch.delitem(sys.modules, JUDGED)
    monkeypatch.setattr(sys, "meta_path", [FailingImport(), *sys.meta_path])
    with pytest.raises(ModuleNotFoundError, match="openai"):
        load_benchmarks_copy()


def test_the_package_imports_without_the_metric_libraries(monkeypatch):
    """`pixelrefer_hf.evaluation` runs with sentence-transformers and pycocoevalcap unimportable; its runner and
    benchmarks load on first use."""
    import pixelrefer_hf.evaluation as package

    for name in ("sentence_transformers", "pycocoevalcap", "matplotlib"):
        monkeypatch.setitem(sys.modules, name, None)
    spec = importlib.util.spec_from_file_location("pixelrefer_hf.evaluation", package.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh.EvalItem is package.EvalItem and callable(fresh.get_benchmark)
    assert "lvis" in fresh.benchmark_classes()


def test_fixture_images_are_the_synthetic_scenes(tmp_path):
    path = write_category_set(tmp_path, seed=7, num_images=1)
    entry = json.loads(path.read_text())[0]
    from PIL import Image

    image = np.array(Image.open(tmp_path / "val2017" / entry["file_name"]))
    mask = region_to_mask(entry["annotations"][0]["segmentation"], image.shape[:2], "test")
    # Every pixel of a shape has its colour: one distinct colour inside the mask.
    assert len(np.unique(image[mask], axis=0)) == 1
