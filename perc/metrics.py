"""Prometheus metrics of the KMF and the MDD (D34), sans-IO: collectors read the engines'
counters when scraped.

Theory of operation
-------------------
The engines already count everything (STYLE 8: every drop has its counter), so a metric is a
view of a counter, not a second one: each collector here is a prometheus-client *custom
collector* whose :meth:`collect` reads the engine's statistics objects at scrape time and
builds metric families from them. The forwarding path pays nothing for metrics; a scrape
costs one pass over the engines' tables. The HTTP side (``GET /metrics``) is the trio shell's,
:mod:`perc.roles.metrics`; :func:`exposition` turns a registry into the text format.

Names begin ``perc_kmf_`` / ``perc_mdd_``. Labels are ``conference`` and, where it matters,
``reason`` (``result``, ``cause``, ``kind`` where those say it better); never one label per
association or endpoint (that detail stays in the logs): the number of series does not grow
with the number of endpoints.

API::

    registry = new_registry(KmfCollector(engine, connections=kmf_stats))   # or MddCollector
    exposition(registry) -> bytes            # the text format; CONTENT_TYPE
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from perc.admission import KmfStats
from perc.kmf import Durations, KmfEngine, TunnelServerEngine
from perc.mdd import MddEngine

__all__ = [
    "CONTENT_TYPE",
    "KmfCollector",
    "MddCollector",
    "MddConferenceView",
    "exposition",
    "histogram",
    "new_registry",
]

#: The Content-Type of :func:`exposition`'s output: every perc name is a classic Prometheus
#: name, so the text is format 0.0.4, which every Prometheus version reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: KmfStats fields -> ``reason`` of perc_kmf_tunnel_connections_refused_total.
_TUNNEL_REFUSALS = {
    "reset": "reset",
    "timeout": "handshake_timeout",
    "tls_failed": "tls_failed",
    "evicted": "evicted",
    "refused_capacity": "capacity",
}
#: KeyingStats fields -> ``reason`` of perc_kmf_dtls_dropped_total.
_KMF_DROPS = {
    "dropped_no_association": "no_association",
    "dropped_capacity": "capacity",
    "dropped_tunnel_pending": "tunnel_pending",
    "dropped_tunnel_send": "tunnel_send",
    "dropped_wrong_mdd": "wrong_mdd",
}
#: MddStats fields (not from the forwarding table) -> ``reason`` of perc_mdd_dropped_total.
_MDD_DROPS = {
    "dropped_other": "not_srtp_or_dtls",
    "dropped_no_tunnel": "no_tunnel",
    "dropped_table_full": "table_full",
    "dropped_unknown_association": "unknown_association",
    "dropped_link_elsewhere": "link_of_another_worker",
}


def new_registry(*collectors: Collector) -> CollectorRegistry:
    """A registry of its own (not the process-global one) holding ``collectors``."""
    registry = CollectorRegistry(auto_describe=False)
    for c in collectors:
        registry.register(c)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry's metrics in the Prometheus text format (:data:`CONTENT_TYPE`)."""
    return generate_latest(registry)


