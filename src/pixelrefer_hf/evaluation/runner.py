"""Run a benchmark through `pipeline("region-qa")`: batches, resumable predictions, sharding over processes, results.

A run folder holds:

* `run.json`: benchmark, model, data path and options, written when the run starts (`eval-score` reads it);
* `predictions.jsonl`: one record per item, appended and fsync'ed after every batch; a rerun skips the ids it holds,
  and a torn last line (a kill in the middle of a write) is dropped and that item answered again;
* `predictions.rank{i}.jsonl`: under `accelerate launch`, each process's shard, merged into predictions.jsonl by the
  main process once every process is done;
* `results.json`, `results.md`: the metrics (see `results.py`).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..media_io import read_video
from .base import Benchmark, EvalDataError, EvalItem, ScoreOptions
from .benchmarks import get_benchmark
from .results import build_results, write_results

PREDICTIONS = "predictions.jsonl"
RUN_INFO = "run.json"
SHARD_PATTERN = re.compile(r"^predictions\.rank(\d+)\.jsonl$")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class EvalRunError(RuntimeError):
    """A run that could not finish: a process failed, or items have no prediction. Rerunning resumes it."""


@dataclass(kw_only=True)
class EvalOptions(ScoreOptions):
    """Everything `pixelrefer eval` takes besides the benchmark name, the scoring options (`ScoreOptions`, whose
    `run_dir` is `out`) included; recorded in run.json."""

    model: str
    data: str
    out: str
    batch_size: int = 8
    limit: int | None = None
    skip_bad_items: bool = False
    image_root: str | None = None
    max_new_tokens: int | None = None
    device: str | None = None
    cpu: bool = False
    dtype: str = "auto"
    fps: float | None = None
    max_frames: int | None = None

    def score_options(self) -> ScoreOptions:
        values = {option.name: getattr(self, option.name) for option in fields(ScoreOptions)}
        return ScoreOptions(**{**values, "run_dir": Path(self.out)})


# ---------------------------------------------------------------------------------------------------------------------
# predictions.jsonl
# ---------------------------------------------------------------------------------------------------------------------


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of one predictions file. A last line without its newline is a write cut short by a kill: it is
    ignored (its item is answered again). Any other bad line is an error naming the file and the line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, torn = lines[:-1], lines[-1]
    records = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise EvalDataError(f"line {number} is not a JSON record ({error})", file=path) from error
        if not isinstance(record, dict) or "id" not in record:
            raise EvalDataError(f"line {number} is not a prediction record with an 'id'", file=path)
        records.append(record)
    if torn.strip():
        # A complete record whose newline was lost still counts; anything else is redone.
        try:
            record = json.loads(torn)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if isinstance(record, dict) and "id" in record:
            records.append(record)
    return records


def repair_tail(path: Path) -> None:
    """Cut a torn last line off `path`, so that appending starts on a line of its own."""
    if not path.exists():
        return
    with open(path, "rb+") as file:
        data = file.read()
        if not data or data.endswith(b"\n"):
            return
        end = data.rfind(b"\n") + 1
        try:
            json.loads(data[end:])
        except (json.JSONDecodeError, UnicodeDecodeError):
            file.truncate(end)
        else:
            file.write(b"\n")
        file.flush()
        os.fsync(file.fileno())


class RecordWriter:
    """Appends records to a predictions file; `write_batch` returns only once they are on disk."""

    def __init__(self, path: Path):
        repair_tail(path)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write_batch(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def shard_files(run_dir: Path) -> list[Path]:
    return sorted(
        (path for path in run_dir.iterdir() if SHARD_PATTERN.match(path.name)),
        key=lambda path: int(SHARD_PATTERN.match(path.name).group(1)),
    )


def all_records(run_dir: Path) -> list[dict[str, Any]]:
    """Records of predictions.jsonl and of any shard, the first record of each id only."""
    seen, records = set(), []
    for path in [run_dir / PREDICTIONS, *shard_files(run_dir)]:
        for record in read_records(path):
            if record["id"] not in seen:
                seen.add(record["id"])
                records.append(record)
    return records


def merge_shards(run_dir: Path) -> list[dict[str, Any]]:
    """Fold the shards into predictions.jsonl (written to a temporary file, then renamed) and remove them."""
    shards = shard_files(run_dir)
    records = all_records(run_dir)
    if not shards:
        return records
    temporary = run_dir / (PREDICTIONS + ".tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, run_dir / PREDICTIONS)
    for shard in shards:
        shard.unlink()
    return records


# ---------------------------------------------------------------------------------------------------------------------
# Items -> pipeline inputs
# ---------------------------------------------------------------------------------------------------------------------


def media_key(item: EvalItem) -> str:
    return item.image if item.image is not None else json.dumps(item.video)


def group_by_media(items: list[EvalItem]) -> list[EvalItem]:
    """Items of the same image (or video) next to each other, groups in order of first appearance."""
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        first.setdefault(media_key(item), index)
    order = sorted(range(len(items)), key=lambda index: (first[media_key(items[index])], index))
    return [items[index] for index in order]


def shard(items: list[EvalItem], rank: int, world_size: int) -> list[EvalItem]:
    """Process `rank`'s contiguous share of `items` (contiguous, so that one image's questions stay together)."""
    size = -(-len(items) // world_size)
    return items[rank * size : (rank + 1) * size]


def _evenly_spaced(count: int, limit: int) -> list[int]:
    if count <= limit:
        return list(range(count))
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)}) if limit > 1 else [0]


def sample_video(source: str | list[str], keep: set[int], fps: float, max_frames: int, grid: bool = True):
    """The frames the model sees of a video, always including the source frames `keep` (the annotated ones).

    A video file is sampled on the grid `0, 1/fps, ...` (spread over the whole video when that gives more than
    `max_frames`), as `read_video` does. A frame folder (or a list of frame files) counts as one frame per second:
    every frame, or `max_frames` evenly spaced ones. With `grid=False` only the frames `keep` are read.
    Returns `(frames, timestamps, position of each source frame)`."""
    if isinstance(source, list) or os.path.isdir(source):
        if isinstance(source, list):
            files = list(source)
        else:
            files = sorted(
                os.path.join(source, name) for name in os.listdir(source) if name.lower().endswith(FRAME_EXTENSIONS)
            )
        if not files:
            raise ValueError(f"video {source!r}: the folder holds no frame images ({', '.join(FRAME_EXTENSIONS)})")
        beyond = [index for index in keep if index >= len(files)]
        if beyond:
            raise ValueError(f"video {source!r}: frame {beyond[0]} is annotated but the video has {len(files)} frames")
        chosen = sorted((set(_evenly_spaced(len(files), max_frames)) if grid else set()) | keep)
        return [files[i] for i in chosen], [float(i) for i in chosen], {i: p for p, i in enumerate(chosen)}
    if not os.path.isfile(source):
        raise ValueError(f"cannot read video {source!r}: no such file or frame folder")
    # The package's one video decoder, as the pipeline and training rows use it; without the grid it still keeps
    # one grid frame (max_frames must be positive), which is left out here.
    video = read_video(source, fps=fps, max_frames=max_frames if grid else 1, required_frames=keep)
    kept = [k for k, number in enumerate(video.frame_numbers) if grid or number in keep]
    positions = {video.frame_numbers[k]: position for position, k in enumerate(kept)}
    return [video.frames[k] for k in kept], [video.timestamps[k] for k in kept], positions


def pipeline_input(item: EvalItem, fps: float, max_frames: int) -> dict[str, Any]:
    """The region-qa pipeline item of an EvalItem. A video is read here (see `sample_video`): sampled at `fps` (or
    the item's `meta["fps"]`, `meta["max_frames"]`) with the annotated source frames kept, or, when the item lists
    `meta["source_frames"]`, only those source frames, its regions then keyed by position in that list."""
    if item.image is not None:
        if not os.path.exists(item.image):
            searched = item.meta.get("searched")
            also = f" (nor under {', '.join(searched)})" if searched else ""
            raise ValueError(f"cannot read image {item.image!r}: no such file{also}")
        return {"image": item.image, "regions": item.regions, "question": item.question}
    source_frames = item.meta.get("source_frames")
    if source_frames is not None:
        frames, timestamps, positions = sample_video(item.video, set(source_frames), fps, max_frames, grid=False)
        frames = [frames[positions[frame]] for frame in source_frames]
        timestamps = [timestamps[positions[frame]] for frame in source_frames]
        return {"video": frames, "video_timestamps": timestamps, "regions": item.regions, "question": item.question}
    fps, max_frames = item.meta.get("fps", fps), item.meta.get("max_frames", max_frames)
    keep = {int(key) for region in item.regions for key in region}
    frames, timestamps, positions = sample_video(item.video, keep, fps, max_frames)
    regions = [{positions[int(key)]: value for key, value in region.items()} for region in item.regions]
    return {"video": frames, "video_timestamps": timestamps, "regions": regions, "question": item.question}


def item_error(item: EvalItem, message: str) -> EvalDataError:
    """An EvalDataError naming the item's media file and its id, from a pipeline or preparation error."""
    message = re.sub(r"^item \d+: ", "", message)
    return EvalDataError(message, file=item.image if item.image is not None else item.video, item=item.id)


def make_record(item: EvalItem, prediction: str | None, error: str | None) -> dict[str, Any]:
    return {
        "id": item.id,
        "prediction": prediction,
        "reference": item.reference,
        "meta": item.meta,
        "error": error,
        "question": item.question,
        "media": item.image if item.image is not None else item.video,
    }


def answer_batch(
    pipe, items: list[EvalItem], benchmark: Benchmark, options: EvalOptions, generate: dict
) -> tuple[list[dict[str, Any]], list[EvalDataError]]:
    """Records of one batch (the pipeline's answers, an error record for each item that failed) and the errors,
    each naming the item's file and id."""
    fps = options.fps or benchmark.video_fps
    max_frames = options.max_frames or benchmark.max_frames
    inputs, failed = [], {}
    for index, item in enumerate(items):
        try:
            inputs.append(pipeline_input(item, fps, max_frames))
        except ValueError as error:
            failed[index] = item_error(item, str(error))
    # skip_bad_items=True always: a bad item fails alone and the others of its batch are still answered.
    outputs = iter(pipe(inputs, batch_size=len(inputs), skip_bad_items=True, **generate) if inputs else [])
    records, errors = [], []
    for index, item in enumerate(items):
        error = failed.get(index)
        if error is None:
            output = next(outputs)
            if "error" in output:
                error = item_error(item, output["error"])
            else:
                records.append(make_record(item, output["answer"], None))
                continue
        errors.append(error)
        records.append(make_record(item, None, str(error)))
    return records, errors


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


def _process_state(cpu: bool = False):
    """accelerate's PartialState when accelerate is installed (rank, world size, device), else a single process.

    On the CPU (`--cpu`, ACCELERATE_USE_CPU=1, or no GPU) the processes of `accelerate launch` join a gloo group;
    without `cpu=True` accelerate would treat each of them as a run of its own."""
    try:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env
    except ImportError:
        return None
    import torch

    use_cpu = cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    # Processes wait for the slowest at the end: far longer than the default collective timeout on a big benchmark.
    return PartialState(cpu=use_cpu, timeout=datetime.timedelta(hours=24))


def _load_pipeline(options: EvalOptions, device):
    """The pipeline on `--device`, else the CPU with `--cpu`, else this process's accelerate device (CPU without
    one); dtype auto is bf16 on accelerators, the checkpoint's float32 on the CPU."""
    from ..cli import load_region_qa_pipeline

    device = options.device or ("cpu" if options.cpu else device or "cpu")
    return load_region_qa_pipeline(options.model, device, options.dtype)


def read_matching_record(path: Path, expected: dict[str, Any], folder: str | Path) -> dict[str, Any] | None:
    """The JSON record of a run folder (`run.json`, a batch job's `batch.json`; None when absent), refused with a
    ValueError when one of its `expected` fields differs: a folder holds the work of one run, whose rerun resumes it.
    """
    if not path.exists():
        return None
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed JSON ({error.msg}); remove it or use another --out") from error
    for key, value in expected.items():
        if previous.get(key) != value:
            held = ", ".join(f"{name} {previous.get(name)!r}" for name in expected)
            raise ValueError(
                f"{folder} holds a run of {held}; its {key} differs from this one's ({value!r}): use another --out"
            )
    return previous


def previous_run_info(benchmark: Benchmark, options: EvalOptions) -> dict[str, Any] | None:
    """The run.json already in the run folder (None if there is none); a ValueError when it belongs to a run of
    another benchmark, model or data file. Every process checks it, so that none waits for a main process that
    refused the folder."""
    expected = {"benchmark": benchmark.name, "model": options.model, "data": str(Path(options.data).resolve())}
    return read_matching_record(Path(options.out) / RUN_INFO, expected, options.out)


def write_run_info(
    benchmark: Benchmark, options: EvalOptions, previous: dict[str, Any] | None, processes: int = 1
) -> dict[str, Any]:
    """run.json: what runs, with which options, since when (a resumed run keeps its start and counts resumptions)."""
    info = {
        "benchmark": benchmark.name,
        "model": options.model,
        "data": str(Path(options.data).resolve()),
        "options": asdict(options),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": sys.argv,
        "processes": processes,
    }
    if previous is not None:
        info["started"] = previous.get("started", info["started"])
        info["resumed"] = previous.get("resumed", 0) + 1
    (Path(options.out) / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


def run_eval(
    benchmark_name: str,
    options: EvalOptions,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any] | None:
    """Run `benchmark_name` and score it; returns results.json's content on the main process (None elsewhere).

    `on_batch(k)` is called after the k-th batch of this process is on disk (tests interrupt runs with it)."""
    from tqdm.auto import tqdm

    benchmark = get_benchmark(benchmark_name)
    if options.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.limit is not None and options.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {options.limit}")
    if benchmark.needs_judge and not (options.judge_base_url and options.judge_model):
        raise ValueError(f"{benchmark.name} is scored by an LLM judge: give --judge-base-url and --judge-model")
    if options.image_root is not None:
        benchmark.image_root = Path(options.image_root)
    items = benchmark.load(Path(options.data))
    if options.limit is not None:
        items = items[: options.limit]
    if len({item.id for item in items}) != len(items):
        raise EvalDataError("item ids are not unique", file=options.data)

    state = _process_state(options.cpu)
    rank, world_size = (state.process_index, state.num_processes) if state is not None else (0, 1)
    is_main = rank == 0
    run_dir = Path(options.out)
    previous = previous_run_info(benchmark, options)
    if state is not None:
        state.wait_for_everyone()  # every process has checked the folder before the main one writes to it
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_info(benchmark, options, previous, world_size)
    if state is not None:
        state.wait_for_everyone()
    # What is left is shared out afresh, so that a resumed run keeps every process busy. Every process reads the
    # same files before any of them writes again.
    done = {record["id"] for record in all_records(run_dir)}
    error_file = run_dir / f"rank{rank}.error"
    error_file.unlink(missing_ok=True)
    if state is not None:
        state.wait_for_everyone()
    todo = shard([item for item in group_by_media(items) if item.id not in done], rank, world_size)

    failure: BaseException | None = None
    try:
        if todo:
            own_file = run_dir / (PREDICTIONS if world_size == 1 else f"predictions.rank{rank}.jsonl")
            _answer_items(benchmark, options, todo, own_file, state, is_main, on_batch, tqdm)
    except BaseException as error:  # also KeyboardInterrupt: the other processes must not wait forever
        failure = error
        error_file.write_text(f"{type(error).__name__}: {error}\n")
    finally:
        if state is not None and world_size > 1:
            state.wait_for_everyone()
    if failure is not None:
        raise failure
    if not is_main:
        return None
    failed_ranks = sorted(run_dir.glob("rank*.error"))
    merge_shards(run_dir)
    if failed_ranks:
        messages = "; ".join(path.read_text().strip() for path in failed_ranks)
        raise EvalRunError(f"a process of the run failed ({messages}); rerun the same command to resume")
    return score_run(run_dir, benchmark=benchmark, options=options, item_ids=[item.id for item in items])


def _answer_items(benchmark, options, todo, own_file, state, is_main, on_batch, tqdm) -> None:
    pipe = _load_pipeline(options, state.device if state is not None else None)
    generate = dict(benchmark.generation_kwargs)
    if options.max_new_tokens is not None:
        generate["max_new_tokens"] = options.max_new_tokens
    writer = RecordWriter(own_file)
    progress = tqdm(total=len(todo), unit="item", desc=benchmark.name, disable=not is_main, dynamic_ncols=True)
    try:
        for batch_number, start in enumerate(range(0, len(todo), options.batch_size), start=1):
            records, errors = answer_batch(pipe, todo[start : start + options.batch_size], benchmark, options, generate)
            if errors and not options.skip_bad_items:
                # The batch's good answers are kept; the bad item stops the run and is tried again on a rerun.
                writer.write_batch([record for record in records if not record["error"]])
                error = errors[0]
                error.args = (f"{error} (pass --skip-bad-items to record such items as errors and go on)",)
                raise error
            writer.write_batch(records)
            progress.update(len(records))
            if on_batch is not None:
                on_batch(batch_number)
    finally:
        progress.close()
        writer.close()


def score_run(
    run_dir: Path,
    benchmark: Benchmark | None = None,
    options: EvalOptions | None = None,
    item_ids: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics from the run folder's predictions (no model): results.json and results.md. `eval-score` calls it with
    only the folder (and `overrides` of scoring options such as ssim_model or the judge)."""
    run_dir = Path(run_dir)
    info_path = run_dir / RUN_INFO
    try:
        info = json.loads(info_path.read_text())
    except FileNotFoundError as error:
        raise ValueError(f"{run_dir}: no {RUN_INFO}; is it the --out folder of `pixelrefer eval`?") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{info_path}: malformed JSON ({error.msg})") from error
    if benchmark is None:
        benchmark = get_benchmark(info["benchmark"])
    if options is None:
        known = EvalOptions.__dataclass_fields__
        options = EvalOptions(**{key: value for key, value in info.get("options", {}).items() if key in known})
    if overrides:
        for key, value in overrides.items():
            if value is not None:
                setattr(options, key, value)
    options.out = str(run_dir)
    records = merge_shards(run_dir)
    if item_ids is not None:
        wanted = set(item_ids)
        records = [record for record in records if record["id"] in wanted]
        missing = len(wanted) - len(records)
        if missing:
            raise EvalRunError(f"{missing} of {len(wanted)} items have no prediction in {run_dir}; rerun to finish")
    if not records:
        raise ValueError(f"{run_dir}: no predictions to score")
    metrics = benchmark.score(records, options.score_options())
    info["options"] = asdict(options)
    results = build_results(benchmark, info, metrics)
    write_results(run_dir, results)
    return results
