"""Fine-tuning on `preprocess --format chat` shards, from a Hugging Face model (train.init_from):

- the first step's loss is transformers' loss on the same weights, computed document by document
  with labels -100 outside the answers and combined per token over the global batch (1e-5), packed
  (several conversations per sequence) and unpacked (data.pack false); the same batch with the mask
  off, with attention across the packed conversations, or as a mean of per-micro-batch means (what
  the loss would be if answer tokens did not weigh the same in every micro-batch) is far outside;
- TP=2 x PP=2 x DP=2 (ZeRO-1) and TP=2 x DP=2 (ZeRO-3) reproduce the one-rank per-step losses
  within the pretraining equivalence tolerance, with uneven answer lengths across micro-batches;
- a run resumed from a mid-run checkpoint trains the remaining step bit for bit;
- masked tokens get exactly zero gradient; the data cycles through epochs, reshuffled."""
import json
import os
import random
from pathlib import Path

import pytest
import torch
from finetune_model import tiny_qwen2
from multirank import launch
from run_config import sections, write_json

from gridtrain.data.config import DataConfig
from gridtrain.data.finetune import build_finetune_datasets
from gridtrain.data.preprocess import PreprocessOptions, preprocess
from gridtrain.data.tokenizer import load_tokenizer
from gridtrain.model.loss import lm_loss

WORKER = Path(__file__).parent / "run_worker.py"
TOLERANCE = 1e-5
LOSS_RTOL = 2e-6  # tests/parallel/test_equivalence.py
SEQ, BATCH, STEPS = 64, 8, 3
WORDS = "the model reads a short answer about rivers cities numbers and colors in plain words".split()


def conversations(count: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)

    def say(low, high):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    out = []
    for _ in range(count):
        messages = [{"role": "system", "content": say(1, 4)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 2)):
            messages += [{"role": "user", "content": say(1, 6)}, {"role": "assistant", "content": say(1, 14)}]
        out.append(messages)
    return out


@pytest.fixture(scope="module")
def sft(tmp_path_factory, hf_tokenizers) -> dict:
    """A tiny Qwen2 model (transformers, random weights) with the session's ChatML tokenizer, and
    120 conversations preprocessed with --format chat."""
    root = tmp_path_factory.mktemp("sft")
    folder = root / "qwen2-tiny"
    model = tiny_qwen2(hf_tokenizers["qwen2"], folder)
    source = root / "chat.jsonl"
    source.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations(120)))
    preprocess(PreprocessOptions(inputs=(str(source),), tokenizer=str(folder), output_prefix=str(root / "chat"),
                                 format="chat"), open(os.devnull, "w"))
    return {"root": root, "folder": folder, "prefix": str(root / "chat"), "model": model}


