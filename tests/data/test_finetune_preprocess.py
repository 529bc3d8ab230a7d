"""`gridtrain preprocess --format chat|completion`: ids equal transformers' `apply_chat_template`
for a ChatML and a Llama-3 template on multi-turn conversations with system messages; the loss mask
covers exactly the assistant turns with their end-of-turn token (checked against the rendered text);
masks are megatron shards aligned document for document; byte-identical for any --workers; bad
records counted; a tokenizer without a chat template is one line."""
import json
import os
import random

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from transformers import AutoTokenizer

from gridtrain.data.preprocess import PreprocessOptions, preprocess
from gridtrain.data.tokenizer import load_tokenizer
from gridtrain.errors import UserError

QUIET = open(os.devnull, "w")
WORDS = "the model reads a short answer about rivers cities numbers and colors in plain words café naïve 東京 ✓".split()
END_OF_TURN = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>"}


def sentence(rng: random.Random, low: int = 2, high: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def conversations(count: int, seed: int = 0) -> list[list[dict]]:
    """Multi-turn conversations of uneven lengths, some with a system message."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        messages = [{"role": "system", "content": sentence(rng)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": sentence(rng)}, {"role": "assistant", "content": sentence(rng, 1, 20)}]
        out.append(messages)
    return out


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def run(inputs, tokenizer, prefix, **kwargs) -> dict:
    opts = PreprocessOptions(inputs=tuple(inputs), tokenizer=str(tokenizer), output_prefix=str(prefix), **kwargs)
    return preprocess(opts, QUIET)


def read(prefix) -> list[list[int]]:
    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_chat_ids_equal_apply_chat_template_and_the_mask_covers_the_assistant_turns(hf_tokenizers, tmp_path, family):
    chats = conversations(40)
    records = [{"messages": m} for m in chats]
    bad = [{"messages": "hello"}, {"messages": [{"role": "robot", "content": "x"}]},
           {"messages": [{"role": "user", "content": "no answer"}]}]
    source = write_jsonl(tmp_path / "chat.jsonl", records[:20] + bad + records[20:])
    folder = hf_tokenizers[family]
    one = run([source], folder, tmp_path / "one", format="chat", workers=1, max_bad_fraction=0.1)
    run([source], folder, tmp_path / "two", format="chat", workers=2, max_bad_fraction=0.1)
    for suffix in (".bin", ".idx", "_loss_mask.bin", "_loss_mask.idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()
    two = run([source], folder, tmp_path / "sharded", format="chat", workers=2, max_bad_fraction=0.1,
              shard_size_tokens=900)
    assert one["format"] == "chat" and one["documents"] == 40 and one["loss_mask_suffix"] == "_loss_mask"
    assert {reason: entry["count"] for reason, entry in one["bad"].items()} == {
        "not-a-message-list": 1, "wrong-role": 1, "no-assistant-turn": 1}
    # Numbered shards hold the same documents, the masks cut at the same documents as the tokens.
    sharded = [d for s in two["shards"] for d in read(s["prefix"])]
    sharded_masks = [d for s in two["shards"] for d in read(s["prefix"] + "_loss_mask")]
    ids, masks = read(tmp_path / "one"), read(tmp_path / "one_loss_mask")
    assert sharded == ids and sharded_masks == masks and len(two["shards"]) > 1

    hf = AutoTokenizer.from_pretrained(str(folder))
    end = END_OF_TURN[family]
    for messages, doc, mask in zip(chats, ids, masks):
        assert doc == hf.apply_chat_template(messages, tokenize=True)["input_ids"]
        assert len(mask) == len(doc) and set(mask) <= {0, 1}
        # The masked tokens, run by run, are the assistant turns as the template writes them (Llama 3's
        # template trims the content), each with its end-of-turn token and nothing else.
        runs, current = [], []
        for token, bit in zip(doc + [None], mask + [0]):
            if bit:
                current.append(token)
            elif current:
                runs.append(hf.decode(current))
                current = []
        assert runs == [m["content"].strip() + end for m in messages if m["role"] == "assistant"]
    assert one["loss_tokens"] == sum(map(sum, masks))


def test_completion_records_and_the_sentencepiece_default_template(corpus, tmp_path):
    tok = load_tokenizer(corpus.tokenizer)
    rng = random.Random(1)
    pairs = [{"q": sentence(rng), "a": sentence(rng)} for _ in range(12)]
    source = write_jsonl(tmp_path / "pairs.jsonl", pairs + [{"q": "no answer"}])
    summary = run([source], corpus.tokenizer, tmp_path / "pairs", format="completion", prompt_key="q",
                  completion_key="a", max_bad_fraction=0.1)
    assert summary["format"] == "completion" and summary["bad"]["missing-key"]["count"] == 1
    for pair, doc, mask in zip(pairs, read(tmp_path / "pairs"), read(tmp_path / "pairs_loss_mask")):
        prompt = tok.documents([pair["q"]])[0][:-1]
        answer = tok.encode(pair["a"]) + [tok.eod]
        assert doc == prompt + answer and mask == [0] * len(prompt) + [1] * len(answer)

    chats = conversations(6, seed=2)
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in chats])
    run([source], corpus.tokenizer, tmp_path / "chat", format="chat")
    for messages, doc, mask in zip(chats, read(tmp_path / "chat"), read(tmp_path / "chat_loss_mask")):
        answers = [tok.encode(" " + m["content"]) + [tok.eod] for m in messages if m["role"] == "assistant"]
        assert [t for t, bit in zip(doc, mask) if bit] == [t for a in answers for t in a]
        assert tok.decode(doc).startswith("System: " if messages[0]["role"] == "system" else "User: ")

    # --max-tokens: a record longer than the limit is skipped and counted.
    lengths = [len(d) for d in read(tmp_path / "chat")]
    limit = sorted(lengths)[len(lengths) // 2]
    summary = run([source], corpus.tokenizer, tmp_path / "short", format="chat", max_tokens=limit, max_bad_fraction=1.0)
    assert summary["documents"] == sum(n <= limit for n in lengths)
    assert summary["bad"].get("too-long", {"count": 0})["count"] == sum(n > limit for n in lengths) > 0


def test_bad_fine_tuning_input_is_one_line(hf_tokenizers, corpus, tmp_path):
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in conversations(3)])
    with pytest.raises(UserError, match=r"^--format chat: the tokenizer .* has no chat template \(chat_template.jinja "):
        run([source], hf_tokenizers["gpt2"], tmp_path / "none", format="chat")
    text = tmp_path / "plain.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match=r"--format completion: .*plain.txt is not a .jsonl\[.gz\] file"):
        run([str(text)], corpus.tokenizer, tmp_path / "plain", format="completion")
    # Every record malformed: nothing usable, one line naming why.
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"messages": {"role": "user"}}] * 3)
    with pytest.raises(UserError, match=r"no usable document in 3 records \(not-a-message-list: 3"):
        run([broken], hf_tokenizers["qwen2"], tmp_path / "broken", format="chat")
    assert not list(tmp_path.glob("none*")) and not list(tmp_path.glob("broken*.bin"))


def test_bad_fine_tuning_blends_are_one_line_before_any_rank(hf_tokenizers, corpus, tmp_path, capsys):
    from gridtrain.launcher.cli import main

    folder = hf_tokenizers["qwen2"]
    run([write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in conversations(4)])], folder,
        tmp_path / "chat", format="chat")
    for suffix in (".bin", ".idx", ".summary.json"):  # a copy whose loss mask was left behind
        (tmp_path / f"copy{suffix}").write_bytes((tmp_path / f"chat{suffix}").read_bytes())
    config = tmp_path / "run.yaml"
    config.write_text(f"""
model: {{family: llama, vocab_size: 1024, hidden_size: 64, num_layers: 2, num_attention_heads: 4, max_seq_len: 64}}
data: {{blend: [[1, {tmp_path / 'chat'}]], tokenizer: {folder}, seq_length: 64}}
train: {{steps: 2, global_batch_size: 4, micro_batch_size: 2, run_dir: {tmp_path / 'run'}}}
""")

    def answer(*overrides) -> tuple[int, str]:
        code = main(["train", str(config), *overrides, "--dry-run"])
        return code, capsys.readouterr().err.strip()

    assert answer()[0] == 0
    for blend, message in (
            (f"[[1, {tmp_path / 'chat'}], [1, {corpus.text}]]",
             f"data.blend[1]='{corpus.text}': is text shards in a blend of fine-tuning shards"),
            (f"[[1.5, {tmp_path / 'chat'}]]", "use a whole number, e.g. [2, "),
            (f"[[1, {tmp_path / 'copy'}]]", f"is a chat shard without its loss mask ({tmp_path / 'copy'}_loss_mask.bin")):
        code, err = answer(f"--data.blend={blend}")
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_the_offsets_fallback_gives_the_same_ids_and_masks(hf_tokenizers, monkeypatch):
    """Token starts come from the ids' byte lengths for byte-level BPEs; any other tokenizer (or a
    sum that does not add up) asks the tokenizer for offsets: both give the same ids and masks."""
    from gridtrain.data import finetune_records

    tok = load_tokenizer(hf_tokenizers["qwen2"])
    # The last one is not in NFC, which Qwen2's normalizer changes: that record takes the offsets.
    chats = conversations(30, seed=3) + [[{"role": "user", "content": "cafe\u0301?"},
                                          {"role": "assistant", "content": "cafe\u0301 noir"}]]
    fast = finetune_records.encode_records(chats, "chat", tok)
    assert finetune_records._byte_lengths(tok) is not None  # the fast path was taken
    monkeypatch.setattr(finetune_records, "_byte_lengths", lambda tokenizer: None)
    slow = finetune_records.encode_records(chats, "chat", tok)
    assert [(ids, mask.tolist()) for ids, mask in fast] == [(ids, mask.tolist()) for ids, mask in slow]
    assert any(not m["content"].isascii() for c in chats for m in c)  # byte and character offsets differ
