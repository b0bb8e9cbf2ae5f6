"""Fine-tuning: the collator's labels and error handling, LoRA with TRL, adapter/merge equivalence, per-module learning
rates, and a two-process run of the example script through `accelerate launch`."""

import importlib.util
import logging as std_logging
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from fresh_process import run_process_tree
from peft import PeftModel
from synthetic_inputs import box_mask
from synthetic_inputs import random_pil_image as random_image
from transformers import AutoModelForImageTextToText
from trl import SFTConfig

from pixelrefer_hf.collator import IGNORE_INDEX, PixelReferDataCollator
from pixelrefer_hf.data import build_region_chat_dataset, make_region_chat_row, synthetic_region_chat_dataset
from pixelrefer_hf.testing import tiny_model_and_processor

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ["pixelrefer", "pixelrefer-lite"]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image_row(row_id: str, question: str = "What is <region>?", answer: str = "A red square.", num_regions: int = 1):
    masks = [box_mask(56, 84, (5 + 10 * k, 25 + 10 * k), (10, 40)) for k in range(num_regions)]
    return make_region_chat_row(
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        image=random_image(56, 84),
        regions=masks,
        id=row_id,
    )


def video_row(row_id: str) -> dict:
    frames = [random_image(56, 56, seed=t) for t in range(3)]
    return make_region_chat_row(
        [
            {"role": "user", "content": "<video>\nDescribe <region>."},
            {"role": "assistant", "content": "It moves left."},
            {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": "It stops."},
        ],
        frames=frames,
        timestamps=[0.0, 0.5, 1.0],
        regions=[{0: [0, 0, 20, 20], 2: [10, 10, 40, 30]}],
        id=row_id,
    )


@pytest.fixture(scope="module")
def tiny():
    return {variant: tiny_model_and_processor(variant) for variant in VARIANTS}


@pytest.fixture(scope="module")
def mixed_rows():
    rows = [
        image_row("img"),
        video_row("vid"),
        make_region_chat_row(
            [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}], id="text"
        ),
    ]
    dataset = build_region_chat_dataset(rows)
    return [dataset[i] for i in range(len(dataset))]


# ---------------------------------------------------------------------------------------------------------------------
# Labels and model consumption
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_labels_cover_exactly_the_assistant_tokens(tiny, mixed_rows, variant):
    _, processor = tiny[variant]
    tokenizer = processor.tokenizer
    batch = PixelReferDataCollator(processor)(mixed_rows)
    answers = [["A red square."], ["It moves left.", "It stops."], ["yes"]]
    assistant_header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    for row, row_answers in enumerate(answers):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        supervised = labels != IGNORE_INDEX
        assert torch.equal(labels[supervised], ids[supervised])
        # Supervised positions = the answers' own tokens plus their <|im_end|>, turn by turn, nothing else.
        expected = [tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False) for answer in row_answers]
        positions = torch.nonzero(supervised).flatten().tolist()
        assert len(positions) == sum(len(tokens) for tokens in expected)
        start = 0
        for tokens in expected:
            span = positions[start : start + len(tokens)]
            assert span == list(range(span[0], span[0] + len(tokens)))  # contiguous
            assert ids[span].tolist() == tokens
            # Directly preceded by the assistant header, i.e. the whole prompt is masked.
            assert ids[span[0] - len(assistant_header) : span[0]].tolist() == assistant_header
            start += len(tokens)
        # Padding (right side) is never supervised.
        assert not supervised[batch["attention_mask"][row] == 0].any()
    assert batch["attention_mask"][:, 0].all()  # right padding
    assert not (batch["labels"] == processor.region_token_id).any()
    assert not (batch["labels"] == processor.image_token_id).any()


