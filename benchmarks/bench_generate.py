"""Batched generation: one batch of 8 region questions against 8 single calls, tokens/s and peak memory.

    python benchmarks/bench_generate.py              # tiny and 2B-size models, writes benchmarks/results/generate.*
    python benchmarks/bench_generate.py --smoke --output-dir /tmp/generate   # tiny model, seconds (CI smoke test)

Every question is about one region (alternately a mask and a box) of its own random image; the batched call pads
on the left. Both sides run the processor and `generate` (greedy, exactly `--new-tokens` new tokens per answer, so
that both produce the same number of tokens) and are timed end to end, back to back in one process. Models are
randomly initialised: `tiny` is `pixelrefer_hf.testing.tiny_model_and_processor`; `2b` has the real PixelRefer-2B
shapes (SigLIP so400m tower, Qwen2.5-1.5B), built only when the machine has the memory for it (a line says why
otherwise). Peak memory is the process's peak RSS on the CPU (reset before each measurement) and
`torch.cuda.max_memory_allocated` on a GPU.
"""

import argparse
import time
from functools import partial

import numpy as np
import torch
from bench_utils import (
    add_run_arguments,
    best_seconds,
    markdown_table,
    parse_run_arguments,
    peak_rss_mib,
    real_config,
    reset_peak_rss,
    timed,
    write_results,
)

from pixelrefer_hf import PixelReferForConditionalGeneration
from pixelrefer_hf.testing import processor_for_config, tiny_model_and_processor
from pixelrefer_hf.tokenizer_assets import build_tiny_tokenizer

QUESTIONS = [
    "What is <region>?",
    "Describe <region> in detail.",
    "What colour is <region>?",
    "Where is <region> in the image?",
    "Is <region> a square or a circle?",
    "What is the shape of <region>?",
    "Please describe <region> in the image in detail.",
    "Which object is <region>?",
]


