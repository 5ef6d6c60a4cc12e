from pathlib import Path

import pytest
from pydantic import Field

from pipeline.config import ConfigError, Section, load_config, parse_override


class ToyConfig(Section):
    iterations: int = Field(10, ge=1)
    method: str = "a"
    nested_flag: bool = False


MODELS = {"toy": ToyConfig}


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_relative_paths(tmp_path):
    cfg = load_config(write(tmp_path, "run:\n  input: videos\n"), MODELS)
    assert cfg.run.input == (tmp_path / "videos").resolve()
    assert cfg.section("toy").iterations == 10


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"toy\.iteratons: unknown key"):
        load_config(write(tmp_path, "toy:\n  iteratons: 3\n"), MODELS)


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"rendr: unknown section"):
        load_config(write(tmp_path, "rendr:\n  seed: 1\n"), MODELS)


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"toy\.iterations: .*'many'"):
        load_config(write(tmp_path, "toy:\n  iterations: many\n"), MODELS)


def test_range_violation(tmp_path):
    with pytest.raises(ConfigError, match=r"toy\.iterations"):
        load_config(write(tmp_path, "toy:\n  iterations: 0\n"), MODELS)


def test_overrides_parse_yaml_values(tmp_path):
    overrides = ["toy.iterations=5", "toy.nested_flag=true", "run.chunk_frames=3"]
    cfg = load_config(None, MODELS, overrides)
    assert cfg.section("toy").iterations == 5
    assert cfg.section("toy").nested_flag is True
    assert cfg.run.chunk_frames == 3


@pytest.mark.parametrize("bad", ["toy", "iterations=3", "=3"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError):
        parse_override(bad)


def test_section_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="toy: must be a mapping"):
        load_config(write(tmp_path, "toy: 3\n"), MODELS)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", MODELS)


def test_shared_body_section_checks_model_path(tmp_path):
    from stages import section_models

    models = section_models()
    with pytest.raises(ConfigError, match=r"body.model_path"):
        load_config(write(tmp_path, "body:\n  model: smplx\n"), models)
    with pytest.raises(ConfigError, match=r"body.model: .*smpl"):
        load_config(write(tmp_path, "body:\n  model: smpl-x\n"), models)
    sub = tmp_path / "configs"
    sub.mkdir()
    cfg = load_config(write(sub, "body:\n  model: smpl\n  model_path: ../models\n"), models)
    assert cfg.section("body").model_path == (tmp_path / "models").resolve()
