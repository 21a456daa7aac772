"""DTLS 1.2 handshake speed: perc's own engine against pyOpenSSL, measured in one process.

Usage: .venv/bin/python bench/dtls_handshake.py [--count N] [--warmup N]

Every handshake is a full mutually authenticated DTLS 1.2 handshake (ECDHE-ECDSA, P-256
certificates, use_srtp, EMS) between a client and a server object joined in memory, without
cookies and without loss (tests/dtls_interop/harness.py ``pump``). Rows:

(a) pyOpenSSL client + pyOpenSSL server (the baseline, memory BIOs), one SSL.Context per role
    shared by all handshakes as a real server would ("pyOpenSSL"); for information also with a
    new SSL.Context (certificate and key loading) per connection ("pyOpenSSL+ctx");
(b) perc client + perc server, one DtlsConfiguration per role;
(b'') perc again with a new client certificate for every handshake ("perc new cert"): perc
    caches peer-certificate validation per DER (reconnecting peers), which the fixed identities
    of (b) always hit on both sides; this row shows the server with a cache miss every time,
    as a KMF meeting new endpoints;
(b') for information, both again with the cookie exchange: pyOpenSSL's server through
    DTLSv1_listen with a cookie callback, perc's server behind one shared CookieGate;
(c) the server alone: the time spent inside the server object's methods (receive_datagram,
    datagrams_to_send, next_event) during the handshakes of (a) and (b), giving handshakes/s
    one core sustains for the server role. A recorded client side cannot be replayed into a new
    server (the server's random and ECDHE share change the transcript the client signs), so
    the server is timed inside live pairs.

Targets (issue 6): perc pair <= 4x the pyOpenSSL pair (the shared-context row, the stricter
baseline); perc server >= 300 handshakes/s.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perc import identity
from perc.identity import Identity
from tests.dtls_interop.harness import EnginePeer, pump
from tests.dtls_interop.openssl_peer import OpensslPeer, build_context

TARGET_RATIO = 4.0
TARGET_SERVER_RATE = 300.0


class TimedServer:
    """Forwards the peer surface to a server and adds up the time spent inside it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.elapsed = 0.0

    @property
    def handshake_complete(self) -> bool:
        t = time.perf_counter()
        done = bool(self.inner.handshake_complete)
        self.elapsed += time.perf_counter() - t
        return done

    @property
    def is_client(self) -> bool:
        return False

    @property
    def failed(self) -> Any:
        return self.inner.failed

    def receive_datagram(self, data: bytes, now: float) -> None:
        t = time.perf_counter()
        self.inner.receive_datagram(data, now)
        self.elapsed += time.perf_counter() - t

    def datagrams_to_send(self) -> list[bytes]:
        t = time.perf_counter()
        out: list[bytes] = self.inner.datagrams_to_send()
        self.elapsed += time.perf_counter() - t
        return out


def openssl_peers(
    client_id: Identity, server_id: Identity, *, shared: bool, cookies: bool = False
) -> tuple[Callable[[Identity], Any], Callable[[Identity], Any]]:
    """Factories for pyOpenSSL peers; ``shared``: one SSL.Context per role, as a server would;
    ``cookies``: the server runs DTLSv1_listen with a cookie callback first."""
    if cookies:
        client_ctx = build_context(client_id)
        server_ctx = build_context(server_id, cookie_exchange=True)
        return (
            lambda ident: OpensslPeer(is_client=True, identity=ident, context=client_ctx),
            lambda ident: OpensslPeer(
                is_client=False, identity=ident, context=server_ctx, cookie_exchange=True
            ),
        )
    if not shared:
        return (
            lambda ident: OpensslPeer(is_client=True, identity=ident),
            lambda ident: OpensslPeer(is_client=False, identity=ident),
        )
    client_ctx, server_ctx = build_context(client_id), build_context(server_id)
    return (
        lambda ident: OpensslPeer(is_client=True, identity=ident, context=client_ctx),
        lambda ident: OpensslPeer(is_client=False, identity=ident, context=server_ctx),
    )


