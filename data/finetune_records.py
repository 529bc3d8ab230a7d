"""Fine-tuning records -> token ids and a loss mask (1 on the tokens the loss covers), for
`gridtrain preprocess --format completion|chat`. Runs in the preprocessing workers.

completion: {"prompt": ..., "completion": ...}: the prompt as the tokenizer encodes a document (BOS
    where it adds one), then the completion and EOD; the loss covers the completion and EOD. The
    two parts are encoded separately, so the boundary is exact (LitGPT and torchtitan do the same).
chat: {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}: rendered with the
    tokenizer's chat template exactly as transformers' `apply_chat_template(messages)` renders it
    (same text, same ids: the rendered text is encoded once, without added special tokens, as
    transformers does). The assistant spans come from rendering turn by turn: the text of the
    conversation up to assistant turn k, minus the text of the conversation before it with the
    generation prompt, is that turn as the template writes it. A token is in the loss when it starts
    inside such a span, up to and including the span's last end-of-turn token (so ChatML's newline
    after <|im_end|> is not). No role name is searched for in the text. A template whose rendering
    is not prefix-stable that way is reported per record.
    SentencePiece tokenizers have no template; they get this default one, encoded piece by piece
    (no BOS, as gridtrain's SentencePiece documents have none): per turn `System: TEXT\n\n`,
    `User: TEXT\n\nAssistant:`, then ` TEXT` + EOD for the answer (both in the loss)."""
import functools
import json
import unicodedata

import numpy as np

FORMATS = ("text", "completion", "chat")
ROLES = ("system", "user", "assistant")


class BadRecord(Exception):
    """A record skipped and counted; str() is the reason (a key of the preprocess report)."""


def parse_record(raw: bytes, fmt: str, keys: dict) -> object:
    """The record's prompt/completion pair or message list; BadRecord when it has the wrong shape."""
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        raise BadRecord("non-utf8") from None
    except ValueError:
        raise BadRecord("invalid-json") from None
    if not isinstance(obj, dict):
        raise BadRecord("missing-key")
    if fmt == "completion":
        prompt, completion = obj.get(keys["prompt"]), obj.get(keys["completion"])
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise BadRecord("missing-key")
        if not completion.strip():
            raise BadRecord("empty")
        return prompt, completion
    messages = obj.get(keys["messages"])
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        raise BadRecord("not-a-message-list")
    if any(m.get("role") not in ROLES for m in messages):
        raise BadRecord("wrong-role")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no-assistant-turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def encode_records(records: list, fmt: str, tokenizer) -> list:
    """(ids, mask) of each parsed record, or the BadRecord it turned out to be. Chat records of a
    Hugging Face tokenizer are rendered and encoded as one batch (transformers renders a list of
    conversations in one call, the tokenizer encodes a list at once)."""
    if fmt == "chat" and tokenizer.kind == "huggingface":
        return _chats_with_template(records, tokenizer)
    return [encode_record(record, fmt, tokenizer) for record in records]


def encode_record(record, fmt: str, tokenizer) -> tuple[list[int], list[int]]:
    """(ids, mask) of one parsed record."""
    if fmt == "completion":
        prompt, completion = record
        prompt_ids = tokenizer.documents([prompt])[0][:-1]  # BOS where added; its EOD dropped
        answer = tokenizer.encode(completion) + [tokenizer.eod]
        return prompt_ids + answer, [0] * len(prompt_ids) + [1] * len(answer)
    if tokenizer.kind == "huggingface":
        [result] = _chats_with_template([record], tokenizer)
        if isinstance(result, BadRecord):
            raise result
        return result
    return _chat_default(record, tokenizer)


def _renderer(tokenizer):
    """render(conversations, add_generation_prompt) -> their texts, as transformers'
    apply_chat_template(conversations, tokenize=False) writes them.

    Workaround, measured: the public call spends ~40 of its ~53 us per conversation copying and
    checking its input (for rich objects our parsed JSON never holds), and turn-by-turn rendering
    asks for 1 + 2 x assistant-turns renders per conversation, which held `--format chat` at 0.64 of
    `--format text`'s throughput. So the template transformers compiles (its own cached
    `_compile_jinja_template`) is rendered directly with the arguments apply_chat_template passes
    it (messages, tools, documents, add_generation_prompt, the special tokens). The first
    conversation of every batch is rendered both ways; any difference, or a transformers without
    that function, falls back to the public call."""
    public = tokenizer.hf.apply_chat_template

    def slow(conversations: list, add_generation_prompt: bool) -> list[str]:
        return public(conversations, tokenize=False, add_generation_prompt=add_generation_prompt) if conversations else []

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        template = _compile_jinja_template(tokenizer.chat_template)
    except (ImportError, AttributeError, TypeError):
        return slow
    arguments = {"tools": None, "documents": None, **tokenizer.hf.special_tokens_map}

    def fast(conversations: list, add_generation_prompt: bool) -> list[str]:
        return [template.render(messages=c, add_generation_prompt=add_generation_prompt, **arguments)
                for c in conversations]

    def checked(conversations: list, add_generation_prompt: bool) -> list[str]:
        texts = fast(conversations, add_generation_prompt)
        if texts and slow(conversations[:1], add_generation_prompt) != texts[:1]:
            return slow(conversations, add_generation_prompt)
        return texts

    return checked


