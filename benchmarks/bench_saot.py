"""Object-tokenizer (SAOT) throughput: our batched aggregation against a per-region loop of the same maths.

    python benchmarks/bench_saot.py                  # full run, writes benchmarks/results/saot.{json,md}
    python benchmarks/bench_saot.py --smoke --output-dir /tmp/saot   # seconds (CI smoke test)

Both sides take the same tower output of the crops (random features, the tower itself is not timed) and return the
object tokens at the LLM width:

* batched: `PixelReferObjectTokenizer.aggregate` (position embedding, masked gather, k-means vectorised over all
  regions) then its projector, once for the whole batch;
* loop: what the official region encoder does, written out here: per region, add the position embedding, gather the
  masked patches, and when there are more than n of them run k-means with a dense `(tokens, clusters, dim)` distance
  tensor and a Python loop over the clusters for the means; then one projector call on the concatenation. The loop
  starts from the same initial centroids as the batched k-means (evenly spaced patches), so outputs must agree.

Widths are the real ones (1152 in, the LLM width out, n = 32, 5 k-means iterations); crops have 40-300 patches, masks
cover 30-90% of them. Outputs are checked to agree within 1e-4 before anything is timed. Runs on the CPU, and on CUDA
too when present. The projector costs both sides the same, so the speedup is also reported without it (aggregation
only: position embedding, gather, k-means).
"""

import argparse
from functools import partial

import torch
from bench_utils import add_run_arguments, best_seconds, markdown_table, parse_run_arguments, real_config, write_results

from pixelrefer_hf import PixelReferObjectTokenizer
from pixelrefer_hf.modeling_pixelrefer import relative_box_positions


