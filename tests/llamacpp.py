"""llama.cpp itself (through llama-cpp-python, built from source by `make llamacpp`) as the reader
of gridtrain's GGUF files: its loader, tokenizer, kernels and sampler, as users run them."""
import numpy as np


def available() -> str | None:
    """None when llama_cpp imports, else why not (the tests that need it skip saying so)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"llama-cpp-python is not installed ({exc}); `make llamacpp` builds it"
    return None


F32 = 0  # GGML_TYPE_F32


def load(path, n_ctx: int = 256, vocab_only: bool = False):
    """A llama.cpp model of the GGUF file with logits kept for every position; n_ctx a multiple of
    256 (llama.cpp pads the context to one; llama-cpp-python sizes its logits by n_ctx). The KV
    cache is f32: llama.cpp's default f16 cache alone moves fp32 logits by ~1e-3 (measured), which
    would hide what the file holds."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=not vocab_only, vocab_only=vocab_only,
                 n_threads=1, n_threads_batch=1, type_k=F32, type_v=F32, verbose=False)


def logits(llm, tokens: list[int]) -> np.ndarray:
    """(len(tokens), vocab) fp32: row i predicts token i + 1, as a causal LM's logits."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], dtype=np.float32)


def greedy(llm, prompt: list[int], count: int, vocab: int | None = None) -> list[int]:
    """The next `count` tokens (no stop at eos: exactly `count`), each the argmax of llama.cpp's
    logits after the tokens before it, as its greedy sampler picks, among ids below `vocab` (None:
    all rows, [PAD] ones included) as gridtrain generates; the KV cache carries over each step."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(count):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1][:vocab]))
        out.append(token)
        llm.eval([token])
    return out


def tokenize(llm, text: str) -> list[int]:
    """llama.cpp's ids of `text` with no BOS added and special-token strings read as text (as
    gridtrain's data pipeline encodes documents)."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
