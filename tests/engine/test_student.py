"""engine/student.py: layer selection and student initialization, checked against an independent computation:
the teacher run in `transformers` with its chosen layers applied by hand, one after the other."""

import json

import pytest
import torch
import transformers

from engine.checkpoint import has_mlm_head, load_model
from engine.config import UnsupportedModelError
from engine.student import build_student_state, init_student, select_layers
from tests.engine.test_model import hf_model, padded_batch, save_hf

FP32 = dict(atol=1e-5, rtol=0)

# ---- select_layers -------------------------------------------------------------------------------------------------


def test_default_is_distilberts_choice():
    assert select_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert select_layers(12) == [0, 2, 4, 7, 9, 11]  # half the teacher by default


@pytest.mark.parametrize(
    "t,s,expected",
    [(6, 3, [0, 3, 5]), (24, 6, [0, 5, 9, 14, 18, 23]), (4, 3, [0, 2, 3]), (5, 5, [0, 1, 2, 3, 4]), (6, 1, [0])],
)
def test_even_spread_includes_first_and_last(t, s, expected):
    assert select_layers(t, s) == expected


def test_explicit_layers_validated():
    assert select_layers(12, None, [1, 5, 11]) == [1, 5, 11]
    assert select_layers(12, 3, (1, 5, 11)) == [1, 5, 11]
    with pytest.raises(ValueError, match=r"layer indices \[12\] are out of range: the teacher has 12 layers \(0..11\)"):
        select_layers(12, None, [0, 12])
    with pytest.raises(ValueError, match=r"layer indices \[-1\] are out of range"):
        select_layers(12, None, [-1, 3])
    with pytest.raises(ValueError, match="strictly increasing"):
        select_layers(12, None, [4, 2])
    with pytest.raises(ValueError, match="strictly increasing"):
        select_layers(12, None, [2, 2])
    with pytest.raises(ValueError, match=r"2 layers chosen \(\[0, 1\]\) for a student of 3 layers"):
        select_layers(12, 3, [0, 1])
    with pytest.raises(ValueError, match="cannot be taken from a teacher of 6 layers"):
        select_layers(6, 7)
    with pytest.raises(ValueError, match="empty"):
        select_layers(6, None, [])


# ---- the independent reference -------------------------------------------------------------------------------------


def _additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 → (B, 1, 1, L) additive mask, as transformers' eager attention takes it."""
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


@torch.no_grad()
def teacher_layers_reference(teacher, layers, ids, mask, types=None, drop_token_type=True):
    """Teacher embeddings (token-type row 0 zeroed when the student drops the table), then teacher layers
    `layers` applied in sequence with transformers' own modules; returns the hidden state and, if the teacher has
    an MLM head, its logits."""
    base = teacher.bert if hasattr(teacher, "bert") else teacher
    tt = base.embeddings.token_type_embeddings.weight
    saved = tt.clone()
    if drop_token_type:
        tt.zero_()
    h = base.embeddings(input_ids=ids, token_type_ids=types)
    tt.copy_(saved)
    for i in layers:
        h = base.encoder.layer[i](h, _additive_mask(mask))
        h = h[0] if isinstance(h, tuple) else h
    logits = teacher.cls(h) if hasattr(teacher, "cls") else None
    return h, logits


def _eager(model):
    model.config._attn_implementation = "eager"
    return model


# ---- BERT → DistilBERT ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_student(minilm_dir, tmp_path_factory):
    """A 3-layer DistilBERT student of the real all-MiniLM-L6-v2 (no MLM head), with its teacher."""
    out = init_student(minilm_dir, tmp_path_factory.mktemp("student") / "s")
    teacher = _eager(transformers.BertModel.from_pretrained(minilm_dir)).eval()
    return out, teacher


@pytest.mark.slow
def test_minilm_to_distilbert_equals_selected_teacher_layers(minilm_student, minilm_dir):
    out, teacher = minilm_student
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "distilbert" and config["n_layers"] == 3
    assert config["architectures"] == ["DistilBertModel"]
    assert not has_mlm_head(out)  # the teacher had none
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (minilm_dir / name).read_bytes()

    ids, mask, _ = padded_batch(30522, lengths=(12, 5))
    expected, _ = teacher_layers_reference(teacher, [0, 3, 5], ids, mask)
    hf_student, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert type(hf_student) is transformers.DistilBertModel and not info["missing_keys"]
    ours, _ = load_model(out, head=None)
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(hf_student(input_ids=ids, attention_mask=mask)[0][real], expected[real], **FP32)
        torch.testing.assert_close(ours(ids, mask).last_hidden_state[real], expected[real], **FP32)


def test_bert_mlm_to_distilbert_maps_the_head(tmp_path):
    """A 12-layer BERT MLM teacher → the default 6-layer DistilBERT student; logits equal the reference's."""
    teacher = _eager(hf_model("bert", "mlm", num_hidden_layers=12, hidden_act="gelu_new"))
    out = init_student(save_hf(teacher, tmp_path / "teacher"), tmp_path / "student")
    student, info = transformers.DistilBertForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert student.config.n_layers == 6 and student.config.activation == "gelu_new"
    ids, mask, _ = padded_batch(97)
    h, logits = teacher_layers_reference(teacher, [0, 2, 4, 7, 9, 11], ids, mask)
    with torch.no_grad():
        got = student.eval()(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], logits[real], **FP32)
    torch.testing.assert_close(student.vocab_projector.bias, teacher.cls.predictions.decoder.bias, atol=0, rtol=0)
    torch.testing.assert_close(
        student.vocab_transform.weight, teacher.cls.predictions.transform.dense.weight, atol=0, rtol=0
    )


