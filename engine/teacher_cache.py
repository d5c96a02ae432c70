"""Teacher caches: run the teacher once (`distill cache-teacher`), then distill from its stored outputs with no teacher
in memory (`distill task --teacher-cache`, `distill pretrain --teacher-cache`).

What a cache holds, per row (one logit vector of the teacher):
    the teacher's K largest logits t_k and their ids i_k, and L = logsumexp(t/T) over its whole row,
so that the kept probabilities q_k = exp(t_k/T − L) are exact and the tail mass 1 − Σ q_k is known; training runs
`kernels.sparse_distill_loss` (KL over the K ids plus the tail as one bucket). Rows are
    classification  one per training example over the C classes; K ≥ C stores the whole row (no ids: "dense"),
    qa              two per training window (start, end) over its positions, always whole (pads −inf),
    mlm             one per KD position of each of `mask_copies` masked copies of every training sequence,
so classification, QA and a vocabulary ≤ K give exactly the live teacher's loss (the equality tests hold them to
1e-5 in fp32). Optionally (`--hidden`) the teacher's last hidden states of every real token (bf16) for the cosine term.

Pretraining masks tokens dynamically, afresh every batch; a cache cannot follow that. It stores instead the teacher's
outputs on C fixed masked copies of each sequence (BERT's static masking, C = 10 in the original BERT) and training
from it cycles through them: epoch e shows copy e mod C. The masked ids and which tokens were chosen are stored with
the outputs, so the student sees exactly the inputs the teacher saw. The report says "static masking, C copies".

Where things are (every name below is importable from here too):
    engine.teacher_cache_store   the on-disk format (layout, fingerprints, shards, manifest) and the readers:
                                 `TaskTeacherCache`, `MLMTeacherCache` → `CachedBatch`
    engine.teacher_cache_write   `distill cache-teacher` (`cache_teacher`): `write_task_cache`, `write_mlm_cache`
    engine.teacher_cache_train   `distill pretrain --teacher-cache` (`pretrain_from_cache`): `cached_batches`,
                                 `CachedPretrainObjective`, `cached_triple_loss`
"""

from engine.teacher_cache_store import (
    FORMAT,
    MANIFEST,
    RECORD,
    TASKS,
    TEACHER_DIR,
    TEACHER_FILES,
    VERSION,
    CachedBatch,
    ClassifierTargets,
    MLMTeacherCache,
    QATargets,
    TaskTeacherCache,
    TrainSequences,
    _array_path,
    _summary_path,
    cache_bytes,
    check_manifest,
    read_manifest,
    rows_fingerprint,
    shard_done,
    teacher_fingerprint,
    tokenizer_fingerprint,
    write_shard,
)
from engine.teacher_cache_train import CachedPretrainObjective, cached_batches, cached_triple_loss, pretrain_from_cache
from engine.teacher_cache_write import _copy_teacher_files, cache_teacher, write_mlm_cache, write_task_cache

__all__ = [
    "FORMAT",
    "MANIFEST",
    "RECORD",
    "TASKS",
    "TEACHER_DIR",
    "TEACHER_FILES",
    "VERSION",
    "CachedBatch",
    "CachedPretrainObjective",
    "ClassifierTargets",
    "MLMTeacherCache",
    "QATargets",
    "TaskTeacherCache",
    "TrainSequences",
    "_array_path",
    "_copy_teacher_files",
    "_summary_path",
    "cache_bytes",
    "cache_teacher",
    "cached_batches",
    "cached_triple_loss",
    "check_manifest",
    "pretrain_from_cache",
    "read_manifest",
    "rows_fingerprint",
    "shard_done",
    "teacher_fingerprint",
    "tokenizer_fingerprint",
    "write_mlm_cache",
    "write_shard",
    "write_task_cache",
]