@pytest.mark.parametrize("variant", VARIANTS)
def test_collated_region_tokens_match_what_the_model_consumes(tiny, mixed_rows, variant):
    model, processor = tiny[variant]
    batch = PixelReferDataCollator(processor)(mixed_rows)
    with torch.no_grad():
        output = model(**batch)
    num_region_tokens = int((batch["input_ids"] == model.config.region_token_id).sum())
    assert num_region_tokens > 0
    assert output.object_hidden_states.shape[0] == num_region_tokens
    assert torch.isfinite(output.loss)
    if variant == "pixelrefer":
        assert output.image_hidden_states.shape[0] == int((batch["input_ids"] == model.config.image_token_id).sum())
    else:
        assert "pixel_values" not in batch


# ---------------------------------------------------------------------------------------------------------------------
# Bad samples
# ---------------------------------------------------------------------------------------------------------------------


def bad_rows(tmp_path) -> dict[str, tuple[dict, str]]:
    """Name -> (bad row, fragment of the expected error)."""
    placeholder = image_row("bad-placeholder", question="What is <region> next to <region>?")
    corrupt_rle = image_row("bad-rle")
    corrupt_rle["regions"][0][0]["rle"] = {"size": [56, 84], "counts": "0000"}
    missing_file = image_row("bad-file")
    missing_file["image"] = str(tmp_path / "missing.png")
    empty = image_row("bad-empty")
    empty["messages"] = []
    no_answer = image_row("bad-no-answer")
    no_answer["messages"] = no_answer["messages"][:1]
    return {
        "placeholder": (placeholder, "2 <region> placeholder(s) but 1 region(s)"),
        "rle": (corrupt_rle, "RLE does not decode"),
        "file": (missing_file, "missing.png': no such file"),
        "empty": (empty, "the conversation is empty"),
        "no_answer": (no_answer, "no assistant turn"),
    }


@pytest.mark.parametrize("kind", ["placeholder", "rle", "file", "empty", "no_answer"])
def test_bad_sample_raises_naming_the_sample(tiny, tmp_path, kind):
    _, processor = tiny["pixelrefer"]
    row, fragment = bad_rows(tmp_path)[kind]
    dataset = build_region_chat_dataset([image_row("good-0"), row])
    with pytest.raises(ValueError, match=re.escape(f"dataset sample {row['id']!r}") + ".*" + re.escape(fragment)):
        PixelReferDataCollator(processor)([dataset[0], dataset[1]])


def test_skip_bad_samples_drops_and_counts(tiny, tmp_path, caplog):
    model, processor = tiny["pixelrefer"]
    bad = [row for row, _ in bad_rows(tmp_path).values()]
    dataset = build_region_chat_dataset([image_row("good-0"), *bad, image_row("good-1", answer="A blue circle.")])
    collator = PixelReferDataCollator(processor, skip_bad_samples=True)
    logger = std_logging.getLogger("pixelrefer_hf")
    logger.addHandler(caplog.handler)
    try:
        batch = collator([dataset[i] for i in range(len(dataset))])
    finally:
        logger.removeHandler(caplog.handler)
    assert batch["input_ids"].shape[0] == 2
    assert collator.num_skipped == len(bad)
    assert f"skipped {len(bad)} of {len(bad) + 2} samples" in caplog.text
    for row in bad:
        assert repr(row["id"]) in caplog.text
    tokenizer = processor.tokenizer
    answers = [
        tokenizer.decode(ids[labels != IGNORE_INDEX])
        for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True)
    ]
    assert answers == ["A red square.<|im_end|>", "A blue circle.<|im_end|>"]
    with torch.no_grad():
        model(**batch)


def test_batch_of_only_bad_samples_raises(tiny, tmp_path):
    _, processor = tiny["pixelrefer"]
    bad = [row for row, _ in bad_rows(tmp_path).values()]
    dataset = build_region_chat_dataset(bad)
    with pytest.raises(ValueError, match="every sample of the batch is bad"):
        PixelReferDataCollator(processor, skip_bad_samples=True)([dataset[i] for i in range(len(dataset))])


