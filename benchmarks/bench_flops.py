"""LLM FLOPs, token counts and parameter memory of PixelRefer vs PixelRefer-Lite at the released 2B and 7B sizes.

    python benchmarks/bench_flops.py                 # full run, writes benchmarks/results/flops.{json,md}
    python benchmarks/bench_flops.py --smoke --output-dir /tmp/flops   # seconds, small inputs (CI smoke test)

Nothing is downloaded and no weight is allocated: the models are built on the meta device and FLOPs are counted with
`torch.utils.flop_counter.FlopCounterMode` while the real sub-modules run:

* token counts come from the real `PixelReferProcessor` (smart_resize with `max_visual_tokens` 8192, video frames
  merged 2x2 within a budget of 8192 / T tokens, 32 tokens per object, Lite: object tokens and text only) on a
  synthetic image / video with one object;
* the LLM (`model.model.language_model`, a Qwen2Model) then runs on meta tensors of exactly that length. SAOT's
  k-means and bincount are data-dependent and cannot run on meta; their cost is negligible next to the LLM and the
  tower, so they are left out (as in the paper, which counts LLM attention + FFN only);
* the vision tower is counted separately on the processor's patch grids (global image / frames, object crops, Lite's
  224x224 local and 336x336 global context images).

Text tokens: the offline tiny tokenizer splits words into characters, so the text part of the prompt is counted as a
Qwen2 tokenizer would count it: one token per pre-tokenized word (Qwen2's split pattern; exact for common English
words, digits count one each) and one per special token. FLOPs are torch's convention (2 per multiply-add), causal
attention counted over the full square as torch's SDPA counter does. The paper's numbers use the FastV formula
(multiply-adds, `n (4 d^2 + 2 d m) + 2 n^2 d` per layer), reported in a separate column for comparison.
"""

import argparse
import re

import numpy as np
import torch
from bench_utils import add_run_arguments, markdown_table, parse_run_arguments, real_config, write_results
from tokenizers import Regex, pre_tokenizers
from torch.utils.flop_counter import FlopCounterMode

from pixelrefer_hf import PixelReferForConditionalGeneration
from pixelrefer_hf.testing import processor_for_config
from pixelrefer_hf.tokenizer_assets import SPECIAL_TOKENS, build_tiny_tokenizer

# Evaluation prompts of the official code (official_spec.md §8): DLC-Bench for images, HC-STVG for videos (the
# official Lite prompt's spelling kept).
IMAGE_QUESTION = "Please describe the region <region> in the image in detail. Do not describe anything else."
VIDEO_QUESTIONS = {
    "pixelrefer": "Please describe the object <region> in brief in the video.",
    "pixelrefer-lite": (
        "There is one object in the video: <region>.\nPlease give a description of the highlighted object in the "
        "video. Using only one sentense."
    ),
}
# Qwen2's pre-tokenizer split pattern (a fact of the public tokenizer.json).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PAPER = {  # Tables 5-6 of the paper (landscape.md): LLM TFLOPs (FastV convention).
    ("2b", "image"): (1.51, 0.03),
    ("7b", "image"): (7.08, 0.17),
    ("2b", "video"): (11.15, 0.11),
    ("7b", "video"): (43.83, 0.61),
}
TARGETS = {("7b", "image"): 0.03, ("2b", "video"): 0.015}
VARIANTS = ("pixelrefer", "pixelrefer-lite")
# Patch grids of everything the tower encodes: global images / frames, object crops, Lite's context images.
GRID_KEYS = ("image_grid_thw", "region_grid_thw", "region_local_grid_thw", "region_global_grid_thw")


class QwenTextCounter:
    """Counts text tokens as the Qwen2 tokenizer would: special tokens one each, other text one per pre-token."""

    def __init__(self):
        self.splitter = pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated")
        self.special = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))

    def __call__(self, text: str) -> int:
        count = len(self.special.findall(text))
        for piece in self.special.split(text):
            count += len(self.splitter.pre_tokenize_str(piece)) if piece else 0
        return count


