"""Teacher caches (engine/teacher_cache*.py): training from the cache equals training with the live teacher (fp32,
1e-5) where K covers the support (classification, QA positions, a tiny MLM vocabulary); refusals; resumption; the
`distill cache-teacher` command and `--teacher-cache` in `distill task` and `distill pretrain`; pretraining from a
cache under torchrun (each rank's slice weighted by its share of the global counts) equals 1 process."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine import cli
from engine import finetune as ft
from engine import options as op
from engine import teacher_cache as tc
from engine import teacher_cache_train as tct
from engine import teacher_cache_write as tcw
from engine.config import ModelConfig
from engine.corpus import Sequences
from engine.distributed import Shard
from engine.model import build_model
from engine.objectives import triple_loss
from engine.options import MaskingOptions, ObjectiveOptions, OptimOptions, RunOptions
from tests.engine import test_distributed as dist_tests
from tests.engine.test_finetune import _data, _keyword_rows, _squad, _tiny, _write_jsonl

# ---- helpers and fixtures ------------------------------------------------------------------------------------------


def _run(out: Path, **over) -> RunOptions:
    return RunOptions(out=str(out), log_every=1, progress=False, eval_batches=2, **over)


def _metrics(path: Path) -> list[dict]:
    return [x for x in map(json.loads, path.read_text().splitlines()) if "loss" in x]


@pytest.fixture(scope="module")
def cls_train(tmp_path_factory):
    return _write_jsonl(tmp_path_factory.mktemp("cls") / "train.jsonl", _keyword_rows(60, seed=0))


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory):
    return _squad(tmp_path_factory.mktemp("squad") / "squad.json", n=24)


@pytest.fixture(scope="module")
def cls_teacher(tmp_path_factory, minilm_dir, cls_train):
    """A tiny BERT classifier for the data's 3 labels (a few fine-tuning steps: any weights do for equality)."""
    base = _tiny(tmp_path_factory.mktemp("base"), minilm_dir)
    out = tmp_path_factory.mktemp("cls_teacher") / "run"
    ft.finetune(op.FinetuneOptions(model=str(base), latency_iters=0), _data([cls_train]),
                OptimOptions(steps=4, lr=5e-3), _run(out))  # fmt: skip
    return out / "model"


@pytest.fixture(scope="module")
def qa_teacher(tmp_path_factory, minilm_dir, squad_file):
    base = _tiny(tmp_path_factory.mktemp("qa_base"), minilm_dir, seed=1)
    out = tmp_path_factory.mktemp("qa_teacher") / "run"
    ft.finetune(op.FinetuneOptions(task="qa", model=str(base), latency_iters=0),
                _data([squad_file], max_seq_len=48), OptimOptions(steps=4, lr=5e-3), _run(out))  # fmt: skip
    return out / "model"


def _cache(teacher, data, out, task="classification", **over) -> dict:
    opts = op.CacheTeacherOptions(task=task, teacher=str(teacher), **over)
    return tc.cache_teacher(opts, data, MaskingOptions(), _run(out))


def _task(teacher, data, out, steps=6, **over):
    opts = op.TaskOptions(task=over.pop("task", "classification"), teacher=str(teacher), student_num_layers=1,
                          baseline=False, latency_iters=0, **over)  # fmt: skip
    kd = op.KDOptions(temperature=2.0, alpha=0.3)
    return ft.distill_task(opts, data, kd, OptimOptions(steps=steps, lr=5e-3, warmup=0.1), _run(out))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _gradient_is_zero(name: str) -> bool:
    """Parameters whose gradient is 0 in exact arithmetic: the attention key bias adds q·b_k to every score of a
    query alike, which the softmax over keys ignores (and the QA span bias shifts every position alike). Their
    gradient is rounding noise, which AdamW's normalized step turns into moves of ~lr·g/eps in either run: they are
    compared by their (nil) effect on the losses, not by value."""
    return name.endswith(("k_lin.bias", "attention.self.key.bias", "qa_outputs.bias"))


