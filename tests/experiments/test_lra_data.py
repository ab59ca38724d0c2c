"""LRA readers on tiny fixture files in every official layout: shapes, labels, vocab, splits, errors."""
import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from experiments.lra.data import listops
from experiments.lra.data import LISTOPS_VOCAB, collate, load_task
from experiments.lra.data.fixtures import write_fixtures
from experiments.lra.tasks import TASKS
from experiments.lra.tasks import task_info

SPLIT_SIZES = {
    "listops": (8, 8, 8),
    "text": (8, 8, 8),
    "retrieval": (8, 8, 8),
    "image": (18, 2, 4),        # 20 train pickled images: last tenth is val
    "pathfinder": (31, 3, 5),   # 40 listed, one 0-byte skipped, 80/10/10 of 39
    "pathx": (31, 3, 5),
}


@pytest.mark.parametrize("task", TASKS)
def test_every_task_reads_back(tmp_path, task):
    info = task_info(task)
    ds = load_task(task, write_fixtures(tmp_path, task))
    assert tuple(len(ds[s]) for s in ("train", "val", "test")) == SPLIT_SIZES[task]
    for split in ("train", "val", "test"):
        labels = set()
        for i in range(len(ds[split])):
            ids, label = ds[split][i]
            assert ids.dtype == torch.long
            assert ids.dim() == (2 if info.two_tower else 1)
            if info.two_tower:
                assert ids.shape[0] == 2
            assert 0 < ids.shape[-1] <= info.seq_len
            assert int(ids.min()) >= 0 and int(ids.max()) < info.vocab_size
            assert isinstance(label, int) and 0 <= label < info.n_classes
            labels.add(label)
        assert len(labels) >= 2, f"{task}/{split}: a single class in the fixture"
    x, lengths, y = collate([ds["train"][i] for i in range(4)])
    assert y.shape == (4,) and x.shape[0] == 4
    assert lengths.shape == ((4, 2) if info.two_tower else (4,))
    if task in ("image", "pathfinder", "pathx"):
        assert x.shape == (4, info.seq_len) and (lengths == info.seq_len).all()


def test_listops_tokens_and_labels(tmp_path):
    ds = load_task("listops", write_fixtures(tmp_path, "listops"))
    # The first train line is in the release's parenthesized form: [MAX 2 9 [MIN 4 7 ] ] -> 9.
    ids, label = ds["train"][0]
    v = LISTOPS_VOCAB
    expected = [v["[MAX"], v["2"], v["9"], v["[MIN"], v["4"], v["7"], v["]"], v["]"]]
    assert ids.tolist() == expected and label == 9
    inverse = {i: t for t, i in v.items()}
    for split in ("train", "val", "test"):
        for ids, label in ds[split]:
            assert listops.evaluate(" ".join(inverse[i] for i in ids.tolist())) == label


def test_text_is_bytes_plus_one_and_test_doubles_as_val(tmp_path):
    root = write_fixtures(tmp_path, "text")
    ds = load_task("text", root)
    assert ds["val"] is ds["test"]
    files = sorted((root / "aclImdb/train/neg").glob("*.txt")) + sorted((root / "aclImdb/train/pos").glob("*.txt"))
    for i, path in enumerate(files):
        ids, label = ds["train"][i]
        raw = path.read_bytes()
        assert ids.tolist() == [b + 1 for b in raw]
        assert label == (1 if path.parent.name == "pos" else 0)
    assert max(int(ids.max()) for ids, _ in ds["train"]) > 128  # UTF-8 multi-byte characters


def test_retrieval_pairs_and_collate_lengths(tmp_path):
    root = write_fixtures(tmp_path, "retrieval")
    ds = load_task("retrieval", root)
    rows = [line.split(b"\t") for line in (root / "tsv_data/new_aan_pairs.eval.tsv").read_bytes().splitlines()]
    x, lengths, y = collate([ds["val"][i] for i in range(len(rows))], pad_id=0)
    assert x.shape == (len(rows), 2, int(lengths.max()))
    for i, row in enumerate(rows):
        text1, text2 = row[3], row[4]
        assert lengths[i].tolist() == [len(text1), len(text2)]
        assert x[i, 0, :len(text1)].tolist() == [b + 1 for b in text1]
        assert x[i, 1, :len(text2)].tolist() == [b + 1 for b in text2]
        assert (x[i, 0, len(text1):] == 0).all() and (x[i, 1, len(text2):] == 0).all()
        assert int(y[i]) == int(row[0])


