"""backbone.runtime.config: strict keys, typed overrides, round trip through YAML."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass, field
from typing import Literal

import pytest

from backbone.runtime.config import (
    ConfigError,
    config_diff,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_override,
)
from backbone.runtime.errors import UserError


@dataclass(frozen=True)
class Optim:
    lr: float = 0.1
    epochs: int = 3
    milestones: tuple[float, ...] = ()
    kind: Literal["paper", "cosine"] = "paper"
    clip: float | None = None


@dataclass(frozen=True)
class Schema:
    name: str = "run"
    flag: bool = False
    optim: Optim = field(default_factory=Optim)


def write(tmp_path, text: str):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_file_values_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1e-3\n  milestones: [10, 20]\n"), Schema)
    # "1e-3" is a string to YAML 1.1; the float field still gets a float.
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.milestones == (10.0, 20.0)
    assert cfg.optim.epochs == 3 and cfg.name == "run"
    with pytest.raises(FrozenInstanceError):
        cfg.name = "x"  # type: ignore[misc]


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, Schema)
    message = str(info.value)
    assert str(path) in message and "'optim.lrr'" in message and "\n" not in message
    assert isinstance(info.value, UserError)


def test_overrides_are_typed_by_yaml(tmp_path):
    cfg = load_config(
        write(tmp_path, ""),
        Schema,
        ["optim.lr=0.5", "optim.epochs=7", "flag=true", "optim.milestones=[1, 2.5]", "optim.clip=null"],
    )
    assert cfg.optim.lr == 0.5 and cfg.optim.epochs == 7 and cfg.flag is True
    assert cfg.optim.milestones == (1.0, 2.5) and cfg.optim.clip is None
    assert load_config(None, Schema, ["name=123"]).name == "123"  # a number where a str is expected


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optim.lrr=1", "unknown key 'optim.lrr', did you mean 'lr'?"),
        ("nope.lr=1", "unknown key 'nope'"),
        ("optim.lr=abc", "optim.lr expects a number"),
        ("optim.epochs=1.5", "optim.epochs expects an integer"),
        ("flag=yes please", "flag expects true or false"),
        ("optim.kind=step", "one of 'paper', 'cosine'"),
        ("name.sub=1", "'name' is not a section"),
        ("optim", "expected KEY=VALUE"),
    ],
)
def test_bad_override_is_one_line_error(tmp_path, override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, ""), Schema, [override])
    assert fragment in str(info.value)
    assert f"--set {override}" in str(info.value) or "expected KEY=VALUE" in str(info.value)


def test_unknown_key_in_a_file_suggests_the_close_one_only_when_there_is_one(tmp_path):
    with pytest.raises(ConfigError, match=r"exp.yaml: unknown key 'optim.epoch', did you mean 'epochs'\?"):
        load_config(write(tmp_path, "optim: {epoch: 2}\n"), Schema)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "zzz: 1\n"), Schema)
    assert "did you mean" not in str(info.value) and "unknown key 'zzz'" in str(info.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", Schema)
    with pytest.raises(ConfigError, match="exp.yaml"):
        load_config(write(tmp_path, "optim: [unclosed\n"), Schema)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"), Schema)


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config(None, Schema, ["optim.milestones=[3, 6]", "optim.kind=cosine"])
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    assert load_config(out, Schema) == cfg
    plain = config_to_dict(cfg)
    assert plain["optim"]["milestones"] == [3.0, 6.0]
    assert config_from_dict(Schema, plain) == cfg


def test_parse_override_and_diff():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a=") == ("a", "")
    assert config_diff({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 0}) == ["a.c", "d"]
