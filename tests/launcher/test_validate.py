"""Every validation rule on its exact message (field, value, fix), one config collecting many
problems into one ConfigError, and every preset passing at its intended world size."""
import dataclasses
from pathlib import Path

import pytest

from gridtrain.errors import ConfigError
from gridtrain.launcher.config import load_config
from gridtrain.launcher.dryrun import derived_numbers
from gridtrain.launcher.validate import validate
from gridtrain.train.run_config import RunConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def base(**sections) -> RunConfig:
    """A valid small config (2 ranks: TP=1 PP=1 DP=2) with `sections` fields replaced."""
    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, blend=((1.0, "d/x_text_document"),),
                                                            tokenizer="t.model"))
    for section, fields in sections.items():
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **fields)})
    return cfg


def problems_of(cfg: RunConfig, world_size=2, device="cpu") -> list:
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size, device)
    return info.value.problems


def test_base_config_is_valid():
    validate(base(), 2, "cpu")
    validate(base(), None, "cpu")
    validate(base(train=dict(dtype="bf16"), parallel=dict(zero_stage=1)), 2, "cpu")  # bf16 trains on CPU too
    validate(base(train=dict(dtype="bf16"), parallel=dict(pipeline_parallel=2)), 2, "cpu")  # ZeRO-0 in a pipeline


def test_keep_last_zero_keeps_every_checkpoint():
    """README: checkpoint.keep_last 0 keeps all checkpoints; validation accepts it and retention
    then deletes none (the negative keep_last case above is refused)."""
    from gridtrain.train.checkpoint.store import retention_victims

    validate(base(checkpoint=dict(keep_last=0)), 2, "cpu")
    assert retention_victims([1, 2, 3], keep_last=0, keep_every=0) == []
    assert retention_victims([1, 2, 3], keep_last=1, keep_every=0) == [1, 2]


def test_validation_returns_the_layout():
    layout = validate(base(parallel=dict(tensor_parallel=2), train=dict(global_batch_size=16, micro_batch_size=2)), 8, "cpu")
    assert (layout.tp, layout.pp, layout.dp, layout.grad_accum_steps) == (2, 1, 4, 2)


