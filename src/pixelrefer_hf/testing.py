"""Tiny, randomly initialised PixelRefer models with a real offline tokenizer, for tests, examples and curiosity.

Nothing here downloads anything: the tokenizer is trained on a built-in corpus (`tokenizer_assets.py`) and the weights
are random, so answers are meaningless but every code path (crops, SAOT, OCI, batching, generation) runs for real.

    >>> from pixelrefer_hf.testing import tiny_model_and_processor
    >>> model, processor = tiny_model_and_processor("pixelrefer-lite")
"""

import torch

from .configuration_pixelrefer import PixelReferConfig
from .image_processing_pixelrefer import PixelReferImageProcessor
from .modeling_pixelrefer import PixelReferForConditionalGeneration
from .processing_pixelrefer import PixelReferProcessor
from .tokenizer_assets import CHAT_TEMPLATE, build_tiny_tokenizer

TINY_VISION_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 14,
}
TINY_TEXT_CONFIG = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 8192,
    # Larger than Qwen's 0.02 so that random logits are well separated and greedy decoding is not decided by
    # rounding noise (batch-vs-single tests compare generated tokens).
    "initializer_range": 0.2,
}
TINY_DEFAULTS = {"num_object_tokens": 8, "oci_num_heads": 2}
# Pieces of text that hostile prompts are made of (the fuzzer and the property tests draw from them): the
# placeholders and tokens the processor writes itself, chat markers, control and non-ASCII characters, a lone
# surrogate.
HOSTILE_TEXT_PIECES = ["<region>", "<image>", "<video>", "<REGION>", "<|im_end|>", "<|im_start|>", "\n", "é", "🙂"]
HOSTILE_TEXT_PIECES += ["\x00", "\ud800"]
# Preprocessing of the tiny models (the rest of the image processor's options keep their released defaults).
TINY_IMAGE_PROCESSOR_OPTIONS = {"max_visual_tokens": 1024}


def config_for_tokenizer(variant: str, tokenizer, text_config: dict, vision_config: dict, **values) -> PixelReferConfig:
    """A PixelRefer config of the given shapes whose vocabulary size and token ids (`<image>`, `<REGION>`, EOS, pad)
    come from `tokenizer`; `values` are further config fields."""
    text_config = {
        **text_config,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return PixelReferConfig(
        variant=variant,
        text_config=text_config,
        vision_config=dict(vision_config),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        region_token_id=tokenizer.convert_tokens_to_ids("<REGION>"),
        **values,
    )


def tiny_config(variant: str = "pixelrefer", tokenizer=None, **overrides) -> PixelReferConfig:
    """A PixelRefer config with 2-layer towers whose token ids come from `tokenizer` (the tiny one by default)."""
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    return config_for_tokenizer(
        variant, tokenizer, TINY_TEXT_CONFIG, TINY_VISION_CONFIG, **{**TINY_DEFAULTS, **overrides}
    )


def processor_for_config(config: PixelReferConfig, tokenizer, **image_processor_options) -> PixelReferProcessor:
    """The processor of a model of ours: the facts `config` owns (variant, object tokens, patch size) plus
    `image_processor_options` (crop scales, budgets, merge sizes; `PixelReferImageProcessorKwargs`).

    Models of our own (tiny test models, the demo checkpoints) take PixelRefer video regions on several frames in the
    timed form (`multi_frame_regions=True`); converted official checkpoints keep the official one-frame rule."""
    image_processor = PixelReferImageProcessor(
        **config.image_processor_kwargs(), **{"multi_frame_regions": True, **image_processor_options}
    )
    return PixelReferProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def tiny_model_and_processor(
    variant: str = "pixelrefer", seed: int = 0, image_processor_options: dict | None = None, **config_overrides
) -> tuple[PixelReferForConditionalGeneration, PixelReferProcessor]:
    """A tiny random `(model, processor)` pair in eval mode. The same seed always gives the same weights, and the
    global torch RNG is left untouched. `config_overrides` reach `PixelReferConfig`, `image_processor_options` the
    image processor (over `TINY_IMAGE_PROCESSOR_OPTIONS`)."""
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(variant, tokenizer, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PixelReferForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    options = {**TINY_IMAGE_PROCESSOR_OPTIONS, **(image_processor_options or {})}
    return model, processor_for_config(config, tokenizer, **options)


__all__ = ["config_for_tokenizer", "processor_for_config", "tiny_config", "tiny_model_and_processor"]
