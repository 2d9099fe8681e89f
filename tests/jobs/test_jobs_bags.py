"""Multi-hot bag columns in jobs (`dataset.bags`): CSV cells of separated values, Parquet list
columns and .npz values + offsets arrays, hashed value by value by the documented rule into the
bag inputs a graph's `embedding_bag` reads; bad bags refused naming the column and the file; and
each format trained end to end by `gradserve train` against a real gRPC service."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from gradserve_services.checkpoint import load_checkpoint
from gradserve_services.cluster import LocalExecutor
from gradserve_services.engine import Model
from gradserve_services.errors import InvalidArgument
from gradserve_services.jobs.bags import BagColumn
from gradserve_services.jobs.datasets import load_dataset
from gradserve_services.jobs.jobfile import parse_job
from gradserve_services.jobs.prepare import prepare_job
from tests.support.gateway import serving

ROWS = 64  # hash_rows of every job here
# Row r's bag and click: the click follows whether the bag holds "hot"; every fourth bag is empty.
TAGS = [[], ["hot", "red"], ["blue"], ["hot"], [], ["red", "blue", "green"], ["hot", "green"], ["green"]]
GRAPH = {"nodes": [{"name": "tag", "op": "embedding_bag", "inputs": ["tags"], "rows": ROWS, "dim": 2},
                   {"name": "site", "op": "embedding", "inputs": ["categorical"], "rows": ROWS, "dim": 2},
                   {"name": "bottom", "op": "dense", "inputs": ["dense"], "units": 2},
                   {"name": "both", "op": "concat", "inputs": ["tag", "site", "bottom"]},
                   {"name": "click", "op": "dense", "inputs": ["both"], "units": 1}],
         "output": "click", "loss": "binary_cross_entropy"}


def reference_row(text: str, seed: int, column: int) -> int:
    """The documented rule (hashing.py), spelt out with hashlib directly."""
    digest = hashlib.blake2b(f"{column}:{text}".encode(), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") % ROWS


def rows_of(samples: int):
    """Each row's bag, site, dense noise feature and click."""
    tags = [TAGS[r % len(TAGS)] for r in range(samples)]
    sites = [f"s{r % 3}" for r in range(samples)]
    noise = np.random.default_rng(0).standard_normal(samples).round(3).tolist()
    clicks = [int("hot" in bag) for bag in tags]
    return tags, sites, noise, clicks


def write_csv(folder, samples: int, separator: str = "|") -> str:
    tags, sites, noise, clicks = rows_of(samples)
    lines = ["site,tags,noise,clicked"] + [f"{s}, {separator.join(t)} ,{n},{c}"
                                           for s, t, n, c in zip(sites, tags, noise, clicks)]
    (folder / "d.csv").write_text("\n".join(lines) + "\n")
    return "d.csv"


def write_parquet(folder, samples: int) -> str:
    import pyarrow as arrow
    import pyarrow.parquet as parquet

    tags, sites, noise, clicks = rows_of(samples)
    tags = [None if r == 0 else bag for r, bag in enumerate(tags)]  # a null list: an empty bag too
    parquet.write_table(arrow.table({"site": sites, "tags": arrow.array(tags, arrow.list_(arrow.string())),
                                     "noise": noise, "clicked": clicks}), folder / "d.parquet")
    return "d.parquet"


def write_npz(folder, samples: int) -> str:
    tags, sites, noise, clicks = rows_of(samples)
    lengths = np.array([len(bag) for bag in tags])
    np.savez(folder / "d.npz", x=np.array(noise).reshape(-1, 1), y=np.array(clicks, dtype=np.float32).reshape(-1, 1),
             site=np.array(sites), **{"tags.values": np.array([v for bag in tags for v in bag]),
                                      "tags.offsets": np.concatenate([[0], np.cumsum(lengths)[:-1]])})
    return "d.npz"


WRITERS = {"csv": write_csv, "parquet": write_parquet, "npz": write_npz}


