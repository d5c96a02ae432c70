"""`distill pretrain` and `distill adapt-head`: the DistilBERT recipe end to end (data → masking → triple loss →
loop → report), and the MLM head an encoder-only teacher needs first.

Setup order of `pretrain`: every input is checked before the output folder is touched (`engine.run_folder.guarded` and
`check_out_dir` keep a run folder whole): options (ranges, loss weights) → run-folder checks (another run, --resume's
options) → teacher (frozen, eval, half precision on GPUs) and its tokenizer → --max-seq-len against both models'
positions → texts read (binary files refused); then the output folder → student (given, or initialized from teacher
layers) → corpus tokenized (cached) → held-out split → length-grouped batches → objective
(`engine.objectives.PretrainObjective`) → `engine.loop.train` → final evaluation (`engine.evaluate.evaluate_mlm`) →
report (JSON, table, PNG) → student exported in Hugging Face layout to `<out>/student`. Shared setup pieces come from
`engine.runs`.
"""

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine import checkpoint as ckpt
from engine import defaults, distributed
from engine.atomic import write_json
from engine.batching import LengthGroupedBatches
from engine.config import ModelConfig
from engine.corpus import Sequences, load_tokenizer, split_indices, token_counts, tokenize_corpus
from engine.evaluate import evaluate_mlm
from engine.loop import GeneratorState, train
from engine.masking import smoothing_weights
from engine.model import count_parameters
from engine.objectives import PretrainObjective, check_objective_options, device_batch
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
    check_fsdp,
    check_ranges,
    to_dict,
)
from engine.report import format_table
from engine.runs import (
    check_lengths,
    check_out_dir,
    check_same_vocabulary,
    describe,
    guarded,
    interrupted,
    kept_share,
    load_frozen,
    loss_summary,
    maybe_compile,
    prepare_out_dir,
    release_replaced,
    save_model,
    setup,
    skip_input_checks,
    student_checkpoint,
)
from engine.tokenstore import TokenStore, build_store, find_sources

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


def prepare_corpus(tokenizer, data: DataOptions, masking: MaskingOptions, run: RunOptions, out: Path,
                   vocab_size: int, device, texts: list[str] | None = None) -> Corpus:  # fmt: skip
    """Tokenizer (or its folder) → token store → held-out split → batches → masking weights.

    The corpus files are tokenized once into a memory-mapped token store (`engine.tokenstore`, in parallel, by rank 0
    while the others wait; reused by later runs); every rank maps it and reads the tokens its batches need. Given
    `texts` (documents in memory), they are tokenized in memory instead (cached in `tokens-<key>.pt`).
    """
    if isinstance(tokenizer, str | Path):
        tokenizer = load_tokenizer(tokenizer)
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer/vocabulary mismatch: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{vocab_size}"
        )
    cache_dir = Path(data.cache_dir) if data.cache_dir else out / "cache"
    all_counts = None
    if texts is None:
        folder = distributed.run_on_main(
            lambda: (
                build_store(
                    data.data,
                    tokenizer,
                    cache_dir,
                    data.max_seq_len,
                    data.min_seq_len,
                    data.text_column,
                    workers=data.tokenize_workers,
                    progress=run.progress,
                ).folder
            )
        )
        store = TokenStore.open(folder)
        sequences, all_counts = store.sequences(), store.counts()
    else:  # rank 0 tokenizes into the cache; the other ranks then read it
        sequences = distributed.main_first(
            lambda: tokenize_corpus(
                texts, tokenizer, max_seq_len=data.max_seq_len, min_seq_len=data.min_seq_len, cache_dir=cache_dir
            )
        )
    train, heldout = split_indices(len(sequences), fraction=data.heldout_fraction, seed=run.seed)
    if not len(train) or not len(heldout):
        raise ValueError(
            f"{', '.join(data.data)}: {len(sequences)} usable sequences are too few for a train and a held-out "
            "split; give more text or lower --min-seq-len"
        )
    pad_id = tokenizer.pad_token_id
    batches = LengthGroupedBatches(sequences, batch_size=data.batch_size, pad_id=pad_id, seed=run.seed, indices=train)
    eval_source = LengthGroupedBatches(sequences, batch_size=data.batch_size, pad_id=pad_id, seed=run.seed,
                                       shuffle=False, indices=heldout)  # fmt: skip
    eval_batches = [(b.input_ids, b.attention_mask) for b in eval_source]
    if run.eval_batches:
        eval_batches = eval_batches[: run.eval_batches]
    special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=device)
    weights = None
    if masking.mlm_smoothing > 0:
        if all_counts is None:
            counts = _counts(sequences, train, vocab_size)
        else:  # the store counted every token: subtract the (small) held-out part
            counts = torch.nn.functional.pad(all_counts, (0, max(vocab_size - all_counts.numel(), 0)))[:vocab_size]
            counts = counts - _counts(sequences, heldout, vocab_size)
        weights = smoothing_weights(counts, exponent=masking.mlm_smoothing, special_token_ids=special_ids.cpu())
        weights = weights.to(device)
    return Corpus(tokenizer, batches, eval_batches, special_ids, weights, len(train), len(heldout))


