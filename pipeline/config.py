"""Typed, validated configuration.

The file has one `run` section (paths and runner settings) and one section per stage. The
runner section is defined here; each stage section is the stage's own `config_model`, so
a stage owns its settings and pipeline/ knows nothing about bodies. Every error names the
key (`fit.iterations`) and the problem; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A configuration or usage problem; the message names the key."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class RunSection(Section):
    input: Path = Field(Path("data/sample"), description="folder of videos or a CSV manifest")
    output: Path = Field(Path("out/sample"), description="the anonymized dataset folder")
    workdir: Path = Field(Path("work/sample"), description="per-stage artifacts (resumable)")
    chunk_frames: int = Field(64, ge=1, le=4096, description="frames held in memory at once")
    progress: bool = True
    retries: int = Field(2, ge=0, le=20, description="re-runs of a video's stage after an "
                         "unexpected error or a dead worker, before it is recorded as failed")


def _format_validation_error(section: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in (section, *e["loc"]))
        if e["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
        else:
            parts.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(parts)


class Config:
    """The whole configuration: `run` plus one validated section per known stage."""

    def __init__(self, run: RunSection, sections: dict[str, Section], source: Path | None):
        self.run = run
        self.sections = sections
        self.source = source

    def section(self, name: str) -> Section:
        return self.sections[name]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"run": json.loads(self.run.model_dump_json())}
        for name, sec in self.sections.items():
            out[name] = json.loads(sec.model_dump_json())
        return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`fit.iterations=50` -> (["fit", "iterations"], 50). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. export.preview=true")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if len(path) < 2:
        raise ConfigError(f"--set {text!r}: key must be SECTION.KEY, e.g. fit.iterations")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {exc}") from exc
    return path, value


def _apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def load_config(
    path: Path | None,
    stage_models: Mapping[str, type[Section]],
    overrides: Iterable[str] = (),
    run_overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read YAML (or defaults when `path` is None), apply `--set` overrides, validate.

    Relative paths (in `run` and in any section) are resolved against the config file's
    folder, so a config runs the same from any working directory.
    """
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded
        base = path.resolve().parent
    for text in overrides:
        key_path, value = parse_override(text)
        _apply_override(data, key_path, value)
    for key, value in (run_overrides or {}).items():
        if value is not None:
            data.setdefault("run", {})[key] = value

    known = {"run", *stage_models}
    for key in data:
        if key not in known:
            raise ConfigError(f"{key}: unknown section (known: {', '.join(sorted(known))})")
    for key, value in data.items():
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping of settings, got {value!r}")

    try:
        run = RunSection.model_validate(data.get("run") or {})
    except ValidationError as exc:
        raise ConfigError(_format_validation_error("run", exc)) from None
    for attr in ("input", "output", "workdir"):
        value = getattr(run, attr)
        if not value.is_absolute():
            setattr(run, attr, (base / value).resolve())

    sections: dict[str, Section] = {}
    for name, model in stage_models.items():
        try:
            sections[name] = model.model_validate(data.get(name) or {})
        except ValidationError as exc:
            raise ConfigError(_format_validation_error(name, exc)) from None
        _resolve_paths(sections[name], base)
    return Config(run, sections, path)


def _resolve_paths(section: Section, base: Path) -> None:
    """Relative file settings (model folders, palettes) are relative to the config file,
    like the `run` paths."""
    for key in type(section).model_fields:
        value = getattr(section, key)
        if isinstance(value, Path) and not value.is_absolute():
            setattr(section, key, (base / value).resolve())
        elif isinstance(value, Section):  # nested sections (train.data, ...)
            _resolve_paths(value, base)


def fingerprint_of(section: BaseModel) -> str:
    """Canonical JSON of a section: what a stage's fingerprint depends on."""
    return json.dumps(json.loads(section.model_dump_json()), sort_keys=True)