def dataset_of(folder, path: str, **extra) -> dict:
    keys = {} if path.endswith(".npz") else {"label": "clicked"}
    return {"path": path, "categorical": ["site"], "bags": ["tags"], "hash_rows": ROWS, "hash_seed": 3,
            **keys, **extra}


def load(folder, dataset: dict):
    return load_dataset(parse_job({"dataset": dataset, "model": {"mlp": {}}}, base_dir=folder).dataset,
                        "binary_cross_entropy")


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_bags_are_hashed_by_the_documented_rule_with_empty_bags(tmp_path, kind):
    data = load(tmp_path, dataset_of(tmp_path, WRITERS[kind](tmp_path, 16)))
    tags, sites, noise, _ = rows_of(16)
    bag = data.bags["tags"]
    # a bag's position follows the categorical columns': `site` is 0, `tags` is 1
    assert bag.lengths.tolist() == [len(t) for t in tags] and bag.lengths[0] == 0 and bag.lengths[4] == 0
    np.testing.assert_array_equal(bag.values, [reference_row(v, 3, 1) for t in tags for v in t])
    np.testing.assert_array_equal(data.ids[:, 0], [reference_row(s, 3, 0) for s in sites])
    np.testing.assert_allclose(data.x[:, 0], noise, rtol=1e-6)
    assert data.table_rows == ROWS and bag.offsets.dtype == bag.values.dtype == np.int64


def test_a_csv_separator_is_the_job_files_choice(tmp_path):
    data = load(tmp_path, dataset_of(tmp_path, write_csv(tmp_path, 8, separator=";"), bag_separator=";"))
    assert data.bags["tags"].lengths.tolist() == [len(t) for t in TAGS]


def test_batches_carry_each_rows_bag_as_values_and_offsets(tmp_path):
    job = {"dataset": dataset_of(tmp_path, write_csv(tmp_path, 40)), "model": GRAPH, "train": {"batch_size": 8}}
    prepared = prepare_job(parse_job(job, base_dir=tmp_path))
    assert prepared.spec["inputs"] == [{"name": "dense", "kind": "float", "features": 1},
                                       {"name": "categorical", "kind": "ids", "fields": 1},
                                       {"name": "tags", "kind": "bag"}]
    whole = prepared.dataset.bags["tags"]
    rows = prepared.order.indices(1)
    batch = prepared.split.train_inputs(rows)
    assert set(batch) == {"dense", "categorical", "tags.values", "tags.offsets"}
    source = prepared.split.bags_train["tags"]
    for position, row in enumerate(rows):  # each row's ids, in the batch's order
        start = batch["tags.offsets"][position]
        end = batch["tags.offsets"][position + 1] if position + 1 < len(rows) else len(batch["tags.values"])
        low = source.offsets[row]
        np.testing.assert_array_equal(batch["tags.values"][start:end], source.values[low:low + source.lengths[row]])
    assert sorted(np.concatenate([prepared.split.bags_train["tags"].lengths, prepared.split.bags_test["tags"].lengths])
                  ) == sorted(whole.lengths)


def test_taking_rows_of_bags_keeps_each_bag():
    bags = BagColumn.of_lengths(np.arange(6), [2, 0, 3, 1])
    taken = bags.take(np.array([3, 1, 0, 2, 2]))
    assert taken.offsets.tolist() == [0, 1, 1, 3, 6] and taken.values.tolist() == [5, 0, 1, 2, 3, 4, 2, 3, 4]
    assert bags.take(np.array([1])).values.shape == (0,)
    kept = bags.take(np.array([True, False, False, True]))  # dataset.drop_missing's mask
    assert kept.offsets.tolist() == [0, 2] and kept.values.tolist() == [0, 1, 5]


