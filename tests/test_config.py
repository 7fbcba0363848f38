from __future__ import annotations

from pathlib import Path

import pytest

from specialize.config import ConfigError, ModelConfig, apply_overrides, load_config


def test_yaml_plus_overrides(tmp_path: Path):
    path = tmp_path / "m.yaml"
    path.write_text("spec: embedded\nthreads: 2\n")
    cfg = load_config(ModelConfig, path, ["dtype=float32", "threads=1"])
    assert cfg == ModelConfig(spec="embedded", dtype="float32", threads=1)


def test_nested_overrides_parse_yaml_values():
    data = apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]", "a.b=null", "d.e=x"])
    assert data == {"a": {"b": None, "c": [1, 2]}, "d": {"e": "x"}}


def test_unknown_key_named(tmp_path: Path):
    path = tmp_path / "m.yaml"
    path.write_text("spec: embedded\nthread: 2\n")
    with pytest.raises(ConfigError, match=r"m.yaml: thread: Extra inputs are not permitted"):
        load_config(ModelConfig, path)


def test_invalid_yaml_names_line(tmp_path: Path):
    path = tmp_path / "m.yaml"
    path.write_text("spec: embedded\nthreads: [1\n")
    with pytest.raises(ConfigError, match=r"m.yaml:\d+: invalid YAML"):
        load_config(ModelConfig, path)


def test_bad_override_and_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(ModelConfig, None, ["threads"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(ModelConfig, tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="threads: Input should be greater than or equal to 1"):
        load_config(ModelConfig, None, ["threads=0"])


def test_override_of_a_nested_default_keeps_its_other_defaults():
    from pydantic import BaseModel

    class Inner(BaseModel):
        a: int = 1
        b: float = 0.5

    class Outer(BaseModel):
        name: str
        inner: Inner = Inner(a=7, b=0.9)  # non-trivial defaults of the submodel

    cfg = load_config(Outer, None, ["name=x", "inner.a=3"])
    assert cfg.inner == Inner(a=3, b=0.9)


def test_compile_reaches_the_config_from_the_flag_and_the_fingerprint_only_when_on():
    from specialize.cli import _model_config, build_parser

    args = build_parser().parse_args(["generate", "hello", "--compile"])
    assert _model_config(args).compile is True
    assert _model_config(build_parser().parse_args(["generate", "hello"])).compile is False
    # runs made before the option existed keep their fingerprints (and resume); a compiled run gets its own
    assert "compile" not in ModelConfig().hashed()
    assert ModelConfig(compile=True).hashed()["compile"] is True
