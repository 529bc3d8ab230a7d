"""validate(cfg, world_size, device): every cross-field rule of a run config, checked before any
process group exists. All problems are collected into one ConfigError, each naming the field, its
value and the fix, in megatron's style ("must be a multiple of parallel.tensor_parallel (5)")."""
import importlib.util

from gridtrain.data.config import blend_problems
from gridtrain.errors import ConfigError
from gridtrain.parallel.layout import Layout, batch_problems, build_layout, world_problems, zero_problems
from gridtrain.train.run_config import RunConfig

Problem = tuple[str, object, str]

# field -> (lower bound, inclusive?, what the bound means); None values mean "default" and pass, and so
# does "auto" (parallel.data_parallel: the world over TP x PP).
_BOUNDS = {
    "model.vocab_size": (1, True, ""), "model.hidden_size": (1, True, ""),
    "model.num_layers": (1, True, ""), "model.num_attention_heads": (1, True, ""),
    "model.num_kv_heads": (1, True, "or null for multi-head attention"),
    "model.ffn_hidden_size": (1, True, "or null for the family's default"),
    "model.max_seq_len": (1, True, ""), "model.norm_eps": (0, False, ""),
    "model.rope_theta": (0, False, ""), "model.init_std": (0, False, ""),
    "model.head_dim": (1, True, "or null for hidden_size / num_attention_heads"),
    "model.rope_factor": (0, False, ""), "model.rope_low_freq_factor": (0, False, ""),
    "model.rope_original_max_positions": (1, True, "or null unless rope_scaling is llama3"),
    "model.make_vocab_size_divisible_by": (
        1, True, "(the vocab is padded to a multiple of it x parallel.tensor_parallel so every TP "
                 "rank holds an equal slice; Megatron's default is 128)"),
    "parallel.tensor_parallel": (1, True, ""), "parallel.pipeline_parallel": (1, True, ""),
    "parallel.data_parallel": (1, True, "or auto to fill the world size"),
    "parallel.timeout_minutes": (0, False, "(collectives give up after it instead of hanging)"),
    "data.seq_length": (1, True, ""), "data.num_workers": (0, True, ""),
    "optim.lr": (0, False, ""), "optim.min_lr": (0, True, ""), "optim.weight_decay": (0, True, ""),
    "optim.beta1": (0, True, ""), "optim.beta2": (0, True, ""), "optim.eps": (0, False, ""),
    "optim.grad_clip": (0, True, "(0 turns clipping off)"), "optim.warmup_steps": (0, True, ""),
    "optim.decay_steps": (1, True, "or null to decay over train.steps"),
    "train.steps": (1, True, ""), "train.global_batch_size": (1, True, ""),
    "train.micro_batch_size": (1, True, ""), "train.eval_interval": (0, True, "(0 turns evaluation off)"),
    "train.eval_steps": (0, True, ""), "train.peak_flops": (0, False, "or null to measure it"),
    "checkpoint.interval_steps": (0, True, "(0 turns it off)"),
    "checkpoint.interval_minutes": (0, True, "(0 turns it off)"),
    "checkpoint.keep_last": (0, True, "(0 keeps every checkpoint)"), "checkpoint.keep_every": (0, True, "(0 turns it off)"),
    "logging.log_interval": (1, True, ""),
}


# field -> upper bound. Far above any published decoder or cluster (Llama 3 405B: 126 layers,
# hidden 16384, 128 heads; vocabularies up to ~256k): a larger value is a typo, and the derived
# numbers (pipeline partitioning is quadratic in layers) would take minutes to compute.
_UPPER = {"model.vocab_size": 2**24, "model.hidden_size": 2**18, "model.num_layers": 512,
          "model.num_attention_heads": 4096, "model.num_kv_heads": 4096, "model.ffn_hidden_size": 2**21,
          "model.max_seq_len": 2**22, "parallel.tensor_parallel": 512, "parallel.pipeline_parallel": 128}