def test_too_long_sample_is_never_cut_through_region_tokens(tiny):
    _, processor = tiny["pixelrefer"]
    rows = [
        image_row("short", question="<region>?"),
        image_row("long", question="Compare " + "<region> " * 3, num_regions=3),
    ]
    dataset = build_region_chat_dataset(rows)
    full = PixelReferDataCollator(processor)([dataset[0], dataset[1]])
    lengths = full["attention_mask"].sum(-1).tolist()
    limit = lengths[0] + 2  # the short row fits; the long one would lose visual or region tokens
    with pytest.raises(ValueError, match=r"dataset sample 'long'.*cut through"):
        PixelReferDataCollator(processor, max_length=limit)([dataset[0], dataset[1]])
    collator = PixelReferDataCollator(processor, max_length=limit, skip_bad_samples=True)
    batch = collator([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 1 and collator.num_skipped == 1
    assert torch.equal(batch["input_ids"][0], full["input_ids"][0, : lengths[0]])


def test_truncation_that_removes_the_whole_answer_is_an_error(tiny):
    _, processor = tiny["pixelrefer"]
    dataset = build_region_chat_dataset([image_row("a", answer="A red square and a blue circle.")])
    full = PixelReferDataCollator(processor)([dataset[0]])
    prompt_length = int(torch.nonzero(full["labels"][0] != IGNORE_INDEX)[0])  # position of the first answer token
    truncated = PixelReferDataCollator(processor, max_length=prompt_length + 2)([dataset[0]])
    assert int((truncated["labels"] != IGNORE_INDEX).sum()) == 2  # text-only truncation keeps the answer's start
    with pytest.raises(ValueError, match=r"dataset sample 'a'.*no answer token is left"):
        PixelReferDataCollator(processor, max_length=prompt_length)([dataset[0]])


# ---------------------------------------------------------------------------------------------------------------------
# LoRA with TRL, adapter reload, merge
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Run examples/finetune_lora.py in-process: 4 steps on 4 synthetic rows (the same batch every step)."""
    example = load_example("finetune_lora")
    output_dir = tmp_path_factory.mktemp("lora")
    script_args = example.ScriptArguments(num_synthetic_samples=4, lora_r=8, lora_alpha=16, lora_dropout=0.0)
    training_args = SFTConfig(
        **{
            **example.default_training_arguments(),
            "bf16": False,
            "use_cpu": True,
            "learning_rate": 5e-3,
            "warmup_steps": 0,
            "lr_scheduler_type": "constant",
            "per_device_train_batch_size": 4,
            "max_steps": 4,
            "disable_tqdm": True,
            "output_dir": str(output_dir),
        }
    )
    example.main(script_args, training_args)
    dataset = synthetic_region_chat_dataset(4)
    _, processor = tiny_model_and_processor("pixelrefer")
    batch = PixelReferDataCollator(processor)([dataset[i] for i in range(4)])
    return output_dir, batch


def test_lora_steps_lower_the_loss_and_train_only_the_intended_modules(lora_run):
    adapter_dir, batch = lora_run
    base, _ = tiny_model_and_processor("pixelrefer")
    with torch.no_grad():
        loss_before = base(**batch).loss.item()
    tuned = PeftModel.from_pretrained(tiny_model_and_processor("pixelrefer")[0], adapter_dir).eval()
    with torch.no_grad():
        loss_after = tuned(**batch).loss.item()
    print(f"loss on the training batch: {loss_before:.3f} before, {loss_after:.3f} after")
    assert loss_after < loss_before - 0.5, (loss_before, loss_after)

    # LoRA only inside the language model; SAOT and the projector saved in full; the vision tower untouched.
    state = tuned.state_dict()
    lora_keys = [key for key in state if "lora_" in key]
    assert lora_keys and all(".language_model." in key for key in lora_keys)
    assert any("object_tokenizer.modules_to_save" in key for key in state)
    assert any("model.projector.modules_to_save" in key for key in state)
    assert not any("vision_model" in key and ("lora_" in key or "modules_to_save" in key) for key in state)
    # The fully trained modules did receive gradients through TRL's backbone call and gradient checkpointing.
    for name, module in [("object_tokenizer", base.model.object_tokenizer), ("model.projector", base.model.projector)]:
        trained = {
            key.split(".modules_to_save.default.")[1]: value
            for key, value in state.items()
            if f"{name}.modules_to_save.default." in key
        }
        assert any(not torch.equal(value, module.state_dict()[key]) for key, value in trained.items()), name


def test_adapter_reload_and_merge_give_the_same_logits(lora_run, tmp_path):
    """In float64, so that the comparison sees the merge itself rather than float32 rounding (in float32 the merged
    logits differ from the adapter's by ~1.5e-5 on logits of magnitude ~7, i.e. ~2e-6 relative)."""
    adapter_dir, batch = lora_run
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    with torch.no_grad():
        first = PeftModel.from_pretrained(tiny_model_and_processor("pixelrefer")[0].double(), adapter_dir).eval()
        logits = first(**batch).logits
        second = PeftModel.from_pretrained(tiny_model_and_processor("pixelrefer")[0].double(), adapter_dir).eval()
        torch.testing.assert_close(second(**batch).logits, logits, atol=1e-5, rtol=0)

        merge_example = load_example("merge_lora")
        merge_example.merge(
            merge_example.MergeArguments(adapter_path=str(adapter_dir), output_dir=str(tmp_path), dtype="float64")
        )
        merged = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True).eval()
        assert merged.dtype == torch.float64
        assert not any("lora_" in name or "modules_to_save" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**batch).logits, logits, atol=1e-5, rtol=0)
        # The adapter changed the model: a merge that silently dropped it would still match the base.
        base_logits = tiny_model_and_processor("pixelrefer")[0].double()(**batch).logits
        assert (base_logits - logits).abs().max() > 1e-2
    assert (tmp_path / "modeling_pixelrefer.py").exists() and (tmp_path / "processor_config.json").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Full training: per-module learning rates
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "stage", "object_lr"), [("pixelrefer", 1, 1e-3), ("pixelrefer-lite", 2, 1e-5)])
def test_stage_trainer_learning_rates(tmp_path, variant, stage, object_lr):
    example = load_example("train_stage")
    model, processor = tiny_model_and_processor(variant)
    model.model.vision_model.requires_grad_(False)
    args = SFTConfig(
        **{
            **example.default_training_arguments(),
            "bf16": False,
            "use_cpu": True,
            "max_steps": 1,
            "warmup_steps": 0,
            "disable_tqdm": True,
            "output_dir": str(tmp_path),
        }
    )
    trainer = example.StageTrainer(
        model=model,
        args=args,
        train_dataset=synthetic_region_chat_dataset(2),
        data_collator=PixelReferDataCollator(processor),
        processing_class=processor,
        object_learning_rate=example.OBJECT_LEARNING_RATES[stage],
    )
    optimizer = trainer.create_optimizer()  # what trainer.train() uses
    object_params = {id(p) for name, p in model.named_parameters() if ".object_" in name}
    vision_params = {id(p) for p in model.model.vision_model.parameters()}
    other_group, object_group = optimizer.param_groups
    assert object_group["lr"] == object_lr and other_group["lr"] == 1e-5
    assert {id(p) for p in object_group["params"]} == object_params
    assert not vision_params & {id(p) for p in other_group["params"]}
    assert len(other_group["params"]) + len(object_group["params"]) == sum(p.requires_grad for p in model.parameters())
    if stage == 1:  # one real step (for one case only, to keep the suite fast)
        vision_before = model.model.vision_model.embeddings.patch_embedding.weight.clone()
        object_before = model.model.object_tokenizer.position_embedding.weight.clone()
        trainer.train()
        assert torch.equal(model.model.vision_model.embeddings.patch_embedding.weight, vision_before)
        assert not torch.equal(model.model.object_tokenizer.position_embedding.weight, object_before)


