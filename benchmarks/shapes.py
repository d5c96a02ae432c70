"""Every benchmark shape and dtype, in one module.

On CUDA: the sizes of the DESIGN targets (N rows of logits or hidden states; BERT's, RoBERTa's and Llama-3's
vocabularies; BERT-base/large and a 4096-wide hidden size), in bf16 and fp32. Without CUDA: tiny shapes, so that
`pytest benchmarks --benchmark-disable` is a smoke test of seconds (our kernels then run in Triton's interpreter).
Shapes that do not fit in device memory are skipped by the benchmarks, not removed from here.
"""

import torch

CUDA = torch.cuda.is_available()

if CUDA:
    ROWS = (4096, 16384, 65536)
    VOCABS = (30522, 50265, 128256)
    HIDDEN = (768, 1024, 4096)
    DTYPES = (torch.bfloat16, torch.float32)
else:
    ROWS = (8,)
    VOCABS = (300, 5000)  # one tile, and more than one (4096 bf16 / 2048 fp32 logits per tile)
    HIDDEN = (64,)
    DTYPES = (torch.float32, torch.bfloat16)

# (N, V) for the KD + CE loss and for softmax; (N, H) for the cosine loss.
DISTILL_SHAPES = [(n, v) for n in ROWS for v in VOCABS]
SOFTMAX_SHAPES = DISTILL_SHAPES
COSINE_SHAPES = [(n, h) for n in ROWS for h in HIDDEN]
TEMPERATURE = 2.0  # the DistilBERT recipe's T
KD_WEIGHT, CE_WEIGHT = 5.0, 2.0  # its α_ce and α_mlm
MLM_FRACTION = 0.15  # rows with a label, as with 15% masking


def shape_id(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
