"""Prometheus metrics (prometheus-client), one registry per app so tests stay isolated.

Counters and histograms are updated where things happen; catalog-derived gauges
(datasets by status, jobs by state, queue depth, free disk) are read at scrape time.
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _CatalogCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self.snapshot()
        datasets = GaugeMetricFamily("mrc_ingest_datasets", "Datasets in the catalog by status",
                                     labels=["status"])
        for status, count in snap["datasets"].items():
            datasets.add_metric([status], count)
        yield datasets
        jobs = GaugeMetricFamily("mrc_ingest_jobs", "Jobs in the catalog by state",
                                 labels=["state"])
        for state, count in snap["jobs"].items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily("mrc_ingest_queue_depth", "Jobs submitted to the pool and "
                                "not finished", value=snap["queue_depth"])
        yield GaugeMetricFamily("mrc_ingest_data_free_bytes", "Free space on the data folder's "
                                "file system", value=snap["free_bytes"])
        storage = snap["storage"]
        yield GaugeMetricFamily("mrc_ingest_received_bytes", "Bytes received, over all "
                                "datasets in the catalog", value=storage["received"])
        yield GaugeMetricFamily("mrc_ingest_stored_bytes", "Bytes stored for all datasets "
                                "(archives, restore records, sums, originals kept, cached "
                                "conversions)", value=storage["stored"])
        yield GaugeMetricFamily("mrc_ingest_storage_ratio", "Bytes stored per byte received",
                                value=storage["stored"] / storage["received"]
                                if storage["received"] else 0.0)


class Metrics:
    def __init__(self, snapshot: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.uploads = Counter("mrc_ingest_uploads", "Uploads by outcome",
                               ["outcome"], registry=self.registry)
        self.upload_bytes = Counter("mrc_ingest_upload_bytes", "Bytes received in "
                                    "accepted uploads", registry=self.registry)
        self.jobs_finished = Counter("mrc_ingest_jobs_finished", "Finished jobs",
                                     ["kind", "state"], registry=self.registry)
        self.job_seconds = Histogram("mrc_ingest_job_seconds", "Job run time", ["kind"],
                                     buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
                                     registry=self.registry)
        self.request_seconds = Histogram("mrc_ingest_http_request_seconds", "HTTP request "
                                         "time until the response starts",
                                         ["method", "route", "status"],
                                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                  1, 2.5, 10),
                                         registry=self.registry)
        self.converted_bytes = Counter("mrc_ingest_converted_bytes", "Bytes written by "
                                       "conversions and archive copies (rate() of this is "
                                       "the conversion throughput)", ["kind"],
                                       registry=self.registry)
        self.preview_seconds = Histogram("mrc_ingest_preview_seconds", "Time to produce a "
                                         "PNG preview", ["kind", "cached"],
                                         buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                  0.15, 0.25, 0.5, 1, 2.5),
                                         registry=self.registry)
        self.registry.register(_CatalogCollector(snapshot))

    def job_finished(self, job: dict, state: str, seconds: float,
                     result: dict | None = None) -> None:
        self.jobs_finished.labels(job["kind"], state).inc()
        self.job_seconds.labels(job["kind"]).observe(seconds)
        if state == "done" and result and result.get("bytes_written"):
            self.converted_bytes.labels(job["kind"]).inc(result["bytes_written"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
