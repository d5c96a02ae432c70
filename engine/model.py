"""BERT and DistilBERT in plain PyTorch, top to bottom: Embeddings → SelfAttention → FeedForward → Layer →
Encoder → heads (MaskedLM, SequenceClassifier, QuestionAnswerer).

Both architectures are post-LayerNorm encoders built from the same blocks; they differ only in a few
switches, all read from `ModelConfig`:

    embeddings        BERT: word + token type + position         DistilBERT: word + position (maybe sinusoidal)
    attention output  BERT: dropout before the residual add      DistilBERT: no dropout there
    classifier        BERT: pooler dense → tanh → dropout → out  DistilBERT: pre_classifier dense → ReLU → ...
    QA head           BERT: linear                               DistilBERT: dropout → linear

Parameter names are DistilBERT's short ones (`q_lin`, `sa_layer_norm`, `ffn.lin1`, ...) for both, so that one
student state fits either target; `engine/checkpoint.py` maps them to and from the Hugging Face names.
Shapes: B batch, L sequence length, H hidden size, nh heads, hd head size, I intermediate size, V vocabulary.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function `transformers.activations.ACT2FN[name]` computes.

    gelu_new, gelu_fast and the tanh variants all compute 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))), which is
    exactly `F.gelu(approximate="tanh")`; the fused kernel differs from their unfused formulas only by rounding.
    """
    if name in ("gelu", "gelu_python"):
        return F.gelu  # exact: x·Φ(x), with Φ via erf
    if name in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "relu":
        return F.relu
    if name in ("silu", "swish"):
        return F.silu
    if name == "tanh":
        return torch.tanh
    raise ValueError(f"unknown activation {name!r}")  # ModelConfig rejects these first


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """DistilBERT's fixed position table (n_pos, dim) fp32: sin on even columns, cos on odd ones.

    Entry (p, j) is p / 10000^(2⌊j/2⌋/dim), computed in fp64 like `transformers` (which uses numpy) and then
    rounded to fp32.
    """
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]  # (P, 1)
    j = torch.arange(dim, dtype=torch.float64)[None, :]  # (1, D)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)  # (P, D)
    table = torch.empty(n_pos, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.float()


class Embeddings(nn.Module):
    """Token (+ token type) + absolute position embeddings → LayerNorm → dropout."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, H, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, H)
        # DistilBERT has no segment embeddings (type_vocab_size 0).
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, H) if config.type_vocab_size else None
        self.layer_norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        if config.sinusoidal_pos_embds:
            # A fixed table, as in the original DistilBERT (transformers ≥5 leaves it trainable; we do not).
            self.position_embeddings.weight.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        L = input_ids.shape[1]
        x = self.word_embeddings(input_ids)  # (B, L, H)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                x = x + self.token_type_embeddings.weight[0]  # (B, L, H): every token is segment 0
            else:
                x = x + self.token_type_embeddings(token_type_ids)  # (B, L, H)
        x = x + self.position_embeddings.weight[:L]  # (B, L, H): positions 0..L-1
        return self.dropout(self.layer_norm(x))  # (B, L, H)


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention with a key-padding mask."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H = config.hidden_size
        self.num_heads = config.num_heads
        self.q_lin = nn.Linear(H, H)
        self.k_lin = nn.Linear(H, H)
        self.v_lin = nn.Linear(H, H)
        self.out_lin = nn.Linear(H, H)
        self.dropout_p = config.attention_dropout

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, L, H = x.shape
        q = self.q_lin(x).view(B, L, self.num_heads, -1).transpose(1, 2)  # (B, nh, L, hd)
        k = self.k_lin(x).view(B, L, self.num_heads, -1).transpose(1, 2)  # (B, nh, L, hd)
        v = self.v_lin(x).view(B, L, self.num_heads, -1).transpose(1, 2)  # (B, nh, L, hd)
        # softmax(q·kᵀ/√hd) v over the real (unpadded) keys; key_mask (B, 1, 1, L) is True where a key is real.
        # Padded queries still attend to the real keys, so their outputs stay finite (as in transformers).
        dropout_p = self.dropout_p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)  # (B, nh, L, hd)
        y = y.transpose(1, 2).reshape(B, L, H)  # (B, L, H)
        return self.out_lin(y)  # (B, L, H)


class FeedForward(nn.Module):
    """Position-wise lin1 → activation → lin2."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.lin1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.lin2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))  # (B, L, H) → (B, L, I) → (B, L, H)


class Layer(nn.Module):
    """One post-LayerNorm transformer layer: x ← LN(x + Attn(x)); x ← LN(x + FFN(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = SelfAttention(config)
        self.sa_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)
        self.output_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # BERT drops out the attention output before the residual add (BertSelfOutput); DistilBERT does not.
        self.attn_dropout = nn.Dropout(config.hidden_dropout if config.arch == "bert" else 0.0)
        self.ffn_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.sa_layer_norm(x + self.attn_dropout(self.attention(x, key_mask)))  # (B, L, H)
        x = self.output_layer_norm(x + self.ffn_dropout(self.ffn(x)))  # (B, L, H)
        return x


class EncoderOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, L, H)
    hidden_states: tuple[torch.Tensor, ...] | None  # embeddings output, then each layer's: num_layers + 1 × (B, L, H)


class Encoder(nn.Module):
    """Embeddings and the stack of layers: the bare BertModel / DistilBertModel (without BERT's pooler)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList([Layer(config) for _ in range(config.num_layers)])
        # Checking id ranges reads the ids' min and max back to the host (a sync); a training loop whose data
        # pipeline already guarantees the range turns this off. Sequence lengths are always checked (no sync).
        self.validate_inputs = True
        init_weights(self, config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> EncoderOutput:
        """Encode a padded batch.

        Args:
            input_ids: (B, L) int64 token ids in [0, vocab_size).
            attention_mask: (B, L) 0/1 (any int or bool dtype): 1 for real tokens, 0 for padding; None: all real.
            token_type_ids: (B, L) int64 segment ids, BERT only (ignored by DistilBERT, which has no segments);
                None: all 0.
            output_hidden_states: also return the embeddings output and every layer's output.

        Returns:
            EncoderOutput with last_hidden_state (B, L, H) and hidden_states (num_layers + 1 tensors of (B, L, H))
            or None, in the weights' dtype; fp32 under autocast, where LayerNorm, the last op of each, runs in fp32.

        Raises:
            ValueError: L > max_position_embeddings, or mismatched shapes; with `validate_inputs`, an id outside
                the vocabulary or a token type outside type_vocab_size.
        """
        self._check_inputs(input_ids, attention_mask, token_type_ids)
        # (B, L) → (B, 1, 1, L): broadcast over heads and queries, so each query sees only the real keys.
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids)  # (B, L, H)
        hidden_states = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, key_mask)  # (B, L, H)
            if hidden_states is not None:
                hidden_states.append(x)
        return EncoderOutput(x, tuple(hidden_states) if hidden_states is not None else None)

    def _check_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None
    ) -> None:
        c = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}, input_ids {tuple(input_ids.shape)}: they must match"
                )
        if input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds the model's position table "
                f"(max_position_embeddings={c.max_position_embeddings}): truncate or split the inputs"
            )
        if not self.validate_inputs or input_ids.numel() == 0:
            return
        lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one host sync
        if lo < 0 or hi >= c.vocab_size:
            raise ValueError(
                f"input ids must lie in [0, {c.vocab_size}) (vocab_size={c.vocab_size}), got max id {hi} and min "
                f"id {lo}: the tokenizer does not match the model, or the ids are corrupt"
            )
        if token_type_ids is not None and self.embeddings.token_type_embeddings is not None:
            lo, hi = torch.stack(torch.aminmax(token_type_ids)).tolist()
            if lo < 0 or hi >= c.type_vocab_size:
                raise ValueError(f"token type ids must lie in [0, {c.type_vocab_size}), got {lo}..{hi}")


