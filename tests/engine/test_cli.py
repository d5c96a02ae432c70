"""The command line as a new user meets it: help, messages, the loss plot and the task table."""

import builtins
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import cli
from engine.options import DataOptions, MaskingOptions, RunOptions
from engine.report import plot_curves

COMMANDS = ("pretrain", "adapt-head", "init-student", "finetune", "task")


def test_help_lists_every_command_and_imports_no_torch():
    code = "import sys; from engine.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")  # no torch import: help answers at once
    for name in COMMANDS:
        assert f"\n  {name} " in out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_shows_defaults_and_choices(command, capsys):
    assert cli.main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default:" in text
    if command != "init-student":
        assert "--precision {auto,bf16,fp16,fp32}" in text and "(default: auto)" in text
    if command in ("pretrain", "init-student", "task"):
        assert "{distilbert,bert}" in text


def test_pretrain_help_shows_its_defaults_and_the_demo_profile(capsys):
    cli.main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "optimizer steps (default: 1000)" in text and "(default: 0.7)" in text  # steps, mlm_smoothing
    assert "With no --teacher: the bundled demo" in text and "steps 150" in text and "mlm_smoothing 0.0" in text
    cli.main(["finetune", "--help"])
    assert "peak learning rate (default: 5e-05)" in " ".join(capsys.readouterr().out.split())  # its own profile


def test_too_little_text_names_the_file_without_a_python_list(minilm_dir, tmp_path):
    from engine.pretrain import prepare_corpus

    notes = tmp_path / "notes.txt"
    notes.write_text("too short")
    with pytest.raises(ValueError) as e:
        prepare_corpus(minilm_dir, DataOptions(data=[str(notes)]), MaskingOptions(), RunOptions(), tmp_path, 30522,
                       torch.device("cpu"))  # fmt: skip
    assert str(e.value).startswith(f"{notes}: 0 usable sequences") and "['" not in str(e.value)


def _history(n=15):
    return [{"step": 10 * i, "loss": 16 - 0.1 * i, "kd": 2.5 - 0.05 * i, "mlm": 1.2, "cos": 0.3} for i in range(1, n)]


def test_loss_plot_is_written(tmp_path):
    path = plot_curves(_history(), tmp_path / "loss_curve.png")
    assert path == tmp_path / "loss_curve.png" and path.stat().st_size > 10_000
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_skipped_plot_says_why_and_how(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plot_curves(_history(), tmp_path / "loss_curve.png") is None
    assert capsys.readouterr().out.strip() == (
        "loss plot skipped: matplotlib is not installed (pip install matplotlib); loss_curve.png not written"
    )
    assert not (tmp_path / "loss_curve.png").exists()


def test_task_table_says_when_two_students_share_one_speed_measurement():
    from engine.finetune import _table

    entry = {"parameters": 1e6, "layers": 2, "hidden_size": 32, "accuracy": 0.9, "macro_f1": 0.8,
             "latency_ms": 3.0, "throughput": 100.0}  # fmt: skip
    table = _table("classification", [("distilled student", entry), ("student, no teacher", {**entry,
                   "speed_of": "distilled_student"})])  # fmt: skip
    rows = table.splitlines()
    assert rows[2].split()[-2:] == ["3.0", "100.0"] and rows[3].split()[-2:] == ["3.0*", "100.0*"]
    assert rows[-1] == "* the same architecture as the distilled student: one speed measurement serves both"
    assert "*" not in _table("classification", [("distilled student", entry)])
