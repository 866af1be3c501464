"""Untrained embedding rows: detection, unbiased mean, row writes."""

from healer.embeddings.repair import (
    EmbeddingNames,
    RepairPlan,
    checkpoint_untrained_rows,
    grow_embeddings,
    plan_repair,
    repair_untrained,
)
from healer.embeddings.rows import (
    EPS,
    StoredMatrix,
    assign_trained_mean,
    row_absmax,
    stored_matrix,
    trained_mean,
    untrained_rows,
)
from healer.embeddings.shards import write_weights
from healer.embeddings.usage import TokenUse, load_vocab, protected_ids, select_rows, token_use

__all__ = [
    "EPS", "EmbeddingNames", "RepairPlan", "StoredMatrix", "TokenUse", "assign_trained_mean",
    "checkpoint_untrained_rows", "grow_embeddings", "load_vocab", "plan_repair", "protected_ids",
    "repair_untrained", "row_absmax", "select_rows", "stored_matrix", "token_use", "trained_mean",
    "untrained_rows", "write_weights",
]
