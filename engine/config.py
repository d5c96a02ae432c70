"""The model configuration: one dataclass read from, and written back to, a Hugging Face `config.json`.

Two architectures are supported, as two flavours of the same encoder (see `engine/model.py`):

- `bert`: `BertConfig` (word + position + token-type embeddings, learned absolute positions);
- `distilbert`: `DistilBertConfig` (word + position embeddings, learned or sinusoidal positions, no
  token types; `transformers` hard-codes its LayerNorm epsilon to 1e-12, so we do too).

Field names follow BERT's (`hidden_size`, `num_layers`, ...); `from_hf_dict` and `to_hf_dict` translate
DistilBERT's (`dim`, `n_layers`, ...). Anything we cannot run exactly as `transformers` would (a decoder, a
relative position embedding, another model type, an unknown activation) raises `UnsupportedModelError`
rather than running something else silently.
"""

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

SUPPORTED_ARCHS = ("bert", "distilbert")
# Activations as `transformers.activations.ACT2FN` names them; engine/model.py implements each one.
SUPPORTED_ACTIVATIONS = (
    "gelu",
    "gelu_python",
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "gelu_python_tanh",
    "quick_gelu",
    "relu",
    "silu",
    "swish",
    "tanh",
)
# Head name → the `transformers` class-name suffix written to `architectures` in config.json.
HEAD_CLASS_SUFFIX = {
    None: "Model",
    "mlm": "ForMaskedLM",
    "classification": "ForSequenceClassification",
    "qa": "ForQuestionAnswering",
}
_CLASS_PREFIX = {"bert": "Bert", "distilbert": "DistilBert"}
DISTILBERT_LAYER_NORM_EPS = 1e-12  # hard-coded in transformers' modeling_distilbert.py


class UnsupportedModelError(ValueError):
    """A checkpoint or config describes a model this engine does not implement."""


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{what}. Supported: model_type 'bert' or 'distilbert' encoders (BertModel, BertForMaskedLM, "
        "BertForSequenceClassification, BertForQuestionAnswering and their DistilBert counterparts) with absolute "
        f"position embeddings and one of the activations {', '.join(SUPPORTED_ACTIVATIONS)}."
    )


