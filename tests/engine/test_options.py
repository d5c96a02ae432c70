"""CLI generation from the option dataclasses and the precedence defaults < profile < file < flags."""

import argparse
import json

import pytest

from engine.options import DataOptions, ObjectiveOptions, add_options, build_options


def _parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    add_options(p, DataOptions, ObjectiveOptions)
    return p.parse_args(argv)


def test_flags_file_profile_and_defaults(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"objective": {"temperature": 4.0, "alpha_ce": 1.5}, "batch_size": 7}))
    args = _parse(["--config", str(cfg), "--alpha-ce", "3", "--no-fused-head", "--data", "a.txt", "b.txt"])
    data, obj = build_options(args, DataOptions, ObjectiveOptions, profile={"temperature": 9.0, "max_seq_len": 64})
    assert obj.alpha_ce == 3.0  # flag beats file
    assert obj.temperature == 4.0  # file beats profile
    assert data.max_seq_len == 64  # profile beats default
    assert data.batch_size == 7  # flat key in the file
    assert obj.fused_head is False and obj.alpha_mlm == 2.0  # boolean flag; untouched default
    assert data.data == ["a.txt", "b.txt"]


def test_toml_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[objective]\ntemperature = 3.0\n")
    (obj,) = build_options(_parse(["--config", str(cfg)]), ObjectiveOptions)
    assert obj.temperature == 3.0


@pytest.mark.parametrize(
    "content, match",
    [({"nonsense": 1}, "unknown key 'nonsense'"), ({"objective": {"temprature": 1}}, "temprature")],
)
def test_unknown_keys_are_named(tmp_path, content, match):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match):
        build_options(_parse(["--config", str(cfg)]), DataOptions, ObjectiveOptions)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_options(_parse(["--config", str(tmp_path / "x.toml")]), DataOptions)