def perc_peers(
    client_id: Identity,
    server_id: Identity,
    *,
    cookies: bool = False,
    fresh_clients: list[Identity] | None = None,
) -> tuple[Callable[[Identity], Any], Callable[[Identity], Any]]:
    """Factories for perc peers sharing one DtlsConfiguration per role; ``cookies``: the
    server sits behind one shared CookieGate (the KMF's path, D14); ``fresh_clients``: each
    handshake takes the next of these client identities (its own DtlsConfiguration, built in
    the timed region), so the server's certificate-validation cache never hits."""
    from perc.dtls import CookieGate, DtlsConfiguration, DtlsConnection
    from tests.dtls_interop.engine import GatedServer

    def config(is_client: bool, ident: Identity) -> Any:
        return DtlsConfiguration(
            is_client=is_client, certificate=ident.certificate, private_key=ident.private_key
        )

    client_config, server_config = config(True, client_id), config(False, server_id)
    if fresh_clients is not None:
        pool = iter(fresh_clients)
        return (
            lambda ident: EnginePeer(DtlsConnection(config(True, next(pool))), is_client=True),
            lambda ident: EnginePeer(DtlsConnection(server_config), is_client=False),
        )
    if cookies:
        gate = CookieGate()
        return (
            lambda ident: EnginePeer(DtlsConnection(client_config), is_client=True),
            lambda ident: GatedServer(ident, gate=gate, configuration=server_config),
        )
    return (
        lambda ident: EnginePeer(DtlsConnection(client_config), is_client=True),
        lambda ident: EnginePeer(DtlsConnection(server_config), is_client=False),
    )


def one_pair(
    make_client: Callable[[Identity], Any],
    make_server: Callable[[Identity], Any],
    client_id: Identity,
    server_id: Identity,
) -> tuple[float, float]:
    """Wall time of one handshake pair and the server's share (seconds), set-up included."""
    t0 = time.perf_counter()
    client = make_client(client_id)
    t1 = time.perf_counter()
    server = TimedServer(make_server(server_id))
    t2 = time.perf_counter()
    client.connect(0.0)
    pump(client, server)
    t3 = time.perf_counter()
    if not (client.handshake_complete and server.inner.handshake_complete):
        raise SystemExit("handshake did not complete")
    return t3 - t0, server.elapsed + (t2 - t1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="handshakes per row")
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    client_id = identity.generate("endpoint")
    server_id = identity.generate("kmf")

    factories: dict[str, Any] = {
        "pyOpenSSL": openssl_peers(client_id, server_id, shared=True),
        "pyOpenSSL+ctx": openssl_peers(client_id, server_id, shared=False),
    }
    try:
        factories["perc"] = perc_peers(client_id, server_id)
        factories["pyOpenSSL cookie"] = openssl_peers(
            client_id, server_id, shared=True, cookies=True
        )
        factories["perc cookie"] = perc_peers(client_id, server_id, cookies=True)
        # perc caches peer-certificate validation per DER; a KMF mostly meets new endpoints
        fresh = [identity.generate(f"endpoint-{i}") for i in range(args.warmup + args.count)]
        factories["perc new cert"] = perc_peers(client_id, server_id, fresh_clients=fresh)
    except ImportError as e:
        print(f"perc engine not available: {e}")

    # Round robin: one pair of each implementation per round, so that load from other
    # processes on this shared machine hits every row alike.
    samples: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in factories}
    for i in range(args.warmup + args.count):
        for name, (make_client, make_server) in factories.items():
            gc.collect()
            pair, server = one_pair(make_client, make_server, client_id, server_id)
            if i >= args.warmup:
                samples[name][0].append(pair)
                samples[name][1].append(server)

    print(f"DTLS 1.2 mutually authenticated handshake pairs in memory, count={args.count}")
    print(
        f"{'implementation':<17} {'mean ms/pair':>12} {'median ms':>10} {'pairs/s':>9} "
        f"{'server ms/hs':>12} {'server hs/s':>11}"
    )
    for name, (pairs, servers) in samples.items():
        mean = statistics.fmean(pairs)
        smean = statistics.fmean(servers)
        print(
            f"{name:<17} {mean * 1e3:>12.3f} {statistics.median(pairs) * 1e3:>10.3f} "
            f"{1 / mean:>9.1f} {smean * 1e3:>12.3f} {1 / smean:>11.1f}"
        )
    if "perc" not in samples:
        return 1
    for our_name, base_name in (
        ("perc", "pyOpenSSL"),
        ("perc new cert", "pyOpenSSL"),
        ("perc", "pyOpenSSL+ctx"),
        ("perc cookie", "pyOpenSSL cookie"),
    ):
        ours, base = samples[our_name], samples[base_name]
        ratio = statistics.fmean(ours[0]) / statistics.fmean(base[0])
        median_ratio = statistics.median(ours[0]) / statistics.median(base[0])
        verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
        print(
            f"ratio {our_name}/{base_name} pair time: mean {ratio:.2f}x, "
            f"median {median_ratio:.2f}x (target <= {TARGET_RATIO:.0f}x: {verdict})"
        )
    for name in ("perc", "perc new cert"):
        rate = 1 / statistics.fmean(samples[name][1])
        verdict = "met" if rate >= TARGET_SERVER_RATE else "MISSED"
        print(
            f"{name} server handshakes/s: {rate:.0f} "
            f"(target >= {TARGET_SERVER_RATE:.0f}: {verdict})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
