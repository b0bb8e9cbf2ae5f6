"""Linear probes: what a region model's object tokens and LLM hidden states say about size, place and motion.

    python benchmarks/probe_region_tokens.py                          # both bundled demo checkpoints
    python benchmarks/probe_region_tokens.py --model runs/shapes-new --num-scenes 300 --json probes.json

On held-out synthetic scenes (`pixelrefer_hf.synthetic`, seed 2000) every shape is encoded the way
`pipeline("region-qa")` encodes it, and linear models (ridge regression, logistic regression; scikit-learn) are fitted
on 70% of the examples and scored on the other 30%. Features are the mean and max over a region's tokens:

* at the object tokens (SAOT's output after the projector and, for Lite, OCI: what the LLM receives) and at the LLM's
  hidden states over the same `<REGION>` positions, layer by layer: log-area and centre of a still shape (R^2); the
  frame index of one video frame's tokens (accuracy; the tokens themselves carry no time, the `Time t:` text before
  them does); the displacement (dx, dy, R^2) and direction (accuracy) of a moving shape from its first and last
  frames' tokens together;
* at the answer position (the last prompt token, where the first answer token is produced), layer by layer: the
  direction of a `Which way does <region> move?` prompt and the answer of an `Is <region> larger than <region>?`
  prompt (for the pair, the object-token column uses both regions' tokens);
* the model's own greedy answers to those two prompts.

A target the tokens carry scores R^2 near 1 (accuracy near 1); one they do not carry scores near 0 (chance).
"""

import argparse
import json

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from transformers import pipeline

from pixelrefer_hf.demo import DEMO_CHECKPOINTS, demo_checkpoint
from pixelrefer_hf.synthetic import (
    DIRECTIONS,
    LARGER_MIN_RATIO,
    QUESTIONS,
    draw_image_scene,
    draw_video_scene,
    mask_centre,
    normalize_answer,
)


