"""Convert a released PixelRefer / PixelRefer-Lite checkpoint into a `pixelrefer_hf` folder.

    python -m pixelrefer_hf.convert --official PixelRefer-7B --out PixelRefer-7B-hf
    python -m pixelrefer_hf.convert --official PixelRefer-Lite-2B --out PixelRefer-Lite-2B-hf --dtype bfloat16 \
        --push-to-hub my-org/PixelRefer-Lite-2B

The official snapshots (`Alibaba-DAMO-Academy/PixelRefer-{2B,7B}`, `PixelRefer-Lite-{2B,7B}`) hold a `config.json`
with model_type `pixelrefer_qwen2` / `pixelreferlite_qwen2`, pickled `pytorch_model*.bin` weights (or safetensors),
a Qwen2 tokenizer with `<image>` and `<REGION>` added, and a `generation_config.json`. They load only through the
official research package. The output folder loads anywhere with
`AutoModel.from_pretrained(OUT, trust_remote_code=True)` and `AutoProcessor.from_pretrained(OUT, trust_remote_code=True)`.

Every official parameter goes through one explicit, pure key mapping ([`map_official_key`]); loading is strict: a key
that cannot be mapped, a parameter left without a value, or a tensor whose shape contradicts `config.json` stops the
conversion with one error that lists them. Parameters the official model builds but never uses are dropped with a
note. The output is written into a temporary folder next to OUT and renamed at the end, so a failed conversion never
leaves a half-written OUT.

This module is not remote code; it may import anything installed with the package.
"""

import argparse
import json
import logging as std_logging
import re
import shutil
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase, Qwen2Config
from transformers.utils import logging

from .configuration_pixelrefer import PixelReferConfig
from .image_processing_pixelrefer import RESIZE_BACKENDS, PixelReferImageProcessor
from .modeling_pixelrefer import PixelReferForConditionalGeneration
from .pipeline_region_qa import save_with_pipeline
from .processing_pixelrefer import PixelReferProcessor
from .tokenizer_assets import CHAT_TEMPLATE, IMAGE_TOKEN, REGION_TOKEN

logger = logging.get_logger(__name__)

# Official model_type -> our variant.
OFFICIAL_MODEL_TYPES = {"pixelrefer_qwen2": "pixelrefer", "pixelreferlite_qwen2": "pixelrefer-lite"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Official prefix -> our prefix, for the keys that are renamed one to one (leaf names are identical).
_COMMON_RENAMES = (
    ("model.vision_encoder.vision_encoder.", "model.vision_model."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("model.region_encoder.pos_linear.", "model.object_tokenizer.position_embedding."),
    # nn.Sequential(Linear, GELU, Linear): indices 0 and 2 hold the parameters, in both layouts.
    ("model.region_encoder.feat_linear.", "model.object_tokenizer.projector.readout."),
    ("lm_head.", "lm_head."),
)
_PIXELREFER_RENAMES = (("model.mm_projector.readout.", "model.projector.readout."),)
_LITE_RENAMES = (
    ("model.region_encoder.fusion_attention_local.out_proj.", "model.object_infusion.local_attention.out_proj."),
    ("model.region_encoder.fusion_attention_global.out_proj.", "model.object_infusion.global_attention.out_proj."),
    ("model.region_encoder.ln_local.", "model.object_infusion.local_norm."),
    ("model.region_encoder.ln_global.", "model.object_infusion.global_norm."),
)
# nn.MultiheadAttention packs q, k, v into one `in_proj_{weight,bias}` of 3 * dim rows; ours are three Linears.
_LITE_PACKED_ATTENTION = re.compile(r"^model\.region_encoder\.fusion_attention_(local|global)\.in_proj_(weight|bias)$")
# Official parameters that the official forward never reads: dropped, with the reason logged once per prefix.
DROPPED_PREFIXES = {
    "pixelrefer": {},
    "pixelrefer-lite": {
        "model.mm_projector.": "PixelRefer-Lite builds the global projector but never calls it (no global tokens)",
        "model.region_encoder.mask_embedding.": "the mask embedding convolution is defined but never used",
    },
}

# Fields of the official (Qwen2Config subclass) config.json that describe the language model.
_TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
)
_REQUIRED_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# Fields of the official `vision_encoder_config` (DAMOVLVisionConfig) that `VideoLlama3VisionConfig` shares.
_VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
)
_REQUIRED_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size")

