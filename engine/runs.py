"""What every command's run shares: setup, the output-folder guard, models in and out, and the closing summary.

The commands (`engine.pretrain`, `engine.finetune`) are sequences of these steps; each piece exists once here:
    setup               device, precision and seed from RunOptions
    prepare_out_dir     the run-folder guard (refuses to clobber another run; --resume / --overwrite)
    load_frozen         a teacher: eval mode, no gradients, weights in the compute dtype on GPUs (no master copy)
    student_checkpoint  the given student, or one initialized from teacher layers into <out>/student_init
    load_task_model     a checkpoint with a classification (for a label map) or QA head
    check_same_vocabulary, check_lengths   the compatibility checks made once, before any step
    maybe_compile       torch.compile of the encoders (--compile)
    loss_summary, interrupted, describe    the closing lines of a run
"""

import shutil
from pathlib import Path

import torch

from engine import checkpoint as ckpt
from engine.atomic import write_json
from engine.config import ModelConfig
from engine.loop import compute_dtype, resolve_device, resolve_precision
from engine.model import count_parameters
from engine.options import RunOptions
from engine.report import plot_curves, read_history

RUN_MARKER = "run.json"


def setup(run: RunOptions) -> tuple[torch.device, str]:
    """(device, precision) for the run, and the global seed set."""
    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device)
    torch.manual_seed(run.seed)
    return device, precision


def prepare_out_dir(out: str | Path, resume: bool, overwrite: bool, record: dict) -> Path:
    """Create or reuse the output folder without clobbering another run.

    A folder that holds a run (its `run.json`) is refused unless `resume` (continue it) or
    `overwrite` (delete it) is given. Anything else non-empty is refused too: we never delete files
    we did not write.
    """
    out = Path(out)
    marker = out / RUN_MARKER
    if resume:
        if not marker.is_file():
            raise FileNotFoundError(f"--resume: {out} holds no run to continue ({RUN_MARKER} is missing)")
        return out
    if out.exists() and any(out.iterdir()):
        if not marker.is_file():
            raise FileExistsError(f"{out} is not empty and holds no run of ours; choose another --out")
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, record)
    return out


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
    `<out>/student_init` (once: a resumed run finds it there)."""
    if student:
        return Path(student)
    from engine.student import init_student

    student_dir = out / "student_init"
    if not (student_dir / "config.json").is_file():
        init_student(source, student_dir, layers=layers or None, num_layers=num_layers or None, arch=arch)
    return student_dir


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
    """Every model must take `max_len` positions and every id the tokenizer makes; a clear error names the flag."""
    for m in models:
        c = m.config
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
    """First and last logged loss of a run and its loss-curve PNG (None when the plot could not be made)."""
    history = read_history(metrics_path)
    lines = [h for h in history if "loss" in h]
    curve = plot_curves(history, curve_path, keys=keys)
    return {
        "first_loss": lines[0]["loss"] if lines else None,
        "last_loss": lines[-1]["loss"] if lines else None,
        "loss_curve": str(curve) if curve else None,
    }


def interrupted(step: int, where: Path) -> dict:
    """The line printed when a run stops on a signal, and the report it returns."""
    print(f"interrupted at step {step}; checkpoint saved in {where / 'checkpoint'}; continue with --resume")
    return {"interrupted": True, "step": step}


def describe(model) -> str:
    c = model.config
    return f"{c.arch}, {c.num_layers} layers, hidden {c.hidden_size}, {count_parameters(model) / 1e6:.1f}M params"
