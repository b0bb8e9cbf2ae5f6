"""Many questions about one image: separate calls vs one batch that shares the image (`generate_sharing_image`).

    python benchmarks/bench_many_questions.py --threads 2     # writes benchmarks/results/many_questions.{json,md}
    python benchmarks/bench_many_questions.py --smoke --output-dir /tmp/many   # seconds (CI smoke test)

N questions (one region each, a different region per question) about one synthetic image:

* **time** on this machine's CPU, random weights: `separate` answers each question with its own `generate` call (the
  image encoded and its tokens prefilled N times); `one plain batch` answers the N in one left-padded `generate`
  call (batched, but still N encodes and N prefills of the image; PixelRefer only); `shared` answers all N in one call of the region-qa pipeline's
  path (the image encoded once, the prompt prefix prefilled once and its KV cache repeated per question; Lite: one
  plain batch whose processor encodes the global context image once). Interleaved runs, the fastest kept
  (`bench_utils.best_seconds`); greedy decoding of `--max-new-tokens` tokens; seconds per question;
* **FLOPs** at the released 2B and 7B sizes, counted on the meta device (no weight allocated): LLM prefill (the
  prefix once plus each question's suffix against the cached prefix, vs each full prompt) and the vision tower (the
  image once plus each question's crop, vs image and crop per question), per question.
"""

import argparse

import numpy as np
import torch
from bench_flops import llm_flops, tower_flops
from bench_utils import (
    add_run_arguments,
    best_seconds,
    machine_description,
    markdown_table,
    parse_run_arguments,
    real_config,
    write_results,
)
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

from pixelrefer_hf import PixelReferForConditionalGeneration
from pixelrefer_hf.testing import TINY_IMAGE_PROCESSOR_OPTIONS, processor_for_config, tiny_config
from pixelrefer_hf.tokenizer_assets import build_tiny_tokenizer

VARIANTS = ("pixelrefer", "pixelrefer-lite")
QUESTION = "Please describe <region> briefly."


