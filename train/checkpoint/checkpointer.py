"""Checkpointer: the trainer's view of checkpoints. `resume(engine)` at start-up finds the newest
checkpoint whose manifest verifies (or the one `train.resume` names) and restores DeepSpeed's
model + optimizer shards, the RNG states and the TrainState; `maybe_save(engine, state)` after each
step saves every `checkpoint.interval_steps` steps and/or `checkpoint.interval_minutes` minutes, or
when forced (a stop request). Both are collective: every rank calls them at the same point."""
import dataclasses
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from gridtrain.launcher.run_config import RunConfig
from gridtrain.parallel.collectives import all_gather_object, any_rank, barrier, broadcast_object, rank_and_world
from gridtrain.train.checkpoint.manifest import MANIFEST_NAME, STATE_NAME, read_manifest, verify_checkpoint
from gridtrain.train.checkpoint.reshard import UNIVERSAL_KEY, convert, load_universal, universal_info, universal_workdir
from gridtrain.train.checkpoint.rng import restore_rng_state
from gridtrain.train.checkpoint.save import DS_TAG, SaveContext, SaveResult, note, rng_file, save_checkpoint
from gridtrain.train.checkpoint.store import (
    BackgroundDeleter, CheckpointError, candidates, choose_valid, list_checkpoints, remove_stale_temps)
from gridtrain.train.state import TrainState


def checkpoint_dir(cfg: RunConfig) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.train.run_dir) / "checkpoints")