def test_image_grayscale_and_split(tmp_path):
    root = write_fixtures(tmp_path, "image")
    ds = load_task("image", root)
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        with open(root / "cifar-10-batches-py" / name, "rb") as f:
            batches.append(pickle.load(f, encoding="bytes"))
    rgb = torch.from_numpy(np.concatenate([b[b"data"] for b in batches])).double().view(-1, 3, 1024)
    gray = (0.2989 * rgb[:, 0] + 0.5870 * rgb[:, 1] + 0.1140 * rgb[:, 2]).round().long()  # (20, 1024)
    labels = sum((b[b"labels"] for b in batches), [])
    got = [ds["train"][i] for i in range(18)] + [ds["val"][i] for i in range(2)]
    assert torch.equal(torch.stack([g for g, _ in got]), gray)
    assert [label for _, label in got] == labels


def test_pathfinder_skips_empty_images_and_matches_pngs(tmp_path, caplog):
    root = write_fixtures(tmp_path, "pathfinder")
    with caplog.at_level(logging.WARNING, logger="experiments.lra.data"):
        ds = load_task("pathfinder", root)
    assert "skipped 1 empty" in caplog.text
    assert ds["train"].n_skipped == 1
    seen = set()
    for split in ("train", "val", "test"):
        for path, label in zip(ds[split].paths, ds[split].labels):
            k = int(path.stem.split("_")[1])
            assert label == k % 2  # the fixture's labelling rule
            seen.add(k)
        ids, _ = ds[split][0]
        pixels = np.asarray(Image.open(ds[split].paths[0]).convert("L")).reshape(-1)
        assert ids.tolist() == pixels.tolist()
    assert seen == set(range(40)) - {3}
    again = load_task("pathfinder", root)
    assert again["test"].paths == ds["test"].paths  # the split is fixed


def test_max_len_truncates(tmp_path):
    root = write_fixtures(tmp_path, "text")
    full, short = load_task("text", root), load_task("text", root, max_len=16)
    for (a, _), (b, _) in zip(full["train"], short["train"]):
        assert b.tolist() == a[:16].tolist()
    assert load_task("image", write_fixtures(tmp_path, "image"), max_len=100)["test"][0][0].shape == (100,)


def test_collate_pads_with_pad_id():
    batch = [(torch.tensor([3, 4, 5]), 1), (torch.tensor([7]), 0)]
    x, lengths, y = collate(batch, pad_id=9)
    assert x.tolist() == [[3, 4, 5], [7, 9, 9]]
    assert lengths.tolist() == [3, 1] and y.tolist() == [1, 0]
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


@pytest.mark.parametrize("task,needle", [
    ("listops", "python -m experiments.lra.data.generate listops"),
    ("pathfinder", "python -m experiments.lra.data.generate pathfinder"),
    ("pathx", "--resolution 128"),
    ("text", "aclImdb"),
    ("retrieval", "new_aan_pairs.train.tsv"),
    ("image", "cifar-10-batches-py/data_batch_1"),
])
def test_missing_data_names_files_and_command(tmp_path, task, needle):
    with pytest.raises(FileNotFoundError) as err:
        load_task(task, tmp_path / "nothing_here")
    assert needle in str(err.value)
    if task == "listops":
        assert "listops-1000/basic_train.tsv" in str(err.value)
    if task == "pathfinder":
        assert "pathfinder32/curv_contour_length_14/metadata" in str(err.value)


def _corrupt_line(path, lineno, text):
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("task,rel,lineno,text", [
    ("listops", "listops-1000/basic_val.tsv", 3, "[MAX 1 2 ]"),              # no label column
    ("listops", "listops-1000/basic_test.tsv", 2, "[MAX 1 X2 ]\t2"),          # unknown token
    ("retrieval", "tsv_data/new_aan_pairs.test.tsv", 4, "1\tonly\tthree"),
    ("retrieval", "tsv_data/new_aan_pairs.train.tsv", 2, "yes\ta\tb\tc\td"),
    ("pathfinder", "pathfinder32/curv_contour_length_14/metadata/1.npy", 5, "imgs/1 sample_24.png 24"),
])
def test_malformed_line_names_file_and_line(tmp_path, task, rel, lineno, text):
    root = write_fixtures(tmp_path, task)
    _corrupt_line(root / rel, lineno, text)
    with pytest.raises(ValueError) as err:
        load_task(task, root)
    assert rel.split("/")[-1] in str(err.value) and f"line {lineno}" in str(err.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="task must be one of"):
        task_info("imagenet")
    with pytest.raises(ValueError, match="max_len"):
        load_task("listops", ".", max_len=0)
    with pytest.raises(ValueError, match="pathfinder_resolution"):
        load_task("pathfinder", ".", pathfinder_resolution=48)
    with pytest.raises(TypeError):
        collate([(torch.tensor([1]), 0)], 0)  # pad_id is keyword-only