# ---- heads --------------------------------------------------------------------------------------------------------


class LMHead(nn.Module):
    """The MLM head: transform (dense → activation → LayerNorm), then the vocabulary projection (decoder).

    BERT's cls.predictions.{transform, decoder, bias}; DistilBERT's vocab_{transform, layer_norm, projector}.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation_fn(config.hidden_act)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)  # weight (V, H), bias (V,)
        self.tied = False  # decoder.weight is the word-embedding Parameter (set by MaskedLM.tie_weights)

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        """(..., H) hidden states → (..., H) transformed rows, ready for the vocabulary projection."""
        return self.layer_norm(self.act(self.dense(h)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(h))  # (..., H) → (..., V)


class MaskedLMOutput(NamedTuple):
    logits: torch.Tensor  # (B, L, V)
    last_hidden_state: torch.Tensor  # (B, L, H)
    hidden_states: tuple[torch.Tensor, ...] | None  # as EncoderOutput.hidden_states


class MaskedLM(nn.Module):
    """Encoder + MLM head: BertForMaskedLM / DistilBertForMaskedLM.

    A distillation loop that never materializes (B, L, V) logits calls `encoder(...)`, selects rows, applies
    `lm_head.transform(rows)` and projects with `decoder_weight` (V, H) and `decoder_bias` (V,) itself.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.lm_head = LMHead(config)
        self.tie_weights()
        init_weights(self.lm_head, config)  # the encoder initialized itself; a tied decoder is not redrawn

    def tie_weights(self) -> None:
        """Make the decoder weight the word-embedding Parameter itself when `tie_word_embeddings` (after loads)."""
        if self.config.tie_word_embeddings:
            self.lm_head.decoder.weight = self.encoder.embeddings.word_embeddings.weight
            self.lm_head.tied = True

    @property
    def decoder_weight(self) -> torch.Tensor:
        """(V, H) vocabulary projection weight (the word embeddings when tied)."""
        return self.lm_head.decoder.weight

    @property
    def decoder_bias(self) -> torch.Tensor:
        """(V,) vocabulary projection bias."""
        return self.lm_head.decoder.bias

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> MaskedLMOutput:
        """Token logits for every position.

        Args: as `Encoder.forward`.

        Returns:
            MaskedLMOutput: logits (B, L, V) (the autocast dtype under autocast), last_hidden_state (B, L, H),
            hidden_states or None.
        """
        h, hidden_states = self.encoder(input_ids, attention_mask, token_type_ids, output_hidden_states)
        return MaskedLMOutput(self.lm_head(h), h, hidden_states)  # (B, L, V)


