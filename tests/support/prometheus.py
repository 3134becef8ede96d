"""Reading Prometheus text as a scraper does: ``prometheus_client``'s own parser, and one
sample's value by name and labels (tests of :mod:`hba.metrics`; not shipped)."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["families", "value"]


def families(text: str) -> dict[str, Any]:
    """The metric families of an exposition, by family name."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(parsed: dict[str, Any], sample_name: str, **labels: str) -> float:
    """The value of the sample called ``sample_name`` whose labels include ``labels``."""
    for family in parsed.values():
        for s in family.samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {sample_name} {labels}")
