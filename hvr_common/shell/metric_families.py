"""Prometheus metric families from per-VM samples and the tables of ``hvr_common.pure.metric_names``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client.metrics_core import GaugeMetricFamily

from hvr_common.pure.metric_names import MetricSpec


def gauges(specs: Iterable[MetricSpec], samples: Sequence[dict]) -> list[GaugeMetricFamily]:
    """One family per spec, one series per sample (labelled ``vm``); a None value is left out."""
    out = []
    for spec in specs:
        family = GaugeMetricFamily(spec.full_name, spec.help, labels=["vm"])
        for sample in samples:
            value = sample.get(spec.field)
            if value is not None:
                family.add_metric([sample["vm"]], float(value))
        out.append(family)
    return out


def one_of(spec: MetricSpec, samples: Sequence[dict], values: Iterable[str]) -> GaugeMetricFamily:
    """The labelled-gauge pattern: per VM one series per possible value, 1 for the current one."""
    label = spec.field
    family = GaugeMetricFamily(spec.full_name, spec.help, labels=["vm", label])
    values = list(values)
    for sample in samples:
        current = sample.get(label)
        for value in values if current in values else [*values, current]:
            family.add_metric([sample["vm"], str(value)], 1.0 if value == current else 0.0)
    return family