def validate(cfg: RunConfig, world_size: int | None, device: str) -> Layout:
    """The run's Layout on `world_size` ranks (None: the world the config names) and `device`
    ("cpu" or "cuda"); else one ConfigError listing every problem of `cfg`."""
    problems = _bounds(cfg)
    bad = {field for field, _, _ in problems}
    problems += _layout(cfg, world_size, bad)
    problems += _model_shape(cfg, bad)
    problems += _batch(cfg, world_size, bad)
    problems += _device(cfg, device)
    problems += _precision(cfg, bad)
    problems += _optim_and_train(cfg, bad)
    problems += _data(cfg, bad)
    problems += _logging(cfg)
    if problems:
        raise ConfigError(problems)
    return build_layout(cfg.parallel, cfg.train.micro_batch_size, cfg.train.global_batch_size, world_size)


def _get(cfg: RunConfig, field: str):
    section, name = field.split(".")
    return getattr(getattr(cfg, section), name)


def _bounds(cfg: RunConfig) -> list[Problem]:
    problems = []
    for field, (low, inclusive, note) in _BOUNDS.items():
        value = _get(cfg, field)
        if value in (None, "auto") or (value >= low if inclusive else value > low):
            continue
        relation = ">=" if inclusive else ">"
        problems.append((field, value, f"must be {relation} {low}" + (f" {note}" if note else "")))
    for field, high in _UPPER.items():
        value = _get(cfg, field)
        if value is not None and value > high:
            problems.append((field, value, f"must be <= {high} (larger than any model or cluster this was built for; "
                             "a typo?)"))
    for field in ("optim.beta1", "optim.beta2"):
        if _get(cfg, field) >= 1:
            problems.append((field, _get(cfg, field), "must be < 1 (Adam's moment decay), e.g. 0.9 or 0.95"))
    m = cfg.model
    if m.rope_scaling == "llama3" and m.rope_original_max_positions is None:
        problems.append(("model.rope_original_max_positions", None, "rope_scaling llama3 needs the context length "
                         "the model was pretrained with (Llama 3.1: 8192)"))
    if m.rope_scaling == "llama3" and m.rope_high_freq_factor <= m.rope_low_freq_factor:
        problems.append(("model.rope_high_freq_factor", m.rope_high_freq_factor, "must be above "
                         f"model.rope_low_freq_factor ({m.rope_low_freq_factor}), as in Llama 3.1 (4 and 1)"))
    if cfg.parallel.zero_stage not in (None, 0, 1, 2, 3):
        problems.append(("parallel.zero_stage", cfg.parallel.zero_stage, "must be 0, 1, 2 or 3"))
    return problems


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _layout(cfg: RunConfig, world_size: int | None, bad: set) -> list[Problem]:
    par, m = cfg.parallel, cfg.model
    if bad & {"parallel.tensor_parallel", "parallel.pipeline_parallel", "parallel.data_parallel"}:
        return []
    problems = world_problems(par, world_size)
    if "model.num_layers" not in bad and m.num_layers < par.pipeline_parallel:
        problems.append(("model.num_layers", m.num_layers, f"must be at least parallel.pipeline_parallel "
                         f"({par.pipeline_parallel}): every pipeline stage needs a decoder layer; use "
                         f"pipeline_parallel <= {m.num_layers} or more layers"))
    return problems + zero_problems(par)


