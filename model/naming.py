"""The decoder's layer list and parameter names, defined once. Checkpoint reading, resharding and
conversion map from exactly these names.

The decoder is an ordered list of layers (gridtrain.model.decoder.build_layer_factories): the
embedding at index 0, block i at index 1 + i, the final norm at L + 1 and the head at L + 2. The
PP=1 Decoder and DeepSpeed's PipelineModule both name a parameter "<layer index>.<key>", the layer
index being global (a pipeline stage keeps the indices of the layers it owns). gpt2 ties the head
to the embedding: that one module is "tied_modules.embed.<key>" and there is no "<L + 2>." entry.

Keys inside a layer: embedding "word.weight" (rows: the vocab padded for TP) and, for gpt2,
"position.weight"; block "attn_norm.*", "attn.{q,k,v,o}_proj.{weight,bias}", "mlp_norm.*",
"mlp.{fc_in,fc_out}.*" (gpt2) or "mlp.{gate,up,down}_proj.weight" (llama); final norm "norm.*";
untied head "proj.weight" (rows: the padded vocab).

DeepSpeed's pipeline checkpoint writes each layer's state dict to its own file (keys are the
layer keys); `parameter_name(index, key, ...)` gives the PP=1 name of such an entry.
"""
import re

TIE_KEY = "embed"
TIED_PREFIX = f"tied_modules.{TIE_KEY}."
EMBEDDING = 0
# Keys whose first dimension is the vocab, padded to a multiple of make_vocab_size_divisible_by x TP.
EMBEDDING_VOCAB_KEY = "word.weight"
HEAD_VOCAB_KEY = "proj.weight"

_NAME = re.compile(r"^(\d+)\.(.+)$")


def block_index(block: int) -> int:
    return 1 + block


def final_norm_index(num_layers: int) -> int:
    return num_layers + 1


def head_index(num_layers: int) -> int:
    return num_layers + 2


def layer_count(num_layers: int) -> int:
    """Entries of the layer list: embedding, the blocks, final norm, head."""
    return num_layers + 3


def parameter_name(layer: int, key: str, num_layers: int, tied: bool) -> str:
    """The Decoder's name of `key` in layer `layer` (a tied embedding lives under tied_modules)."""
    if tied and layer in (EMBEDDING, head_index(num_layers)):
        return TIED_PREFIX + key
    return f"{layer}.{key}"


def split_name(name: str, num_layers: int) -> tuple[int, str]:
    """(layer index, key) of a Decoder parameter name; the tied module counts as the embedding."""
    if name.startswith(TIED_PREFIX):
        return EMBEDDING, name[len(TIED_PREFIX):]
    match = _NAME.match(name)
    if not match or int(match.group(1)) >= layer_count(num_layers):
        raise ValueError(f"{name!r} is not a decoder parameter name of a {num_layers}-block model")
    return int(match.group(1)), match.group(2)


def is_vocab_parameter(name: str, num_layers: int) -> bool:
    """Whether the parameter's first dimension is the padded vocab (word embedding, untied head)."""
    layer, key = split_name(name, num_layers)
    return (layer, key) in ((EMBEDDING, EMBEDDING_VOCAB_KEY), (head_index(num_layers), HEAD_VOCAB_KEY))
