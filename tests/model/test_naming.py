"""The one definition of layer naming against real Decoders of both families."""
import pytest

from gridtrain.model.config import ModelConfig
from gridtrain.model.naming import (
    EMBEDDING,
    block_index,
    final_norm_index,
    head_index,
    is_vocab_parameter,
    layer_count,
    parameter_name,
    split_name,
)

pytestmark = pytest.mark.usefixtures("tp1_group")

MODELS = {
    "gpt2": ModelConfig(family="gpt2", vocab_size=300, hidden_size=32, num_layers=3, num_attention_heads=4, max_seq_len=16),
    "llama": ModelConfig(family="llama", vocab_size=300, hidden_size=32, num_layers=3, num_attention_heads=4,
                         num_kv_heads=2, max_seq_len=16),
}


@pytest.mark.parametrize("family", list(MODELS))
def test_every_decoder_name_splits_and_rebuilds(family):
    from gridtrain.model.decoder import Decoder

    cfg = MODELS[family]
    names = [name for name, _ in Decoder(cfg, 1, 0).named_parameters()]
    layers = set()
    for name in names:
        layer, key = split_name(name, cfg.num_layers)
        assert parameter_name(layer, key, cfg.num_layers, cfg.tied) == name
        layers.add(layer)
    blocks = {block_index(i) for i in range(cfg.num_layers)}
    expected = {EMBEDDING, *blocks, final_norm_index(cfg.num_layers)} | (set() if cfg.tied else {head_index(cfg.num_layers)})
    assert layers == expected and layer_count(cfg.num_layers) == 6
    vocab = sorted(name for name in names if is_vocab_parameter(name, cfg.num_layers))
    assert vocab == (["tied_modules.embed.word.weight"] if cfg.tied else ["0.word.weight", "5.proj.weight"])
    # Negative controls: a block's projection ending in "proj.weight" is not the head; a name past
    # the layer list is not a decoder name.
    assert not is_vocab_parameter("1.attn.q_proj.weight", cfg.num_layers)
    with pytest.raises(ValueError):
        split_name("6.proj.weight", cfg.num_layers)
