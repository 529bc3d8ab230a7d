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
import json

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


def encode_record(record, fmt: str, tokenizer) -> tuple[list[int], list[int]]:
    """(ids, mask) of one parsed record."""
    if fmt == "completion":
        prompt, completion = record
        prompt_ids = tokenizer.documents([prompt])[0][:-1]  # BOS where added; its EOD dropped
        answer = tokenizer.encode(completion) + [tokenizer.eod]
        return prompt_ids + answer, [0] * len(prompt_ids) + [1] * len(answer)
    if tokenizer.kind == "huggingface":
        return _chat_with_template(record, tokenizer)
    return _chat_default(record, tokenizer)


def _chat_with_template(messages: list, tokenizer) -> tuple[list[int], list[int]]:
    render = tokenizer.hf.apply_chat_template
    text = render(messages, tokenize=False)
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:turn], tokenize=False, add_generation_prompt=True) if turn else ""
        upto = render(messages[:turn + 1], tokenize=False)
        if not upto.startswith(before) or not text.startswith(upto):
            raise BadRecord("template-not-prefix-stable")
        spans.append((len(before), len(upto)))
    # transformers' own backend: it matches the template's special tokens (gridtrain's copy splits
    # special-token text, so plain text cannot fake a document boundary).
    encoding = tokenizer.hf.backend_tokenizer.encode(text, add_special_tokens=False)
    ids, mask, stops = encoding.ids, [0] * len(encoding.ids), tokenizer.stop_ids
    for start, end in spans:
        inside = [i for i, (begin, _) in enumerate(encoding.offsets) if start <= begin < end]
        ends = [i for i in inside if ids[i] in stops]
        for i in inside:
            if not ends or i <= ends[-1]:
                mask[i] = 1
    return ids, mask


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
