"""Reading a real ``/metrics`` endpoint in tests: samples by name and labels."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    """One scrape: every sample, and each family's label names."""

    samples: list[tuple[str, dict[str, str], float]]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``."""
        return sum(v for n, ls, v in self.samples if n == name and labels.items() <= ls.items())

    def names(self) -> set[str]:
        return {n for n, _, _ in self.samples}

    def label_names(self, name: str) -> set[str]:
        return {label for n, ls, _ in self.samples if n == name for label in ls}


def scrape(url: str, timeout_s: float = 10.0) -> Scrape:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    samples = [
        (s.name, dict(s.labels), s.value) for family in text_string_to_metric_families(text) for s in family.samples
    ]
    return Scrape(samples)
