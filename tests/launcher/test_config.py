"""Config composition (files in order, include:), overrides with YAML scalar rules, and the exact
messages for unknown sections/keys (did-you-mean) and wrong types, all collected in one error."""
from pathlib import Path

import pytest

from gridtrain.errors import ConfigError
from gridtrain.launcher.config import load_config, to_yaml, write_config


def write(folder: Path, name: str, text: str) -> str:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def problems(paths, overrides=()) -> list:
    with pytest.raises(ConfigError) as info:
        load_config(paths, overrides)
    return info.value.problems


def test_files_merge_in_order_later_wins(tmp_path):
    size = write(tmp_path, "size.yaml", "model: {hidden_size: 512, num_layers: 8}\ntrain: {steps: 10}\n")
    local = write(tmp_path, "local.yaml", "model: {num_layers: 2}\nparallel: {zero_stage: 1}\n")
    cfg = load_config([size, local])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.train.steps, cfg.parallel.zero_stage) == (512, 2, 10, 1)
    assert cfg.model.num_attention_heads == 8  # untouched fields keep their defaults
    assert load_config([local, size]).model.num_layers == 8


def test_include_is_relative_to_the_including_file_and_overridden_by_it(tmp_path):
    write(tmp_path, "presets/base.yaml", "model: {hidden_size: 512, num_layers: 8}\n")
    write(tmp_path, "presets/extra.yaml", "include: base.yaml\nmodel: {num_layers: 6}\ntrain: {steps: 3}\n")
    run = write(tmp_path, "runs/run.yaml", "include: [../presets/extra.yaml]\ntrain: {steps: 7}\n")
    cfg = load_config([run])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.train.steps) == (512, 6, 7)


def test_include_cycle_is_reported(tmp_path):
    a = write(tmp_path, "a.yaml", "include: b.yaml\n")
    write(tmp_path, "b.yaml", "include: a.yaml\n")
    [(field, value, fix)] = problems([a])
    assert (field, value) == ("include", str(tmp_path / "a.yaml"))
    assert fix.startswith("include cycle (") and fix.endswith("); remove one of these includes")


def test_overrides_use_yaml_scalar_rules(tmp_path):
    base = write(tmp_path, "b.yaml", "model: {num_kv_heads: 4}\n")
    cfg = load_config([base], ["--model.hidden_size=512", "--optim.lr=1e-4", "--model.tie_embeddings=true",
                               "--model.num_kv_heads=null", "train.run_dir=out/x", "--optim.min_lr=0",
                               "--data.blend=[[0.3, a_doc], [0.7, b_doc]]"])
    assert cfg.model.hidden_size == 512
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)  # YAML reads 1e-4 as text
    assert cfg.optim.min_lr == 0.0 and isinstance(cfg.optim.min_lr, float)
    assert cfg.model.tie_embeddings is True and cfg.model.num_kv_heads is None
    assert cfg.train.run_dir == "out/x"
    assert cfg.data.blend == ((0.3, "a_doc"), (0.7, "b_doc"))


def test_unknown_section_and_key_suggest_the_close_name(tmp_path):
    path = write(tmp_path, "c.yaml", "modle: {hidden_size: 1}\nmodel: {hidden_sise: 100}\n")
    assert problems([path], ["--optim.learning_rate=1", "--trian.steps=3"]) == [
        ("modle", "<section>", f"unknown section in {path}; did you mean 'model'?"),
        ("trian", "<section>", "unknown section in override trian.steps; did you mean 'train'?"),
        ("model.hidden_sise", 100, "unknown key; did you mean 'hidden_size'?"),
        ("optim.learning_rate", 1, "unknown key; known: lr, min_lr, weight_decay, beta1, beta2, eps, grad_clip, "
                                   "warmup_steps, schedule, decay_steps"),
    ]


@pytest.mark.parametrize("text, expected", [
    ("model: {hidden_size: big}", ("model.hidden_size", "big", "expected an integer, got str")),
    ("model: {hidden_size: 1.5}", ("model.hidden_size", 1.5, "expected an integer, got float")),
    ("model: {num_kv_heads: four}", ("model.num_kv_heads", "four", "expected an integer or null, got str")),
    ("parallel: {data_parallel: all}", ("parallel.data_parallel", "all", "expected an integer or one of auto or null, "
                                         "got str")),
    ("optim: {lr: fast}", ("optim.lr", "fast", "expected a finite number, got str")),
    ("model: {tie_embeddings: 1}", ("model.tie_embeddings", 1, "expected a boolean (true/false) or null, got int")),
    ("train: {jsonl: 1}", ("train.jsonl", 1, "unknown key; did you mean 'logging.jsonl'?")),
    ("logging: {jsonl: yes please}", ("logging.jsonl", "yes please", "expected a boolean (true/false), got str")),
    ("model: {family: gpt3}", ("model.family", "gpt3", "expected one of gpt2, llama, got str")),
    ("train: {run_dir: 5}", ("train.run_dir", 5, "expected a string, got int")),
    ("data: {blend: a_doc}", ("data.blend", "a_doc", "expected a list, got str")),
    ("model: 5", ("model", 5, "must be a mapping of model fields (in {path})")),
])
def test_wrong_types_name_the_expected_type(tmp_path, text, expected):
    path = write(tmp_path, "t.yaml", text + "\n")
    field, value, fix = expected
    assert problems([path]) == [(field, value, fix.format(path=path))]


def test_every_problem_is_collected_into_one_error(tmp_path):
    path = write(tmp_path, "m.yaml", "model: {hidden_size: big, num_layer: 2}\ntrain: {steps: x}\n")
    with pytest.raises(ConfigError) as info:
        load_config([path, str(tmp_path / "missing.yaml")], ["--optim.lr"])
    assert [p[0] for p in info.value.problems] == [
        "config file", "override", "model.hidden_size", "model.num_layer", "train.steps"]
    assert str(info.value).startswith("5 config problems: config file=")


def test_bad_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "y.yaml", "model:\n  hidden_size: [1, 2\n")
    [(field, value, fix)] = problems([path])
    assert (field, value) == ("config file", path)
    assert fix.startswith("is not valid YAML at line 3") and fix.endswith("; fix the syntax")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config([write(tmp_path, "r.yaml", "data: {blend: [[1.0, x_doc]]}\noptim: {lr: 1e-3}\n")])
    written = write_config(cfg, tmp_path / "out" / "resolved.yaml")
    assert load_config([str(written)]) == cfg
    assert "lr: 0.001" in to_yaml(cfg)
    assert [p.name for p in written.parent.iterdir()] == ["resolved.yaml"]  # no temp file left
