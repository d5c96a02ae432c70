"""engine/checkpoint.py: loading Hugging Face checkpoints (every layout we claim), saving ones `transformers` loads
with no missing keys and equal outputs, atomic directories, and a clear error for each kind of bad checkpoint."""

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from engine import checkpoint as ckpt
from engine.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    atomic_directory,
    has_mlm_head,
    load_model,
    load_state_into,
    save_model,
)
from engine.config import UnsupportedModelError
from engine.model import Encoder, MaskedLM
from tests.engine.test_model import HF_CLASSES, hf_model, padded_batch, randomize_, save_hf

FP32 = dict(atol=1e-5, rtol=0)


def _edit_config(path, **changes):
    f = Path(path) / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


def _hf_outputs(model, arch, ids, mask, types):
    kw = {"token_type_ids": types} if arch == "bert" else {}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw)


# ---- round trips through transformers ------------------------------------------------------------------------------

ROUND_TRIPS = [
    ("bert", "mlm", {}),
    ("bert", "mlm", dict(tie_word_embeddings=False)),
    ("bert", "classification", dict(num_labels=3)),
    ("bert", "qa", {}),
    ("distilbert", "mlm", dict(sinusoidal_pos_embds=True)),
    ("distilbert", "classification", dict(num_labels=4)),
    ("distilbert", "qa", {}),
    ("distilbert", None, {}),
]


@pytest.mark.parametrize("arch,head,kw", ROUND_TRIPS)
def test_saved_model_loads_in_transformers_with_equal_outputs(tmp_path, arch, head, kw):
    ref = hf_model(arch, head, **kw)
    ours, _ = load_model(save_hf(ref, tmp_path / "hf"), head=head)
    out = save_model(ours, tmp_path / "ours")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and config["architectures"] == [HF_CLASSES[(arch, head)].__name__]

    back, info = transformers.AutoConfig, None
    auto = {
        None: transformers.AutoModel,
        "mlm": transformers.AutoModelForMaskedLM,
        "classification": transformers.AutoModelForSequenceClassification,
        "qa": transformers.AutoModelForQuestionAnswering,
    }[head]
    back, info = auto.from_pretrained(out, output_loading_info=True)
    assert type(back) is HF_CLASSES[(arch, head)]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, mask, types = padded_batch(97, token_types=arch == "bert")
    a, b = _hf_outputs(ref, arch, ids, mask, types), _hf_outputs(back.eval(), arch, ids, mask, types)
    for x, y in zip(a.values(), b.values()):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    again, report = load_model(out, head=head)  # and back into ours
    assert report.initialized == [] and report.unused == []
    for p, q in zip(ours.state_dict().values(), again.state_dict().values()):
        assert torch.equal(p, q)


def test_base_model_checkpoint_without_prefix_and_fresh_head(tmp_path, minilm_dir):
    """A BertModel checkpoint (keys without `bert.`): the encoder loads, the MLM head starts fresh, reported."""
    assert not has_mlm_head(minilm_dir)
    model, report = load_model(minilm_dir, head="mlm")
    assert isinstance(model, MaskedLM)
    assert report.initialized == [
        "lm_head.dense.weight",
        "lm_head.dense.bias",
        "lm_head.layer_norm.weight",
        "lm_head.layer_norm.bias",
        "lm_head.decoder.bias",
    ]
    assert sorted(report.unused) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert report.dropped == ["embeddings.position_ids"] and report.tied
    assert torch.all(model.lm_head.layer_norm.weight == 1) and torch.all(model.decoder_bias == 0)
    assert model.decoder_weight is model.encoder.embeddings.word_embeddings.weight
    torch.testing.assert_close(
        model.encoder.embeddings.word_embeddings.weight[:3], load_file(Path(minilm_dir) / "model.safetensors")[
            "embeddings.word_embeddings.weight"
        ][:3]
    )  # fmt: skip


def test_pretraining_checkpoint_nsp_head_dropped_and_pooler_unused(tmp_path):
    torch.manual_seed(0)
    from tests.engine.test_model import bert_config

    ref = randomize_(transformers.BertForPreTraining(bert_config())).eval()
    path = save_hf(ref, tmp_path)
    assert has_mlm_head(path)
    model, report = load_model(path, head="mlm")
    assert {"cls.seq_relationship.weight", "cls.seq_relationship.bias"} <= set(report.dropped)
    assert sorted(report.unused) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    ids, mask, types = padded_batch(97)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).prediction_logits
        got = model(ids, mask, types).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], **FP32)


