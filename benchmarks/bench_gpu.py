"""GPU latency, tokens/s and peak memory of 2B-size PixelRefer vs PixelRefer-Lite, sdpa vs flash_attention_2.

    python benchmarks/bench_gpu.py                   # needs CUDA; writes benchmarks/results/gpu.{json,md}
    python benchmarks/bench_gpu.py --smoke --output-dir /tmp/gpu   # CPU, tiny model: checks the script runs (CI)

Without CUDA (and without `--smoke`) it prints why and exits 0. The model has the real PixelRefer-2B shapes and random
bf16 weights (nothing is downloaded). Settings are those of the paper's efficiency tables: one image with one object
(448x616 px, 1408 visual tokens, the DLC-Bench prompt) and a 20-frame 720p video with the object on frame 0 (the
HC-STVG prompt); inputs come from the real processor, as in `bench_flops.py`. For each variant, attention
implementation (flash_attention_2 only when flash-attn is importable) and setting it reports:

* prefill latency: one forward pass over the prompt (tower, SAOT / OCI, LLM), i.e. time to first token;
* generation latency and tokens/s: `generate` with exactly `--new-tokens` greedy tokens;
* peak memory: `torch.cuda.max_memory_allocated` during `generate` (weights included).
"""

import argparse
from functools import partial

import torch
from bench_flops import make_inputs
from bench_utils import add_run_arguments, best_seconds, markdown_table, parse_run_arguments, real_config, write_results
from transformers.utils import is_flash_attn_2_available

from pixelrefer_hf import PixelReferForConditionalGeneration
from pixelrefer_hf.testing import TINY_IMAGE_PROCESSOR_OPTIONS, processor_for_config, tiny_config
from pixelrefer_hf.tokenizer_assets import build_tiny_tokenizer

VARIANTS = ("pixelrefer", "pixelrefer-lite")


def build(size: str, variant: str, attention: str, device: str, dtype: torch.dtype, tokenizer):
    """A randomly initialised model (created directly on `device` in `dtype`) and its processor."""
    if size == "tiny":
        config = tiny_config(variant, tokenizer, attn_implementation=attention)
    else:
        config = real_config(
            size,
            variant,
            attn_implementation=attention,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            region_token_id=tokenizer.convert_tokens_to_ids("<REGION>"),
        )
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = PixelReferForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous_dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    options = TINY_IMAGE_PROCESSOR_OPTIONS if size == "tiny" else {}
    return model, processor_for_config(config, tokenizer, **options)


def prefill(model, inputs) -> None:
    """One forward pass over the prompt, logits for the last position only: the time to the first token."""
    with torch.no_grad():
        model(**inputs, use_cache=False, logits_to_keep=1)


def generate(model, inputs, new_tokens: int) -> torch.Tensor:
    """Greedy decoding of exactly `new_tokens` tokens (random weights rarely produce EOS, but may)."""
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per answer")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs, interleaved (fastest reported)")
    parser.add_argument("--image-size", default="448x616", help="HxW of the image setting")
    parser.add_argument("--frame-size", default="720x1280", help="HxW of the video frames")
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="run on the CPU with the tiny model and small inputs: checks the script, measures nothing",
    )
    add_run_arguments(parser)
    args = parse_run_arguments(parser, argv)
    if args.smoke:
        size, device, dtype = "tiny", "cpu", torch.float32
        args.new_tokens, args.repeats, args.image_size, args.frame_size, args.frames = 2, 1, "56x70", "56x70", 2
    elif not torch.cuda.is_available():
        print(
            "bench_gpu.py needs a CUDA device and none is available; nothing measured (use --smoke to check the "
            "script on the CPU)."
        )
        return None
    else:
        size, device, dtype = "2b", "cuda", torch.bfloat16
    image_hw = tuple(int(v) for v in args.image_size.split("x"))
    frame_hw = tuple(int(v) for v in args.frame_size.split("x"))
    attentions = ["sdpa"] + (["flash_attention_2"] if is_flash_attn_2_available() else [])

    tokenizer = build_tiny_tokenizer()
    results = []
    for variant in VARIANTS:
        for attention in attentions:
            model, processor = build(size, variant, attention, device, dtype, tokenizer)
            for setting in ("image", "video"):
                # Pixel values stay float32: the tower casts them to its dtype (boxes would lose precision in bf16).
                inputs = make_inputs(processor, setting, variant, image_hw, frame_hw, args.frames).to(device)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                generate(model, inputs, args.new_tokens)
                peak_mib = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
                seconds = best_seconds(
                    {
                        "prefill": partial(prefill, model, inputs),
                        "generate": partial(generate, model, inputs, args.new_tokens),
                    },
                    args.repeats,
                )
                results.append(
                    {
                        "variant": variant,
                        "attention": attention,
                        "setting": setting,
                        "prompt_tokens": int(inputs["input_ids"].shape[1]),
                        "new_tokens": args.new_tokens,
                        "prefill_seconds": seconds["prefill"],
                        "generate_seconds": seconds["generate"],
                        "tokens_per_second": args.new_tokens / seconds["generate"],
                        "peak_mib": peak_mib,
                    }
                )
            del model
            if device == "cuda":
                torch.cuda.empty_cache()

    rows = [
        [
            r["variant"],
            r["attention"],
            r["setting"],
            r["prompt_tokens"],
            r["prefill_seconds"],
            r["generate_seconds"],
            r["tokens_per_second"],
            "-" if r["peak_mib"] is None else r["peak_mib"] / 1024,
        ]
        for r in results
    ]
    headers = [
        "variant",
        "attention",
        "setting",
        "prompt tokens",
        "prefill s",
        f"generate {args.new_tokens} tok s",
        "tok/s",
        "peak GiB",
    ]
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (smoke run, tiny model)"
    table = (
        f"{size.upper()}-size random weights, {str(dtype).removeprefix('torch.')}, {device_name}; image "
        f"{image_hw[0]}x{image_hw[1]}, video {args.frames} x {frame_hw[0]}x{frame_hw[1]}; best of {args.repeats}.\n\n"
        + markdown_table(headers, rows)
    )
    payload = {
        "settings": {
            "size": size,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "image_hw": image_hw,
            "frame_hw": frame_hw,
            "frames": args.frames,
            "smoke": args.smoke,
        },
        "results": results,
    }
    write_results("gpu", payload, table, args.output_dir)
    return payload


if __name__ == "__main__":
    main()
