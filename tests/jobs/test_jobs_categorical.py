"""Categorical columns in jobs: the hashing trick, CSV / Parquet / npz sources, the named inputs they
feed, and the synthetic click-through set with its planted model (no service needed)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from gradserve_services.errors import InvalidArgument
from gradserve_services.jobs.datasets import load_dataset
from gradserve_services.jobs.hashing import hash_column, hash_value
from gradserve_services.jobs.jobfile import parse_job
from gradserve_services.jobs.prepare import prepare_job
from gradserve_services.jobs.click_metrics import log_loss, roc_auc
from gradserve_services.jobs.synthetic_ctr import make_synthetic_ctr

GRAPH = {"nodes": [{"name": "table", "op": "embedding", "inputs": ["categorical"], "rows": 64, "dim": 2},
                   {"name": "logit", "op": "dense", "inputs": ["table"], "units": 1}],
         "output": "logit", "loss": "binary_cross_entropy"}


def dataset_config(tmp_path, **dataset):
    return parse_job({"dataset": dataset, "model": {"mlp": {}}}, base_dir=tmp_path).dataset


def reference_row(text: str, rows: int, seed: int, column: int) -> int:
    """The documented rule, spelt out with hashlib directly."""
    digest = hashlib.blake2b(f"{column}:{text}".encode(), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") % rows


def test_hash_follows_the_documented_rule_for_strings_ints_and_missing():
    for value, text in (("apple", "apple"), ("  apple ", "apple"), (7, "7"), (np.int64(-3), "-3"), (7.0, "7"),
                        (None, ""), (float("nan"), ""), ("ü", "ü")):
        for seed, column in ((0, 0), (5, 3)):
            assert hash_value(value, 1000, seed=seed, column=column) == reference_row(text, 1000, seed, column)


def test_hash_is_seeded_and_salted_by_column():
    values = np.array([f"v{i}" for i in range(200)])
    base = hash_column(values, 1 << 20, seed=0, column=0)
    assert (base != hash_column(values, 1 << 20, seed=1, column=0)).mean() > 0.99
    assert (base != hash_column(values, 1 << 20, seed=0, column=1)).mean() > 0.99
    assert base.dtype == np.int64 and base.min() >= 0 and base.max() < 1 << 20


def test_hash_of_a_column_equals_the_per_value_hash_for_every_array_kind():
    for values in (np.array([3, 1, 3, 2]), np.array(["b", "a", "b", "c"]), np.array([3.0, 1.0, np.nan]),
                   np.array(["x", None, 5], dtype=object), np.array([True, False])):
        expected = [hash_value(value, 97, seed=2, column=1) for value in values.tolist()]
        np.testing.assert_array_equal(hash_column(values, 97, seed=2, column=1), expected)


def test_hash_is_the_same_in_another_process_with_another_hash_salt():
    code = ("from gradserve_services.jobs.hashing import hash_value; "
            "print([hash_value(v, 65536, seed=9, column=2) for v in ('a', 'bc', 12)])")
    outputs = set()
    for salt in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONHASHSEED": salt})
        assert done.returncode == 0, done.stderr
        outputs.add(done.stdout.strip())
    assert outputs == {str([hash_value(v, 65536, seed=9, column=2) for v in ("a", "bc", 12)])}


def test_csv_categorical_columns_are_hashed_and_kept_apart_from_the_features(tmp_path):
    (tmp_path / "clicks.csv").write_text("age,site,device,clicked\n31,news,7,1\n40,shop,,0\n22,news,9,0\n")
    data = load_dataset(dataset_config(tmp_path, path="clicks.csv", label="clicked", categorical=["site", "device"],
                                       hash_rows=1000, hash_seed=4), "binary_cross_entropy")
    assert data.feature_names == ("age",) and data.categorical_names == ("site", "device")
    np.testing.assert_array_equal(data.x[:, 0], [31, 40, 22])
    expected = [[reference_row(site, 1000, 4, 0), reference_row(device, 1000, 4, 1)]
                for site, device in (("news", "7"), ("shop", ""), ("news", "9"))]
    np.testing.assert_array_equal(data.ids, expected)
    assert data.table_rows == 1000 and data.task == "binary"


def test_parquet_gives_the_rows_csv_gives_for_the_same_values(tmp_path):
    import pyarrow as arrow
    import pyarrow.parquet as parquet

    table = arrow.table({"age": [31.0, None, 22.0, 50.0], "site": ["news", "shop", None, "news"],
                         "device": [7, 8, 9, 7], "clicked": [1, 0, 0, 1]})
    parquet.write_table(table, tmp_path / "clicks.parquet")
    (tmp_path / "clicks.csv").write_text("age,site,device,clicked\n31,news,7,1\n,shop,8,0\n22,,9,0\n50,news,7,1\n")
    common = dict(label="clicked", categorical=["site", "device"], hash_rows=512, drop_missing=True)
    from_parquet = load_dataset(dataset_config(tmp_path, path="clicks.parquet", **common), "binary_cross_entropy")
    from_csv = load_dataset(dataset_config(tmp_path, path="clicks.csv", **common), "binary_cross_entropy")
    assert len(from_parquet.x) == 3  # the row with a missing age is dropped; a missing site is a category
    np.testing.assert_array_equal(from_parquet.ids, from_csv.ids)
    np.testing.assert_array_equal(from_parquet.x, from_csv.x)
    np.testing.assert_array_equal(from_parquet.y, from_csv.y)
    assert from_parquet.ids[1, 0] == reference_row("", 512, 0, 0)


def test_parquet_problems_name_the_key(tmp_path):
    import pyarrow as arrow
    import pyarrow.parquet as parquet

    parquet.write_table(arrow.table({"a": ["x", "y"], "label": [0, 1]}), tmp_path / "d.parquet")
    with pytest.raises(InvalidArgument) as raised:
        load_dataset(dataset_config(tmp_path, path="d.parquet"))
    assert raised.value.field == "dataset.features"  # a string column needs `categorical:`
    with pytest.raises(InvalidArgument) as raised:
        load_dataset(dataset_config(tmp_path, path="d.parquet", categorical=["b"]))
    assert raised.value.field == "dataset.categorical"
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(InvalidArgument) as raised:
        load_dataset(dataset_config(tmp_path, path="bad.parquet"))
    assert raised.value.field == "dataset.path"


def test_npz_categorical_arrays_of_one_and_several_columns(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((3, 2)), y=np.array([0, 1, 1]),
             ids=np.array([[5, 6], [7, 8], [5, 8]]), site=np.array(["a", "b", "a"]))
    data = load_dataset(dataset_config(tmp_path, path="d.npz", categorical=["ids", "site"], hash_rows=100),
                        "binary_cross_entropy")
    assert data.ids.shape == (3, 3)
    np.testing.assert_array_equal(data.ids[:, 1], [reference_row(t, 100, 0, 1) for t in ("6", "8", "8")])
    np.testing.assert_array_equal(data.ids[:, 2], [reference_row(t, 100, 0, 2) for t in ("a", "b", "a")])
    np.savez(tmp_path / "f.npz", x=np.ones((2, 1)), y=np.array([0, 1]), ids=np.array([0.5, 1.5]))
    with pytest.raises(InvalidArgument) as raised:
        load_dataset(dataset_config(tmp_path, path="f.npz", categorical=["ids"]))
    assert raised.value.field == "dataset.categorical"


def test_categorical_data_feeds_named_inputs_of_a_graph(tmp_path):
    (tmp_path / "c.csv").write_text("site,clicked\n" + "".join(f"s{i % 7},{i % 2}\n" for i in range(40)))
    job = {"dataset": {"path": "c.csv", "label": "clicked", "categorical": ["site"], "hash_rows": 64},
           "model": GRAPH}
    prepared = prepare_job(parse_job(job, base_dir=tmp_path))
    assert prepared.spec["inputs"] == [{"name": "categorical", "kind": "ids", "fields": 1}]  # no dense columns
    batch = prepared.split.train_inputs(prepared.order.indices(0))
    assert set(batch) == {"categorical"} and batch["categorical"].shape == (min(64, 32), 1)
    with pytest.raises(InvalidArgument) as raised:
        prepare_job(parse_job({**job, "model": {**GRAPH, "nodes": [{**GRAPH["nodes"][0], "rows": 63},
                                                                    GRAPH["nodes"][1]]}}, base_dir=tmp_path))
    assert raised.value.field == "model.nodes[table]"
    with pytest.raises(InvalidArgument) as raised:
        prepare_job(parse_job({**job, "model": {"mlp": {}}}, base_dir=tmp_path))
    assert raised.value.field == "model.mlp"


def test_categorical_keys_are_checked():
    for dataset, field in (({"name": "digits", "categorical": ["a"]}, "dataset.categorical"),
                           ({"name": "csv", "path": "a.csv", "categorical": "site"}, "dataset.categorical"),
                           ({"name": "csv", "path": "a.csv", "hash_rows": 0}, "dataset.hash_rows"),
                           ({"name": "synthetic_ctr", "zipf": 0}, "dataset.zipf"),
                           ({"name": "synthetic_ctr", "path": "x.csv"}, "dataset.path")):
        with pytest.raises(InvalidArgument) as raised:
            parse_job({"dataset": dataset, "model": {"mlp": {}}})
        assert raised.value.field == field


def test_synthetic_ctr_is_seeded_zipf_distributed_and_drawn_from_its_planted_model():
    data = make_synthetic_ctr(100_000, seed=3, fields=4, vocab=50, zipf=1.5)
    again = make_synthetic_ctr(100_000, seed=3, fields=4, vocab=50, zipf=1.5)
    np.testing.assert_array_equal(data.ids, again.ids)
    np.testing.assert_array_equal(data.clicks, again.clicks)
    assert (data.ids != make_synthetic_ctr(100_000, seed=4, fields=4, vocab=50, zipf=1.5).ids).mean() > 0.5
    assert data.ids.shape == (100_000, 4) and data.dense.shape == (100_000, 13)
    weights = np.arange(1, 51, dtype=float) ** -1.5
    for field in range(4):  # the sorted id frequencies follow the Zipf law
        frequencies = np.sort(np.bincount(data.ids[:, field], minlength=50))[::-1] / 100_000
        np.testing.assert_allclose(frequencies[:5], (weights / weights.sum())[:5], atol=0.01)
    # clicks are Bernoulli(p): their mean matches p's, and the planted log-loss is p's mean entropy
    assert abs(data.clicks.mean() - data.click_probability.mean()) < 0.01
    p = data.click_probability
    logits = np.log(p) - np.log1p(-p)
    entropy = float(np.mean(-p * np.log(p) - (1 - p) * np.log1p(-p)))
    assert abs(log_loss(data.clicks, logits) - entropy) < 0.01
    np.testing.assert_allclose(logits, data.model.logits(data.dense, data.ids), rtol=1e-9, atol=1e-9)
    assert log_loss(data.clicks, logits) < log_loss(data.clicks, np.full_like(logits, logits.mean())) - 0.02


def test_roc_auc_matches_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    clicks = rng.random(2000) < 0.3
    scores = np.round(rng.standard_normal(2000) + clicks, 1)  # rounded: many ties
    assert roc_auc(clicks, scores) == pytest.approx(roc_auc_score(clicks, scores), abs=1e-12)
    assert np.isnan(roc_auc(np.zeros(5), np.arange(5.0)))


def test_synthetic_ctr_job_splits_the_planted_probability_with_the_rows():
    nodes = [{**GRAPH["nodes"][0], "rows": 20}, {"name": "both", "op": "concat", "inputs": ["table", "dense"]},
             {**GRAPH["nodes"][1], "inputs": ["both"]}]
    job = parse_job({"dataset": {"name": "synthetic_ctr", "samples": 2000, "fields": 3, "vocab": 20},
                     "model": {**GRAPH, "nodes": nodes}})
    prepared = prepare_job(job)
    split = prepared.split
    assert prepared.spec["inputs"][0] == {"name": "dense", "kind": "float", "features": 13}
    assert split.ids_test.shape == (400, 3) and split.click_probability_test.shape == (400,)
    data = make_synthetic_ctr(2000, seed=0, fields=3, vocab=20)
    # each held-out row keeps its own planted probability: recompute it from that row's ids and raw features
    raw = split.feature_scaler.inverse(split.x_test).astype(np.float64)
    recomputed = 1 / (1 + np.exp(-data.model.logits(raw, split.ids_test)))
    np.testing.assert_allclose(recomputed, split.click_probability_test, rtol=1e-4, atol=1e-5)


def test_the_dlrm_example_prepares_as_written():
    from pathlib import Path

    import yaml

    examples = Path(__file__).resolve().parents[2] / "examples"
    raw = yaml.safe_load((examples / "ctr_dlrm.yaml").read_text())
    raw["dataset"]["samples"] = 5000  # the same model and data shape, fewer rows
    prepared = prepare_job(parse_job(raw, name="ctr_dlrm", base_dir=examples))
    tables = [node for node in prepared.spec["nodes"] if node["op"] == "embedding"]
    assert [node["field"] for node in tables] == list(range(26))
    assert {node["rows"] for node in tables} == {raw["dataset"]["vocab"]} and prepared.split.ids_train.shape[1] == 26
    assert prepared.spec["loss"] == "binary_cross_entropy" and prepared.job.train.batch_size == 512


def test_a_checkpoint_of_other_hashing_is_not_resumed(tmp_path):
    (tmp_path / "c.csv").write_text("site,clicked\n" + "".join(f"s{i % 7},{i % 2}\n" for i in range(40)))
    job = {"dataset": {"path": "c.csv", "label": "clicked", "categorical": ["site"], "hash_rows": 64},
           "model": GRAPH}
    fingerprint = prepare_job(parse_job(job, base_dir=tmp_path)).fingerprint()
    assert fingerprint == prepare_job(parse_job(job, base_dir=tmp_path)).fingerprint()
    reseeded = {**job, "dataset": {**job["dataset"], "hash_seed": 1}}
    assert prepare_job(parse_job(reseeded, base_dir=tmp_path)).fingerprint() != fingerprint


@pytest.mark.parametrize("dataset, model, field", [
    ({"categorical": ["nope"]}, GRAPH, "dataset.categorical"),
    ({"categorical": ["site"]}, {"mlp": {}}, "model.mlp"),
    ({"categorical": ["site"], "hash_rows": 65}, GRAPH, "model.nodes[table]"),
])
def test_a_bad_categorical_job_stops_before_training_naming_the_key(tmp_path, write_job, run_cli, dataset, model,
                                                                     field):
    (tmp_path / "c.csv").write_text("site,clicked\na,1\nb,0\na,0\nc,1\n")
    job = write_job({"dataset": {"path": str(tmp_path / "c.csv"), "label": "clicked", **dataset}, "model": model})
    # nothing listens on port 1: a job that got as far as training would exit 1, not 2
    code, out, err = run_cli("train", job, "--target", "127.0.0.1:1")
    assert code == 2 and out == "" and field in err, err