# Model cards shipped in the source tree, by (variant, LLM width): Qwen2.5-1.5B is 1536 wide, Qwen2.5-7B 3584.
MODEL_CARD_NAMES = {
    ("pixelrefer", 1536): "PixelRefer-2B",
    ("pixelrefer", 3584): "PixelRefer-7B",
    ("pixelrefer-lite", 1536): "PixelRefer-Lite-2B",
    ("pixelrefer-lite", 3584): "PixelRefer-Lite-7B",
}
# The repo id the cards' usage snippets load; replaced by the --push-to-hub repo when one is given.
CARD_REPO_PREFIX = "pixelrefer-hf/"


class ConversionError(ValueError):
    """An official snapshot that cannot be converted; the message says what was expected and what was found."""


# ---------------------------------------------------------------------------------------------------------------------
# Key mapping (pure)
# ---------------------------------------------------------------------------------------------------------------------


def map_official_key(key: str, variant: str) -> tuple[str, ...] | None:
    """Where an official parameter goes in `PixelReferForConditionalGeneration`.

    Args:
        key: an official state-dict key, e.g. `model.vision_encoder.vision_encoder.post_layernorm.weight`.
        variant: `"pixelrefer"` or `"pixelrefer-lite"`.

    Returns:
        `(our_key,)` for a rename; three keys `(q, k, v)` when the official tensor packs them along dim 0 and must be
        split in three equal parts (Lite's `nn.MultiheadAttention.in_proj_*`); `()` for a parameter the official model
        never uses (see `DROPPED_PREFIXES`); `None` when the key is unknown for this variant.
    """
    if any(key.startswith(prefix) for prefix in DROPPED_PREFIXES[variant]):
        return ()
    renames = _COMMON_RENAMES + (_LITE_RENAMES if variant == "pixelrefer-lite" else _PIXELREFER_RENAMES)
    if variant == "pixelrefer-lite":
        packed = _LITE_PACKED_ATTENTION.match(key)
        if packed:
            scope, kind = packed.groups()
            return tuple(f"model.object_infusion.{scope}_attention.{name}_proj.{kind}" for name in ("q", "k", "v"))
    for official_prefix, our_prefix in renames:
        if key.startswith(official_prefix):
            return (our_prefix + key[len(official_prefix) :],)
    return None


def dropped_reason(key: str, variant: str) -> str | None:
    """The reason an official key is dropped, or `None` if it is kept."""
    for prefix, reason in DROPPED_PREFIXES[variant].items():
        if key.startswith(prefix):
            return reason
    return None