def test_fold_token_type_keeps_segment_zero_outputs(tmp_path):
    teacher = _eager(hf_model("bert", "mlm", num_hidden_layers=4))
    out = init_student(save_hf(teacher, tmp_path / "t"), tmp_path / "s", layers=[1, 3], fold_token_type=True)
    ours, _ = load_model(out, head="mlm")
    ids, mask, _ = padded_batch(97)
    _, logits = teacher_layers_reference(teacher, [1, 3], ids, mask, drop_token_type=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask).logits[mask.bool()], logits[mask.bool()], **FP32)


def test_untied_teacher_decoder_is_copied(tmp_path):
    teacher = _eager(hf_model("bert", "mlm", num_hidden_layers=4, tie_word_embeddings=False))
    out = init_student(save_hf(teacher, tmp_path / "t"), tmp_path / "s", num_layers=2)
    ours, _ = load_model(out, head="mlm")
    assert not ours.config.tie_word_embeddings
    torch.testing.assert_close(ours.decoder_weight, teacher.cls.predictions.decoder.weight, atol=0, rtol=0)
    ids, mask, _ = padded_batch(97)
    _, logits = teacher_layers_reference(teacher, [0, 3], ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask).logits[mask.bool()], logits[mask.bool()], **FP32)


# ---- BERT → BERT, DistilBERT → DistilBERT --------------------------------------------------------------------------


def test_bert_to_shallower_bert_keeps_token_types(tmp_path):
    teacher = _eager(hf_model("bert", "mlm", num_hidden_layers=5))
    out = init_student(save_hf(teacher, tmp_path / "t"), tmp_path / "s", layers=[0, 2, 4], arch="bert")
    student, info = transformers.BertForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and student.config.num_hidden_layers == 3
    ids, mask, types = padded_batch(97)
    _, logits = teacher_layers_reference(teacher, [0, 2, 4], ids, mask, types, drop_token_type=False)
    with torch.no_grad():
        got = student.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    torch.testing.assert_close(got[mask.bool()], logits[mask.bool()], **FP32)


def test_distilbert_to_shallower_distilbert(tmp_path):
    teacher = hf_model("distilbert", "mlm", n_layers=4)
    out = init_student(save_hf(teacher, tmp_path / "t"), tmp_path / "s", num_layers=2)
    ours, _ = load_model(out, head="mlm")
    ids, mask, _ = padded_batch(97)
    with torch.no_grad():
        h = teacher.distilbert.embeddings(ids)
        for i in [0, 3]:
            h = teacher.distilbert.transformer.layer[i](h, _additive_mask(mask))
        logits = teacher.vocab_projector(teacher.vocab_layer_norm(teacher.activation(teacher.vocab_transform(h))))
        torch.testing.assert_close(ours(ids, mask).logits[mask.bool()], logits[mask.bool()], **FP32)


def test_distilbert_teacher_cannot_seed_a_bert_student(tmp_path):
    path = save_hf(hf_model("distilbert", "mlm"), tmp_path / "t")
    with pytest.raises(UnsupportedModelError, match="DistilBERT teacher can only seed a DistilBERT student"):
        init_student(path, tmp_path / "s", arch="bert")


def test_bad_layers_fail_before_writing(tmp_path):
    path = save_hf(hf_model("bert", "mlm", num_hidden_layers=4), tmp_path / "t")
    with pytest.raises(ValueError, match=r"layer indices \[4\] are out of range: the teacher has 4 layers"):
        init_student(path, tmp_path / "s", layers=[0, 4])
    assert not (tmp_path / "s").exists()


def test_missing_teacher_and_overwriting_the_teacher(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        init_student(tmp_path / "nowhere", tmp_path / "s")
    path = save_hf(hf_model("bert", "mlm"), tmp_path / "t")
    with pytest.raises(ValueError, match="would replace the teacher"):
        init_student(path, path)


def test_eps_other_than_distilberts_warns(tmp_path):
    path = save_hf(hf_model("bert", None, layer_norm_eps=1e-5), tmp_path / "t")
    with pytest.warns(UserWarning, match="LayerNorm epsilon"):
        init_student(path, tmp_path / "s", num_layers=1)


def test_build_student_state_is_a_renumbering():
    torch.manual_seed(0)
    state = {
        "encoder.embeddings.word_embeddings.weight": torch.randn(5, 2),
        "encoder.embeddings.token_type_embeddings.weight": torch.randn(2, 2),
        "encoder.embeddings.position_embeddings.weight": torch.randn(4, 2),
        "encoder.layers.0.ffn.lin1.weight": torch.randn(1),
        "encoder.layers.1.ffn.lin1.weight": torch.randn(1),
        "encoder.layers.2.ffn.lin1.weight": torch.randn(1),
        "lm_head.dense.weight": torch.randn(2, 2),
        "pooler.weight": torch.randn(2, 2),
    }
    out = build_student_state(state, [0, 2])
    assert sorted(out) == [
        "encoder.embeddings.position_embeddings.weight",
        "encoder.embeddings.word_embeddings.weight",
        "encoder.layers.0.ffn.lin1.weight",
        "encoder.layers.1.ffn.lin1.weight",
        "lm_head.dense.weight",
    ]
    assert out["encoder.layers.1.ffn.lin1.weight"] is state["encoder.layers.2.ffn.lin1.weight"]
    folded = build_student_state(state, [0], fold_token_type=True)
    torch.testing.assert_close(
        folded["encoder.embeddings.position_embeddings.weight"],
        state["encoder.embeddings.position_embeddings.weight"]
        + state["encoder.embeddings.token_type_embeddings.weight"][0],
    )
    assert "encoder.embeddings.token_type_embeddings.weight" in build_student_state(state, [0], arch="bert")