CASES = {
    "world size != TP*PP*DP": (
        dict(parallel=dict(tensor_parallel=2, data_parallel=3), train=dict(global_batch_size=24)), 4, "cpu",
        ("world_size", 4, "must equal parallel.tensor_parallel (2) x parallel.pipeline_parallel (1) x "
                          "parallel.data_parallel (3) = 6; set parallel.data_parallel to auto (here 2), or launch 6 ranks")),
    "world size not a multiple of TP*PP": (
        dict(parallel=dict(tensor_parallel=2, pipeline_parallel=2)), 6, "cpu",
        ("world_size", 6, "must be a multiple of parallel.tensor_parallel (2) x parallel.pipeline_parallel (2) = 4 "
                          "(parallel.data_parallel auto is the world over TP x PP); launch a multiple of 4 ranks or "
                          "change the layout")),
    "heads not divisible by TP": (
        dict(model=dict(hidden_size=240, num_attention_heads=12, num_kv_heads=None, ffn_hidden_size=640),
             parallel=dict(tensor_parallel=5)), 5, "cpu",
        ("model.num_attention_heads", 12, "must be a multiple of parallel.tensor_parallel (5): each TP rank holds "
                                          "whole heads; use a tensor_parallel among 1, 2, 3, 4, 6, 12")),
    "kv heads not divisible by TP": (
        dict(model=dict(num_attention_heads=8, num_kv_heads=2), parallel=dict(tensor_parallel=4)), 4, "cpu",
        ("model.num_kv_heads", 2, "must be a multiple of parallel.tensor_parallel (4): each TP rank holds whole "
                                  "KV heads; use a tensor_parallel among 1, 2 or more KV heads")),
    "kv heads not dividing heads": (
        dict(model=dict(num_attention_heads=8, num_kv_heads=3)), 2, "cpu",
        ("model.num_kv_heads", 3, "must divide model.num_attention_heads (8): each KV head serves a whole group "
                                  "of query heads; use one of 1, 2, 4, 8")),
    "hidden not divisible by heads": (
        dict(model=dict(hidden_size=100, num_attention_heads=12, num_kv_heads=None)), 2, "cpu",
        ("model.hidden_size", 100, "must be a multiple of model.num_attention_heads (12); e.g. 96 or 108, or set model.head_dim")),
    "odd head dim with rotary": (
        dict(model=dict(hidden_size=24, num_attention_heads=8, num_kv_heads=None)), 2, "cpu",
        ("model.hidden_size", 24, "gives an odd head dim (3) with model.num_attention_heads (8); rotary embeddings "
                                  "rotate pairs, so make hidden_size / heads even (or set model.head_dim)")),
    "ffn not divisible by TP": (
        dict(model=dict(ffn_hidden_size=1004, num_kv_heads=8), parallel=dict(tensor_parallel=8)), 8, "cpu",
        ("model.ffn_hidden_size", 1004, "must be a multiple of parallel.tensor_parallel (8): the MLP's columns "
                                        "are split evenly across TP ranks")),
    "layers fewer than PP stages": (
        dict(model=dict(num_layers=2), parallel=dict(pipeline_parallel=4)), 4, "cpu",
        ("model.num_layers", 2, "must be at least parallel.pipeline_parallel (4): every pipeline stage needs a "
                                "decoder layer; use pipeline_parallel <= 2 or more layers")),
    "global batch not divisible by micro*DP": (
        dict(train=dict(global_batch_size=30, micro_batch_size=4)), 2, "cpu",
        ("train.global_batch_size", 30, "must be a multiple of train.micro_batch_size (4) x data_parallel (2) = 8: "
                                        "every DP rank accumulates whole micro-batches; use 24 or 32, or change micro_batch_size")),
    "ZeRO-3 with PP>1": (
        dict(parallel=dict(pipeline_parallel=2, zero_stage=3)), 2, "cpu",
        ("parallel.zero_stage", 3, "DeepSpeed's pipeline engine refuses ZeRO-2/3 with parallel.pipeline_parallel (2) > 1; "
                                   "use zero_stage 0 or 1 with pipelines, or pipeline_parallel 1 for ZeRO-2/3")),
    "ZeRO stage out of range": (
        dict(parallel=dict(zero_stage=4)), 2, "cpu", ("parallel.zero_stage", 4, "must be 0, 1, 2 or 3")),
    "sequence parallel on CPU": (
        dict(parallel=dict(sequence_parallel=True, tensor_parallel=2)), 2, "cpu",
        ("parallel.sequence_parallel", True, "megatron-core's sequence parallel needs CUDA (it calls "
                                             "torch.cuda.current_device()); set it to false on CPU")),
    "vocab padding rule vs TP": (
        dict(model=dict(make_vocab_size_divisible_by=0)), 2, "cpu",
        ("model.make_vocab_size_divisible_by", 0, "must be >= 1 (the vocab is padded to a multiple of it x "
         "parallel.tensor_parallel so every TP rank holds an equal slice; Megatron's default is 128)")),
    "bf16 at ZeRO-0 without a pipeline": (
        dict(train=dict(dtype="bf16"), parallel=dict(zero_stage=0)), 2, "cpu",
        ("parallel.zero_stage", 0, "with train.dtype bf16 and no pipeline, DeepSpeed's ZeRO-0 bf16 optimizer drifts "
         "from fp32-master AdamW and miscounts the gradient norm under TP; use zero_stage 1 (the same memory at "
         "data_parallel 1)")),
    "fp16 on CPU": (
        dict(train=dict(dtype="fp16")), 2, "cpu",
        ("train.dtype", "fp16", "DeepSpeed trains fp16 only on CUDA devices; use bf16 or fp32 on CPU")),
    "nccl on CPU": (
        dict(parallel=dict(backend="nccl")), 2, "cpu",
        ("parallel.backend", "nccl", "NCCL needs CUDA devices; use auto or gloo on CPU")),
    "seq_length above max_seq_len": (
        dict(data=dict(seq_length=512)), 2, "cpu",
        ("data.seq_length", 512, "must be <= model.max_seq_len (256): position tables are built for max_seq_len; "
                                 "lower seq_length or raise max_seq_len")),
    "non-positive hidden size": (
        dict(model=dict(hidden_size=0)), 2, "cpu", ("model.hidden_size", 0, "must be >= 1")),
    "zero steps": (dict(train=dict(steps=0)), 2, "cpu", ("train.steps", 0, "must be >= 1")),
    "negative keep_last": (
        dict(checkpoint=dict(keep_last=-1)), 2, "cpu",
        ("checkpoint.keep_last", -1, "must be >= 0 (0 keeps every checkpoint)")),
    "non-positive lr": (dict(optim=dict(lr=0.0)), 2, "cpu", ("optim.lr", 0.0, "must be > 0")),
    "min_lr above lr": (
        dict(optim=dict(lr=1e-4, min_lr=1e-3)), 2, "cpu",
        ("optim.min_lr", 1e-3, "must be <= optim.lr (0.0001): the schedule decays from lr to min_lr")),
    "beta2 of 1": (
        dict(optim=dict(beta2=1.0)), 2, "cpu",
        ("optim.beta2", 1.0, "must be < 1 (Adam's moment decay), e.g. 0.9 or 0.95")),
    "empty blend": (
        dict(data=dict(blend=())), 2, "cpu",
        ("data.blend", [], "must be a list of [weight, prefix] pairs, e.g. [[1.0, data/corpus_text_document]] "
                           "(the shards gridtrain preprocess wrote)")),
    "blend entry not a pair": (
        dict(data=dict(blend=("d/x_text_document",))), 2, "cpu",
        ("data.blend[0]", "d/x_text_document", "must be a list of [weight, prefix] pairs, e.g. "
                                               "[[1.0, data/corpus_text_document]]")),
    "blend weight not positive": (
        dict(data=dict(blend=((-1, "d/x"),))), 2, "cpu",
        ("data.blend[0]", [-1, "d/x"], "weight must be a positive number, e.g. [0.3, data/wiki_text_document]")),
    "blend prefix with .bin": (
        dict(data=dict(blend=((1, "d/x.bin"),))), 2, "cpu",
        ("data.blend[0]", [1, "d/x.bin"], "give the prefix without .bin/.idx: d/x")),
    "bad split": (
        dict(data=dict(split="98,1,x")), 2, "cpu",
        ("data.split", "98,1,x", 'must be up to 3 comma-separated non-negative weights for train,valid,test with a '
                                 'positive sum, e.g. "98,1,1"')),
    "no tokenizer": (
        dict(data=dict(tokenizer=None)), 2, "cpu",
        ("data.tokenizer", None, "set the tokenizer the shards were made with: a SentencePiece .model, a "
                                 "tokenizer.json or a Hugging Face folder (gridtrain tokenizer trains one); the datasets "
                                 "need its end-of-document id")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_rule_names_field_value_and_fix(name):
    sections, world, device, expected = CASES[name]
    assert problems_of(base(**sections), world, device) == [expected]


def test_cuda_only_settings_pass_on_cuda():
    cfg = base(parallel=dict(tensor_parallel=2, backend="nccl", zero_stage=1), train=dict(dtype="bf16"))
    validate(cfg, 4, "cuda")


def test_unimplemented_cuda_options_are_refused_not_ignored():
    cfg = base(parallel=dict(sequence_parallel=True, tensor_parallel=2, init_device="cuda", zero_stage=1),
               train=dict(dtype="bf16"))
    assert [field for field, _, _ in problems_of(cfg, 4, "cuda")] == ["parallel.sequence_parallel",
                                                                      "parallel.init_device"]


def test_several_problems_give_one_error_listing_all():
    cfg = base(model=dict(hidden_size=100, num_attention_heads=12, num_kv_heads=None, num_layers=1),
               parallel=dict(tensor_parallel=5, pipeline_parallel=2, zero_stage=2),
               train=dict(global_batch_size=30, dtype="fp16"), optim=dict(lr=-1.0))
    with pytest.raises(ConfigError) as info:
        validate(cfg, 8, "cpu")
    fields = [field for field, _, _ in info.value.problems]
    assert fields == ["optim.lr", "world_size", "model.num_layers", "parallel.zero_stage", "model.hidden_size",
                      "model.num_attention_heads", "model.ffn_hidden_size", "train.global_batch_size", "train.dtype"]
    text = str(info.value)
    assert text.startswith("9 config problems: optim.lr=-1.0: must be > 0; world_size=8: must be a multiple of")
    assert "\n" not in text


# preset -> (device, world size) it is meant for
PRESETS = {"tiny-llama": ("cpu", 2), "gpt2-124m": ("cuda", 8), "llama-1b": ("cuda", 8),
           "llama-8b": ("cuda", 64), "llama-70b": ("cuda", 256), "llama-3.2-1b": ("cuda", 8),
           "llama-3.1-8b": ("cuda", 32), "qwen2.5-0.5b": ("cuda", 8), "qwen3-0.6b": ("cuda", 8),
           "smollm2-135m": ("cuda", 8)}
# The parameter counts the model cards publish (the safetensors totals of the Hugging Face repos
# meta-llama/Llama-3.2-1B, meta-llama/Llama-3.1-8B, Qwen/Qwen2.5-0.5B, Qwen/Qwen3-0.6B-Base,
# HuggingFaceTB/SmolLM2-135M; tied heads counted once).
PUBLISHED_PARAMETERS = {"llama-3.2-1b": 1_235_814_400, "llama-3.1-8b": 8_030_261_248, "qwen2.5-0.5b": 494_032_768,
                        "qwen3-0.6b": 596_049_920, "smollm2-135m": 134_515_008}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_pass_at_their_world_size(name):
    device, world = PRESETS[name]
    cfg = load_config([str(CONFIGS / f"{name}.yaml")])
    validate(cfg, world, device)
    with pytest.raises(ConfigError):  # and the check is live: one rank too many fails
        validate(cfg, world + 1, device)


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETERS))
def test_family_presets_count_the_published_parameters(name):
    device, world = PRESETS[name]
    cfg = load_config([str(CONFIGS / f"{name}.yaml")])
    layout = validate(cfg, world, device)
    assert derived_numbers(cfg, layout)["parameters"] == PUBLISHED_PARAMETERS[name]


def test_real_llama_dims():
    eight = load_config([str(CONFIGS / "llama-8b.yaml")])
    seventy = load_config([str(CONFIGS / "llama-70b.yaml")])
    assert (eight.model.hidden_size, eight.model.num_layers, eight.model.ffn_size, eight.model.kv_heads) == (4096, 32, 14336, 8)
    assert (eight.parallel.tensor_parallel, eight.parallel.pipeline_parallel, eight.parallel.zero_stage) == (8, 1, 1)
    assert (seventy.model.hidden_size, seventy.model.num_layers, seventy.model.ffn_size, seventy.model.kv_heads) == (8192, 80, 28672, 8)
    assert (seventy.parallel.tensor_parallel, seventy.parallel.pipeline_parallel) == (8, 4)


def test_wandb_without_the_package_is_one_problem(monkeypatch):
    import importlib.util

    cfg = base(logging=dict(wandb_project="p"))
    validate(cfg, 2, "cpu")  # installed here (the dev stack)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert problems_of(cfg) == [("logging.wandb_project", "p", "wandb is not installed: pip install "
                                 "'gridtrain[wandb]', or set logging.wandb_project to null")]
