"""What `gridtrain generate` runs: the source's weights in a one-rank Decoder (TP = PP = 1) and the
tokenizer it carries (gridtrain.data.tokenizer, any kind) around gridtrain.model.generation."""
import contextlib
import sys

import torch

from gridtrain.convert.sources import open_weights
from gridtrain.data.finetune_records import chat_prompt_ids
from gridtrain.data.tokenizer import load_tokenizer
from gridtrain.errors import UserError
from gridtrain.model.decoder import Decoder
from gridtrain.model.generation import Sampling, fuse_projections, generate
from gridtrain.parallel.config import ParallelConfig
from gridtrain.parallel.full_weights import assign_full_weights
from gridtrain.parallel.groups import initialize_single


class Generator:
    def __init__(self, decoder, tokenizer):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.chat = False  # prompts are user turns of the chat template (after `system`, if any)
        self.system: str | None = None

    def use_chat(self, system: str | None) -> None:
        """Prompts become a user turn (after a system turn when given), rendered with the
        tokenizer's chat template and its generation prompt; generation stops at end of turn."""
        if self.tokenizer.kind == "huggingface" and self.tokenizer.chat_template is None:
            raise UserError("--chat: the tokenizer has no chat template (chat_template.jinja or chat_template in "
                            "tokenizer_config.json); generate without --chat, or add the template")
        self.chat, self.system = True, system

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt as a document starts in the training data (a BOS where the tokenizer adds
        one, as transformers' tokenizer(prompt) does), without the end of document; with --chat,
        a user turn ready for the assistant's answer."""
        if self.chat:
            system = [{"role": "system", "content": self.system}] if self.system is not None else []
            return chat_prompt_ids(system + [{"role": "user", "content": prompt}], self.tokenizer)
        ids = self.tokenizer.documents([prompt])[0][:-1]
        return ids or [self.tokenizer.bos if self.tokenizer.bos >= 0 else self.tokenizer.eod]

    def complete(self, prompts: list[str], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stream=None) -> list[str]:
        """The completion of each prompt (text after it, up to eos or an end-of-turn token); with
        `stream`, the single prompt's text is written to it as the tokens come, each character once
        it is complete."""
        sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed)
        stops = self.tokenizer.stop_ids
        decoder, shown = self.tokenizer.stream(), [0]

        def on_tokens(new: list[list[int]]) -> None:
            for token in new[0][shown[0]:]:
                if token not in stops:
                    stream.write(decoder.step(token))
            shown[0] = len(new[0])
            stream.flush()

        try:
            new = generate(self.decoder, [self.prompt_ids(p) for p in prompts], sampling, stops,
                           max(self.tokenizer.pad, 0), on_tokens if stream is not None else None,
                           vocab_size=self.tokenizer.vocab_size)
        except ValueError as exc:
            raise UserError(f"generate: {exc}; shorten the prompt or lower --max-new-tokens") from None
        if stream is not None:
            stream.write(decoder.finish() + "\n")
        return [self.text(tokens) for tokens in new]

    def text(self, tokens: list[int]) -> str:
        if tokens and tokens[-1] in self.tokenizer.stop_ids:
            tokens = tokens[:-1]
        return self.tokenizer.decode(tokens)


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
            raise UserError(f"{path}: no tokenizer there (a tokenizer.json, tokenizer.model, or a checkpoint's "
                            "copy of data.tokenizer); generation needs the one the model was trained with")
        tokenizer = load_tokenizer(source.tokenizer)
        print(f"[gridtrain] generating with {source.path} ({source.model.family}, {source.model.num_layers} layers, "
              f"{tokenizer.kind} tokenizer)", flush=True)
        return Generator(load_decoder(source, device), tokenizer)