def make_inputs(
    processor, setting: str, variant: str, image_hw: tuple[int, int], frame_hw: tuple[int, int], num_frames: int
):
    """Processor output for one synthetic sample with one object (a centred box mask covering 1/9 of the frame).

    Video: the object is annotated on the first frame only, as in the HC-STVG evaluation of PixelRefer; the same
    annotation is used for Lite so that both variants answer the same question about the same object.
    """
    rng = np.random.default_rng(0)
    height, width = image_hw if setting == "image" else frame_hw
    mask = np.zeros((height, width), dtype=bool)
    mask[height // 3 : 2 * height // 3, width // 3 : 2 * width // 3] = True
    if setting == "image":
        content = [{"type": "image"}, {"type": "text", "text": IMAGE_QUESTION}]
        media = {"images": [rng.integers(0, 256, (height, width, 3), dtype=np.uint8)], "regions": [[mask]]}
    else:
        content = [{"type": "video"}, {"type": "text", "text": VIDEO_QUESTIONS[variant]}]
        # Random frames: token compression drops nothing, the worst case for the full model.
        frames = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(num_frames)]
        media = {"videos": [frames], "regions": [[{0: mask}]]}
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return processor(text=[prompt], return_tensors="pt", **media)


def token_counts(inputs, processor, count_text: QwenTextCounter) -> dict[str, int]:
    """Visual, object and (Qwen-estimated) text tokens of the single sample in `inputs`."""
    ids = inputs["input_ids"][0]
    media_ids = torch.tensor([processor.image_token_id, processor.region_token_id])
    is_media = torch.isin(ids, media_ids)
    # Decode every run of text tokens between media tokens and count it as Qwen2 would.
    text_tokens = 0
    boundaries = torch.nonzero(is_media[1:] != is_media[:-1]).flatten() + 1
    for run in torch.tensor_split(ids, boundaries.tolist()):
        if not bool(torch.isin(run[:1], media_ids).any()):
            text_tokens += count_text(processor.tokenizer.decode(run.tolist(), skip_special_tokens=False))
    return {
        "visual_tokens": int((ids == processor.image_token_id).sum()),
        "object_tokens": int((ids == processor.region_token_id).sum()),
        "text_tokens": text_tokens,
    }


def llm_flops(language_model: torch.nn.Module, hidden_size: int, length: int) -> dict[str, int]:
    """Prefill FLOPs of the Qwen2 decoder layers on a `length`-token sequence, split into attention and MLP."""
    embeds = torch.empty(1, length, hidden_size, device="meta", dtype=torch.bfloat16)
    # A precomputed (empty) mask mapping skips the mask construction, which reads values (impossible on meta);
    # SDPA then runs with is_causal=True, the same FLOPs.
    no_masks = {"full_attention": None, "sliding_attention": None}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        language_model(inputs_embeds=embeds, attention_mask=no_masks, use_cache=False)
    attention = mlp = 0
    for module, counts in counter.get_flop_counts().items():
        if re.search(r"\.layers\.\d+\.self_attn$", module):
            attention += sum(counts.values())
        elif re.search(r"\.layers\.\d+\.mlp$", module):
            mlp += sum(counts.values())
    return {"attention": attention, "mlp": mlp, "total": counter.get_total_flops()}


def fastv_macs(text_config, length: int) -> float:
    """The paper's FastV-style count (multiply-adds): `n (4 d^2 + 2 d m) + 2 n^2 d` per layer."""
    d, m = text_config.hidden_size, text_config.intermediate_size
    return text_config.num_hidden_layers * (length * (4 * d * d + 2 * d * m) + 2 * length * length * d)