def _same_training(live: Path, cached: Path, terms=("loss", "kd", "ce")) -> None:
    a, b = _metrics(live / "distill" / "metrics.jsonl"), _metrics(cached / "distill" / "metrics.jsonl")
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for key in terms:
            assert abs(x[key] - y[key]) <= 1e-5 * max(1.0, abs(x[key])), (key, x, y)
    wa, wb = _weights(live / "student"), _weights(cached / "student")
    assert wa.keys() == wb.keys()
    for k in wa:
        if not _gradient_is_zero(k):
            torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-5, msg=k)


# ---- task caches: equal to the live teacher ------------------------------------------------------------------------


def test_classification_from_cache_equals_live_teacher(cls_teacher, cls_train, tmp_path):
    """K ≥ C stores whole rows: the loss trajectory and the student's weights equal the live teacher's (fp32, 1e-5);
    the report carries the teacher's scores from the cache and says where they came from."""
    data = _data([cls_train])
    m = _cache(cls_teacher, data, tmp_path / "cache")
    assert m["dense"] and m["top_k"] == 3 and m["width"] == 3 and m["labels"]
    live = _task(cls_teacher, data, tmp_path / "live")
    cached = _task(cls_teacher, data, tmp_path / "cached", teacher_cache=str(tmp_path / "cache"))
    _same_training(tmp_path / "live", tmp_path / "cached")
    assert cached["teacher"]["accuracy"] == pytest.approx(live["teacher"]["accuracy"])
    assert cached["teacher_cache"]["top_k"] == 3 and cached["teacher_cache"]["bytes_per_token"] > 0


def test_qa_from_cache_equals_live_teacher(qa_teacher, squad_file, tmp_path):
    """QA stores every position of each window (pads −inf): start and end KD equal the live teacher's."""
    data = _data([squad_file], max_seq_len=48)
    m = _cache(qa_teacher, data, tmp_path / "cache", task="qa")
    assert m["dense"] and m["width"] <= 48 and m["width"] % 8 == 0  # the widest window, padded
    _task(qa_teacher, data, tmp_path / "live", task="qa")
    _task(qa_teacher, data, tmp_path / "cached", task="qa", teacher_cache=str(tmp_path / "cache"))
    _same_training(tmp_path / "live", tmp_path / "cached")


