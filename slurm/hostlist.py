"""Slurm hostlists ("node[01-03,07],gpu-a[1-2]-ib") expanded without Slurm, for where scontrol is
missing or refuses a syntax (see gridtrain.slurm.master.first_host)."""
import re

from gridtrain.errors import UserError


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist: "node[01-03,07],gpu-a[1-2]-ib" -> node01 node02 node03 node07
    gpu-a1-ib gpu-a2-ib. Zero padding of ranges is kept; several bracket groups multiply."""
    hosts = []
    for item in _split_top_level(nodelist.strip()):
        hosts += _expand_item(item)
    if not hosts:
        raise UserError(f"SLURM_JOB_NODELIST={nodelist!r}: no host in it; set MASTER_ADDR to rank 0's host")
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in items if item]


def _expand_item(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if not match:
        if "[" in item or "]" in item:
            raise UserError(f"SLURM_JOB_NODELIST: {item!r} is not a Slurm hostlist (unbalanced brackets); check how "
                            "the job was launched, or set MASTER_ADDR to rank 0's host")
        return [item]
    head, tail = item[:match.start()], item[match.end():]
    expanded = []
    for part in match.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise UserError(f"SLURM_JOB_NODELIST: {item!r} is not a Slurm hostlist (cannot read the range {part!r}); "
                            "check how the job was launched, or set MASTER_ADDR to rank 0's host")
        width = len(lo)
        for number in range(int(lo), int(hi or lo) + 1):
            expanded += [head + str(number).zfill(width) + rest for rest in _expand_item(tail)]
    return expanded