def test_legacy_key_spellings(tmp_path):
    """transformers < 5 wrote the MLM bias as cls.predictions.decoder.bias; TF-era files say gamma/beta."""
    ref = hf_model("bert", "mlm")
    path = save_hf(ref, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["cls.predictions.decoder.bias"] = state.pop("cls.predictions.bias")
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].clone()  # a tied copy
    state["bert.embeddings.LayerNorm.gamma"] = state.pop("bert.embeddings.LayerNorm.weight")
    state["bert.embeddings.LayerNorm.beta"] = state.pop("bert.embeddings.LayerNorm.bias")
    state["bert.embeddings.position_ids"] = torch.arange(24)[None]
    save_file(state, tmp_path / "model.safetensors")
    model, report = load_model(path, head="mlm")
    assert set(report.dropped) == {"cls.predictions.decoder.weight", "bert.embeddings.position_ids"}
    torch.testing.assert_close(model.decoder_bias, ref.cls.predictions.bias, atol=0, rtol=0)
    torch.testing.assert_close(
        model.encoder.embeddings.layer_norm.bias, ref.bert.embeddings.LayerNorm.bias, atol=0, rtol=0
    )


def test_sharded_checkpoint(tmp_path):
    ref = hf_model("distilbert", "mlm")
    path = tmp_path / "sharded"
    ref.save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file() and not (path / "model.safetensors").exists()
    model, report = load_model(path, head="mlm")
    assert len(report.files) > 1
    ids, mask, _ = padded_batch(97)
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, mask).logits[mask.bool()], ref(input_ids=ids, attention_mask=mask).logits[mask.bool()], **FP32
        )
    os.remove(report.files[-1])
    with pytest.raises(CheckpointNotFoundError, match=f"names shards missing from {path}.*{report.files[-1].name}"):
        load_model(path)


