"""What `gridtrain generate` runs: the source's weights in a one-rank Decoder (TP = PP = 1) and its
SentencePiece tokenizer around gridtrain.model.generation."""
import contextlib
import sys

import sentencepiece as spm
import torch

from gridtrain.convert.sources import open_weights
from gridtrain.data.spm_model import special_ids
from gridtrain.errors import UserError
from gridtrain.model.decoder import Decoder
from gridtrain.model.generation import Sampling, fuse_projections, generate
from gridtrain.parallel.config import ParallelConfig
from gridtrain.parallel.full_weights import assign_full_weights
from gridtrain.parallel.groups import initialize_single


class Generator:
    def __init__(self, decoder, tokenizer: str):
        self.decoder = decoder
        self.sp = spm.SentencePieceProcessor(model_file=tokenizer)
        self.ids = special_ids(self.sp)

    def complete(self, prompts: list[str], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stream=None) -> list[str]:
        """The completion of each prompt (text after it, up to eos); with `stream`, the single
        prompt's text is written to it as the tokens come."""
        encoded = [self.sp.encode(prompt) or [self.ids["bos"]] for prompt in prompts]
        sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed)
        shown = [""]

        def on_tokens(new: list[list[int]]) -> None:
            text = self.text(new[0])
            if text.startswith(shown[0]):  # byte-fallback pieces complete a character later
                stream.write(text[len(shown[0]):])
                stream.flush()
                shown[0] = text

        try:
            new = generate(self.decoder, encoded, sampling, self.ids["eos"], max(self.ids["pad"], 0),
                           on_tokens if stream is not None else None)
        except ValueError as exc:
            raise UserError(f"generate: {exc}; shorten the prompt or lower --max-new-tokens") from None
        if stream is not None:
            stream.write("\n")
        return [self.text(tokens) for tokens in new]

    def text(self, tokens: list[int]) -> str:
        if tokens and tokens[-1] == self.ids["eos"]:
            tokens = tokens[:-1]
        return self.sp.decode(tokens)


def load_decoder(source, device: str):
    """A one-rank Decoder holding `source`'s weights, in eval mode on `device` (auto: CUDA if any)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu")
    backend = "gloo" if device == "cpu" else "auto"
    ctx = initialize_single(ParallelConfig(backend=backend))
    decoder = Decoder(source.model, tp_size=1, seed=0)
    assign_full_weights(decoder, source, source.model.num_layers, tp=1, tp_rank=0)
    decoder = decoder.to(ctx.device).eval()
    fuse_projections(decoder)
    return decoder


def load_generator(path: str, device: str, trust_pickle: bool = False) -> Generator:
    """The source at `path` ready to generate. Library notices go to stderr: stdout carries only
    the generated text (the command imports this module inside the same redirection)."""
    with contextlib.redirect_stdout(sys.stderr):
        source = open_weights(path, trust_pickle)
        if source.tokenizer is None:
            raise UserError(f"{path}: no tokenizer.model there; generation needs the SentencePiece model")
        print(f"[gridtrain] generating with {source.path} ({source.model.family}, {source.model.num_layers} layers)",
              flush=True)
        return Generator(load_decoder(source, device), source.tokenizer)
