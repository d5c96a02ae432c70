"""engine/config.py and engine/model.py against `transformers` as the oracle.

Tiny checkpoints are built with `transformers`, every parameter randomized (transformers' init leaves biases at 0
and LayerNorms at 1, which would hide a swapped weight/bias), saved, and loaded by both. The real all-MiniLM-L6-v2
weights check the same on a trained model. Batches are padded to different lengths; token-level outputs are
compared on real (non-pad) positions only.
"""

import pytest
import torch
import transformers

from engine.checkpoint import load_model
from engine.config import ModelConfig, UnsupportedModelError
from engine.model import Encoder, MaskedLM, QuestionAnswerer, SequenceClassifier, build_model, sinusoidal_table

FP32 = dict(atol=1e-5, rtol=0)
U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significand bits)

# ---- helpers shared with test_checkpoint.py and test_student.py ----------------------------------------------------


def bert_config(**kw) -> transformers.BertConfig:
    base = dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=24, type_vocab_size=2,
    )  # fmt: skip
    return transformers.BertConfig(**{**base, **kw})


def distilbert_config(**kw) -> transformers.DistilBertConfig:
    base = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=24)
    return transformers.DistilBertConfig(**{**base, **kw})


HF_CLASSES = {
    ("bert", None): transformers.BertModel,
    ("bert", "mlm"): transformers.BertForMaskedLM,
    ("bert", "classification"): transformers.BertForSequenceClassification,
    ("bert", "qa"): transformers.BertForQuestionAnswering,
    ("distilbert", None): transformers.DistilBertModel,
    ("distilbert", "mlm"): transformers.DistilBertForMaskedLM,
    ("distilbert", "classification"): transformers.DistilBertForSequenceClassification,
    ("distilbert", "qa"): transformers.DistilBertForQuestionAnswering,
}


