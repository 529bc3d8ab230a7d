"""Which layout changes a checkpoint can be resumed into, as manifest layout records ({"tp", "pp",
"dp", "zero_stage", "dtype"}) see them. Pure rules, no torch: the trainer asks them at resume and
`gridtrain checkpoint reshard` before it starts any rank."""
from pathlib import Path


def describe(layout: dict) -> str:
    """A manifest's layout record in words: "TP 1 x PP 2 x DP 2, ZeRO 1"."""
    return f"TP {layout['tp']} x PP {layout['pp']} x DP {layout['dp']}, ZeRO {layout['zero_stage']}"


def same_shards(saved: dict, now: dict) -> bool:
    """Whether a checkpoint's files load natively into `now`: same TP and PP, and the same DP
    unless neither uses ZeRO (then every DP rank holds the full optimizer state)."""
    if saved["tp"] != now["tp"] or saved["pp"] != now["pp"]:
        return False
    return saved["dp"] == now["dp"] or (saved["zero_stage"] == 0 and now["zero_stage"] == 0)


def reshard_refusal(saved: dict, now: dict, path: Path) -> str | None:
    """Why the checkpoint at `path`, saved under layout record `saved`, cannot be resumed into
    layout record `now` (which needs resharding), or None if DeepSpeed can do it."""
    if saved["zero_stage"] == 0:
        return (f"{path} was saved with {describe(saved)} and this run uses {describe(now)}; "
                "resharding reads ZeRO optimizer files, which a ZeRO-0 checkpoint lacks: resume with "
                "the saved layout (or save with parallel.zero_stage >= 1 to change layouts later)")
    if (saved["zero_stage"] == 3) != (now["zero_stage"] == 3):
        # DeepSpeed 0.19.8's universal form differs between ZeRO-3 and ZeRO 1/2 (ds_to_universal
        # writes mp_rank_* model files and per-parameter steps only for 1/2, zero_pp_rank_* only
        # for 3), and each engine reads only its own.
        return (f"parallel.zero_stage={now['zero_stage']}: {path} was saved with {describe(saved)}; "
                "DeepSpeed resumes a ZeRO-3 checkpoint under another layout only into ZeRO-3 and a "
                f"ZeRO 1/2 one only into ZeRO 1/2: set parallel.zero_stage="
                f"{'3' if saved['zero_stage'] == 3 else '1 or 2'}, or resume with the saved layout")
    if now["zero_stage"] == 3 and max(saved["tp"], now["tp"]) > 1:
        # ds_to_universal merges TP slices into full weights, but the ZeRO-3 loader
        # (stage3.py load_hp_checkpoint_state) splits them again only for DeepSpeed AutoTP
        # parameters, not for megatron-core's: it would fill the shards with the wrong values.
        return (f"parallel.tensor_parallel={now['tp']}: {path} was saved with {describe(saved)}; "
                "DeepSpeed changes the layout of a ZeRO-3 checkpoint only between runs at "
                "tensor_parallel=1 (any DP size): resume with the saved layout")
    if now["zero_stage"] == 0 and now.get("dtype") != "bf16":
        # DeepSpeed restores universal checkpoints only into its ZeRO and bf16 optimizers.
        return (f"parallel.zero_stage=0: resuming {path} ({describe(saved)}) under another layout needs "
                "a ZeRO optimizer in the new run; set parallel.zero_stage >= 1")
    return None