def make_regions(num_regions: int, vision_width: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random crops of 40-300 patches with an elliptic mask covering roughly 30-90% of each crop."""
    grids, masks = [], []
    while len(grids) < num_regions:
        h, w = torch.randint(5, 21, (2,), generator=generator).tolist()
        if not 40 <= h * w <= 300:
            continue
        rows = (torch.arange(h).float() + 0.5) / h - 0.5
        cols = (torch.arange(w).float() + 0.5) / w - 0.5
        radius = 0.35 + 0.25 * torch.rand((), generator=generator)
        masks.append(((rows[:, None] ** 2 + cols[None, :] ** 2) <= radius**2).flatten().float())
        grids.append([1, h, w])
    grid_thw = torch.tensor(grids)
    num_patches = int(grid_thw.prod(-1).sum())
    image_sizes = torch.tensor([[480, 640]]).expand(num_regions, 2).clone()
    top_left = torch.randint(0, 200, (num_regions, 2), generator=generator)
    boxes = torch.cat([top_left, top_left + grid_thw[:, 1:] * 14], dim=-1).float()
    return {
        "crop_features": torch.randn(num_patches, vision_width, generator=generator),
        "grid_thw": grid_thw,
        "patch_masks": torch.cat(masks),
        "boxes": boxes,
        "image_sizes": image_sizes,
    }


def batched_aggregate(tokenizer: PixelReferObjectTokenizer, regions: dict[str, torch.Tensor]) -> torch.Tensor:
    """Our implementation: one `aggregate` call for all regions; the valid tokens, vision width."""
    tokens, valid = tokenizer.aggregate(**regions)
    return tokens[valid]


def batched_tokens(tokenizer: PixelReferObjectTokenizer, regions: dict[str, torch.Tensor]) -> torch.Tensor:
    """`batched_aggregate`, then the projector to the LLM width."""
    return tokenizer.projector(batched_aggregate(tokenizer, regions))


def kmeans_loop(tokens: torch.Tensor, num_clusters: int, num_iterations: int, tolerance: float) -> torch.Tensor:
    """Per-region k-means the way the official code writes it: dense distances, one mean per cluster in Python."""
    initial = (torch.arange(num_clusters, device=tokens.device) * len(tokens)) // num_clusters
    centroids = tokens[initial]
    for _ in range(num_iterations):
        # (tokens, 1, dim) - (1, clusters, dim) -> (tokens, clusters, dim) -> squared distance (tokens, clusters).
        distances = ((tokens[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
        labels = distances.argmin(-1)
        new_centroids = torch.stack(
            [tokens[labels == k].mean(0) if bool((labels == k).any()) else centroids[k] for k in range(num_clusters)]
        )
        if torch.allclose(centroids, new_centroids, atol=tolerance):
            break
        centroids = new_centroids
    return centroids


def loop_aggregate(tokenizer: PixelReferObjectTokenizer, regions: dict[str, torch.Tensor]) -> torch.Tensor:
    """The per-region reference of `batched_aggregate`: same maths, one region at a time."""
    outputs = []
    patch_offset = 0
    for index, (_, h, w) in enumerate(regions["grid_thw"].tolist()):
        features = regions["crop_features"][patch_offset : patch_offset + h * w]
        mask = regions["patch_masks"][patch_offset : patch_offset + h * w] > 0
        patch_offset += h * w
        positions = relative_box_positions(
            regions["grid_thw"][index : index + 1, 1:],
            regions["boxes"][index : index + 1],
            regions["image_sizes"][index : index + 1],
            tokenizer.legacy_box_position,
        )
        features = (features + tokenizer.position_embedding(positions.to(features.dtype))).float()[mask]
        if len(features) > tokenizer.num_object_tokens:
            features = kmeans_loop(
                features, tokenizer.num_object_tokens, tokenizer.kmeans_iterations, tokenizer.kmeans_tolerance
            )
        outputs.append(features)
    return torch.cat(outputs)


def loop_tokens(tokenizer: PixelReferObjectTokenizer, regions: dict[str, torch.Tensor]) -> torch.Tensor:
    """`loop_aggregate`, then one projector call on all tokens (as the official region encoder)."""
    return tokenizer.projector(loop_aggregate(tokenizer, regions))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2b", choices=["2b", "7b"], help="sets the LLM width of the projector")
    parser.add_argument("--regions", default="1,16,64", help="comma-separated numbers of regions")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per measurement, interleaved (fastest reported)"
    )
    parser.add_argument("--smoke", action="store_true", help="regions 1,3 and one repeat (CI)")
    add_run_arguments(parser, timed_on_cpu=True)
    args = parse_run_arguments(parser, argv)
    if args.smoke:
        args.regions, args.repeats = "1,3", 1

    config = real_config(args.size, "pixelrefer")
    torch.manual_seed(0)
    base = PixelReferObjectTokenizer(config).eval()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for device in devices:
        tokenizer = base.to(device)
        for num_regions in [int(value) for value in args.regions.split(",")]:
            generator = torch.Generator().manual_seed(num_regions)
            regions = make_regions(num_regions, config.vision_config.hidden_size, generator)
            regions = {key: value.to(device) for key, value in regions.items()}
            with torch.no_grad():
                batched, looped = batched_tokens(tokenizer, regions), loop_tokens(tokenizer, regions)
                max_difference = float((batched - looped).abs().max())
                if batched.shape != looped.shape or max_difference > 1e-4:
                    raise ValueError(
                        f"{num_regions} regions on {device}: batched and per-region tokens differ (shapes "
                        f"{tuple(batched.shape)} / {tuple(looped.shape)}, max abs difference {max_difference:.2e})."
                    )
                functions = {
                    "batched": partial(batched_tokens, tokenizer, regions),
                    "loop": partial(loop_tokens, tokenizer, regions),
                    "batched_aggregate": partial(batched_aggregate, tokenizer, regions),
                    "loop_aggregate": partial(loop_aggregate, tokenizer, regions),
                }
                seconds = best_seconds(functions, args.repeats)
                batched_s, loop_s = seconds["batched"], seconds["loop"]
            results.append(
                {
                    "device": device,
                    "regions": num_regions,
                    "patches": int(regions["grid_thw"][:, 1:].prod(-1).sum()),
                    "masked_patches": int((regions["patch_masks"] > 0).sum()),
                    "object_tokens": int(batched.shape[0]),
                    "max_abs_difference": max_difference,
                    "batched_seconds": batched_s,
                    "loop_seconds": loop_s,
                    "batched_regions_per_second": num_regions / batched_s,
                    "loop_regions_per_second": num_regions / loop_s,
                    "speedup": loop_s / batched_s,
                    "batched_aggregate_seconds": seconds["batched_aggregate"],
                    "loop_aggregate_seconds": seconds["loop_aggregate"],
                    "aggregate_speedup": seconds["loop_aggregate"] / seconds["batched_aggregate"],
                }
            )

    rows = [
        [
            r["device"],
            r["regions"],
            r["masked_patches"],
            r["object_tokens"],
            r["loop_regions_per_second"],
            r["batched_regions_per_second"],
            f"{r['speedup']:.1f}x",
            f"{r['aggregate_speedup']:.1f}x",
            f"{r['max_abs_difference']:.1e}",
        ]
        for r in results
    ]
    headers = [
        "device",
        "regions",
        "masked patches",
        "object tokens",
        "loop regions/s",
        "batched regions/s",
        "speedup",
        "speedup without projector",
        "max abs diff",
    ]
    table = (
        f"SAOT aggregation + projector, 1152 -> {config.text_config.hidden_size}, n = {config.num_object_tokens}, "
        f"{config.kmeans_iterations} k-means iterations, best of {args.repeats} interleaved runs, "
        f"{torch.get_num_threads()} CPU threads.\n\n" + markdown_table(headers, rows)
    )
    payload = {"settings": {"size": args.size, "repeats": args.repeats, "smoke": args.smoke}, "results": results}
    write_results("saot", payload, table, args.output_dir)
    return payload


if __name__ == "__main__":
    main()
