"""Feed-forward blocks: GELU MLP (gpt2) and SwiGLU (llama), the ffn dimension split across TP."""
import math

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from gridtrain.model.attention import tp_project
from gridtrain.model.config import ModelConfig
from gridtrain.model.init import normal_init


class MLP(nn.Module):
    """gpt2: fc_out(gelu_tanh(fc_in(x))) with biases (GPT-2's "gelu_new").
    llama: down_proj(silu(gate_proj(x)) * up_proj(x)), biases only with mlp_bias; gate and up are separate
    ColumnParallelLinears so their full weights do not depend on TP."""

    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig):
        super().__init__()
        self.family = cfg.family
        h, f = cfg.hidden_size, cfg.ffn_size
        bias = cfg.bias("mlp")
        column = dict(config=mp_config, init_method=normal_init(cfg.init_std), bias=bias, gather_output=False)
        out_init = normal_init(cfg.init_std / math.sqrt(2.0 * cfg.num_layers))
        row = dict(config=mp_config, init_method=out_init, bias=bias, input_is_parallel=True, skip_bias_add=False)
        if self.family == "gpt2":
            self.fc_in = ColumnParallelLinear(h, f, **column)
            self.fc_out = RowParallelLinear(f, h, **row)
        else:
            self.gate_proj = ColumnParallelLinear(h, f, **column)
            self.up_proj = ColumnParallelLinear(h, f, **column)
            self.down_proj = RowParallelLinear(f, h, **row)

    def forward(self, x: torch.Tensor, project=tp_project) -> torch.Tensor:
        """x (B, T, h) -> (B, T, h); the inner (B, T, ffn/tp) lives on each TP rank. `project` runs
        each linear layer (gridtrain.model.attention.local_project for inference at TP = 1)."""
        if self.family == "gpt2":
            return project(self.fc_out, F.gelu(project(self.fc_in, x), approximate="tanh"))
        if hasattr(self, "fused_gate_up"):  # inference: one matmul (gridtrain.model.generation.fuse_projections)
            gate, up = F.linear(x, *self.fused_gate_up).chunk(2, dim=-1)
        else:
            gate, up = project(self.gate_proj, x), project(self.up_proj, x)
        return project(self.down_proj, F.silu(gate) * up)
