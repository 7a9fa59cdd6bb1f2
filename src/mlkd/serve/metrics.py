"""The server's Prometheus metrics (``GET /metrics``), in a registry of their own (one per application).

    mlkd_requests_total{endpoint, status}      requests answered, by endpoint and HTTP status (errors: 4xx, 5xx)
    mlkd_images_total{endpoint}                images run by the model
    mlkd_request_seconds{endpoint}             latency, from the request's arrival to its answer (histogram)
    mlkd_batch_size                            images per batch the model ran (histogram)
    mlkd_queue_depth                           images waiting for a batch (gauge)
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The counters, histograms and gauge above, and their text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mlkd_requests", "Requests answered, by endpoint and HTTP status",
                                ("endpoint", "status"), registry=self.registry)
        self.images = Counter("mlkd_images", "Images run by the model", ("endpoint",), registry=self.registry)
        self.latency = Histogram("mlkd_request_seconds", "Seconds from a request's arrival to its answer",
                                 ("endpoint",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("mlkd_batch_size", "Images per batch the model ran", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.queue_depth = Gauge("mlkd_queue_depth", "Images waiting for a batch", registry=self.registry)

    def answered(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