# ---------------------------------------------------------------------------------------------------------------------
# Multi-process
# ---------------------------------------------------------------------------------------------------------------------


def test_two_process_accelerate_launch_runs_the_lora_script(tmp_path):
    """`accelerate launch` with the GPU DDP config, two CPU processes (gloo backend), two optimizer steps (Lite, so
    that its OCI goes through LoRA's `modules_to_save` and DDP too)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "examples" / "accelerate" / "ddp.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29517",
        str(REPO / "examples" / "finetune_lora.py"),
        "--output_dir", str(tmp_path), "--use_cpu", "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--num_synthetic_samples", "8", "--disable_tqdm", "true", "--variant", "pixelrefer-lite",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # 15-50 s on 2 shared cores; a rank stuck at exit fails the test, and is killed with every other process of the run.
    result, leftover = run_process_tree(command, env, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    assert not leftover, f"processes alive after `accelerate launch` returned:\n{leftover}"
    # 8 rows, 2 per process and step: two steps are one full epoch only when both processes take part.
    summary = [line for line in result.stdout.splitlines() if "train_runtime" in line]
    assert summary and "'epoch': '1'" in summary[-1], result.stdout[-2000:]
    assert (tmp_path / "adapter_model.safetensors").exists()


END_TRAINING_SCRIPT = """
import gc, os, time
import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (first, as with transformers: imported later, it keeps handles on the group)
from torch.nn.parallel import DistributedDataParallel
from pixelrefer_hf.training_utils import end_training

