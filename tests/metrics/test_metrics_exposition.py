"""The exporter of services/gradserve_services/metrics/: served over HTTP on 127.0.0.1, lint-clean for promtool,
Prometheus naming, low-cardinality labels, and the recorded numbers come back in a scrape."""

from __future__ import annotations

import random
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gradserve_services import metrics
from tests.support.promtool import check_metrics, scrape
from tests.support.recorded_metrics import record_one_step

# Label names a gradserve metric may carry: each has a small, fixed set of values.
ALLOWED_LABELS = {"method", "code", "phase", "mode", "outcome", "position", "direction", "le"}


@pytest.fixture
def metrics_port():
    port = metrics.start_metrics_server(0)
    try:
        yield port
    finally:
        metrics.stop_metrics_server(port)


def samples_by_name(exposition: str) -> dict[str, list]:
    by_name: dict[str, list] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            by_name.setdefault(sample.name, []).append(sample)
    return by_name


def sample_value(samples: dict[str, list], name: str, **labels: str) -> float:
    matching = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, f"{name}{labels}: {matching}"
    return matching[0]


def test_scrape_is_promtool_clean(metrics_port):
    rng = random.Random(1)
    for step in range(30):
        record_one_step(step, rng)
    exposition = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    returncode, lint_output = check_metrics(exposition)
    assert (returncode, lint_output) == (0, "")
    # A linter that never complains would make the assertion above worthless: show it does.
    bad_returncode, bad_output = check_metrics(
        "# HELP gradserve_bad_requests Bad.\n# TYPE gradserve_bad_requests counter\ngradserve_bad_requests 1\n"
    )
    assert bad_returncode != 0 and "_total" in bad_output


def test_every_declared_metric_is_exposed_with_its_type(metrics_port):
    record_one_step(0, random.Random(2))
    families = {f.name: f.type for f in text_string_to_metric_families(scrape(f"http://127.0.0.1:{metrics_port}/metrics"))}
    gradserve_families = {name: kind for name, kind in families.items() if name.startswith("gradserve_")}
    exposed_names = {name + "_total" if kind == "counter" else name for name, kind in gradserve_families.items()}
    assert exposed_names == set(metrics.METRIC_NAMES)
    for name, kind in gradserve_families.items():
        if kind == "histogram":
            assert name.endswith(("_seconds", "_ratio")) or name in (
                "gradserve_gradient_staleness", "gradserve_gradient_shard_cosine"), name
        assert not name.endswith("_milliseconds") and not name.endswith("_ms"), name


def test_labels_are_low_cardinality(metrics_port):
    rng = random.Random(3)
    for step in range(50):
        record_one_step(step, rng)
    samples = samples_by_name(scrape(f"http://127.0.0.1:{metrics_port}/metrics"))
    for name, series in samples.items():
        if name.startswith("gradserve_"):
            for sample in series:
                assert set(sample.labels) <= ALLOWED_LABELS, (name, sample.labels)
    phases = {s.labels["phase"] for s in samples["gradserve_step_phase_duration_seconds_count"]}
    assert phases == set(metrics.STEP_PHASES)


def test_recorded_step_and_rpc_values_come_back(metrics_port):
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    before = samples_by_name(scrape(url))

    def delta(after, name, **labels):
        previous = [s for s in before.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
        return sample_value(after, name, **labels) - (previous[0].value if previous else 0.0)

    metrics.record_step(
        duration_s=0.75, phases_s={"broadcast": 0.05, "compute": 0.5, "gather": 0.1, "apply": 0.1,
                                   "total": 0.75},
        samples=512, loss=0.4321, grad_norm=2.5, version=77, staleness=[0, 3, 3],
        applied=1, duplicate=2, dropped_stale=1, worker_failures=1, retries=2,
        bytes_raw=4000, bytes_compressed=1000, mode="async",
    )
    metrics.record_rpc("Step", "RESOURCE_EXHAUSTED", 0.002, bytes_received=1234, bytes_sent=56)
    metrics.set_workers_alive(7)
    metrics.set_active_sessions(3)
    after = samples_by_name(scrape(url))

    assert delta(after, "gradserve_samples_processed_total") == 512
    assert sample_value(after, "gradserve_loss") == pytest.approx(0.4321)
    assert sample_value(after, "gradserve_gradient_global_norm") == 2.5
    assert sample_value(after, "gradserve_parameter_version") == 77
    assert sample_value(after, "gradserve_gradient_compression_ratio") == 4.0
    assert delta(after, "gradserve_gradient_raw_bytes_total") == 4000
    assert delta(after, "gradserve_gradient_compressed_bytes_total") == 1000
    assert delta(after, "gradserve_step_duration_seconds_count", mode="async") == 1
    assert delta(after, "gradserve_step_duration_seconds_sum", mode="async") == pytest.approx(0.75)
    assert delta(after, "gradserve_step_phase_duration_seconds_sum", phase="compute") == pytest.approx(0.5)
    # Only the four known phases become label values: "total" is dropped, not exported.
    assert all(s.labels["phase"] != "total" for s in after["gradserve_step_phase_duration_seconds_count"])
    assert delta(after, "gradserve_gradient_staleness_count") == 3
    assert delta(after, "gradserve_gradient_staleness_bucket", le="2.0") == 1
    assert delta(after, "gradserve_gradient_staleness_bucket", le="3.0") == 3
    assert delta(after, "gradserve_updates_total", outcome="applied") == 1
    assert delta(after, "gradserve_updates_total", outcome="duplicate") == 2
    assert delta(after, "gradserve_updates_total", outcome="dropped_stale") == 1
    assert delta(after, "gradserve_worker_failures_total") == 1
    assert delta(after, "gradserve_worker_retries_total") == 2
    assert delta(after, "gradserve_rpc_requests_total", method="Step", code="RESOURCE_EXHAUSTED") == 1
    assert delta(after, "gradserve_rpc_received_bytes_total", method="Step") == 1234
    assert delta(after, "gradserve_rpc_sent_bytes_total", method="Step") == 56
    assert delta(after, "gradserve_rpc_duration_seconds_bucket", method="Step", le="0.0025") == 1
    assert sample_value(after, "gradserve_workers_alive") == 7
    assert sample_value(after, "gradserve_active_sessions") == 3


def test_duration_buckets_span_milliseconds_to_minutes():
    buckets = metrics.DURATION_BUCKETS_SECONDS
    assert list(buckets) == sorted(buckets)
    assert buckets[0] <= 0.001 and buckets[-1] >= 300
    # Adjacent buckets at most ~3x apart, so quantile estimates stay within one bucket's width.
    assert max(b / a for a, b in zip(buckets, buckets[1:])) <= 3.0


def test_server_binds_loopback_and_stops():
    port = metrics.start_metrics_server(0)
    try:
        assert port > 0
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        metrics.stop_metrics_server(port)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_mode_label_values_are_the_consistency_modes():
    from gradserve_services import metrics
    from gradserve_services.cluster.config import CONSISTENCY_MODES

    assert metrics.CONSISTENCY_MODES == CONSISTENCY_MODES
