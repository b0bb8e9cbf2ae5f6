"""`accelerate launch --num_processes 2 -m pixelrefer_hf.evaluation`: two CPU processes (gloo) shard the items, write
their own shards, and the main process merges and scores: exactly the predictions and metrics of one process."""

import json
import os
import sys
from pathlib import Path

from fresh_process import run_process_tree

import pixelrefer_hf
from pixelrefer_hf.evaluation.runner import PREDICTIONS, EvalOptions, read_records, run_eval
from pixelrefer_hf.evaluation.shapes import write_videorefer_q_set

SOURCE_ROOT = Path(pixelrefer_hf.__file__).resolve().parents[1]


def test_two_processes_give_the_metrics_of_one(tmp_path):
    data = write_videorefer_q_set(tmp_path / "data", seed=21, num_videos=2)
    arguments = ["videorefer-q", "--model", "tiny-random", "--data", str(data), "--batch-size", "2",
                 "--max-new-tokens", "4"]  # fmt: skip
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531",
        "-m", "pixelrefer_hf.evaluation", *arguments, "--cpu", "--out", str(tmp_path / "two"),
    ]  # fmt: skip
    # `--multi_gpu` makes accelerate start the processes with torchrun (its `--cpu` starts one); our `--cpu` puts them
    # in a gloo group. This checkout's package in the children, whatever is installed; one thread each.
    env = {**os.environ, "PYTHONPATH": str(SOURCE_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result, leftover = run_process_tree(command, env, timeout=240)  # about 20 s on 2 shared cores
    assert result.returncode == 0, result.stderr[-4000:]
    assert not leftover, f"processes alive after `accelerate launch` returned:\n{leftover}"
    two = tmp_path / "two"
    assert json.loads((two / "run.json").read_text())["processes"] == 2
    assert not list(two.glob("predictions.rank*.jsonl")), "the shards were not merged"
    assert result.stdout.count("# videorefer-q: tiny-random") == 1  # only the main process reports

    one = run_eval(
        "videorefer-q",
        EvalOptions(model="tiny-random", data=str(data), out=str(tmp_path / "one"), batch_size=3, max_new_tokens=4),
    )
    by_id = {record["id"]: record for record in read_records(two / PREDICTIONS)}
    reference = {record["id"]: record for record in read_records(tmp_path / "one" / PREDICTIONS)}
    assert len(by_id) == len(reference) == len(json.loads(data.read_text()))
    assert {key: r["prediction"] for key, r in by_id.items()} == {key: r["prediction"] for key, r in reference.items()}
    assert json.loads((two / "results.json").read_text())["metrics"] == one["metrics"]
