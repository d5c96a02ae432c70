"""`distill pretrain`: the DistilBERT recipe end to end (data → masking → triple loss → loop → report).

Setup order: output folder guard → teacher (frozen, eval, half precision on GPUs) → student (given,
or initialized from teacher layers) → tokenizer and corpus (cached) → held-out split → length-grouped
batches → objective → `engine.loop.train` → final evaluation → report (JSON, table, PNG) → student
exported in Hugging Face layout to `<out>/student`.
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import checkpoint as ckpt
from engine.data import LengthGroupedBatches, load_texts, load_tokenizer, split_heldout, token_counts, tokenize_corpus
from engine.loop import GeneratorState, autocast, compute_dtype, resolve_device, resolve_precision, train
from engine.masking import mask_tokens, smoothing_weights
from engine.model import count_parameters
from engine.objectives import PretrainObjective, to_device
from engine.options import DataOptions, MaskingOptions, ObjectiveOptions, OptimOptions, RunOptions, opt, to_dict
from engine.report import format_table, plot_curves, prepare_out_dir, read_history, write_json


@dataclass
class ModelOptions:
    teacher: str = opt("", "teacher checkpoint folder with an MLM head (default: the bundled MiniLM, head adapted)")
    student: str = opt("", "student checkpoint folder (default: initialized from teacher layers)")
    student_arch: str = opt("distilbert", "architecture of a student made from the teacher: distilbert or bert")
    student_layers: list[int] = opt([], "teacher layers the student starts from (default: spread evenly)")
    student_num_layers: int = opt(0, "depth of a student made from the teacher (default: half the teacher's)")


SECTIONS = (ModelOptions, DataOptions, MaskingOptions, ObjectiveOptions, OptimOptions, RunOptions)


def load_teacher(path: str | Path, device: torch.device, dtype: torch.dtype):
    if not ckpt.has_mlm_head(path):
        raise ValueError(
            f"teacher {path} has no MLM head (an encoder-only checkpoint); train one first with "
            f"`distill adapt-head --model {path} --out TEACHER_DIR` and pass --teacher TEACHER_DIR"
        )
    teacher = ckpt.load_model(path, head="mlm", dtype=dtype, device=device)[0]
    teacher.eval().requires_grad_(False)
    return teacher


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


@torch.no_grad()
def evaluate_mlm(models: dict, batches, special_ids, mask_id, masking: MaskingOptions, device, precision, seed=1234):
    """Held-out masked-token accuracy and perplexity of each model on fixed masks (the same at every
    evaluation); with two models (teacher, student) also their top-1 agreement on masked tokens and
    the mean cosine of their last hidden states on real tokens."""
    modes = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    vocab_size = next(iter(models.values())).config.vocab_size
    gen = torch.Generator(device=device).manual_seed(seed)
    correct = dict.fromkeys(models, 0)
    nll = dict.fromkeys(models, 0.0)
    agree = cos_sum = 0.0
    n_masked = n_rows = 0
    for ids, attn in batches:
        b = to_device(ids, attn, device)
        masked, labels = mask_tokens(
            b.input_ids, b.attention_mask, special_ids, mask_id, vocab_size,
            mlm_probability=masking.mlm_probability, mask_replace=masking.mask_replace,
            random_replace=masking.random_replace, generator=gen,
        )  # fmt: skip
        flat = labels.reshape(-1)
        sel = (flat != -100).nonzero().squeeze(1)
        y = flat[sel]
        preds, hidden = {}, {}
        with autocast(device, precision):
            for name, model in models.items():
                h = model.encoder(masked, b.attention_mask).last_hidden_state.flatten(0, 1)  # (B·L, H)
                hidden[name] = h.index_select(0, b.rows).float()  # (N, H)
                logits = model.lm_head(h[sel])
                logits = logits.float()  # (M, V)
                preds[name] = logits.argmax(-1)
                correct[name] += (preds[name] == y).sum().item()
                nll[name] += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        if len(models) == 2:
            (p1, p2), (h1, h2) = preds.values(), hidden.values()
            agree += (p1 == p2).sum().item()
            cos_sum += torch.nn.functional.cosine_similarity(h1, h2, dim=-1).sum().item()
        n_masked += y.numel()
        n_rows += b.rows.numel()
    for name, m in models.items():
        m.train(modes[name])
    out = {
        name: {
            "mlm_accuracy": correct[name] / max(n_masked, 1),
            "perplexity": math.exp(min(nll[name] / max(n_masked, 1), 50.0)),
        }
        for name in models
    }
    if len(models) == 2:
        out["top1_agreement"] = agree / max(n_masked, 1)
        out["hidden_cosine"] = cos_sum / max(n_rows, 1)
    out["masked_tokens"] = n_masked
    return out


@dataclass
class Corpus:
    tokenizer: object  # the teacher's tokenizer
    batches: LengthGroupedBatches  # resumable training batches
    eval_batches: list  # [(input_ids, attention_mask)] held-out CPU batches
    special_ids: torch.Tensor  # (S,) ids never masked, on the device
    token_weights: torch.Tensor | None  # (V,) mlm_smoothing weights on the device, or None
    n_train: int
    n_heldout: int


def prepare_corpus(tokenizer_dir, data: DataOptions, masking: MaskingOptions, run: RunOptions, out: Path,
                   vocab_size: int, device) -> Corpus:  # fmt: skip
    """Tokenizer → texts → cached sequences → held-out split → batches → masking weights."""
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer/vocabulary mismatch: the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens "
            f"but the model's vocabulary has {vocab_size}"
        )
    texts = load_texts(data.data, text_column=data.text_column)
    cache_dir = Path(data.cache_dir) if data.cache_dir else out / "cache"
    sequences = tokenize_corpus(texts, tokenizer, max_seq_len=data.max_seq_len, min_seq_len=data.min_seq_len,
                                cache_dir=cache_dir)  # fmt: skip
    train_seqs, heldout = split_heldout(sequences, fraction=data.heldout_fraction, seed=run.seed)
    if not train_seqs or not heldout:
        raise ValueError(
            f"{data.data}: {len(sequences)} usable sequences are too few for a train and a held-out split; "
            "give more text or lower --min-seq-len"
        )
    pad_id = tokenizer.pad_token_id
    batches = LengthGroupedBatches(train_seqs, batch_size=data.batch_size, pad_id=pad_id, seed=run.seed)
    eval_source = LengthGroupedBatches(heldout, batch_size=data.batch_size, pad_id=pad_id, seed=run.seed, shuffle=False)
    eval_batches = [(b.input_ids, b.attention_mask) for b in eval_source]
    if run.eval_batches:
        eval_batches = eval_batches[: run.eval_batches]
    special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=device)
    weights = None
    if masking.mlm_smoothing > 0:
        counts = token_counts(train_seqs, vocab_size)
        weights = smoothing_weights(counts, exponent=masking.mlm_smoothing, special_token_ids=special_ids.cpu())
        weights = weights.to(device)
    return Corpus(tokenizer, batches, eval_batches, special_ids, weights, len(train_seqs), len(heldout))


def _train_and_report(model, objective_fn, corpus: Corpus, models_for_eval: dict, optim, run, out, device, precision,
                      tokenizer_dir, record, generator):  # fmt: skip
    masking = MaskingOptions(**record["masking"])
    mask_id = corpus.tokenizer.mask_token_id

    def step_loss(batch):
        return objective_fn(to_device(batch.input_ids, batch.attention_mask, device))

    def evaluate(step):
        return evaluate_mlm(
            models_for_eval, corpus.eval_batches, corpus.special_ids, mask_id, masking, device, precision
        )

    result = train(
        model, step_loss, corpus.batches, optim, run, out, device, precision, tokenizer_dir=tokenizer_dir,
        stateful={"masking_generator": GeneratorState(generator)}, evaluate=evaluate,
        tokens_in=lambda b: b.attention_mask.sum(), options_record=record,
    )  # fmt: skip
    return result, (None if result.interrupted else evaluate(result.step))


def _interrupted(result, out: Path) -> dict:
    print(f"interrupted at step {result.step}; checkpoint saved in {out / 'checkpoint'}; continue with --resume")
    return {"interrupted": True, "step": result.step}


def _loss_summary(out: Path) -> dict:
    history = read_history(out / "metrics.jsonl")
    curve = plot_curves(history, out / "loss_curve.png")
    lines = [h for h in history if "loss" in h]
    return {
        "first_loss": lines[0]["loss"] if lines else None,
        "last_loss": lines[-1]["loss"] if lines else None,
        "loss_curve": str(curve) if curve else None,
    }


def pretrain(model_opts: ModelOptions, data: DataOptions, masking: MaskingOptions, objective: ObjectiveOptions,
             optim: OptimOptions, run: RunOptions) -> dict:  # fmt: skip
    """Run the DistilBERT distillation recipe; returns the report (also written to `<out>/report.json`)."""
    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device)
    torch.manual_seed(run.seed)
    if not model_opts.teacher or not data.data:
        raise ValueError("--teacher and --data are required (the no-argument default pipeline sets both)")
    record = to_dict(model_opts, data, masking, objective, optim, run)
    teacher_dir = Path(model_opts.teacher)
    # Teacher weights in half precision on GPUs (no master copy: it is never updated).
    teacher_dtype = compute_dtype(precision) if device.type == "cuda" else torch.float32
    teacher = load_teacher(teacher_dir, device, teacher_dtype)
    out = prepare_out_dir(run.out, run.resume, run.overwrite, record)

    if model_opts.student:
        student_dir = Path(model_opts.student)
    else:
        from engine.student import init_student

        student_dir = out / "student_init"
        if not (student_dir / "config.json").is_file():
            init_student(
                teacher_dir, student_dir, layers=model_opts.student_layers or None,
                num_layers=model_opts.student_num_layers or None, arch=model_opts.student_arch,
            )  # fmt: skip
    student = ckpt.load_model(student_dir, head="mlm", device=device)[0]
    check_same_vocabulary(teacher_dir, student_dir, teacher, student)
    corpus = prepare_corpus(teacher_dir, data, masking, run, out, student.config.vocab_size, device)
    # prepare_corpus checked the tokenizer against the vocabulary: no per-forward id check (a host sync).
    teacher.encoder.validate_inputs = student.encoder.validate_inputs = False
    generator = torch.Generator(device=device).manual_seed(run.seed)
    objective_fn = PretrainObjective(
        teacher, student, objective, masking, corpus.special_ids, corpus.tokenizer.mask_token_id,
        corpus.token_weights, generator,
    )  # fmt: skip
    if run.compile:
        teacher.encoder = torch.compile(teacher.encoder)
        student.encoder = torch.compile(student.encoder)
    print(
        f"teacher {teacher_dir} ({count_parameters(teacher) / 1e6:.1f}M params, {teacher.config.num_layers} layers) -> "
        f"student {student_dir} ({count_parameters(student) / 1e6:.1f}M, {student.config.num_layers} layers); "
        f"{corpus.n_train} train / {corpus.n_heldout} held-out sequences; {device} {precision}"
    )
    t0 = time.perf_counter()
    result, final = _train_and_report(
        student, objective_fn, corpus, {"teacher": teacher, "student": student}, optim, run, out, device,
        precision, teacher_dir, record, generator,
    )  # fmt: skip
    if result.interrupted:
        return _interrupted(result, out)
    ckpt.save_model(student, out / "student", tokenizer_dir=teacher_dir)
    t_acc, s_acc = final["teacher"]["mlm_accuracy"], final["student"]["mlm_accuracy"]
    report = {
        "teacher": {"path": str(teacher_dir), "parameters": count_parameters(teacher), **final["teacher"]},
        "student": {"path": str(out / "student"), "parameters": count_parameters(student), **final["student"]},
        "student_keeps_of_teacher_accuracy": s_acc / max(t_acc, 1e-9),
        "top1_agreement": final["top1_agreement"],
        "hidden_cosine": final["hidden_cosine"],
        "heldout_masked_tokens": final["masked_tokens"],
        "steps": result.step,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "device": str(device),
        "precision": precision,
        **_loss_summary(out),
    }
    write_json(out / "report.json", report)
    rows = [
        (name, f"{report[name]['parameters'] / 1e6:.1f}M", f"{100 * report[name]['mlm_accuracy']:.2f}",
         f"{report[name]['perplexity']:.2f}")
        for name in ("teacher", "student")
    ]  # fmt: skip
    print(format_table(rows, ("model", "params", "held-out MLM acc %", "perplexity")))
    print(
        f"student keeps {100 * report['student_keeps_of_teacher_accuracy']:.1f}% of the teacher's accuracy; "
        f"top-1 agreement {100 * report['top1_agreement']:.2f}%, hidden cosine {report['hidden_cosine']:.4f}; "
        f"loss {report['first_loss']} -> {report['last_loss']} in {report['steps']} steps"
    )
    print(f"report: {out / 'report.json'}")
    return report


@dataclass
class AdaptOptions:
    model: str = opt("", "encoder-only checkpoint to give an MLM head (default: the bundled MiniLM)")
    train_encoder: bool = opt(False, "train the encoder too (frozen by default: only the head learns)")


ADAPT_SECTIONS = (AdaptOptions, DataOptions, MaskingOptions, OptimOptions, RunOptions)


def adapt_head(adapt: AdaptOptions, data: DataOptions, masking: MaskingOptions, optim: OptimOptions,
               run: RunOptions) -> dict:  # fmt: skip
    """Train the MLM head (transform + decoder tied to the word embeddings) of an encoder-only
    checkpoint by masked language modelling; saves a teacher with a head to `<out>/model`."""
    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device)
    torch.manual_seed(run.seed)
    if not adapt.model or not data.data:
        raise ValueError("--model and --data are required (the no-argument default pipeline sets both)")
    record = to_dict(adapt, data, masking, optim, run)
    model_dir = Path(adapt.model)
    model = ckpt.load_model(model_dir, head="mlm", device=device)[0]
    if not adapt.train_encoder:
        model.encoder.requires_grad_(False)  # the tied decoder is the word embedding: frozen with it
    out = prepare_out_dir(run.out, run.resume, run.overwrite, record)
    corpus = prepare_corpus(model_dir, data, masking, run, out, model.config.vocab_size, device)
    model.encoder.validate_inputs = False
    generator = torch.Generator(device=device).manual_seed(run.seed)
    mlm_only = ObjectiveOptions(alpha_ce=0.0, alpha_mlm=1.0, alpha_cos=0.0)
    objective_fn = PretrainObjective(
        None, model, mlm_only, masking, corpus.special_ids, corpus.tokenizer.mask_token_id, corpus.token_weights,
        generator,
    )  # fmt: skip
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"adapting the MLM head of {model_dir}: {trainable / 1e6:.2f}M trainable parameters; {corpus.n_train} sequences"
    )
    result, final = _train_and_report(
        model, objective_fn, corpus, {"model": model}, optim, run, out, device, precision, model_dir, record, generator
    )
    if result.interrupted:
        return _interrupted(result, out)
    ckpt.save_model(model, out / "model", tokenizer_dir=model_dir)
    report = {"model": str(out / "model"), **final["model"], "steps": result.step, **_loss_summary(out)}
    write_json(out / "report.json", report)
    print(
        f"MLM head trained: held-out masked-token accuracy {100 * report['mlm_accuracy']:.2f}%, perplexity "
        f"{report['perplexity']:.1f}; teacher with head saved to {out / 'model'}"
    )
    return report
