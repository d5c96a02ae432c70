"""What every command's run shares: setup, the output-folder guard, models in and out, and the closing summary.

The commands (`engine.pretrain`, `engine.finetune`) are sequences of these steps; each piece exists once here:
    setup               device, precision and seed from RunOptions
    guarded, check_out_dir, prepare_out_dir, release_replaced
                        the run-folder guard, from `engine.run_folder` (its docstring tells a folder's lifecycle)
    load_frozen         a teacher: eval mode, no gradients, weights in the compute dtype on GPUs (no master copy)
    student_checkpoint  the given student, or one initialized from teacher layers into <out>/student_init
    save_model          a model out, a full disk said in one line
    load_task_model     a checkpoint with a classification (for a label map) or QA head
    check_same_vocabulary, check_lengths   the compatibility checks made once, before any step
    maybe_compile       torch.compile of the encoders (--compile)
    loss_summary, interrupted, describe, kept_share    the closing lines of a run
"""

from pathlib import Path

import torch

from engine import checkpoint as ckpt
from engine import distributed
from engine.atomic import explain_write_errors, tensor_bytes
from engine.config import ModelConfig
from engine.loop import compute_dtype, resolve_device, resolve_precision
from engine.model import count_parameters
from engine.options import RunOptions
from engine.report import plot_curves, read_history
from engine.run_folder import (
    REPORT,
    RESUME_SAFE,
    RESUME_SCHEDULE,
    RUN_FILES,
    RUN_MARKER,
    RunFinished,
    check_out_dir,
    checkpoint_step,
    guarded,
    has_checkpoint,
    option_changes,
    prepare_out_dir,
    release_replaced,
)

__all__ = [
    "REPORT",
    "RESUME_SAFE",
    "RESUME_SCHEDULE",
    "RUN_FILES",
    "RUN_MARKER",
    "SCORE_FLOOR",
    "RunFinished",
    "check_lengths",
    "check_out_dir",
    "check_same_vocabulary",
    "checkpoint_step",
    "describe",
    "guarded",
    "has_checkpoint",
    "interrupted",
    "kept_share",
    "load_frozen",
    "load_task_model",
    "loss_summary",
    "maybe_compile",
    "option_changes",
    "prepare_out_dir",
    "release_replaced",
    "save_model",
    "setup",
    "skip_input_checks",
    "student_checkpoint",
]


def setup(run: RunOptions) -> tuple[torch.device, str]:
    """(device, precision) for the run, and the global seed set; under torchrun the process group joined and the
    device this rank's (cuda:LOCAL_RANK). Every rank gets the same seed: models are built alike on all."""
    device = distributed.init(resolve_device(run.device))
    precision = resolve_precision(run.precision, device)
    torch.manual_seed(run.seed)
    return device, precision


def load_frozen(path: str | Path, head: str, device: torch.device, precision: str, **kwargs) -> torch.nn.Module:
    """A teacher: loaded with `head`, in eval mode with no gradients; on GPUs its weights are held in the compute
    dtype (it is never updated, so it needs no fp32 master copy)."""
    dtype = compute_dtype(precision) if device.type == "cuda" else torch.float32
    loader = load_task_model if head in ("classification", "qa") else _load_head
    model = loader(path, head, device=device, dtype=dtype, **kwargs)
    return model.eval().requires_grad_(False)


def _load_head(path, head, device, dtype):
    if head == "mlm" and not ckpt.has_mlm_head(path):
        raise ValueError(
            f"teacher {path} has no MLM head (an encoder-only checkpoint); train one first with "
            f"`distill adapt-head --model {path} --out TEACHER_DIR` and pass --teacher TEACHER_DIR"
        )
    return ckpt.load_model(path, head=head, dtype=dtype, device=device)[0]


def student_checkpoint(student: str, source: str | Path, out: Path, arch: str, num_layers: int = 0,
                       layers: list[int] | None = None) -> Path:  # fmt: skip
    """The student's checkpoint folder: `student` when given, else one initialized from `source`'s layers into
    `<out>/student_init` (once: a resumed run finds it there). Making it leaves the global RNG as it was, so a run
    that makes its student and one given that same student (`distill ablate` does that) train alike."""
    if student:
        return Path(student)
    from engine.student import init_student

    student_dir = out / "student_init"

    def make() -> None:
        with torch.random.fork_rng(devices=[]):  # the run's random stream is the same whether the student is made
            init_student(source, student_dir, layers=layers or None, num_layers=num_layers or None, arch=arch)

    if not (student_dir / "config.json").is_file():
        distributed.run_on_main(make, share_result=False)
    return student_dir


def save_model(model, path: Path, tokenizer_dir=None) -> Path:
    """`checkpoint.save_model` (by rank 0), with a full disk said in one line (how much space the model needs)."""

    def save() -> None:
        with explain_write_errors(path, "the model", lambda: tensor_bytes(model.state_dict())):
            ckpt.save_model(model, path, tokenizer_dir=tokenizer_dir)

    distributed.run_on_main(save, share_result=False)
    return Path(path)