@functools.lru_cache(maxsize=4)
def _byte_lengths(tokenizer) -> np.ndarray | None:
    """Bytes of text per token id, for a byte-level BPE whose normalizer is none or NFC (GPT-2, Llama
    3, Qwen, SmolLM2: each character of a vocabulary entry stands for one byte; an added token is
    its text): token starts then follow from the ids alone, without the tokenizer tracking offsets
    (14% of its time, measured). None for any other tokenizer."""
    backend = tokenizer.hf.backend_tokenizer
    normalizer = type(backend.normalizer).__name__ if backend.normalizer is not None else None
    if normalizer not in (None, "NFC") or type(backend.decoder).__name__ != "ByteLevel":
        return None
    added = {token_id: t.content for token_id, t in backend.get_added_tokens_decoder().items()}
    lengths = np.zeros(backend.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token, token_id in backend.get_vocab(with_added_tokens=True).items():
        lengths[token_id] = len(added[token_id].encode()) if token_id in added else len(token)
    return lengths


def _token_starts(text: str, ids: list, lengths: np.ndarray | None) -> np.ndarray | None:
    """The byte offset at which each token starts, when the ids' byte lengths add up to the text's
    (else None: the caller asks the tokenizer for offsets)."""
    if lengths is None or not (text.isascii() or unicodedata.is_normalized("NFC", text)):
        return None  # NFC would change this text, and with it the bytes the tokens cover
    sizes = lengths[np.asarray(ids, dtype=np.int64)]
    ends = np.cumsum(sizes)
    if not len(ends) or ends[-1] != len(text.encode()):
        return None
    return ends - sizes


def _chats_with_template(records: list, tokenizer) -> list:
    render = _renderer(tokenizer)
    # Per assistant turn: the conversation up to it, and the one before it with the generation prompt.
    turns = [(r, t) for r, messages in enumerate(records) for t, m in enumerate(messages) if m["role"] == "assistant"]
    texts = render(records, False)
    uptos = render([records[r][:t + 1] for r, t in turns], False)
    befores = iter(render([records[r][:t] for r, t in turns if t], True))
    spans, bad = [[] for _ in records], set()
    for (r, t), upto in zip(turns, uptos):
        before = next(befores) if t else ""
        if not upto.startswith(before) or not texts[r].startswith(upto):
            bad.add(r)
        spans[r].append((len(before), len(upto)))
    # transformers' own backend: it matches the template's special tokens (gridtrain's copy splits
    # special-token text, so plain text cannot fake a document boundary).
    backend = tokenizer.hf.backend_tokenizer
    encodings = backend.encode_batch_fast(texts, add_special_tokens=False)
    lengths, stops = _byte_lengths(tokenizer), tokenizer.stop_ids
    out = []
    for r, encoding in enumerate(encodings):
        if r in bad:
            out.append(BadRecord("template-not-prefix-stable"))
            continue
        ids, text = encoding.ids, texts[r]
        starts = _token_starts(text, ids, lengths)
        if starts is None:
            offsets = backend.encode(text, add_special_tokens=False).offsets
            starts, at = np.array([begin for begin, _ in offsets], dtype=np.int64), (lambda i: i)
        else:
            at = (lambda i: i) if text.isascii() else (lambda i: len(text[:i].encode()))
        mask = np.zeros(len(ids), dtype=np.uint8)
        for start, end in spans[r]:
            # The tokens that start inside the span, up to its last end-of-turn token.
            first, stop = np.searchsorted(starts, at(start)), np.searchsorted(starts, at(end))
            end_of_turn = next((i for i in range(stop - 1, first - 1, -1) if ids[i] in stops), stop - 1)
            mask[first:end_of_turn + 1] = 1
        out.append((ids, mask))
    return out


def _chat_default(messages: list, tokenizer) -> tuple[list[int], list[int]]:
    ids, mask = [], []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "assistant":
            piece = tokenizer.encode(" " + content) + [tokenizer.eod]
            ids += piece
            mask += [1] * len(piece)
            continue
        text = f"System: {content}\n\n" if role == "system" else f"User: {content}\n\nAssistant:"
        piece = tokenizer.encode(text)
        ids += piece
        mask += [0] * len(piece)
    return ids, mask


def chat_prompt_ids(messages: list, tokenizer) -> list[int]:
    """The ids that ask the model for the next assistant turn after `messages`: the template with
    its generation prompt (as `apply_chat_template(messages, add_generation_prompt=True)`), or the
    default template's turns ending in `Assistant:`. What `gridtrain generate --chat` feeds."""
    if tokenizer.kind == "huggingface":
        text = tokenizer.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.hf.backend_tokenizer.encode(text, add_special_tokens=False).ids
    return _chat_default(messages, tokenizer)[0]
