"""Row math: untrained-row detection and the unbiased trained mean, against float64 references."""

import numpy as np
import pytest
import torch
from embedding_fixtures import assert_within_one_bf16_ulp
from safetensors.torch import load_file, save_file

from healer.embeddings import rows as R
from healer.embeddings.rows import (
    EMBED_AND_HEAD_ZERO,
    EMBED_ZERO,
    EMBED_ZERO_HEAD_SHARED,
    StoredMatrix,
    assign_trained_mean,
    row_absmax,
    trained_mean,
    untrained_rows,
)


def _matrix(n=300, h=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, h, generator=g, dtype=torch.float64) * 0.02 + 0.01).to(dtype)


def _reference_untrained(embed: torch.Tensor, eps=1e-16) -> set[int]:
    a = embed.to(torch.float64).numpy()
    return {int(i) for i in np.nonzero(np.abs(a).max(axis=1) <= eps)[0]}


def _reference_trained_mean(matrix: torch.Tensor, untrained) -> np.ndarray:
    a = matrix.to(torch.float64).numpy()
    keep = np.ones(len(a), bool)
    keep[list(untrained)] = False
    return a[keep].mean(axis=0)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # several chunks even on small matrices, so chunk boundaries are exercised
    monkeypatch.setattr(R, "CHUNK_ELEMENTS", 64 * 37)


def test_untrained_rows_finds_exact_zero_rows_of_a_tied_embedding():
    embed = _matrix()
    zero = [0, 5, 36, 37, 38, 299]
    embed[zero] = 0
    found = untrained_rows(embed)
    assert set(found) == _reference_untrained(embed) == set(zero)
    assert set(found.values()) == {EMBED_ZERO}


def test_bfloat16_rows_of_1e_23_count_as_untrained():
    embed = _matrix(dtype=torch.bfloat16)
    tiny = [3, 40, 41, 200]
    g = torch.Generator().manual_seed(1)
    embed[tiny] = (torch.randn(len(tiny), 64, generator=g) * 1e-23).to(torch.bfloat16)
    assert (embed[tiny] != 0).any(), "the planted rows must be non-zero bfloat16 values"
    assert set(untrained_rows(embed)) == _reference_untrained(embed) == set(tiny)


def test_small_but_nondegenerate_rows_are_not_untrained():
    embed = _matrix()
    embed[10] = _matrix(1, seed=3)[0] * 1e-6  # legitimately small
    embed[11] = 0
    embed[11, 7] = 1e-12  # one value above eps is enough to be trained
    embed[12] = 0
    assert set(untrained_rows(embed)) == {12}


def test_protected_ids_are_never_untrained():
    embed = _matrix()
    embed[[1, 2, 9]] = 0
    assert set(untrained_rows(embed, protected_ids=[1, 2])) == {9}


def test_rows_with_nan_are_not_untrained_and_absmax_shows_them():
    embed = _matrix()
    embed[4] = 0
    embed[4, 3] = float("nan")
    embed[6, 1] = float("-inf")
    embed[8] = 0
    absmax = row_absmax(embed)
    assert torch.isnan(absmax[4]) and torch.isinf(absmax[6])
    ref = np.abs(embed.to(torch.float64).numpy()).max(axis=1)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(absmax.numpy()[finite], ref[finite].astype(np.float32))
    assert set(untrained_rows(embed)) == {8}


def test_separate_lm_head_confirms_zero_rows():
    embed, head = _matrix(), _matrix(seed=1)
    embed[[7, 8, 9]] = 0
    head[[7, 8]] = 0  # row 9's lm_head row is trained and unique: not confirmed
    assert untrained_rows(embed, head) == {7: EMBED_AND_HEAD_ZERO, 8: EMBED_AND_HEAD_ZERO}