@dataclass
class ModelConfig:
    """Hyper-parameters of a BERT or DistilBERT encoder and its heads, as a Hugging Face config.json gives them."""

    arch: str = "bert"  # "bert" | "distilbert" (config.json `model_type`)
    vocab_size: int = 30522  # rows of the word-embedding table and of the MLM decoder
    hidden_size: int = 768  # model width H (DistilBERT `dim`)
    num_layers: int = 12  # transformer layers (BERT `num_hidden_layers`, DistilBERT `n_layers`)
    num_heads: int = 12  # attention heads; must divide hidden_size (BERT `num_attention_heads`, DistilBERT `n_heads`)
    intermediate_size: int = 3072  # feed-forward width (DistilBERT `hidden_dim`)
    hidden_act: str = "gelu"  # feed-forward and MLM-transform activation (DistilBERT `activation`)
    max_position_embeddings: int = 512  # rows of the position table: the longest sequence the model accepts
    type_vocab_size: int | None = None  # token-type (segment) embeddings; None → 2 for BERT, 0 for DistilBERT
    layer_norm_eps: float = 1e-12  # epsilon of every LayerNorm (DistilBERT: always 1e-12)
    pad_token_id: int | None = 0  # padding row of the word embeddings (initialised to zero)
    sinusoidal_pos_embds: bool = False  # DistilBERT only: fixed sinusoidal position table instead of a learned one
    tie_word_embeddings: bool = True  # MLM decoder weight is the word-embedding table
    hidden_dropout: float = 0.1  # dropout on embeddings and sub-layer outputs (BERT `hidden_dropout_prob`)
    attention_dropout: float = 0.1  # dropout on attention probabilities (BERT `attention_probs_dropout_prob`)
    classifier_dropout: float | None = None  # before the classifier (DistilBERT `seq_classif_dropout`); None: hidden
    qa_dropout: float = 0.0  # before the QA span head (DistilBERT `qa_dropout`; BERT has none)
    num_labels: int = 2  # classifier outputs
    id2label: dict[int, str] | None = None  # class index → name; None → LABEL_0, LABEL_1, ...
    label2id: dict[str, int] | None = None  # name → class index; None → the inverse of id2label
    problem_type: str | None = None  # transformers' classification loss choice, kept for round trips
    initializer_range: float = 0.02  # std of the normal initialisation of fresh weights

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHS:
            raise _unsupported(f"Architecture {self.arch!r} is not supported")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise _unsupported(f"Activation {self.hidden_act!r} is not supported")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.type_vocab_size is None:
            self.type_vocab_size = 2 if self.arch == "bert" else 0
        if self.arch == "distilbert" and self.type_vocab_size != 0:
            raise ValueError("DistilBERT has no token-type embeddings: type_vocab_size must be 0")
        if self.arch == "distilbert" and self.layer_norm_eps != DISTILBERT_LAYER_NORM_EPS:
            raise ValueError(f"DistilBERT's LayerNorm epsilon is fixed at {DISTILBERT_LAYER_NORM_EPS} by transformers")
        if self.arch == "bert" and self.sinusoidal_pos_embds:
            raise _unsupported("Sinusoidal position embeddings exist only in DistilBERT")
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)
        if self.label2id is not None:
            self.label2id = {str(k): int(v) for k, v in self.label2id.items()}

    @property
    def classifier_dropout_p(self) -> float:
        """Dropout before the sequence classifier, with BERT's fallback to hidden_dropout resolved."""
        return self.hidden_dropout if self.classifier_dropout is None else self.classifier_dropout

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    # ---- Hugging Face config.json ------------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Read the fields of a `BertConfig` or `DistilBertConfig` dict (a parsed config.json).

        Missing fields take `transformers`' defaults for that model type.

        Raises:
            UnsupportedModelError: another model type, a decoder, relative positions, an unknown activation.
        """
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_ARCHS:
            raise _unsupported(f"config.json has model_type {model_type!r} (architectures {d.get('architectures')})")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise _unsupported("Decoder configurations (is_decoder / add_cross_attention) are not supported")
        pet = d.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise _unsupported(f"position_embedding_type {pet!r} is not supported (only 'absolute')")
        common = dict(
            vocab_size=d.get("vocab_size", 30522),
            max_position_embeddings=d.get("max_position_embeddings", 512),
            pad_token_id=d.get("pad_token_id", 0),
            tie_word_embeddings=d.get("tie_word_embeddings", True),
            initializer_range=d.get("initializer_range", 0.02),
            id2label=d.get("id2label"),
            label2id=d.get("label2id"),
            num_labels=d.get("num_labels", 2),
            problem_type=d.get("problem_type"),
        )
        if model_type == "bert":
            return cls(
                arch="bert",
                hidden_size=d.get("hidden_size", 768),
                num_layers=d.get("num_hidden_layers", 12),
                num_heads=d.get("num_attention_heads", 12),
                intermediate_size=d.get("intermediate_size", 3072),
                hidden_act=d.get("hidden_act", "gelu"),
                type_vocab_size=d.get("type_vocab_size", 2),
                layer_norm_eps=d.get("layer_norm_eps", 1e-12),
                hidden_dropout=d.get("hidden_dropout_prob", 0.1),
                attention_dropout=d.get("attention_probs_dropout_prob", 0.1),
                classifier_dropout=d.get("classifier_dropout"),
                qa_dropout=0.0,
                **common,
            )
        return cls(
            arch="distilbert",
            hidden_size=d.get("dim", 768),
            num_layers=d.get("n_layers", 6),
            num_heads=d.get("n_heads", 12),
            intermediate_size=d.get("hidden_dim", 4 * 768),
            hidden_act=d.get("activation", "gelu"),
            type_vocab_size=0,
            layer_norm_eps=DISTILBERT_LAYER_NORM_EPS,
            sinusoidal_pos_embds=d.get("sinusoidal_pos_embds", False),
            hidden_dropout=d.get("dropout", 0.1),
            attention_dropout=d.get("attention_dropout", 0.1),
            classifier_dropout=d.get("seq_classif_dropout", 0.2),
            qa_dropout=d.get("qa_dropout", 0.1),
            **common,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Read `path/config.json` (or `path` itself when it is the file).

        Raises:
            FileNotFoundError: no such directory or no config.json in it.
            UnsupportedModelError: see `from_hf_dict`.
        """
        path = Path(path)
        file = path if path.is_file() else path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"Model directory {path} does not exist: check the path")
        if not file.is_file():
            raise FileNotFoundError(f"No config.json in {path}: a Hugging Face model directory holds one")
        try:
            d = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON ({e}): restore it from the original checkpoint") from e
        return cls.from_hf_dict(d)

    def to_hf_dict(self, head: str | None = None) -> dict[str, Any]:
        """A config.json dict that `transformers.AutoConfig` reads back as this model.

        Args:
            head: None, "mlm", "classification" or "qa": chooses `architectures` (e.g. BertForMaskedLM).
        """
        if head not in HEAD_CLASS_SUFFIX:
            raise ValueError(f"head must be one of {list(HEAD_CLASS_SUFFIX)}, got {head!r}")
        id2label = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
        label2id = self.label2id or {v: k for k, v in id2label.items()}
        d: dict[str, Any] = {
            "architectures": [_CLASS_PREFIX[self.arch] + HEAD_CLASS_SUFFIX[head]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "id2label": {str(k): v for k, v in id2label.items()},
            "label2id": dict(label2id),
        }
        if self.problem_type is not None:
            d["problem_type"] = self.problem_type
        if self.arch == "bert":
            d.update(
                hidden_size=self.hidden_size,
                num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads,
                intermediate_size=self.intermediate_size,
                hidden_act=self.hidden_act,
                type_vocab_size=self.type_vocab_size,
                layer_norm_eps=self.layer_norm_eps,
                hidden_dropout_prob=self.hidden_dropout,
                attention_probs_dropout_prob=self.attention_dropout,
                classifier_dropout=self.classifier_dropout,
                position_embedding_type="absolute",
            )
        else:
            d.update(
                dim=self.hidden_size,
                n_layers=self.num_layers,
                n_heads=self.num_heads,
                hidden_dim=self.intermediate_size,
                activation=self.hidden_act,
                sinusoidal_pos_embds=self.sinusoidal_pos_embds,
                dropout=self.hidden_dropout,
                attention_dropout=self.attention_dropout,
                seq_classif_dropout=self.classifier_dropout_p,
                qa_dropout=self.qa_dropout,
            )
        return d

    def to_dict(self) -> dict[str, Any]:
        """The dataclass fields as a plain dict (for training checkpoints and logs)."""
        return asdict(self)
