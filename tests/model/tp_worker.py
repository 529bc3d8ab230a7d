"""Worker for test_tensor_parallel.py, run on 2 ranks: for each family, build the decoder at TP=1
and at TP=2 from the same seed and check that gathered full weights are equal (exact), logits and
loss match the TP=1 model and the plain-torch reference, and gathered gradients match."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

sys.path.insert(0, str(Path(__file__).parent))
from torch_reference import reference_logits  # noqa: E402

from gridtrain.model.config import ModelConfig  # noqa: E402
from gridtrain.model.decoder import Decoder  # noqa: E402
from gridtrain.model.loss import lm_loss  # noqa: E402

VOCAB = 300  # padded to 384 at TP=1 and 512 at TP=2: the padding differs, the real rows must not
CONFIGS = [
    ModelConfig(family="gpt2", vocab_size=VOCAB, hidden_size=64, num_layers=2, num_attention_heads=4,
                max_seq_len=32, init_std=0.1),
    ModelConfig(family="llama", vocab_size=VOCAB, hidden_size=64, num_layers=2, num_attention_heads=4,
                num_kv_heads=2, max_seq_len=32, init_std=0.1),
]
ATOL = 2e-5


def gather_tp(tensor: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """The full tensor of a TP-split parameter (or the replicated one as is)."""
    if not getattr(param, "tensor_model_parallel", False):
        return tensor
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=g)
    segment_ids = (torch.arange(16) >= 7).long().expand(2, 16).clone()
    position_ids = torch.where(segment_ids == 0, torch.arange(16), torch.arange(16) - 7)
    loss_mask = torch.ones(2, 16)
    loss_mask[1, 12:] = 0
    return tokens, position_ids, segment_ids, torch.roll(tokens, -1, 1), loss_mask


def run(model, with_grads=True):
    """Full logits (gathered over TP), loss, and full weights and gradients by name."""
    tokens, pos, seg, labels, mask = batch()
    model.zero_grad(set_to_none=True)
    logits = model(tokens, pos, seg)
    full_logits = gather_vocab(logits.detach())
    loss = lm_loss(logits, labels, mask)
    loss.backward()
    weights = {n: gather_tp(p.detach(), p) for n, p in model.named_parameters()}
    grads = {n: gather_tp(p.grad, p) for n, p in model.named_parameters()} if with_grads else None
    return full_logits, loss.detach(), weights, grads


def check_family(cfg: ModelConfig) -> None:
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    ref_logits, ref_loss, ref_w, ref_g = run(Decoder(cfg, tp_size=1, seed=42, segment_mask=True))
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    model = Decoder(cfg, tp_size=2, seed=42, segment_mask=True)
    logits, loss, w, g = run(model)
    vocab_split = {n for n in w if w[n].shape[0] == cfg.padded_vocab_size(2)}
    assert vocab_split == {n for n in ref_w if ref_w[n].shape[0] == cfg.padded_vocab_size(1)}
    assert w.keys() == ref_w.keys() and len(vocab_split) == (1 if cfg.tied else 2)
    for name in w:
        rows = slice(0, cfg.vocab_size) if name in vocab_split else slice(None)
        assert torch.equal(w[name][rows], ref_w[name][rows]), f"weight {name} differs between TP=2 and TP=1"
        torch.testing.assert_close(g[name][rows], ref_g[name][rows], atol=1e-6, rtol=1e-5, msg=f"grad {name}")
        if name in vocab_split:
            assert torch.all(w[name][cfg.vocab_size:] == 0) and torch.all(g[name][cfg.vocab_size:] == 0)
    torch.testing.assert_close(logits[..., :VOCAB], ref_logits[..., :VOCAB], atol=ATOL, rtol=0)
    assert torch.all(logits[..., VOCAB:] == torch.finfo(torch.float32).min)
    tokens, pos, seg, _, _ = batch()
    expected = reference_logits(cfg, w, tokens, pos, seg, segment_mask=True)
    torch.testing.assert_close(logits[..., :VOCAB], expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    negative_control(model, ref_logits)
    parallel_state.destroy_model_parallel()
    print(f"rank {dist.get_rank()}: {cfg.family} TP=2 matches TP=1 (weights exact, logits, loss, grads)", flush=True)


def negative_control(model: Decoder, ref_logits: torch.Tensor) -> None:
    """Nudge one weight of the second TP rank's shard: the logit comparison must catch it."""
    q = getattr(model, "2").attn.q_proj.weight
    with torch.no_grad():
        if parallel_state.get_tensor_model_parallel_rank() == 1:
            q[0, 0] += 1e-3
        logits = gather_vocab(model(*batch()[:3]))
    assert (logits[..., :VOCAB] - ref_logits[..., :VOCAB]).abs().max() > 5 * ATOL


def main() -> None:
    dist.init_process_group("gloo")
    for cfg in CONFIGS:
        check_family(cfg)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
