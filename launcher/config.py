"""Compose a RunConfig from YAML files and `--section.field=value` overrides, gpt-neox style: several
files merge in order (a model-size file, then a local-setup file; later wins per key), and a file
may list `include:` files (relative to itself) that it overrides. Every unknown key and wrong type
is collected into one ConfigError. Cross-field rules live in gridtrain.launcher.validate."""
import dataclasses
import difflib
import math
import os
import typing
from pathlib import Path

import yaml

from gridtrain.errors import ConfigError
from gridtrain.train.run_config import RunConfig

SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(RunConfig)}
MAX_INT = 2**31 - 1  # every count and size of a run fits a 32-bit integer; larger ones are typos
Problem = tuple[str, object, str]


def load_config(paths: list[str], overrides: list[str] = (), notes: list[str] | None = None) -> RunConfig:
    """RunConfig of `paths` merged in order, then `overrides` ("[--]section.field=value", value
    parsed with YAML scalar rules), with the defaults that depend on other fields chosen (each
    choice is appended to `notes`, when given). Raises one ConfigError listing every problem."""
    problems: list[Problem] = []
    if not paths:
        problems.append(("config", None, "give at least one YAML config file (see configs/)"))
    merged: dict[str, dict] = {}
    for path in paths:
        for source in _read_with_includes(Path(path), (), problems):
            _merge(merged, source, problems)
    for text in overrides:
        _merge(merged, _parse_override(text, problems), problems)
    cfg = _build(merged, problems)
    if problems:
        raise ConfigError(problems)
    return choose_defaults(cfg, notes if notes is not None else [])


def choose_defaults(cfg: RunConfig, notes: list[str]) -> RunConfig:
    """Fill the fields left null whose default depends on other sections: parallel.zero_stage."""
    par = cfg.parallel
    if par.zero_stage is None:
        bf16 = cfg.train.dtype == "bf16" and par.pipeline_parallel == 1
        stage = 1 if bf16 else 0
        if bf16:
            notes.append("parallel.zero_stage: 1, chosen for train.dtype bf16 without a pipeline (DeepSpeed's ZeRO-0 "
                         "bf16 optimizer drifts from fp32-master AdamW; ZeRO-1 holds the same memory at DP=1)")
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(par, zero_stage=stage))
    return cfg


def _read_with_includes(path: Path, chain: tuple, problems: list[Problem]) -> list[tuple[str, dict]]:
    """(source name, mapping) of every file `path` includes (depth first, in order), then its own."""
    data = _read_yaml(path, problems)
    if data is None:
        return []
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        problems.append(("include", str(path), f"include cycle ({cycle}); remove one of these includes"))
        return []
    include = data.pop("include", [])
    if isinstance(include, str):
        include = [include]
    if not isinstance(include, list) or not all(isinstance(p, str) for p in include):
        problems.append((f"{path}: include", include, "must be a list of YAML paths relative to this file"))
        include = []
    sources = []
    for name in include:
        sources += _read_with_includes(path.parent / name, (*chain, resolved), problems)
    return sources + [(str(path), data)]


def _read_yaml(path: Path, problems: list[Problem]) -> dict | None:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problems.append(("config file", str(path), f"cannot be read ({exc.strerror}); check the path"))
        return None
    except UnicodeDecodeError as exc:
        problems.append(("config file", str(path), f"is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                         f"{exc.start}); give a YAML file saved as UTF-8"))
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        reason = getattr(exc, "problem", None) or "invalid YAML"
        problems.append(("config file", str(path), f"is not valid YAML{line} ({reason}); fix the syntax"))
        return None
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(("config file", str(path), "must be a mapping of sections (model:, parallel:, ...)"))
        return None
    return data


def _parse_override(text: str, problems: list[Problem]) -> tuple[str, dict]:
    body = text[2:] if text.startswith("--") else text
    key, sep, raw = body.partition("=")
    section, dot, name = key.partition(".")
    if not sep or not dot or not section or not name:
        problems.append(("override", text, "use the form --section.field=value, e.g. --train.steps=100"))
        return text, {}
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. an unbalanced bracket in a path): keep the text as written
    return f"override {key}", {section: {name: value}}


def _merge(merged: dict, source: tuple[str, dict], problems: list[Problem]) -> None:
    """Fold one (name, mapping) into `merged`: section by section, later keys win."""
    name, data = source
    for section, values in data.items():
        if section not in SECTIONS:
            problems.append((str(section), "<section>", f"unknown section in {name}{_did_you_mean(str(section), SECTIONS)}"))
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            problems.append((section, values, f"must be a mapping of {section} fields (in {name})"))
            continue
        merged.setdefault(section, {}).update(values)


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; known: {', '.join(choices)}"


def _suggest_key(section: str, key: str, hints: dict) -> str:
    """A close name in the same section, else the same name in another section, else the list."""
    if difflib.get_close_matches(key, list(hints), n=1, cutoff=0.6):
        return _did_you_mean(key, hints)
    elsewhere = [f"{other}.{key}" for other, cls in SECTIONS.items()
                 if other != section and key in {f.name for f in dataclasses.fields(cls)}]
    return f"; did you mean {elsewhere[0]!r}?" if elsewhere else _did_you_mean(key, hints)


def _build(merged: dict, problems: list[Problem]) -> RunConfig:
    sections = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in merged.get(section, {}).items():
            field = f"{section}.{key}"
            if key not in hints:
                problems.append((field, value, f"unknown key{_suggest_key(section, str(key), hints)}"))
                continue
            ok, converted, expected = _coerce(value, hints[key])
            if ok:
                kwargs[key] = converted
            else:
                problems.append((field, value, f"expected {expected}, got {_type_name(value)}"))
        sections[section] = cls(**kwargs)
    return RunConfig(**sections)


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _coerce(value, hint) -> tuple[bool, object, str]:
    """(ok, converted value, description of the expected type) for a YAML value and a field hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return True, None, ""
        expected = []
        for inner in (a for a in args if a is not type(None)):
            ok, converted, described = _coerce(value, inner)
            if ok:
                return True, converted, ""
            expected.append(described)
        return False, value, " or ".join(expected + ["null"] * (type(None) in args))
    if origin is typing.Literal:
        return value in args, value, "one of " + ", ".join(str(a) for a in args)
    if hint is bool:
        return isinstance(value, bool), value, "a boolean (true/false)"
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            return False, value, "an integer"
        return abs(value) <= MAX_INT, value, f"an integer of at most {MAX_INT}"
    if hint is float:
        return _coerce_float(value)
    if hint is str:
        return isinstance(value, str), value, "a string"
    if hint is tuple:
        return isinstance(value, (list, tuple)), _to_tuple(value), "a list"
    raise TypeError(f"config field type {hint!r} has no YAML rule")


def _coerce_float(value) -> tuple[bool, object, str]:
    # PyYAML reads `1e-4` (no dot) as a string; accept it as the number the user meant. Infinity
    # and NaN are no setting: an infinite timeout would silently turn hang detection off.
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not math.isfinite(number):
        return False, value, "a finite number"
    return True, number, "a finite number"


def _to_tuple(value):
    if isinstance(value, (list, tuple)):
        return tuple(_to_tuple(v) for v in value)
    return value


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML that load_config reads back to an equal RunConfig."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return yaml.safe_dump(plain(dataclasses.asdict(cfg)), sort_keys=False)


def write_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config atomically (temp name + rename): ranks never read half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, path)
    return path
