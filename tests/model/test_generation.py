"""Generation with the KV cache against the full forward pass of the same Decoder (one rank)."""
import pytest
import torch

from gridtrain.model.config import ModelConfig
from gridtrain.model.generation import Sampling, fuse_projections, generate

pytestmark = pytest.mark.usefixtures("tp1_group")

CONFIGS = {
    "llama": ModelConfig(family="llama", vocab_size=200, hidden_size=64, num_layers=2, num_attention_heads=4,
                         num_kv_heads=2, max_seq_len=64, init_std=0.2),
    "gpt2": ModelConfig(family="gpt2", vocab_size=200, hidden_size=64, num_layers=2, num_attention_heads=4,
                        max_seq_len=64, init_std=0.2),
}
PROMPTS = [[5, 17, 42, 8, 99, 3, 61], [12, 7], [150, 151, 152, 153]]


def decoder(family: str, fused: bool = True):
    from gridtrain.model.decoder import Decoder

    model = Decoder(CONFIGS[family], tp_size=1, seed=5).eval()
    if fused:
        fuse_projections(model)
    return model


def greedy_by_full_forward(model, prompt: list[int], steps: int) -> list[int]:
    """The reference: re-run the whole sequence every step, no cache."""
    tokens = list(prompt)
    for _ in range(steps):
        seq = torch.tensor([tokens])
        with torch.no_grad():
            logits = model(seq, torch.arange(len(tokens))[None], torch.zeros_like(seq))[0, -1, :model.cfg.vocab_size]
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("family", list(CONFIGS))
def test_cached_greedy_equals_full_forward_and_batching_changes_nothing(family):
    model = decoder(family)
    alone = [generate(model, [p], Sampling(max_new_tokens=12), stop_ids=())[0] for p in PROMPTS]
    assert alone == [greedy_by_full_forward(model, p, 12) for p in PROMPTS]
    assert len({tuple(a) for a in alone}) == len(PROMPTS) and all(len(set(a)) > 2 for a in alone)
    # One batch, left-padded to the longest prompt: each row as if generated alone.
    assert generate(model, PROMPTS, Sampling(max_new_tokens=12), stop_ids=()) == alone
    # Fusing q/k/v (and gate/up) for inference changes no token.
    assert [generate(decoder(family, fused=False), [p], Sampling(max_new_tokens=12), stop_ids=())[0] for p in PROMPTS] == alone


def test_eos_stops_and_sampling_is_seeded():
    model = decoder("llama")
    greedy = generate(model, [PROMPTS[0]], Sampling(max_new_tokens=12), stop_ids=())[0]
    stopped = generate(model, [PROMPTS[0]], Sampling(max_new_tokens=12), stop_ids={greedy[3]})[0]
    assert stopped == greedy[:greedy.index(greedy[3]) + 1]  # up to and including the first eos
    hot = Sampling(max_new_tokens=24, temperature=1.5, top_p=0.95, seed=7)
    first = generate(model, [PROMPTS[0]], hot, stop_ids=())[0]
    assert generate(model, [PROMPTS[0]], hot, stop_ids=())[0] == first  # same seed, same tokens
    assert generate(model, [PROMPTS[0]], Sampling(24, 1.5, 0, 0.95, seed=8), stop_ids=())[0] != first
    assert first != generate(model, [PROMPTS[0]], Sampling(max_new_tokens=24), stop_ids=())[0]
    top1 = Sampling(max_new_tokens=12, temperature=1.0, top_k=1, seed=3)  # sampling among one: greedy
    assert generate(model, [PROMPTS[0]], top1, stop_ids=())[0] == greedy


def test_too_long_is_refused():
    with pytest.raises(ValueError, match="exceed the model's max_seq_len"):
        generate(decoder("gpt2"), [list(range(60))], Sampling(max_new_tokens=8), stop_ids=())
