"""The demo checkpoints through `pixelrefer eval`: held-out synthetic shapes written in official benchmark formats.

    python examples/eval_demo_shapes.py --out runs/demo-shapes --update-cards --json benchmarks/results/demo_shapes_eval.json

Scenes come from `pixelrefer_hf.synthetic` with `--seed` (default 1000, the held-out seed of
`examples/evaluate_shapes.py`; the demo checkpoints were trained on seed 0) and are written by
`pixelrefer_hf.evaluation.shapes` as

* an LVIS category file (Osprey's format, `val2017/` images; category "{color} {shape}"), scored with SSim / SIoU;
* a VG brief-caption file (caption "a {color} {shape}", asked about the shape's box), scored with BLEU / METEOR /
  ROUGE-L / CIDEr;
* a VideoRefer-Bench-Q file (8-frame videos as frame folders; "Which way does <region> move?" with four options),
  scored by option-letter accuracy.

Each is then run with `pixelrefer eval BENCHMARK --model demo|demo-lite --data FILE --out RUN_DIR` (the exact
commands are printed), with the official prompts. The toy only knows its five training questions, so it answers the
official prompts with words of its own questions ("yes", "no", a direction...): the numbers show the harness at
work, not a skill. `--update-cards` writes the table into each demo checkpoint's README.md.
"""

import argparse
import json
import shlex
import time
from pathlib import Path

from pixelrefer_hf.cli import main as pixelrefer
from pixelrefer_hf.demo import CARD_EVAL_BEGIN, CARD_EVAL_END, demo_checkpoint, replace_card_results
from pixelrefer_hf.evaluation.results import format_number, load_results
from pixelrefer_hf.evaluation.shapes import write_category_set, write_vg_set, write_videorefer_q_set

MODELS = {"demo": "pixelrefer", "demo-lite": "pixelrefer-lite"}
# (benchmark, metrics shown in the table)
COLUMNS = {
    "lvis": ("ssim", "siou", "avg"),
    "vg": ("bleu_4", "meteor", "rouge_l", "cider"),
    "videorefer-q": ("accuracy",),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo-shapes", help="folder for the data files and the runs")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the held-out scenes")
    parser.add_argument("--num-images", type=int, default=40, help="scenes of the LVIS and VG files")
    parser.add_argument("--num-videos", type=int, default=20, help="videos of the VideoRefer-Q file")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", action="append", choices=list(MODELS), help="default: both demo checkpoints")
    parser.add_argument("--update-cards", action="store_true", help="write the table into the demo cards")
    parser.add_argument("--json", help="also write every run's results here")
    args = parser.parse_args()
    out = Path(args.out)
    data = {
        "lvis": write_category_set(out / "data" / "lvis", seed=args.seed, num_images=args.num_images),
        "vg": write_vg_set(out / "data" / "vg", seed=args.seed, num_images=args.num_images),
        "videorefer-q": write_videorefer_q_set(
            out / "data" / "videorefer-q", seed=args.seed, num_videos=args.num_videos
        ),
    }
    results: dict[str, dict[str, dict]] = {}
    for model in args.model or list(MODELS):
        for benchmark, path in data.items():
            run_dir = out / "runs" / f"{model}-{benchmark}"
            command = ["eval", benchmark, "--model", model, "--data", str(path), "--out", str(run_dir)]
            # The toys answer in a few tokens; 16 only bounds a batch in which one of them would not stop.
            command += ["--batch-size", str(args.batch_size), "--max-new-tokens", "16"]
            print("pixelrefer " + shlex.join(command), flush=True)
            started = time.perf_counter()
            if pixelrefer(command) != 0:
                raise SystemExit(f"pixelrefer {shlex.join(command)} failed")
            result = load_results(run_dir)
            result["seconds"] = round(time.perf_counter() - started, 1)
            results.setdefault(model, {})[benchmark] = result

    table = results_table(results)
    note = (
        f"Scene seed {args.seed}: {args.num_images} images ({results_count(results, 'lvis')} regions) for the LVIS "
        f"and VG formats, {args.num_videos} videos ({results_count(results, 'videorefer-q')} questions) for "
        "VideoRefer-Q; greedy decoding; metrics x100."
    )
    print()
    print(table)
    print(note)
    if args.update_cards:
        for model, variant in MODELS.items():
            if model not in results:
                continue
            card_path = Path(demo_checkpoint(variant), "README.md")
            rows = results_table({model: results[model]})
            card_path.write_text(
                replace_card_results(card_path.read_text(), f"{rows}\n\n{note}", CARD_EVAL_BEGIN, CARD_EVAL_END)
            )
            print(f"updated {card_path}")
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": args.seed, "note": note, "results": results}, indent=2) + "\n")


def results_count(results: dict, benchmark: str) -> int:
    return next(iter(results.values()))[benchmark]["items"]


def results_table(results: dict[str, dict[str, dict]]) -> str:
    header = ["model"] + [f"{benchmark} {metric}" for benchmark, metrics in COLUMNS.items() for metric in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, runs in results.items():
        cells = [format_number(runs[b]["metrics"].get(m, "-")) for b, metrics in COLUMNS.items() for m in metrics]
        lines.append("| " + " | ".join([model, *cells]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