def _model_shape(cfg: RunConfig, bad: set) -> list[Problem]:
    m, tp = cfg.model, cfg.parallel.tensor_parallel
    if bad & {f"model.{f}" for f in ("hidden_size", "num_attention_heads", "num_kv_heads", "ffn_hidden_size")}:
        return []
    heads, kv = m.num_attention_heads, m.kv_heads
    problems = []
    if m.head_dim is None and m.hidden_size % heads:
        problems.append(("model.hidden_size", m.hidden_size, f"must be a multiple of model.num_attention_heads ({heads}); "
                         f"e.g. {heads * max(1, m.hidden_size // heads)} or {heads * (m.hidden_size // heads + 1)}, "
                         "or set model.head_dim"))
    elif m.family == "llama" and m.head_size % 2:
        if m.head_dim:
            problems.append(("model.head_dim", m.head_dim, "is odd; rotary embeddings rotate pairs, so make it even"))
        else:
            problems.append(("model.hidden_size", m.hidden_size, f"gives an odd head dim ({m.head_size}) with "
                             f"model.num_attention_heads ({heads}); rotary embeddings rotate pairs, so make "
                             "hidden_size / heads even (or set model.head_dim)"))
    if m.family == "gpt2" and (m.head_dim or m.qk_norm or m.rope_scaling != "none"):
        problems.append(("model.family", "gpt2", "head_dim, qk_norm and rope_scaling are llama-family options; "
                         "leave them unset for gpt2"))
    if heads % kv:
        problems.append(("model.num_kv_heads", kv, f"must divide model.num_attention_heads ({heads}): each KV head "
                         f"serves a whole group of query heads; use one of {_divisors(heads)}"))
    if "parallel.tensor_parallel" in bad:
        return problems
    if heads % tp:
        size = f" (of head_dim {m.head_dim})" if m.head_dim else ""
        problems.append(("model.num_attention_heads", heads, f"must be a multiple of parallel.tensor_parallel ({tp}): "
                         f"each TP rank holds whole heads{size}; use a tensor_parallel among {_divisors(heads)}"))
    if kv % tp and kv != heads:  # with multi-head attention the heads message already says it
        problems.append(("model.num_kv_heads", kv, f"must be a multiple of parallel.tensor_parallel ({tp}): each TP "
                         f"rank holds whole KV heads; use a tensor_parallel among {_divisors(kv)} or more KV heads"))
    if m.ffn_size % tp:
        problems.append(("model.ffn_hidden_size", m.ffn_size, f"must be a multiple of parallel.tensor_parallel ({tp}): "
                         "the MLP's columns are split evenly across TP ranks"))
    return problems


def _batch(cfg: RunConfig, world_size: int | None, bad: set) -> list[Problem]:
    if bad & {"train.global_batch_size", "train.micro_batch_size", "parallel.tensor_parallel",
              "parallel.pipeline_parallel", "parallel.data_parallel"}:
        return []
    return batch_problems(cfg.parallel, cfg.train.micro_batch_size, cfg.train.global_batch_size, world_size)


def _device(cfg: RunConfig, device: str) -> list[Problem]:
    if device == "cuda":
        return _not_implemented_on_cuda(cfg)
    problems = []
    if cfg.parallel.sequence_parallel:
        problems.append(("parallel.sequence_parallel", True, "megatron-core's sequence parallel needs CUDA "
                         "(it calls torch.cuda.current_device()); set it to false on CPU"))
    if cfg.train.dtype == "fp16":
        # DeepSpeed 0.19.8's CPU accelerator raises "Type fp16 is not supported on your device".
        problems.append(("train.dtype", "fp16", "DeepSpeed trains fp16 only on CUDA devices; use bf16 or fp32 on CPU"))
    if cfg.parallel.backend == "nccl":
        problems.append(("parallel.backend", "nccl", "NCCL needs CUDA devices; use auto or gloo on CPU"))
    if cfg.parallel.init_device == "cuda":
        problems.append(("parallel.init_device", "cuda", "initialising weights on CUDA needs a GPU; use cpu"))
    return problems


def _precision(cfg: RunConfig, bad: set) -> list[Problem]:
    """bf16 outside pipelines needs a ZeRO optimizer: at ZeRO-0 DeepSpeed 0.19.8 trains bf16 through
    FP16_UnfusedOptimizer, which measured 1.5e-4 off an fp32-master AdamW in the second step's loss
    (its ZeRO and pipeline bf16 optimizers: 2e-5) and miscounts the gradient norm under TP (1.49
    instead of 1.69). ZeRO-1 holds the same memory at DP=1."""
    par = cfg.parallel
    if cfg.train.dtype != "bf16" or par.zero_stage != 0 or par.pipeline_parallel > 1 or "parallel.zero_stage" in bad:
        return []
    return [("parallel.zero_stage", 0, "with train.dtype bf16 and no pipeline, DeepSpeed's ZeRO-0 bf16 optimizer "
             "drifts from fp32-master AdamW and miscounts the gradient norm under TP; use zero_stage 1 (the same "
             "memory at data_parallel 1)")]