def convert_state_dict(
    official: Mapping[str, torch.Tensor], variant: str
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Map an official state dict (or one shard of it) through [`map_official_key`].

    Returns:
        `converted` (our key -> tensor), `origin` (our key -> the official key it came from, for error messages) and
        `unmapped` (official keys without a destination). Dropped keys appear in none of them.
    """
    converted: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmapped: list[str] = []
    for key, tensor in official.items():
        targets = map_official_key(key, variant)
        if targets is None:
            unmapped.append(key)
        elif len(targets) == 1:
            converted[targets[0]] = tensor
            origin[targets[0]] = key
        elif len(targets) == 3:
            if tensor.shape[0] % 3 != 0:
                raise ConversionError(
                    f"Expected the packed q/k/v tensor {key!r} to have a first dimension divisible by 3, found shape "
                    f"{tuple(tensor.shape)}."
                )
            # (3 * dim, ...) -> three (dim, ...) blocks in q, k, v order, as nn.MultiheadAttention packs them; cloned
            # because safetensors refuses to save views that share one storage.
            for target, part in zip(targets, tensor.chunk(3, dim=0)):
                converted[target] = part.clone()
                origin[target] = key
    return converted, origin, unmapped


# ---------------------------------------------------------------------------------------------------------------------
# Reading the official snapshot
# ---------------------------------------------------------------------------------------------------------------------


def read_official_config(folder: Path) -> dict:
    """The official `config.json` as a dict, after checking that `folder` is an official snapshot."""
    if not folder.is_dir():
        raise ConversionError(f"Expected an official PixelRefer snapshot folder, found no folder at {folder}.")
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(
            f"Expected an official PixelRefer snapshot folder with a config.json, found none in {folder}."
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"Expected valid JSON in {path}, found a parse error: {error}.") from error
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in OFFICIAL_MODEL_TYPES:
        raise ConversionError(
            f"Expected model_type {' or '.join(map(repr, OFFICIAL_MODEL_TYPES))} in {path} (an official PixelRefer "
            f"snapshot), found {model_type!r}."
        )
    return config


def detect_variant(official_config: Mapping, requested: str = "auto") -> str:
    """The variant the official config describes; `requested` (other than `"auto"`) must agree with it."""
    found = OFFICIAL_MODEL_TYPES[official_config["model_type"]]
    if requested not in ("auto", found):
        raise ConversionError(
            f"Expected a {requested} checkpoint (--variant {requested}), found model_type "
            f"{official_config['model_type']!r}, which is {found}."
        )
    return found


def check_inside_snapshot(folder: Path, path: Path) -> Path:
    """`path`, after checking that it (symlinks followed) lies inside the snapshot `folder`, or in the `blobs`
    folder of the Hugging Face cache when `folder` is a cached `snapshots/<revision>` (whose files are links there).
    A shard named `../../secret` in an index, or a link out of the snapshot, is refused."""
    root = folder.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    target = path.resolve()
    if not any(target.is_relative_to(place) for place in allowed):
        raise ConversionError(
            f"Expected the weight file {path.name!r} to lie inside the snapshot {folder}, found it pointing to "
            f"{target} (outside the snapshot); refusing to read it."
        )
    return path


def official_weight_files(folder: Path) -> list[Path]:
    """The weight files of a snapshot, in shard order. Prefers safetensors; an index names the shards. Every file
    must lie inside the snapshot (`check_inside_snapshot`)."""
    return [check_inside_snapshot(folder, path) for path in _official_weight_files(folder)]


def _official_weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = folder / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ConversionError(
                    f"Expected a JSON object with a 'weight_map' in {index_path}, found {type(error).__name__}: {error}."
                ) from error
            if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
                raise ConversionError(f"Expected a 'weight_map' of tensor names to file names in {index_path}.")
            names = sorted(set(weight_map.values()))
            missing = [name for name in names if not (folder / name).is_file()]
            if missing:
                raise ConversionError(
                    f"Expected every shard named in {index_path.name} to be in {folder}, found {len(missing)} missing: "
                    f"{', '.join(missing)}."
                )
            return [folder / name for name in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    shards = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not shards:
        raise ConversionError(
            f"Expected weights in {folder} (pytorch_model*.bin or *.safetensors, optionally with an index), found none."
        )
    return shards


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """One weight file, on the CPU. Pickled `.bin` files are read with `weights_only=True` (no code execution)."""
    kind = "safetensors" if path.suffix == ".safetensors" else "PyTorch"
    try:
        if path.suffix == ".safetensors":
            return load_file(path, device="cpu")
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    # A damaged file surfaces as whatever the zip reader, the restricted unpickler or safetensors trips on (OSError,
    # RuntimeError, EOFError, IndexError, UnpicklingError, SafetensorError, ...): all mean the same thing here.
    except Exception as error:
        detail = str(error).splitlines()[0] if str(error) else ""
        raise ConversionError(
            f"Expected a complete {kind} weight file at {path}, found a file that cannot be read (corrupted or "
            f"truncated?): {type(error).__name__}: {detail}"
        ) from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConversionError(f"Expected a state dict of tensors in {path}, found a {type(state_dict).__name__}.")
    return state_dict


def iter_official_weights(files: list[Path]) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the state dict of each shard in turn, with a progress bar."""
    for path in tqdm(files, desc="Reading official shards", unit="shard", disable=len(files) < 2):
        yield load_weight_file(path)


def load_official_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The snapshot's tokenizer, checked for the `<image>` and `<REGION>` special tokens."""
    try:
        # The official config is a Qwen2Config subclass of a model_type transformers does not know: hand AutoTokenizer
        # the base config, which is what the tokenizer belongs to (its class is named in tokenizer_config.json anyway).
        tokenizer = AutoTokenizer.from_pretrained(folder, config=Qwen2Config())
    except (OSError, ValueError, TypeError) as error:
        raise ConversionError(
            f"Expected Qwen2 tokenizer files (tokenizer.json or vocab.json + merges.txt) in {folder}, found none that "
            f"load: {str(error).splitlines()[0]}"
        ) from error
    vocab = tokenizer.get_vocab()
    missing = [token for token in (IMAGE_TOKEN, REGION_TOKEN) if token not in vocab]
    if missing:
        raise ConversionError(
            f"Expected the tokenizer in {folder} to hold the special tokens {IMAGE_TOKEN} and {REGION_TOKEN} (added by "
            f"PixelRefer training), found none for {', '.join(missing)}."
        )
    # The converted processor is generation-first: a padded batch must equal single calls, which needs left padding
    # (the training collator asks for right padding itself).
    tokenizer.padding_side = "left"
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


def convert_config(
    official: Mapping, tokenizer: PreTrainedTokenizerBase, variant: str, dtype: torch.dtype | None = None
) -> PixelReferConfig:
    """Build our `PixelReferConfig` from the official `config.json` and the snapshot's tokenizer.

    The Qwen2 fields become `text_config`; `vision_encoder_config` becomes a `VideoLlama3VisionConfig`; `mask_num`
    is n; `mm_max_length` the visual token budget. Token ids come from the tokenizer (the official code re-derives them
    from it at inference too). The legacy flags stay on: the released weights were trained with those quirks.
    """
    missing = [name for name in _REQUIRED_TEXT_FIELDS if name not in official]
    vision = official.get("vision_encoder_config")
    if not isinstance(vision, Mapping):
        missing.append("vision_encoder_config")
    else:
        missing += [f"vision_encoder_config.{name}" for name in _REQUIRED_VISION_FIELDS if name not in vision]
    if missing:
        raise ConversionError(f"Expected the official config.json to define {', '.join(missing)}, found them missing.")
    # Null fields (rope_scaling, sliding_window) are left to Qwen2Config's defaults.
    text_config = {"model_type": "qwen2"}
    text_config.update({name: official[name] for name in _TEXT_FIELDS if official.get(name) is not None})
    text_config["pad_token_id"] = tokenizer.pad_token_id
    vision_config = {name: vision[name] for name in _VISION_FIELDS if name in vision}

    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    region_token_id = tokenizer.convert_tokens_to_ids(REGION_TOKEN)
    for name, official_name, token_id in (
        ("image_token_id", "image_token_index", image_token_id),
        ("region_token_id", "region_token_index", region_token_id),
    ):
        if token_id >= official["vocab_size"]:
            raise ConversionError(
                f"Expected the tokenizer's {name} to be below the config's vocab_size {official['vocab_size']}, found "
                f"{token_id}."
            )
        if official.get(official_name) not in (None, token_id):
            logger.warning(
                f"config.json says {official_name}={official[official_name]} but the tokenizer gives {token_id}; using "
                "the tokenizer's id, as the official inference code does."
            )
    values = {
        "variant": variant,
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_id": image_token_id,
        "region_token_id": region_token_id,
        "num_object_tokens": official.get("mask_num", 32),
        "legacy_box_position": True,
        "tie_word_embeddings": bool(official.get("tie_word_embeddings", False)),
    }
    config = PixelReferConfig(**values)
    if dtype is not None:
        config.dtype = dtype
        config.text_config.dtype = dtype
        config.vision_config.dtype = dtype
    return config


def resolve_dtype(requested: str, official_config: Mapping) -> torch.dtype:
    """`auto` keeps the checkpoint's `torch_dtype` (float32 when it states none)."""
    if requested != "auto":
        return DTYPES[requested]
    stated = official_config.get("torch_dtype") or official_config.get("dtype") or "float32"
    if stated not in DTYPES:
        raise ConversionError(
            f"Expected torch_dtype in config.json to be one of {', '.join(DTYPES)}, found {stated!r}; pass --dtype."
        )
    return DTYPES[stated]


def build_image_processor(
    config: PixelReferConfig, official_config: Mapping, folder: Path, resize_backend: str = "opencv"
) -> PixelReferImageProcessor:
    """Our image processor for `config`: the preprocessing constants of the official `config.json` (visual token
    budget, video merge, token compression; the other constants and the variant's defaults are the released ones),
    with image mean/std and min_pixels from the snapshot's `preprocessor_config.json` when it has one (the official
    code reads them from the tower's preprocessor).

    `resize_backend="opencv"` (the default) resizes crops, context images and Lite patch masks with OpenCV like the
    official code, so the converted checkpoint sees exactly the inputs the released weights were trained on.
    """
    max_visual_tokens = official_config.get("mm_max_length", 8192)
    kwargs = {
        **config.image_processor_kwargs(),
        "max_visual_tokens": max_visual_tokens,
        "video_merge_size": official_config.get("spatial_merge_size", 2),
        "use_token_compression": official_config.get("use_token_compression", True),
        "resize_backend": resize_backend,
    }
    path = folder / "preprocessor_config.json"
    if path.is_file():
        official = json.loads(path.read_text())
        for name in ("image_mean", "image_std"):
            if name in official:
                kwargs[name] = official[name]
        if "min_pixels" in official:
            kwargs["size"] = {
                "shortest_edge": official["min_pixels"],
                "longest_edge": max_visual_tokens * config.vision_config.patch_size**2,
            }
    return PixelReferImageProcessor(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------------------


def _list_for_error(items: list[str], limit: int = 8) -> str:
    """`a, b, c and 5 more`: keeps an error about a 7B checkpoint on one readable line."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def collect_state_dict(
    files: list[Path], variant: str, config: PixelReferConfig, expected: Mapping[str, torch.Size], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Read, map, cast and check every shard; return our state dict, exactly matching `expected` (name -> shape).

    Raises one `ConversionError` listing every unmapped key, every parameter left without a value and every shape that
    contradicts `config.json`.
    """
    converted: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmapped: list[str] = []
    dropped: dict[str, int] = {}
    for shard in iter_official_weights(files):
        for key in shard:
            reason = dropped_reason(key, variant)
            if reason is not None:
                dropped[reason] = dropped.get(reason, 0) + 1
        shard_converted, shard_origin, shard_unmapped = convert_state_dict(shard, variant)
        for key, tensor in shard_converted.items():
            converted[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        origin.update(shard_origin)
        unmapped += shard_unmapped
    for reason, count in dropped.items():
        logger.info(f"Dropped {count} official parameter(s): {reason}.")

    if config.tie_word_embeddings and "lm_head.weight" in converted:
        # A pickled tied model stores the shared matrix under both names; it must really be the same matrix.
        embeddings = converted.get("model.language_model.embed_tokens.weight")
        if embeddings is None or not torch.equal(converted["lm_head.weight"], embeddings):
            raise ConversionError(
                "Expected lm_head.weight to equal model.embed_tokens.weight (config.json sets tie_word_embeddings), "
                "found different matrices; fix tie_word_embeddings in config.json."
            )
        del converted["lm_head.weight"]

    problems = []
    if unmapped:
        problems.append(
            f"{len(unmapped)} official key(s) with no place in the {variant} model: {_list_for_error(unmapped)}"
        )
    missing = [key for key in expected if key not in converted]
    if missing:
        problems.append(f"{len(missing)} parameter(s) left without a value: {_list_for_error(missing)}")
    unexpected = [origin[key] for key in converted if key not in expected]
    if unexpected:
        problems.append(
            f"{len(unexpected)} official key(s) mapped to names the {variant} model does not have: "
            f"{_list_for_error(unexpected)}"
        )
    mismatched = [
        f"{origin[key]} is {tuple(converted[key].shape)} but config.json gives {key} {tuple(expected[key])}"
        for key in converted
        if key in expected and converted[key].shape != expected[key]
    ]
    if mismatched:
        problems.append(f"config.json sizes contradict the weights: {_list_for_error(mismatched, limit=4)}")
    if problems:
        raise ConversionError("Expected every official parameter to load strictly, found " + "; ".join(problems) + ".")
    return converted


def expected_parameters(config: PixelReferConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor our model saves for `config` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = PixelReferForConditionalGeneration(config)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {key: tensor.shape for key, tensor in state.items()}


def model_card_text(variant: str, config: PixelReferConfig, card: Path | None, repo_id: str | None) -> str:
    """The README.md of the output: the card given, else the shipped card of this released variant, else a short
    generated card. The usage snippets' repo id becomes `repo_id` when one is given."""
    if card is None:
        name = MODEL_CARD_NAMES.get((variant, config.text_config.hidden_size))
        shipped = Path(__file__).resolve().parents[2] / "model_cards" / f"{name}.md"
        if name is not None and shipped.is_file():
            card = shipped
    if card is not None:
        text = card.read_text()
        if repo_id is not None:
            text = re.sub(re.escape(CARD_REPO_PREFIX) + r"PixelRefer(-Lite)?-[27]B", repo_id, text)
        return text
    logger.warning("No model card matches this checkpoint; writing a short generated one.")
    name = "PixelRefer-Lite" if variant == "pixelrefer-lite" else "PixelRefer"
    return (
        "---\nlicense: apache-2.0\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n"
        "tags:\n- pixelrefer\n- region-understanding\n- custom_code\n---\n\n"
        f"# {name} (converted with pixelrefer_hf)\n\n"
        "Load with `AutoModel.from_pretrained(path, trust_remote_code=True)` and "
        "`AutoProcessor.from_pretrained(path, trust_remote_code=True)`. Paper: https://arxiv.org/abs/2510.23603\n"
    )


def convert_checkpoint(
    official_dir: str | Path,
    out_dir: str | Path,
    variant: str = "auto",
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    model_card: str | Path | None = None,
    push_to_hub: str | None = None,
    overwrite: bool = False,
    resize_backend: str = "opencv",
) -> Path:
    """Convert an official snapshot folder into a `pixelrefer_hf` folder (see the module docstring).

    Args:
        official_dir: the official snapshot (config.json, weights, tokenizer, generation_config.json).
        out_dir: the folder to create. It must not exist unless `overwrite` is set.
        variant: `"auto"` (from the official model_type), `"pixelrefer"` or `"pixelrefer-lite"` (checked).
        dtype: `"auto"` (the checkpoint's torch_dtype), `"float32"`, `"bfloat16"` or `"float16"`.
        max_shard_size: safetensors shards are split above this size.
        model_card: a README.md to use instead of the shipped card of the variant.
        push_to_hub: upload the finished folder to this model repo.
        overwrite: replace a non-empty `out_dir`.
        resize_backend: the processor's `resize_backend`; `"opencv"` reproduces the official preprocessing exactly,
            `"numpy"` approximates it (crops within one grey level) without OpenCV.

    Returns:
        The output folder.
    """
    official_dir, out_dir = Path(official_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConversionError(f"Expected {out_dir} to be absent or empty, found files in it; pass --overwrite.")
    official_config = read_official_config(official_dir)
    variant = detect_variant(official_config, variant)
    torch_dtype = resolve_dtype(dtype, official_config)
    files = official_weight_files(official_dir)
    tokenizer = load_official_tokenizer(official_dir)
    config = convert_config(official_config, tokenizer, variant, torch_dtype)
    state_dict = collect_state_dict(files, variant, config, expected_parameters(config), torch_dtype)

    # A weightless model: it only carries the config, the generation config and the remote code into save_pretrained,
    # which writes `state_dict`. Its dtype becomes the `dtype` recorded in config.json.
    with torch.device("meta"):
        model = PixelReferForConditionalGeneration(config).to(torch_dtype)
    if (official_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(official_dir)
    else:
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
        )
    # Stated in the file, so that `generate(..., repetition_penalty_scope="all")` can switch to transformers' usual
    # behaviour; "generated" is what the official inference does (the model's default when the field is absent).
    model.generation_config.repetition_penalty_scope = "generated"
    processor = PixelReferProcessor(
        image_processor=build_image_processor(config, official_config, official_dir, resize_backend),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        # With the region-qa pipeline's code: a converted folder pushed to the hub answers through
        # `pipeline("region-qa", model=repo, trust_remote_code=True)` where this package is not installed.
        save_with_pipeline(model, processor, staging, state_dict=state_dict, max_shard_size=max_shard_size)
        (staging / "README.md").write_text(
            model_card_text(variant, config, Path(model_card) if model_card else None, push_to_hub)
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    logger.info(f"Wrote the converted {variant} checkpoint to {out_dir}.")

    if push_to_hub is not None:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=push_to_hub,
            folder_path=out_dir,
            repo_type="model",
            commit_message=f"Add {variant} converted with pixelrefer_hf",
        )
        logger.info(f"Uploaded {out_dir} to https://huggingface.co/{push_to_hub}.")
    return out_dir


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The `convert` command line (also reached as `pixelrefer convert`)."""
    parser = argparse.ArgumentParser(
        prog="pixelrefer convert",
        description="Convert a released PixelRefer / PixelRefer-Lite snapshot into a transformers folder that loads "
        "with trust_remote_code=True.",
    )
    parser.add_argument("--official", required=True, help="folder of the official snapshot (e.g. a hub download)")
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--variant", choices=("auto", "pixelrefer", "pixelrefer-lite"), default="auto")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto keeps the checkpoint's dtype")
    parser.add_argument("--max-shard-size", default="5GB", help="split safetensors shards above this size")
    parser.add_argument("--model-card", default=None, help="README.md to use instead of the shipped card")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the result to this model repo")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument(
        "--resize-backend",
        choices=RESIZE_BACKENDS,
        default="opencv",
        help="how the processor resizes crops and context images: opencv reproduces the official preprocessing "
        "exactly (default); numpy approximates it to within one grey level",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the converter; returns the process exit status (0 on success, 1 on a conversion error)."""
    args = build_parser().parse_args(argv)
    # Show this module's notes (dropped parameters, where the output went) without raising transformers' verbosity.
    std_logging.basicConfig(level=std_logging.INFO, format="%(message)s")
    try:
        # Every option of the parser is a keyword of convert_checkpoint under the same name.
        options = {name: value for name, value in vars(args).items() if name not in ("official", "out")}
        convert_checkpoint(args.official, args.out, **options)
    except ConversionError as error:
        sys.stderr.write(f"error: {error}\n")
        return 1
    return 0


__all__ = [
    "ConversionError",
    "build_parser",
    "convert_checkpoint",
    "convert_config",
    "convert_state_dict",
    "main",
    "map_official_key",
]


if __name__ == "__main__":
    sys.exit(main())
