"""Endpoint media: synthetic sources, verifiable payloads, the sans-IO engine, statistics.

Modules: :mod:`perc.media.payload` (payload format and its verification),
:mod:`perc.media.sources` (audio/video packetizers), :mod:`perc.media.stats` (RFC 3550
reception math, per-peer counters, the report), :mod:`perc.media.endpoint`
(:class:`~perc.media.endpoint.EndpointMedia`). Only endpoints use this package: the endpoint
engine imports the EKT code, which a Media Distributor must never load, so nothing is
imported here.
"""