def test_dtype_and_device_on_load(tmp_path):
    path = save_hf(hf_model("bert", "mlm"), tmp_path)
    model, _ = load_model(path, head="mlm", dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not model.training
    fp32, _ = load_model(path, head="mlm")
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    save_model(model, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_file(tmp_path / "bf16" / "model.safetensors")["bert.embeddings.word_embeddings.weight"].dtype == (
        torch.bfloat16
    )


def test_classification_num_labels_override(tmp_path):
    path = save_hf(hf_model("distilbert", "mlm"), tmp_path / "mlm")
    model, report = load_model(path, head="classification", num_labels=7)
    assert model.classifier.weight.shape == (7, 32) and model.config.num_labels == 7
    assert {"pooler.weight", "classifier.weight"} <= set(report.initialized)
    path = save_hf(hf_model("distilbert", "classification", num_labels=3), tmp_path / "cls")
    with pytest.raises(CheckpointError, match=r"classifier.weight: checkpoint \(3, 32\) vs model \(7, 32\)"):
        load_model(path, head="classification", num_labels=7)


def test_load_state_into_resumes_in_place(tmp_path):
    src = randomize_(MaskedLM(load_model(save_hf(hf_model("bert", "mlm"), tmp_path / "a"), head="mlm")[0].config))
    save_model(src, tmp_path / "b")
    dst = MaskedLM(src.config)
    weight = dst.encoder.layers[1].ffn.lin2.weight
    load_state_into(dst, tmp_path / "b")
    assert dst.encoder.layers[1].ffn.lin2.weight is weight  # in place: optimizer references stay valid
    for p, q in zip(src.state_dict().values(), dst.state_dict().values()):
        assert torch.equal(p, q)
    with pytest.raises(CheckpointError, match="lacks the model's parameters"):
        load_state_into(dst, save_model(Encoder(src.config), tmp_path / "enc"))


def test_save_copies_tokenizer_files(tmp_path, minilm_dir):
    model = Encoder(load_model(minilm_dir, head=None)[0].config.replace(num_layers=1))
    out = save_model(model, tmp_path / "m", tokenizer_dir=minilm_dir)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (Path(minilm_dir) / name).read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("hello world")["input_ids"][0] == tok.cls_token_id


# ---- atomic saves of checkpoints -----------------------------------------------------------------------------------


def _siblings(path: Path):
    return sorted(p.name for p in path.parent.iterdir())


def test_atomic_directory_failure_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = save_hf(hf_model("distilbert", "mlm"), tmp_path / "hf")
    model, _ = load_model(path, head="mlm")
    out = save_model(model, tmp_path / "out")
    before = (out / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        Path(args[1]).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, out)
    assert (out / "model.safetensors").read_bytes() == before
    assert _siblings(out) == ["hf", "out"]


def test_atomic_directory_nested_like_the_training_loop(tmp_path):
    model = Encoder(load_model(save_hf(hf_model("bert", None), tmp_path / "hf"), head=None)[0].config)
    with atomic_directory(tmp_path / "checkpoint") as tmp:
        save_model(model, tmp / "model")
        torch.save({"step": 3}, tmp / "trainer_state.pt")
    assert (tmp_path / "checkpoint" / "model" / "model.safetensors").is_file()


# ---- bad checkpoints -----------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_dir(tmp_path):
    return Path(save_hf(hf_model("bert", "mlm"), tmp_path / "tiny"))


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"does not exist: check the path"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):  # CheckpointNotFoundError is one
        has_mlm_head(tmp_path / "nowhere")


def test_missing_weights_file(tiny_dir):
    os.remove(tiny_dir / "model.safetensors")
    with pytest.raises(CheckpointNotFoundError, match=r"No model.safetensors or model.safetensors.index.json in"):
        load_model(tiny_dir)
    (tiny_dir / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointNotFoundError, match=r"pytorch_model.bin.*save_pretrained"):
        load_model(tiny_dir)


def test_missing_config(tiny_dir):
    os.remove(tiny_dir / "config.json")
    with pytest.raises(CheckpointNotFoundError, match="No config.json"):
        load_model(tiny_dir)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_or_truncated_safetensors(tiny_dir, damage):
    f = tiny_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07" * 100, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"corrupt or truncated.*download or save it again"):
        load_model(tiny_dir)
    with pytest.raises(CheckpointError, match=r"corrupt or truncated"):
        has_mlm_head(tiny_dir)


def test_unsupported_architecture(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    save_file({"wte.weight": torch.zeros(4, 4)}, tmp_path / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match=r"model_type 'gpt2'.*Supported: model_type 'bert' or 'distilbert'"):
        load_model(tmp_path)


def test_shape_mismatch_names_key_and_shapes(tiny_dir):
    _edit_config(tiny_dir, intermediate_size=64)
    with pytest.raises(CheckpointError) as e:
        load_model(tiny_dir)
    msg = str(e.value)
    assert "encoder.layers.0.ffn.lin1.weight: checkpoint (48, 32) vs model (64, 32)" in msg
    assert "config.json belongs to these weights" in msg


def test_missing_and_unexpected_keys_are_named(tiny_dir):
    state = load_file(tiny_dir / "model.safetensors")
    del state["bert.encoder.layer.1.output.dense.bias"]
    state["bert.encoder.layer.1.extra.weight"] = torch.zeros(2)
    save_file(state, tiny_dir / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(tiny_dir)
    assert "missing from the checkpoint: ['encoder.layer.1.output.dense.bias']" in str(e.value)
    assert "unexpected keys" in str(e.value) and "bert.encoder.layer.1.extra.weight" in str(e.value)


def test_more_layers_in_file_than_in_config(tiny_dir):
    _edit_config(tiny_dir, num_hidden_layers=1)
    with pytest.raises(
        CheckpointError, match=r"unexpected keys \(not part of a bert model with 1 layers\).*layer\.1\."
    ):
        load_model(tiny_dir)


def test_bert_with_pooler_and_no_classifier_loads_pooler_and_a_fresh_classifier(tmp_path):
    """The usual start of fine-tuning (a BertModel checkpoint): the pooler's weights come from the file, the
    classifier is initialized afresh, as transformers does; a pooler only half there is an error."""
    base = hf_model("bert", None)  # encoder + pooler
    path = Path(save_hf(base, tmp_path / "base"))
    model, report = load_model(path, head="classification", num_labels=3)
    assert torch.equal(model.pooler.weight, base.pooler.dense.weight) and torch.equal(
        model.pooler.bias, base.pooler.dense.bias
    )
    assert sorted(report.initialized) == ["classifier.bias", "classifier.weight"]
    state = load_file(path / "model.safetensors")
    del state["pooler.dense.bias"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: \['pooler.dense.bias'\]"):
        load_model(path, head="classification", num_labels=3)


def test_half_a_head_is_an_error_not_a_fresh_head(tiny_dir):
    state = load_file(tiny_dir / "model.safetensors")
    del state["cls.predictions.transform.dense.weight"]
    save_file(state, tiny_dir / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"missing from the checkpoint: \['cls.predictions.transform.dense.weight'\]"
    ):
        load_model(tiny_dir, head="mlm")
