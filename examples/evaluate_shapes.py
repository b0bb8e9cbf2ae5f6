"""Exact-match accuracy of region models on held-out synthetic shapes, per question kind and per object size.

    python examples/evaluate_shapes.py                    # both bundled demo checkpoints, 100 questions per kind
    python examples/evaluate_shapes.py --model ablation=runs/shapes-mask-pooling --num-per-kind 100
    python examples/evaluate_shapes.py --json results.json --show-mistakes
    python examples/evaluate_shapes.py --update-cards     # write each model's row into its folder's README.md
    python examples/evaluate_shapes.py --regions box      # regions as tight bounding boxes instead of masks

Questions come from `pixelrefer_hf.synthetic.shapes_questions` with `--seed` (default 1000; the demo checkpoints were
trained on scenes of seed 0), one question of each kind per scene: `what` ("a red circle"), `color`, `shape`,
`larger` (two regions, yes / no) and `direction` (8-frame video, left / right / up / down). The size columns score the
`what` / `color` / `shape` questions by the size of the object asked about. Answers are produced by
`pipeline("region-qa")` in batches (greedy decoding) and compared after stripping blanks, case and a final full stop.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import pipeline

from pixelrefer_hf.demo import DEMO_CHECKPOINTS, demo_checkpoint, replace_card_results, target_report
from pixelrefer_hf.synthetic import accuracy_table, score_shapes_answers, shapes_questions


def parse_model(text: str) -> tuple[str, str]:
    """`NAME=PATH` or `PATH` (named after the folder)."""
    name, _, path = text.rpartition("=")
    return (name or path.rstrip("/").rsplit("/", 1)[-1]), path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        action="append",
        type=parse_model,
        metavar="[NAME=]PATH",
        help="a checkpoint folder (repeatable); default: the bundled demo checkpoints",
    )
    parser.add_argument("--num-per-kind", type=int, default=100, help="questions of each kind")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the held-out scenes")
    parser.add_argument(
        "--regions",
        choices=("mask", "box"),
        default="mask",
        help="give each region as its mask (default, as the models were trained) or as its tight bounding box",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", help="also write the scores to this file")
    parser.add_argument("--show-mistakes", action="store_true", help="print some wrong answers")
    parser.add_argument(
        "--update-cards", action="store_true", help="write each model's table into the README.md of its folder"
    )
    args = parser.parse_args()
    if args.update_cards and args.regions != "mask":
        parser.error("--update-cards writes the cards' mask table; run it with --regions mask")
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.model or [(name, demo_checkpoint(variant)) for variant, name in DEMO_CHECKPOINTS.items()]

    items = shapes_questions(args.seed, args.num_per_kind)
    results = {}
    for name, path in models:
        pipe = pipeline("region-qa", model=path, trust_remote_code=True)
        started = time.perf_counter()
        outputs = pipe(
            [item.pipeline_inputs(boxes=args.regions == "box") for item in items],
            batch_size=args.batch_size,
            max_new_tokens=8,
            do_sample=False,
        )
        seconds = time.perf_counter() - started
        results[name] = score_shapes_answers(items, [output["answer"] for output in outputs])
        print(f"{name}: {len(items)} questions in {seconds:.0f} s")
        if args.show_mistakes:
            for kind, expected, answer in results[name]["wrong"]:
                print(f"  {kind}: expected {expected!r}, got {answer!r}")

    print()
    print(accuracy_table(results))
    for name, result in results.items():
        print(f"{name}: {target_report(result)}")
    if args.update_cards:
        for name, path in models:
            card_path = Path(path, "README.md")
            table = accuracy_table({name: results[name]})
            note = f"{args.num_per_kind} questions per kind, scene seed {args.seed}. {target_report(results[name])}"
            card_path.write_text(replace_card_results(card_path.read_text(), f"{table}\n\n{note}"))
            print(f"updated {card_path}")
    if args.json:
        with open(args.json, "w") as file:
            record = {"seed": args.seed, "num_per_kind": args.num_per_kind, "regions": args.regions, "results": results}
            json.dump(record, file, indent=2)


if __name__ == "__main__":
    main()
