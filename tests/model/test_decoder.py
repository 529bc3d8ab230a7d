"""Single-rank checks of the decoder against an independent plain-torch reference."""
import pytest
import torch
import torch.nn.functional as F
from torch_reference import reference_logits

from gridtrain.model.config import ModelConfig
from gridtrain.model.flops import count_parameters

pytestmark = pytest.mark.usefixtures("tp1_group")

# init_std 0.1 (not 0.02) so activations are O(1) and a wrong computation shows up clearly.
CONFIGS = {
    "gpt2": ModelConfig(family="gpt2", vocab_size=300, hidden_size=64, num_layers=2, num_attention_heads=4,
                        max_seq_len=32, init_std=0.1),
    "llama": ModelConfig(family="llama", vocab_size=300, hidden_size=64, num_layers=2, num_attention_heads=4,
                         num_kv_heads=2, max_seq_len=32, init_std=0.1, rope_theta=500.0),
}
ATOL = 2e-5  # fp32, two implementations with different op order


def batch(seed=0, B=2, T=16):
    """Two documents per sample with positions reset at the boundary (data.reset_position_ids)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 300, (B, T), generator=g)
    segment_ids = (torch.arange(T) >= 7).long().expand(B, T).clone()
    position_ids = torch.where(segment_ids == 0, torch.arange(T), torch.arange(T) - 7)
    return tokens, position_ids, segment_ids


def build(family, seed=1234, segment_mask=False, **overrides):
    from dataclasses import replace

    from gridtrain.model.decoder import Decoder

    return Decoder(replace(CONFIGS[family], **overrides), tp_size=1, seed=seed, segment_mask=segment_mask)


@pytest.mark.parametrize("segment_mask", [False, True])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logits_match_reference(family, segment_mask):
    model = build(family, segment_mask=segment_mask)
    tokens, pos, seg = batch()
    logits = model(tokens, pos, seg)
    weights = {k: v.detach() for k, v in model.state_dict().items() if v is not None}
    expected = reference_logits(model.cfg, weights, tokens, pos, seg, segment_mask)
    assert logits.shape == (2, 16, model.cfg.padded_vocab_size(1))
    assert expected.abs().max() > 0.5  # the comparison is over non-trivial numbers
    torch.testing.assert_close(logits[..., :300], expected, atol=ATOL, rtol=0)


def test_negative_controls_fall_outside_tolerance():
    tokens, pos, seg = batch()
    llama = build("llama")
    w = {k: v.detach() for k, v in llama.state_dict().items() if v is not None}
    # Meta's interleaved rotary pairing instead of rotate-half: a plausible, wrong convention.
    wrong = reference_logits(llama.cfg, w, tokens, pos, seg, interleaved_rope=True)
    assert (llama(tokens, pos, seg)[..., :300] - wrong).abs().max() > 50 * ATOL
    gpt2 = build("gpt2")
    w = {k: v.detach().clone() for k, v in gpt2.state_dict().items() if v is not None}
    w["2.mlp.fc_out.weight"][3, 5] += 1e-3  # one weight of the last block, a tiny nudge
    perturbed = reference_logits(gpt2.cfg, w, tokens, pos, seg)
    assert (gpt2(tokens, pos, seg)[..., :300] - perturbed).abs().max() > 5 * ATOL


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_and_segment_mask(family):
    tokens, pos, seg = batch()
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 300  # a token in the second document
    causal = build(family)
    before, after = causal(tokens, pos, seg), causal(changed, pos, seg)
    torch.testing.assert_close(before[:, :10], after[:, :10], atol=1e-6, rtol=0)
    assert (before[:, 10:] - after[:, 10:]).abs().max() > 1e-3  # the change is visible from t=10 on
    # Segment mask: changing the first document never reaches the second one...
    changed = tokens.clone()
    changed[:, 2] = (changed[:, 2] + 1) % 300
    masked = build(family, segment_mask=True)
    before, after = masked(tokens, pos, seg), masked(changed, pos, seg)
    torch.testing.assert_close(before[:, 7:], after[:, 7:], atol=1e-6, rtol=0)
    # ...while plain causal attention lets it through (negative control for the mask).
    before, after = causal(tokens, pos, seg), causal(changed, pos, seg)
    assert (before[:, 7:] - after[:, 7:]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_padded_vocab_is_invisible(family):
    from gridtrain.model.loss import lm_loss

    model = build(family)
    tokens, pos, seg = batch()
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = torch.ones(2, 16)
    loss_mask[1, 12:] = 0
    logits = model(tokens, pos, seg)
    assert logits.shape[-1] == 384 and torch.all(logits[..., 300:] == torch.finfo(torch.float32).min)
    expected = (F.cross_entropy(logits[..., :300].detach().flatten(0, 1), labels.flatten(), reduction="none")
                * loss_mask.flatten()).sum() / loss_mask.sum()
    loss = lm_loss(logits, labels, loss_mask)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)
    # A loss that saw the padding would differ: the unmasked padded logits are 0, not -inf.
    leaky = F.cross_entropy(model(tokens, pos, seg).detach().masked_fill(torch.arange(384) >= 300, 0.0)
                            .flatten(0, 1), labels.flatten(), reduction="none")
    assert abs((leaky * loss_mask.flatten()).sum() / loss_mask.sum() - expected) > 1e-3
    loss.backward()
    head = model.tied_modules["embed"].word if model.cfg.tied else getattr(model, "4").proj
    assert torch.all(head.weight[300:] == 0) and torch.all(head.weight.grad[300:] == 0)
    assert head.weight.grad[:300].abs().max() > 0


def test_all_masked_micro_batch_gives_zero_loss():
    from gridtrain.model.loss import lm_loss

    logits = build("llama")(*batch())
    assert lm_loss(logits, batch()[0], torch.zeros(2, 16)).item() == 0.0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_parameter_count_matches_flops(family):
    model = build(family)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(model.cfg, 1)
    untied = build(family, tie_embeddings=family != "gpt2")  # gpt2 untied, llama tied
    assert sum(p.numel() for p in untied.parameters()) == count_parameters(untied.cfg, 1)
