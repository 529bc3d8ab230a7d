"""`gridtrain tokenizer train`, `gridtrain preprocess` and `gridtrain data index`.

Lazy import: `data index` builds megatron-core's datasets (about 5 s to import megatron.core), so
its handler imports them only after the config has been read."""
import json
import os
import sys
import warnings

from gridtrain.data.finetune_records import FORMATS
from gridtrain.data.preprocess import PreprocessOptions, preprocess
from gridtrain.data.tokenizer import load_tokenizer
from gridtrain.data.tokenizer_train import MODEL_TYPES, train_tokenizer
from gridtrain.launcher.config import load_config
from gridtrain.launcher.preflight import check_inputs
from gridtrain.launcher.run_commands import resolve_device, split_extra_args
from gridtrain.launcher.validate import validate


def register(subparsers) -> None:
    tokenizer = subparsers.add_parser("tokenizer", help="train a tokenizer (SentencePiece or byte-level BPE)")
    tok_sub = tokenizer.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = tok_sub.add_parser(
        "train", help="train a tokenizer on a bounded sample of the corpus",
        description="bpe / unigram: SentencePiece (byte fallback, bos/eos/pad + <eod>) as DIR/tokenizer.model "
                    "and tokenizer.vocab; bytelevel: a GPT-2-style byte-level BPE as a Hugging Face folder "
                    "(DIR/tokenizer.json, tokenizer_config.json; <|endoftext|> ends documents). Both write "
                    "DIR/tokenizer_info.json (kind, size, special ids, sample).")
    train.add_argument("--input", nargs="+", required=True, metavar="PATH", help=".jsonl[.gz]/.txt files, globs or folders")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    train.add_argument("--out", required=True, metavar="DIR")
    train.add_argument("--sample-bytes", type=int, default=20_000_000,
                       help="train on about this many bytes spread evenly over the input (default 20 MB)")
    train.add_argument("--json-key", default="text")
    train.add_argument("--txt-mode", choices=("file", "blocks"), default="file")
    train.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    train.add_argument("--force", action="store_true",
                       help="replace the tokenizer files of a previous `tokenizer train` in --out (only those)")
    train.set_defaults(handler=tokenizer_train_command)

    pre = subparsers.add_parser(
        "preprocess", help="text -> Megatron-format token shards (PREFIX.bin + PREFIX.idx)",
        description="Streams .jsonl/.jsonl.gz/.txt input through a worker pool; the output is "
                    "byte-identical for any --workers. Writes PREFIX.summary.json beside the shards.")
    pre.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB")
    pre.add_argument("--tokenizer", required=True, metavar="TOKENIZER",
                     help="a SentencePiece .model, a tokenizer.json, or a Hugging Face folder holding one")
    pre.add_argument("--output-prefix", required=True, metavar="PREFIX")
    pre.add_argument("--json-key", default="text", help="field holding the text in .jsonl records")
    pre.add_argument("--format", choices=FORMATS, default="text",
                     help="text (default); completion: JSONL {\"prompt\", \"completion\"}, the loss on the completion "
                          "and EOD; chat: JSONL {\"messages\": [{\"role\": system|user|assistant, \"content\"}, ...]} "
                          "rendered with the tokenizer's chat template as transformers' apply_chat_template does, the "
                          "loss on the assistant turns with their end-of-turn token. Both also write the loss mask "
                          "as PREFIX_loss_mask.bin/.idx")
    pre.add_argument("--prompt-key", default="prompt", help="--format completion: the prompt's field")
    pre.add_argument("--completion-key", default="completion", help="--format completion: the completion's field")
    pre.add_argument("--messages-key", default="messages", help="--format chat: the message list's field")
    pre.add_argument("--max-tokens", type=int, metavar="N",
                     help="--format completion/chat: skip (and count as too-long) a record whose rendered ids, "
                          "BOS and end tokens included, number more than N (default: keep all; training "
                          "truncates or drops what exceeds data.seq_length)")
    pre.add_argument("--txt-mode", choices=("file", "blocks"), default="file",
                     help=".txt inputs: one document per file, or per blank-line-separated block")
    pre.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    pre.add_argument("--shard-size-tokens", type=int, metavar="T",
                     help="start a new shard PREFIX_NNNNN after about T tokens (default: one shard)")
    pre.add_argument("--part", metavar="I/N", help="process only slice I (0-based) of N of the sorted input files")
    pre.add_argument("--force", action="store_true",
                     help="replace the shards and summary of a previous preprocess of this prefix (only those)")
    pre.add_argument("--max-bad-fraction", type=float, default=0.01,
                     help="fail when more than this fraction of records is bad (default 0.01)")
    pre.set_defaults(handler=preprocess_command)

    data = subparsers.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    index = data_sub.add_parser(
        "index", help="prebuild the sample-index caches of a run config offline",
        description="Builds exactly the caches the trainer would build at start-up (same sample "
                    "counts), so no rank races or waits on them.")
    index.add_argument("configs", nargs="+", metavar="CONFIG")
    index.set_defaults(handler=data_index_command, accepts_overrides=True)


