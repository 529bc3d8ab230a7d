"""Run under `mpiexec -n N`: discover the rank environment, then prove it works by forming a
torch gloo process group from it and all-reducing the ranks."""
import json

import torch
import torch.distributed as dist

from gridtrain.launcher.rank_env import discover

found = discover()
dist.init_process_group("gloo", init_method="env://")
total = torch.tensor([float(found.rank)])
dist.all_reduce(total)
print(json.dumps({"source": found.source, "rank": found.rank, "world": found.world_size, "local": found.local_rank,
                  "addr": found.master_addr, "port": found.master_port, "sum": total.item(),
                  "torch_rank": dist.get_rank(), "torch_world": dist.get_world_size()}), flush=True)
dist.destroy_process_group()