class AcceleratorWithoutBarrier:  # `end_training` calls these two; no barrier, so rank 1's all_gather is in flight
    def wait_for_everyone(self):
        pass

    def end_training(self):
        dist.destroy_process_group()

def gloo_threads():
    names = [open(f"/proc/self/task/{task}/comm").read() for task in os.listdir("/proc/self/task")]
    return sum(name.startswith("pt_gloo") for name in names)

rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
model = DistributedDataParallel(torch.nn.Linear(4, 4))
model(torch.randn(2, 4)).sum().backward()
if rank == 0:
    time.sleep(3)  # rank 1 is in end_training by now
    dist.all_gather([torch.empty(100) for _ in range(2)], torch.ones(100))
else:  # the work handle is dropped: once gloo is done, its worker frees the tensors, which takes the GIL
    dist.all_gather([torch.empty(100) for _ in range(2)], torch.ones(100), async_op=True)
before = gloo_threads()
end_training(AcceleratorWithoutBarrier())
after = gloo_threads()
del model  # as when a script's `main` returns
gc.collect()
print(f"rank {rank} gloo threads: {before} -> {after}", flush=True)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts gloo's threads in Linux's /proc")
def test_end_training_destroys_the_gloo_group_without_deadlocking_on_its_threads(tmp_path):
    """The examples' `end_training` on two gloo processes, while rank 1's gloo worker has yet to free an all_gather's
    tensors (which takes the GIL). The group must be gone when it returns: after accelerate's `end_training()`, DDP's
    Reducer destroys it when the model is freed, with the GIL held, and rank 1 deadlocks here every time."""
    script = tmp_path / "end_training.py"
    script.write_text(END_TRAINING_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result, leftover = run_process_tree(command, {**os.environ, "OMP_NUM_THREADS": "1"}, timeout=60)  # 12 s normally
    assert result.returncode == 0, result.stderr[-4000:]
    assert not leftover, f"processes alive after the launcher returned:\n{leftover}"
    threads = dict(re.findall(r"rank (\d) gloo threads: (\d+ -> \d+)", result.stdout))
    assert threads.keys() == {"0", "1"}, result.stdout[-2000:]
    assert all(count.endswith("-> 0") and not count.startswith("0 ") for count in threads.values()), threads
