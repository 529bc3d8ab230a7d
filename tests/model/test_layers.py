"""Layer-list properties the engine relies on: layout-independent seeded weights, initialisation,
activation checkpointing."""
import math
from dataclasses import replace

import pytest
import torch

from gridtrain.model.config import ModelConfig

pytestmark = pytest.mark.usefixtures("tp1_group")

CFG = {
    "gpt2": ModelConfig(family="gpt2", vocab_size=300, hidden_size=64, num_layers=3, num_attention_heads=4,
                        max_seq_len=32),
    "llama": ModelConfig(family="llama", vocab_size=300, hidden_size=64, num_layers=3, num_attention_heads=4,
                         num_kv_heads=2, max_seq_len=32),
}


def inputs():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 300, (2, 16), generator=g)
    return tokens, torch.arange(16).expand(2, 16), torch.zeros(2, 16, dtype=torch.long)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_pipeline_stage_subset_builds_identical_weights(family):
    from gridtrain.model.decoder import Decoder, build_layer_factories

    full = Decoder(CFG[family], tp_size=1, seed=99).state_dict()
    factories = build_layer_factories(CFG[family], tp_size=1, seed=99)
    assert [f.name for f in factories] == ["embedding", "block_0", "block_1", "block_2", "final_norm", "head"]
    # A last pipeline stage builds only its tail of the list, after the global RNG has moved on.
    torch.manual_seed(12345)
    rng_before = torch.random.get_rng_state()
    stage = {i: factories[i].build() for i in (5, 3, 4)}
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # building never consumes global RNG
    for i, module in stage.items():
        prefix = "tied_modules.embed." if factories[i].tie_key else f"{i}."
        for name, tensor in module.state_dict().items():
            if tensor is not None:
                assert torch.equal(tensor, full[prefix + name]), prefix + name
    other_seed = Decoder(CFG[family], tp_size=1, seed=100).state_dict()
    assert not torch.equal(other_seed["3.attn.q_proj.weight"], full["3.attn.q_proj.weight"])
    # Different blocks draw from different streams.
    assert not torch.equal(full["1.attn.q_proj.weight"], full["2.attn.q_proj.weight"])


def test_tied_head_factory_maps_onto_tied_layer_spec():
    from gridtrain.model.decoder import build_layer_factories

    gpt2 = build_layer_factories(CFG["gpt2"], tp_size=1, seed=1)
    assert gpt2[0].tie_key == gpt2[-1].tie_key == "embed" and gpt2[0].build is gpt2[-1].build
    assert gpt2[-1].forward_fn is not None and gpt2[0].forward_fn is None
    assert gpt2[0].tied_weight_attr == "word.weight"
    embedding = gpt2[0].build()
    hidden = (torch.randn(2, 16, 64), *inputs()[1:])
    calls = []
    embedding.word.register_forward_pre_hook(lambda *_: calls.append(1))
    logits = gpt2[-1].forward_fn(embedding, hidden)
    # The tied weight is used inside a call of its owning module (where ZeRO-3 gathers it).
    assert len(calls) == 1
    torch.testing.assert_close(logits[..., :300], hidden[0] @ embedding.word.weight[:300].T)
    llama = build_layer_factories(CFG["llama"], tp_size=1, seed=1)
    assert all(f.tie_key is None for f in llama)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_initialisation(family):
    from gridtrain.model.decoder import Decoder
    from gridtrain.model.norms import norm_implementation

    cfg = replace(CFG[family], hidden_size=128, num_layers=8)
    w = Decoder(cfg, tp_size=1, seed=5).state_dict()
    emb = w["tied_modules.embed.word.weight" if cfg.tied else "0.word.weight"]
    assert torch.all(emb[300:] == 0) and abs(emb[:300].std().item() - 0.02) < 0.001
    assert abs(w["3.attn.q_proj.weight"].std().item() - 0.02) < 0.001
    scaled = 0.02 / math.sqrt(2 * 8)
    out = "3.mlp.fc_out.weight" if family == "gpt2" else "3.mlp.down_proj.weight"
    for name in ("3.attn.o_proj.weight", out):
        assert abs(w[name].std().item() - scaled) < 0.1 * scaled, name
    for name, tensor in w.items():
        if tensor is not None and name.endswith("bias") and "norm" not in name:
            assert torch.all(tensor == 0), name
        if tensor is not None and "norm" in name:
            assert torch.all(tensor == (1 if name.endswith("weight") else 0)), name
    assert norm_implementation() == "torch"  # no CUDA here, so never apex


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_activation_checkpointing_gives_identical_loss_and_grads(family, monkeypatch):
    from gridtrain.model.block import Block
    from gridtrain.model.decoder import Decoder
    from gridtrain.model.loss import lm_loss

    tokens, pos, seg = inputs()
    labels, mask = torch.roll(tokens, -1, 1), torch.ones(2, 16)

    def loss_and_grads(checkpointing, loss_mask=mask):
        model = Decoder(replace(CFG[family], activation_checkpointing=checkpointing), tp_size=1, seed=3)
        loss = lm_loss(model(tokens, pos, seg), labels, loss_mask)
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters()}

    calls = []
    original = Block._hidden
    monkeypatch.setattr(Block, "_hidden", lambda self, *a: calls.append(1) or original(self, *a))
    loss, grads = loss_and_grads(False)
    plain_calls, calls[:] = len(calls), []
    ckpt_loss, ckpt_grads = loss_and_grads(True)
    assert (plain_calls, len(calls)) == (3, 6)  # with checkpointing each block really recomputes
    assert torch.equal(loss, ckpt_loss)
    assert all(torch.equal(grads[n], ckpt_grads[n]) for n in grads)
    # Negative control: the same comparison catches a small real difference (one masked token).
    other_mask = mask.clone()
    other_mask[0, 3] = 0
    _, other = loss_and_grads(True, other_mask)
    assert not all(torch.equal(grads[n], other[n]) for n in grads)
