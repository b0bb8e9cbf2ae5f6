"""`pixelrefer eval`: the official region benchmarks through `pipeline("region-qa")`, resumable and sharded.

    pixelrefer eval lvis --model path/to/PixelRefer-7B --data lvis_val_1k_category.json --image-root coco --out runs/lvis
    accelerate launch --num_processes 8 -m pixelrefer_hf.evaluation lvis --model ... --data ... --out runs/lvis
    pixelrefer eval-score runs/lvis          # metrics again from runs/lvis/predictions.jsonl, without the model
    pixelrefer eval-compare runs/lvis runs/lvis-lite --chart compare.png

Importing this package is light: the benchmarks, the runner and the metric libraries (sentence-transformers,
pycocoevalcap; `pip install "pixelrefer-hf[eval]"`) load on first use.
"""

from typing import Any

from .base import Benchmark, EvalDataError, EvalItem, ScoreOptions

_LAZY = {
    "benchmark_classes": "benchmarks",
    "get_benchmark": "benchmarks",
    "EvalOptions": "runner",
    "run_eval": "runner",
    "score_run": "runner",
    "compare_runs": "results",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [  # noqa: F822 (the lazy names resolve through __getattr__)
    "Benchmark",
    "EvalDataError",
    "EvalItem",
    "ScoreOptions",
    "EvalOptions",
    "benchmark_classes",
    "compare_runs",
    "get_benchmark",
    "run_eval",
    "score_run",
]
