"""deploy/grafana/iam-grpc.json queries only what the service exports: every metric name and label
its PromQL names is in the GET /metrics text (and the label sets) of a real running server."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.metrics import MetricWrapperBase

from iam_grpc.proto import token_pb2, token_pb2_grpc
from iam_grpc.testing import running_service
from tests.conftest import Backend

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "iam-grpc.json"
# Labels Prometheus adds to every scraped series (the ServiceMonitor's targets), not the service.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
_METRIC = re.compile(r"\b(iam_[a-z0-9_]+)\b")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"\b([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")


def expressions(node: Any) -> list[str]:
    """Every PromQL text of the dashboard: panel targets and the template variables' queries."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            else:
                found.extend(expressions(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(expressions(item))
    return found


def exported(text: str) -> set[str]:
    """The series names a /metrics text can carry: each TYPE line's name, histograms expanded."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.update(name + suffix for suffix in HISTOGRAM_SERIES) if kind == "histogram" else names.add(
                name
            )
    return names


def label_sets(metrics: object) -> dict[str, set[str]]:
    """Each metric's label names, from the collectors the running service registered."""
    out: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name + ("_total" if value._type == "counter" else "")
            labels = set(value._labelnames)
            if value._type == "histogram":
                out.update({name + suffix: labels | {"le"} for suffix in HISTOGRAM_SERIES})
            else:
                out[name] = labels
    return out


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "iam-grpc"
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
    assert len(expressions(dashboard)) >= 20


async def test_every_metric_and_label_the_dashboard_queries_is_exported(
    tmp_path: Path, backend: Backend
) -> None:
    async with running_service(tmp_path, backend.isolated()) as running:
        async with running.channel() as channel:
            stub = token_pb2_grpc.TokenServiceStub(channel)
            await stub.GetJwks(token_pb2.GetJwksRequest(), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError):  # counted in iam_caller_denied_total
                await stub.GetJwks(
                    token_pb2.GetJwksRequest(), metadata=(("x-iam-api-key", "wrong"),), timeout=5
                )
        url = f"http://127.0.0.1:{running.http_port}/metrics"

        def fetch() -> str:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return str(answer.read().decode())

        text = await asyncio.to_thread(fetch)
        labels = label_sets(running.app.metrics)
    names = exported(text)
    assert {"iam_rpc_total", "iam_rpc_duration_seconds_bucket", "iam_serving"} <= names  # the parse works
    assert set(labels) <= names  # every collector is in the text, with its series names as computed

    queried: set[str] = set()
    for expression in expressions(json.loads(DASHBOARD.read_text())):
        used = set(_METRIC.findall(expression))
        assert used, expression
        queried |= used
        missing = used - names
        assert not missing, f"{missing} in {expression!r} are not in /metrics"
        allowed = TARGET_LABELS.union(*(labels[name] for name in used))
        grouped = {label.strip() for group in _GROUPING.findall(expression) for label in group.split(",")}
        matched = set(_MATCHER.findall(expression))
        assert (grouped | matched) - {""} <= allowed, expression
    # the dashboard shows the service's health, traffic, latency and the security counters at least
    assert {
        "iam_serving",
        "iam_rpc_total",
        "iam_rpc_duration_seconds_bucket",
        "iam_caller_denied_total",
        "iam_refresh_total",
        "iam_login_total",
        "iam_ratelimit_refusals_total",
    } <= queried