def test_saved_datasets_dataset_for_text_and_image(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = ["good film", "bad film", "café!", "meh"]
    datasets.DatasetDict({
        s: datasets.Dataset.from_dict({"text": texts, "label": [1, 0, 1, 0]}) for s in ("train", "test")
    }).save_to_disk(str(tmp_path / "imdb"))
    ds = load_task("text", tmp_path)
    assert ds["val"] is ds["test"] and len(ds["train"]) == 4
    assert ds["train"][2][0].tolist() == [b + 1 for b in "café!".encode()] and ds["train"][2][1] == 1
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8)
    imgs = [Image.fromarray(a) for a in rgb]
    datasets.DatasetDict({
        s: datasets.Dataset.from_dict({"img": imgs, "label": list(range(10))},
                                      features=datasets.Features({"img": datasets.Image(),
                                                                  "label": datasets.Value("int64")}))
        for s in ("train", "test")
    }).save_to_disk(str(tmp_path / "cifar10"))
    ds = load_task("image", tmp_path)
    assert [len(ds[s]) for s in ("train", "val", "test")] == [9, 1, 10]
    r, g, b = (torch.from_numpy(rgb[..., c]).double() for c in range(3))
    gray = (0.2989 * r + 0.5870 * g + 0.1140 * b).round().long().view(10, -1)  # (10, 1024)
    assert torch.equal(torch.stack([ds["test"][i][0] for i in range(10)]), gray)
    assert ds["val"][0][1] == 9


# --- refusals and reports before training: empty splits, non-UTF-8 text, truncation -----------

def _header_only(path):
    path.write_text("Source\tTarget\n", encoding="utf-8")


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_header_only_or_empty_listops_split_names_the_file(tmp_path, split):
    root = write_fixtures(tmp_path, "listops")
    path = root / "listops-1000" / f"basic_{split}.tsv"
    _header_only(path)
    with pytest.raises(ValueError, match=rf"listops {split} split is empty: no examples in .*basic_{split}\.tsv"):
        load_task("listops", root)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"basic_{split}\.tsv"):
        load_task("listops", root)


def test_empty_retrieval_and_text_splits_name_their_source(tmp_path):
    root = write_fixtures(tmp_path / "aan", "retrieval")
    (root / "tsv_data" / "new_aan_pairs.eval.tsv").write_bytes(b"")
    with pytest.raises(ValueError, match=r"retrieval val split is empty: .*new_aan_pairs\.eval\.tsv"):
        load_task("retrieval", root)
    root = write_fixtures(tmp_path / "imdb", "text")
    for txt in (root / "aclImdb" / "test").glob("*/*.txt"):
        txt.unlink()
    with pytest.raises(ValueError, match=r"text test split is empty: .*aclImdb/test"):
        load_task("text", root)


@pytest.mark.parametrize("task,rel", [
    ("listops", "listops-1000/basic_val.tsv"),
    ("pathfinder", "pathfinder32/curv_contour_length_14/metadata/1.npy"),
])
def test_non_utf8_input_names_file_and_line(tmp_path, task, rel):
    root = write_fixtures(tmp_path, task)
    path = root / rel
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2][:3] + b"\xff" + lines[2][3:]  # line 3
    path.write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match=rf"{path.name}, line 3: not UTF-8 text \(byte 0xff at column 4\)"):
        load_task(task, root)


def test_truncation_is_reported_once_per_split(tmp_path, caplog):
    root = write_fixtures(tmp_path, "listops")
    full = load_task("listops", root)
    max_len = 20
    with caplog.at_level(logging.WARNING, logger="experiments.lra.data"):
        cut = load_task("listops", root, max_len=max_len)
    records = [r.getMessage() for r in caplog.records]
    for split in ("train", "val", "test"):
        lengths = [len(ids) for ids, _ in full[split]]
        long = [n for n in lengths if n > max_len]
        assert long, "the fixture must hold sequences longer than max_len"
        expected = (f"LRA listops {split}: {len(long)} of {len(lengths)} examples truncated from up to {max(long)} "
                    f"(shortest cut: {min(long)}) to {max_len} tokens")
        assert sum(m.startswith(expected) for m in records) == 1, (expected, records)
        assert cut[split].truncated == (len(long), max(long), max_len)
    assert len(records) == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="experiments.lra.data"):
        load_task("listops", root)  # default max_len: nothing cut, nothing said
    assert not caplog.records


def test_pixel_truncation_reported(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="experiments.lra.data"):
        ds = load_task("image", write_fixtures(tmp_path, "image"), max_len=100)
    assert ds["test"].truncated == (4, 1024, 100)
    assert "LRA image test: 4 of 4 examples truncated from up to 1024" in caplog.text
