"""`distill pretrain` and `distill adapt-head`: the DistilBERT recipe end to end (data → masking → triple loss →
loop → report), and the MLM head an encoder-only teacher needs first.

Setup order of `pretrain`: teacher (frozen, eval, half precision on GPUs) → output folder guard → student (given,
or initialized from teacher layers) → tokenizer and corpus (cached) → held-out split → length-grouped batches →
objective (`engine.objectives.PretrainObjective`) → `engine.loop.train` → final evaluation
(`engine.evaluate.evaluate_mlm`) → report (JSON, table, PNG) → student exported in Hugging Face layout to
`<out>/student`. Shared setup pieces come from `engine.runs`.
"""

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import checkpoint as ckpt
from engine import defaults
from engine.atomic import write_json
from engine.batching import LengthGroupedBatches
from engine.corpus import load_texts, load_tokenizer, split_heldout, token_counts, tokenize_corpus
from engine.evaluate import evaluate_mlm
from engine.loop import GeneratorState, train
from engine.masking import smoothing_weights
from engine.model import count_parameters
from engine.objectives import PretrainObjective, device_batch
from engine.options import (
    ADAPT_SECTIONS,
    AdaptOptions,
    DataOptions,
    MaskingOptions,
    ModelOptions,
    ObjectiveOptions,
    OptimOptions,
    RunOptions,
    build_options,
    to_dict,
)
from engine.report import format_table
from engine.runs import (
    check_lengths,
    check_same_vocabulary,
    describe,
    interrupted,
    load_frozen,
    loss_summary,
    maybe_compile,
    prepare_out_dir,
    setup,
    skip_input_checks,
    student_checkpoint,
)

LOSS_KEYS = ("loss", "kd", "mlm", "cos")


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
            f"{', '.join(data.data)}: {len(sequences)} usable sequences are too few for a train and a held-out "
            "split; give more text or lower --min-seq-len"
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
        return objective_fn(device_batch(batch.input_ids, batch.attention_mask, device))

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


def pretrain(model_opts: ModelOptions, data: DataOptions, masking: MaskingOptions, objective: ObjectiveOptions,
             optim: OptimOptions, run: RunOptions) -> dict:  # fmt: skip
    """Run the DistilBERT distillation recipe; returns the report (also written to `<out>/report.json`)."""
    if model_opts.teacher_cache:  # no teacher in memory, static masking: engine.teacher_cache
        from engine.teacher_cache import pretrain_from_cache

        return pretrain_from_cache(model_opts, data, masking, objective, optim, run)
    device, precision = setup(run)
    if not model_opts.teacher or not data.data:
        raise ValueError("--teacher and --data are required (the no-argument default pipeline sets both)")
    record = to_dict(model_opts, data, masking, objective, optim, run)
    teacher_dir = Path(model_opts.teacher)
    teacher = load_frozen(teacher_dir, "mlm", device, precision)
    out = prepare_out_dir(run.out, run.resume, run.overwrite, record)
    m = model_opts
    student_dir = student_checkpoint(
        m.student, teacher_dir, out, m.student_arch, m.student_num_layers, m.student_layers
    )
    student = ckpt.load_model(student_dir, head="mlm", device=device)[0]
    check_same_vocabulary(teacher_dir, student_dir, teacher, student)
    corpus = prepare_corpus(teacher_dir, data, masking, run, out, student.config.vocab_size, device)
    check_lengths(data.max_seq_len, corpus.tokenizer, teacher, student)
    skip_input_checks(teacher, student)
    generator = torch.Generator(device=device).manual_seed(run.seed)
    objective_fn = PretrainObjective(
        teacher, student, objective, masking, corpus.special_ids, corpus.tokenizer.mask_token_id,
        corpus.token_weights, generator,
    )  # fmt: skip
    maybe_compile(run, teacher, student)
    print(
        f"teacher {teacher_dir} ({describe(teacher)}) -> student {student_dir} ({describe(student)}); "
        f"{corpus.n_train} train / {corpus.n_heldout} held-out sequences; {device} {precision}"
    )
    t0 = time.perf_counter()
    result, final = _train_and_report(
        student, objective_fn, corpus, {"teacher": teacher, "student": student}, optim, run, out, device,
        precision, teacher_dir, record, generator,
    )  # fmt: skip
    if result.interrupted:
        return interrupted(result.step, out)
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
        **loss_summary(out / "metrics.jsonl", out / "loss_curve.png", LOSS_KEYS),
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


def adapt_head(adapt: AdaptOptions, data: DataOptions, masking: MaskingOptions, optim: OptimOptions,
               run: RunOptions) -> dict:  # fmt: skip
    """Train the MLM head (transform + decoder tied to the word embeddings) of an encoder-only
    checkpoint by masked language modelling; saves a teacher with a head to `<out>/model`."""
    device, precision = setup(run)
    if not adapt.model or not data.data:
        raise ValueError("--model and --data are required (the no-argument default pipeline sets both)")
    record = to_dict(adapt, data, masking, optim, run)
    model_dir = Path(adapt.model)
    model = ckpt.load_model(model_dir, head="mlm", device=device)[0]
    if not adapt.train_encoder:
        model.encoder.requires_grad_(False)  # the tied decoder is the word embedding: frozen with it
    out = prepare_out_dir(run.out, run.resume, run.overwrite, record)
    corpus = prepare_corpus(model_dir, data, masking, run, out, model.config.vocab_size, device)
    check_lengths(data.max_seq_len, corpus.tokenizer, model)
    skip_input_checks(model)
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
        return interrupted(result.step, out)
    ckpt.save_model(model, out / "model", tokenizer_dir=model_dir)
    summary = loss_summary(out / "metrics.jsonl", out / "loss_curve.png", LOSS_KEYS)
    report = {"model": str(out / "model"), **final["model"], "steps": result.step, **summary}
    write_json(out / "report.json", report)
    print(
        f"MLM head trained: held-out masked-token accuracy {100 * report['mlm_accuracy']:.2f}%, perplexity "
        f"{report['perplexity']:.1f}; teacher with head saved to {out / 'model'}"
    )
    return report


def bundled_teacher(run: RunOptions) -> Path:
    """The bundled MiniLM with a trained MLM head (`adapt_head` on BBC News), made once and cached."""
    recipe = dict(defaults.DEMO_ADAPT)

    def make(run_dir: Path) -> dict:
        profile = {
            **recipe,
            "model": str(defaults.bundled_teacher_dir()),
            "data": [str(defaults.bbc_news_dir())],
            "out": str(run_dir),
            "overwrite": True,
            "device": run.device,
            "progress": run.progress,
        }
        return adapt_head(*build_options(argparse.Namespace(), *ADAPT_SECTIONS, profile=profile))

    return defaults.cached_model("minilm-l6-mlm", recipe, make, "training an MLM head for all-MiniLM-L6-v2")