def run_config(sft: dict, name: str, tp=1, pp=1, zero=1, pack=True, steps=STEPS, resume="auto",
               interval=0) -> tuple[Path, Path]:
    run_dir = sft["root"] / name
    config = sections(
        {"tokenizer": str(sft["folder"]), "prefix": sft["prefix"]}, run_dir, model=sft["model"],
        parallel={"tensor_parallel": tp, "pipeline_parallel": pp, "zero_stage": zero},
        data={"split": "90,10,0", "seq_length": SEQ, "pack": pack}, optim={"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1},
        train={"steps": steps, "global_batch_size": BATCH, "micro_batch_size": 1, "init_from": str(sft["folder"]),
               "resume": resume},
        checkpoint={"interval_steps": interval, "keep_last": 0})
    return write_json(sft["root"] / f"{name}.json", config), run_dir


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def first_batch(sft: dict, pack: bool):
    data = DataConfig(blend=((1, sft["prefix"]),), split="90,10,0", seq_length=SEQ, tokenizer=str(sft["folder"]),
                      pack=pack)
    return build_finetune_datasets(data, (BATCH, 0, 0), pad_id=load_tokenizer(sft["folder"]).eod)[0]


def transformers_losses(sft: dict, dataset) -> dict:
    """Over the first global batch: the per-token loss of transformers document by document, and
    the three negative controls."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sft["folder"]).eval()
    answer_sum = answer_count = all_sum = all_count = cross_sum = 0.0
    micro_means = []
    with torch.no_grad():
        for i in range(BATCH):
            sample_sum = sample_count = 0.0
            for tokens, mask in dataset._pieces(i):
                ids = torch.from_numpy(tokens)[None]
                labels = torch.where(torch.from_numpy(mask)[None] == 1, ids, -100)
                count = float((labels[0, 1:] != -100).sum())
                if count:
                    sample_sum += model(ids, labels=labels).loss.item() * count
                    sample_count += count
                all_sum += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
                all_count += ids.shape[1] - 1
            answer_sum, answer_count = answer_sum + sample_sum, answer_count + sample_count
            micro_means.append(sample_sum / max(sample_count, 1))
            # Attention across the packed conversations: the whole sequence as one document.
            item = dataset[i]
            logits = model(item["tokens"][None]).logits[0]
            losses = torch.nn.functional.cross_entropy(logits, item["labels"], reduction="none")
            cross_sum += float((losses * item["loss_mask"]).sum())
    return {"loss": answer_sum / answer_count, "mask_off": all_sum / all_count,
            "across": cross_sum / answer_count, "mean_of_means": sum(micro_means) / len(micro_means)}


def test_masked_tokens_get_exactly_zero_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 0, 0, 0, 1, 1]], dtype=torch.float32)
    from megatron.core import parallel_state  # the vocab-parallel loss asks for the TP group

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        lm_loss(logits.clone(), labels, mask, torch.tensor([2.5])).backward()
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
    grad = logits.grad.abs().sum(-1)
    assert torch.all(grad[mask == 0] == 0) and torch.all(grad[mask == 1] > 0)


def test_fine_tuning_loss_equals_transformers_and_every_layout_reproduces_it(sft):
    packed, unpacked = first_batch(sft, True), first_batch(sft, False)
    assert sum(len(list(packed._pieces(i))) for i in range(BATCH)) > BATCH  # several conversations per sample
    expected, expected_unpacked = transformers_losses(sft, packed), transformers_losses(sft, unpacked)

    one_ckpt = sft["root"] / "one" / "checkpoints" / "step_00000002"
    launches = {1: {"one": {"interval": 1}, "unpacked": {"pack": False, "steps": 1}, "resumed": {"resume": str(one_ckpt)}},
                8: {"tp2-pp2-dp2": {"tp": 2, "pp": 2, "zero": 1}}, 4: {"tp2-dp2-zero3": {"tp": 2, "zero": 3}}}
    runs = {}
    for nproc, named in launches.items():  # the one-rank runs in one launch, in order (run_worker.py)
        configs = {name: run_config(sft, name, **options) for name, options in named.items()}
        launch(WORKER, nproc, [config for config, _ in configs.values()], timeout=600)
        runs.update({name: records(run_dir) for name, (_, run_dir) in configs.items()})

    first = runs["one"][0]
    assert abs(first["loss"] - expected["loss"]) <= TOLERANCE * expected["loss"], (first["loss"], expected)
    assert abs(runs["unpacked"][0]["loss"] - expected_unpacked["loss"]) <= TOLERANCE * expected_unpacked["loss"]
    assert first["loss_tokens"] == packed.loss_tokens(0, BATCH)
    # Each control is a real difference well outside the tolerance (measured: mask off 7e-3, attention
    # across conversations 6e-4 at these random weights, mean of micro-batch means 2e-3, relative).
    for control in ("mask_off", "across", "mean_of_means"):
        assert abs(expected[control] - expected["loss"]) > 20 * TOLERANCE * expected["loss"], (control, expected)

    # Resumed from the step-2 checkpoint: step 3 alone, on the same samples, bit for bit.
    assert [(r["step"], r["loss"], r["loss_tokens"]) for r in runs["resumed"]] == [
        (r["step"], r["loss"], r["loss_tokens"]) for r in runs["one"][2:]]
    reference = [r["loss"] for r in runs["one"]]
    assert len(set(reference)) == STEPS
    for name in ("tp2-pp2-dp2", "tp2-dp2-zero3"):
        losses = [r["loss"] for r in runs[name]]
        assert max(abs(a - b) / abs(b) for a, b in zip(losses, reference)) <= LOSS_RTOL, (name, losses, reference)
        assert [r["loss_tokens"] for r in runs[name]] == [r["loss_tokens"] for r in runs["one"]]


def test_small_data_cycles_through_reshuffled_epochs(sft):
    data = DataConfig(blend=((2, sft["prefix"]),), split="90,10,0", seq_length=SEQ, tokenizer=str(sft["folder"]))
    train = build_finetune_datasets(data, (400, 0, 0), pad_id=0)[0]
    assert len(train) == 400 and train.stats.epochs >= 2 and train.stats.documents == 2 * 108
    assert train.stats.efficiency > 0.9
    first_epoch = [int(d) for d in train.pieces_doc[:train.stats.documents]]
    assert sorted(first_epoch) == list(range(train.stats.documents))  # every document once per epoch
    second = [int(d) for d in train.pieces_doc[train.stats.documents:2 * train.stats.documents]]
    assert second != first_epoch  # reshuffled
    again = build_finetune_datasets(data, (400, 0, 0), pad_id=0)[0]
    assert all(torch.equal(train[i]["tokens"], again[i]["tokens"]) for i in (0, 137, 399))


def test_a_split_without_documents_and_nothing_left_after_drop_are_one_line(sft):
    from gridtrain.errors import ConfigError

    data = DataConfig(blend=((1, sft["prefix"]),), split="999,1,0", seq_length=SEQ, tokenizer=str(sft["folder"]))
    with pytest.raises(ConfigError, match=r"data.split='999,1,0': the valid split gets none of the fine-tuning"):
        build_finetune_datasets(data, (8, 8, 0), pad_id=0)
    data = DataConfig(blend=((1, sft["prefix"]),), split="90,10,0", seq_length=4, tokenizer=str(sft["folder"]),
                      overlong="drop")
    with pytest.raises(ConfigError, match=r"data.overlong='drop': every document of the train split is longer"):
        build_finetune_datasets(data, (8, 0, 0), pad_id=0)
