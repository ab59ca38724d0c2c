"""ListOps generator: labels vs an independent evaluator, length filter, dedup, determinism, CLI."""
import collections

import pytest

from experiments.lra.data import generate, listops
from experiments.lra.data import load_task


@pytest.mark.parametrize("expr,value", [
    ("[MAX 4 5 3 ]", 5),
    ("[MIN 4 5 3 ]", 3),
    ("[MED 4 5 3 ]", 4),
    ("[MED 1 2 ]", 1),                  # int(1.5)
    ("[MED 9 2 8 1 ]", 5),              # int((2 + 8) / 2)
    ("[SM 9 8 7 ]", 4),                 # 24 mod 10
    ("[MAX 2 9 [MIN 4 7 ] ]", 9),
    ("[SM [MED 3 [MAX 0 1 ] 6 ] 7 ]", 0),
    ("( ( ( [MAX 2 ) 9 ) ( ( [MIN 4 ) 7 ) ] ) ]", 9),   # the original release's parenthesized form
    ("7", 7),
])
def test_evaluate_known_expressions(expr, value):
    assert listops.evaluate(expr) == value


@pytest.mark.parametrize("expr", ["[MAX 1 2", "[MAX ]", "[FOO 1 ]", "1 2", "]", "", "[SM 12 ]"])
def test_evaluate_rejects_malformed(expr):
    with pytest.raises(ValueError):
        listops.evaluate(expr)


def test_generated_labels_match_independent_evaluation():
    data = listops.generate(400, seed=3, min_length=20, max_length=200)
    for expr, label in data:
        n = len(expr.split())
        assert 20 < n < 200
        assert listops.evaluate(expr) == label
    assert len({e for e, _ in data}) == len(data)  # deduplicated
    # Full-length trees follow the published length filter too.
    for expr, label in listops.generate(5, seed=0):
        assert 500 < len(expr.split()) < 2000 and listops.evaluate(expr) == label


def test_tree_shape_follows_spec():
    data = listops.generate(300, seed=11, min_length=20, max_length=400)
    counts = collections.Counter(label for _, label in data)
    assert len(counts) == 10
    for expr, _ in data:
        depth = max_depth = 0
        args = []
        for tok in expr.split():
            if tok.startswith("["):
                depth += 1
                max_depth = max(max_depth, depth)
                args.append(0)
            elif tok == "]":
                assert 2 <= args.pop() <= 10
                depth -= 1
                if args:
                    args[-1] += 1
            else:
                if args:
                    args[-1] += 1
        assert max_depth <= 9  # depth-10 nodes are always leaves


def test_generator_is_deterministic():
    a = listops.generate_splits(30, 5, 5, seed=7, min_length=10, max_length=100)
    b = listops.generate_splits(30, 5, 5, seed=7, min_length=10, max_length=100)
    c = listops.generate_splits(30, 5, 5, seed=8, min_length=10, max_length=100)
    assert a == b and a != c
    exprs = [e for split in a.values() for e, _ in split]
    assert len(set(exprs)) == len(exprs)  # splits are disjoint


def test_generator_rejects_bad_lengths():
    with pytest.raises(ValueError, match="min_length"):
        listops.generate(1, seed=0, min_length=100, max_length=50)


def test_cli_writes_release_layout_deterministically(tmp_path, capsys):
    argv = ["listops", "--n-train", "40", "--n-val", "6", "--n-test", "6", "--seed", "5",
            "--min-length", "20", "--max-length", "150"]
    assert generate.main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert generate.main(argv + ["--out", str(tmp_path / "b")]) == 0
    for name in ("basic_train.tsv", "basic_val.tsv", "basic_test.tsv"):
        fa = (tmp_path / "a" / "listops-1000" / name).read_bytes()
        assert fa == (tmp_path / "b" / "listops-1000" / name).read_bytes()
        assert fa.startswith(b"Source\tTarget\n")
    ds = load_task("listops", tmp_path / "a")
    assert [len(ds[s]) for s in ("train", "val", "test")] == [40, 6, 6]
    rows = (tmp_path / "a/listops-1000/basic_train.tsv").read_text().splitlines()[1:]
    for row, (ids, label) in zip(rows, ds["train"]):
        expr, target = row.split("\t")
        assert int(target) == label == listops.evaluate(expr)
        assert len(ids) == len(expr.split())
