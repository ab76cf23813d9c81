"""The metrics table of docs/REFERENCE.md against the metrics the server defines: names, types and labels.

A row may group two metrics: ``llm_server_cache_hits_total`` / ``_misses_total`` (the continuation replaces as
many trailing words of the first name as it has).
"""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from server.metrics import KV_METRICS, Metrics

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "REFERENCE.md"


def defined() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Exposed name -> (type, label names) of every metric of :class:`Metrics`."""
    found = {}
    for value in vars(Metrics(CollectorRegistry())).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name + ("_total" if value._type == "counter" else "")
            found[name] = (value._type, tuple(value._labelnames))
    for name, kind, _, _ in KV_METRICS:  # read from the engines at scrape time by one collector
        found[name + ("_total" if kind == "counter" else "")] = (kind, ("model_name",))
    return found


def expand(cell: str) -> list[str]:
    names = re.findall(r"`([a-z0-9_]+)`", cell)
    full = []
    for name in names:
        if name.startswith("_"):
            words = names[0].split("_")
            name = "_".join(words[: len(words) - name.count("_")]) + name
        full.append(name)
    return full


def documented() -> dict[str, tuple[str, tuple[str, ...]]]:
    text = REFERENCE.read_text(encoding="utf-8")
    table = text[text.index("\n## Metrics\n") :]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or not cells[0].startswith("`"):
            continue
        labels = tuple(label.strip() for label in cells[2].split(",") if label.strip())
        for name in expand(cells[0]):
            rows[name] = (cells[1], labels)
    return rows


def test_every_metric_has_a_row_with_its_type_and_labels() -> None:
    assert documented() == defined()


def test_grouped_metric_names_expand() -> None:
    assert expand("`llm_server_cache_hits_total` / `_misses_total`") == [
        "llm_server_cache_hits_total",
        "llm_server_cache_misses_total",
    ]
    assert expand("`llm_server_num_requests_running` / `_waiting`") == [
        "llm_server_num_requests_running",
        "llm_server_num_requests_waiting",
    ]