def histogram(
    name: str, doc: str, durations: Durations, labels: Mapping[str, str] | None = None
) -> HistogramMetricFamily:
    """A histogram family from an engine's :class:`~perc.kmf.Durations` (cumulative buckets)."""
    family = HistogramMetricFamily(name, doc, labels=list(labels or ()))
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*durations.bounds, float("inf")), durations.counts, strict=True):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
    family.add_metric(list((labels or {}).values()), buckets, durations.total)
    return family


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class KmfCollector(Collector):
    """The KMF's metrics, read from its engine (and the shell's connection counters)."""

    def __init__(self, engine: TunnelServerEngine, connections: KmfStats | None = None) -> None:
        self.engine = engine
        self.connections = connections

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        up = _gauge("perc_kmf_tunnels_up", "MDD tunnels up (SupportedProfiles received)")
        up.add_metric([], sum(1 for t in engine.tunnels.values() if t.is_up))
        yield up
        ts = engine.tunnel_stats
        c = _counter("perc_kmf_tunnel_protocol_errors", "Tunnels closed for breaking D2's rules")
        c.add_metric([], ts.protocol_errors)
        yield c
        if self.connections is not None:
            st = self.connections
            c = _counter("perc_kmf_tunnel_connections", "TCP connections accepted (tunnel port)")
            c.add_metric([], st.connections)
            yield c
            c = _counter(
                "perc_kmf_tunnel_connections_refused",
                "Connections closed before their tunnel was up",
                ["reason"],
            )
            for field, reason in _TUNNEL_REFUSALS.items():
                c.add_metric([reason], getattr(st, field))
            yield c
        if isinstance(engine, KmfEngine):
            yield from self._keying(engine)

    @staticmethod
    def _keying(engine: KmfEngine) -> Iterator[Metric]:
        stats = engine.stats
        g = _gauge("perc_kmf_associations", "Endpoint DTLS associations (handshaking or joined)")
        g.add_metric([], len(engine.associations))
        yield g
        c = _counter(
            "perc_kmf_handshakes",
            "Endpoint DTLS handshakes that ended, by result (joined, refused, failed) and reason",
            ["result", "reason"],
        )
        for (result, reason), n in sorted(engine.handshakes.items()):
            c.add_metric([result, reason], n)
        yield c
        yield histogram(
            "perc_kmf_join_duration_seconds",
            "Seconds from an endpoint's first ClientHello to its join (handshake completed)",
            engine.join_seconds,
        )
        conferences = engine.state.conferences
        members = _gauge("perc_kmf_members", "Members of the conference", ["conference"])
        spi = _gauge(
            "perc_kmf_current_spi", "SPI of the conference's current EKTKey", ["conference"]
        )
        for cid, conf in conferences.items():
            members.add_metric([cid], len(conf.members))
            if conf.current is not None:
                spi.add_metric([cid], conf.current.spi)
        yield members
        yield spi
        c = _counter(
            "perc_kmf_rekeys",
            "New EKTKeys by cause (first, join, leave, ttl, manual, or coalesced ones)",
            ["conference", "cause"],
        )
        for (cid, cause), n in sorted(engine.rekey_causes.items()):
            c.add_metric([cid, cause], n)
        yield c
        yield histogram(
            "perc_kmf_rekey_duration_seconds",
            "Seconds from a rekey's new EKTKey to the ACK of the last member waited for",
            engine.rekey_seconds,
        )
        for name, value, doc in (
            ("ekt_keys_sent", stats.ekt_keys_sent, "EKTKey messages sent (first sendings)"),
            ("ekt_keys_acknowledged", stats.ekt_keys_acknowledged, "EKTKey messages ACKed"),
            (
                "ekt_key_retransmissions",
                stats.ekt_key_retransmissions,
                "EKTKey messages sent again for want of an ACK (D9)",
            ),
            ("rekey_errors", stats.rekey_errors, "Rekeys that could not be made"),
            ("media_keys_sent", stats.media_keys_sent, "MediaKeys sent to MDDs"),
        ):
            c = _counter(f"perc_kmf_{name}", doc)
            c.add_metric([], value)
            yield c
        c = _counter("perc_kmf_dtls_dropped", "Endpoint DTLS datagrams dropped", ["reason"])
        for field, reason in _KMF_DROPS.items():
            c.add_metric([reason], getattr(stats, field))
        yield c


class MddConferenceView(Protocol):
    """What :class:`MddCollector` reads of one conference (the shell's relay)."""

    @property
    def id(self) -> str: ...

    @property
    def engine(self) -> MddEngine: ...

    @property
    def io(self) -> Any: ...

    @property
    def forwarding_cpu(self) -> float: ...


