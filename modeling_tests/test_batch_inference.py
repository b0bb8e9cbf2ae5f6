"""The Ray Data job (`pixelrefer_hf.batch_inference`, `pixelrefer batch`) on a local 2-CPU Ray cluster with the bundled
demo checkpoint: the answers of a region-chat dataset (parquet and `save_to_disk`) and of an evaluation annotation
file are the single-process pipeline's, and a rerun after an interrupted run answers only what is missing."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from ray_cluster import local_cluster

from pixelrefer_hf import cli
from pixelrefer_hf.batch_inference import read_output_records, region_chat_items, run_batch
from pixelrefer_hf.cli import load_region_qa_pipeline
from pixelrefer_hf.data import build_region_chat_dataset, make_region_chat_row
from pixelrefer_hf.evaluation.runner import pipeline_input
from pixelrefer_hf.evaluation.shapes import write_category_set

SHAPES = "examples/assets/shapes.png"
BOXES = [[40, 40, 90, 90], [30, 120, 90, 180], [140, 30, 184, 74], [100, 170, 136, 206], [150, 150, 160, 160]]
QUESTIONS = ["What is <region>?", "What color is <region>?", "What shape is <region>?"]
WORKER = {"num_workers": 2, "num_cpus_per_worker": 0.5, "progress": False}


@pytest.fixture(scope="module")
def cluster():
    with local_cluster():
        yield


@pytest.fixture(scope="module")
def pipe():
    return load_region_qa_pipeline("demo")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Region-chat rows about the example image, one of them multi-turn and one bad; its expected records."""
    folder = tmp_path_factory.mktemp("batch-data")
    image = np.asarray(Image.open(SHAPES).convert("RGB"))
    rows, asked = [], {}
    for k, box in enumerate(BOXES):
        question = QUESTIONS[k % len(QUESTIONS)]
        messages = [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": f"ref {k}"}]
        rows.append(make_region_chat_row(messages, image=image, regions=[box], id=f"shape-{k}"))
        asked[f"shape-{k}"] = ([box], question, f"ref {k}")
    turns = [
        {"role": "user", "content": "What color is <region>?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Is <region> larger than <region>?"},
    ]
    rows.append(make_region_chat_row(turns, image=image, regions=BOXES[:3], id="pair"))
    asked["pair#0"] = ([BOXES[0]], "What color is <region>?", "red")
    asked["pair#1"] = (BOXES[1:3], "Is <region> larger than <region>?", None)
    # Two placeholders, one region: recorded as an error, the rest of its batch still answered.
    rows.append(
        make_region_chat_row([{"role": "user", "content": "<region> or <region>?"}], image=image, regions=[BOXES[0]])
    )
    rows[-1]["id"] = "bad"
    table = build_region_chat_dataset(rows)
    # A folder of two parquet files: two read tasks, so that both actors of a two-worker job get rows.
    (folder / "parquet").mkdir()
    table.select(range(4)).to_parquet(str(folder / "parquet" / "part-0.parquet"))
    table.select(range(4, len(table))).to_parquet(str(folder / "parquet" / "part-1.parquet"))
    table.save_to_disk(str(folder / "saved"))
    return {"folder": folder, "asked": asked, "rows": table}


def expected_answers(pipe, asked: dict) -> dict:
    return {
        item_id: pipe(image=SHAPES, regions=regions, question=question, max_new_tokens=128)["answer"]
        for item_id, (regions, question, _) in asked.items()
    }


def by_id(records: list[dict]) -> dict[str, dict]:
    ids = [record["id"] for record in records]
    assert len(ids) == len(set(ids)), "an item was answered twice"
    return {record["id"]: record for record in records}


def test_region_chat_rows_become_one_item_per_user_turn(dataset):
    rows = {row["id"]: row for row in dataset["rows"]}
    (single,) = region_chat_items(rows["shape-0"])
    assert single["id"] == "shape-0" and single["question"] == "What is <region>?" and single["reference"] == "ref 0"
    assert single["item"]["question"] == "What is <region>?" and len(single["item"]["regions"]) == 1
    first, second = region_chat_items(rows["pair"])
    assert (first["id"], second["id"]) == ("pair#0", "pair#1")
    assert len(first["item"]["regions"]) == 1 and len(second["item"]["regions"]) == 2
    assert first["reference"] == "red" and second["reference"] is None
    (bad,) = region_chat_items(rows["bad"])
    assert bad["error"] == "row 'bad': the text has 2 <region> placeholder(s) but 1 region(s) were given"


@pytest.fixture(scope="module")
def first_run(cluster, dataset, pipe, tmp_path_factory):
    """A job over the parquet file with two actors, and the answers the pipeline gives in one process."""
    out = tmp_path_factory.mktemp("first-run")
    summary = run_batch("demo", dataset["folder"] / "parquet", out, batch_size=3, **WORKER)
    return {"out": out, "summary": summary, "expected": expected_answers(pipe, dataset["asked"])}


def test_parquet_folder_job_with_two_actors_gives_the_pipelines_answers(dataset, first_run):
    out, expected, summary = first_run["out"], first_run["expected"], first_run["summary"]
    records = by_id(read_output_records(out))
    assert set(records) == {*expected, "bad"}
    for item_id, answer in expected.items():
        assert records[item_id]["answer"] == answer, item_id
        assert records[item_id]["error"] is None
        assert records[item_id]["question"] == dataset["asked"][item_id][1]
        assert records[item_id]["reference"] == dataset["asked"][item_id][2]
    assert records["bad"]["answer"] is None and "2 <region> placeholder(s)" in records["bad"]["error"]
    assert summary["answered_this_run"] == len(records) == 8 and summary["errors"] == 1 and summary["runs"] == 1
    assert json.loads((out / "batch.json").read_text())["options"]["num_workers"] == 2
    # Another model in the same folder is refused before anything runs.
    with pytest.raises(ValueError, match="use another --out"):
        run_batch("demo-lite", dataset["folder"] / "parquet", out, **WORKER)


def test_interrupted_job_resumes_on_the_save_to_disk_copy_with_parquet_shards(dataset, first_run, tmp_path):
    # What an interrupted run leaves: some lines on disk, the last one torn in the middle of a write.
    lines = [
        line for shard in sorted(first_run["out"].glob("answers_*.jsonl")) for line in shard.read_text().splitlines()
    ]
    kept = lines[:3]
    out = tmp_path / "resumed"
    out.mkdir()
    torn_shard = out / "answers_interrupted_000000.jsonl"
    torn_shard.write_text("\n".join(kept) + "\n" + lines[3][:25])
    done_before = {json.loads(line)["id"] for line in kept}
    summary = run_batch(
        "demo", dataset["folder"] / "saved", out, batch_size=4, output_format="parquet", **{**WORKER, "num_workers": 1}
    )
    assert summary["answered_this_run"] == 8 - len(done_before)
    # The torn line was cut off; the items of the kept lines were not asked again; the others are in parquet shards.
    assert torn_shard.read_text() == "\n".join(kept) + "\n"
    new_ids = {row["id"] for shard in out.glob("answers_*.parquet") for row in pq.read_table(shard).to_pylist()}
    assert new_ids == {*first_run["expected"], "bad"} - done_before
    resumed = by_id(read_output_records(out))
    assert {item_id: record["answer"] for item_id, record in resumed.items()} == {
        **first_run["expected"],
        "bad": None,
    }


def test_batch_command_on_an_annotation_file_gives_the_pipelines_answers(cluster, pipe, tmp_path, capsys):
    from pixelrefer_hf.evaluation.benchmarks import get_benchmark

    annotation = write_category_set(tmp_path / "lvis", num_images=2)
    benchmark = get_benchmark("lvis")
    items = benchmark.load(annotation)
    answers = pipe(
        [pipeline_input(item, 1.0, 8) for item in items], batch_size=len(items), **benchmark.generation_kwargs
    )
    # The command in process: it joins the cluster this module started.
    arguments = ["batch", "--model", "demo", "--data", str(annotation), "--benchmark", "lvis", "--out"]
    arguments += [str(tmp_path / "out"), "--num-workers", "1", "--num-cpus-per-worker", "0.5", "--no-progress"]
    assert cli.main(arguments) == 0
    assert f"{len(items)} item(s) answered by this run" in capsys.readouterr().out
    records = by_id(read_output_records(tmp_path / "out"))
    assert set(records) == {item.id for item in items}
    for item, answer in zip(items, answers, strict=True):
        record = records[item.id]
        assert record["answer"] == answer["answer"] and record["error"] is None
        assert json.loads(record["reference"]) == item.reference and json.loads(record["meta"]) == item.meta


def test_batch_command_errors(tmp_path, capsys):
    assert cli.main(["batch", "--data", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "notes.json").write_text("[]")
    assert cli.main(["batch", "--data", str(tmp_path / "notes.json"), "--out", str(tmp_path / "o")]) == 2
    assert "give --benchmark NAME" in capsys.readouterr().err
    assert cli.main(["batch", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--num-workers", "0"]) == 2
    assert "--num-workers must be a positive integer" in capsys.readouterr().err