def test_llama31_like_lm_head_with_identical_nonzero_rows_confirms_them():
    embed, head = _matrix(dtype=torch.bfloat16), _matrix(seed=1, dtype=torch.bfloat16)
    rows = [20, 21, 22, 150]
    embed[rows] = 0
    shared = _matrix(1, seed=9)[0].to(torch.float64).round(decimals=2)
    # equal after rounding to 3 decimals, not bit-identical
    head[rows] = (shared + torch.tensor([0.0, 2e-4, -2e-4, 1e-4], dtype=torch.float64)[:, None]).to(torch.bfloat16)
    assert not torch.equal(head[20], head[21])
    embed[30] = 0  # zero input row whose output row is its own: trained (or at least not untrained)
    found = untrained_rows(embed, head)
    assert found == {r: EMBED_ZERO_HEAD_SHARED for r in rows}


def test_trained_mean_matches_float64_and_not_the_biased_all_rows_mean():
    m = _matrix(n=500)
    untrained = list(range(100, 220))
    m[untrained] = 0
    mean = trained_mean(m, untrained)
    assert mean.dtype == torch.float32
    ref = _reference_trained_mean(m, untrained)
    np.testing.assert_allclose(mean.numpy(), ref, rtol=1e-6, atol=1e-8)
    biased = m.to(torch.float64).mean(0).numpy()
    assert np.abs(biased - ref).min() > 1e-4  # the all-rows mean is pulled toward zero
    assert np.abs(mean.numpy() - biased).min() > 1e-4


def test_trained_mean_of_bfloat16_matches_float64_of_the_same_values():
    m = _matrix(n=400, dtype=torch.bfloat16)
    untrained = [0, 1, 2, 399]
    m[untrained] = torch.tensor(1e-23, dtype=torch.bfloat16)
    ref = _reference_trained_mean(m, untrained)
    np.testing.assert_allclose(trained_mean(m, untrained).numpy(), ref, rtol=1e-6, atol=1e-8)


def test_trained_mean_leaves_out_llama31_shared_lm_head_rows():
    head = _matrix(n=400)
    rows = list(range(50, 130))
    head[rows] = 3.0  # identical non-zero untrained rows: including them would shift the mean a lot
    ref = _reference_trained_mean(head, rows)
    np.testing.assert_allclose(trained_mean(head, rows).numpy(), ref, rtol=1e-6, atol=1e-8)
    assert np.abs(head.to(torch.float64).mean(0).numpy() - ref).min() > 0.5


def test_trained_mean_refuses_a_matrix_with_no_trained_rows():
    from healer.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no trained mean"):
        trained_mean(torch.zeros(4, 8), range(4))


def test_assign_trained_mean_writes_the_float64_mean_cast_to_bfloat16():
    m = _matrix(n=300, dtype=torch.bfloat16)
    untrained = [10, 11, 12, 13]
    m[untrained] = 0
    before = m.clone()
    assign_trained_mean(m, [10, 12], untrained)
    ref = torch.from_numpy(_reference_trained_mean(before, untrained))
    for r in (10, 12):
        assert m[r].dtype == torch.bfloat16
        assert_within_one_bf16_ulp(m[r], ref)
    assert torch.equal(m[[11, 13]], before[[11, 13]])
    others = [i for i in range(300) if i not in (10, 12)]
    assert torch.equal(m[others], before[others])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_stored_matrix_reads_the_same_rows_as_safetensors(tmp_path, dtype):
    p = tmp_path / "m.safetensors"
    save_file({"a": _matrix(n=10, dtype=dtype), "embed": _matrix(n=123, h=48, seed=4, dtype=dtype)}, str(p),
              metadata={"format": "pt"})
    ref = load_file(str(p))["embed"]
    m = StoredMatrix(p, "embed")
    assert m.shape == ref.shape and m.dtype == ref.dtype
    assert torch.equal(m[5:77], ref[5:77])
    assert torch.equal(m[[0, 122, 17]], ref[[0, 122, 17]])
    assert torch.equal(m.load(), ref)
    assert set(untrained_rows(m)) == set() and torch.equal(row_absmax(m), row_absmax(ref))
