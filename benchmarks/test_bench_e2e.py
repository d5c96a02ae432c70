"""End to end: one DistilBERT-recipe distillation step, our engine against the way users write it today.

One step = batch to the device → dynamic masking → teacher forward (frozen, eval, no_grad) → student forward under
autocast → the triple loss (α_ce 5 · KD(T = 2) + α_mlm 2 · MLM + α_cos 1 · cosine) → backward → clip to 5 →
AdamW step → zero_grad. Providers:

    eager         `transformers` BertForMaskedLM teacher + DistilBertForMaskedLM student (their default attention,
                  recorded as `attn_implementation`) and the losses of the original distiller
                  (`distiller_loss` below: masked_select of the non-pad rows of both [B, L, V] logits,
                  KLDivLoss(batchmean)(log_softmax(s/T), softmax(t/T))·T², CrossEntropyLoss(ignore_index=-100),
                  CosineEmbeddingLoss on the non-pad last hidden states), under `torch.autocast`
    compile       the same with both `transformers` models wrapped in `torch.compile` (CUDA only)
    ours          `engine.model.MaskedLM` models, `engine.objectives.PretrainObjective` (rows packed once, LM-head-
                  fused KD + CE, cosine kernel), `engine.scaler.StepGuard` (clip + device-side overflow skip)
    ours_compile  the same with both encoders wrapped in `torch.compile`, as `distill pretrain --compile` does (CUDA)

Fairness: both start from the same CPU batch (token ids and attention mask, as a data loader hands them over) and
the same weights (the `transformers` models are loaded from ours); masking is `engine.masking.mask_tokens` with the
same seed for both, so every step masks the same positions in both; the teacher's weights are in the compute dtype
for both (bf16 on CUDA, no fp32 master copy); the student is fp32 under autocast for both; both use the same fused
AdamW (`engine.loop.make_optimizer`) and the same clipping. Each contender runs the same number of untimed warm-up
steps (`WARMUP`, where `torch.compile` compiles: its time is recorded as `warmup_s` and excluded from the timing),
then each timed round is one step ending in `torch.cuda.synchronize()`.

Figures in `extra_info`: `ms` (median step), `tokens_per_s` (real, non-pad tokens over the median), `TFLOP_per_s`
and `MFU` (model FLOPs, `step_flops`, over the median; MFU divides by the device's matmul peak measured in the same
run, or the `DISTILL_BENCH_PEAK_TFLOPS` constant: `mfu_peak` says which), and on CUDA `peak_mem_MB` (the most memory
the contender held during a step: both models, gradients, optimizer state, activations) and `step_mem_MB` (the part
of it the step itself allocated above what was held between steps).

CUDA: BERT-base teacher → 6-layer DistilBERT student, real shapes with random weights, bf16, (batch, seq len)
(64, 128) and (16, 512): 8192 token positions a step at both lengths. CPU: tiny shapes in fp32, so that
`pytest benchmarks --benchmark-disable` exercises every line in seconds.
"""

import copy
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from benchmarks import record
from benchmarks.common import CUDA, DEVICE
from benchmarks.shapes import dtype_id, shape_id
from engine.checkpoint import to_hf_state
from engine.config import ModelConfig
from engine.loop import autocast, make_optimizer
from engine.masking import mask_tokens
from engine.model import MaskedLM
from engine.objectives import PretrainObjective, device_batch
from engine.options import MaskingOptions, ObjectiveOptions, OptimOptions
from engine.scaler import StepGuard

if CUDA:
    # BERT-base (bert-base-uncased's config.json) and DistilBERT-base (distilbert-base-uncased's).
    TEACHER = dict(model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, max_position_embeddings=512)  # fmt: skip
    STUDENT = dict(model_type="distilbert", vocab_size=30522, dim=768, n_layers=6, n_heads=12, hidden_dim=3072,
                   max_position_embeddings=512)  # fmt: skip
    E2E_SHAPES = [(64, 128), (16, 512)]  # (batch, seq len)
    # Pre-Ampere GPUs have no bf16 matmuls; the engine's fp16 path needs a loss scaler the baseline lacks, so they
    # compare in fp32 (the recorded `precision` says so).
    PRECISION = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