def test_classification_top_k_below_classes_uses_the_tail(cls_teacher, cls_train, tmp_path):
    """K < C: ids are stored and the KD term is the top-K + tail formula on the teacher's own logits."""
    from kernels import sparse_targets

    data = _data([cls_train])
    m = _cache(cls_teacher, data, tmp_path / "cache", top_k=2)
    assert not m["dense"] and m["top_k"] == 2 and 0 < m["tail_mass_mean"] < 1
    cache = tc.TaskTeacherCache(tmp_path / "cache", "classification")
    from engine.taskdata import prepare_task_data, teacher_label_map

    td = prepare_task_data("classification", data, cls_teacher, 0, lambda ours: teacher_label_map(cls_teacher, ours))
    batch = next(td.train_in_order(5))
    got = cache.targets_for(batch, torch.device("cpu")).logits
    from engine.runs import load_frozen

    teacher = load_frozen(cls_teacher, "classification", torch.device("cpu"), "fp32", label2id=td.label2id)
    with torch.no_grad():
        logits = teacher(batch["input_ids"], batch["attention_mask"]).logits
    want = sparse_targets(logits, 2, 2.0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    report = _task(cls_teacher, data, tmp_path / "run", steps=3, teacher_cache=str(tmp_path / "cache"))
    assert np.isfinite(report["distill_last_loss"])


# ---- refusals, resumption ------------------------------------------------------------------------------------------


def test_a_cache_that_does_not_match_the_run_is_refused(cls_teacher, cls_train, tmp_path):
    data = _data([cls_train])
    _cache(cls_teacher, data, tmp_path / "cache")
    c = str(tmp_path / "cache")
    with pytest.raises(ValueError, match="temperature 2 .*--temperature 4"):
        opts = op.TaskOptions(teacher=str(cls_teacher), student_num_layers=1, baseline=False, teacher_cache=c)
        ft.distill_task(opts, data, op.KDOptions(temperature=4.0), OptimOptions(steps=1), _run(tmp_path / "t"))
    other = _write_jsonl(tmp_path / "other.jsonl", _keyword_rows(60, seed=5))
    with pytest.raises(ValueError, match="other training rows"):
        _task(cls_teacher, _data([other]), tmp_path / "o", teacher_cache=c)
    with pytest.raises(ValueError, match="holds a classification teacher, this run is qa"):
        tc.TaskTeacherCache(c, "qa")
    val_a = _write_jsonl(tmp_path / "val_a.jsonl", _keyword_rows(9, seed=7))
    val_b = _write_jsonl(tmp_path / "val_b.jsonl", _keyword_rows(9, seed=8))
    _cache(cls_teacher, _data([cls_train], validation_data=[str(val_a)]), tmp_path / "cache_v")
    with pytest.raises(ValueError, match="other validation rows"):
        _task(cls_teacher, _data([cls_train], validation_data=[str(val_b)]), tmp_path / "v",
              teacher_cache=str(tmp_path / "cache_v"))  # fmt: skip
    # Another teacher (other weights) named with --teacher.
    other_teacher = tmp_path / "other_teacher"
    shutil.copytree(cls_teacher, other_teacher)
    from safetensors.torch import load_file, save_file

    w = load_file(other_teacher / "model.safetensors")
    w[next(iter(w))] += 1
    save_file(w, other_teacher / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="whose weights differ"):
        _task(other_teacher, data, tmp_path / "w", teacher_cache=c)
    # An unfinished cache, another format version, a folder that is no cache.
    (tmp_path / "cache" / "manifest.json").rename(tmp_path / "manifest.json")
    with pytest.raises(ValueError, match="interrupted: rerun"):
        tc.read_manifest(c)
    m = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps({**m, "version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        tc.read_manifest(c)
    with pytest.raises(ValueError, match="no such folder"):
        tc.read_manifest(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no teacher cache"):
        _cache(cls_teacher, data, tmp_path / "plain")


def test_cache_writing_resumes_and_refuses_other_options(cls_teacher, cls_train, tmp_path):
    """An interrupted cache (shards written, no manifest) is finished by the same command without redoing its shards;
    other options are refused unless --overwrite; a finished cache is not redone."""
    data = _data([cls_train])
    m = _cache(cls_teacher, data, tmp_path / "cache", shard_size=16)
    assert m["shards"] >= 3
    cache = tmp_path / "cache"
    values = [np.load(tc._array_path(cache, j, "values")) for j in range(m["shards"])]
    (cache / "manifest.json").unlink()
    tc._summary_path(cache, m["shards"] - 1).unlink()  # the last shard was cut short
    stamp = tc._array_path(cache, 0, "values").stat().st_mtime_ns
    again = _cache(cls_teacher, data, tmp_path / "cache", shard_size=16)
    assert tc._array_path(cache, 0, "values").stat().st_mtime_ns == stamp  # finished shards are kept
    assert again["data"] == m["data"] and again["bytes"] == m["bytes"]
    for j in range(m["shards"]):
        np.testing.assert_array_equal(np.load(tc._array_path(cache, j, "values")), values[j])
    assert _cache(cls_teacher, data, tmp_path / "cache", shard_size=16)["data"] == m["data"]  # finished: nothing to do
    with pytest.raises(ValueError, match="other options .*--top-k"):
        _cache(cls_teacher, data, tmp_path / "cache", shard_size=16, top_k=2)
    opts = op.CacheTeacherOptions(teacher=str(cls_teacher), shard_size=16, top_k=2)
    assert tc.cache_teacher(opts, data, MaskingOptions(), _run(cache, overwrite=True))["top_k"] == 2


# ---- pretraining: static masking, a tiny vocabulary --------------------------------------------------------------


class _Tokenizer:
    pad_token_id, mask_token_id = 0, 3


def _tiny_mlm_teacher(vocab=40, hidden=16, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(arch="bert", vocab_size=vocab, hidden_size=hidden, num_layers=2, num_heads=2,
                         intermediate_size=32, max_position_embeddings=64, hidden_dropout=0.0,
                         attention_dropout=0.0)  # fmt: skip
    return build_model(config, head="mlm").eval()


def _tiny_mlm_cache(tmp_path: Path, kd_masked: bool):
    """A 2-copy dense (K = V = 40) pretraining cache with hidden states of a tiny teacher over 24 short sequences:
    (teacher, student (its layout, other weights), sequences, the opened reader)."""
    torch.manual_seed(0)
    teacher = _tiny_mlm_teacher().requires_grad_(False)
    student = _tiny_mlm_teacher(seed=1)
    lengths = torch.randint(6, 20, (24,))
    seqs = Sequences.from_lists([[1] + torch.randint(5, 40, (int(n) - 2,)).tolist() + [2] for n in lengths])
    corpus = SimpleNamespace(batches=SimpleNamespace(seqs=seqs), tokenizer=_Tokenizer,
                             special_ids=torch.tensor([0, 1, 2, 3, 4]), token_weights=None)  # fmt: skip
    cache = tmp_path / "cache"
    cache.mkdir()
    (teacher_dir := tmp_path / "teacher").mkdir()
    from engine.checkpoint import save_model

    save_model(teacher, teacher_dir)
    tc._copy_teacher_files(teacher_dir, cache)
    masking = MaskingOptions(mlm_probability=0.3)
    orig = tcw.tokenizer_fingerprint  # patched where the writer looks it up
    tcw.tokenizer_fingerprint = lambda t: "tiny"
    try:
        m = tc.write_mlm_cache(cache, teacher, teacher_dir, corpus, masking, k=40, temperature=2.0, copies=2,
                               kd_masked=kd_masked, hidden=True, batch_size=8, shard_units=16, seed=0,
                               device=torch.device("cpu"), precision="fp32", progress=False)  # fmt: skip
    finally:
        tcw.tokenizer_fingerprint = orig
    assert m["dense"] and m["mask_copies"] == 2 and m["shards"] == 4
    reader = tc.MLMTeacherCache(cache)
    reader.seqs = seqs
    return teacher, student, seqs, reader


@pytest.mark.parametrize("kd_masked", [True, False])
def test_rank_slices_of_a_cached_batch_sum_to_the_whole_batch(tmp_path, kd_masked):
    """Each rank reads only its rows of the global batch from the cache, padded to the batch's width, and weighs each
    term by its share of the global non-pad / masked counts: over 2 and 3 ranks (slices of 4, and of 2, 3, 3 rows) and
    over a 1-row batch on 2 ranks (rank 1 computes on a stand-in row of share 0), the ranks' losses, terms and
    gradients sum to the 1-process ones (fp32, 1e-5)."""
    _, student, seqs, reader = _tiny_mlm_cache(tmp_path, kd_masked)
    fn = tc.CachedPretrainObjective(student, ObjectiveOptions(restrict_ce_to_mask=kd_masked), torch.device("cpu"))
    ids = [3, 0, 17, 8, 21, 5, 12, 9]
    for batch_ids, worlds in ((ids, (2, 3)), (ids[:1], (2,))):
        lengths = seqs.lengths[batch_ids].tolist()
        whole = tct.cached_slice(reader, batch_ids, lengths, 1, 0, 8, Shard())
        student.zero_grad()
        loss, terms = fn(whole)
        loss.backward()
        grads = [p.grad.clone() for p in student.parameters()]
        for world in worlds:
            slices = [tct.cached_slice(reader, batch_ids, lengths, 1, 0, 8, Shard(r, world)) for r in range(world)]
            assert all(b.input_ids.shape[1] == whole.input_ids.shape[1] for b in slices)  # the global width
            assert sum(b.input_ids.shape[0] for b in slices) == len(batch_ids) + (world > len(batch_ids))
            assert all(b.tokens == whole.tokens == sum(lengths) for b in slices)
            student.zero_grad()
            outs = [fn(b) for b in slices]
            total = sum(out[0] for out in outs)
            total.backward()
            torch.testing.assert_close(total, loss, atol=1e-5, rtol=1e-5)
            for key in ("kd", "mlm", "cos"):
                torch.testing.assert_close(sum(out[1][key] for out in outs), terms[key], atol=1e-5, rtol=1e-5)
            for (name, p), g in zip(student.named_parameters(), grads):
                torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kd_masked", [True, False])
def test_pretraining_from_cache_equals_live_teacher_with_the_same_masks(tmp_path, kd_masked):
    """A vocabulary of 40 and K = 40: with the cache's masked copies fed to both, the triple loss against the live
    teacher (LM-head-fused KD) and against the cache (sparse kernel, stored hidden states) give the same losses and
    the same student after several AdamW steps (fp32, 1e-5); epochs cycle through the copies."""
    teacher, student, seqs, reader = _tiny_mlm_cache(tmp_path, kd_masked)
    # alpha_cos 0: the cache keeps hidden states in bf16 (the format), which the cosine term then sees; that
    # term is checked apart below, against the live teacher's states rounded to bf16.
    objective = ObjectiveOptions(restrict_ce_to_mask=kd_masked, fused_head=True, alpha_cos=0.0)
    cached_fn = tc.CachedPretrainObjective(student, objective, torch.device("cpu"))
    live_student = _tiny_mlm_teacher(seed=1)
    live_student.load_state_dict(student.state_dict())
    opt_a = torch.optim.AdamW(student.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(live_student.parameters(), lr=1e-2)
    from engine.batching import LengthGroupedBatches

    batches = tc.cached_batches(LengthGroupedBatches(seqs, batch_size=8, pad_id=0, seed=0), reader)
    for step in range(7):  # 3 batches an epoch: copies 0, 1, 0
        b = batches.next_batch()
        assert torch.equal(b.input_ids[b.labels != -100] != b.labels[b.labels != -100], (b.input_ids != b.labels)[
            b.labels != -100])  # fmt: skip
        loss_a, terms_a = cached_fn(b)
        # The live teacher on the same masked copy, through the objective's own triple loss.
        h_s = live_student.encoder(b.input_ids, b.attention_mask).last_hidden_state.flatten(0, 1)[b.rows]
        with torch.no_grad():
            h_t = teacher.encoder(b.input_ids, b.attention_mask).last_hidden_state.flatten(0, 1)[b.rows]
        y = b.labels.reshape(-1)[b.rows]
        loss_b, terms_b = triple_loss(h_s, h_t, y, live_student.lm_head, teacher.lm_head, objective)
        for key in ("kd", "mlm"):
            torch.testing.assert_close(terms_a[key], terms_b[key], atol=1e-5, rtol=1e-5, msg=key)
        torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
        if step == 0:  # the stored hidden states are the teacher's, rounded to bf16
            torch.testing.assert_close(b.hidden, h_t.bfloat16(), atol=0, rtol=0)
        for o, loss in ((opt_a, loss_a), (opt_b, loss_b)):
            o.zero_grad()
            loss.backward()
            o.step()
        assert batches.epoch == step // 3
    for (name, a), b in zip(student.named_parameters(), live_student.parameters()):
        if not _gradient_is_zero(name):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


# ---- the command line ----------------------------------------------------------------------------------------------


def test_cli_cache_teacher_then_task_from_the_cache(cls_teacher, cls_train, tmp_path, capsys):
    rc = cli.main(["cache-teacher", "--teacher", str(cls_teacher), "--data", str(cls_train), "--max-seq-len", "32",
                   "--batch-size", "8", "--out", str(tmp_path / "cache"), "--no-progress"])  # fmt: skip
    assert rc == 0
    assert "bytes per token" in capsys.readouterr().out
    rc = cli.main(["task", "--teacher-cache", str(tmp_path / "cache"), "--teacher", str(cls_teacher), "--data",
                   str(cls_train), "--max-seq-len", "32", "--batch-size", "8", "--steps", "2", "--student-num-layers",
                   "1", "--no-baseline", "--latency-iters", "0", "--out", str(tmp_path / "run"),
                   "--no-progress"])  # fmt: skip
    assert rc == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["teacher_cache"]["path"] == str(tmp_path / "cache")
    rc = cli.main(["task", "--teacher-cache", str(tmp_path / "cache"), "--teacher", str(cls_teacher), "--data",
                   str(cls_train), "--max-seq-len", "32", "--batch-size", "8", "--temperature", "3", "--out",
                   str(tmp_path / "run2"), "--no-progress"])  # fmt: skip
    assert rc == 2
    assert "--temperature 3" in capsys.readouterr().err


def test_cli_pretrain_from_a_cache_with_static_masking(tmp_path, minilm_dir, capsys):
    """`distill cache-teacher --task mlm` (K = 64 of 30522, hidden states) then `distill pretrain --teacher-cache`:
    the run trains with no teacher, says it used static masking, and refuses a cache made for other KD rows or without
    the hidden states its cosine term needs."""
    from engine.defaults import bbc_news_dir
    from tests.engine.test_pretrain import _tiny_bert

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in sorted((bbc_news_dir() / "tech").glob("*.txt"))[:16]:
        shutil.copy(f, corpus / f.name)
    teacher = _tiny_bert(tmp_path / "teacher", Path(minilm_dir), layers=2)
    common = ["--data", str(corpus), "--max-seq-len", "32", "--batch-size", "8", "--no-progress"]
    rc = cli.main(["cache-teacher", "--task", "mlm", "--teacher", str(teacher), "--top-k", "64", "--mask-copies", "2",
                   "--hidden", "--heldout-fraction", "0.1", "--out", str(tmp_path / "cache"), *common])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    m = tc.read_manifest(tmp_path / "cache")
    assert m["top_k"] == 64 and not m["dense"] and m["mask_copies"] == 2 and m["kd_rows"] == "all" and m["hidden"]
    assert 0 < m["tail_mass_mean"] < 1  # a random tiny teacher is near uniform: most of its mass is in the tail
    run = ["pretrain", "--teacher-cache", str(tmp_path / "cache"), "--teacher", str(teacher), "--student-num-layers",
           "1", "--steps", "4",
           "--log-every", "1", "--heldout-fraction", "0.1", *common]  # fmt: skip
    assert cli.main([*run, "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "static masking: 2 fixed masked copies" in report["teacher_cache"]["masking"]
    assert report["teacher"]["from_cache"] and report["steps"] == 4
    assert all(np.isfinite(x["loss"]) for x in _metrics(tmp_path / "run" / "metrics.jsonl"))
    capsys.readouterr()
    assert cli.main([*run, "--restrict-ce-to-mask", "--out", str(tmp_path / "r2")]) == 2
    assert "--restrict-ce-to-mask" in capsys.readouterr().err
    assert cli.main([*run, "--seed", "3", "--out", str(tmp_path / "r3")]) == 2  # another held-out split
    assert "other training rows" in capsys.readouterr().err


# ---- pretraining from a cache under torchrun (gloo, 2 processes) against 1 process ---------------------------------


@pytest.mark.slow
def test_two_ranks_pretrain_from_a_cache_like_one_rank(tmp_path, minilm_dir):
    """`distill pretrain --teacher-cache` under torchrun: each rank reads its rows of every global batch from the
    cache and weighs them by its share of the global counts, so 2 ranks log the same losses at every step (relative
    1e-5) and end with the same student (1e-5) as 1 rank; rank 0 alone wrote the log and the report. The tiny models,
    corpus and flags of `test_distributed` (fp32, no dropout), a K = 64 cache with hidden states (cosine term on)."""
    from engine.defaults import bbc_news_dir

    teacher = dist_tests._tiny(tmp_path / "teacher", minilm_dir, "BertForMaskedLM")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in sorted((bbc_news_dir() / "business").glob("*.txt"))[:8]:
        (corpus / f.name).write_bytes(f.read_bytes())
    data = ["--teacher", str(teacher), "--data", str(corpus), *dist_tests.COMMON]
    cache = tmp_path / "cache"
    cache_args = ["cache-teacher", "--task", "mlm", "--top-k", "64", "--mask-copies", "2", "--hidden", *data]
    dist_tests._distill([*cache_args, "--out", str(cache)], nproc=1)
    steps = str(dist_tests.STEPS)
    run = ["pretrain", "--teacher-cache", str(cache), "--student-num-layers", "1", "--steps", steps, *data]
    one, two = tmp_path / "one", tmp_path / "two"
    dist_tests._distill([*run, "--out", str(one)], nproc=1)
    dist_tests._distill([*run, "--out", str(two)], nproc=2)
    dist_tests._assert_same_run(one / "metrics.jsonl", two / "metrics.jsonl", one / "student", two / "student",
                     ("loss", "kd", "mlm", "cos", "grad_norm"))  # fmt: skip
    assert len((two / "metrics.jsonl").read_text().splitlines()) == dist_tests.STEPS
    report = json.loads((two / "report.json").read_text())
    assert report["teacher"]["from_cache"] and report["steps"] == dist_tests.STEPS
