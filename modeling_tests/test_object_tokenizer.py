"""SAOT and OCI on their own: k-means, relative positions, cross-attention, attention backends.

These tests build inputs by hand (no processor), so that each module is checked against an independent
re-statement of the official maths.
"""

import math

import pytest
import torch
from torch import nn
from transformers import AttentionInterface

from pixelrefer_hf import PixelReferConfig, PixelReferForConditionalGeneration
from pixelrefer_hf.modeling_pixelrefer import (
    PixelReferCrossAttention,
    kmeans_object_tokens,
    relative_box_positions,
)

IMAGE_TOKEN, REGION_TOKEN = 5, 6


def small_config(variant="pixelrefer", **overrides):
    return PixelReferConfig(
        variant=variant,
        num_object_tokens=4,
        oci_num_heads=2,
        image_token_id=IMAGE_TOKEN,
        region_token_id=REGION_TOKEN,
        text_config={
            "model_type": "qwen2",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 64,
            "vocab_size": 100,
        },
        vision_config={
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "patch_size": 14,
        },
        **overrides,
    )


# ---------------------------------------------------------------------------------------------------------------------
# k-means
# ---------------------------------------------------------------------------------------------------------------------


def reference_kmeans(tokens, init_indices, num_iterations, tolerance=1e-6):
    """One object at a time, the official way: dense differences, a Python loop over clusters, early stop."""
    centroids = tokens[init_indices]
    for _ in range(num_iterations):
        distances = ((tokens[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
        labels = distances.argmin(1)
        new = torch.stack(
            [tokens[labels == i].mean(0) if (labels == i).any() else centroids[i] for i in range(len(centroids))]
        )
        if torch.allclose(centroids, new, atol=tolerance):
            break
        centroids = new
    return centroids


def pad_objects(objects):
    width = max(len(o) for o in objects)
    tokens = torch.zeros(len(objects), width, objects[0].shape[1])
    valid = torch.zeros(len(objects), width, dtype=torch.bool)
    for i, o in enumerate(objects):
        tokens[i, : len(o)] = o
        valid[i, : len(o)] = True
    return tokens, valid


def random_objects(sizes, dim=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Clustered data so that k-means has structure to find and assignments are not decided by rounding.
    return [torch.randn(n, dim, generator=generator) + 3 * torch.randn(1, dim, generator=generator) for n in sizes]


@pytest.mark.parametrize("init", ["linspace", "random"])
@pytest.mark.parametrize("iterations", [1, 3, 5])
def test_kmeans_matches_per_object_reference(init, iterations):
    objects = random_objects([40, 9, 130, 17])
    tokens, valid = pad_objects(objects)
    k = 8
    # Ask the batched code for its initial indices by running zero iterations.
    init_centroids = kmeans_object_tokens(tokens, valid, k, 0, init=init, seed=3)
    centroids = kmeans_object_tokens(tokens, valid, k, iterations, init=init, seed=3)
    assert centroids.shape == (4, k, 24)
    for i, obj in enumerate(objects):
        # Recover the initial indices from the initial centroids (tokens are distinct).
        init_indices = torch.cdist(init_centroids[i], obj).argmin(-1)
        assert len(set(init_indices.tolist())) == k, "initial centroids must be distinct tokens"
        expected = reference_kmeans(obj, init_indices, iterations)
        torch.testing.assert_close(centroids[i], expected, atol=1e-5, rtol=1e-5)


def test_kmeans_linspace_initialisation_is_evenly_spaced():
    tokens, valid = pad_objects([torch.arange(20.0)[:, None].repeat(1, 3)])
    init = kmeans_object_tokens(tokens, valid, 4, 0)
    assert init[0, :, 0].tolist() == [0.0, 5.0, 10.0, 15.0]


def test_kmeans_random_initialisation_is_seeded():
    tokens, valid = pad_objects(random_objects([50]))
    first = kmeans_object_tokens(tokens, valid, 6, 0, init="random", seed=0)
    again = kmeans_object_tokens(tokens, valid, 6, 0, init="random", seed=0)
    other = kmeans_object_tokens(tokens, valid, 6, 0, init="random", seed=1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_kmeans_is_batch_invariant_and_deterministic():
    """An object gets the same tokens alone or among 16 others of mixed sizes (the padding width changes too)."""
    sizes = [33, 200, 47, 90, 35, 61, 150, 40, 77, 120, 38, 55, 99, 180, 42, 70, 64]
    objects = random_objects(sizes, dim=32, seed=7)
    tokens, valid = pad_objects(objects)
    together = kmeans_object_tokens(tokens, valid, 32, 5)
    assert torch.equal(together, kmeans_object_tokens(tokens, valid, 32, 5))
    for i in (0, 5, 16):
        alone_tokens, alone_valid = pad_objects([objects[i]])
        alone = kmeans_object_tokens(alone_tokens, alone_valid, 32, 5)
        torch.testing.assert_close(together[i], alone[0], atol=1e-6, rtol=1e-6)


def test_kmeans_early_stop_is_per_object():
    """A converged object keeps its centroids while another one is still moving."""
    still = torch.cat([torch.zeros(5, 2), torch.ones(5, 2)])  # two exact clusters: converges after one step
    moving = random_objects([60], dim=2, seed=1)[0]
    tokens, valid = pad_objects([still, moving])
    centroids = kmeans_object_tokens(tokens, valid, 2, 10, init_indices=torch.tensor([[0, 9], [0, 1]]))
    torch.testing.assert_close(centroids[0], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    expected = reference_kmeans(moving, torch.tensor([0, 1]), 10)
    torch.testing.assert_close(centroids[1], expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# relative positions
# ---------------------------------------------------------------------------------------------------------------------


def reference_positions(h, w, box, frame_h, frame_w, legacy):
    """The official position tensor of one crop, written out loop by loop."""
    top, left, bottom, right = box
    out = torch.zeros(h, w, 2)
    for i in range(h):
        for j in range(w):
            if legacy:  # the released weights' transposed mapping
                out[i, j, 0] = ((j / w) * (bottom - top) + top) / (frame_w - 1)
                out[i, j, 1] = ((i / h) * (right - left) + left) / (frame_h - 1)
            else:
                out[i, j, 0] = ((j / w) * (right - left) + left) / (frame_w - 1)
                out[i, j, 1] = ((i / h) * (bottom - top) + top) / (frame_h - 1)
    return out.view(-1, 2)


@pytest.mark.parametrize("legacy", [True, False])
def test_relative_box_positions(legacy):
    grids = torch.tensor([[3, 4], [2, 5]])
    boxes = torch.tensor([[10.0, 20.0, 60.0, 90.0], [0.0, 0.0, 30.0, 100.0]])
    sizes = torch.tensor([[120, 200], [40, 101]])
    got = relative_box_positions(grids, boxes, sizes, legacy=legacy)
    expected = torch.cat(
        [
            reference_positions(3, 4, (10, 20, 60, 90), 120, 200, legacy),
            reference_positions(2, 5, (0, 0, 30, 100), 40, 101, legacy),
        ]
    )
    torch.testing.assert_close(got, expected)


def test_legacy_positions_differ_from_correct_ones_for_non_square_boxes():
    grids, boxes, sizes = torch.tensor([[2, 2]]), torch.tensor([[0.0, 50.0, 10.0, 90.0]]), torch.tensor([[100, 100]])
    assert not torch.allclose(
        relative_box_positions(grids, boxes, sizes, legacy=True),
        relative_box_positions(grids, boxes, sizes, legacy=False),
    )


# ---------------------------------------------------------------------------------------------------------------------
# OCI cross-attention and attention backends
# ---------------------------------------------------------------------------------------------------------------------


def emulated_flash_attention(
    module, query, key, value, attention_mask, scaling, dropout=0.0, is_causal=False, **kwargs
):
    """A CPU stand-in for flash-attn's varlen kernel: same arguments, computed per segment pair with SDPA."""
    assert attention_mask is None and query.shape[0] == 1
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32
    assert kwargs["max_length_q"] == int((cu_q[1:] - cu_q[:-1]).max())
    assert kwargs["max_length_k"] == int((cu_k[1:] - cu_k[:-1]).max())
    emulated_flash_attention.calls += 1
    outputs = []
    for i in range(len(cu_q) - 1):
        q = query[:, :, cu_q[i] : cu_q[i + 1]]
        k, v = key[:, :, cu_k[i] : cu_k[i + 1]], value[:, :, cu_k[i] : cu_k[i + 1]]
        outputs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling))
    return torch.cat(outputs, dim=2).transpose(1, 2), None


emulated_flash_attention.calls = 0
AttentionInterface.register("cpu_flash_emulated", emulated_flash_attention)


def mha_from_cross_attention(attention: PixelReferCrossAttention) -> nn.MultiheadAttention:
    """The official `nn.MultiheadAttention` holding the same weights (packed in_proj), as the converter will map it."""
    mha = nn.MultiheadAttention(attention.embed_dim, attention.num_heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]))
        mha.out_proj.weight.copy_(attention.out_proj.weight)
        mha.out_proj.bias.copy_(attention.out_proj.bias)
    return mha.eval()


@pytest.mark.parametrize("implementation", ["eager", "sdpa", "cpu_flash_emulated"])
@pytest.mark.parametrize("ragged", [False, True])
def test_cross_attention_equals_official_multihead_attention(implementation, ragged):
    config = small_config("pixelrefer-lite")
    config._attn_implementation = implementation
    torch.manual_seed(0)
    attention = PixelReferCrossAttention(config).eval()
    mha = mha_from_cross_attention(attention)
    lengths = torch.tensor([6, 9, 4]) if ragged else torch.tensor([6, 6, 6])
    context = torch.randn(int(lengths.sum()), 16)
    index = torch.tensor([2, 0, 0, 1])  # objects 1 and 2 share a context image
    queries = torch.randn(4, 4, 16)
    calls = emulated_flash_attention.calls
    with torch.no_grad():
        got = attention(queries, context, lengths, index)
        segments = context.split(lengths.tolist())
        expected = torch.stack(
            [mha(queries[i : i + 1], segments[j][None], segments[j][None])[0][0] for i, j in enumerate(index.tolist())]
        )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if implementation == "cpu_flash_emulated":
        assert emulated_flash_attention.calls == calls + 1, "the flash path must make one varlen call"


def synthetic_inputs(variant, sample_regions=((7, 3),), seed=0):
    """Input ids and region tensors by hand: each sample lists its regions as numbers of masked patches."""
    generator = torch.Generator().manual_seed(seed)
    rows, grids, masks = [], [], []
    n = 4
    for regions in sample_regions:
        ids = [1]
        for masked in regions:
            side = math.ceil(math.sqrt(masked)) + 1
            grids.append([1, side, side])
            mask = torch.zeros(side * side)
            mask[torch.randperm(side * side, generator=generator)[:masked]] = 1
            masks.append(mask)
            ids += [2] + [REGION_TOKEN] * (n if variant == "pixelrefer-lite" else min(n, masked)) + [3]
        rows.append(ids + [4])
    grid = torch.tensor(grids)
    inputs = {
        "region_pixel_values": torch.randn(int(grid.prod(-1).sum()), 588, generator=generator),
        "region_grid_thw": grid,
        "region_patch_masks": torch.cat(masks),
        "region_boxes": torch.tensor([[5.0, 8.0, 40.0, 60.0]]).repeat(len(grid), 1),
        "region_image_sizes": torch.tensor([[64, 80]]).repeat(len(grid), 1),
    }
    if variant == "pixelrefer-lite":
        inputs.update(
            region_local_pixel_values=torch.randn(4 * len(grid), 588, generator=generator),
            region_local_grid_thw=torch.tensor([[1, 2, 2]]).repeat(len(grid), 1),
            region_local_index=torch.arange(len(grid)),
            region_global_pixel_values=torch.randn(9, 588, generator=generator),
            region_global_grid_thw=torch.tensor([[1, 3, 3]]),
            region_global_index=torch.zeros(len(grid), dtype=torch.long),
        )
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask, **inputs}


@pytest.mark.parametrize("variant", ["pixelrefer", "pixelrefer-lite"])
def test_flash_branches_of_tower_and_oci_match_sdpa(variant):
    torch.manual_seed(0)
    model = PixelReferForConditionalGeneration(small_config(variant)).eval()
    inputs = synthetic_inputs(variant, sample_regions=((7, 30), (12,)))
    with torch.no_grad():
        expected = model(**inputs).object_hidden_states
        # Only the vision tower and OCI switch: the LLM keeps sdpa (its flash path needs the real kernel).
        model.config._attn_implementation = "cpu_flash_emulated"  # propagates to the sub-configs
        model.config.vision_config._attn_implementation = "cpu_flash_emulated"
        model.config.text_config._attn_implementation = "sdpa"
        calls = emulated_flash_attention.calls
        got = model(**inputs).object_hidden_states
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # One varlen call per tower layer, plus one per OCI cross-attention for Lite.
    assert emulated_flash_attention.calls - calls == 2 + (2 if variant == "pixelrefer-lite" else 0)


@pytest.mark.parametrize("variant", ["pixelrefer", "pixelrefer-lite"])
def test_eager_and_sdpa_agree(variant):
    torch.manual_seed(0)
    model = PixelReferForConditionalGeneration(small_config(variant)).eval()
    inputs = synthetic_inputs(variant, sample_regions=((7, 30), (12,)))
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa = model(**inputs).logits
        model.set_attn_implementation("eager")
        eager = model(**inputs).logits
    # Padding positions attend to nothing and hold backend-specific garbage; compare the real tokens.
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(eager[real], sdpa[real], atol=1e-5, rtol=1e-5)


def test_flash_attention_request_falls_back_to_sdpa_with_one_warning(caplog):
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here, so there is nothing to fall back from")
    caplog.set_level("WARNING")
    model = PixelReferForConditionalGeneration._from_config(small_config(), attn_implementation="flash_attention_2")
    assert model.config._attn_implementation == "sdpa"
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    warnings = [r for r in caplog.records if "falls back to 'sdpa'" in r.getMessage()]
    assert len(warnings) == 1
    inputs = synthetic_inputs("pixelrefer")
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("variant", ["pixelrefer", "pixelrefer-lite"])
def test_gradients_reach_object_tokenizer_and_infusion(variant):
    torch.manual_seed(0)
    model = PixelReferForConditionalGeneration(small_config(variant)).train()
    inputs = synthetic_inputs(variant, sample_regions=((7, 30), (12,)))
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    modules = ["object_tokenizer.position_embedding", "object_tokenizer.projector"]
    if variant == "pixelrefer-lite":
        modules += [f"object_infusion.{side}_{part}" for side in ("local", "global") for part in ("norm", "attention")]
    for name, parameter in model.model.named_parameters():
        if any(name.startswith(m) for m in modules):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_region_token_count_mismatch_is_a_clear_error():
    model = PixelReferForConditionalGeneration(small_config()).eval()
    inputs = synthetic_inputs("pixelrefer", sample_regions=((7,),))
    inputs["input_ids"][0, 3] = 9  # one <REGION> slot less
    with pytest.raises(ValueError, match=r"hold 3 region tokens \(per sample \[3\]\) but the inputs produce 4"):
        model(**inputs)


def test_lite_rejects_global_images():
    model = PixelReferForConditionalGeneration(small_config("pixelrefer-lite")).eval()
    inputs = synthetic_inputs("pixelrefer-lite")
    inputs.update(
        pixel_values=torch.randn(4, 588), image_grid_thw=torch.tensor([[1, 2, 2]]), image_merge_sizes=torch.tensor([1])
    )
    with pytest.raises(ValueError, match="PixelRefer-Lite feeds no global visual tokens"):
        model(**inputs)


def test_batched_regions_equal_single_sample_regions():
    """The object tokens of a sample do not depend on the other samples of the batch."""
    torch.manual_seed(0)
    model = PixelReferForConditionalGeneration(small_config("pixelrefer-lite")).eval()
    batch = synthetic_inputs("pixelrefer-lite", sample_regions=((7, 30), (12,)), seed=1)
    with torch.no_grad():
        together = model(**batch).object_hidden_states
        first = {k: v for k, v in batch.items()}
        first.update(
            input_ids=batch["input_ids"][:1],
            attention_mask=batch["attention_mask"][:1],
            region_pixel_values=batch["region_pixel_values"][: 16 + 49],
            region_grid_thw=batch["region_grid_thw"][:2],
            region_patch_masks=batch["region_patch_masks"][: 16 + 49],
            region_boxes=batch["region_boxes"][:2],
            region_image_sizes=batch["region_image_sizes"][:2],
            region_local_pixel_values=batch["region_local_pixel_values"][:8],
            region_local_grid_thw=batch["region_local_grid_thw"][:2],
            region_local_index=batch["region_local_index"][:2],
            region_global_index=batch["region_global_index"][:2],
        )
        alone = model(**first).object_hidden_states
    torch.testing.assert_close(together[: len(alone)], alone, atol=1e-5, rtol=1e-5)
