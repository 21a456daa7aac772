"""perc.metrics: the collectors read the engines' counters at scrape time (D34).

The KMF engine runs in memory (tests/kmf_memory.py) and the MDD engine with the in-memory
endpoints of tests/test_mdd.py; each test scrapes through prometheus-client's exposition and
parses the text back with its parser, as Prometheus would.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import attrs
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from perc import identity
from perc.cli import main
from perc.config import ConfigError, HostPort, KmfConfig, load_kmf_config, load_mdd_config
from perc.kmf import Durations, KmfEngine
from perc.mdd import MddEngine
from perc.metrics import (
    KmfCollector,
    MddCollector,
    exposition,
    histogram,
    new_registry,
)
from perc.roles.mdd import IoStats

from .kmf_memory import MemoryKmf, ekt_spis, join, pump
from .roles.join_helpers import keying_kmf_config
from .test_cli import idents, started  # noqa: F401 (fixtures)
from .test_mdd import deliver, endpoints, engine, up
from .test_mdd import join as mdd_join

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(*collectors: object) -> Samples:
    """Every sample of the text exposition, by (name, sorted labels)."""
    text = exposition(new_registry(*collectors)).decode()  # type: ignore[arg-type]
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


def test_durations_count_each_value_in_the_first_bucket_that_holds_it() -> None:
    d = Durations((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 5.0):
        d.observe(seconds)
    assert d.counts == [2, 1, 1] and d.total == pytest.approx(5.65)

    class One:
        def collect(self) -> object:
            yield histogram("perc_kmf_x_seconds", "x", d, {"conference": "demo"})

    samples = scrape(One())
    buckets = {
        dict(labels)["le"]: v
        for (name, labels), v in samples.items()
        if name == "perc_kmf_x_seconds_bucket"
    }
    assert buckets == {"0.1": 2, "1.0": 3, "+Inf": 4}  # cumulative, as Prometheus wants
    assert value(samples, "perc_kmf_x_seconds_count", conference="demo") == 4


# --- KMF ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def who() -> SimpleNamespace:
    return SimpleNamespace(
        kmf=identity.generate("kmf"),
        mdd=identity.generate("mdd"),
        members=[identity.generate(f"m{i}") for i in range(3)],
        outsider=identity.generate("outsider"),
    )


def config(who: SimpleNamespace, **policy: object) -> KmfConfig:
    cfg = keying_kmf_config(who.kmf, [who.mdd], {"demo": who.members}, dtls_cookies=False)
    return attrs.evolve(cfg, conferences=tuple(attrs.evolve(c, **policy) for c in cfg.conferences))


def test_kmf_metrics_follow_joins_refusals_rekeys_and_retransmissions(
    who: SimpleNamespace,
) -> None:
    mem = MemoryKmf(config(who, rekey_window=0.5, rekey_on_leave=False))
    engine = mem.engine
    collector = KmfCollector(engine)
    assert value(scrape(collector), "perc_kmf_tunnels_up") == 0
    tunnel = mem.tunnel(who.mdd.fingerprint)
    a, b, _ = who.members
    ea, aid_a = join(mem, a, tunnel)  # the first member: the conference's first key
    mem.advance(mem.now + 2.0)
    eb, aid_b = join(mem, b, tunnel)  # into a live conference: a rekey at once (D31)
    mem.advance(mem.now)
    mem.now += 0.25  # the members ACK a quarter second later
    pump(mem, ea, aid_a, tunnel)
    pump(mem, eb, aid_b, tunnel)
    join(mem, who.outsider, tunnel)  # not on the roster: access_denied

    s = scrape(collector)
    conf = engine.state.conferences["demo"]
    assert conf.current is not None
    assert value(s, "perc_kmf_tunnels_up") == 1
    assert value(s, "perc_kmf_members", conference="demo") == 2
    assert value(s, "perc_kmf_current_spi", conference="demo") == conf.current.spi
    assert ekt_spis(eb)[-1] == conf.current.spi
    assert value(s, "perc_kmf_handshakes_total", result="joined", reason="ok") == 2
    assert value(s, "perc_kmf_handshakes_total", result="refused", reason="access_denied") == 1
    assert value(s, "perc_kmf_join_duration_seconds_count") == 2
    assert value(s, "perc_kmf_rekeys_total", conference="demo", cause="first") == 1
    assert value(s, "perc_kmf_rekeys_total", conference="demo", cause="join") == 1
    # The rekey is done when the last member waited for ACKed it: 0.25 s after it went out.
    assert value(s, "perc_kmf_rekey_duration_seconds_count") == 1
    assert value(s, "perc_kmf_rekey_duration_seconds_sum") == pytest.approx(0.25)
    assert value(s, "perc_kmf_rekey_duration_seconds_bucket", le="0.25") == 1
    assert value(s, "perc_kmf_rekey_duration_seconds_bucket", le="0.1") == 0
    assert value(s, "perc_kmf_associations") == 2
    assert value(s, "perc_kmf_ekt_key_retransmissions_total") == 0

    # A manual rekey nobody ACKs: the DTLS engine retransmits it (1 s, doubling, D9).
    mem.rekey("demo")
    mem.advance(mem.now + 3.5)
    s = scrape(collector)
    assert value(s, "perc_kmf_ekt_key_retransmissions_total") == 2 * 2  # 2 members, 1 s + 2 s
    assert value(s, "perc_kmf_rekeys_total", conference="demo", cause="manual") == 1
    assert value(s, "perc_kmf_rekey_duration_seconds_count") == 1  # not done yet
    # One member leaves, the other ACKs: the rekey is done without the leaver's ACK.
    ea.close(mem.now)
    pump(mem, ea, aid_a, tunnel)
    pump(mem, eb, aid_b, tunnel)
    s = scrape(collector)
    assert value(s, "perc_kmf_rekey_duration_seconds_count") == 2
    assert value(s, "perc_kmf_members", conference="demo") == 1


def test_kmf_metrics_have_no_label_per_association(who: SimpleNamespace) -> None:
    mem = MemoryKmf(config(who))
    tunnel = mem.tunnel(who.mdd.fingerprint)
    for member in who.members:
        join(mem, member, tunnel)
    labels = {k for _, labels in scrape(KmfCollector(mem.engine)) for k, _ in labels}
    assert labels <= {"conference", "reason", "result", "cause", "le"}


def test_a_tunnel_only_engine_has_the_tunnel_metrics(who: SimpleNamespace) -> None:
    from perc.admission import KmfStats
    from perc.kmf import EchoEngine

    stats = KmfStats(connections=5, reset=1, evicted=2)
    s = scrape(KmfCollector(EchoEngine(), stats))
    assert value(s, "perc_kmf_tunnel_connections_total") == 5
    assert value(s, "perc_kmf_tunnel_connections_refused_total", reason="evicted") == 2
    assert ("perc_kmf_members", (("conference", "demo"),)) not in s
    assert not isinstance(EchoEngine(), KmfEngine)


# --- MDD ---------------------------------------------------------------------------------------


@attrs.define
class View:
    engine: MddEngine
    id: str = "demo"
    io: IoStats = attrs.Factory(IoStats)
    forwarding_cpu: float = 0.0


def test_mdd_metrics_are_the_engines_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    e = engine(hold_limit=4)
    view = View(e, forwarding_cpu=1.5)
    collector = MddCollector(lambda: [view])
    s = scrape(collector)
    assert value(s, "perc_mdd_tunnel_up", conference="demo") == 0
    assert value(s, "perc_mdd_links_up", conference="demo") == 0
    up(e)
    eps = endpoints(3)
    a, b, c = eps
    for ep in (a, b):
        mdd_join(e, ep)
    mdd_join(e, c, keys=False)
    for i in range(3):
        e.receive_datagram(a.send(float(i)), a.address, float(i))
        deliver(eps, e.datagrams_to_send(), float(i))
    for i in range(6):  # before c's keys: 4 held (D5), 2 dropped
        e.receive_datagram(c.send(float(i)), c.address, float(i))
    e.receive_datagram(b"\x00junk", a.address, 3.0)
    e.receive_datagram(a.send(4.0), ("127.0.0.9", 9), 4.0)  # an unknown address
    view.io.dropped_udp_send = 7
    s = scrape(collector)
    st = e.stats
    assert value(s, "perc_mdd_tunnel_up", conference="demo") == 1
    assert value(s, "perc_mdd_associations", conference="demo") == 3
    assert value(s, "perc_mdd_packets_in_total", conference="demo", kind="rtp") == 3
    assert value(s, "perc_mdd_packets_out_total", conference="demo", kind="rtp") == 3  # to b
    assert value(s, "perc_mdd_packets_out_total", conference="demo", kind="rtp") == st.srtp_out
    assert value(s, "perc_mdd_bytes_in_total", conference="demo") > 0
    assert value(s, "perc_mdd_held_total", conference="demo") == 4
    assert value(s, "perc_mdd_dropped_total", conference="demo", reason="queue_full") == 2
    assert value(s, "perc_mdd_dropped_total", conference="demo", reason="no_association") == 1
    assert value(s, "perc_mdd_dropped_total", conference="demo", reason="not_srtp_or_dtls") == 1
    assert value(s, "perc_mdd_dropped_total", conference="demo", reason="send_failed") == 7
    assert value(s, "perc_mdd_datagrams_in_total", conference="demo") == st.datagrams_in
    assert value(s, "perc_mdd_dtls_total", conference="demo", direction="to_kmf") == 3
    assert value(s, "perc_mdd_forwarding_cpu_seconds_total", conference="demo") == 1.5
    # An MDD without cascade links (D25): none up (tests/test_links.py counts real ones).
    assert value(s, "perc_mdd_links_up", conference="demo") == 0


def test_mdd_counters_survive_the_associations_that_made_them() -> None:
    from perc.wire.tunnel import EndpointDisconnect

    e = engine()
    up(e)
    eps = endpoints(2)
    for ep in eps:
        mdd_join(e, ep)
    a = eps[0]
    for i in range(5):
        e.receive_datagram(a.send(float(i)), a.address, float(i))
        deliver(eps, e.datagrams_to_send(), float(i))
    e.receive_tunnel_message(EndpointDisconnect(a.association_id), 6.0)
    s = scrape(MddCollector(lambda: [View(e)]))
    assert value(s, "perc_mdd_associations", conference="demo") == 1
    assert value(s, "perc_mdd_packets_in_total", conference="demo", kind="rtp") == 5
    assert value(s, "perc_mdd_packets_out_total", conference="demo", kind="rtp") == 5


# --- configuration and command line ------------------------------------------------------------


def test_metrics_key_and_option_reach_the_role(
    idents: dict[str, Any],  # noqa: F811 (test_cli's fixtures)
    started: list[tuple[Any, Any]],  # noqa: F811
) -> None:
    folder = idents["dir"]
    runner = CliRunner()
    assert runner.invoke(main, ["kmf", "--config", str(folder / "kmf.toml")]).exit_code == 0
    args = ["kmf", "--config", str(folder / "kmf.toml"), "--metrics", "127.0.0.1:9464"]
    assert runner.invoke(main, args).exit_code == 0
    args = ["mdd", "--config", str(folder / "mdd.toml"), "--metrics", "[::1]:0"]
    assert runner.invoke(main, args).exit_code == 0
    (_, off), (_, kmf), (_, mdd) = started
    assert off.kmf.metrics is None  # off unless asked for
    assert kmf.kmf.metrics == HostPort("127.0.0.1", 9464)
    assert mdd.mdd.metrics == HostPort("::1", 0)
    text = (folder / "mdd.toml").read_text()
    text = text.replace("[mdd]\n", '[mdd]\nmetrics = "0.0.0.0:9465"\n')
    (folder / "mdd-metrics.toml").write_text(text)
    assert load_mdd_config(folder / "mdd-metrics.toml").mdd.metrics == HostPort("0.0.0.0", 9465)


@pytest.mark.parametrize("bad", ["9464", "host:port", "1.2.3.4:70000", "::1:9"])
def test_a_bad_metrics_address_is_one_line_and_exit_2(
    idents: dict[str, Any],  # noqa: F811 (test_cli's fixtures)
    started: list[tuple[Any, Any]],  # noqa: F811
    bad: str,
) -> None:
    folder = idents["dir"]
    args = ["kmf", "--config", str(folder / "kmf.toml"), "--metrics", bad]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and started == []
    (line,) = result.output.splitlines()
    assert line.startswith("perc: error: --metrics: bad host:port"), line
    text = (folder / "kmf.toml").read_text().replace("[kmf]\n", f'[kmf]\nmetrics = "{bad}"\n')
    (folder / "kmf-bad.toml").write_text(text)
    with pytest.raises(ConfigError, match=r"kmf\.metrics: bad host:port"):
        load_kmf_config(folder / "kmf-bad.toml")
