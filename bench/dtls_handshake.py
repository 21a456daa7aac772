"""DTLS 1.2 handshake speed: perc's own engine against pyOpenSSL, measured in one process.

Run: ``.venv/bin/python bench/dtls_handshake.py`` (or ``bash dev.sh bench dtls_handshake``).
Options: ``--count N`` (timed handshakes per row, default 300), ``--warmup N`` (untimed ones
first, default 20), ``--check`` (exit 1 if a target is missed), ``--quick`` (3 handshakes after
1 warm-up: a smoke run).

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

Rows are measured round robin (one pair of each per round) so that load from other programs
hits every row alike. After the table (bench/harness.py) the lines ``ratio perc / pyOpenSSL``,
``ratio perc new cert / pyOpenSSL``, ``ratio perc / pyOpenSSL+ctx`` and ``ratio perc cookie /
pyOpenSSL cookie`` (mean pair time; the median ratio in brackets) and the server rates.

Targets: perc pair <= 4x the pyOpenSSL pair (the shared-context row, the stricter
baseline); perc server >= 300 handshakes/s.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness

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


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, check=True)
    parser.add_argument("--count", type=int, default=300, help="handshakes per row")
    parser.add_argument("--warmup", type=int, default=20, help="untimed handshakes first")
    args = harness.parse(parser, argv, quick={"count": 3, "warmup": 1})

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

    harness.print_machine()
    print(f"DTLS 1.2 mutually authenticated handshake pairs in memory, count={args.count}")
    table = harness.Table(
        ("implementation", "<17"),
        ("mean ms/pair", ">12.3f"),
        ("median ms", ">10.3f"),
        ("pairs/s", ">9.1f"),
        ("server ms/hs", ">12.3f"),
        ("server hs/s", ">11.1f"),
    )
    table.header()
    for name, (pairs, servers) in samples.items():
        mean = statistics.fmean(pairs)
        smean = statistics.fmean(servers)
        table.row(
            name, mean * 1e3, statistics.median(pairs) * 1e3, 1 / mean, smean * 1e3, 1 / smean
        )
    if "perc" not in samples:
        return 1
    print()
    met = True
    for our_name, base_name in (
        ("perc", "pyOpenSSL"),
        ("perc new cert", "pyOpenSSL"),
        ("perc", "pyOpenSSL+ctx"),
        ("perc cookie", "pyOpenSSL cookie"),
    ):
        ours, base = samples[our_name], samples[base_name]
        ratio = statistics.fmean(ours[0]) / statistics.fmean(base[0])
        median_ratio = statistics.median(ours[0]) / statistics.median(base[0])
        met &= harness.ratio(
            our_name,
            base_name,
            ratio,
            at_most=TARGET_RATIO,
            note=f"(mean pair time; median {median_ratio:.2f})",
        )
    for name in ("perc", "perc new cert"):
        rate = 1 / statistics.fmean(samples[name][1])
        ok = rate >= TARGET_SERVER_RATE
        met &= ok
        print(
            f"{name} server handshakes/s: {rate:.0f} "
            f"(target >= {TARGET_SERVER_RATE:.0f}: {'met' if ok else 'MISSED'})"
        )
    return 1 if (args.check and not met) else 0


if __name__ == "__main__":
    sys.exit(main())
