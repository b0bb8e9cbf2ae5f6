"""Smoke tests of the benchmark scripts in `benchmarks/`: each runs with its `--smoke` settings so that the scripts
cannot rot, and the numbers they report are checked for internal consistency (not for speed)."""

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """Import a benchmark script by name, the way `python benchmarks/<name>.py` sees its folder."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(name: str):
        return importlib.import_module(name)

    yield load
    for name in [name for name in sys.modules if name.startswith(("bench_", "probe_"))]:
        del sys.modules[name]


def run(module, tmp_path: Path, *argv: str) -> dict:
    """Run `module.main` with `--smoke` into `tmp_path`, leaving the global RNG as it was; returns the JSON written."""
    with torch.random.fork_rng(devices=[]):
        module.main(["--smoke", "--output-dir", str(tmp_path), *argv])
    (json_file,) = tmp_path.glob("*.json")
    assert json_file.with_suffix(".md").read_text().startswith(("Image", "SAOT", "2 questions", "TINY", "Time"))
    return json.loads(json_file.read_text())


def test_bench_flops_counts_match_the_processor_and_the_formula(bench, tmp_path):
    results = run(bench("bench_flops"), tmp_path)["results"]
    assert {(r["variant"], r["setting"]) for r in results} == {
        (variant, setting) for variant in ("pixelrefer", "pixelrefer-lite") for setting in ("image", "video")
    }
    for r in results:
        assert r["object_tokens"] == 32
        assert (r["visual_tokens"] == 0) == (r["variant"] == "pixelrefer-lite")
        # The MLP count is exact: three d x m matmuls per token and layer (2 FLOPs per multiply-add); smoke runs use
        # 2 layers of the real 2B width.
        assert r["llm_flops"]["mlp"] == 2 * 3 * 1536 * 8960 * r["llm_tokens"] * 2
        assert r["llm_flops"]["attention"] + r["llm_flops"]["mlp"] == r["llm_flops"]["total"]
        assert r["tower_flops"] > 0
    by_key = {(r["variant"], r["setting"]): r for r in results}
    for setting in ("image", "video"):
        full, lite = by_key[("pixelrefer", setting)], by_key[("pixelrefer-lite", setting)]
        assert lite["llm_flops"]["total"] < full["llm_flops"]["total"]
        # Lite drops the projector (1152 x 1536 + 1536 x 1536 + biases) and adds OCI (two 4 x 1152^2 attentions,
        # two LayerNorms).
        projector = 1152 * 1536 + 1536 + 1536 * 1536 + 1536
        oci = 2 * (4 * 1152 * 1152 + 4 * 1152) + 2 * 2 * 1152
        assert lite["parameters"]["total"] - full["parameters"]["total"] == oci - projector


def test_bench_saot_batched_equals_loop(bench, tmp_path):
    results = run(bench("bench_saot"), tmp_path)["results"]
    assert [r["regions"] for r in results] == [1, 3]
    for r in results:
        assert r["max_abs_difference"] <= 1e-4
        assert r["regions"] <= r["object_tokens"] <= 32 * r["regions"]
        assert r["speedup"] > 0


def test_bench_saot_loop_reference_matches_kmeans(bench):
    """The benchmark's per-region k-means is an independent reference of the library's batched one."""
    from pixelrefer_hf.modeling_pixelrefer import kmeans_object_tokens

    bench_saot = bench("bench_saot")
    tokens = torch.randn(70, 16, generator=torch.Generator().manual_seed(0))
    expected = kmeans_object_tokens(tokens[None], torch.ones(1, 70, dtype=torch.bool), 8, 5)[0]
    torch.testing.assert_close(bench_saot.kmeans_loop(tokens, 8, 5, 1e-6), expected, atol=1e-5, rtol=1e-5)


def test_bench_generate_batch_answers_like_singles(bench, tmp_path):
    payload = run(bench("bench_generate"), tmp_path)
    assert payload["skipped"] == []
    results = payload["results"]
    assert [r["variant"] for r in results] == ["pixelrefer", "pixelrefer-lite"]
    for r in results:
        assert r["same_answers"], f"{r['variant']}: the batch answered differently from single calls"
        assert r["batched_peak_mib"] > 0 and r["single_peak_mib"] > 0
        assert r["batched_tokens_per_second"] > 0


def test_bench_gpu_smoke_runs_every_combination_on_cpu(bench, tmp_path):
    results = run(bench("bench_gpu"), tmp_path)["results"]
    assert {(r["variant"], r["setting"]) for r in results} == {
        (variant, setting) for variant in ("pixelrefer", "pixelrefer-lite") for setting in ("image", "video")
    }
    for r in results:
        assert r["attention"] == "sdpa"
        assert r["tokens_per_second"] > 0 and r["prefill_seconds"] > 0


def test_bench_gpu_exits_cleanly_without_cuda(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench("bench_gpu").main(["--output-dir", str(tmp_path)]) is None
    assert "needs a CUDA device" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_fuzz_smoke_run_finds_no_crash_and_no_batch_mismatch(bench, tmp_path):
    with torch.random.fork_rng(devices=[]):
        payload = bench("fuzz").main(["--smoke", "--threads", "1", "--output-dir", str(tmp_path)])
    counts = payload["counts"]
    assert payload["cases"] == sum(sum(c.values()) for c in counts.values()) >= 300
    for target in ("processor", "pipeline"):
        assert counts[target]["answered"] > 0 and counts[target]["clear ValueError"] > 0
        bugs = {k: v for k, v in counts[target].items() if k not in ("answered", "clear ValueError")}
        assert not any(bugs.values()), (bugs, payload["failures"][:5])
    assert (tmp_path / "fuzz.md").read_text().startswith("300 fuzz cases (pixelrefer, seed 0)")


def test_bench_many_questions_shares_more_as_questions_grow(bench, tmp_path):
    payload = run(bench("bench_many_questions"), tmp_path, "--threads", "1")
    timings, flops = payload["timings"], payload["flops"]
    assert {(r["variant"], r["questions"]) for r in timings} == {
        (variant, n) for variant in ("pixelrefer", "pixelrefer-lite") for n in (1, 2)
    }
    assert all(r["separate_s_per_question"] > 0 and r["shared_s_per_question"] > 0 for r in timings)
    by_key = {(r["variant"], r["questions"]): r for r in flops}
    for variant in ("pixelrefer", "pixelrefer-lite"):
        one, two = by_key[(variant, 1)], by_key[(variant, 2)]
        assert one["separate_tflops_per_question"] == two["separate_tflops_per_question"]
        # One question shares nothing (beyond the causal-square convention of the FLOP counter); two share the
        # image (PixelRefer) or the global context image (Lite).
        assert 1.0 <= one["ratio"] < 1.05 and two["ratio"] > 1.2
    assert by_key[("pixelrefer", 1)]["image_tokens"] > 0 and by_key[("pixelrefer-lite", 1)]["image_tokens"] == 0


def test_probes_find_what_the_tokens_carry_and_nothing_more(bench):
    """The probe helpers of `probe_region_tokens.py`: a target that is a linear function of the features scores near
    1, one independent of them near 0 (chance); `<REGION>` runs are split per region and miscounts are refused."""
    probes = bench("probe_region_tokens")
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 12))
    carried = features[:, :2] @ np.array([[1.0], [-2.0]])
    assert probes.probe_regression(features, carried) > 0.95
    assert probes.probe_regression(features, rng.normal(size=(300, 1))) < 0.1
    labels = (features[:, 3] > 0).astype(int)
    assert probes.probe_classification(features, labels) > 0.9
    assert probes.probe_classification(features, rng.integers(0, 4, size=300)) < 0.45
    positions = torch.tensor([3, 4, 5, 9, 10, 20])
    assert probes._runs(positions, 3) == [3, 2, 1]
    with pytest.raises(RuntimeError, match="expected 2 runs"):
        probes._runs(positions, 2)