def question_regions(height: int, width: int, count: int) -> list[np.ndarray]:
    """`count` different boxes as masks, on a grid over the image (each about 1/16 of it)."""
    side = int(np.ceil(np.sqrt(count)))
    masks = []
    for index in range(count):
        row, col = divmod(index, side)
        mask = np.zeros((height, width), dtype=bool)
        top, left = row * height // side, col * width // side
        mask[top : top + max(8, height // (2 * side)), left : left + max(8, width // (2 * side))] = True
        masks.append(mask)
    return masks


def batch_inputs(processor, image: np.ndarray, masks: list[np.ndarray]) -> dict:
    """The processor's left-padded batch: one question per mask, all about `image`."""
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return dict(
        processor(
            text=[prompt] * len(masks),
            images=[image] * len(masks),
            regions=[[mask] for mask in masks],
            padding=True,
            return_tensors="pt",
        )
    )


def build(size: str, variant: str, tokenizer, device: str = "cpu", num_layers: int | None = None):
    """A randomly initialised model and its processor (tiny, or the released size with random weights)."""
    if size == "tiny":
        config = tiny_config(variant, tokenizer)
        options = TINY_IMAGE_PROCESSOR_OPTIONS
    else:
        ids = {
            name: tokenizer.convert_tokens_to_ids(token)
            for name, token in (("image_token_id", "<image>"), ("region_token_id", "<REGION>"))
        }
        config = real_config(size, variant, num_layers=num_layers, **ids)
        options = {}
    if device == "meta":
        with torch.device("meta"):
            model = PixelReferForConditionalGeneration(config)
    else:
        torch.manual_seed(0)
        model = PixelReferForConditionalGeneration(config).eval()
        model.generation_config.eos_token_id = None  # every question decodes exactly max_new_tokens
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor_for_config(config, tokenizer, **options)


def time_questions(size: str, variant: str, counts: list[int], image_hw, max_new_tokens: int, repeats: int) -> list:
    tokenizer = build_tiny_tokenizer()
    model, processor = build(size, variant, tokenizer)
    image = np.random.default_rng(0).integers(0, 256, (*image_hw, 3), dtype=np.uint8)
    greedy = {"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens, "do_sample": False}
    rows = []
    for count in counts:
        masks = question_regions(*image_hw, count)
        batch = batch_inputs(processor, image, masks)
        singles = [batch_inputs(processor, image, [mask]) for mask in masks]

        def separate(singles=singles):
            return [model.generate(**one, **greedy) for one in singles]

        def batched(batch=batch):
            return model.generate(**batch, **greedy)

        def shared(batch=batch):
            if model.config.is_lite:
                return model.generate(**batch, **greedy)
            return model.generate_sharing_image(**batch, **greedy)

        functions = {"separate": separate, "shared": shared}
        if not model.config.is_lite:  # Lite's shared path is the plain batch
            functions["batched"] = batched
        seconds = best_seconds(functions, repeats=repeats, warmup=1 if repeats > 1 else 0)
        rows.append(
            {
                "size": size,
                "variant": variant,
                "questions": count,
                "separate_s_per_question": seconds["separate"] / count,
                "shared_s_per_question": seconds["shared"] / count,
                "batched_s_per_question": seconds.get("batched", seconds["shared"]) / count,
                "speedup": seconds["separate"] / seconds["shared"],
            }
        )
        print(rows[-1], flush=True)
    return rows


def llm_suffix_flops(language_model, hidden_size: int, prefix: int, suffix: int) -> int:
    """Prefill FLOPs of `suffix` tokens attending to a cached `prefix` (meta tensors, no values read)."""
    cache = DynamicCache()
    embeds = torch.empty(1, prefix, hidden_size, device="meta", dtype=torch.bfloat16)
    no_masks = {"full_attention": None, "sliding_attention": None}
    with torch.no_grad():
        language_model(inputs_embeds=embeds, attention_mask=no_masks, use_cache=True, past_key_values=cache)
        embeds = torch.empty(1, suffix, hidden_size, device="meta", dtype=torch.bfloat16)
        with FlopCounterMode(display=False) as counter:
            language_model(inputs_embeds=embeds, attention_mask=no_masks, use_cache=True, past_key_values=cache)
    return counter.get_total_flops()


def count_flops(size: str, variant: str, counts: list[int], image_hw, num_layers: int | None = None) -> list:
    tokenizer = build_tiny_tokenizer()
    model, processor = build(size, variant, tokenizer, device="meta", num_layers=num_layers)
    hidden = model.config.text_config.hidden_size
    language_model, tower = model.model.language_model, model.model.vision_model
    image = np.random.default_rng(0).integers(0, 256, (*image_hw, 3), dtype=np.uint8)
    rows = []
    for count in counts:
        masks = question_regions(*image_hw, count)
        one = batch_inputs(processor, image, masks[:1])
        length = int(one["attention_mask"].sum())
        crop_only = {key: value for key, value in one.items() if key.startswith("region_")}
        separate_llm = llm_flops(language_model, hidden, length)["total"]
        separate_tower = tower_flops(tower, one)
        crop_tower = tower_flops(tower, crop_only)
        if variant == "pixelrefer":
            image_tokens = int((one["input_ids"] == model.config.image_token_id).sum())
            ids = one["input_ids"][0]
            prefix = int(torch.nonzero(ids == model.config.image_token_id).max()) + 1  # through the last image token
            shared_llm = llm_flops(language_model, hidden, prefix)["total"] / count + llm_suffix_flops(
                language_model, hidden, prefix, length - prefix
            )
            shared_tower = (separate_tower - crop_tower) / count + crop_tower
        else:
            image_tokens = 0
            # No image tokens reach Lite's LLM; the global context image (part of the crop-side inputs) is encoded
            # once per call when the questions' budgets agree (one region each here).
            global_only = {key: one[key] for key in ("region_global_grid_thw",)}
            global_tower = tower_flops(tower, global_only)
            shared_llm = separate_llm
            shared_tower = (separate_tower - global_tower) + global_tower / count
        rows.append(
            {
                "size": size,
                "variant": variant,
                "questions": count,
                "prompt_tokens": length,
                "image_tokens": image_tokens,
                "separate_tflops_per_question": (separate_llm + separate_tower) / 1e12,
                "shared_tflops_per_question": (shared_llm + shared_tower) / 1e12,
                "ratio": (separate_llm + separate_tower) / (shared_llm + shared_tower),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-sizes", default="tiny,2b", help="sizes timed on the CPU (tiny, 2b, 7b)")
    parser.add_argument("--flop-sizes", default="2b,7b", help="sizes whose FLOPs are counted on the meta device")
    parser.add_argument("--questions", default="1,4,16,64", help="question counts N")
    parser.add_argument("--questions-2b", default="1,4,16", help="question counts timed at 2B (CPU time)")
    parser.add_argument("--image", default="448x616", help="HxW of the image for the FLOP counts")
    parser.add_argument("--time-image", default="224x308", help="HxW of the image for the timed runs")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the tiny timings")
    parser.add_argument("--smoke", action="store_true", help="tiny only, N = 1, 2, small image (seconds)")
    add_run_arguments(parser, timed_on_cpu=True)
    args = parse_run_arguments(parser, argv)
    counts = [int(n) for n in args.questions.split(",")]
    time_sizes = args.time_sizes.split(",")
    flop_sizes = args.flop_sizes.split(",")
    image_hw = tuple(int(v) for v in args.image.split("x"))
    time_hw = tuple(int(v) for v in args.time_image.split("x"))
    if args.smoke:
        counts, time_sizes, flop_sizes, image_hw, time_hw = [1, 2], ["tiny"], ["2b"], (112, 140), (112, 140)
        args.repeats, args.max_new_tokens = 1, 2

    timings = []
    for size in time_sizes:
        size_counts = [int(n) for n in args.questions_2b.split(",")] if size != "tiny" else counts
        for variant in VARIANTS:
            repeats = args.repeats if size == "tiny" else 1
            timings += time_questions(size, variant, size_counts, time_hw, args.max_new_tokens, repeats)
    # Smoke runs count 2 layers of the real widths.
    layers = 2 if args.smoke else None
    flops = [
        row
        for size in flop_sizes
        for variant in VARIANTS
        for row in count_flops(size, variant, counts, image_hw, layers)
    ]

    time_table = markdown_table(
        ["size", "variant", "N", "separate s/question", "one plain batch s/question", "shared s/question", "speedup"],
        [
            [
                r["size"],
                r["variant"],
                r["questions"],
                f"{r['separate_s_per_question']:.3f}",
                f"{r['batched_s_per_question']:.3f}",
                f"{r['shared_s_per_question']:.3f}",
                f"{r['speedup']:.2f}x",
            ]
            for r in timings
        ],
    )
    flop_table = markdown_table(
        ["size", "variant", "N", "prompt tokens", "image tokens", "separate TFLOPs/q", "shared TFLOPs/q", "ratio"],
        [
            [
                r["size"],
                r["variant"],
                r["questions"],
                r["prompt_tokens"],
                r["image_tokens"],
                f"{r['separate_tflops_per_question']:.3f}",
                f"{r['shared_tflops_per_question']:.3f}",
                f"{r['ratio']:.2f}x",
            ]
            for r in flops
        ],
    )
    table = (
        f"Time (CPU, random weights, {time_hw[0]}x{time_hw[1]} image, {args.max_new_tokens} new tokens per question, "
        f"torch threads {torch.get_num_threads()}):\n\n{time_table}\n\nFLOPs (LLM prefill + vision tower, meta device, "
        f"{image_hw[0]}x{image_hw[1]} image):\n\n{flop_table}"
    )
    payload = {
        "machine": machine_description(),
        "settings": {"time_image": time_hw, "flop_image": image_hw, "max_new_tokens": args.max_new_tokens},
        "timings": timings,
        "flops": flops,
    }
    write_results("many_questions", payload, table, args.output_dir)
    return payload


if __name__ == "__main__":
    main()