def kv_cache_mib(text_config, length: int) -> float:
    """bf16 key/value cache of a `length`-token prompt: 2 tensors x layers x kv heads x head dim x 2 bytes per token."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    per_token = 2 * text_config.num_hidden_layers * text_config.num_key_value_heads * head_dim * 2
    return per_token * length / 2**20


def tower_flops(vision_model: torch.nn.Module, inputs) -> int:
    """FLOPs of the vision tower on every image the model encodes for `inputs` (one packed call, as the model)."""
    grids, merges = [], []
    for key in GRID_KEYS:
        if key in inputs:
            grids.append(inputs[key])
            # Crops and context images are encoded unmerged; global images / frames carry their merge sizes.
            unmerged = torch.ones_like(inputs[key][:, 0])
            merges.append(inputs["image_merge_sizes"] if key == "image_grid_thw" else unmerged)
    grid, merge = torch.cat(grids), torch.cat(merges)
    lengths = grid.prod(-1)
    num_patches = int(lengths.sum())
    pixel_values = torch.empty(
        num_patches, vision_model.config.num_channels * vision_model.config.patch_size**2, device="meta"
    )
    # Rotary positions and segment boundaries are precomputed (values only, no FLOPs) because the tower derives them
    # with .tolist(), which meta tensors do not support; the boundaries stay on the CPU for the same reason.
    position_ids = torch.empty(num_patches, 2, dtype=torch.long, device="meta")
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vision_model(
            pixel_values=pixel_values,
            grid_thw=grid,
            merge_sizes=merge,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
        )
    return counter.get_total_flops()


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per part (tied weights counted once)."""
    backbone = model.model
    parts = {
        "vision_tower": backbone.vision_model,
        "llm": backbone.language_model,
        "object_tokenizer": backbone.object_tokenizer,
    }
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    counts["projector"] = sum(p.numel() for p in backbone.projector.parameters()) if backbone.projector else 0
    counts["oci"] = sum(p.numel() for p in backbone.object_infusion.parameters()) if backbone.object_infusion else 0
    counts["lm_head_untied"] = 0 if model.config.tie_word_embeddings else model.lm_head.weight.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2b,7b", help="comma-separated model sizes (2b, 7b)")
    parser.add_argument(
        "--image-size",
        default="448x616",
        help="HxW of the image setting; 448x616 gives 32x44 = 1408 visual tokens, the paper's DLC-Bench L_Z",
    )
    parser.add_argument("--frame-size", default="720x1280", help="HxW of the video frames (clamped by the budget)")
    parser.add_argument("--frames", type=int, default=20, help="frames of the video setting (HC-STVG: 20)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="2B only, 2 layers, small image and video: checks that the script runs (CI)",
    )
    add_run_arguments(parser)
    args = parse_run_arguments(parser, argv)
    if args.smoke:
        args.image_size, args.frame_size, args.frames, args.sizes = "112x140", "112x140", 3, "2b"
    image_hw = tuple(int(v) for v in args.image_size.split("x"))
    frame_hw = tuple(int(v) for v in args.frame_size.split("x"))
    sizes = args.sizes.split(",")

    tokenizer = build_tiny_tokenizer()
    count_text = QwenTextCounter()
    results = []
    for size in sizes:
        for variant in VARIANTS:
            config = real_config(
                size,
                variant,
                num_layers=2 if args.smoke else None,
                attn_implementation="sdpa",
                image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                region_token_id=tokenizer.convert_tokens_to_ids("<REGION>"),
            )
            with torch.device("meta"):
                model = PixelReferForConditionalGeneration(config)
            processor = processor_for_config(config, tokenizer)
            params = parameter_counts(model)
            for setting in ("image", "video"):
                inputs = make_inputs(processor, setting, variant, image_hw, frame_hw, args.frames)
                counts = token_counts(inputs, processor, count_text)
                length = counts["visual_tokens"] + counts["object_tokens"] + counts["text_tokens"]
                media_length = counts["visual_tokens"] + counts["object_tokens"]
                hidden = config.text_config.hidden_size
                results.append(
                    {
                        "size": size,
                        "variant": variant,
                        "setting": setting,
                        **counts,
                        "llm_tokens": length,
                        "llm_flops": llm_flops(model.model.language_model, hidden, length),
                        "llm_flops_media_only": llm_flops(model.model.language_model, hidden, media_length)["total"],
                        "fastv_macs_media_only": fastv_macs(config.text_config, media_length),
                        "kv_cache_mib_bf16": kv_cache_mib(config.text_config, length),
                        "tower_flops": tower_flops(model.model.vision_model, inputs),
                        "tower_patches": sum(
                            int(inputs[key][:, 1:].prod(-1).sum()) for key in GRID_KEYS if key in inputs
                        ),
                        "parameters": params,
                        "parameter_gib_bf16": params["total"] * 2 / 2**30,
                    }
                )

    rows, ratios = [], []
    by_key = {(r["size"], r["variant"], r["setting"]): r for r in results}
    for r in results:
        paper = PAPER.get((r["size"], r["setting"]))
        rows.append(
            [
                r["size"].upper(),
                r["variant"],
                r["setting"],
                r["visual_tokens"],
                r["object_tokens"],
                r["text_tokens"],
                r["llm_flops"]["attention"] / 1e12,
                r["llm_flops"]["mlp"] / 1e12,
                r["llm_flops"]["total"] / 1e12,
                r["fastv_macs_media_only"] / 1e12,
                (paper[r["variant"] == "pixelrefer-lite"] if paper else "-"),
                r["tower_flops"] / 1e12,
                r["kv_cache_mib_bf16"],
                r["parameter_gib_bf16"],
            ]
        )
    for size in sizes:
        for setting in ("image", "video"):
            full, lite = by_key[(size, "pixelrefer", setting)], by_key[(size, "pixelrefer-lite", setting)]
            ratio = lite["llm_flops"]["total"] / full["llm_flops"]["total"]
            ratio_media = lite["llm_flops_media_only"] / full["llm_flops_media_only"]
            paper = PAPER.get((size, setting))
            target = TARGETS.get((size, setting))
            ratios.append(
                {
                    "size": size,
                    "setting": setting,
                    "lite_over_full": ratio,
                    "lite_over_full_media_only": ratio_media,
                    "paper": paper[1] / paper[0] if paper else None,
                    "target": target,
                    "meets_target": None if target is None else ratio <= target,
                    "meets_target_media_only": None if target is None else ratio_media <= target,
                }
            )
    headers = [
        "size",
        "variant",
        "setting",
        "visual tok",
        "object tok",
        "text tok",
        "LLM attn TFLOPs",
        "LLM MLP TFLOPs",
        "LLM TFLOPs",
        "FastV TMACs (visual+object)",
        "paper TFLOPs",
        "tower TFLOPs",
        "KV cache MiB (bf16)",
        "params GiB (bf16)",
    ]
    table = markdown_table_with_ratios(headers, rows, ratios, image_hw, frame_hw, args.frames)
    payload = {
        "settings": {"image_hw": image_hw, "frame_hw": frame_hw, "frames": args.frames, "smoke": args.smoke},
        "results": results,
        "ratios": ratios,
    }
    write_results("flops", payload, table, args.output_dir)
    return payload


def markdown_table_with_ratios(headers, rows, ratios, image_hw, frame_hw, frames) -> str:
    """The per-model table, then the Lite / full ratios against the paper and the targets."""

    def percent(value) -> str:
        return "-" if value is None else f"{100 * value:.2f}%"

    ratio_rows = [
        [
            r["size"].upper(),
            r["setting"],
            percent(r["lite_over_full"]),
            percent(r["lite_over_full_media_only"]),
            percent(r["paper"]),
            "-" if r["target"] is None else f"<= {percent(r['target'])}",
        ]
        for r in ratios
    ]
    return "\n\n".join(
        [
            f"Image {image_hw[0]}x{image_hw[1]} px; video {frames} frames of {frame_hw[0]}x{frame_hw[1]} px, object on "
            "frame 0. LLM = prefill of the decoder layers (torch FLOPs, 2 per multiply-add).",
            markdown_table(headers, rows),
            "Lite / full LLM FLOPs (with the prompt text; visual + object tokens only, the paper's convention):",
            markdown_table(
                ["size", "setting", "Lite/full", "Lite/full (visual+object only)", "paper", "target"], ratio_rows
            ),
        ]
    )


if __name__ == "__main__":
    main()