def run_layout(cfg: RunConfig, ctx) -> dict:
    """The parallel layout a checkpoint's shards belong to; resuming needs the same one."""
    return {"world_size": ctx.world_size, "tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp,
            "zero_stage": cfg.parallel.zero_stage, "dtype": cfg.train.dtype}


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("gridtrain", "deepspeed", "megatron-core"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def build_save_context(cfg: RunConfig, ctx) -> SaveContext:
    return SaveContext(
        ckpt_dir=checkpoint_dir(cfg), layout=run_layout(cfg, ctx),
        config=json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
        versions=library_versions(), tokenizer=cfg.data.tokenizer,
        keep_last=cfg.checkpoint.keep_last, keep_every=cfg.checkpoint.keep_every)


def _ds(engine):
    """gridtrain's TrainEngine wraps the DeepSpeed engine; DeepSpeed engines are accepted as is."""
    return getattr(engine, "ds_engine", engine)


class Checkpointer:
    def __init__(self, cfg: RunConfig, ctx):
        self.cfg = cfg
        self.ctx = ctx
        self.save_context = build_save_context(cfg, ctx)
        self.dir = self.save_context.ckpt_dir
        self.last_saved_step: int | None = None
        self.last_result: SaveResult | None = None
        self._last_save_time = time.monotonic()
        self._universal_info: dict | None = None
        self.deleter = BackgroundDeleter()  # retired checkpoints go on its thread (rank 0)

    # ---- saving -------------------------------------------------------------------------------

    def maybe_save(self, engine, state: TrainState, force: bool = False) -> SaveResult | None:
        """Save if forced or an interval is due; returns what was saved, else None."""
        if state.step == self.last_saved_step or not (force or self._due(state.step)):
            return None
        return self.save(engine, state)

    def _due(self, step: int) -> bool:
        ckpt = self.cfg.checkpoint
        if ckpt.interval_steps > 0 and step % ckpt.interval_steps == 0:
            return True
        if ckpt.interval_minutes > 0:
            # Clocks differ per rank: any rank past the interval decides for all (a collective,
            # run only when time-based saving is on).
            return any_rank(time.monotonic() - self._last_save_time >= ckpt.interval_minutes * 60)
        return False

    def save(self, engine, state: TrainState) -> SaveResult:
        if self._universal_info is None:  # collective, once: how each parameter splits over TP
            model = self.cfg.model
            self._universal_info = universal_info(_ds(engine), model.vocab_size, model.num_layers)
        result = save_checkpoint(_ds(engine), state, self.save_context, self.deleter,
                                 {UNIVERSAL_KEY: self._universal_info})
        self.last_saved_step = state.step
        self.last_result = result
        self._last_save_time = time.monotonic()
        note(f"checkpoint {result.path.name}: {result.bytes / 1e6:,.1f} MB in {result.seconds:.2f} s "
             f"({result.gb_per_s:.3f} GB/s)")
        self._log_metrics(result)
        return result

    def _log_metrics(self, result: SaveResult) -> None:
        """Rank 0 appends a "checkpoint" record to <run_dir>/metrics.jsonl, next to the trainer's
        train/eval records: one write of one line, so it never splits one of theirs."""
        if rank_and_world()[0] != 0 or not self.cfg.logging.jsonl:
            return
        record = {"kind": "checkpoint", "step": result.step, "path": str(result.path),
                  "ckpt_bytes": result.bytes, "ckpt_write_s": result.seconds,
                  "ckpt_gb_per_s": result.gb_per_s, "time": time.time()}
        run_dir = Path(self.cfg.train.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    # ---- resuming -----------------------------------------------------------------------------

    def resume(self, engine) -> TrainState | None:
        """Restore the checkpoint `train.resume` asks for: "auto" (newest valid in checkpoint.dir,
        None if there is none), "none" (fresh start; refuses if checkpoints exist unless
        checkpoint.overwrite), or a path (one checkpoint, or a checkpoint folder to search)."""
        mode = self.cfg.train.resume
        if mode == "none":
            self._start_fresh()
            return None
        if rank_and_world()[0] == 0:
            remove_stale_temps(self.dir)
        path = self._select(self.dir if mode == "auto" else Path(mode), explicit=mode != "auto")
        if path is None:
            return None
        return self._load(engine, path)

    def _start_fresh(self) -> None:
        existing = list_checkpoints(self.dir)
        if not existing:
            return
        if not getattr(self.cfg.checkpoint, "overwrite", False):
            raise CheckpointError(
                f"train.resume='none': {self.dir} already holds {len(existing)} checkpoint(s) (newest "
                f"{existing[-1][1].name}); resume them (train.resume=auto), use another train.run_dir / "
                "checkpoint.dir, or set checkpoint.overwrite=true to move them aside and start fresh")
        barrier()
        if rank_and_world()[0] == 0:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            aside = self.dir.with_name(f"{self.dir.name}.replaced-{stamp}")
            self.dir.rename(aside)
            note(f"checkpoint.overwrite: moved the previous checkpoints to {aside}")
        barrier()

    def _select(self, root: Path, explicit: bool) -> Path | None:
        """The checkpoint to load, verified by all ranks together (each checksums a share of the
        files). An explicitly named single checkpoint must verify; a folder falls back to older
        checkpoints with a warning naming the bad file."""
        single = (root / MANIFEST_NAME).exists() or (explicit and not list_checkpoints(root))
        paths = broadcast_object([root] if single else candidates(root))
        if not paths:
            return None
        chosen, rejected = choose_valid(paths, verify=self._verify_together)
        for message in rejected:
            note(f"warning: {message}")
        if chosen is None:
            what = f"train.resume={str(root)!r}" if explicit else f"checkpoint.dir={str(root)!r}"
            raise CheckpointError(
                f"{what}: no valid checkpoint ({' | '.join(rejected)}); restore the files, pick another "
                "with --resume-from PATH, or start fresh with --no-resume")
        return chosen

    def _verify_together(self, path: Path) -> list[str]:
        rank, world = rank_and_world()
        problems = verify_checkpoint(path, checksums=True, share=(rank, world))
        return sorted({p for part in all_gather_object(problems) for p in part})

    def _load(self, engine, path: Path) -> TrainState:
        manifest = read_manifest(path)
        record = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
        tag = record.get("ds_tag", DS_TAG)
        if self._same_layout(path, manifest["layout"]):
            load_path, _ = _ds(engine).load_checkpoint(str(path), tag=tag)
            if load_path is None:
                raise CheckpointError(f"{path}: DeepSpeed found no model states under {path / tag}")
            self._restore_rng(path)
        else:
            self._load_resharded(engine, path, tag)
        state = TrainState.from_dict(record["train_state"])
        self.last_saved_step = state.step
        note(f"resumed from {path} (step {state.step}, {state.consumed_samples} samples consumed)")
        return state

    def _restore_rng(self, path: Path) -> None:
        rng = path / rng_file(rank_and_world()[0])
        if rng.exists():
            skipped = restore_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
            if skipped:
                note(f"warning: RNG states not restorable here: {', '.join(skipped)}")

    def _load_resharded(self, engine, path: Path, tag: str) -> None:
        """Another layout: convert to DeepSpeed's universal form (fp32 weights + Adam moments per
        parameter) and load this rank's new shard from it. RNG streams are per rank and cannot be
        mapped onto another layout: they keep this run's seeding."""
        work = universal_workdir(self.dir, path)
        convert(path, work, tag)
        try:
            load_universal(_ds(engine), work, tag)
        finally:
            barrier()
            if rank_and_world()[0] == 0:
                shutil.rmtree(work, ignore_errors=True)
        note(f"resharded {path} from its layout to {self._show(self.save_context.layout)} "
             "(RNG streams restart from the seed)")

    @staticmethod
    def _show(lay: dict) -> str:
        return f"TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']}, ZeRO {lay['zero_stage']}"

    def _same_layout(self, path: Path, saved: dict) -> bool:
        """True if the shards load natively: same TP and PP, and the same DP unless there is no
        ZeRO (then every DP rank holds the full optimizer state). Otherwise resharding is needed,
        which needs ZeRO optimizer files in the checkpoint."""
        now = self.save_context.layout
        same_model_split = saved["tp"] == now["tp"] and saved["pp"] == now["pp"]
        if same_model_split and (saved["dp"] == now["dp"] or (saved["zero_stage"] == 0 and now["zero_stage"] == 0)):
            return True
        if saved["zero_stage"] == 0:
            raise CheckpointError(
                f"{path} was saved with {self._show(saved)} and this run uses {self._show(now)}; "
                "resharding reads ZeRO optimizer files, which a ZeRO-0 checkpoint lacks: resume with "
                "the saved layout (or save with parallel.zero_stage >= 1 to change layouts later)")
        if (saved["zero_stage"] == 3) != (now["zero_stage"] == 3):
            # DeepSpeed 0.19.8's universal form differs between ZeRO-3 and ZeRO 1/2 (ds_to_universal
            # writes mp_rank_* model files and per-parameter steps only for 1/2, zero_pp_rank_* only
            # for 3), and each engine reads only its own: refuse here rather than fail inside it.
            raise CheckpointError(
                f"parallel.zero_stage={now['zero_stage']}: {path} was saved with {self._show(saved)}; "
                "DeepSpeed resumes a ZeRO-3 checkpoint under another layout only into ZeRO-3 and a "
                f"ZeRO 1/2 one only into ZeRO 1/2: set parallel.zero_stage="
                f"{'3' if saved['zero_stage'] == 3 else '1 or 2'}, or resume with the saved layout")
        if now["zero_stage"] == 3 and max(saved["tp"], now["tp"]) > 1:
            # ds_to_universal merges TP slices into full weights, but the ZeRO-3 loader
            # (stage3.py load_hp_checkpoint_state) splits them again only for DeepSpeed AutoTP
            # parameters, not for megatron-core's: it would fill the shards with the wrong values.
            raise CheckpointError(
                f"parallel.tensor_parallel={now['tp']}: {path} was saved with {self._show(saved)}; "
                "DeepSpeed changes the layout of a ZeRO-3 checkpoint only between runs at "
                "tensor_parallel=1 (any DP size): resume with the saved layout")
        return False
