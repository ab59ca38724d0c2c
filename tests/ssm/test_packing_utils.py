"""ssm.packing: the seq_idx / cu_seqlens helpers, against positions counted by hand."""
import pytest
import torch

from ssm.packing import check_seq_idx, doc_starts, positions, seq_idx_from_cu_seqlens


def _positions_by_loop(seq_idx):
    out = []
    for row in seq_idx.tolist():
        pos, prev, p = [], None, 0
        for s in row:
            p = 0 if s != prev else p + 1
            pos.append(p)
            prev = s
        out.append(pos)
    return torch.tensor(out)


def test_cu_seqlens_to_seq_idx_and_positions():
    s = seq_idx_from_cu_seqlens(torch.tensor([0, 1, 3, 6, 6, 9]))
    assert s.tolist() == [[0, 1, 1, 2, 2, 2, 4, 4, 4]]  # the empty document 3 takes no position
    assert positions(s).tolist() == [[0, 0, 1, 0, 1, 2, 0, 1, 2]]
    assert doc_starts(s).tolist() == [[True, True, False, True, False, False, True, False, False]]


def test_positions_match_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    s = torch.cumsum(torch.rand(3, 40, generator=g) < 0.2, dim=1)
    assert torch.equal(positions(s), _positions_by_loop(s))


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2, 5, dtype=torch.long), r"shape \(2, 6\)"),
    (torch.zeros(2, 6), "integer"),
    (torch.tensor([[0, 1, 0, 1, 1, 1]] * 2), "row 0 decreases"),
])
def test_check_seq_idx_names_the_problem(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        check_seq_idx(bad, 2, 6)


def test_cu_seqlens_errors():
    with pytest.raises(ValueError, match="start at 0"):
        seq_idx_from_cu_seqlens(torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="must equal the sequence length 5"):
        seq_idx_from_cu_seqlens(torch.tensor([0, 3]), length=5)