def available_memory_mib() -> float | None:
    """`MemAvailable` of /proc/meminfo in MiB, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def build_model(size: str, variant: str, device: str, dtype: torch.dtype):
    """`(model, processor)` in eval mode on `device`, or `(None, reason)` when the model does not fit."""
    if size == "tiny":
        model, processor = tiny_model_and_processor(variant)
        return model.to(device=device, dtype=dtype), processor
    tokenizer = build_tiny_tokenizer()
    config = real_config(
        size,
        variant,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        region_token_id=tokenizer.convert_tokens_to_ids("<REGION>"),
    )
    with torch.device("meta"):
        num_parameters = sum(p.numel() for p in PixelReferForConditionalGeneration(config).parameters())
    # Weights plus about half as much again for activations, the KV cache and the allocator.
    needed_mib = 1.5 * num_parameters * torch.finfo(dtype).bits / 8 / 2**20
    if device == "cuda":
        free_mib = torch.cuda.mem_get_info()[0] / 2**20
    else:
        free_mib = available_memory_mib()
    if free_mib is not None and needed_mib > free_mib:
        return None, f"needs about {needed_mib:,.0f} MiB, {free_mib:,.0f} MiB available"
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        model = PixelReferForConditionalGeneration(config).to(device).eval()
    finally:
        torch.set_default_dtype(previous_dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor_for_config(config, tokenizer)


def make_samples(batch_size: int, image_size: int) -> list[dict]:
    """`batch_size` single-region questions, each on its own random image; even ones use a mask, odd ones a box."""
    rng = np.random.default_rng(0)
    samples = []
    for index in range(batch_size):
        image = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        top, left = rng.integers(0, image_size // 2, 2).tolist()
        bottom, right = top + image_size // 3, left + image_size // 4
        if index % 2 == 0:
            region = np.zeros((image_size, image_size), dtype=bool)
            region[top:bottom, left:right] = True
        else:
            region = [left, top, right, bottom]
        content = [{"type": "image"}, {"type": "text", "text": QUESTIONS[index % len(QUESTIONS)]}]
        samples.append({"messages": [{"role": "user", "content": content}], "image": image, "region": region})
    return samples


def answer(model, processor, samples: list[dict], new_tokens: int) -> torch.Tensor:
    """Process and answer `samples` in one left-padded batch; returns the new tokens `(batch, new_tokens)`."""
    prompts = [
        processor.apply_chat_template(sample["messages"], add_generation_prompt=True, tokenize=False)
        for sample in samples
    ]
    inputs = processor(
        text=prompts,
        images=[sample["image"] for sample in samples],
        regions=[[sample["region"]] for sample in samples],
        padding=True,
        padding_side="left",
        return_tensors="pt",
    ).to(model.device)  # float inputs stay float32: the tower casts pixels to its dtype, boxes keep their precision
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return output[:, inputs["input_ids"].shape[1] :].cpu()


def answer_one_by_one(model, processor, samples: list[dict], new_tokens: int) -> torch.Tensor:
    """The unbatched baseline: one processor call and one `generate` per sample, answers stacked."""
    return torch.cat([answer(model, processor, [sample], new_tokens) for sample in samples])


def timed_with_peak_memory(function, device: str):
    """`function()`, its wall time and the peak memory (MiB) while it ran."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    result, seconds = timed(function)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mib()
    return result, seconds, peak


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,2b", help="comma-separated: tiny, 2b")
    parser.add_argument("--variants", default="pixelrefer,pixelrefer-lite", help="comma-separated variants")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per answer")
    parser.add_argument("--image-size", type=int, default=112, help="side of the square test images (px)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of the tiny model, interleaved (fastest reported); 2B runs once"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="default: bfloat16 on CUDA, float32 on CPU (bf16 matmuls are emulated on most CPUs)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model, batch 2, 2 new tokens, one run (CI)")
    add_run_arguments(parser, timed_on_cpu=True)
    args = parse_run_arguments(parser, argv)
    if args.smoke:
        args.sizes, args.batch_size, args.new_tokens, args.repeats = "tiny", 2, 2, 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))

    samples = make_samples(args.batch_size, args.image_size)
    results, skipped = [], []
    for size in args.sizes.split(","):
        for variant in args.variants.split(","):
            start = time.perf_counter()
            model, processor = build_model(size, variant, device, dtype)
            if model is None:
                message = f"skipped {size} {variant}: {processor}"
                print(message)
                skipped.append(message)
                continue
            build_seconds = time.perf_counter() - start
            batched = partial(answer, model, processor, samples, args.new_tokens)
            singles = partial(answer_one_by_one, model, processor, samples, args.new_tokens)

            # The first run of each side gives the answers, the peak memory and a first time; on the tiny model
            # more runs follow, interleaved, and the fastest counts (a 2B run is long enough to be timed once).
            batched_answers, batched_s, batched_peak = timed_with_peak_memory(batched, device)
            single_answers, single_s, single_peak = timed_with_peak_memory(singles, device)
            if size == "tiny" and args.repeats > 1:
                seconds = best_seconds({"batched": batched, "single": singles}, args.repeats - 1, warmup=0)
                batched_s, single_s = min(batched_s, seconds["batched"]), min(single_s, seconds["single"])
            tokens = args.batch_size * args.new_tokens
            results.append(
                {
                    "size": size,
                    "variant": variant,
                    "device": device,
                    "dtype": str(dtype).removeprefix("torch."),
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "build_seconds": build_seconds,
                    "batch_size": args.batch_size,
                    "new_tokens": args.new_tokens,
                    "single_seconds": single_s,
                    "batched_seconds": batched_s,
                    "single_tokens_per_second": tokens / single_s,
                    "batched_tokens_per_second": tokens / batched_s,
                    "speedup": single_s / batched_s,
                    "single_peak_mib": single_peak,
                    "batched_peak_mib": batched_peak,
                    "same_answers": bool(torch.equal(batched_answers, single_answers)),
                }
            )
            # Free this model before the next is built (the partials hold it too).
            del model, batched, singles

    rows = [
        [
            r["size"],
            r["variant"],
            r["dtype"],
            r["single_tokens_per_second"],
            r["batched_tokens_per_second"],
            f"{r['speedup']:.1f}x",
            r["single_peak_mib"],
            r["batched_peak_mib"],
            "yes" if r["same_answers"] else "no",
        ]
        for r in results
    ]
    memory = "peak MiB (GPU allocated)" if device == "cuda" else "peak RSS MiB"
    headers = [
        "model",
        "variant",
        "dtype",
        f"{args.batch_size} single calls tok/s",
        f"batch of {args.batch_size} tok/s",
        "speedup",
        f"single {memory}",
        f"batched {memory}",
        "same tokens",
    ]
    table = (
        f"{args.batch_size} questions, {args.new_tokens} new tokens each, {args.image_size}x{args.image_size} images, "
        f"{device}, {torch.get_num_threads()} threads; processor + generate timed end to end, best of "
        f"{args.repeats} interleaved runs (2B: one run).\n\n"
        + markdown_table(headers, rows)
        + "".join(f"\n\n{line}" for line in skipped)
    )
    payload = {
        "settings": {
            "batch_size": args.batch_size,
            "new_tokens": args.new_tokens,
            "image_size": args.image_size,
            "repeats": args.repeats,
            "smoke": args.smoke,
        },
        "results": results,
        "skipped": skipped,
    }
    write_results("generate", payload, table, args.output_dir)
    return payload


if __name__ == "__main__":
    main()