else:
    TEACHER = dict(model_type="bert", vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    STUDENT = dict(model_type="distilbert", vocab_size=512, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                   max_position_embeddings=64)  # fmt: skip
    E2E_SHAPES = [(2, 16)]
    PRECISION = "fp32"
DTYPE = torch.bfloat16 if PRECISION == "bf16" else torch.float32
E2E_PROVIDERS = ["eager", "compile", "ours", "ours_compile"]
WARMUP = 3 if CUDA else 1  # untimed steps before timing (the first one compiles for the compile providers)
ROUNDS = 20 if CUDA else 3
# bert-base-uncased's special tokens: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103 (all below the CPU vocab).
PAD_ID, CLS_ID, SEP_ID, MASK_ID = 0, 101, 102, 103
SPECIAL_IDS = (0, 100, 101, 102, 103)
FIRST_WORD_ID = 104  # random tokens are drawn above the special ids
SEED = 0


# ---- the baseline's loss, as the original code writes it ----------------------------------------------------------


def distiller_loss(s_logits, s_hidden, t_logits, t_hidden, attention_mask, lm_labels, opts: ObjectiveOptions):
    """The triple loss of `Distiller.step` in transformers' examples/research_projects/distillation/distiller.py.

    Line for line as there (default options: KD on all non-pad positions, no MSE term): `masked_select` copies of
    the non-pad rows of both (B, L, V) logits, KLDivLoss(batchmean) on log_softmax(s/T) against softmax(t/T) × T²,
    CrossEntropyLoss(ignore_index=-100) on every position's logits, CosineEmbeddingLoss(target 1) on the non-pad
    rows of the last hidden states.
    """
    T = opts.temperature
    vocab = s_logits.size(-1)
    mask = attention_mask.unsqueeze(-1).expand_as(s_logits).bool()  # (B, L, V)
    s_logits_slct = torch.masked_select(s_logits, mask).view(-1, vocab)  # (N, V): a host sync for N
    t_logits_slct = torch.masked_select(t_logits, mask).view(-1, vocab)  # (N, V)
    loss_ce = nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(s_logits_slct / T, dim=-1), F.softmax(t_logits_slct / T, dim=-1)
    ) * (T**2)
    loss_mlm = nn.CrossEntropyLoss(ignore_index=-100)(s_logits.view(-1, vocab), lm_labels.view(-1))
    dim = s_hidden.size(-1)
    mask = attention_mask.unsqueeze(-1).expand_as(s_hidden).bool()  # (B, L, H)
    s_hidden_slct = torch.masked_select(s_hidden, mask).view(-1, dim)  # (N, H)
    # Under autocast both last hidden states are fp32 (LayerNorm runs in fp32); the cast guards a bf16 teacher
    # used without autocast, which CosineEmbeddingLoss would refuse to mix with an fp32 student.
    t_hidden_slct = torch.masked_select(t_hidden, mask).view(-1, dim).to(s_hidden_slct.dtype)  # (N, H)
    target = s_hidden_slct.new(s_hidden_slct.size(0)).fill_(1)  # (N,)
    loss_cos = nn.CosineEmbeddingLoss(reduction="mean")(s_hidden_slct, t_hidden_slct, target)
    return opts.alpha_ce * loss_ce + opts.alpha_mlm * loss_mlm + opts.alpha_cos * loss_cos


# ---- shared inputs -------------------------------------------------------------------------------------------------


