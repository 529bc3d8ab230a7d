"""training_flops_per_token against an independent count: torch's FlopCounterMode over a real
forward + backward of both families (one rank, TP=1).

What the formula leaves out or adds, by design (Megatron's and nanoGPT's count): it charges 6
FLOPs per token to every parameter of a block, norms and biases included, though those do no
matmul; it leaves out elementwise work (softmax, norms, activations, rotary) and the embedding
lookup; it counts attention as full S x S score and value matmuls (what SDPA's math kernel does;
FlopCounterMode sees those only through that kernel, so it is forced here). The vocab is a
multiple of 128, so the head multiplies no padding rows that the formula would not count."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from gridtrain.model.config import ModelConfig
from gridtrain.model.flops import training_flops_per_token

pytestmark = pytest.mark.usefixtures("tp1_group")

SEQ, BATCH = 128, 2
FAMILIES = {
    "llama": ModelConfig(family="llama", vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4,
                         num_kv_heads=2, ffn_hidden_size=192, max_seq_len=SEQ),
    "gpt2": ModelConfig(family="gpt2", vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4,
                        max_seq_len=SEQ),
}


def measured_per_token(cfg: ModelConfig) -> tuple[float, int]:
    """(matmul FLOPs per token of one forward + backward, parameters of the blocks that are not
    matrices), from the built model."""
    from gridtrain.model.decoder import Decoder
    from gridtrain.model.loss import lm_loss
    from gridtrain.model.naming import block_index, split_name

    model = Decoder(cfg, tp_size=1, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        logits = model(tokens, positions, torch.zeros_like(tokens))
        lm_loss(logits, tokens, torch.ones(BATCH, SEQ)).backward()
    blocks = {block_index(i) for i in range(cfg.num_layers)}
    vectors = sum(p.numel() for name, p in model.named_parameters()
                  if p.dim() < 2 and split_name(name, cfg.num_layers)[0] in blocks)
    return counter.get_total_flops() / (BATCH * SEQ), vectors


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_flops_per_token_matches_an_independent_count(family):
    cfg = FAMILIES[family]
    measured, block_vectors = measured_per_token(cfg)
    formula = training_flops_per_token(cfg, SEQ)
    # The only difference is the formula's 6 FLOPs for each norm weight and bias of the blocks.
    assert formula - measured == 6 * block_vectors
    assert 6 * block_vectors < 0.02 * formula  # ...a small share here, smaller at real widths
    # Negative controls: an attention term for half the sequence, or 4 FLOPs per weight (forward +
    # one backward matmul), would not match.
    assert training_flops_per_token(cfg, SEQ // 2) - measured != 6 * block_vectors
    assert formula * 4 / 6 - measured != 6 * block_vectors
