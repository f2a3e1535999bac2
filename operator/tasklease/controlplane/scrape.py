"""Prometheus text exposition as the tests and the benchmark read it: the operator's
`/metrics` and the API server's.

A scrape is a `{key: value}` dict whose key names a sample by its name and labels, the labels
sorted by name (`sample_key`): exporters order labels as they please (client_golang, the API
server's, writes a bucket's `le` after the others; prometheus_client, the operator's, sorts
them all), and a sample must be found the same way whichever wrote it. Parsing is
prometheus_client's own, so escaping, timestamps and `+Inf` are read as Prometheus reads
them, and a counter's samples are named with `_total` even where the exporter left it off
(as two of the API server's authentication counters do).

That parser is slow (about 25 µs a sample: half a second for the API server's 19,000), and
the benchmark reads scrapes while it times the operator, on the same two cores; a reader
names the families it needs (`families`), and only their lines are parsed.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Collection, Mapping

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


def parse(text: str, *, families: Collection[str] = ()) -> dict[str, float]:
    """Every sample of a text exposition, keyed by `sample_key`; only those of `families`
    (metric names, without the `_total`, `_bucket`, ... of their samples) when given. A
    malformed exposition raises ValueError."""
    if families:
        text = "".join(
            line
            for line in text.splitlines(keepends=True)
            if any(_named(line, family) for family in families)
        )
    return {
        sample_key(sample.name, **sample.labels): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _named(line: str, family: str) -> bool:
    """Whether a line of the exposition (a sample, or its family's HELP or TYPE) may be of
    `family`: its name is the family's or begins with it and an underscore (a few other
    families may come along; they are parsed too, which is harmless)."""
    if line.startswith("#"):
        words = line.split(None, 3)
        name = words[2] if len(words) > 2 else ""
    else:
        name = line.split("{", 1)[0].split(None, 1)[0] if line.strip() else ""
    return name == family or name.startswith(family + "_")


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


def scrape(url: str, *, timeout_s: float = 5.0, families: Collection[str] = ()) -> dict[str, float]:
    """GET `url` (an exporter's `/metrics`) and `parse` it; OSError when nothing answers."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text: str = response.read().decode()
    return parse(text, families=families)
