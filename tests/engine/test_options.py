"""CLI generation from the option dataclasses and the precedence defaults < profile < file < flags."""

import argparse
import json

import pytest

from engine.options import DataOptions, ObjectiveOptions, OptimOptions, add_options, build_options, check_ranges


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


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_options(_parse(["--config", str(tmp_path / "x.toml")]), DataOptions)


@pytest.mark.parametrize(
    "content, match",
    [
        ({"batch_size": "eight"}, r"batch_size \(--batch-size\) must be a whole number, got 'eight'"),
        ({"objective": {"temperature": "warm"}}, r"temperature \(--temperature\) must be a number, got 'warm'"),
        ({"max_seq_len": 2.5}, r"max_seq_len \(--max-seq-len\) must be a whole number, got 2.5"),
        ({"data": "corpus.txt", "fused_head": "yes"}, r"fused_head \(--fused-head\) must be true or false"),
        ({"data": [1, 2]}, r"data \(--data\) must be a string, got 1"),
        ({"nonsense": 1}, "unknown key 'nonsense'"),
        ({"objective": {"temprature": 1}}, "temprature"),
    ],
)
def test_config_values_are_checked_against_the_dataclasses(tmp_path, content, match):
    """A config file's values get the types the flags would (no TypeError deep in a run, no 2.5 rounded to 2), and
    an unknown key is named."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match):
        build_options(_parse(["--config", str(cfg)]), DataOptions, ObjectiveOptions)


def test_config_numbers_are_converted_and_lr_fast_is_refused(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("batch_size = 8.0\n[objective]\ntemperature = 3\n")
    data, obj = build_options(_parse(["--config", str(cfg)]), DataOptions, ObjectiveOptions)
    assert data.batch_size == 8 and type(data.batch_size) is int and obj.temperature == 3.0
    cfg.write_text('[optim]\nlr = "fast"\n')
    with pytest.raises(ValueError, match=r"lr \(--lr\) must be a number, got 'fast'"):
        build_options(_parse(["--config", str(cfg)]), OptimOptions)


@pytest.mark.parametrize(
    "options, match",
    [
        (ObjectiveOptions(alpha_ce=-1.0), r"--alpha-ce must be ≥ 0, got -1.0"),
        (ObjectiveOptions(temperature=0.0), r"--temperature must be > 0, got 0.0"),
        (OptimOptions(lr=float("inf")), r"--lr must be > 0, got inf"),
        (OptimOptions(steps=0), r"--steps must be ≥ 1, got 0"),
        (DataOptions(heldout_fraction=1.0), r"--heldout-fraction must be in \(0, 1\), got 1.0"),
    ],
)
def test_ranges_are_checked(options, match):
    with pytest.raises(ValueError, match=match):
        check_ranges(options)