def quiet_library_warnings() -> None:
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def tokenizer_train_command(args) -> int:
    info = train_tokenizer(args.input, args.vocab_size, args.out, args.model_type, args.sample_bytes,
                           args.json_key, args.txt_mode, max(1, args.threads), args.force)
    print(f"tokenizer: {info['model']} ({info['model_type']}, {info['vocab_size']} pieces, "
          f"special ids {json.dumps(info['special_ids'])})")
    return 0


def preprocess_command(args) -> int:
    quiet_library_warnings()
    opts = PreprocessOptions(
        inputs=tuple(args.input), tokenizer=args.tokenizer, output_prefix=args.output_prefix,
        json_key=args.json_key, workers=args.workers, shard_size_tokens=args.shard_size_tokens,
        part=args.part, txt_mode=args.txt_mode, max_bad_fraction=args.max_bad_fraction, force=args.force,
        format=args.format, prompt_key=args.prompt_key, completion_key=args.completion_key,
        messages_key=args.messages_key, max_tokens=args.max_tokens,
    )
    summary = preprocess(opts, sys.stderr)
    bad = "".join(f"; skipped {reason}: {entry['count']} (first at {', '.join(entry['first'])})"
                  for reason, entry in summary["bad"].items())
    print(f"preprocess: {summary['documents']} documents, {summary['tokens']} tokens, "
          f"{summary['input_bytes'] / 1e6:.1f} MB in, {summary['output_bytes'] / 1e6:.1f} MB out, "
          f"{summary['empty_documents']['count']} empty documents skipped, {summary['skipped']} bad records skipped, "
          f"{summary['seconds']:.1f} s "
          f"({summary['tokens_per_second'] / 1e3:.0f}k tokens/s) -> "
          + ", ".join(s["prefix"] for s in summary["shards"]) + bad)
    return 0


def data_index_command(args) -> int:
    quiet_library_warnings()
    configs, overrides = split_extra_args(args)
    cfg = load_config(configs, overrides)
    # The same checks as `train --dry-run`, in a second, before megatron-core's import.
    validate(cfg, None, resolve_device("auto", import_torch=False))
    check_inputs(cfg)
    from gridtrain.data.datasets import build_datasets, default_cache_dir, run_samples

    num_samples = run_samples(cfg.train.steps, cfg.train.global_batch_size, cfg.train.eval_steps)
    cache_dir = default_cache_dir(cfg.data, cfg.train.run_dir)
    datasets = build_datasets(cfg.data, num_samples, cache_dir, load_tokenizer(cfg.data.tokenizer))
    sizes = ", ".join(f"{name} {len(d) if d is not None else 0}" for name, d in zip(("train", "valid", "test"), datasets))
    print(f"data index: {cache_dir} ready; samples requested {list(num_samples)} (datasets: {sizes})")
    return 0