@torch.no_grad()
def randomize_(model: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Give every parameter random values so that each one changes the outputs (LayerNorm gains near 1)."""
    for name, p in model.named_parameters():
        if "LayerNorm" in name or "layer_norm" in name:
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
        elif "position_embeddings" in name and getattr(model.config, "sinusoidal_pos_embds", False):
            continue  # a fixed table
        else:
            p.copy_(scale * torch.randn_like(p))
    return model


def hf_model(arch: str, head: str | None, **kw) -> torch.nn.Module:
    """A randomized tiny `transformers` model in eval mode."""
    config = (bert_config if arch == "bert" else distilbert_config)(**kw)
    torch.manual_seed(1)
    return randomize_(HF_CLASSES[(arch, head)](config)).eval()


def save_hf(model: torch.nn.Module, path) -> str:
    model.save_pretrained(path)
    return str(path)


def padded_batch(vocab_size: int, lengths=(11, 7, 3), seed: int = 0, token_types: bool = True):
    """input_ids (B, L) padded with 0, attention_mask (B, L) 0/1, token_type_ids (B, L) with a second segment."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(1, vocab_size, (len(lengths), L), generator=g)
    mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    types = ((torch.arange(L)[None, :] >= torch.tensor(lengths)[:, None] // 2) & mask.bool()).long()
    return ids, mask, (types if token_types else None)


# ---- parity with transformers: tiny checkpoints, every head of both architectures ---------------------------------

CASES = [
    ("bert", None, {}),
    ("bert", "mlm", {}),
    ("bert", "mlm", dict(hidden_act="gelu_new", tie_word_embeddings=False)),
    ("bert", "mlm", dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-5)),
    ("bert", "classification", dict(num_labels=3, hidden_act="relu")),
    ("bert", "qa", {}),
    ("distilbert", None, dict(sinusoidal_pos_embds=True)),
    ("distilbert", "mlm", {}),
    ("distilbert", "mlm", dict(sinusoidal_pos_embds=True, activation="gelu_new")),
    ("distilbert", "classification", dict(num_labels=5, activation="quick_gelu")),
    ("distilbert", "qa", dict(activation="gelu_pytorch_tanh")),
]


def _outputs(arch, head, out, hf: bool):
    """(last hidden state, head tensors) from either model's output."""
    if head is None:
        return out.last_hidden_state, []
    if head == "mlm":
        return (out.hidden_states[-1] if hf else out.last_hidden_state), [out.logits]
    if head == "classification":
        return (out.hidden_states[-1] if hf else out.last_hidden_state), [out.logits]
    return (out.hidden_states[-1] if hf else out.last_hidden_state), [out.start_logits, out.end_logits]


@pytest.mark.parametrize("arch,head,kw", CASES, ids=[f"{a}-{h}-{'-'.join(map(str, k.values()))}" for a, h, k in CASES])
def test_parity_with_transformers(tmp_path, arch, head, kw):
    ref = hf_model(arch, head, **kw)
    ours, report = load_model(save_hf(ref, tmp_path), head=head)
    assert report.initialized == []
    assert all(k.startswith("pooler.") for k in report.unused)  # BertModel's pooler serves classification only
    ids, mask, types = padded_batch(ref.config.vocab_size, token_types=arch == "bert")
    extra = {"token_type_ids": types} if arch == "bert" else {}
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True, **extra)
        got = ours(ids, mask, types, output_hidden_states=True)
    real = mask.bool()
    h_ref, heads_ref = _outputs(arch, head, expected, hf=True)
    h_got, heads_got = _outputs(arch, head, got, hf=False)
    torch.testing.assert_close(h_got[real], h_ref[real], **FP32)
    assert len(got.hidden_states) == len(expected.hidden_states) == ref.config.num_hidden_layers + 1
    for a, b in zip(got.hidden_states, expected.hidden_states):
        torch.testing.assert_close(a[real], b[real], **FP32)
    for a, b in zip(heads_got, heads_ref):
        if a.dim() >= 2 and a.shape[:2] == real.shape:  # token-level outputs: real positions only
            a, b = a[real], b[real]
        torch.testing.assert_close(a, b, **FP32)


@pytest.mark.slow
def test_minilm_parity_real_weights(minilm_dir):
    """all-MiniLM-L6-v2 (a trained BERT) on real tokenized text pairs of different lengths."""
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    ref = transformers.BertModel.from_pretrained(minilm_dir).eval()
    ours, _ = load_model(minilm_dir, head=None)
    enc = tok(
        ["A short one.", "Distillation compresses a large teacher into a small student, keeping most of its skill."],
        ["With a second segment.", "Token types matter here"],
        padding=True, return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        expected = ref(**enc).last_hidden_state
        got = ours(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).last_hidden_state
    real = enc["attention_mask"].bool()
    assert real.sum() < real.numel()  # the batch is padded
    torch.testing.assert_close(got[real], expected[real], **FP32)


# ---- bf16 ----------------------------------------------------------------------------------------------------------
# Rule (Cut Cross-Entropy's): |ours_bf16 − truth| ≤ |transformers_bf16 − truth| + margin, truth = transformers fp32.
# Each of the num_layers + 1 LayerNorm-normalized stages rounds its output to bf16 (relative error ≤ u = 2^-8), and
# two implementations that round in different places can each be off by up to one u·scale per stage, where scale is
# max |truth|; the margin allows that: u · scale · (num_layers + 1).


def _bf16_errors(ref, ours, ids, mask, types):
    real = mask.bool()
    kw = {} if types is None else {"token_type_ids": types}
    with torch.no_grad():
        truth = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw).hidden_states[-1][real]
        ref_bf16 = ref.to(torch.bfloat16)
        theirs = ref_bf16(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw).hidden_states[-1]
        mine = ours(ids, mask, types).last_hidden_state
    assert mine.dtype == torch.bfloat16
    err_ours = (mine[real].float() - truth).abs().max().item()
    err_theirs = (theirs[real].float() - truth).abs().max().item()
    return err_ours, err_theirs, truth.abs().max().item()


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_bf16_parity_tiny(tmp_path, arch):
    ref = hf_model(arch, None)
    ours, _ = load_model(save_hf(ref, tmp_path), head=None, dtype=torch.bfloat16)
    ids, mask, types = padded_batch(ref.config.vocab_size, token_types=arch == "bert")
    err_ours, err_theirs, scale = _bf16_errors(ref, ours, ids, mask, types)
    assert err_ours <= err_theirs + U_BF16 * scale * (ref.config.num_hidden_layers + 1)


@pytest.mark.slow
def test_bf16_parity_minilm(minilm_dir):
    ref = transformers.BertModel.from_pretrained(minilm_dir).eval()
    ours, _ = load_model(minilm_dir, head=None, dtype=torch.bfloat16)
    ids, mask, types = padded_batch(30522, lengths=(16, 9), token_types=True)
    err_ours, err_theirs, scale = _bf16_errors(ref, ours, ids, mask, types)
    assert err_ours <= err_theirs + U_BF16 * scale * (ref.config.num_hidden_layers + 1)


# ---- the pieces the training loop uses ------------------------------------------------------------------------------


def _tiny(arch="bert", **kw) -> ModelConfig:
    d = (bert_config if arch == "bert" else distilbert_config)(**kw).to_dict()
    return ModelConfig.from_hf_dict(d)


def test_fused_head_path_equals_logits():
    """encoder → rows → lm_head.transform → linear(decoder_weight, decoder_bias) is the forward's logits."""
    model = randomize_(MaskedLM(_tiny())).eval()
    ids, mask, types = padded_batch(97)
    with torch.no_grad():
        out = model(ids, mask, types)
        h = model.encoder(ids, mask, types).last_hidden_state
        rows = h[mask.bool()]  # (N, H)
        logits = torch.nn.functional.linear(model.lm_head.transform(rows), model.decoder_weight, model.decoder_bias)
    torch.testing.assert_close(logits, out.logits[mask.bool()], atol=0, rtol=0)
    assert model.decoder_weight is model.encoder.embeddings.word_embeddings.weight
    assert model.decoder_bias.shape == (97,)


def test_fresh_init_matches_transformers_scheme():
    config = _tiny(initializer_range=0.05)
    model = MaskedLM(config)
    emb = model.encoder.embeddings
    assert torch.all(emb.word_embeddings.weight[config.pad_token_id] == 0)
    assert model.decoder_weight is emb.word_embeddings.weight  # tied, not redrawn
    layer = model.encoder.layers[0]
    assert torch.all(layer.sa_layer_norm.weight == 1) and torch.all(layer.sa_layer_norm.bias == 0)
    assert torch.all(layer.attention.q_lin.bias == 0) and torch.all(model.decoder_bias == 0)
    assert abs(layer.ffn.lin1.weight.std().item() - 0.05) < 0.01
    cls = SequenceClassifier(config)
    assert torch.all(cls.classifier.bias == 0) and abs(cls.pooler.weight.std().item() - 0.05) < 0.01


def test_sinusoidal_table_matches_transformers_and_is_frozen():
    from transformers.models.distilbert.modeling_distilbert import create_sinusoidal_embeddings

    expected = create_sinusoidal_embeddings(24, 32, torch.empty(24, 32))
    torch.testing.assert_close(sinusoidal_table(24, 32), expected, atol=0, rtol=0)
    model = Encoder(_tiny("distilbert", sinusoidal_pos_embds=True))
    assert not model.embeddings.position_embeddings.weight.requires_grad
    torch.testing.assert_close(model.embeddings.position_embeddings.weight, expected, atol=0, rtol=0)


@pytest.mark.parametrize("head", [None, "mlm", "classification", "qa"])
def test_heads_shapes_and_backward(head):
    config = _tiny("distilbert", num_labels=4)
    model = build_model(config, head).train()
    ids, mask, _ = padded_batch(97)
    out = model(ids, mask)
    B, L = ids.shape
    first = out[0]
    expected = {None: (B, L, 32), "mlm": (B, L, 97), "classification": (B, 4), "qa": (B, L)}[head]
    assert first.shape == expected
    assert out.hidden_states is None
    first.float().pow(2).mean().backward()
    assert model.encoder.embeddings.word_embeddings.weight.grad is not None if head else True


def test_train_mode_uses_dropout_and_eval_is_deterministic():
    model = Encoder(_tiny(hidden_dropout_prob=0.5))
    ids, mask, _ = padded_batch(97)
    model.train()
    a, b = model(ids, mask).last_hidden_state, model(ids, mask).last_hidden_state
    assert not torch.equal(a, b)
    model.eval()
    torch.testing.assert_close(model(ids, mask).last_hidden_state, model(ids, mask).last_hidden_state, atol=0, rtol=0)


def test_fully_padded_row_stays_finite():
    model = Encoder(_tiny()).eval()
    ids, mask, _ = padded_batch(97)
    mask[2] = 0
    assert torch.isfinite(model(ids, mask).last_hidden_state).all()


def test_qa_forces_two_outputs(tmp_path):
    ours, _ = load_model(save_hf(hf_model("bert", "classification", num_labels=3), tmp_path), head="qa")
    assert isinstance(ours, QuestionAnswerer) and ours.config.num_labels == 2
    assert ours.qa_outputs.weight.shape == (2, 32)


# ---- bad inputs ----------------------------------------------------------------------------------------------------


def test_input_ids_out_of_vocabulary():
    model = Encoder(_tiny())
    ids, mask, _ = padded_batch(97)
    ids[1, 2] = 97
    with pytest.raises(ValueError, match=r"vocab_size=97.*max id 97"):
        model(ids, mask)
    ids[1, 2] = -1
    with pytest.raises(ValueError, match=r"min id -1"):
        model(ids, mask)


def test_token_types_out_of_range():
    model = Encoder(_tiny())
    ids, mask, types = padded_batch(97)
    with pytest.raises(ValueError, match=r"token type ids must lie in \[0, 2\)"):
        model(ids, mask, types + 2)


def test_validation_flag_skips_the_host_sync(monkeypatch):
    model = Encoder(_tiny()).eval()
    ids, mask, _ = padded_batch(97)
    model.validate_inputs = False

    def no_sync(*a, **k):
        raise AssertionError("aminmax (a host sync) called with validate_inputs=False")

    monkeypatch.setattr(torch, "aminmax", no_sync)
    model(ids, mask)


def test_mask_shape_must_match_ids():
    model = Encoder(_tiny())
    ids, mask, _ = padded_batch(97)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 10\), input_ids \(3, 11\)"):
        model(ids, mask[:, :10])


