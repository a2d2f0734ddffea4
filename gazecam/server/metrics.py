"""Prometheus metrics, ``gazecam_*``, in a registry of the app's own (two apps in one process,
as in the tests, never share or collide).

The pipeline's counters are read from its ``PipelineStats`` when scraped, so they are kept in
one place only; the rest are ordinary prometheus-client metrics.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from gazecam.assist.assistant import Answer
from gazecam.server.errors import client_error
from gazecam.server.pipeline import PipelineStats

# Time to first token spans a fact sentence looked up at once (milliseconds) to an answer
# that waited behind other clients' answers (seconds).
_TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The wait in the queue is none for a lone client, and at most GAZECAM_ASK_QUEUE_WAIT_S.
_QUEUE_WAIT_BUCKETS_S = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _PipelineCollector(Collector):
    def __init__(self, stats: PipelineStats) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        s = self._stats
        yield CounterMetricFamily(
            "gazecam_frames_processed",
            "Scene frames through the capture core.",
            value=s.frames_processed,
        )
        dropped = CounterMetricFamily(
            "gazecam_frames_dropped",
            "Frames dropped as stale: by the source (stage=source), or keyframes replaced by a "
            "newer one before perception took them (stage=perception).",
            labels=["stage"],
        )
        dropped.add_metric(["source"], s.frames_dropped)
        dropped.add_metric(["perception"], s.keyframes_dropped)
        yield dropped
        yield CounterMetricFamily(
            "gazecam_keyframes_perceived",
            "Keyframe crops perception has read.",
            value=s.keyframes_perceived,
        )
        yield CounterMetricFamily(
            "gazecam_source_restarts",
            "Restarts of a failed or ended source.",
            value=s.source_restarts,
        )


class Metrics:
    """The app's metrics and their registry."""

    def __init__(self, stats: PipelineStats) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_PipelineCollector(stats))
        self.time_to_first_token = Histogram(
            "gazecam_time_to_first_token_seconds",
            "From an ask received to its first token sent, waiting behind other answers included.",
            buckets=_TTFT_BUCKETS_S,
            registry=self.registry,
        )
        self.asks = Counter(
            "gazecam_asks",
            "Asks received, by outcome (answered, or the error code).",
            ["outcome"],
            registry=self.registry,
        )
        self.ask_queue_length = Gauge(
            "gazecam_ask_queue_length",
            "Asks waiting for the generation thread, not counting the answer under way.",
            registry=self.registry,
        )
        self.ask_queue_wait = Histogram(
            "gazecam_ask_queue_wait_seconds",
            "From an ask taken to the start of its answer, for the asks that started (the "
            'others are counted as gazecam_asks_total{outcome="busy"}).',
            buckets=_QUEUE_WAIT_BUCKETS_S,
            registry=self.registry,
        )
        self.clients_connected = Gauge(
            "gazecam_clients_connected", "Websocket clients connected.", registry=self.registry
        )
        self.clients = 0  # the gauge's value, for the limit on connections

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    async def metered(
        self, pieces: AsyncGenerator[str | Answer, None]
    ) -> AsyncGenerator[str | Answer, None]:
        """One ask's ``pieces`` (``Runtime.ask``'s, for either transport), counted: the time to
        its first token, and its outcome in gazecam_asks_total once, before the Answer or the
        error is handed on, so a client that has its answer finds it in /metrics already. An
        ask closed before either (the client left: the answer stops) counts as disconnected.
        An error comes out as the ClientError the client gets.
        """
        received = time.perf_counter()
        outcome: str | None = None
        first = True
        try:
            async with contextlib.aclosing(pieces):
                async for piece in pieces:
                    if isinstance(piece, Answer):
                        outcome = "answered"
                        self.asks.labels(outcome).inc()
                    elif first:
                        self.time_to_first_token.observe(time.perf_counter() - received)
                        first = False
                    yield piece
        except Exception as exc:
            error = client_error(exc)
            if outcome is None:
                outcome = error.code
                self.asks.labels(outcome).inc()
            raise error from exc
        finally:
            if outcome is None:
                self.asks.labels("disconnected").inc()

    def watch_queue(self, waiting: Callable[[], int]) -> None:
        """Read the queue length from ``waiting`` when scraped (the runtime that owns the queue
        exists only once the app's lifespan has started, after the metrics)."""
        self.ask_queue_length.set_function(waiting)

    def client_connected(self) -> None:
        """Count a websocket client in."""
        self.clients += 1
        self.clients_connected.set(self.clients)

    def client_left(self) -> None:
        """Count a websocket client out."""
        self.clients -= 1
        self.clients_connected.set(self.clients)
