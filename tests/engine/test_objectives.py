"""The objectives against the DistilBERT distiller's own formulas in torch.nn.functional."""

import copy

import pytest
import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.model import MaskedLM
from engine.objectives import PretrainObjective, classification_kd_loss, device_batch, qa_kd_loss
from engine.options import MaskingOptions, ObjectiveOptions

V = 97


def _model(arch, layers, seed):
    torch.manual_seed(seed)
    d = {"model_type": arch, "vocab_size": V, "max_position_embeddings": 32}
    if arch == "bert":
        d.update(hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32)
    else:
        d.update(dim=16, n_layers=layers, n_heads=2, hidden_dim=32)
    model = MaskedLM(ModelConfig.from_hf_dict(d)).eval()  # eval: no dropout, so two passes agree
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # peaked, distinct distributions
    return model


def _batch():
    ids = torch.randint(5, V, (3, 16))
    ids[:, 0] = 1  # [CLS]
    attn = torch.ones_like(ids)
    attn[1, 11:] = 0
    attn[2, 6:] = 0
    ids[attn == 0] = 0
    return ids, attn


def _distiller_loss(teacher, student, ids, labels, attn, o: ObjectiveOptions):
    """The original `distiller.py` step, with materialized logits."""
    pad = attn.bool()
    with torch.no_grad():
        t_h = teacher.encoder(ids, attn).last_hidden_state
        t_logits = teacher.lm_head(t_h)
    s_h = student.encoder(ids, attn).last_hidden_state
    s_logits = student.lm_head(s_h)
    sel = pad & (labels != -100) if o.restrict_ce_to_mask else pad
    kd = F.kl_div(
        F.log_softmax(s_logits[sel] / o.temperature, -1), F.softmax(t_logits[sel] / o.temperature, -1),
        reduction="batchmean",
    ) * o.temperature**2  # fmt: skip
    mlm = F.cross_entropy(s_logits.view(-1, V), labels.view(-1), ignore_index=-100)
    cos = F.cosine_embedding_loss(s_h[pad], t_h[pad], torch.ones(int(pad.sum())))
    return o.alpha_ce * kd + o.alpha_mlm * mlm + o.alpha_cos * cos, {"kd": kd, "mlm": mlm, "cos": cos}


@pytest.mark.parametrize(
    "opts",
    [
        ObjectiveOptions(),
        ObjectiveOptions(restrict_ce_to_mask=True),
        ObjectiveOptions(fused_head=False, temperature=4.0),
        ObjectiveOptions(alpha_cos=0.0, alpha_mlm=0.0),  # ablations switch terms off
        ObjectiveOptions(alpha_ce=0.0, alpha_cos=0.0),
    ],
    ids=["recipe", "restrict", "unfused-T4", "kd-only", "mlm-only"],
)
def test_pretrain_objective_equals_the_distiller(opts):
    teacher = _model("bert", 4, seed=1).requires_grad_(False)
    student = _model("distilbert", 2, seed=2)
    reference_student = copy.deepcopy(student)
    ids, attn = _batch()
    special = torch.tensor([0, 1, 2, 3, 4])
    gen = torch.Generator().manual_seed(7)
    objective = PretrainObjective(teacher, student, opts, MaskingOptions(mlm_probability=0.3), special, 4, None, gen)
    batch = device_batch(ids, attn, torch.device("cpu"))
    state = gen.get_state()
    loss, terms = objective(batch)
    gen.set_state(state)
    masked, labels = objective.mask(batch)
    assert (labels != -100).any()
    ref_loss, ref_terms = _distiller_loss(teacher, reference_student, masked, labels, attn, opts)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for k, v in ref_terms.items():
        if getattr(opts, {"kd": "alpha_ce", "mlm": "alpha_mlm", "cos": "alpha_cos"}[k]) > 0:
            torch.testing.assert_close(terms[k], v.detach(), rtol=1e-5, atol=1e-5)
    loss.backward()
    ref_loss.backward()
    ref_params = dict(reference_student.named_parameters())
    for name, p in student.named_parameters():
        r = ref_params[name].grad
        if r is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            torch.testing.assert_close(p.grad, r, rtol=1e-4, atol=1e-6, msg=name)


def test_cosine_needs_equal_widths():
    teacher = _model("bert", 2, seed=1)
    d = {"model_type": "distilbert", "vocab_size": V, "dim": 8, "n_layers": 1, "n_heads": 2, "hidden_dim": 16}
    narrow = MaskedLM(ModelConfig.from_hf_dict(d))
    with pytest.raises(ValueError, match="equal hidden sizes"):
        PretrainObjective(teacher, narrow, ObjectiveOptions(), MaskingOptions(), torch.tensor([0]), 4, None, None)
    with pytest.raises(ValueError, match="switched off"):
        PretrainObjective(
            teacher, narrow, ObjectiveOptions(alpha_ce=0, alpha_mlm=0, alpha_cos=0), MaskingOptions(),
            torch.tensor([0]), 4, None, None,
        )  # fmt: skip


@pytest.mark.parametrize("alpha, T", [(0.5, 2.0), (0.1, 4.0)])
def test_classification_kd_loss(alpha, T):
    s = torch.randn(6, 5, requires_grad=True)
    t = torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    ours, terms = classification_kd_loss(s, t, y, alpha, T)
    ref = alpha * F.cross_entropy(s, y) + (1 - alpha) * T * T * F.kl_div(
        F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean"
    )
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(s, y).detach(), rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(ours, s)
    (r,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_qa_kd_loss_excludes_padding():
    B, L, T = 3, 12, 2.0
    attn = torch.ones(B, L, dtype=torch.long)
    attn[1, 8:] = 0
    ss, se = torch.randn(B, L, requires_grad=True), torch.randn(B, L, requires_grad=True)
    ts, te = torch.randn(B, L), torch.randn(B, L)
    ys, ye = torch.tensor([1, 2, 0]), torch.tensor([3, 5, 0])
    loss, terms = qa_kd_loss(ss, se, ts, te, ys, ye, attn, alpha_qa=0.5, alpha_ce=0.5, temperature=T)

    def kd(s, t):  # pads removed row by row: the independent meaning of "excluded"
        real = attn.bool()
        rows = [
            F.kl_div(F.log_softmax(s[b, real[b]] / T, -1), F.softmax(t[b, real[b]] / T, -1), reduction="sum")
            for b in range(B)
        ]
        return torch.stack(rows).mean() * T * T

    def ce(s, y):
        return F.cross_entropy(s.masked_fill(attn == 0, float("-inf")), y)

    ref = 0.5 * (ce(ss, ys) + ce(se, ye)) / 2 + 0.5 * (kd(ss, ts) + kd(se, te)) / 2
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["kd"], ((kd(ss, ts) + kd(se, te)) / 2).detach(), rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(loss, (ss, se))
    r = torch.autograd.grad(ref, (ss, se))
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not a[1, 8:].any()  # no gradient reaches padding