def test_sequence_longer_than_position_table_always_checked():
    model = Encoder(_tiny())
    model.validate_inputs = False
    ids = torch.ones(2, 25, dtype=torch.long)
    with pytest.raises(ValueError, match=r"sequence length 25 exceeds .*max_position_embeddings=24"):
        model(ids)


# ---- config --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_config_round_trip_through_autoconfig(tmp_path, arch):
    kw = dict(num_labels=3, hidden_act="gelu_new") if arch == "bert" else dict(num_labels=3, sinusoidal_pos_embds=True)
    hf = (bert_config if arch == "bert" else distilbert_config)(**kw)
    config = ModelConfig.from_hf_dict(hf.to_dict())
    assert (config.hidden_size, config.num_layers, config.num_heads, config.intermediate_size) == (32, 2, 4, 48)
    assert config.type_vocab_size == (2 if arch == "bert" else 0) and config.num_labels == 3
    import json

    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict("classification")))
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    assert back.model_type == arch
    assert back.architectures == [("Bert" if arch == "bert" else "DistilBert") + "ForSequenceClassification"]
    assert (back.hidden_size, back.num_hidden_layers, back.num_attention_heads) == (32, 2, 4)
    assert back.num_labels == 3 and back.vocab_size == 97 and back.max_position_embeddings == 24
    assert ModelConfig.from_pretrained(tmp_path) == config


def test_unsupported_architectures():
    gpt2 = transformers.GPT2Config(n_layer=2).to_dict()
    with pytest.raises(UnsupportedModelError, match=r"model_type 'gpt2'.*Supported: model_type 'bert' or 'distilbert'"):
        ModelConfig.from_hf_dict(gpt2)
    relative = {**bert_config().to_dict(), "position_embedding_type": "relative_key"}
    with pytest.raises(UnsupportedModelError, match="position_embedding_type 'relative_key'"):
        ModelConfig.from_hf_dict(relative)
    with pytest.raises(UnsupportedModelError, match="Activation 'gelu_10'"):
        ModelConfig.from_hf_dict({**bert_config().to_dict(), "hidden_act": "gelu_10"})
    with pytest.raises(UnsupportedModelError, match="Decoder"):
        ModelConfig.from_hf_dict({**bert_config().to_dict(), "is_decoder": True})
    with pytest.raises(ValueError, match="not a multiple"):
        ModelConfig(hidden_size=30, num_heads=4)