class ClassifierOutput(NamedTuple):
    logits: torch.Tensor  # (B, num_labels)
    last_hidden_state: torch.Tensor  # (B, L, H)
    hidden_states: tuple[torch.Tensor, ...] | None  # as EncoderOutput.hidden_states


class SequenceClassifier(nn.Module):
    """Encoder + sequence classifier on the first ([CLS]) token.

    BERT: pooler dense → tanh → dropout → classifier. DistilBERT: pre_classifier dense → ReLU → dropout →
    classifier. Both dense layers are `pooler` here.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.pooler_act = torch.tanh if config.arch == "bert" else F.relu
        self.dropout = nn.Dropout(config.classifier_dropout_p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        init_weights(self.pooler, config)
        init_weights(self.classifier, config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ClassifierOutput:
        """Class logits.

        Args: as `Encoder.forward`.

        Returns:
            ClassifierOutput: logits (B, num_labels), last_hidden_state (B, L, H), hidden_states or None.
        """
        h, hidden_states = self.encoder(input_ids, attention_mask, token_type_ids, output_hidden_states)
        pooled = self.dropout(self.pooler_act(self.pooler(h[:, 0])))  # (B, H)
        return ClassifierOutput(self.classifier(pooled), h, hidden_states)  # (B, num_labels)


class QAOutput(NamedTuple):
    start_logits: torch.Tensor  # (B, L)
    end_logits: torch.Tensor  # (B, L)
    last_hidden_state: torch.Tensor  # (B, L, H)
    hidden_states: tuple[torch.Tensor, ...] | None  # as EncoderOutput.hidden_states


class QuestionAnswerer(nn.Module):
    """Encoder + extractive QA span head: per-token start and end logits (BertForQuestionAnswering)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.dropout = nn.Dropout(config.qa_dropout)  # DistilBERT only; BERT's qa_dropout is 0
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        init_weights(self.qa_outputs, config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> QAOutput:
        """Span logits. Padded positions get logits too: mask them before a softmax over positions.

        Args: as `Encoder.forward`.

        Returns:
            QAOutput: start_logits (B, L), end_logits (B, L), last_hidden_state (B, L, H), hidden_states or None.
        """
        h, hidden_states = self.encoder(input_ids, attention_mask, token_type_ids, output_hidden_states)
        logits = self.qa_outputs(self.dropout(h))  # (B, L, 2)
        return QAOutput(logits[..., 0].contiguous(), logits[..., 1].contiguous(), h, hidden_states)  # (B, L) each


# ---- initialization -----------------------------------------------------------------------------------------------


@torch.no_grad()
def init_weights(module: nn.Module, config: ModelConfig) -> None:
    """Initialize `module` and its submodules as `transformers`' `_init_weights` does for BERT and DistilBERT.

    Linear: weight ~ N(0, initializer_range), bias 0. Embedding: N(0, initializer_range), padding row 0. LayerNorm:
    weight 1, bias 0. DistilBERT's sinusoidal position table: the fixed table. A tied decoder keeps the embedding
    table's values (it is the same Parameter).
    """
    std = config.initializer_range
    tied = {id(m.decoder.weight) for m in module.modules() if isinstance(m, LMHead) and m.tied}
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if id(m.weight) not in tied:
                m.weight.normal_(0.0, std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()
    for m in module.modules():  # after the Embedding draws above
        if isinstance(m, Embeddings) and config.sinusoidal_pos_embds:
            w = m.position_embeddings.weight
            w.copy_(sinusoidal_table(*w.shape).to(w.dtype))


HEADS: dict[str | None, type[nn.Module]] = {
    None: Encoder,
    "mlm": MaskedLM,
    "classification": SequenceClassifier,
    "qa": QuestionAnswerer,
}


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (a tied decoder counts once)."""
    return sum(p.numel() for p in model.parameters())


def build_model(config: ModelConfig, head: str | None = "mlm") -> nn.Module:
    """A freshly initialized model: head None → Encoder, "mlm" → MaskedLM, "classification" →
    SequenceClassifier, "qa" → QuestionAnswerer (fp32 on the current default device)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {list(HEADS)}, got {head!r}")
    return HEADS[head](config)


def head_of(model: nn.Module) -> str | None:
    """The head name of a model built by `build_model`."""
    for name, cls in HEADS.items():
        if type(model) is cls:
            return name
    raise TypeError(f"not an engine model: {type(model).__name__}")