def test_bad_bags_are_refused_naming_the_column_and_the_file(tmp_path):
    import pyarrow as arrow
    import pyarrow.parquet as parquet

    cases = []
    (tmp_path / "gap.csv").write_text("tags,clicked\na|b,1\na||b,0\n")
    cases.append(({"path": "gap.csv", "label": "clicked"}, ["gap.csv", "line 3", "'tags'"]))
    parquet.write_table(arrow.table({"tags": ["a", "b"], "clicked": [1, 0]}), tmp_path / "flat.parquet")
    cases.append(({"path": "flat.parquet", "label": "clicked"}, ["flat.parquet", "'tags'", "list column"]))
    parquet.write_table(arrow.table({"tags": [["a", None], ["b"]], "clicked": [1, 0]}), tmp_path / "null.parquet")
    cases.append(({"path": "null.parquet", "label": "clicked"}, ["null.parquet", "'tags'", "null value"]))
    base = {"x": np.zeros((3, 1)), "y": np.array([1.0, 0.0, 1.0]), "tags.values": np.arange(4)}
    for name, offsets, words in (("down", [0, 3, 2], ["must not decrease", "offsets[2]"]),
                                 ("past", [0, 2, 5], ["past the end", "4 values"]),
                                 ("late", [1, 2, 3], ["must start at 0"]),
                                 ("short", [0, 2], ["one per row"])):
        np.savez(tmp_path / f"{name}.npz", **base, **{"tags.offsets": np.array(offsets)})
        cases.append(({"path": f"{name}.npz"}, [f"{name}.npz", "'tags.offsets'", *words]))
    np.savez(tmp_path / "none.npz", x=base["x"], y=base["y"])
    cases.append(({"path": "none.npz"}, ["none.npz", "'tags.values'"]))
    for dataset, words in cases:
        with pytest.raises(InvalidArgument) as raised:
            load(tmp_path, {"bags": ["tags"], **dataset})
        assert raised.value.field == "dataset.bags"
        for word in words:
            assert word in raised.value.message, (word, raised.value.message)


def test_bag_keys_are_checked():
    for dataset, field in (({"name": "digits", "bags": ["a"]}, "dataset.bags"),
                           ({"path": "a.csv", "bags": "tags"}, "dataset.bags"),
                           ({"path": "a.csv", "bags": ["a.b"]}, "dataset.bags"),
                           ({"path": "a.csv", "bags": ["dense"]}, "dataset.bags"),
                           ({"path": "a.csv", "bags": ["t"], "categorical": ["t"]}, "dataset.bags"),
                           ({"path": "a.csv", "bag_separator": ","}, "dataset.bag_separator")):
        with pytest.raises(InvalidArgument) as raised:
            parse_job({"dataset": dataset, "model": {"mlp": {}}})
        assert raised.value.field == field


# ----- end to end ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def service():
    """A real gRPC gateway on 127.0.0.1 (port 0) over in-process parameter servers and workers."""
    with serving(LocalExecutor(num_workers=2)) as address:
        yield address


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_each_format_trains_its_bags_through_gradserve_train(tmp_path, write_job, run_cli, service, kind):
    """The click is whether the bag holds "hot": the model learns it from the bag's table rows
    only (the site says nothing), and exactly the rows the hashed values reach were updated."""
    dataset = dataset_of(tmp_path, str(tmp_path / WRITERS[kind](tmp_path, 400)))
    job = write_job({"seed": 1, "dataset": dataset, "model": GRAPH,
                     "optimizer": {"name": "adam", "lr": 0.05}, "table_optimizer": {"name": "sparse_adam", "lr": 0.2},
                     "train": {"epochs": 6, "batch_size": 40, "workers": 2},
                     "service": {"target": service}, "out": str(tmp_path / "out")})
    code, out, err = run_cli("train", job)
    assert code == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["test_auc"] > 0.95 and summary["test_loss"] < 0.3, summary  # a constant scores 0.5, 0.66
    params, _ = load_checkpoint(tmp_path / "out" / "parameters.npz")
    spec = prepare_job(parse_job({"dataset": dataset, "model": GRAPH})).spec  # the spec the job sent
    initial = Model(spec).init_parameters(seed=1)
    reached = sorted({reference_row(v, 3, 1) for bag in TAGS for v in bag})
    changed = np.flatnonzero(np.any(params["tag.weight"] != initial["tag.weight"], axis=1))
    assert changed.tolist() == reached
