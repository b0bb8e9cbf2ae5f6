"""PixelRefer and PixelRefer-Lite: region-level multimodal LLMs (arXiv 2510.23603).

* Vision tower: transformers' native VideoLLaMA3 NaViT SigLIP (`VideoLlama3VisionModel`), one packed call per batch.
* Scale-Adaptive Object Tokenizer (SAOT, `PixelReferObjectTokenizer`): the processor crops every object at a scale that
  makes its mask cover a useful number of patches; the tower encodes the crops, a learned embedding of the crop's
  position in the frame is added, the patches inside the mask are gathered and reduced to at most n tokens by k-means
  (vectorised over all regions of a batch, deterministic, batch-invariant), and an MLP maps them to the LLM width.
* Object-Centric Infusion (OCI, `PixelReferObjectCentricInfusion`, Lite only): each object's n tokens cross-attend to a
  224x224 re-encode of its context crop, then to a 336x336 re-encode of the whole frame, with pre-LN residuals.
* Vision-Object (`variant="pixelrefer"`): projected global image/frame tokens fill `<image>` slots and object tokens
  fill `<REGION>` slots. Object-Only (`"pixelrefer-lite"`): the LLM sees only object tokens.
* LLM: transformers' native `Qwen2Model`.

All image and region merging lives in the backbone `PixelReferModel`, because TRL's SFTTrainer calls the backbone
directly. The processor expands placeholders to exactly the number of tokens produced here; the model checks the counts.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, Qwen2Model
from transformers.cache_utils import Cache
from transformers.generation import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.video_llama_3.modeling_video_llama_3 import (
    VideoLlama3Projector,
    VideoLlama3VisionModel,
    eager_attention_forward,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, is_flash_attn_2_available, logging
from transformers.utils.generic import is_flash_attention_requested

from .configuration_pixelrefer import PixelReferConfig

logger = logging.get_logger(__name__)

# `forward` arguments that only the first (prefill) step of `generate` needs, by name prefix: images, crops and
# context images; later steps reuse the KV cache.
MULTIMODAL_INPUT_PREFIXES = ("pixel_values", "image_", "region_")
# Generation-only keyword: the prompt embeddings (visual and object tokens in place) of an expanded batch, kept for
# decoding without a KV cache.
PROMPT_EMBEDS_KEY = "multimodal_prompt_embeds"


@dataclass
class PixelReferModelOutputWithPast(ModelOutput):
    r"""
    Output of [`PixelReferModel`].

    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        Hidden states of the last LLM layer.
    past_key_values (`Cache`, *optional*): the LLM key/value cache, returned when `use_cache=True`.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*): LLM hidden states of every layer.
    attentions (`tuple(torch.FloatTensor)`, *optional*): LLM attention weights of every layer.
    image_hidden_states (`torch.FloatTensor` of shape `(num_image_tokens, hidden_size)`, *optional*):
        Projected global visual tokens written into the `<image>` slots (PixelRefer only).
    object_hidden_states (`torch.FloatTensor` of shape `(num_object_tokens, hidden_size)`, *optional*):
        Object tokens written into the `<REGION>` slots, in sequence order.
    """

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    object_hidden_states: torch.FloatTensor | None = None


@dataclass
class PixelReferCausalLMOutputWithPast(ModelOutput):
    r"""
    Output of [`PixelReferForConditionalGeneration`].

    loss (`torch.FloatTensor` of shape `()`, *optional*): next-token loss, returned when `labels` is given.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`): LM head scores.
    past_key_values, hidden_states, attentions, image_hidden_states, object_hidden_states:
        As in [`PixelReferModelOutputWithPast`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    object_hidden_states: torch.FloatTensor | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Helpers on packed (ragged) tensors
# ---------------------------------------------------------------------------------------------------------------------


def segment_ids(lengths: torch.Tensor) -> torch.Tensor:
    """`[3, 2] -> [0, 0, 0, 1, 1]`: the segment each element of a packed tensor belongs to."""
    return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)


def positions_in_segment(lengths: torch.Tensor) -> torch.Tensor:
    """`[3, 2] -> [0, 1, 2, 0, 1]`: the offset of each element of a packed tensor inside its segment."""
    starts = torch.cumsum(lengths, 0) - lengths
    return torch.arange(int(lengths.sum()), device=lengths.device) - torch.repeat_interleave(starts, lengths)


def relative_box_positions(
    grid_hw: torch.Tensor, boxes: torch.Tensor, image_sizes: torch.Tensor, legacy: bool
) -> torch.Tensor:
    """Normalised frame coordinates of every crop patch, the input of SAOT's position embedding.

    Args:
        grid_hw: `(num_crops, 2)` patch grid `(h, w)` of each crop.
        boxes: `(num_crops, 4)` crop box `(top, left, bottom, right)` in frame pixels.
        image_sizes: `(num_crops, 2)` frame size `(H, W)`.
        legacy: reproduce the released weights' mapping, in which the box extents and offsets are transposed
            (channel 0 walks the columns but is scaled by the row extent and offset by the top row).

    Returns:
        `(sum_i h_i * w_i, 2)` float32, raster order inside each crop; channel 0 varies along columns, channel 1 along
        rows, as in the official code.
    """
    grid_hw, boxes, image_sizes = grid_hw.long(), boxes.float(), image_sizes.float()
    lengths = grid_hw[:, 0] * grid_hw[:, 1]
    crop = segment_ids(lengths)
    offset = positions_in_segment(lengths)
    h, w = grid_hw[crop, 0], grid_hw[crop, 1]
    row, col = offset // w, offset % w
    top, left, bottom, right = boxes[crop].unbind(-1)
    if legacy:
        col_extent, col_start, row_extent, row_start = bottom - top, top, right - left, left
    else:
        col_extent, col_start, row_extent, row_start = right - left, left, bottom - top, top
    # Same operation order as the official code, so converted weights see bit-identical inputs.
    frame_h, frame_w = image_sizes[crop, 0], image_sizes[crop, 1]
    x = ((col.float() / w.float()) * col_extent + col_start) / (frame_w - 1).clamp(min=1)
    y = ((row.float() / h.float()) * row_extent + row_start) / (frame_h - 1).clamp(min=1)
    return torch.stack([x, y], dim=-1)


def _hash_scores(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded pseudo-random score per integer position, stateless so that it does not depend on the batch.

    32-bit integer mixing (multiply by odd constants, xor-shift) is a bijection, so distinct positions get distinct
    scores and `topk` never meets ties. Values stay below 2**59, so int64 arithmetic never overflows.
    """
    mask32 = 0xFFFFFFFF
    x = (positions.long() * 0x9E3779B1 + (seed & mask32) * 0x85EBCA77 + 0x165667B1) & mask32
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * 0x045D9F3B) & mask32
    return x ^ (x >> 16)


def kmeans_object_tokens(
    tokens: torch.Tensor,
    valid: torch.Tensor,
    num_clusters: int,
    num_iterations: int,
    tolerance: float = 1e-6,
    init: str = "linspace",
    seed: int = 0,
    init_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batched k-means that reduces every object's patch tokens to `num_clusters` centroids.

    Every row of `tokens` is an independent problem; nothing in one row influences another, so an object gets the
    same centroids alone or among others. Each row follows the official algorithm: Euclidean assignment, centroid =
    mean of its members, an empty cluster keeps its previous centroid, and a row stops (keeping its previous
    centroids) once no centroid moved by more than `tolerance` (with `torch.allclose`'s default relative term).

    Args:
        tokens: `(num_objects, max_tokens, dim)` float, zero-padded.
        valid: `(num_objects, max_tokens)` bool; every row must have more than `num_clusters` valid tokens.
        init_indices: optional `(num_objects, num_clusters)` initial token indices, overriding `init` (parity tests).

    Returns:
        `(num_objects, num_clusters, dim)` centroids, in the order of their initial tokens.
    """
    num_objects, max_tokens, dim = tokens.shape
    counts = valid.sum(-1)
    if init_indices is None:
        if init == "linspace":
            # Evenly spaced in raster order: distinct because counts > num_clusters.
            steps = torch.arange(num_clusters, device=tokens.device)
            init_indices = (steps[None, :] * counts[:, None]) // num_clusters
        else:
            scores = _hash_scores(torch.arange(max_tokens, device=tokens.device), seed).expand(num_objects, -1)
            scores = scores.masked_fill(~valid, torch.iinfo(torch.int64).max)
            init_indices = torch.topk(scores, num_clusters, dim=-1, largest=False).indices
    centroids = torch.gather(tokens, 1, init_indices[..., None].expand(-1, -1, dim))

    # Flat views for the update: sums per (object, cluster) with index_add_, whose accumulation order follows the
    # token order inside each object, so results do not depend on the other objects.
    object_of_token = torch.arange(num_objects, device=tokens.device)[:, None].expand(-1, max_tokens)[valid]
    flat_tokens = tokens[valid]
    active = torch.ones(num_objects, dtype=torch.bool, device=tokens.device)
    for _ in range(num_iterations):
        # argmin_c |x - c|^2 = argmin_c (|c|^2 - 2 x.c): |x|^2 is the same for every cluster, so it is left out, and
        # no dense (tokens, clusters, dim) difference tensor is built. (num_objects, max_tokens, num_clusters):
        scores = centroids.pow(2).sum(-1)[:, None, :] - 2 * torch.bmm(tokens, centroids.transpose(1, 2))
        assignment = scores.argmin(-1)[valid]
        cluster = object_of_token * num_clusters + assignment
        sums = torch.zeros(num_objects * num_clusters, dim, dtype=tokens.dtype, device=tokens.device)
        sums.index_add_(0, cluster, flat_tokens)
        sizes = torch.bincount(cluster, minlength=num_objects * num_clusters).to(tokens.dtype)
        new_centroids = torch.where(
            sizes[:, None] > 0, sums / sizes.clamp(min=1)[:, None], centroids.reshape(-1, dim)
        ).view(num_objects, num_clusters, dim)
        converged = ((centroids - new_centroids).abs() <= tolerance + 1e-5 * new_centroids.abs()).flatten(1).all(-1)
        update = active & ~converged
        centroids = torch.where(update[:, None, None], new_centroids, centroids)
        active = update
        if not bool(active.any()):
            break
    return centroids


# ---------------------------------------------------------------------------------------------------------------------
# SAOT and OCI
# ---------------------------------------------------------------------------------------------------------------------


class PixelReferObjectTokenizer(nn.Module):
    """Scale-Adaptive Object Tokenizer: crop features + position -> masked patches -> k-means -> MLP."""

    def __init__(self, config: PixelReferConfig):
        super().__init__()
        self.num_object_tokens = config.num_object_tokens
        self.kmeans_iterations = config.kmeans_iterations
        self.kmeans_tolerance = config.kmeans_tolerance
        self.kmeans_init = config.kmeans_init
        self.kmeans_seed = config.kmeans_seed
        self.legacy_box_position = config.legacy_box_position
        # Relative position of each crop patch in its frame (x, y) -> vision width, added before pooling.
        self.position_embedding = nn.Linear(2, config.vision_config.hidden_size)
        # vision width -> LLM width -> LLM width (official `feat_linear`); same layout as the global projector.
        self.projector = VideoLlama3Projector(config)

    def aggregate(
        self,
        crop_features: torch.Tensor,
        grid_thw: torch.Tensor,
        patch_masks: torch.Tensor,
        boxes: torch.Tensor,
        image_sizes: torch.Tensor,
        init_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduce every crop to at most n vision-width tokens.

        Args:
            crop_features: `(sum_i h_i * w_i, vision_hidden)` tower output of the crops, raster order.
            grid_thw: `(num_crops, 3)`; patch_masks: `(sum_i h_i * w_i,)` in {0, 1}, aligned with `crop_features`.
            boxes, image_sizes: see [`relative_box_positions`].
            init_indices: optional k-means initial indices `(num_clustered_crops, n)` of the crops with more than n
                masked patches, in crop order (parity tests).

        Returns:
            `tokens` `(num_crops, n, vision_hidden)` float32, zero where a crop has fewer than n masked patches, and
            `valid` `(num_crops, n)` bool marking the real tokens (always leading).
        """
        n = self.num_object_tokens
        grid_hw = grid_thw[:, 1:]
        positions = relative_box_positions(grid_hw, boxes, image_sizes, self.legacy_box_position)
        features = crop_features + self.position_embedding(positions.to(crop_features.dtype))
        # Pooling and k-means run in float32 whatever the model dtype (bf16 distances would reorder assignments).
        features = features.float()

        crop_of_patch = segment_ids(grid_hw.prod(-1))
        selected = patch_masks > 0
        crop_of_token = crop_of_patch[selected]
        num_tokens = torch.bincount(crop_of_token, minlength=len(grid_thw))
        if bool((num_tokens == 0).any()):
            empty = torch.nonzero(num_tokens == 0).flatten().tolist()
            raise ValueError(
                f"Object crops {empty} have an empty patch mask; the processor should never produce one (regions are "
                "numbered across the batch in sample order)."
            )
        token_features = features[selected]  # (num_masked_patches, dim), crop by crop, raster order inside a crop
        rank = positions_in_segment(num_tokens)  # position of each masked patch inside its crop

        tokens = token_features.new_zeros(len(grid_thw), n, token_features.shape[-1])
        # Crops with at most n masked patches keep them as they are.
        few = (num_tokens <= n)[crop_of_token]
        tokens[crop_of_token[few], rank[few]] = token_features[few]
        # The others are clustered. Crops are grouped by the power of two above their patch count, so that the
        # zero padding of each batched k-means stays below 2x; every crop is still clustered on its own.
        clustered = torch.nonzero(num_tokens > n).flatten()
        if len(clustered):
            size_class = torch.ceil(torch.log2(num_tokens[clustered].double())).long()
            row_of_crop = torch.full_like(num_tokens, -1)
            for group in torch.unique(size_class).tolist():
                in_group = size_class == group
                crops = clustered[in_group]
                row_of_crop[crops] = torch.arange(len(crops), device=crops.device)
                members = row_of_crop[crop_of_token] >= 0
                width = int(num_tokens[crops].max())
                # (crops in group, width, dim), zero-padded, raster order kept.
                padded = token_features.new_zeros(len(crops), width, token_features.shape[-1])
                padded[row_of_crop[crop_of_token[members]], rank[members]] = token_features[members]
                valid = torch.arange(width, device=padded.device)[None, :] < num_tokens[crops][:, None]
                tokens[crops] = kmeans_object_tokens(
                    padded,
                    valid,
                    num_clusters=n,
                    num_iterations=self.kmeans_iterations,
                    tolerance=self.kmeans_tolerance,
                    init=self.kmeans_init,
                    seed=self.kmeans_seed,
                    init_indices=None if init_indices is None else init_indices[in_group],
                )
                row_of_crop[crops] = -1
        token_valid = torch.arange(n, device=tokens.device)[None, :] < num_tokens.clamp(max=n)[:, None]
        return tokens, token_valid

    def forward(
        self,
        crop_features: torch.Tensor,
        grid_thw: torch.Tensor,
        patch_masks: torch.Tensor,
        boxes: torch.Tensor,
        image_sizes: torch.Tensor,
        infuse: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Object tokens of every crop, in crop order, at the LLM width: `(num_object_tokens, text_hidden)`.

        `aggregate` reduces each crop to at most n tokens; `infuse` (Lite: OCI with the crop's context images) maps the
        `(num_crops, n, vision_hidden)` tokens to the same shape, and then all n tokens of a crop are kept (the padding
        ones included: they are non-zero after OCI); without it only the real tokens are. The MLP projects them.
        """
        tokens, token_valid = self.aggregate(crop_features, grid_thw, patch_masks, boxes, image_sizes)
        tokens = tokens.to(crop_features.dtype)
        flat = infuse(tokens).flatten(0, 1) if infuse is not None else tokens[token_valid]
        return self.projector(flat)


class PixelReferCrossAttention(nn.Module):
    """Multi-head cross-attention from object tokens to context features, dispatched through transformers' attention
    interface. The parameters are those of `nn.MultiheadAttention`, with its packed `in_proj` split into q/k/v."""

    def __init__(self, config: PixelReferConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.vision_config.hidden_size
        self.num_heads = config.oci_num_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.num_key_value_groups = 1
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(
        self, queries: torch.Tensor, context: torch.Tensor, context_lengths: torch.Tensor, context_index: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            queries: `(num_objects, n, dim)`.
            context: `(sum_j L_j, dim)` packed features of the context images.
            context_lengths: `(num_context_images,)` tokens per context image.
            context_index: `(num_objects,)` the context image each object attends to (images may be shared).

        Returns:
            `(num_objects, n, dim)` attention output (before the residual).
        """
        num_objects, n, _ = queries.shape
        heads, head_dim = self.num_heads, self.head_dim
        # Project every context image once, then gather it for each object that uses it.
        keys = self.k_proj(context).view(-1, heads, head_dim)
        values = self.v_proj(context).view(-1, heads, head_dim)
        query_states = self.q_proj(queries).view(num_objects, n, heads, head_dim)
        starts = (torch.cumsum(context_lengths, 0) - context_lengths)[context_index]
        lengths = context_lengths[context_index]
        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )

        if is_flash_attention_requested(self.config):
            # One varlen call over all objects: queries (1, heads, num_objects * n, head_dim), keys packed per object.
            gather = torch.repeat_interleave(starts, lengths) + positions_in_segment(lengths)
            zero = lengths.new_zeros(1)
            cu_seqlens_q = torch.arange(0, (num_objects + 1) * n, n, device=queries.device, dtype=torch.int32)
            cu_seqlens_k = torch.cat([zero, torch.cumsum(lengths, 0)]).to(torch.int32)
            output, _ = interface(
                self,
                query_states.reshape(1, -1, heads, head_dim).transpose(1, 2),
                keys[gather][None].transpose(1, 2),
                values[gather][None].transpose(1, 2),
                attention_mask=None,
                scaling=self.scaling,
                dropout=0.0,
                is_causal=False,
                cu_seq_lens_q=cu_seqlens_q,
                cu_seq_lens_k=cu_seqlens_k,
                max_length_q=n,
                max_length_k=int(lengths.max()),
            )
        else:
            # Batched over objects: keys zero-padded to the longest context, padding masked out additively.
            max_length = int(lengths.max())
            offsets = torch.arange(max_length, device=queries.device)
            present = offsets[None, :] < lengths[:, None]
            gather = (starts[:, None] + offsets[None, :]).clamp(max=len(context) - 1)
            attention_mask = None
            if not bool(present.all()):
                attention_mask = torch.zeros(
                    num_objects, 1, n, max_length, dtype=query_states.dtype, device=queries.device
                )
                attention_mask.masked_fill_(~present[:, None, None, :], torch.finfo(query_states.dtype).min)
            output, _ = interface(
                self,
                query_states.transpose(1, 2),
                keys[gather].transpose(1, 2),
                values[gather].transpose(1, 2),
                attention_mask=attention_mask,
                scaling=self.scaling,
                dropout=0.0,
                is_causal=False,
            )
        # Every interface returns (batch, seq, heads, head_dim).
        return self.out_proj(output.reshape(num_objects, n, self.embed_dim))


class PixelReferObjectCentricInfusion(nn.Module):
    """OCI (PixelRefer-Lite): Local-to-Object then Global-to-Object pre-LN cross-attention with residuals."""

    def __init__(self, config: PixelReferConfig):
        super().__init__()
        dim = config.vision_config.hidden_size
        # nn.LayerNorm's default eps (1e-5), as in the released module.
        self.local_norm = nn.LayerNorm(dim)
        self.local_attention = PixelReferCrossAttention(config)
        self.global_norm = nn.LayerNorm(dim)
        self.global_attention = PixelReferCrossAttention(config)

    def forward(
        self,
        object_tokens: torch.Tensor,
        local_features: torch.Tensor,
        local_lengths: torch.Tensor,
        local_index: torch.Tensor,
        global_features: torch.Tensor,
        global_lengths: torch.Tensor,
        global_index: torch.Tensor,
    ) -> torch.Tensor:
        """`object_tokens` `(num_objects, n, dim)` -> same shape, infused with local then global context.
        Keys and values are the raw tower features (not normalised), as in the released model."""
        hidden = object_tokens
        hidden = hidden + self.local_attention(self.local_norm(hidden), local_features, local_lengths, local_index)
        hidden = hidden + self.global_attention(self.global_norm(hidden), global_features, global_lengths, global_index)
        return hidden


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


class PixelReferPreTrainedModel(PreTrainedModel):
    config_class = PixelReferConfig
    config: PixelReferConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["VideoLlama3VisionEncoderLayer", "Qwen2DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """Fall back to sdpa, with one warning, when flash attention is asked for but cannot run here."""
        if requested_attention == "flash_attention_2" and not is_flash_attn_2_available():
            logger.warning_once(
                "`attn_implementation='flash_attention_2'` was requested but flash-attn is not installed (or no CUDA "
                "device is present); PixelRefer falls back to 'sdpa'. Install the `flash` extra on a CUDA machine."
            )
            requested_attention = "sdpa"
            # The sub-models (tower, LLM) check their own configs when they are built: make them fall back too.
            for sub_config in (self.config.text_config, self.config.vision_config):
                if sub_config._attn_implementation == "flash_attention_2":
                    sub_config._attn_implementation_internal = "sdpa"
        return super().get_correct_attn_implementation(requested_attention, is_init_check)


class PixelReferModel(PixelReferPreTrainedModel):
    """The backbone: vision tower, SAOT (+ OCI for Lite), projector and Qwen2, without the LM head."""

    def __init__(self, config: PixelReferConfig):
        super().__init__(config)
        # Sub-models are built directly (not through AutoModel) so remote code never re-enters the auto factories.
        self.vision_model = VideoLlama3VisionModel(config.vision_config)
        # Lite never feeds global tokens to the LLM, so it has no projector (the official one was never used).
        self.projector = None if config.is_lite else VideoLlama3Projector(config)
        self.object_tokenizer = PixelReferObjectTokenizer(config)
        self.object_infusion = PixelReferObjectCentricInfusion(config) if config.is_lite else None
        self.language_model = Qwen2Model(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def encode_images(
        self, groups: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Encode named groups of images (global images, crops, context images) in ONE packed tower call.

        Each group is `(pixel_values (sum patches, 3 * p * p), grid_thw (num_images, 3), merge_sizes (num_images,))`.
        Returns, under the same names, `(sum_i h_i * w_i / m_i^2, vision_hidden)` per group.
        """
        pixel_values, grid_thw, merge_sizes = (list(parts) for parts in zip(*groups.values(), strict=True))
        outputs = self.vision_model(
            pixel_values=torch.cat(pixel_values),
            grid_thw=torch.cat(grid_thw),
            merge_sizes=torch.cat(merge_sizes),
            return_dict=True,
        ).last_hidden_state
        sizes = [int((grid.prod(-1) // merge.pow(2)).sum()) for grid, merge in zip(grid_thw, merge_sizes, strict=True)]
        return dict(zip(groups, outputs.split(sizes), strict=True))

    def _region_tower_groups(
        self,
        region_pixel_values: torch.Tensor,
        region_grid_thw: torch.Tensor,
        region_local_pixel_values: torch.Tensor | None,
        region_local_grid_thw: torch.Tensor | None,
        region_global_pixel_values: torch.Tensor | None,
        region_global_grid_thw: torch.Tensor | None,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The region side's groups for `encode_images`, all at full patch resolution (merge size 1): the object
        crops, and for Lite the local and global context images."""
        groups = {"crops": (region_pixel_values, region_grid_thw)}
        if self.object_infusion is not None:
            groups["local_context"] = (region_local_pixel_values, region_local_grid_thw)
            groups["global_context"] = (region_global_pixel_values, region_global_grid_thw)
        return {name: (pixels, grid, torch.ones_like(grid[:, 0])) for name, (pixels, grid) in groups.items()}

    def _object_embeddings(
        self,
        encoded: dict[str, torch.Tensor],
        region_grid_thw: torch.Tensor,
        region_patch_masks: torch.Tensor,
        region_boxes: torch.Tensor,
        region_image_sizes: torch.Tensor,
        region_local_grid_thw: torch.Tensor | None,
        region_local_index: torch.Tensor | None,
        region_global_grid_thw: torch.Tensor | None,
        region_global_index: torch.Tensor | None,
    ) -> torch.Tensor:
        """SAOT (with OCI for Lite) on the encoded `_region_tower_groups`: `(num_object_tokens, text_hidden)`."""
        infuse = None
        if self.object_infusion is not None:
            infuse = partial(
                self.object_infusion,
                local_features=encoded["local_context"],
                local_lengths=region_local_grid_thw.prod(-1),
                local_index=region_local_index,
                global_features=encoded["global_context"],
                global_lengths=region_global_grid_thw.prod(-1),
                global_index=region_global_index,
            )
        return self.object_tokenizer(
            encoded["crops"], region_grid_thw, region_patch_masks, region_boxes, region_image_sizes, infuse=infuse
        )

    def get_region_features(
        self,
        region_pixel_values: torch.Tensor,
        region_grid_thw: torch.Tensor,
        region_patch_masks: torch.Tensor,
        region_boxes: torch.Tensor,
        region_image_sizes: torch.Tensor,
        region_local_pixel_values: torch.Tensor | None = None,
        region_local_grid_thw: torch.Tensor | None = None,
        region_local_index: torch.Tensor | None = None,
        region_global_pixel_values: torch.Tensor | None = None,
        region_global_grid_thw: torch.Tensor | None = None,
        region_global_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Object tokens of the processor's `region_*` outputs without running the LLM (one tower call for crops and
        Lite context images): `(num_object_tokens, text_hidden)` in crop order, the rows `forward` places on the
        `<REGION>` tokens. For training or probing the object side on its own."""
        groups = self._region_tower_groups(
            region_pixel_values,
            region_grid_thw,
            region_local_pixel_values,
            region_local_grid_thw,
            region_global_pixel_values,
            region_global_grid_thw,
        )
        return self._object_embeddings(
            self.encode_images(groups),
            region_grid_thw,
            region_patch_masks,
            region_boxes,
            region_image_sizes,
            region_local_grid_thw,
            region_local_index,
            region_global_grid_thw,
            region_global_index,
        )

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        image_grid_thw: torch.LongTensor,
        image_merge_sizes: torch.LongTensor,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | BaseModelOutputWithPooling:
        """Global visual tokens of images and video frames (PixelRefer only), as in transformers' VideoLLaMA3.

        Returns the tower output (`last_hidden_state` `(sum_i h_i * w_i / m_i^2, vision_hidden)`, merged) and
        `pooler_output`, a tuple with per image or frame its projected tokens `(h_i * w_i / m_i^2, text_hidden)`.
        `forward` writes these into the `<image>` slots, after dropping what video token compression
        (`image_keep_mask`) removes.
        """
        if self.projector is None:
            raise ValueError(
                "PixelRefer-Lite feeds no global visual tokens to the LLM, so it has no image features; its images "
                "reach the model only through regions (`get_region_features`)."
            )
        vision_outputs = self.vision_model(
            pixel_values=pixel_values,
            grid_thw=image_grid_thw,
            merge_sizes=image_merge_sizes,
            return_dict=True,
            **kwargs,
        )
        return self._project_image_features(vision_outputs, image_grid_thw, image_merge_sizes)

    def _project_image_features(
        self, vision_outputs: ModelOutput, image_grid_thw: torch.Tensor, image_merge_sizes: torch.Tensor
    ) -> BaseModelOutputWithPooling:
        """Project encoded global images; `pooler_output` holds each image's tokens (see `get_image_features`)."""
        tokens_per_image = image_grid_thw.prod(-1) // image_merge_sizes.pow(2)
        projected = self.projector(vision_outputs.last_hidden_state)
        return BaseModelOutputWithPooling(
            last_hidden_state=vision_outputs.last_hidden_state,
            pooler_output=projected.split(tokens_per_image.tolist()),
            hidden_states=getattr(vision_outputs, "hidden_states", None),
            attentions=getattr(vision_outputs, "attentions", None),
        )

    def get_placeholder_mask(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.FloatTensor,
        token_id: int,
        features: torch.Tensor,
        what: str,
    ) -> torch.BoolTensor:
        """`(batch, seq)` mask of the `token_id` slots, checked against the number of `features` rows.

        Without `input_ids` (a caller that embedded the prompt itself), the slots are the positions whose embedding
        equals the embedding of `token_id`, as in transformers' native VLMs.
        """
        if input_ids is not None:
            mask = input_ids == token_id
        else:
            token_embedding = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
            mask = (inputs_embeds == token_embedding.to(inputs_embeds.dtype)).all(-1)
        num_slots = int(mask.sum())
        if num_slots != features.shape[0]:
            per_sample = mask.sum(-1).tolist()
            raise ValueError(
                f"{what} tokens and features do not match: the inputs hold {num_slots} {what} tokens (per sample "
                f"{per_sample}) but the inputs produce {features.shape[0]} {what} features. Build inputs with "
                "PixelReferProcessor, which expands every placeholder to the exact count."
            )
        return mask

    def embed_multimodal_inputs(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        image_merge_sizes: torch.LongTensor | None = None,
        image_keep_mask: torch.BoolTensor | None = None,
        region_pixel_values: torch.FloatTensor | None = None,
        region_grid_thw: torch.LongTensor | None = None,
        region_patch_masks: torch.FloatTensor | None = None,
        region_boxes: torch.FloatTensor | None = None,
        region_image_sizes: torch.LongTensor | None = None,
        region_local_pixel_values: torch.FloatTensor | None = None,
        region_local_grid_thw: torch.LongTensor | None = None,
        region_local_index: torch.LongTensor | None = None,
        region_global_pixel_values: torch.FloatTensor | None = None,
        region_global_grid_thw: torch.LongTensor | None = None,
        region_global_index: torch.LongTensor | None = None,
    ) -> tuple[torch.FloatTensor, torch.FloatTensor | None, torch.FloatTensor | None]:
        """The LLM input embeddings with global visual tokens and object tokens written into their slots.

        One packed tower call covers the images, the crops and (Lite) the context images. Returns
        `(inputs_embeds (batch, seq, text_hidden), image_embeds or None, object_embeds or None)`; the last two are
        the rows written into the `<image>` and `<REGION>` slots, in sequence order.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        has_images = pixel_values is not None
        has_regions = region_pixel_values is not None
        if has_images and self.projector is None:
            raise ValueError(
                "PixelRefer-Lite feeds no global visual tokens to the LLM; pass images only through regions "
                "(PixelReferProcessor does this for you)."
            )
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if not (has_images or has_regions):
            return inputs_embeds, None, None

        groups = {}
        if has_images:
            groups["images"] = (pixel_values, image_grid_thw, image_merge_sizes)
        if has_regions:
            groups |= self._region_tower_groups(
                region_pixel_values,
                region_grid_thw,
                region_local_pixel_values,
                region_local_grid_thw,
                region_global_pixel_values,
                region_global_grid_thw,
            )
        encoded = self.encode_images(groups)
        # Placeholder slots are found before any feature is written: once written, an embedding-based search would
        # no longer see them.
        merged = inputs_embeds
        image_embeds = object_embeds = None
        if has_images:
            image_features = self._project_image_features(
                ModelOutput(last_hidden_state=encoded["images"]), image_grid_thw, image_merge_sizes
            )
            image_embeds = torch.cat(image_features.pooler_output).to(inputs_embeds.dtype)
            if image_keep_mask is not None:
                image_embeds = image_embeds[image_keep_mask.to(image_embeds.device)]
            slots = self.get_placeholder_mask(
                input_ids, inputs_embeds, self.config.image_token_id, image_embeds, "image"
            )
            merged = merged.masked_scatter(slots[..., None].to(merged.device), image_embeds)
        if has_regions:
            object_embeds = self._object_embeddings(
                encoded,
                region_grid_thw,
                region_patch_masks,
                region_boxes,
                region_image_sizes,
                region_local_grid_thw,
                region_local_index,
                region_global_grid_thw,
                region_global_index,
            ).to(inputs_embeds.dtype)
            slots = self.get_placeholder_mask(
                input_ids, inputs_embeds, self.config.region_token_id, object_embeds, "region"
            )
            merged = merged.masked_scatter(slots[..., None].to(merged.device), object_embeds)
        return merged, image_embeds, object_embeds

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        image_merge_sizes: torch.LongTensor | None = None,
        image_keep_mask: torch.BoolTensor | None = None,
        region_pixel_values: torch.FloatTensor | None = None,
        region_grid_thw: torch.LongTensor | None = None,
        region_patch_masks: torch.FloatTensor | None = None,
        region_boxes: torch.FloatTensor | None = None,
        region_image_sizes: torch.LongTensor | None = None,
        region_local_pixel_values: torch.FloatTensor | None = None,
        region_local_grid_thw: torch.LongTensor | None = None,
        region_local_index: torch.LongTensor | None = None,
        region_global_pixel_values: torch.FloatTensor | None = None,
        region_global_grid_thw: torch.LongTensor | None = None,
        region_global_index: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | PixelReferModelOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(num_patches, 3 * patch_size**2)`):
            Global images and video frames of the batch, patchified (PixelRefer only).
        image_grid_thw (`torch.LongTensor` of shape `(num_images, 3)`): patch grid of each image or frame.
        image_merge_sizes (`torch.LongTensor` of shape `(num_images,)`): 1 for images, 2 for video frames.
        image_keep_mask (`torch.BoolTensor` of shape `(num_merged_tokens,)`, *optional*):
            Visual tokens kept by video token compression.
        region_pixel_values (`torch.FloatTensor` of shape `(num_crop_patches, 3 * patch_size**2)`): object crops.
        region_grid_thw (`torch.LongTensor` of shape `(num_crops, 3)`): patch grid of each crop.
        region_patch_masks (`torch.FloatTensor` of shape `(num_crop_patches,)`): patch-grid masks of the crops.
        region_boxes (`torch.FloatTensor` of shape `(num_crops, 4)`): crop box `(top, left, bottom, right)`.
        region_image_sizes (`torch.LongTensor` of shape `(num_crops, 2)`): frame size `(H, W)` of each crop.
        region_local_pixel_values, region_local_grid_thw, region_local_index:
            Lite only: local context images, their grids, and the local image of each crop `(num_crops,)`.
        region_global_pixel_values, region_global_grid_thw, region_global_index:
            Lite only: global context images, their grids, and the global image of each crop `(num_crops,)`.
        """
        inputs_embeds, image_embeds, object_embeds = self.embed_multimodal_inputs(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            image_merge_sizes=image_merge_sizes,
            image_keep_mask=image_keep_mask,
            region_pixel_values=region_pixel_values,
            region_grid_thw=region_grid_thw,
            region_patch_masks=region_patch_masks,
            region_boxes=region_boxes,
            region_image_sizes=region_image_sizes,
            region_local_pixel_values=region_local_pixel_values,
            region_local_grid_thw=region_local_grid_thw,
            region_local_index=region_local_index,
            region_global_pixel_values=region_global_pixel_values,
            region_global_grid_thw=region_global_grid_thw,
            region_global_index=region_global_index,
        )
        outputs = self.language_model(
            input_ids=None,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        return PixelReferModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_embeds,
            object_hidden_states=object_embeds,
        )


class PixelReferForConditionalGeneration(PixelReferPreTrainedModel, GenerationMixin):
    """PixelRefer / PixelRefer-Lite with the LM head: `forward` with `labels` for training, `generate` for answers."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # As Qwen2ForCausalLM: under tensor parallelism the (possibly tied) head is split by vocabulary and gathered.
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: PixelReferConfig):
        super().__init__(config)
        self.model = PixelReferModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def get_decoder(self) -> nn.Module:
        return self.model.language_model

    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        image_grid_thw: torch.LongTensor,
        image_merge_sizes: torch.LongTensor,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | BaseModelOutputWithPooling:
        """See [`PixelReferModel.get_image_features`]."""
        return self.model.get_image_features(pixel_values, image_grid_thw, image_merge_sizes, **kwargs)

    def get_region_features(self, **region_inputs) -> torch.Tensor:
        """See [`PixelReferModel.get_region_features`]."""
        return self.model.get_region_features(**region_inputs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        pixel_values: torch.FloatTensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        image_merge_sizes: torch.LongTensor | None = None,
        image_keep_mask: torch.BoolTensor | None = None,
        region_pixel_values: torch.FloatTensor | None = None,
        region_grid_thw: torch.LongTensor | None = None,
        region_patch_masks: torch.FloatTensor | None = None,
        region_boxes: torch.FloatTensor | None = None,
        region_image_sizes: torch.LongTensor | None = None,
        region_local_pixel_values: torch.FloatTensor | None = None,
        region_local_grid_thw: torch.LongTensor | None = None,
        region_local_index: torch.LongTensor | None = None,
        region_global_pixel_values: torch.FloatTensor | None = None,
        region_global_grid_thw: torch.LongTensor | None = None,
        region_global_index: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | PixelReferCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets; -100 is ignored. Positions holding `<image>` or `<REGION>` ids are never supervised.
        logits_to_keep (`int` or `torch.Tensor`): compute logits for the last `logits_to_keep` positions only (0 = all).

        The multimodal arguments are documented in [`PixelReferModel.forward`].
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            image_merge_sizes=image_merge_sizes,
            image_keep_mask=image_keep_mask,
            region_pixel_values=region_pixel_values,
            region_grid_thw=region_grid_thw,
            region_patch_masks=region_patch_masks,
            region_boxes=region_boxes,
            region_image_sizes=region_image_sizes,
            region_local_pixel_values=region_local_pixel_values,
            region_local_grid_thw=region_local_grid_thw,
            region_local_index=region_local_index,
            region_global_pixel_values=region_global_pixel_values,
            region_global_grid_thw=region_global_grid_thw,
            region_global_index=region_global_index,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            placeholder = (labels == self.config.image_token_id) | (labels == self.config.region_token_id)
            labels = labels.masked_fill(placeholder, -100)
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return PixelReferCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            object_hidden_states=outputs.object_hidden_states,
        )

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, always in eval mode.

        In training mode (right after `trainer.train()`) the Qwen2 layers under gradient checkpointing drop the KV
        cache while `generate` feeds one new token per step, which yields garbage; dropout (LoRA's too) would also
        perturb the answer. So a model in training mode generates in eval mode and is put back in training mode
        afterwards.
        """
        if kwargs.get("prompt_lookup_num_tokens") and any(
            name.startswith(MULTIMODAL_INPUT_PREFIXES) and value is not None for name, value in kwargs.items()
        ):
            # Its candidates are copied from the prompt, `<image>` / `<REGION>` runs included, and the verifying
            # prefill would then hold more placeholder tokens than there are features to put in them.
            raise ValueError(
                "prompt_lookup_num_tokens is not supported with images or regions (candidates copied from the prompt "
                "would include <image> / <REGION> placeholders); use assistant_model=... or plain decoding"
            )
        if not self.training:
            return super().generate(*args, **kwargs)
        logger.warning_once(
            "generate() was called on a model in training mode; it runs in eval mode (KV cache on, dropout off) and "
            "the model is put back in training mode afterwards. Call `model.eval()` first to silence this warning."
        )
        training_modules = [module for module in self.modules() if module.training]
        self.eval()
        try:
            return super().generate(*args, **kwargs)
        finally:
            for module in training_modules:
                module.train()

    @torch.no_grad()
    def generate_sharing_image(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        pixel_values: torch.FloatTensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        image_merge_sizes: torch.LongTensor | None = None,
        image_keep_mask: torch.BoolTensor | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        """`generate` for a batch whose rows all ask about the same image or video (the processor repeated it for
        every row): the tower encodes it once and the prompt prefix the rows share (everything up to the last
        `<image>` token and beyond, as far as the rows agree) is prefilled once; its KV cache is then repeated for
        every row, and each row's question is prefilled after it.

        Answers are those of `generate` on the same inputs (greedy decoding gives the same tokens). The returned
        sequences have the same width as `input_ids` before the new tokens, so callers slice the answers off as usual;
        the prompt part holds each row's padding between the shared prefix and its question instead of before it.
        Rows whose images differ, PixelRefer-Lite (no image tokens reach its LLM), beam search, several sequences per
        row, a static cache or `use_cache=False` take the plain `generate` path. Memory: the repeated prefix cache
        is what a plain batch holds for those positions; nothing is kept after the call.
        """
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "image_grid_thw": image_grid_thw,
            "image_merge_sizes": image_merge_sizes,
            "image_keep_mask": image_keep_mask,
        }
        # Each row's prompt without its left padding.
        rows = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask, strict=True)]
        prefix = self._shared_image_prefix(rows, pixel_values, image_grid_thw, image_keep_mask)
        plain = (
            prefix is None
            or kwargs.get("num_beams", 1) > 1
            or kwargs.get("num_return_sequences", 1) > 1
            or kwargs.get("use_cache") is False
            or kwargs.get("cache_implementation", self.generation_config.cache_implementation) is not None
            or kwargs.get("past_key_values") is not None
        )
        if plain:
            return self.generate(**{key: value for key, value in inputs.items() if value is not None}, **kwargs)
        prefix_length, images_per_row = prefix
        batch_size = input_ids.shape[0]
        shared_ids = rows[0][:prefix_length]
        first_row_image = {
            "pixel_values": pixel_values[: int(image_grid_thw[:images_per_row].prod(-1).sum())],
            "image_grid_thw": image_grid_thw[:images_per_row],
            "image_merge_sizes": image_merge_sizes[:images_per_row],
        }
        if image_keep_mask is not None:
            merged = image_grid_thw[:images_per_row].prod(-1) // image_merge_sizes[:images_per_row].pow(2)
            first_row_image["image_keep_mask"] = image_keep_mask[: int(merged.sum())]
        # The prefix once: (1, prefix_length) tokens, the image encoded once inside.
        prefilled = self.model(
            input_ids=shared_ids[None],
            attention_mask=torch.ones_like(shared_ids)[None],
            use_cache=True,
            **first_row_image,
        )
        cache = prefilled.past_key_values
        cache.batch_repeat_interleave(batch_size)
        # Each row: the shared prefix, its padding, then its own question (the padding is masked, and positions
        # follow the attention mask, so every row sees what a single call would).
        width = input_ids.shape[1]
        pad_id = self.generation_config.pad_token_id
        pad_id = pad_id if pad_id is not None else 0
        arranged = input_ids.new_full((batch_size, width), pad_id)
        arranged_mask = attention_mask.new_zeros((batch_size, width))
        for row, ids in enumerate(rows):
            suffix = ids[prefix_length:]
            arranged[row, :prefix_length] = shared_ids
            arranged[row, width - len(suffix) :] = suffix
            arranged_mask[row, :prefix_length] = 1
            arranged_mask[row, width - len(suffix) :] = 1
        return self.generate(input_ids=arranged, attention_mask=arranged_mask, past_key_values=cache, **kwargs)

    def _shared_image_prefix(
        self,
        rows: list[torch.LongTensor],
        pixel_values: torch.FloatTensor | None,
        image_grid_thw: torch.LongTensor | None,
        image_keep_mask: torch.BoolTensor | None,
    ) -> tuple[int, int] | None:
        """`(length of the prompt prefix all `rows` (unpadded prompts) share, images per row)` when every row holds the
        same images and all its `<image>` tokens lie in that prefix, with at least one token of its own after it;
        else None."""
        batch_size = len(rows)
        if self.config.is_lite or pixel_values is None or batch_size < 2 or len(image_grid_thw) % batch_size:
            return None
        images_per_row = len(image_grid_thw) // batch_size
        grids = image_grid_thw.view(batch_size, images_per_row, 3)
        if not bool((grids == grids[:1]).all()):
            return None
        pixels = pixel_values.view(batch_size, -1, pixel_values.shape[-1])  # equal grids: equal patch counts
        if not all(torch.equal(pixels[0], pixels[row]) for row in range(1, batch_size)):
            return None
        if image_keep_mask is not None:
            keep = image_keep_mask.view(batch_size, -1)
            if not bool((keep == keep[:1]).all()):
                return None
        shortest = min(len(ids) for ids in rows)
        agree = torch.stack([ids[:shortest] for ids in rows]).eq(rows[0][:shortest]).all(dim=0)
        prefix_length = int(agree.long().cumprod(0).sum())
        # Every row keeps at least its last token to prefill (the first answer token comes from its logits).
        prefix_length = min(prefix_length, shortest - 1)
        # `<REGION>` placeholders look alike in every row but stand for each row's own objects: the prefix ends
        # before the first one (the rows agree up to there, so it is the same position in all of them).
        region_positions = torch.nonzero(rows[0][:prefix_length] == self.config.region_token_id).flatten()
        if len(region_positions):
            prefix_length = int(region_positions[0])
        image_positions = torch.nonzero(rows[0] == self.config.image_token_id).flatten()
        if len(image_positions) == 0 or int(image_positions[-1]) >= prefix_length:
            return None
        return prefix_length, images_per_row

    def _get_logits_processor(
        self, generation_config, input_ids_seq_length=None, *args, **kwargs
    ) -> LogitsProcessorList:
        """Placeholder tokens are never generated, and the repetition penalty sees the generated tokens only, unless
        the generation config says otherwise.

        `<image>` / `<REGION>` are input slots: a generated one would be read as a slot by any later step that re-reads
        the sequence with the images (no KV cache, assisted decoding).

        The official inference (`mm_infer`) calls `generate` with `inputs_embeds` alone, so the released checkpoints'
        `repetition_penalty` never penalised prompt tokens. `generation_config.repetition_penalty_scope = "all"`
        gives transformers' usual behaviour (prompt tokens penalised too).
        """
        processors = super()._get_logits_processor(generation_config, input_ids_seq_length, *args, **kwargs)
        scope = getattr(generation_config, "repetition_penalty_scope", "generated")
        if scope not in ("generated", "all"):
            raise ValueError(f'repetition_penalty_scope must be "generated" or "all", got {scope!r}')
        if scope == "generated" and input_ids_seq_length:
            for processor in processors:
                if isinstance(processor, RepetitionPenaltyLogitsProcessor):
                    processor.prompt_ignore_length = int(input_ids_seq_length)
        device = kwargs.get("device") or self.device
        processors.append(
            SuppressTokensLogitsProcessor([self.config.image_token_id, self.config.region_token_id], device=device)
        )
        return processors

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **kwargs,
    ):
        """Beam search and `num_return_sequences` repeat every sample `expand_size` times.

        The images and crops are encoded once: the prompt embeddings, with the visual and object tokens already in
        their slots, are computed for the original batch and repeated like any other per-sample tensor; the prefill
        step then runs from `inputs_embeds`, and later steps use the token ids as usual.
        """
        packed = {
            name: kwargs.pop(name)
            for name in list(kwargs)
            if name.startswith(MULTIMODAL_INPUT_PREFIXES) and kwargs[name] is not None
        }
        if expand_size > 1 and packed:
            embeds = kwargs.get("inputs_embeds")
            kwargs["inputs_embeds"], _, _ = self.model.embed_multimodal_inputs(
                input_ids=input_ids if embeds is None else None, inputs_embeds=embeds, **packed
            )
            if embeds is None:
                # Without a KV cache every step re-reads the whole prompt, which now exists only as embeddings.
                kwargs[PROMPT_EMBEDS_KEY] = kwargs["inputs_embeds"]
            packed = {}
        input_ids, kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **kwargs)
        kwargs.update(packed)
        return input_ids, kwargs

    def _prompt_already_cached(self, step_ids: torch.Tensor | None, past_key_values: Cache | None) -> bool:
        """Whether a first step continues from a cache that already holds the prompt's placeholders (its new ids
        hold none)."""
        if step_ids is None or past_key_values is None or past_key_values.get_seq_length() == 0:
            return False
        placeholders = torch.tensor([self.config.image_token_id, self.config.region_token_id], device=step_ids.device)
        return not bool(torch.isin(step_ids, placeholders).any())

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        prompt_embeds = kwargs.pop(PROMPT_EMBEDS_KEY, None)
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        # Images and regions are consumed by the prefill step; decoding steps only extend the KV cache. A call that
        # continues from a cache already holding the prompt (its ids hold no placeholder any more) drops them too.
        decoding_with_cache = not is_first_iteration and kwargs.get("use_cache", True)
        if decoding_with_cache or (
            is_first_iteration and self._prompt_already_cached(model_inputs.get("input_ids"), past_key_values)
        ):
            for name in [name for name in model_inputs if name.startswith(MULTIMODAL_INPUT_PREFIXES)]:
                del model_inputs[name]
        elif not is_first_iteration and prompt_embeds is not None:
            # No cache after an expanded prefill: the prompt's embeddings (features in place), then the new tokens.
            new_tokens = model_inputs["input_ids"][:, prompt_embeds.shape[1] :]
            embeds = torch.cat([prompt_embeds, self.get_input_embeddings()(new_tokens)], dim=1)
            model_inputs["input_ids"], model_inputs["inputs_embeds"] = None, embeds
        return model_inputs


__all__ = [
    "PixelReferForConditionalGeneration",
    "PixelReferModel",
    "PixelReferObjectCentricInfusion",
    "PixelReferObjectTokenizer",
    "PixelReferPreTrainedModel",
    "kmeans_object_tokens",
]
