"""Shared pieces of the benchmark scripts: the real model sizes, tables, JSON output, timing and peak memory.

The scripts import this module as `bench_utils` (they run as `python benchmarks/<script>.py`, which puts this folder
first on `sys.path`). Nothing here downloads anything.
"""

import argparse
import json
import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from pixelrefer_hf import PixelReferConfig

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The VideoLLaMA3 NaViT SigLIP tower of both released sizes (official_spec.md §1.2).
REAL_VISION_CONFIG = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "patch_size": 14,
}
# Public Qwen2.5 configs (official_spec.md §1.5). The released checkpoints resize the vocabulary to their tokenizer;
# Qwen's padded sizes are used here, which moves the parameter count by well under 0.1%.
REAL_TEXT_CONFIGS = {
    "2b": {
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
    "7b": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
}


def add_run_arguments(parser: argparse.ArgumentParser, timed_on_cpu: bool = False) -> None:
    """Arguments every benchmark shares: where results go and, for timed CPU runs, the thread count."""
    if timed_on_cpu:
        parser.add_argument(
            "--threads",
            type=int,
            default=None,
            help="torch CPU threads (default: torch's choice); 1 on a machine shared with other jobs",
        )
    parser.add_argument("--output-dir", type=Path, default=None, help="default: benchmarks/results")


def parse_run_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, and apply `--threads` before anything is timed."""
    args = parser.parse_args(argv)
    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    return args


def real_config(size: str, variant: str, num_layers: int | None = None, **overrides) -> PixelReferConfig:
    """The config of the released PixelRefer(-Lite) `size` ("2b" or "7b"), every other constant at its default.

    `num_layers` replaces the depth of both the tower and the LLM (smoke runs only: every width stays real).
    """
    if size not in REAL_TEXT_CONFIGS:
        raise ValueError(f"Unknown model size {size!r}; expected one of {sorted(REAL_TEXT_CONFIGS)}.")
    text_config, vision_config = dict(REAL_TEXT_CONFIGS[size]), dict(REAL_VISION_CONFIG)
    if num_layers is not None:
        text_config["num_hidden_layers"] = vision_config["num_hidden_layers"] = num_layers
    return PixelReferConfig(variant=variant, text_config=text_config, vision_config=vision_config, **overrides)


def machine_description() -> dict:
    """What the numbers were measured on; goes into every JSON file."""
    description = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return description


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats are printed with 3 significant digits (4 below 0.01)."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 0.01 else f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict, table: str, output_dir: Path | None) -> Path:
    """Write `<name>.json` (payload + machine) and `<name>.md` (the table) and print the table."""
    output_dir = RESULTS_DIR if output_dir is None else output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine_description(), **payload}
    json_path = output_dir / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    (output_dir / f"{name}.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {json_path} and {json_path.with_suffix('.md')}")
    return json_path


def timed(function: Callable[[], object]) -> tuple[object, float]:
    """`function()` and its wall time in seconds (CUDA synchronised)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def best_seconds(functions: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Fastest wall time of each function over `repeats` runs, after `warmup` runs (CUDA synchronised).

    The functions run interleaved (a, b, a, b, ...) so that load from other processes on a shared machine hits all of
    them alike, and the minimum is kept because such load only ever adds time.
    """
    for _ in range(warmup):
        for function in functions.values():
            function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(timed(function)[1])
    return {name: min(values) for name, values in times.items()}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux `clear_refs` 5). False where that is impossible,
    in which case `peak_rss_mib` reports the peak since the process started."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB since the last successful `reset_peak_rss`."""
    peak = _status_kib("VmHWM")
    if peak is None:
        # ru_maxrss is in KiB on Linux, bytes on macOS.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if platform.system() == "Darwin":
            peak //= 1024
    return peak / 1024