def _counts(sequences: Sequences, indices: torch.Tensor, vocab_size: int, chunk: int = 1 << 16) -> torch.Tensor:
    """`token_counts` of the sequences at `indices`, a chunk of sequences at a time (a mapped store stays on disk)."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for i in range(0, indices.numel(), chunk):
        counts += token_counts(sequences.subset(indices[i : i + chunk]), vocab_size)
    return counts


def _train_and_report(model, objective_fn, corpus: Corpus, models_for_eval: dict, optim, run, out, device, precision,
                      tokenizer_dir, record, generator, teacher_dir=None):  # fmt: skip
    """Train, then evaluate on the held-out batches; returns (TrainResult, final evaluation or None when
    interrupted, `models_for_eval` as trained: the same models, or with --fsdp under torchrun, whole copies read back
    from the final checkpoint (student) and `teacher_dir` (teacher), as training left them sharded)."""
    run = replace(run, resume=(out / "checkpoint" / "trainer_state.pt").is_file())  # a start without one is afresh
    masking = MaskingOptions(**record["masking"])
    mask_id = corpus.tokenizer.mask_token_id

    def step_loss(batch):
        # The global batch on the device (masks are drawn over all of it); the rank's rows are marked in it.
        return objective_fn(device_batch(batch.input_ids, batch.attention_mask, device, distributed.shard()))

    def evaluate(step):
        return evaluate_mlm(
            models_for_eval, corpus.eval_batches, corpus.special_ids, mask_id, masking, device, precision
        )

    result = train(
        model, step_loss, corpus.batches, optim, run, out, device, precision, tokenizer_dir=tokenizer_dir,
        stateful={"masking_generator": GeneratorState(generator)}, evaluate=evaluate,
        tokens_in=lambda b: b.attention_mask.sum(), options_record=record, on_save=lambda step: release_replaced(out),
        teacher=models_for_eval.get("teacher"),
    )  # fmt: skip
    if result.interrupted:
        return result, None, models_for_eval
    if result.sharded:  # every rank reads the models back whole, for the final evaluation, the report and the export
        whole = ckpt.load_model(out / "checkpoint" / "model", head="mlm", device=device)[0]
        for name, m in models_for_eval.items():
            models_for_eval[name] = whole if m is model else load_frozen(teacher_dir, "mlm", device, precision)
    return result, evaluate(result.step), models_for_eval


@guarded
def pretrain(model_opts: ModelOptions, data: DataOptions, masking: MaskingOptions, objective: ObjectiveOptions,
             optim: OptimOptions, run: RunOptions) -> dict:  # fmt: skip
    """Run the DistilBERT distillation recipe; returns the report (also written to `<out>/report.json`)."""
    check_fsdp(run, "pretrain", model_opts.teacher_cache)
    if model_opts.teacher_cache:  # no teacher in memory, static masking: engine.teacher_cache
        from engine.teacher_cache import pretrain_from_cache

        return pretrain_from_cache(model_opts, data, masking, objective, optim, run)
    device, precision = setup(run)
    if not model_opts.teacher or not data.data:
        raise ValueError("--teacher and --data are required (the no-argument default pipeline sets both)")
    check_ranges(data, masking, objective, optim, run)
    distributed.check_batch_size(data.batch_size)
    check_objective_options(objective, masking)
    record = to_dict(model_opts, data, masking, objective, optim, run)
    check_out_dir(run, record)
    teacher_dir = Path(model_opts.teacher)
    teacher = load_frozen(teacher_dir, "mlm", device, precision)
    tokenizer = load_tokenizer(teacher_dir)
    m = model_opts
    # A student made from the teacher's layers has the teacher's positions; a given one is checked from its config.
    check_lengths(
        data.max_seq_len, tokenizer, teacher, *([ModelConfig.from_pretrained(m.student)] if m.student else [])
    )
    find_sources(data.data, text_column=data.text_column)  # every file there and text, checked without reading it
    out = prepare_out_dir(run.out, run.resume, run.overwrite, record)
    student_dir = student_checkpoint(
        m.student, teacher_dir, out, m.student_arch, m.student_num_layers, m.student_layers
    )
    student = ckpt.load_model(student_dir, head="mlm", device=device)[0]
    check_same_vocabulary(teacher_dir, student_dir, teacher, student)
    corpus = prepare_corpus(tokenizer, data, masking, run, out, student.config.vocab_size, device)
    skip_input_checks(teacher, student)  # check_lengths vouched for both above
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
    result, final, models = _train_and_report(
        student, objective_fn, corpus, {"teacher": teacher, "student": student}, optim, run, out, device,
        precision, teacher_dir, record, generator, teacher_dir=teacher_dir,
    )  # fmt: skip
    if result.interrupted:
        return interrupted(result.step, out)
    teacher, student = models["teacher"], models["student"]
    save_model(student, out / "student", teacher_dir)
    t_acc, s_acc = final["teacher"]["mlm_accuracy"], final["student"]["mlm_accuracy"]
    report = {
        "teacher": {"path": str(teacher_dir), "parameters": count_parameters(teacher), **final["teacher"]},
        "student": {"path": str(out / "student"), "parameters": count_parameters(student), **final["student"]},
        "student_keeps_of_teacher_accuracy": kept_share(s_acc, t_acc),  # None: the teacher scores ~0
        "top1_agreement": final["top1_agreement"],
        "hidden_cosine": final["hidden_cosine"],
        "heldout_masked_tokens": final["masked_tokens"],
        "steps": result.step,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "device": str(device),
        "precision": precision,
        **loss_summary(out / "metrics.jsonl", out / "loss_curve.png", LOSS_KEYS),
    }
    distributed.run_on_main(lambda: write_json(out / "report.json", report), share_result=False)
    rows = [
        (name, f"{report[name]['parameters'] / 1e6:.1f}M", f"{100 * report[name]['mlm_accuracy']:.2f}",
         f"{report[name]['perplexity']:.2f}")
        for name in ("teacher", "student")
    ]  # fmt: skip
    print(format_table(rows, ("model", "params", "held-out MLM acc %", "perplexity")))
    share = report["student_keeps_of_teacher_accuracy"]
    kept = (
        f"student keeps {100 * share:.1f}% of the teacher's accuracy"
        if share is not None
        else "the teacher's accuracy is too low to compare the student's with"
    )
    print(
        f"{kept}; top-1 agreement {100 * report['top1_agreement']:.2f}%, hidden cosine {report['hidden_cosine']:.4f}; "
        f"loss {report['first_loss']} -> {report['last_loss']} in {report['steps']} steps"
    )
    print(f"report: {out / 'report.json'}")
    return report


@guarded
def adapt_head(adapt: AdaptOptions, data: DataOptions, masking: MaskingOptions, optim: OptimOptions,
               run: RunOptions) -> dict:  # fmt: skip
    """Train the MLM head (transform + decoder tied to the word embeddings) of an encoder-only
    checkpoint by masked language modelling; saves a teacher with a head to `<out>/model`."""
    check_fsdp(run, "adapt-head")
    device, precision = setup(run)
    if not adapt.model or not data.data:
        raise ValueError("--model and --data are required (the no-argument default pipeline sets both)")
    check_ranges(data, masking, optim, run)
    distributed.check_batch_size(data.batch_size)
    check_objective_options(ObjectiveOptions(alpha_ce=0.0, alpha_mlm=1.0, alpha_cos=0.0), masking)
    record = to_dict(adapt, data, masking, optim, run)
    check_out_dir(run, record)
    model_dir = Path(adapt.model)
    model = ckpt.load_model(model_dir, head="mlm", device=device)[0]
    if not adapt.train_encoder:
        model.encoder.requires_grad_(False)  # the tied decoder is the word embedding: frozen with it
    tokenizer = load_tokenizer(model_dir)
    check_lengths(data.max_seq_len, tokenizer, model)
    find_sources(data.data, text_column=data.text_column)  # every file there and text, checked without reading it
    out = prepare_out_dir(run.out, run.resume, run.overwrite, record)
    corpus = prepare_corpus(tokenizer, data, masking, run, out, model.config.vocab_size, device)
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
    result, final, models = _train_and_report(
        model, objective_fn, corpus, {"model": model}, optim, run, out, device, precision, model_dir, record, generator
    )
    if result.interrupted:
        return interrupted(result.step, out)
    model = models["model"]
    save_model(model, out / "model", model_dir)
    summary = loss_summary(out / "metrics.jsonl", out / "loss_curve.png", LOSS_KEYS)
    report = {"model": str(out / "model"), **final["model"], "steps": result.step, **summary}
    distributed.run_on_main(lambda: write_json(out / "report.json", report), share_result=False)
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
