"""`pixelrefer eval` end to end with a tiny model on fixture files: predictions as they come, resuming after an
interrupt or a torn line, eval-score without the model, bad items, results files and eval-compare."""

import json
import shutil

import pytest

from pixelrefer_hf.cli import main as cli_main
from pixelrefer_hf.evaluation import EvalDataError, EvalItem
from pixelrefer_hf.evaluation.runner import (
    PREDICTIONS,
    EvalOptions,
    group_by_media,
    pipeline_input,
    read_records,
    run_eval,
    sample_video,
    score_run,
    shard,
)
from pixelrefer_hf.evaluation.shapes import write_category_set, write_hcstvg_set, write_videorefer_q_set

GENERATE = {"max_new_tokens": 3}


@pytest.fixture(scope="module")
def lvis_data(tmp_path_factory):
    """Two scenes (3-6 shapes each) in Osprey's LVIS format."""
    return write_category_set(tmp_path_factory.mktemp("lvis"), seed=11, num_images=2)


def options(data, out, **overrides) -> EvalOptions:
    return EvalOptions(model="tiny-random", data=str(data), out=str(out), batch_size=3, max_new_tokens=3, **overrides)


def predictions(run_dir) -> dict:
    return {record["id"]: record for record in read_records(run_dir / PREDICTIONS)}


@pytest.fixture(scope="module")
def full_run(lvis_data, tmp_path_factory):
    """An uninterrupted run: the reference for the resumed ones."""
    run_dir = tmp_path_factory.mktemp("full")
    results = run_eval("lvis", options(lvis_data, run_dir))
    return run_dir, results


def test_a_run_writes_one_record_per_item_results_and_eval_score_recomputes_them(full_run, lvis_data, capsys):
    run_dir, results = full_run
    entries = json.loads(lvis_data.read_text())
    expected_ids = {f"{i}-{j}" for i, entry in enumerate(entries) for j in range(len(entry["categories"]))}
    lines = (run_dir / PREDICTIONS).read_text().splitlines()
    assert len(lines) == len(expected_ids) and {json.loads(line)["id"] for line in lines} == expected_ids
    record = json.loads(lines[0])
    assert record["error"] is None and isinstance(record["prediction"], str) and record["reference"]

    info = json.loads((run_dir / "run.json").read_text())
    assert info["benchmark"] == "lvis" and info["model"] == "tiny-random" and info["options"]["batch_size"] == 3
    assert results["benchmark"] == "lvis" and results["model"] == "tiny-random" and results["judge"] is None
    assert results["items"] == len(expected_ids) and results["errors"] == 0
    assert {"ssim", "siou", "avg"} <= set(results["metrics"])
    assert {"torch", "transformers", "pixelrefer-hf", "sentence-transformers"} <= set(results["versions"])
    assert results["date"] and json.loads((run_dir / "results.json").read_text())["metrics"] == results["metrics"]
    markdown = (run_dir / "results.md").read_text()
    assert "| ssim | siou | avg |" in markdown and f"{results['items']} items, 0 errors" in markdown

    (run_dir / "results.json").unlink()
    assert cli_main(["eval-score", str(run_dir)]) == 0
    assert "| ssim | siou | avg |" in capsys.readouterr().out
    assert json.loads((run_dir / "results.json").read_text())["metrics"] == results["metrics"]


class Interrupt(KeyboardInterrupt):
    pass


