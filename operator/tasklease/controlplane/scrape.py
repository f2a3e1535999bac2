"""Prometheus text exposition as the tests and the benchmark read it: the operator's
`/metrics` and the API server's.

A scrape is a `{key: value}` dict whose key names a sample by its name and labels, the labels
sorted by name (`sample_key`): exporters order labels as they please (client_golang, the API
server's, writes a bucket's `le` after the others; prometheus_client, the operator's, sorts
them all), and a sample must be found the same way whichever wrote it. Parsing is
prometheus_client's own, so escaping, timestamps and `+Inf` are read as Prometheus reads
them, and a counter's samples are named with `_total` even where the exporter left it off
(as two of the API server's authentication counters do).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families


def _escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def sample_key(name: str, /, **labels: str) -> str:
    """`name{a="1",b="2"}` (labels sorted by name, values escaped as the exposition escapes
    them), or `name` without labels: the key of a sample in what `parse` returns."""
    if not labels:
        return name
    inner = ",".join(f'{label}="{_escaped(labels[label])}"' for label in sorted(labels))
    return f"{name}{{{inner}}}"


def parse(text: str) -> dict[str, float]:
    """Every sample of a text exposition, keyed by `sample_key`. A malformed exposition
    raises ValueError."""
    return {
        sample_key(sample.name, **sample.labels): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def split_key(key: str) -> tuple[str, dict[str, str]]:
    """A key's sample name and labels (the inverse of `sample_key`, whatever the order of
    the labels in `key`)."""
    (family,) = text_string_to_metric_families(f"{key} 0\n")
    (sample,) = family.samples
    return sample.name, dict(sample.labels)


def total(samples: Mapping[str, float], name: str, /, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels` (all of them, when
    none are given)."""
    found = 0.0
    for key, value in samples.items():
        if key != name and not key.startswith(name + "{"):
            continue
        if labels and not labels.items() <= split_key(key)[1].items():
            continue
        found += value
    return found


def scrape(url: str, *, timeout_s: float = 5.0) -> dict[str, float]:
    """GET `url` (an exporter's `/metrics`) and `parse` it; OSError when nothing answers."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text: str = response.read().decode()
    return parse(text)