def load_task_model(
    path: str | Path, task: str, label2id: dict[str, int] | None = None, device="cpu", dtype=None
) -> torch.nn.Module:
    """A checkpoint as a SequenceClassifier (for `label2id`) or QuestionAnswerer.

    A checkpoint without the head gets a fresh one (`checkpoint.load_model` keeps BERT's pooler when the file has
    it). A classifier trained for other labels (another count, or other names) is replaced by a fresh one for
    these labels: its body is kept, as when fine-tuning from any checkpoint. The config records
    `label2id`/`id2label`, so the saved checkpoint names its classes.
    """
    from engine.taskdata import _generic_names, has_task_head

    if task == "qa":
        return ckpt.load_model(path, head="qa", dtype=dtype, device=device)[0]
    n = len(label2id)
    cfg = ModelConfig.from_pretrained(path)
    id2label = {i: name for name, i in label2id.items()}
    if has_task_head(path, task) and (
        cfg.num_labels != n or (cfg.id2label != id2label and not _generic_names(cfg.id2label))
    ):
        model = ckpt.load_model(path, head="classification", dtype=dtype, device=device)[0]
        print(f"{path}: its classifier is for {cfg.num_labels} other labels; a new one is trained for {n} labels")
        fresh = torch.nn.Linear(model.config.hidden_size, n, device=device, dtype=model.classifier.weight.dtype)
        with torch.no_grad():
            fresh.weight.normal_(0.0, model.config.initializer_range)
            fresh.bias.zero_()
        model.classifier = fresh
    else:
        model = ckpt.load_model(path, head="classification", dtype=dtype, device=device, num_labels=n)[0]
    model.config = model.config.replace(id2label=id2label, label2id=dict(label2id))
    return model


def check_same_vocabulary(teacher_dir: Path, student_dir: Path, teacher, student) -> None:
    """Distillation compares distributions over one vocabulary: sizes and tokenizer files must agree."""
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(
            f"vocabulary mismatch: teacher has {teacher.config.vocab_size} tokens, student "
            f"{student.config.vocab_size}; the student must use the teacher's tokenizer"
        )
    for name in ("vocab.txt", "tokenizer.json"):
        a, b = Path(teacher_dir) / name, Path(student_dir) / name
        if a.is_file() and b.is_file() and a.read_bytes() != b.read_bytes():
            raise ValueError(
                f"tokenizer mismatch: {name} differs between teacher {teacher_dir} and student {student_dir}"
            )


def check_lengths(max_len: int, tokenizer, *models) -> None:
    """Every model must take `max_len` positions and every id the tokenizer makes; a clear error names the flag.
    Models or their configs (`ModelConfig`): the check runs before any data is tokenized."""
    for m in models:
        c = getattr(m, "config", m)
        if max_len > c.max_position_embeddings:
            raise ValueError(
                f"--max-seq-len {max_len} exceeds a model's position table ({c.max_position_embeddings} positions); "
                f"lower --max-seq-len to {c.max_position_embeddings} or less"
            )
        if len(tokenizer) > c.vocab_size:
            raise ValueError(
                f"tokenizer/vocabulary mismatch: the tokenizer has {len(tokenizer)} tokens but a model's vocabulary "
                f"has {c.vocab_size}; use the model's own tokenizer"
            )


def skip_input_checks(*models) -> None:
    """Turn off the per-forward token-id check (a host read of the ids) once `check_lengths` has vouched for the
    data: every id comes from a tokenizer no larger than each model's vocabulary."""
    for m in models:
        m.encoder.validate_inputs = False


def maybe_compile(run: RunOptions, *models) -> None:
    """`torch.compile` each model's encoder in place when --compile is given."""
    if run.compile:
        for m in models:
            m.encoder = torch.compile(m.encoder)


def loss_summary(metrics_path: Path, curve_path: Path, keys: tuple[str, ...]) -> dict:
    """First and last logged loss of a run and its loss-curve PNG (None when the plot could not be made); made by
    rank 0, which wrote the log."""
    return distributed.run_on_main(lambda: _loss_summary(metrics_path, curve_path, keys))


def _loss_summary(metrics_path: Path, curve_path: Path, keys: tuple[str, ...]) -> dict:
    history = read_history(metrics_path)
    lines = [h for h in history if "loss" in h]
    curve = plot_curves(history, curve_path, keys=keys)
    return {
        "first_loss": lines[0]["loss"] if lines else None,
        "last_loss": lines[-1]["loss"] if lines else None,
        "loss_curve": str(curve) if curve else None,
    }


SCORE_FLOOR = 1e-3  # a teacher scoring below this (a random or untrained one) gives no ratio worth printing


def kept_share(student: float, teacher: float) -> float | None:
    """The student's score as a share of the teacher's, or None when the teacher scores below SCORE_FLOOR (a share of
    ~0 is noise: a student at 0.0139 of a teacher at 1e-9 "keeps 1388888888.9%")."""
    return student / teacher if teacher >= SCORE_FLOOR else None


def interrupted(step: int, where: Path) -> dict:
    """The line printed when a run stops on a signal, and the report it returns."""
    print(f"interrupted at step {step}; checkpoint saved in {where / 'checkpoint'}; continue with --resume")
    return {"interrupted": True, "step": step}


def describe(model) -> str:
    c = model.config
    return f"{c.arch}, {c.num_layers} layers, hidden {c.hidden_size}, {count_parameters(model) / 1e6:.1f}M params"
