"""engine.hf against the formulas it replaces: the NLP-with-Transformers book's DistillationTrainer, (DistilBERT)²'s
SQuAD distiller and DistilBERT's triple loss, written here in torch.nn.functional on tiny Hugging Face models."""

import copy
import importlib.util
import inspect

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from engine.hf import DistillationLoss, DistillationTrainer, DistillationTrainingArguments, task_of
from engine.options import KDOptions, MaskingOptions, ObjectiveOptions

# The Trainer needs accelerate>=1.1 (transformers' `torch` extra); DistillationLoss alone does not.
needs_trainer = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="Trainer needs accelerate")

V = 120  # vocabulary: small, so the pure-PyTorch kernel path and the [N, V] reference are quick
L = 12  # sequence length
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(V - 5)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _config(arch: str, **extra):
    if arch == "bert":
        c = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        c.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
        return tf.BertConfig(**{"vocab_size": V, "max_position_embeddings": 32, **c, **extra})
    c = dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, dropout=0.0, attention_dropout=0.0)
    c.update(seq_classif_dropout=0.0, qa_dropout=0.0)
    return tf.DistilBertConfig(**{"vocab_size": V, "max_position_embeddings": 32, **c, **extra})


def _model(task: str, arch: str, **extra):
    """A tiny HF model of `task`; weights spread out so that distributions are peaked and teacher ≠ student."""
    if task == "classification":
        extra = {"id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}, **extra}
    cls = {"classification": tf.AutoModelForSequenceClassification, "qa": tf.AutoModelForQuestionAnswering}
    model = cls.get(task, tf.AutoModelForMaskedLM).from_config(_config(arch, **extra))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _batch(task: str, padded: bool = True) -> dict:
    ids = torch.randint(5, V, (4, L))
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 8:] = 0
        mask[3, 5:] = 0
    ids[mask == 0] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if task == "classification":
        batch["labels"] = torch.tensor([0, 2, 1, 2])
    elif task == "qa":
        batch["start_positions"], batch["end_positions"] = torch.tensor([1, 3, 0, 2]), torch.tensor([4, 6, 0, 3])
    else:  # MLM: a few positions masked, the original ids as labels
        labels = torch.full_like(ids, -100)
        for b, pos in ((0, 3), (0, 7), (1, 2), (2, 10), (3, 4)):
            labels[b, pos] = ids[b, pos]
            ids[b, pos] = 4  # [MASK]
        batch["labels"] = labels
    return batch


def _args(tmp_path, **kw) -> DistillationTrainingArguments:
    kw = {"per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "disable_tqdm": True, **kw}
    return DistillationTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


def _trainer(tmp_path, student, teacher, **kw) -> DistillationTrainer:
    return DistillationTrainer(model=student, args=_args(tmp_path, **kw), teacher_model=teacher)


def _kd(s, t, T):
    """The book's KD term: nn.KLDivLoss(reduction="batchmean")(log_softmax(s/T), softmax(t/T)) · T²."""
    return F.kl_div(F.log_softmax(s / T, dim=-1), F.softmax(t / T, dim=-1), reduction="batchmean") * T**2


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _assert_same_loss_and_grads(student, ours, reference):
    """`ours` and `reference`: zero-argument callables returning a () loss of `student`'s parameters."""
    student.zero_grad(set_to_none=True)
    a = ours()
    a.backward()
    ga = _grads(student)
    b = reference()
    b.backward()
    gb = _grads(student)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-6, msg=n)


# ---- the formulas ---------------------------------------------------------------------------------------------------


@needs_trainer
@pytest.mark.parametrize("student_arch", ["distilbert", "bert"])
def test_classification_default_loss_is_the_books_formula(tmp_path, student_arch):
    teacher, student = _model("classification", "bert"), _model("classification", student_arch)
    trainer = _trainer(tmp_path, student, teacher)
    assert (trainer.args.alpha, trainer.args.temperature) == (0.5, 2.0) == (KDOptions.alpha, KDOptions.temperature)
    batch = _batch("classification")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}

    def book():  # NLP with Transformers, chapter 8: alpha·CE + (1 − alpha)·T²·KL(batchmean)
        s = student(**inputs).logits
        with torch.no_grad():
            t = teacher(**inputs).logits
        return 0.5 * F.cross_entropy(s, batch["labels"]) + 0.5 * _kd(s, t, 2.0)

    _assert_same_loss_and_grads(student, lambda: trainer.compute_loss(student, batch), book)