class MddCollector(Collector):
    """The MDD's metrics, one series per conference, read from each conference's engine."""

    def __init__(self, conferences: Callable[[], Iterable[MddConferenceView]]) -> None:
        self.conferences = conferences

    def collect(self) -> Iterator[Metric]:
        label = ["conference"]
        tunnel = _gauge("perc_mdd_tunnel_up", "1 while the tunnel to the KMF is up", label)
        assocs = _gauge("perc_mdd_associations", "Endpoint associations", label)
        links = _gauge("perc_mdd_links_up", "Links to other MDDs that are up", label)
        packets_in = _counter(
            "perc_mdd_packets_in",
            "SRTP (kind=rtp) and SRTCP (kind=rtcp) packets accepted from endpoints",
            [*label, "kind"],
        )
        packets_out = _counter(
            "perc_mdd_packets_out", "Packets sent to endpoints, by kind", [*label, "kind"]
        )
        bytes_in = _counter("perc_mdd_bytes_in", "Bytes of the packets accepted", label)
        bytes_out = _counter("perc_mdd_bytes_out", "Bytes of the packets sent", label)
        datagrams = _counter("perc_mdd_datagrams_in", "Datagrams received (all kinds)", label)
        held = _counter(
            "perc_mdd_held",
            "Datagrams held until their association's keys came (D5), then processed",
            label,
        )
        dropped = _counter(
            "perc_mdd_dropped", "Datagrams (or deliveries) not forwarded", [*label, "reason"]
        )
        dtls = _counter(
            "perc_mdd_dtls", "DTLS datagrams relayed, by direction", [*label, "direction"]
        )
        cpu = _counter(
            "perc_mdd_forwarding_cpu_seconds",
            "CPU seconds spent receiving, forwarding and sending media",
            label,
        )
        link_packets = _counter(
            "perc_mdd_link_packets",
            "Packets over each cascade link (D25), by direction",
            [*label, "link", "direction"],
        )
        link_bytes = _counter(
            "perc_mdd_link_bytes",
            "Bytes over each cascade link, by direction",
            [*label, "link", "direction"],
        )
        for view in self.conferences():
            cid, engine = view.id, view.engine
            stats, totals = engine.stats_and_totals()
            tunnel.add_metric([cid], 1 if engine.tunnel_is_up else 0)
            assocs.add_metric([cid], len(engine.associations))
            links.add_metric([cid], engine.links_up)
            rtcp_in, rtcp_out = totals.get("rtcp_in", 0), totals.get("rtcp_out", 0)
            packets_in.add_metric([cid, "rtp"], totals.get("packets_in", 0) - rtcp_in)
            packets_in.add_metric([cid, "rtcp"], rtcp_in)
            packets_out.add_metric([cid, "rtp"], totals.get("packets_out", 0) - rtcp_out)
            packets_out.add_metric([cid, "rtcp"], rtcp_out)
            bytes_in.add_metric([cid], totals.get("bytes_in", 0))
            bytes_out.add_metric([cid], totals.get("bytes_out", 0))
            datagrams.add_metric([cid], stats.datagrams_in)
            held.add_metric([cid], totals.get("held", 0))
            for name, value in sorted(totals.items()):
                if name.startswith("drop_"):
                    dropped.add_metric([cid, name[5:]], value)
            unknown = stats.srtp_in - totals.get("received", 0)
            dropped.add_metric([cid, "no_association"], unknown)
            for field, reason in _MDD_DROPS.items():
                dropped.add_metric([cid, reason], getattr(stats, field))
            dropped.add_metric([cid, "send_failed"], getattr(view.io, "dropped_udp_send", 0))
            dtls.add_metric([cid, "to_kmf"], stats.dtls_to_kmf)
            dtls.add_metric([cid, "to_endpoint"], stats.dtls_to_endpoint)
            cpu.add_metric([cid], view.forwarding_cpu)
            for row in engine.admin_links():
                name, c = str(row["name"]), row["counters"]
                assert isinstance(c, dict)
                for direction in ("in", "out"):
                    link_packets.add_metric([cid, name, direction], c[f"packets_{direction}"])
                    link_bytes.add_metric([cid, name, direction], c[f"bytes_{direction}"])
        yield from (tunnel, assocs, links, packets_in, packets_out, bytes_in, bytes_out)
        yield from (datagrams, held, dropped, dtls, cpu, link_packets, link_bytes)