def _not_implemented_on_cuda(cfg: RunConfig) -> list[Problem]:
    # Refused rather than silently ignored: the decoder is built with sequence_parallel=False and
    # megatron-core's host-side initialisation.
    problems = []
    if cfg.parallel.sequence_parallel:
        problems.append(("parallel.sequence_parallel", True, "not implemented in gridtrain yet (the decoder's "
                         "TP layers are built without it); set it to false"))
    if cfg.parallel.init_device == "cuda":
        problems.append(("parallel.init_device", "cuda", "device-side initialisation is not implemented in "
                         "gridtrain yet (weights are built on the host and sliced); use cpu"))
    return problems


def _optim_and_train(cfg: RunConfig, bad: set) -> list[Problem]:
    o, t = cfg.optim, cfg.train
    problems = []
    if not bad & {"optim.lr", "optim.min_lr"} and o.min_lr > o.lr:
        problems.append(("optim.min_lr", o.min_lr, f"must be <= optim.lr ({o.lr}): the schedule decays from lr to min_lr"))
    if o.decay_steps is not None and not bad & {"optim.decay_steps", "optim.warmup_steps"} and o.decay_steps < o.warmup_steps:
        problems.append(("optim.decay_steps", o.decay_steps, f"must be >= optim.warmup_steps ({o.warmup_steps}); "
                         "or null to decay over train.steps"))
    if not t.run_dir:
        problems.append(("train.run_dir", t.run_dir, "must name a folder for checkpoints, logs and metrics"))
    if not t.resume:
        problems.append(("train.resume", t.resume, 'use "auto" (latest valid checkpoint), "none", or a checkpoint path'))
    if t.eval_interval > 0 and t.eval_steps < 1 and "train.eval_steps" not in bad:
        problems.append(("train.eval_steps", t.eval_steps, "must be >= 1 when train.eval_interval > 0; "
                         "or set eval_interval to 0 to turn evaluation off"))
    return problems


def _logging(cfg: RunConfig) -> list[Problem]:
    log = cfg.logging
    if log.wandb_project is None:
        return []
    problems = []
    if not log.wandb_project:
        problems.append(("logging.wandb_project", log.wandb_project, "name a W&B project, or null to turn W&B off"))
    if importlib.util.find_spec("wandb") is None:
        problems.append(("logging.wandb_project", log.wandb_project, "wandb is not installed: pip install "
                         "'gridtrain[wandb]', or set logging.wandb_project to null"))
    if not all(isinstance(tag, str) for tag in log.wandb_tags):
        problems.append(("logging.wandb_tags", list(log.wandb_tags), "must be a list of strings"))
    return problems


def _data(cfg: RunConfig, bad: set) -> list[Problem]:
    d = cfg.data
    problems = []
    if "data.seq_length" not in bad and "model.max_seq_len" not in bad and d.seq_length > cfg.model.max_seq_len:
        problems.append(("data.seq_length", d.seq_length, f"must be <= model.max_seq_len ({cfg.model.max_seq_len}): "
                         "position tables are built for max_seq_len; lower seq_length or raise max_seq_len"))
    problems += blend_problems(d.blend)
    if not d.tokenizer:
        problems.append(("data.tokenizer", d.tokenizer, "set the tokenizer the shards were made with: a SentencePiece "
                         ".model, a tokenizer.json or a Hugging Face folder (gridtrain tokenizer "
                         "trains one); the datasets need its end-of-document id"))
    parts = d.split.split(",")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if not 1 <= len(parts) <= 3 or len(numbers) != len(parts) or min(numbers) < 0 or sum(numbers) <= 0:
        problems.append(("data.split", d.split, 'must be up to 3 comma-separated non-negative weights for '
                         'train,valid,test with a positive sum, e.g. "98,1,1"'))
    return problems