@needs_trainer
def test_classification_weights_temperature_and_terms(tmp_path):
    teacher, student = _model("classification", "bert"), _model("classification", "distilbert")
    trainer = _trainer(tmp_path, student, teacher, alpha=0.3, temperature=4.0)
    batch = _batch("classification")
    loss, out = trainer.compute_loss(student, batch, return_outputs=True)
    s, t = out.logits, teacher(batch["input_ids"], batch["attention_mask"]).logits
    ce, kd = F.cross_entropy(s, batch["labels"]), _kd(s, t, 4.0)
    torch.testing.assert_close(loss, 0.3 * ce + 0.7 * kd, rtol=1e-6, atol=1e-6)
    sums, n = trainer._terms[True]
    torch.testing.assert_close(sums["ce"], ce.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sums["kd"], kd.detach(), rtol=1e-6, atol=1e-6)


@needs_trainer
@pytest.mark.parametrize("padded", [False, True])
def test_qa_loss_is_the_distilbert2_formula(tmp_path, padded):
    teacher, student = _model("qa", "bert"), _model("qa", "distilbert")
    trainer = _trainer(tmp_path, student, teacher)
    batch = _batch("qa", padded)
    batch["end_positions"][2] = L  # past the sequence: HF's QA heads ignore it, and so do we
    mask = batch["attention_mask"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": mask}

    def distilbert2():
        # run_squad_w_distillation.py: alpha_ce·½(KD_start + KD_end) + alpha_squad·(HF span loss), T = 2. Pad
        # positions are excluded from both terms (engine.objectives does; the original does not): on an unpadded
        # batch this is the original formula itself.
        s, t = student(**inputs), teacher(**inputs)
        lo = torch.finfo(torch.float32).min

        def pads_out(x):
            return x.masked_fill(mask == 0, lo)

        kd = (_kd(pads_out(s.start_logits), pads_out(t.start_logits.detach()), 2.0)
              + _kd(pads_out(s.end_logits), pads_out(t.end_logits.detach()), 2.0)) / 2  # fmt: skip
        ignored = L  # HF: positions clamped to [0, L], L ignored
        ce_s = F.cross_entropy(pads_out(s.start_logits), batch["start_positions"].clamp(0, L), ignore_index=ignored)
        ce_e = F.cross_entropy(pads_out(s.end_logits), batch["end_positions"].clamp(0, L), ignore_index=ignored)
        return 0.5 * kd + 0.5 * (ce_s + ce_e) / 2

    _assert_same_loss_and_grads(student, lambda: trainer.compute_loss(student, batch), distilbert2)


def _mlm_reference(student, teacher, batch, o: ObjectiveOptions):
    """DistilBERT's distiller.py on full logits: α_ce·KLDivLoss(batchmean)(…)·T² over the non-pad rows (the masked
    rows with restrict_ce_to_mask), α_mlm·CE(ignore −100), α_cos·CosineEmbeddingLoss(target 1) over non-pad rows."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s = student(**inputs, output_hidden_states=True)
    with torch.no_grad():
        t = teacher(**inputs, output_hidden_states=True)
    labels = batch["labels"]
    rows = (labels != -100) if o.restrict_ce_to_mask else batch["attention_mask"].bool()
    kd = _kd(s.logits[rows], t.logits[rows], o.temperature)
    mlm = F.cross_entropy(s.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    pad = batch["attention_mask"].bool()
    hs, ht = s.hidden_states[-1][pad], t.hidden_states[-1][pad]
    cos = F.cosine_embedding_loss(hs, ht, torch.ones(hs.shape[0]))
    return o.alpha_ce * kd + o.alpha_mlm * mlm + o.alpha_cos * cos, {"kd": kd, "mlm": mlm, "cos": cos}


@needs_trainer
@pytest.mark.parametrize(
    "options", [{}, {"restrict_ce_to_mask": True}, {"fused_head": False, "alpha_ce": 2.0, "temperature": 3.0}]
)
def test_mlm_loss_is_the_distilbert_triple_loss(tmp_path, options):
    teacher, student = _model("mlm", "bert"), _model("mlm", "distilbert")
    trainer = _trainer(tmp_path, student, teacher, **options)
    o = trainer.distillation_loss.options
    if not options:  # the defaults are the DistilBERT recipe's
        assert (o.alpha_ce, o.alpha_mlm, o.alpha_cos, o.temperature) == (5.0, 2.0, 1.0, 2.0)
        assert o == ObjectiveOptions()
    batch = _batch("mlm")
    calls = []
    heads = {"projector": student.vocab_projector, "transform": student.vocab_transform, "teacher": teacher.cls}
    hooks = [m.register_forward_hook(lambda m, a, y, n=n: calls.append((n, a[0].dim()))) for n, m in heads.items()]
    try:
        _assert_same_loss_and_grads(
            student, lambda: trainer.compute_loss(student, batch), lambda: _mlm_reference(student, teacher, batch, o)[0]
        )
    finally:
        for h in hooks:
            h.remove()
    # Ours ran the student's transform on packed (N, H) rows only and no HF head module on the (B, L, H) positions;
    # the reference's three calls are the full heads'.
    assert sorted(calls) == [("projector", 3), ("teacher", 3), ("transform", 2), ("transform", 3)]
    assert student.vocab_projector is heads["projector"] and teacher.cls is heads["teacher"]  # the heads are back
    _, ref_terms = _mlm_reference(student, teacher, batch, o)
    sums, _ = trainer._terms[True]
    for k in ("kd", "mlm", "cos"):
        torch.testing.assert_close(sums[k], ref_terms[k].detach(), rtol=1e-6, atol=1e-6)


@needs_trainer
def test_mlm_agrees_with_distill_pretrain_objective(tmp_path):
    """The HF student through DistillationTrainer and our own models through `distill pretrain`'s objective
    (PretrainObjective, loaded from the same checkpoints), on the same batch and masks."""
    from engine.checkpoint import load_model
    from engine.objectives import PretrainObjective, device_batch

    teacher, student = _model("mlm", "bert"), _model("mlm", "distilbert")
    teacher.save_pretrained(tmp_path / "teacher")
    student.save_pretrained(tmp_path / "student")
    batch = _batch("mlm")
    trainer = _trainer(tmp_path / "run", student, teacher)
    ours_hf = trainer.compute_loss(student, batch)
    ours_hf.backward()
    hf_terms = trainer._terms[True][0]

    our_teacher = load_model(tmp_path / "teacher", head="mlm")[0].requires_grad_(False)
    our_student = load_model(tmp_path / "student", head="mlm")[0]
    objective = PretrainObjective(
        our_teacher, our_student, ObjectiveOptions(), MaskingOptions(), torch.tensor([0, 2, 3]), 4, None, None
    )
    original = batch["input_ids"].masked_scatter(batch["labels"] != -100, batch["labels"][batch["labels"] != -100])
    objective.mask = lambda b: (batch["input_ids"], batch["labels"])  # the collator's masks, not a fresh draw
    loss, terms = objective(device_batch(original, batch["attention_mask"], torch.device("cpu")))
    loss.backward()
    torch.testing.assert_close(ours_hf, loss, rtol=1e-5, atol=1e-5)
    for k in ("kd", "mlm", "cos"):
        torch.testing.assert_close(hf_terms[k], terms[k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        student.distilbert.embeddings.word_embeddings.weight.grad,
        our_student.encoder.embeddings.word_embeddings.weight.grad,
        rtol=1e-4,
        atol=1e-6,
    )


# ---- the Trainer's contract -----------------------------------------------------------------------------------------


@needs_trainer
def test_compute_loss_contract_and_gradient_accumulation(tmp_path):
    base = inspect.signature(tf.Trainer.compute_loss).parameters
    assert list(inspect.signature(DistillationTrainer.compute_loss).parameters) == list(base)
    teacher, student = _model("classification", "bert"), _model("classification", "distilbert")
    trainer = _trainer(tmp_path, student, teacher)
    batch = _batch("classification")
    assert trainer.model_accepts_loss_kwargs is False  # so the Trainer never counts num_items_in_batch
    plain = trainer.compute_loss(student, batch)
    torch.testing.assert_close(trainer.compute_loss(student, batch, num_items_in_batch=torch.tensor(7)), plain)
    trainer.current_gradient_accumulation_steps = 2
    torch.testing.assert_close(trainer.training_step(student, batch), plain.detach() / 2)  # a mean: divided by GA


@needs_trainer
def test_arguments_parse_from_the_command_line():
    parser = tf.HfArgumentParser((DistillationTrainingArguments,))
    flags = ["--output_dir", "out", "--report_to", "none", "--alpha", "0.3", "--alpha_cos", "0", "--fused_head", "no"]
    (a,) = parser.parse_args_into_dataclasses(flags)
    assert (a.alpha, a.temperature, a.alpha_cos, a.fused_head, a.alpha_ce) == (0.3, 2.0, 0.0, False, None)


class _Examples(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


@needs_trainer
def test_trainer_trains_evaluates_and_saves_classification(tmp_path):
    teacher, student = _model("classification", "bert"), _model("classification", "distilbert")
    batch = _batch("classification")
    rows = [{k: v[i] for k, v in batch.items()} for i in range(4)] * 2
    args = dict(max_steps=8, learning_rate=3e-3, logging_steps=2, save_steps=4, eval_strategy="steps", eval_steps=4)

    def accuracy(p):
        return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}

    trainer = DistillationTrainer(
        model=student,
        args=_args(tmp_path, **args),
        teacher_model=teacher,
        train_dataset=_Examples(rows),
        eval_dataset=_Examples(rows[:4]),
        compute_metrics=accuracy,
    )
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 4 and all({"kd", "ce"} <= h.keys() for h in train_logs)
    assert train_logs[-1]["loss"] < train_logs[0]["loss"]
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_kd", "eval_ce", "eval_accuracy"} <= metrics.keys()
    torch.testing.assert_close(metrics["eval_loss"], 0.5 * metrics["eval_ce"] + 0.5 * metrics["eval_kd"])
    assert {"test_kd", "test_ce"} <= trainer.evaluate(metric_key_prefix="test").keys()
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    for step in (4, 8):
        reloaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / f"checkpoint-{step}")
        assert reloaded.config.id2label == LABELS and not any(k.startswith("bert.") for k in reloaded.state_dict())
    for k, v in reloaded.state_dict().items():
        torch.testing.assert_close(v, student.state_dict()[k])


@needs_trainer
def test_trainer_distills_mlm_with_the_language_modeling_collator(tmp_path):
    tokenizer = tf.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    collator = tf.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.3)
    texts = [" ".join(f"w{(7 * i + j) % (V - 5)}" for j in range(3 + i % 7)) for i in range(8)]
    rows = [dict(tokenizer(t, max_length=L, padding="max_length", truncation=True)) for t in texts]
    teacher, student = _model("mlm", "bert"), _model("mlm", "distilbert")
    args = _args(tmp_path, max_steps=4, logging_steps=2, save_steps=4, remove_unused_columns=False)
    trainer = DistillationTrainer(
        model=student, args=args, teacher_model=teacher, data_collator=collator,
        train_dataset=_Examples(rows), eval_dataset=_Examples(rows[:4]),
    )  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all({"kd", "mlm", "cos"} <= h.keys() for h in logs)
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_kd", "eval_mlm", "eval_cos"} <= metrics.keys()
    assert (tmp_path / "checkpoint-4" / "model.safetensors").is_file()
    assert task_of(tf.AutoModelForMaskedLM.from_pretrained(tmp_path / "checkpoint-4")) == "mlm"


# ---- the plain module -----------------------------------------------------------------------------------------------


def test_distillation_loss_in_a_hand_written_loop():
    teacher, student = _model("classification", "bert"), _model("classification", "distilbert")
    loss_fn = DistillationLoss(teacher, alpha=0.5, temperature=2.0)
    assert loss_fn.task == "classification"
    holder = torch.nn.ModuleDict({"student": student, "loss": loss_fn})  # e.g. a LightningModule's attributes
    assert len(list(holder.parameters())) == len(list(student.parameters()))  # the teacher is not trained or saved
    assert not any(k.startswith("loss.") for k in holder.state_dict())
    batch = _batch("classification")
    wrapped = torch.nn.DataParallel(student)  # a wrapper with .module, as DDP: the forward must go through it
    forwards = []
    wrapped.register_forward_pre_hook(lambda *a: forwards.append(1))
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss, terms = loss_fn(wrapped, batch)
        assert terms.keys() == {"kd", "ce"} and not terms["kd"].requires_grad
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert len(forwards) == 6 and losses[-1] < losses[0]


def test_mlm_student_is_called_through_its_wrapper():
    teacher, student = _model("mlm", "bert"), _model("mlm", "bert")
    loss_fn = DistillationLoss(teacher)
    assert loss_fn.task == "mlm" and loss_fn.options == ObjectiveOptions()
    batch = _batch("mlm")
    wrapped = torch.nn.DataParallel(student)
    forwards = []
    wrapped.register_forward_pre_hook(lambda *a: forwards.append(1))
    loss, _ = loss_fn(wrapped, batch)
    torch.testing.assert_close(loss, loss_fn(student, batch)[0])
    assert forwards == [1]


@needs_trainer
def test_mlm_under_ddp_syncs_through_the_wrapper(tmp_path, monkeypatch):
    """One gloo process on the loopback interface: DDP's reducer runs as with many. With find_unused_parameters
    False (what the trainer sets) the gradients equal the unwrapped ones; with True DDP fails, as documented."""
    import torch.distributed as dist

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    teacher, student = _model("mlm", "bert"), _model("mlm", "bert")
    loss_fn, batch = DistillationLoss(teacher), _batch("mlm")
    assert loss_fn.head_outside_forward
    loss_fn(student, batch)[0].backward()
    expected = _grads(student)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(student, find_unused_parameters=False)
        loss_fn(ddp, batch)[0].backward()
        got = _grads(student)
        assert got.keys() == expected.keys()
        for n in got:
            torch.testing.assert_close(got[n], expected[n], msg=n)
        ddp = torch.nn.parallel.DistributedDataParallel(student, find_unused_parameters=True)
        with pytest.raises(RuntimeError, match="ready only once"):
            for _ in range(2):
                loss_fn(ddp, batch)[0].backward()
    finally:
        dist.destroy_process_group()
    args = _args(tmp_path)
    assert args.ddp_find_unused_parameters is None
    DistillationTrainer(model=student, args=args, teacher_model=teacher)
    assert args.ddp_find_unused_parameters is False
    with pytest.raises(ValueError, match="find_unused_parameters"):
        DistillationTrainer(model=student, args=_args(tmp_path, ddp_find_unused_parameters=True), teacher_model=teacher)


def test_teacher_is_moved_to_the_students_dtype_and_kept_in_eval_mode():
    teacher = _model("classification", "bert").double().train()
    student = _model("classification", "distilbert")
    loss_fn = DistillationLoss(teacher)
    assert not teacher.training
    loss_fn(student, _batch("classification"))
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    teacher.train()
    loss_fn(student, _batch("classification"))
    assert not teacher.training


# ---- clear errors ---------------------------------------------------------------------------------------------------


def _different_labels():
    return _model("classification", "bert", id2label={0: "positive", 1: "neutral", 2: "negative"}, label2id=None)


@needs_trainer
@pytest.mark.parametrize(
    "task, make_teacher, message",
    [
        ("classification", lambda: _model("classification", "bert", num_labels=2, id2label=None), "2 labels"),
        ("classification", _different_labels, "id2label"),
        (
            "classification",
            lambda: _model("mlm", "bert"),
            "teacher BertForMaskedLM is not a sequence-classification",
        ),
        ("mlm", lambda: _model("mlm", "bert", vocab_size=V + 8), "vocabulary mismatch"),
        ("qa", lambda: _model("qa", "bert", vocab_size=V + 8), "vocabulary mismatch"),
        ("mlm", lambda: _model("mlm", "bert", hidden_size=48), "equal hidden sizes"),
    ],
)
def test_mismatched_teacher_is_a_clear_error(tmp_path, task, make_teacher, message):
    student = _model(task, "distilbert")
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, student, make_teacher())


@needs_trainer
def test_generic_labels_match_named_ones(tmp_path):
    teacher = _model("classification", "bert", id2label=None, label2id=None, num_labels=3)
    assert teacher.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    _trainer(tmp_path, _model("classification", "distilbert"), teacher)  # no error: only one side names its labels


def test_teacher_that_cannot_be_moved_is_a_clear_error():
    with torch.device("meta"):
        meta_teacher = tf.AutoModelForSequenceClassification.from_config(_config("bert", num_labels=3))
    with pytest.raises(ValueError, match="meta device"):
        DistillationLoss(meta_teacher)
    split_teacher = _model("classification", "bert")
    split_teacher.classifier.to("meta")  # the stand-in for device_map="auto" over two devices
    with pytest.raises(ValueError, match="split over devices"):
        DistillationLoss(split_teacher)


def test_options_that_do_not_apply_are_errors():
    teacher = _model("classification", "bert")
    with pytest.raises(ValueError, match="do not apply"):
        DistillationLoss(teacher, alpha_mlm=2.0)
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(teacher, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(_model("mlm", "bert"), temperature=0.0)
    with pytest.raises(ValueError, match="task must be one of"):
        DistillationLoss(tf.BertModel(_config("bert")))
    regression = copy.deepcopy(teacher)
    regression.config.problem_type = "regression"
    with pytest.raises(ValueError, match="regression"):
        DistillationLoss(regression)(_model("classification", "distilbert"), _batch("classification"))
