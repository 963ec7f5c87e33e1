"""The Grafana dashboard queries only metrics a real ``runner deploy`` of hello_world serves.

One deployment (Triton encoder and decoder, the Python pipeline in front, the HTTP front door)
takes requests from ``runner client`` (tensors above the inline threshold too) and over HTTP;
then every PromQL expression of the dashboard is read and each metric and grouping label it
names must be in the scrape, and ``runner status`` shows the counts the scrape has.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from .conftest import REPO_ROOT, interrupt
from .metrics_scrape import Scrape, scrape

DASHBOARD = REPO_ROOT / "containers" / "grafana" / "pipeline_runner.json"
RUNNER = [sys.executable, "-m", "pipeline_runner.cli"]

# Words of PromQL that are not metric names: functions, aggregations, keywords.
_PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile", "by",
    "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
    "label_values", "clamp_min", "clamp_max", "abs", "bool",
}  # fmt: skip


@dataclass(frozen=True)
class Query:
    metrics: set[str]
    grouping_labels: set[str]


def parse_promql(expr: str) -> Query:
    """The metric names and the ``by (...)`` labels of one PromQL expression.

    Grafana's ``label_values(EXPR, LABEL)`` counts LABEL as a grouping label of EXPR.
    """
    grouping: set[str] = set()
    template = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", expr)
    if template is not None:
        expr = template.group(1)
        grouping.add(template.group(2))
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values may hold anything
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    for labels in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", text):
        grouping.update(label.strip() for label in labels.split(",") if label.strip())
    text = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", text)
    words = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text)
    metrics = {w for w in words if w not in _PROMQL_WORDS and not w.startswith("$")}
    return Query(metrics, grouping)


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v.get("type") == "query"]
    return exprs


def test_the_promql_reader_finds_metric_names_and_grouping_labels() -> None:
    query = parse_promql(
        'histogram_quantile(0.99, sum by (operator, le) (rate(a_seconds_bucket{x=~"$d", y!="}"}[5m]))) / b_total'
    )
    assert query == Query({"a_seconds_bucket", "b_total"}, {"operator", "le"})
    assert parse_promql('label_values(c_total{d="x"}, operator)') == Query({"c_total"}, {"operator"})


@contextmanager
def deployed_hello_world() -> Iterator[dict[str, str]]:
    """``runner deploy deployments/hello_world.yaml`` on free ports; yields the URLs its banner prints."""
    proc = subprocess.Popen(
        [*RUNNER, "deploy", "deployments/hello_world.yaml", "--http-port", "0", "--metrics-port", "0"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        urls: dict[str, str] = {}
        for line in proc.stdout:
            key, _, value = line.strip().partition(": ")
            if key in ("HTTP", "metrics"):
                urls[key] = value.strip()
            if line.startswith("Press Ctrl-C"):
                break
        assert set(urls) == {"HTTP", "metrics"}, f"runner deploy exited early (code {proc.poll()})"
        yield urls
    finally:
        interrupt(proc)


def _runner(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RUNNER, *args], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def _settled(url: str, timeout_s: float = 15.0) -> Scrape:
    """A scrape once the pipeline's requests are all counted (the last replies race the scrape)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = scrape(url)
        if found.value("pipeline_runner_inflight_requests") == 0 or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_every_metric_the_dashboard_queries_is_in_a_real_scrape_and_status_agrees() -> None:
    with deployed_hello_world() as urls:
        assert urls["metrics"].startswith("http://127.0.0.1:") and urls["metrics"].endswith("/metrics")
        for size in ("16", "40000"):  # 160 kB int32 tensors go over the data plane
            result = _runner("client", "--requests", "20", "--size", size)
            assert result.returncode == 0, result.stdout + result.stderr
        body = {"inputs": [{"name": "input", "datatype": "INT32", "shape": [3], "data": [1, 2, 3]}]}
        reply = httpx.post(f"{urls['HTTP']}/v2/models/encoder_decoder/infer", json=body, timeout=30)
        assert reply.status_code == 200, reply.text
        found = _settled(urls["metrics"])
        status = _runner("status")
    assert status.returncode == 0, status.stderr
    assert urls["metrics"] in status.stdout

    for expr in dashboard_expressions():
        query = parse_promql(expr)
        assert query.metrics, expr
        missing = query.metrics - found.names()
        assert not missing, f"{expr}: {missing} not in the scrape"
        for metric in query.metrics:
            assert query.grouping_labels - {"le"} <= found.label_names(metric), expr

    assert found.value("pipeline_runner_requests_total", operator="encoder_decoder", outcome="ok") == 41
    assert found.value("pipeline_runner_triton_request_duration_seconds_count", model="encoder") == 41
    assert found.value("pipeline_runner_data_plane_bytes_total", operator="encoder", direction="fetched") >= 20 * 160_000
    assert found.value("pipeline_runner_http_requests_total", code="200") == 1
    # runner status shows each worker's served count: the scrape's count of its requests.
    rows = {line.split("│")[1].strip(): line for line in status.stdout.splitlines() if line.count("│") > 5}
    for worker in ("encoder.0", "encoder.1", "decoder.0", "decoder.1", "encoder_decoder.0", "encoder_decoder.1"):
        served = int(rows[worker].split("│")[6].strip())
        assert served == found.value("pipeline_runner_requests_total", worker=worker)
