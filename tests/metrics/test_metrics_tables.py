"""The tables' metrics as scraped: a step's row traffic, unique-row ratio and stored rows/bytes,
and the bytes saved against a dense push, from the StepResult fields a trainer reports."""

from __future__ import annotations

import pytest

from gradserve_services import metrics
from gradserve_services.cluster import StepResult
from gradserve_services.gateway.sessions import record_step_metrics
from tests.support.promtool import scrape

from .test_metrics_exposition import metrics_port, sample_value, samples_by_name  # noqa: F401 - fixture


def _table_step(**fields) -> StepResult:
    return StepResult(loss=0.5, version=1, samples=64, timings={"compute": 3.0}, **fields)


def test_a_step_with_tables_is_exported(metrics_port):  # noqa: F811 - the fixture
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    before = samples_by_name(scrape(url))
    pulled_before = sample_value(before, "gradserve_table_rows_total", direction="pulled")
    dense_before = sample_value(before, "gradserve_table_dense_equivalent_bytes_total")
    record_step_metrics(_table_step(rows_pulled=300, rows_pushed=290, rows_updated=250, row_lookups=1000,
                                    bytes_pulled=300 * 72, bytes_pushed=290 * 72, dense_table_bytes=10_000_000,
                                    table_rows=250, table_bytes=250 * 200), 0.01)
    after = samples_by_name(scrape(url))
    assert sample_value(after, "gradserve_table_rows_total", direction="pulled") - pulled_before == 300
    assert sample_value(after, "gradserve_table_dense_equivalent_bytes_total") - dense_before == 10_000_000
    assert sample_value(after, "gradserve_table_unique_row_ratio") == pytest.approx(0.25)
    assert sample_value(after, "gradserve_table_stored_rows") == 250
    assert sample_value(after, "gradserve_table_stored_bytes") == 50_000


def test_a_step_without_tables_leaves_them_alone(metrics_port):  # noqa: F811 - the fixture
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    metrics.TABLE_STORED_ROWS.set(17)
    pushed = sample_value(samples_by_name(scrape(url)), "gradserve_table_rows_total", direction="pushed")
    record_step_metrics(_table_step(), 0.01)
    after = samples_by_name(scrape(url))
    assert sample_value(after, "gradserve_table_stored_rows") == 17
    assert sample_value(after, "gradserve_table_rows_total", direction="pushed") == pushed
