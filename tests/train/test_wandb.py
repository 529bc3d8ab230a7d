"""Weights & Biases in offline mode (no network): a real run through the trainer logs the same
records as metrics.jsonl and the resolved config; restarted, it continues the same W&B run. The
offline run files are read back with wandb's own record schema (wandb.proto)."""
import json
import os
import struct
from pathlib import Path

from multirank import launch
from run_config import sections, write_json

WORKER = Path(__file__).with_name("run_worker.py")


def wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (.wandb): a 7-byte ':W&B' header, then
    records framed as in LevelDB's log (32 KiB blocks; 7-byte headers: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += room
            continue
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def history(run_file: Path) -> list[dict]:
    rows = []
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def run_config_of(run_file: Path) -> dict:
    record = next(r for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run")
    return {item.key: json.loads(item.value_json) for item in record.run.config.update}


def test_offline_wandb_logs_the_metrics_and_resumes_the_same_run(tmp_path, text_corpus):
    run_dir = tmp_path / "run"
    config = sections(text_corpus, run_dir, model={"num_kv_heads": None, "ffn_hidden_size": None},
                      optim={"warmup_steps": 1}, train={"eval_interval": 2, "eval_steps": 1},
                      checkpoint={"interval_steps": 3},
                      logging={"wandb_project": "gridtrain-test", "wandb_mode": "offline", "wandb_tags": ["ci", "offline"]})
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    launch(WORKER, 1, [write_json(tmp_path / "run.json", config)], timeout=240, env=env)
    config["train"]["steps"] = 5  # restarted with a longer schedule: resumes step 3's checkpoint
    launch(WORKER, 1, [write_json(tmp_path / "run.json", config)], timeout=240, env=env)

    run_id = (run_dir / "wandb-run-id").read_text().strip()
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)  # the same run, twice
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in jsonl if r["kind"] == "train"}
    logged = [row for f in files for row in history(f)]
    wandb_train = {row["trainer/step"]: row["train/loss"] for row in logged if "train/loss" in row}
    assert wandb_train == train and sorted(train) == [1, 2, 3, 4, 5]
    assert [row["trainer/step"] for row in logged if "val/val_loss" in row] == [0, 2, 3, 4, 5]
    assert any("checkpoint/ckpt_bytes" in row for row in logged)
    config_logged = run_config_of(files[0])
    assert config_logged["model"]["hidden_size"] == 64 and config_logged["logging"]["wandb_mode"] == "offline"
    assert not os.environ.get("WANDB_API_KEY")  # nothing was sent anywhere