def make_batch(batch: int, seq_len: int, vocab_size: int, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded CPU batch as the length-grouped loader gives it: [CLS] words [SEP] [PAD]…, lengths in [¾L, L].

    Returns:
        input_ids (B, L) int64 and attention_mask (B, L) int64, on the CPU.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3 * seq_len // 4, seq_len + 1, (batch,), generator=g)
    lengths[0] = seq_len  # the batch is as long as its longest sequence
    ids = torch.randint(FIRST_WORD_ID, vocab_size, (batch, seq_len), generator=g)
    pos = torch.arange(seq_len)[None, :]  # (1, L)
    attention_mask = (pos < lengths[:, None]).long()  # (B, L)
    ids[:, 0] = CLS_ID
    ids[torch.arange(batch), lengths - 1] = SEP_ID
    ids = ids.masked_fill(attention_mask == 0, PAD_ID)
    return ids, attention_mask


def step_flops(teacher: ModelConfig, student: ModelConfig, batch: int, seq_len: int, rows: int) -> int:
    """Model FLOPs of one step: student encoder and head forward + backward (3×), teacher encoder and head forward.

    Per token and layer, the forward costs 2·(4H² + 2HI) in the projections and feed-forward matmuls, plus 4·L·H
    in attention (q·kᵀ and p·v); every padded position is counted, as both contenders compute it. The MLM head
    (transform 2H², vocabulary projection 2HV) is counted on the `rows` non-pad positions the recipe needs, although
    the baseline projects the pad positions too. A backward costs twice its forward. Embeddings, norms, softmaxes
    and losses are not matmuls and are not counted (the PaLM paper's MFU convention).
    """

    def encoder(c: ModelConfig) -> int:
        per_token = c.num_layers * (2 * (4 * c.hidden_size**2 + 2 * c.hidden_size * c.intermediate_size))
        per_token += c.num_layers * 4 * seq_len * c.hidden_size
        return batch * seq_len * per_token

    def head(c: ModelConfig) -> int:
        return rows * (2 * c.hidden_size**2 + 2 * c.hidden_size * c.vocab_size)

    return 3 * (encoder(student) + head(student)) + encoder(teacher) + head(teacher)


@functools.cache
def _cpu_models(teacher_hf: tuple, student_hf: tuple) -> tuple[MaskedLM, MaskedLM]:
    """Our randomly initialized teacher and student on the CPU, built once; every contender copies them."""
    t_cfg, s_cfg = ModelConfig.from_hf_dict(dict(teacher_hf)), ModelConfig.from_hf_dict(dict(student_hf))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return MaskedLM(t_cfg), MaskedLM(s_cfg)


def _to_transformers(model: MaskedLM) -> nn.Module:
    """The `transformers` *ForMaskedLM holding the same weights as our `model` (CPU, fp32)."""
    d = model.config.to_hf_dict("mlm")
    config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    hf = transformers.AutoModelForMaskedLM.from_config(config)
    result = hf.load_state_dict(to_hf_state(model), strict=False)
    # A tied decoder weight is the embedding table itself: to_hf_state leaves it out, as transformers saves it.
    tied = {"cls.predictions.decoder.weight", "vocab_projector.weight"}
    assert not result.unexpected_keys and set(result.missing_keys) <= tied, result
    return hf


# ---- contenders ----------------------------------------------------------------------------------------------------


@dataclass
class Contender:
    """One provider's distillation step, split so that a test can compare losses before stepping."""

    loss: Callable[[], torch.Tensor]  # batch to device, masking, both forwards, the triple loss (0-dim fp32)
    update: Callable[[], None]  # clip, optimizer step, zero_grad
    student: nn.Module
    info: dict = field(default_factory=dict)

    def step(self) -> None:
        self.loss().backward()
        self.update()


def setup_e2e(
    provider: str,
    shape: tuple[int, int],
    device: str = DEVICE,
    precision: str = PRECISION,
    teacher_hf: dict = TEACHER,
    student_hf: dict = STUDENT,
) -> Contender:
    """Build `provider`'s models, optimizer and step on `device` for a (batch, seq len) batch."""
    device = torch.device(device)
    batch, seq_len = shape
    cpu_teacher, cpu_student = _cpu_models(tuple(teacher_hf.items()), tuple(student_hf.items()))
    vocab = cpu_student.config.vocab_size
    input_ids, attention_mask = make_batch(batch, seq_len, vocab)
    # The teacher's weights in the compute dtype, without an fp32 master (DESIGN step 3; `distill pretrain` does so).
    t_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    masking, objective_opts, optim_opts = MaskingOptions(), ObjectiveOptions(), OptimOptions()
    special_ids = torch.tensor(SPECIAL_IDS, device=device)
    generator = torch.Generator(device=device).manual_seed(SEED)
    info = {"precision": precision, "tokens": int(attention_mask.sum()), "batch": batch, "seq_len": seq_len}

    if provider in ("ours", "ours_compile"):
        teacher = copy.deepcopy(cpu_teacher).to(device=device, dtype=t_dtype).eval().requires_grad_(False)
        student = copy.deepcopy(cpu_student).to(device).train()
        # The data pipeline guarantees the id range; the check would read ids back to the host every step.
        teacher.encoder.validate_inputs = student.encoder.validate_inputs = False
        if provider == "ours_compile":
            teacher.encoder, student.encoder = torch.compile(teacher.encoder), torch.compile(student.encoder)
        objective = PretrainObjective(teacher, student, objective_opts, masking, special_ids, MASK_ID, None, generator)
        guard = StepGuard(make_optimizer(student.parameters(), optim_opts, device), None, optim_opts.clip)

        def loss() -> torch.Tensor:
            b = device_batch(input_ids, attention_mask, device)
            with autocast(device, precision):
                return objective(b)[0]

        return Contender(loss, guard.step, student, info)

    if provider not in ("eager", "compile"):
        raise ValueError(f"unknown provider {provider!r}")
    teacher = _to_transformers(cpu_teacher).to(device=device, dtype=t_dtype).eval().requires_grad_(False)
    student = _to_transformers(cpu_student).to(device).train()
    info["attn_implementation"] = student.config._attn_implementation
    if provider == "compile":
        teacher, student = torch.compile(teacher), torch.compile(student)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, optim_opts, device)

    def loss() -> torch.Tensor:
        ids, attn = input_ids.to(device), attention_mask.to(device)
        masked, labels = mask_tokens(
            ids, attn, special_ids, MASK_ID, vocab, mlm_probability=masking.mlm_probability,
            mask_replace=masking.mask_replace, random_replace=masking.random_replace, generator=generator,
        )  # fmt: skip
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            s = student(input_ids=masked, attention_mask=attn, output_hidden_states=True)
            with torch.no_grad():
                t = teacher(input_ids=masked, attention_mask=attn, output_hidden_states=True)
            return distiller_loss(
                s.logits, s.hidden_states[-1], t.logits, t.hidden_states[-1], attn, labels, objective_opts
            )

    def update() -> None:
        nn.utils.clip_grad_norm_(params, optim_opts.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Contender(loss, update, student, info)


# ---- the benchmark ---------------------------------------------------------------------------------------------------


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("shape", E2E_SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", E2E_PROVIDERS)
def test_e2e(benchmark, provider, shape):
    benchmark.group = f"e2e-step-{shape_id(shape)}-{dtype_id(DTYPE)}"
    if provider.endswith("compile") and not CUDA:
        pytest.skip("torch.compile is measured on CUDA only (compiling on CPU is too slow for CI)")
    # The device's matmul peak (MFU's denominator) is measured once, before any contender holds memory.
    peak = None if benchmark.disabled else record.device_info()["matmul"]
    held_before = torch.cuda.memory_allocated() if CUDA else 0
    try:
        contender = setup_e2e(provider, shape)
        t0 = time.perf_counter()
        for _ in range(WARMUP):
            contender.step()
        _sync()
        warmup_s = time.perf_counter() - t0

        def target():
            contender.step()
            _sync()

        benchmark.pedantic(target, rounds=ROUNDS, iterations=1, warmup_rounds=0)
        if benchmark.disabled:  # a smoke run: one step was enough
            return
        extra = benchmark.extra_info
        extra.update(contender.info, warmup_steps=WARMUP, warmup_s=warmup_s)
        median = benchmark.stats.stats.median
        t_cfg = ModelConfig.from_hf_dict(TEACHER)
        s_cfg = ModelConfig.from_hf_dict(STUDENT)
        flops = step_flops(t_cfg, s_cfg, *shape, rows=contender.info["tokens"])
        extra.update(
            ms=median * 1e3,
            tokens_per_s=contender.info["tokens"] / median,
            flops=flops,
            TFLOP_per_s=flops / median / 1e12,
            MFU=flops / median / 1e12 / peak["TFLOP_per_s"],
            mfu_peak={k: peak[k] for k in ("TFLOP_per_s", "dtype", "source")},
            teacher=TEACHER,
            student=STUDENT,
        )
        if CUDA:
            torch.cuda.synchronize()
            held_between = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            contender.step()
            torch.cuda.synchronize()
            peak_bytes = torch.cuda.max_memory_allocated()
            extra["peak_mem_MB"] = (peak_bytes - held_before) / 2**20
            extra["step_mem_MB"] = (peak_bytes - held_between) / 2**20
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{provider} at {shape_id(shape)} does not fit in device memory")


# ---- fairness: the baseline computes the same recipe ---------------------------------------------------------------


def test_baseline_matches_engine():
    """Same weights, same batch, same masks: the `transformers` + `torch.nn.functional` baseline and our engine give
    the same loss and the same gradient norm (tiny models, fp32, dropout off), so the benchmark times one recipe."""
    tiny_t = dict(model_type="bert", vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    tiny_s = dict(model_type="distilbert", vocab_size=512, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                  max_position_embeddings=64)  # fmt: skip
    results = {}
    for provider in ("eager", "ours"):
        c = setup_e2e(provider, (2, 16), device="cpu", precision="fp32", teacher_hf=tiny_t, student_hf=tiny_s)
        c.student.eval()  # dropout off, so that both compute the same function
        loss = c.loss()
        loss.backward()
        grads = [p.grad for p in c.student.parameters() if p.grad is not None]
        results[provider] = (loss.detach(), torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    torch.testing.assert_close(results["ours"][0], results["eager"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results["ours"][1], results["eager"][1], rtol=1e-3, atol=1e-6)