def test_an_interrupted_run_leaves_a_valid_file_and_a_rerun_finishes_it(full_run, lvis_data, tmp_path):
    run_dir = tmp_path / "run"

    def stop_after_two_batches(batch_number):
        if batch_number == 2:
            raise Interrupt  # Ctrl-C right after the second batch reached the disk

    with pytest.raises(Interrupt):
        run_eval("lvis", options(lvis_data, run_dir), on_batch=stop_after_two_batches)
    lines = (run_dir / PREDICTIONS).read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line)["id"] for line in lines)
    assert not (run_dir / "results.json").exists()

    done_before = predictions(run_dir)
    answered = []
    results = run_eval("lvis", options(lvis_data, run_dir), on_batch=answered.append)
    after = predictions(run_dir)
    full = predictions(full_run[0])
    assert set(after) == set(full) and len((run_dir / PREDICTIONS).read_text().splitlines()) == len(full)
    assert all(after[key] == done_before[key] for key in done_before)  # kept, not redone
    assert len(answered) == -(-(len(full) - 6) // 3)  # only the remaining items were asked
    assert {key: record["prediction"] for key, record in after.items()} == {
        key: record["prediction"] for key, record in full.items()
    }
    assert results["metrics"] == full_run[1]["metrics"]
    assert json.loads((run_dir / "run.json").read_text())["resumed"] == 1


def test_a_torn_last_line_is_ignored_and_its_item_redone(full_run, lvis_data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(full_run[0], run_dir)
    (run_dir / "results.json").unlink()
    lines = (run_dir / PREDICTIONS).read_text().splitlines(keepends=True)
    # A kill in the middle of writing the last record: half of its line, no newline.
    (run_dir / PREDICTIONS).write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    assert len(read_records(run_dir / PREDICTIONS)) == len(lines) - 1
    answered = []
    run_eval("lvis", options(lvis_data, run_dir), on_batch=answered.append)
    assert len(answered) == 1
    assert (run_dir / PREDICTIONS).read_text().splitlines(keepends=True) == lines[:-1] + [lines[-1]]


def test_a_broken_line_in_the_middle_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / PREDICTIONS
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(EvalDataError, match=r"predictions\.jsonl: line 2 is not a JSON record"):
        read_records(path)


def test_questions_about_one_image_are_batched_together_and_shards_keep_them():
    def item(index, image):
        return EvalItem(id=str(index), question="What is <region>?", regions=[[0, 0, 2, 2]], image=image)

    items = [item(0, "a"), item(1, "b"), item(2, "a"), item(3, "c"), item(4, "b"), item(5, "a")]
    ordered = group_by_media(items)
    assert [it.id for it in ordered] == ["0", "2", "5", "1", "4", "3"]
    shards = [shard(ordered, rank, 2) for rank in range(2)]
    assert [[it.id for it in part] for part in shards] == [["0", "2", "5"], ["1", "4", "3"]]
    assert sum(len(part) for part in (shard(ordered, r, 4) for r in range(4))) == len(items)


def test_a_missing_image_stops_the_run_naming_file_and_item_unless_skipped(lvis_data, tmp_path, capsys):
    data_dir = tmp_path / "data"
    shutil.copytree(lvis_data.parent, data_dir)
    entries = json.loads((data_dir / lvis_data.name).read_text())
    missing = data_dir / "val2017" / entries[1]["file_name"]
    missing.unlink()
    data = data_dir / lvis_data.name
    status = cli_main(["eval", "lvis", "--model", "tiny-random", "--data", str(data), "--out", str(tmp_path / "a"),
                       "--max-new-tokens", "3", "--batch-size", "4"])  # fmt: skip
    error = capsys.readouterr().err
    assert status == 2
    named = data_dir / entries[1]["file_name"]  # where it was looked for first; train2017/ and val2017/ too
    assert f"file {named}, item 1-0: cannot read image" in error and f"nor under {data_dir / 'train2017'}" in error
    assert "--skip-bad-items" in error
    # The first image's questions were answered and kept before the stop.
    assert len(read_records(tmp_path / "a" / PREDICTIONS)) == len(entries[0]["categories"])

    results = run_eval("lvis", options(data, tmp_path / "b", skip_bad_items=True))
    bad = len(entries[1]["categories"])
    assert (results["items"], results["errors"], results["metrics"]["scored"]) == (
        len(entries[0]["categories"]) + bad,
        bad,
        len(entries[0]["categories"]),
    )
    errors = [record for record in predictions(tmp_path / "b").values() if record["error"]]
    assert len(errors) == bad and all(str(named) in record["error"] for record in errors)
    assert all(record["prediction"] is None for record in errors)


def test_a_mask_that_does_not_decode_is_an_error_record_with_skip_bad_items(lvis_data, tmp_path):
    entries = json.loads(lvis_data.read_text())
    entries[0]["annotations"][1]["segmentation"]["counts"] = "!!not-rle"
    data = tmp_path / "lvis.json"
    data.write_text(json.dumps(entries))
    with pytest.raises(EvalDataError, match=r"item 0-1: .*RLE counts contain invalid character"):
        run_eval("lvis", options(data, tmp_path / "a", image_root=str(lvis_data.parent)))
    results = run_eval("lvis", options(data, tmp_path / "b", image_root=str(lvis_data.parent), skip_bad_items=True))
    assert results["errors"] == 1
    assert "item 0-1" in predictions(tmp_path / "b")["0-1"]["error"]


def test_a_run_folder_of_another_benchmark_is_refused(full_run, tmp_path):
    data = write_videorefer_q_set(tmp_path, seed=1, num_videos=1)
    with pytest.raises(ValueError, match=r"holds a run of benchmark 'lvis'.*use another --out"):
        run_eval("videorefer-q", options(data, full_run[0]))


def test_video_benchmarks_run_on_frame_folders(tmp_path):
    data = write_videorefer_q_set(tmp_path / "q", seed=2, num_videos=1)
    results = run_eval("videorefer-q", options(data, tmp_path / "q-run"))
    assert results["items"] == len(json.loads(data.read_text())) and results["errors"] == 0
    assert "accuracy" in results["metrics"] and "sequential_questions" in results["metrics"]
    hc = write_hcstvg_set(tmp_path / "hc", seed=2, num_videos=1)
    results = run_eval("hc-stvg", options(hc, tmp_path / "hc-run"))
    assert {"bleu_4", "meteor", "rouge_l", "cider"} <= set(results["metrics"]) and results["errors"] == 0


def test_video_sampling_keeps_the_annotated_frame(tmp_path):
    files = [str(tmp_path / f"{t:03d}.png") for t in range(20)]
    frames, timestamps, positions = sample_video(files, {7}, fps=1.0, max_frames=4)
    assert 7 in positions and frames[positions[7]] == files[7] and timestamps[positions[7]] == 7.0
    assert len(frames) == 5 and timestamps == sorted(timestamps)
    with pytest.raises(ValueError, match="frame 25 is annotated but the video has 20 frames"):
        sample_video(files, {25}, fps=1.0, max_frames=4)


def test_video_items_may_ask_for_their_own_sampling_or_only_their_source_frames(tmp_path):
    """The judged video benchmarks' conventions: `meta["fps"]` / `meta["max_frames"]`, or `meta["source_frames"]`
    (only those frames are read; region keys are positions in that list)."""
    files = [str(tmp_path / f"{t:03d}.png") for t in range(20)]
    sampled = EvalItem(id="a", question="<region>?", regions=[{7: [0, 0, 2, 2]}], video=files, meta={"max_frames": 2})
    inputs = pipeline_input(sampled, fps=1.0, max_frames=768)
    assert inputs["video"] == [files[0], files[7], files[19]] and inputs["regions"] == [{1: [0, 0, 2, 2]}]
    only = EvalItem(id="b", question="<region>?", regions=[{0: "m3", 2: "m9"}], video=files,
                    meta={"source_frames": [3, 5, 9]})  # fmt: skip
    inputs = pipeline_input(only, fps=1.0, max_frames=768)
    assert inputs["video"] == [files[3], files[5], files[9]] and inputs["video_timestamps"] == [3.0, 5.0, 9.0]
    assert inputs["regions"] == [{0: "m3", 2: "m9"}]


def test_video_files_are_sampled_at_fps_with_the_annotated_frame(tmp_path):
    import av
    import numpy as np

    path = tmp_path / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.height, stream.width = 32, 48
        stream.pix_fmt = "yuv420p"
        for t in range(12):  # 3 s at 4 fps
            frame = np.full((32, 48, 3), t * 20, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    frames, timestamps, positions = sample_video(str(path), {5}, fps=1.0, max_frames=768)
    assert sorted(positions) == [0, 4, 5, 8]  # the 1 fps grid (0, 1, 2 s) and source frame 5
    assert timestamps == pytest.approx([0.0, 1.0, 1.25, 2.0])
    assert abs(int(frames[positions[5]].mean()) - 100) < 8
    frames, timestamps, positions = sample_video(str(path), {2, 9}, fps=1.0, max_frames=768, grid=False)
    assert sorted(positions) == [2, 9] and timestamps == pytest.approx([0.5, 2.25])


def test_eval_compare_prints_runs_beside_the_paper_and_draws_a_chart(full_run, tmp_path, capsys, monkeypatch):
    run_dir = full_run[0]
    chart = tmp_path / "compare.png"
    assert cli_main(["eval-compare", str(run_dir), str(run_dir), "--chart", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "### lvis" in out and "| run | avg | ssim | siou | items | errors |" in out
    assert "| paper: PixelRefer-7B | 86.6 | 90.5 | 82.7 | | |" in out
    assert out.count("tiny-random") == 2
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli_main(["eval-compare", str(run_dir), "--chart", str(tmp_path / "b.png")]) == 2
    assert "--chart needs matplotlib: pip install matplotlib" in capsys.readouterr().err
    assert cli_main(["eval-compare", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_eval_cli_reports_unknown_benchmarks_and_score_folders(tmp_path, capsys):
    assert cli_main(["eval", "nope", "--model", "tiny-random", "--data", "x.json", "--out", str(tmp_path)]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    assert cli_main(["eval-score", str(tmp_path / "empty")]) == 2
    assert "no run.json" in capsys.readouterr().err


def test_score_run_with_an_item_list_refuses_an_unfinished_run(full_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(full_run[0], run_dir)
    ids = list(predictions(run_dir)) + ["extra-item"]
    with pytest.raises(RuntimeError, match="1 of .* items have no prediction"):
        score_run(run_dir, item_ids=ids)