def _split(num: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(num)
    cut = int(0.7 * num)
    return order[:cut], order[cut:]


def probe_regression(features: np.ndarray, targets: np.ndarray) -> float:
    """Held-out R^2 (averaged over target columns) of a ridge regression on standardised features."""
    train, test = _split(len(features))
    model = make_pipeline(StandardScaler(), Ridge(alpha=10.0)).fit(features[train], targets[train])
    return float(r2_score(targets[test], model.predict(features[test])))


def probe_classification(features: np.ndarray, labels: np.ndarray) -> float:
    """Held-out accuracy of a logistic regression on standardised features."""
    train, test = _split(len(features))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(
        features[train], labels[train]
    )
    return float((model.predict(features[test]) == labels[test]).mean())


def pooled(tokens: torch.Tensor) -> np.ndarray:
    """Mean and max over a region's tokens, `(2 * hidden,)`."""
    return torch.cat([tokens.mean(0), tokens.amax(0)]).float().numpy()


class RegionEncoder:
    """Runs a checkpoint the way `pipeline("region-qa")` does and returns object tokens and LLM hidden states."""

    def __init__(self, path: str):
        self.pipe = pipeline("region-qa", model=path, trust_remote_code=True)
        self.model = self.pipe.model.eval()
        self.region_token_id = self.model.config.region_token_id

    @torch.no_grad()
    def encode(self, item: dict) -> dict:
        prepared = self.pipe.preprocess(item)
        inputs = self.pipe._encode([prepared])
        region_inputs = {k: v for k, v in inputs.items() if k.startswith("region_")}
        object_tokens = self.model.model.get_region_features(**region_inputs)
        outputs = self.model(**inputs, output_hidden_states=True)
        is_region = inputs["input_ids"][0] == self.region_token_id
        hidden = [layer[0] for layer in outputs.hidden_states]  # (seq, hidden) per layer, embeddings first
        return {
            "object_tokens": object_tokens,
            "region_positions": torch.nonzero(is_region).flatten(),
            "hidden": hidden,
            "input_ids": inputs["input_ids"][0],
        }


def collect(encoder: RegionEncoder, num_scenes: int, seed: int) -> dict:
    """Features and targets of `num_scenes` still scenes and as many videos."""
    rng = np.random.default_rng(seed)
    data = {name: {"tokens": [], "hidden": [], "target": []} for name in ("area", "centre", "frame")}
    # Questions: features at the object tokens, hidden states at the answer position, the model's own answers.
    data |= {name: {"tokens": [], "answer": [], "target": [], "correct": []} for name in ("pair", "move")}
    data["move"]["hidden_regions"] = []  # the region's first and last frame tokens, layer by layer
    data["move"]["displacement"] = []  # centre of the last frame minus that of the first, frame-normalised (dx, dy)
    for _ in range(num_scenes):
        scene = draw_image_scene(rng)
        frame = scene.frames[0]
        height, width = frame.shape[:2]
        masks = [obj.masks[0] for obj in scene.objects]
        # One prompt naming every shape of the scene: each region's tokens and hidden states in one forward.
        question = " ".join(["<region>"] * len(masks)) + " What are these?"
        encoded = encoder.encode({"image": frame, "regions": masks, "question": question})
        counts = _runs(encoded["region_positions"], len(masks))
        spans = encoded["region_positions"].split(counts)
        scene_tokens = [pooled(t) for t in encoded["object_tokens"].split(counts)]
        for obj, mask, tokens, span in zip(scene.objects, masks, scene_tokens, spans):
            hidden = [pooled(layer[span]) for layer in encoded["hidden"][1:]]
            for name, target in (
                ("area", [np.log(obj.area / (height * width))]),
                ("centre", list(mask_centre(mask))),
            ):
                data[name]["tokens"].append(tokens)
                data[name]["hidden"].append(hidden)
                data[name]["target"].append(target)
        # A larger question about one eligible pair, asked as the evaluation asks it.
        areas = [obj.area for obj in scene.objects]
        eligible = [
            (i, j)
            for i in range(len(areas))
            for j in range(len(areas))
            if i != j and max(areas[i], areas[j]) >= LARGER_MIN_RATIO * min(areas[i], areas[j])
        ]
        if eligible:
            i, j = eligible[int(rng.integers(len(eligible)))]
            item = {"image": frame, "regions": [masks[i], masks[j]], "question": QUESTIONS["larger"]}
            label = int(areas[i] > areas[j])
            _add_question(
                encoder,
                data["pair"],
                item,
                np.concatenate([scene_tokens[i], scene_tokens[j]]),
                label,
                "yes" if label else "no",
            )

        scene = draw_video_scene(rng)
        for obj in scene.objects:
            region = {t: mask for t, mask in enumerate(obj.masks)}
            item = {
                "video": scene.frames,
                "video_timestamps": scene.timestamps,
                "regions": [region],
                "question": QUESTIONS["direction"],
            }
            encoded = encoder.encode(item)
            per_frame = _runs(encoded["region_positions"], len(obj.masks))
            chunks = encoded["object_tokens"].split(per_frame)
            spans = encoded["region_positions"].split(per_frame)
            for t, (chunk, span) in enumerate(zip(chunks, spans)):
                data["frame"]["tokens"].append(pooled(chunk))
                data["frame"]["hidden"].append([pooled(layer[span]) for layer in encoded["hidden"][1:]])
                data["frame"]["target"].append(t)
            first_last = np.concatenate([pooled(chunks[0]), pooled(chunks[-1])])
            (first_x, first_y), (last_x, last_y) = mask_centre(obj.masks[0]), mask_centre(obj.masks[-1])
            data["move"]["displacement"].append([last_x - first_x, last_y - first_y])
            direction = list(DIRECTIONS).index(obj.direction)
            _add_question(encoder, data["move"], item, first_last, direction, obj.direction, encoded)
            data["move"]["hidden_regions"].append(
                [np.concatenate([pooled(layer[spans[0]]), pooled(layer[spans[-1]])]) for layer in encoded["hidden"][1:]]
            )
    return data


def _add_question(encoder, store: dict, item: dict, tokens: np.ndarray, target: int, expected: str, encoded=None):
    """Object-token features, the hidden states where the answer is generated, and the model's own answer."""
    encoded = encoded if encoded is not None else encoder.encode(item)
    store["tokens"].append(tokens)
    store["answer"].append([layer[-1].float().numpy() for layer in encoded["hidden"][1:]])
    store["target"].append(target)
    answer = encoder.pipe(**item, max_new_tokens=3)["answer"]
    store["correct"].append(normalize_answer(answer) == expected)


def _runs(positions: torch.Tensor, expected: int) -> list[int]:
    """Lengths of the runs of consecutive `<REGION>` positions: one run per region (a still image) or per frame (a
    one-region video prompt, `[Time t:<REGION>...,...]`)."""
    breaks = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1
    edges = [0, *breaks.tolist(), len(positions)]
    runs = [b - a for a, b in zip(edges[:-1], edges[1:])]
    if len(runs) != expected:
        raise RuntimeError(f"expected {expected} runs of <REGION> tokens, found {len(runs)}")
    return runs


def probe_table(data: dict) -> dict[str, dict[str, float]]:
    """`{probe: {column: score}}`; columns: object tokens, then LLM layers 1..L."""
    num_layers = len(data["area"]["hidden"][0])

    def row(features, hidden, score) -> dict[str, float]:
        scores = {"object tokens": score(np.array(features))} if features is not None else {}
        for layer in range(num_layers):
            scores[f"LLM layer {layer + 1}"] = score(np.array([h[layer] for h in hidden]))
        return scores

    def regression(target):
        return lambda x: probe_regression(x, np.array(target, dtype=np.float64))

    def classification(target):
        return lambda x: probe_classification(x, np.array(target))

    area, centre, frame, pair, move = (data[k] for k in ("area", "centre", "frame", "pair", "move"))
    return {
        "log-area, at the region (R^2)": row(area["tokens"], area["hidden"], regression(area["target"])),
        "centre x, y, at the region (R^2)": row(centre["tokens"], centre["hidden"], regression(centre["target"])),
        "frame index, at a frame's region tokens (acc)": row(
            frame["tokens"], frame["hidden"], classification(frame["target"])
        ),
        "displacement dx, dy, at the region's first + last frame (R^2)": row(
            move["tokens"], move["hidden_regions"], regression(move["displacement"])
        ),
        "direction, at the region's first + last frame (acc)": row(
            move["tokens"], move["hidden_regions"], classification(move["target"])
        ),
        "direction, at the answer position (acc)": row(None, move["answer"], classification(move["target"])),
        "larger (A, B), object tokens of both / answer position (acc)": row(
            pair["tokens"], pair["answer"], classification(pair["target"])
        ),
    }


def own_answers(data: dict) -> dict[str, float]:
    """Accuracy of the model's greedy answers to the probed direction and larger prompts."""
    return {"direction": float(np.mean(data["move"]["correct"])), "larger": float(np.mean(data["pair"]["correct"]))}


def markdown(name: str, rows: dict, counts: dict, answers: dict) -> str:
    columns = list(next(iter(rows.values())))
    lines = [
        f"### {name}",
        "",
        f"{counts['still']} still shapes, {counts['pairs']} pairs, {counts['video']} moving shapes; probes fitted on "
        "70%, scored on 30%. Chance: frame index 0.12, direction 0.25, larger 0.5.",
        "",
        "| probe | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for probe, scores in rows.items():
        cells = [f"{scores[c]:.2f}" if c in scores else "" for c in columns]
        lines.append(f"| {probe} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The model's own answers to the same prompts: " + ", ".join(f"{k} {v:.2f}" for k, v in answers.items()),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="checkpoint folder (repeatable; default: the demo pair)")
    parser.add_argument("--num-scenes", type=int, default=150, help="still scenes and videos, each")
    parser.add_argument("--seed", type=int, default=2000)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", help="also write the scores here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.model or [demo_checkpoint(variant) for variant in DEMO_CHECKPOINTS]
    report = {}
    for path in models:
        encoder = RegionEncoder(path)
        data = collect(encoder, args.num_scenes, args.seed)
        rows = probe_table(data)
        counts = {"still": len(data["area"]["target"]), "pairs": len(data["pair"]["target"])}
        counts["video"] = len(data["move"]["target"])
        answers = own_answers(data)
        report[str(path)] = {"rows": rows, "counts": counts, "answers": answers}
        print(markdown(str(path), rows, counts, answers), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
