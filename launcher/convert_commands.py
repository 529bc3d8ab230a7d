"""`gridtrain convert` (checkpoint -> Hugging Face / GGUF, Hugging Face -> a gridtrain config) and
`gridtrain generate`.

Lazy imports: the exporters and the generator import torch, transformers and gguf (several seconds,
and transformers and gguf are the optional `hf` extra), so each handler imports what it runs."""
import contextlib
import math
import sys
from pathlib import Path

from gridtrain.convert.config_from_hf import write_config_from_hf
from gridtrain.convert.output import check_export, parse_size
from gridtrain.errors import UserError
from gridtrain.launcher.run_commands import resolve_device
from gridtrain.launcher.spawn import set_rank_environment

# One spelling per dtype inside; both spellings accepted on the command line.
_HF_DTYPES = {"fp32": "fp32", "f32": "fp32", "bf16": "bf16", "fp16": "fp16", "f16": "fp16"}
_GGUF_DTYPES = {"fp32": "f32", "f32": "f32", "bf16": "bf16", "fp16": "f16", "f16": "f16", "q8_0": "q8_0",
                "q4_0": "q4_0"}


def register(subparsers) -> None:
    convert = subparsers.add_parser(
        "convert", help="checkpoint -> Hugging Face folder or GGUF file; Hugging Face folder -> gridtrain config",
        description="SOURCE is a checkpoint (step_* folder), a folder of checkpoints (the newest valid one is "
                    "used, its manifest verified) or, with --to gridtrain, a Hugging Face model folder.")
    convert.add_argument("source", metavar="SOURCE")
    convert.add_argument("--to", required=True, choices=("hf", "gguf", "gridtrain"))
    convert.add_argument("--out", required=True, help="output folder (hf), .gguf file (gguf) or config .yaml (gridtrain)")
    convert.add_argument("--dtype", help="hf: fp32 (default), bf16, fp16; gguf: f32, f16 (default), bf16, q8_0, q4_0 "
                         "(1-D tensors stay f32; q4_0 keeps token_embd and output in q8_0)")
    convert.add_argument("--max-shard-size", default="5GB", help="hf: largest safetensors file (default 5GB)")
    convert.add_argument("--force", action="store_true", help="replace a non-empty --out (only once the new one is complete)")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="read pickle .bin weights (loading a pickle can run code from the file)")
    convert.set_defaults(handler=convert_command)

    gen = subparsers.add_parser(
        "generate", help="generate text from a checkpoint or a Hugging Face folder gridtrain exported",
        description="One process, KV cache; greedy at temperature 0; stops at eos or an end-of-turn token; streams a single prompt's "
                    "tokens as they come; --prompt-file generates one completion per line, batched.")
    gen.add_argument("source", metavar="SOURCE")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", metavar="FILE", help="one prompt per line")
    gen.add_argument("--chat", action="store_true",
                     help="each prompt is a user turn, rendered with the tokenizer's chat template and its generation "
                          "prompt (as apply_chat_template(..., add_generation_prompt=True)); stops at the end of turn")
    gen.add_argument("--system", metavar="TEXT", help="--chat: a system turn before the user's")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass (1: off)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    gen.add_argument("--trust-pickle", action="store_true", help="allow pickle .bin weights in an HF folder")
    gen.set_defaults(handler=generate_command)


def _dtype(args, table: dict, default: str) -> str:
    if args.dtype is None:
        return default
    if args.dtype not in table:
        raise UserError(f"--dtype={args.dtype}: use one of {', '.join(sorted(set(table.values())))}")
    return table[args.dtype]


def convert_command(args) -> int:
    # Everything the flags say is checked before the source is opened (a checkpoint's files are
    # checksummed then, which takes a while for a large one).
    check_export(args.out, args.to, args.force, sources=(args.source,))
    if args.to == "gridtrain":
        path = write_config_from_hf(Path(args.source), Path(args.out), args.force)
        print(f"wrote {path}: the model section of {args.source} with train.init_from set to it")
        return 0
    dtype = _dtype(args, _GGUF_DTYPES, "f16") if args.to == "gguf" else _dtype(args, _HF_DTYPES, "fp32")
    max_shard = parse_size(args.max_shard_size)
    from gridtrain.convert.sources import open_weights

    source = open_weights(args.source, args.trust_pickle)
    if args.to == "gguf":
        from gridtrain.convert.gguf_export import export_gguf

        out = export_gguf(source, Path(args.out), dtype, args.force)
    else:
        from gridtrain.convert.hf_export import export_hf

        out = export_hf(source, Path(args.out), dtype, max_shard, args.force, source.tokenizer)
    print(f"wrote {out} from {source.path}")
    return 0


def _prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    try:
        lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserError(f"--prompt-file={args.prompt_file}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"--prompt-file={args.prompt_file}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                        f"offset {exc.start}); save it as UTF-8") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--prompt-file={args.prompt_file}: no non-empty line to generate from")
    return prompts


def check_sampling(args) -> None:
    """Each sampling flag in its range (NaN is in none), one line naming every one that is not."""
    problems = []
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        problems.append(f"--temperature {args.temperature}: must be a number >= 0 (0: greedy)")
    if args.top_k < 0:
        problems.append(f"--top-k {args.top_k}: must be >= 0 (0: off)")
    if not 0 < args.top_p <= 1:  # False for NaN
        problems.append(f"--top-p {args.top_p}: must be in (0, 1] (1: off)")
    if problems:
        raise UserError("; ".join(problems))


def generate_command(args) -> int:
    check_sampling(args)
    if args.system is not None and not args.chat:
        raise UserError("--system needs --chat (it is a turn of the chat template)")
    prompts = _prompts(args)
    # One process is one rank: the same thread count and library settings as a training rank.
    set_rank_environment(resolve_device(args.device, import_torch=False))
    with contextlib.redirect_stdout(sys.stderr):  # library notices at import: stdout is the text
        from gridtrain.convert.generate import load_generator

    generator = load_generator(args.source, args.device, args.trust_pickle)
    if args.chat:
        generator.use_chat(args.system)
    stream = sys.stdout if len(prompts) == 1 else None
    for text in generator.complete(prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                   args.seed, stream=stream):
        if stream is None:
            print(text.replace("\n", "\\n"))
    return 0
