"""The ``perc`` command line: one click group, one subcommand per role. No protocol logic.

::

    perc [--log-level LEVEL] identity new NAME [--dir DIR] [--days N] [--force]
    perc [--log-level LEVEL] identity show FILE.crt [--key FILE.key]
    perc [--log-level LEVEL] kmf --config kmf.toml [--reset-state] [--metrics HOST:PORT]
    perc [--log-level LEVEL] kmf audit --state FILE [--state-key FILE] [--verify]
    perc [--log-level LEVEL] mdd --config mdd.toml [--workers N]
    perc [--log-level LEVEL] mdd --kmf HOST:PORT --kmf-fingerprint FP --listen HOST:PORT
                                 --cert F --key F [--conference ID] [--idle-timeout S]
    perc [--log-level LEVEL] mdd ... [--metrics HOST:PORT]
    perc [--log-level LEVEL] endpoint --mdd HOST:PORT --cert F --key F --kmf-fingerprint FP
                                 [--tls-id ID] [--kmf-tls-id ID] [--name NAME]
                                 [--join-timeout S] [--duration S] [--keepalive S]
                                 [--media audio|video|both|none] [--expect-peers N]
                                 [--report FILE] [--video-fps F] [--video-bitrate B]
                                 [--codec synthetic|real] [--audio-file FILE]
                                 [--video-file FILE] [--loop] [--record DIR] [--no-repair]
    perc [--log-level LEVEL] demo [--participants N] [--duration S] [--media M] [--keep]
                                  [--mdds M] [--metrics]
    perc admin --socket PATH [--json] conferences | members CONF | kick CONF WHO [--ban]
               | roster add CONF FP [--name N] | roster remove CONF FP | rekey CONF
               | audit [--verify] [--limit N] | status | links CONF

``--log-level`` and ``--log-format human|json`` are also accepted after the subcommand; with
``json`` every log record is one JSON object and typed events (:mod:`perc.events`) carry their
fields, which is what programs such as ``perc demo`` read. A bad configuration or argument prints
one line ``perc: error: <message>`` on stderr and exits 2 before anything starts; a runtime
failure (e.g. a port in use) prints one such line and exits 1; SIGINT/SIGTERM stop a role
cleanly with exit 0. ``perc endpoint`` has more exit statuses, one per way a join can fail
(:class:`perc.endpoint.ExitCode`, listed in its ``--help``). The roles (and trio) are
imported only inside the commands that run them, so ``perc identity`` stays light. Option
defaults and help come from :mod:`perc.config`, the one place defaults live.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from perc import __version__, config, identity, logsetup
from perc import demo as demo_plan


class CliError(click.ClickException):
    """A problem with what the user gave us (config, arguments, files): exit 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"perc: error: {config.one_line(self.message)}", err=True)


class RuntimeFailure(CliError):
    """A role could not run (e.g. its port is in use): exit 1."""

    exit_code = 1


# --- --log-level, accepted before or after the subcommand -------------------------------------

_LEVEL_KEY = "perc.log_level"
_FORMAT_KEY = "perc.log_format"


def _remember_level(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.find_root().meta[_LEVEL_KEY] = value.lower()


def _remember_format(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.find_root().meta[_FORMAT_KEY] = value.lower()


def _log_level_option(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--log-format",
        type=click.Choice(logsetup.FORMATS, case_sensitive=False),
        default=None,
        expose_value=False,
        callback=_remember_format,
        help=f"Log format (default: {logsetup.DEFAULT_FORMAT}); json writes one object per "
        "line with typed events for programs.",
    )(f)
    return click.option(
        "--log-level",
        type=click.Choice(logsetup.LEVELS, case_sensitive=False),
        default=None,
        expose_value=False,
        callback=_remember_level,
        help=f"Log verbosity (default: {logsetup.DEFAULT_LEVEL}); logs go to stderr.",
    )(f)


def _setup_logging() -> None:
    meta = click.get_current_context().find_root().meta
    logsetup.setup(
        meta.get(_LEVEL_KEY, logsetup.DEFAULT_LEVEL),
        fmt=meta.get(_FORMAT_KEY, logsetup.DEFAULT_FORMAT),
    )


def _doc(cls: type[Any], key: str) -> str:
    """Help text of a config key, from its schema (perc.config is the source)."""
    setting = next(s for s in config.describe(cls) if s.key == key)
    return setting.doc[:1].upper() + setting.doc[1:] + "."


def _default(cls: type[Any], key: str) -> Any:
    return next(s for s in config.describe(cls) if s.key == key).default


# --- running a role ---------------------------------------------------------------------------


def _find_os_error(exc: BaseException) -> OSError | None:
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _find_os_error(sub)
            if found is not None:
                return found
    return None


def _metrics_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--metrics",
        metavar="HOST:PORT",
        default=None,
        help="Serve Prometheus metrics at http://HOST:PORT/metrics (D34); overrides the "
        "config's metrics key [default: off].",
    )(f)


def _with_metrics(cfg: Any, table: str, text: str | None) -> Any:
    """``cfg`` with ``[table] metrics`` set from ``--metrics`` (unchanged when not given)."""
    if text is None:
        return cfg
    import attrs

    try:
        address = config.parse_host_port(text)
    except ValueError as e:
        raise CliError(f"--metrics: {e}") from None
    settings = attrs.evolve(getattr(cfg, table), metrics=address)
    return attrs.evolve(cfg, **{table: settings})


def _run_role(serve: Callable[..., Awaitable[object]], cfg: object, what: str = "") -> None:
    """Run a role's ``serve(config)`` under trio until SIGINT/SIGTERM (then exit 0).

    An OSError out of the role (a port in use, an address not on this host) becomes one
    ``perc: error:`` line prefixed with ``what`` and exit status 1; a configuration the role
    finds unusable once running (:class:`perc.config.ConfigError`, such as the metrics address
    in use: :class:`perc.roles.metrics.MetricsError`) is one such line with exit status 2.
    """
    from perc.roles.runner import run_until_signal

    try:
        run_until_signal(serve, cfg)
    except config.ConfigError as e:
        raise CliError(str(e)) from None
    except (OSError, BaseExceptionGroup) as e:
        os_error = _find_os_error(e)
        if os_error is None:
            raise
        text = os_error.strerror or str(os_error)
        raise RuntimeFailure(f"{what}: {text}" if what else text) from None


def _check_admin_socket(path: Path | None) -> None:
    """D33: a bad admin socket path stops the role before it starts (exit 2)."""
    if path is None:
        return
    from perc.admin import AdminError
    from perc.roles.admin import prepare_socket_path

    try:
        prepare_socket_path(path)
    except AdminError as e:
        raise CliError(str(e)) from None


# --- the commands -----------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="perc")
@_log_level_option
def main() -> None:
    """Privacy Enhanced RTP Conferencing (RFC 8871): kmf | mdd | endpoint | demo | identity |
    admin.

    The KMF (Key Distributor) authenticates endpoints and hands out keys; the MDD (Media
    Distributor) relays endpoint DTLS to the KMF through an RFC 9185 tunnel and forwards
    media it cannot decrypt; an endpoint joins a conference through an MDD. `perc demo` runs
    a whole conference on loopback.
    """


@main.group("identity")
def identity_group() -> None:
    """Make and inspect certificates (self-signed ECDSA P-256, identified by fingerprint)."""


@identity_group.command("new")
@click.argument("name")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Folder to write NAME.key and NAME.crt into.",
)
@click.option(
    "--days",
    type=click.IntRange(1, 36500),
    default=3650,
    show_default=True,
    help="Validity of the certificate in days.",
)
@click.option("--force", is_flag=True, help="Overwrite existing NAME.key / NAME.crt.")
@_log_level_option
def identity_new(name: str, directory: Path, days: int, force: bool) -> None:
    """Write NAME.key (private key, mode 0600) and NAME.crt; print the fingerprint.

    The fingerprint (`sha-256 AB:CD:...`, as in SDP a=fingerprint) is what the other side
    puts in its config (trusted_mdds, kmf_fingerprint, participants).
    """
    try:
        identity.check_name(name)
        ident = identity.generate(name, days=days)
        key_path, crt_path = identity.write(ident, directory, name, overwrite=force)
    except identity.IdentityError as e:
        raise CliError(str(e)) from None
    click.echo(f"perc: wrote {key_path} and {crt_path}", err=True)
    click.echo(ident.fingerprint)


@identity_group.command("show")
@click.argument("certificate", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also check that this private key belongs to the certificate.",
)
@_log_level_option
def identity_show(certificate: Path, key: Path | None) -> None:
    """Print the fingerprint of a certificate (PEM or DER)."""
    try:
        if key is not None:
            cert = identity.load(certificate, key).certificate
        else:
            cert = identity.load_certificate(certificate)
    except identity.IdentityError as e:
        raise CliError(str(e)) from None
    click.echo(identity.fingerprint_of(cert))


@main.group("kmf", invoke_without_command=True)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="KMF config file (TOML: [kmf] and [[conference]] tables; see perc(1)); required "
    "to run the KMF.",
)
@click.option(
    "--reset-state",
    is_flag=True,
    help="Delete the state file (D28: stored SPIs, audit log) and start with an empty one; "
    "without it an unusable state file stops the KMF (exit 2) and is left as it is.",
)
@_metrics_option
@_log_level_option
@click.pass_context
def kmf_command(
    ctx: click.Context, config_path: Path | None, reset_state: bool, metrics: str | None
) -> None:
    """Run the Key Distributor: the RFC 9185 tunnel server the MDDs connect to.

    Its state (SPIs that survive restarts, the audit log) is kept in the file [kmf] state
    names, kmf-state.sqlite beside the config by default; `perc kmf audit` reads the log.
    """
    if ctx.invoked_subcommand is not None:
        if config_path is not None or reset_state or metrics is not None:
            sub = ctx.invoked_subcommand
            raise CliError(f"--config, --reset-state and --metrics run the KMF: not with {sub}")
        return
    if config_path is None:
        raise CliError("give --config FILE (or a subcommand: audit)")
    try:
        cfg = config.load_kmf_config(config_path)
    except config.ConfigError as e:
        raise CliError(str(e)) from None
    cfg = _with_metrics(cfg, "kmf", metrics)
    _check_admin_socket(cfg.kmf.admin_socket)
    _setup_logging()
    from perc.roles import kmf
    from perc.state import StateError

    try:
        if reset_state:
            if cfg.kmf.state is None:
                raise CliError('--reset-state: this config keeps no state file (state = "")')
            state = kmf.open_state(cfg, reset=True)
            if state is not None:
                state.close()
        _run_role(kmf.serve, cfg, f"KMF on {cfg.kmf.listen}")
    except StateError as e:
        # D28: one line naming the file and what is wrong; nothing is overwritten.
        raise CliError(str(e)) from None


def _audit_table(rows: list[Any]) -> list[str]:
    """The audit rows as plain aligned columns (D32)."""
    head = ("#", "time", "event", "conference", "name", "fingerprint", "association", "spi",
            "mdd")  # fmt: skip
    table = [head]
    for r in rows:
        spi = "-" if r.spi is None else str(r.spi)
        table.append((str(r.seq), r.time, r.event, r.conference or "-", r.name or "-",
                      r.fingerprint or "-", r.association_id or "-", spi,
                      r.mdd_fingerprint or "-"))  # fmt: skip
    widths = [max(len(config.one_line(row[i])) for row in table) for i in range(len(head))]
    return [
        "  ".join(config.one_line(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]


@kmf_command.command("audit")
@click.option(
    "--state",
    "state_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The KMF's state file (D28); read only, also while the KMF runs.",
)
@click.option(
    "--state-key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"Its state key [default: {config.DEFAULT_STATE_KEY_FILE} beside the state file].",
)
@click.option(
    "--verify",
    is_flag=True,
    help="Check the hash chain (D32): exit 0 when it verifies, 1 naming the first bad row.",
)
@_log_level_option
def kmf_audit_command(state_path: Path, state_key: Path | None, verify: bool) -> None:
    """Print the KMF's audit log (D32): one row per join, leave, deny, rekey, KMF start, and
    the admin socket's kick, roster_add and roster_remove."""
    from perc.state import StateError, audit_report

    key_path = state_key or state_path.with_name(config.DEFAULT_STATE_KEY_FILE)
    try:
        report = audit_report(state_path, key_path, verify=verify)
    except StateError as e:
        raise CliError(str(e)) from None
    for line in _audit_table(report.rows):
        click.echo(line)
    if report.verdict is not None:
        click.echo(str(report.verdict))
        if not report.ok:
            click.echo(f"perc: error: {config.one_line(str(report.verdict))}", err=True)
            click.get_current_context().exit(1)


_QUICK = ("kmf", "kmf_fingerprint", "listen", "cert", "key")


@main.command("mdd")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="MDD config file (TOML: [mdd] and [[conference]] tables; see perc(1)).",
)
@click.option("--kmf", metavar="HOST:PORT", help="Quick form: " + _doc(config.MddConference, "kmf"))
@click.option(
    "--kmf-fingerprint",
    metavar="FP",
    help="Quick form: " + _doc(config.MddConference, "kmf_fingerprint"),
)
@click.option(
    "--listen", metavar="HOST:PORT", help="Quick form: " + _doc(config.MddConference, "listen")
)
@click.option("--cert", metavar="FILE", help="Quick form: " + _doc(config.MddSettings, "cert"))
@click.option("--key", metavar="FILE", help="Quick form: " + _doc(config.MddSettings, "key"))
@click.option(
    "--conference",
    metavar="ID",
    default="demo",
    show_default=True,
    help="Quick form: " + _doc(config.MddConference, "id"),
)
@click.option(
    "--idle-timeout",
    type=float,
    default=None,
    help="Quick form: "
    + _doc(config.MddSettings, "idle_timeout")
    + f" [default: {_default(config.MddSettings, 'idle_timeout')}]",
)
@_metrics_option
@click.option(
    "--workers",
    type=int,
    default=None,
    metavar="N",
    help=_doc(config.MddSettings, "workers")
    + f" Overrides [mdd] workers [default: {_default(config.MddSettings, 'workers')}]",
)
@click.option("--worker-plan", hidden=True, default=None)
@_log_level_option
def mdd_command(
    *,
    config_path: Path | None,
    kmf: str | None,
    kmf_fingerprint: str | None,
    listen: str | None,
    cert: str | None,
    key: str | None,
    conference: str,
    idle_timeout: float | None,
    metrics: str | None,
    workers: int | None,
    worker_plan: str | None,
) -> None:
    """Run the Media Distributor: UDP for endpoints, one RFC 9185 tunnel per conference.

    Either --config FILE, or the quick form for one conference: --kmf, --kmf-fingerprint,
    --listen, --cert and --key (relative paths are relative to the current folder).
    """
    quick = {
        "kmf": kmf,
        "kmf_fingerprint": kmf_fingerprint,
        "listen": listen,
        "cert": cert,
        "key": key,
    }
    given = [name for name, value in quick.items() if value is not None]
    if config_path is not None:
        if given or idle_timeout is not None:
            options = ", ".join("--" + n.replace("_", "-") for n in given) or "--idle-timeout"
            raise CliError(f"--config cannot be combined with the quick form ({options})")
        try:
            cfg = config.load_mdd_config(config_path)
        except config.ConfigError as e:
            raise CliError(str(e)) from None
    else:
        if kmf is None or kmf_fingerprint is None or listen is None or cert is None or key is None:
            missing = [n for n in _QUICK if quick[n] is None]
            if len(missing) == len(_QUICK):
                raise CliError(
                    "give --config FILE, or --kmf, --kmf-fingerprint, --listen, --cert and --key"
                )
            names = ", ".join("--" + n.replace("_", "-") for n in missing)
            raise CliError(f"the quick form also needs {names}")
        try:
            cfg = config.mdd_quick_config(
                kmf=kmf,
                kmf_fingerprint=kmf_fingerprint,
                listen=listen,
                cert=cert,
                key=key,
                conference=conference,
                idle_timeout=idle_timeout,
            )
        except config.ConfigError as e:
            raise CliError(str(e)) from None
    listens = ", ".join(str(c.listen) for c in cfg.conferences)
    if worker_plan is not None:
        _run_worker(cfg, worker_plan, listens)
        return
    if workers is not None:
        try:
            cfg = config.with_workers(cfg, workers)
        except config.ConfigError as e:
            raise CliError(str(e)) from None
    cfg = _with_metrics(cfg, "mdd", metrics)
    if cfg.mdd.workers > 1 and (cfg.mdd.metrics is not None or cfg.mdd.admin_socket):
        raise CliError(
            "mdd.workers > 1 cannot be combined with mdd.metrics or mdd.admin_socket yet "
            "(each worker would bind them); run with workers = 1 to use them"
        )
    _check_admin_socket(cfg.mdd.admin_socket)
    _setup_logging()
    if cfg.mdd.workers > 1:
        if config_path is not None:
            args = ["mdd", "--config", str(config_path.resolve())]
        else:
            args = ["mdd", "--conference", conference]
            args += [f"--{n.replace('_', '-')}={v}" for n, v in quick.items()]
            if idle_timeout is not None:
                args.append(f"--idle-timeout={idle_timeout}")
        _run_supervisor(cfg, args, listens)
        return
    import functools

    from perc.roles import mdd

    _run_role(functools.partial(mdd.serve, freeze_heap=True), cfg, f"MDD on {listens}")


def _run_supervisor(cfg: config.MddConfig, args: list[str], listens: str) -> None:
    """D27: run ``cfg.mdd.workers`` copies of this command as workers, supervised."""
    import functools

    from perc.roles import workers

    meta = click.get_current_context().find_root().meta
    command = workers.worker_command(
        args,
        meta.get(_LEVEL_KEY, logsetup.DEFAULT_LEVEL),
        meta.get(_FORMAT_KEY, logsetup.DEFAULT_FORMAT),
    )
    try:
        _run_role(
            functools.partial(workers.supervise, worker_command=command),
            cfg,
            f"MDD on {listens}",
        )
    except workers.WorkerFailed as e:
        raise RuntimeFailure(str(e)) from None


def _run_worker(cfg: config.MddConfig, text: str, listens: str) -> None:
    """One D27 worker, started by a supervising ``perc mdd`` (the hidden --worker-plan)."""
    import functools

    from perc import workers as plans
    from perc.roles import workers

    try:
        plan = plans.WorkerPlan.from_json(text)
    except plans.WorkerPlanError as e:
        raise CliError(str(e)) from None
    missing = sorted(set(plan.conferences) ^ {c.id for c in cfg.conferences})
    if missing:
        raise CliError(f"bad worker plan: conferences {', '.join(missing)} do not match")
    _setup_logging()
    _run_role(
        functools.partial(workers.serve_worker, plan=plan, freeze_heap=True),
        cfg,
        f"MDD worker {plan.index} on {listens}",
    )


# Kept in step with perc.endpoint.ExitCode (a test checks); here so that --help does not
# import the endpoint's DTLS and media code.
_ENDPOINT_EXIT_CODES = (
    (0, "joined, then left on SIGINT/SIGTERM or after --duration (and --expect-peers met)"),
    (1, "local runtime failure (the MDD host does not resolve, SSLKEYLOGFILE unopenable)"),
    (2, "bad arguments or files"),
    (3, "refused by the KMF (fatal alert, e.g. access_denied: not on the roster)"),
    (4, "wrong KMF (certificate fingerprint or tls-id not the expected one)"),
    (5, "timeout: no join within --join-timeout"),
    (6, "joined, then the association was ended (by access_denied, or any end with --no-rejoin)"),
    (7, "protocol failure (e.g. the KMF negotiated no EKT)"),
    (8, "fewer peers' media received and verified end to end than --expect-peers"),
    (9, "peers went silent: media stopped > --silence-limit before the end, no BYE, no rekey"),
    (10, "removed by the KMF operator (perc admin kick: the KMF's close_notify); no rejoin"),
)


_E = config.EndpointConfig


def _endpoint_help(key: str) -> str:
    """An endpoint option's help and default, both from :class:`perc.config.EndpointConfig`."""
    value = _default(_E, key)
    return _doc(_E, key) + ("" if value is None else f" [default: {value}]")


@main.command(
    "endpoint",
    epilog="\b\nExit status:\n"
    + "\n".join(f"  {code}  {text}" for code, text in _ENDPOINT_EXIT_CODES),
)
@click.option("--mdd", metavar="HOST:PORT", required=True, help=_doc(_E, "mdd"))
@click.option("--cert", metavar="FILE", required=True, help=_doc(_E, "cert"))
@click.option("--key", metavar="FILE", required=True, help=_doc(_E, "key"))
@click.option("--kmf-fingerprint", metavar="FP", required=True, help=_doc(_E, "kmf_fingerprint"))
@click.option("--tls-id", metavar="ID", help=_doc(_E, "tls_id"))
@click.option("--kmf-tls-id", metavar="ID", help=_doc(_E, "kmf_tls_id"))
@click.option("--name", help=_doc(_E, "name"))
@click.option("--join-timeout", metavar="S", type=float, help=_endpoint_help("join_timeout"))
@click.option("--duration", metavar="S", type=float, help=_doc(_E, "duration"))
@click.option("--keepalive", metavar="S", type=float, help=_endpoint_help("keepalive"))
@click.option("--media", type=click.Choice(config.ENDPOINT_MEDIA), help=_endpoint_help("media"))
@click.option(
    "--expect-peers", type=click.IntRange(0, 100_000), help=_endpoint_help("expect_peers")
)
@click.option(
    "--report",
    metavar="FILE",
    type=click.Path(dir_okay=False, path_type=Path),
    help=_doc(_E, "report"),
)
@click.option("--rejoin/--no-rejoin", default=None, help=_endpoint_help("rejoin"))
@click.option("--rejoin-silence", metavar="S", type=float, help=_endpoint_help("rejoin_silence"))
@click.option("--silence-limit", metavar="S", type=float, help=_endpoint_help("silence_limit"))
@click.option("--video-fps", type=float, help=_endpoint_help("video_fps"))
@click.option("--video-bitrate", type=int, help=_endpoint_help("video_bitrate"))
@click.option("--codec", type=click.Choice(config.ENDPOINT_CODECS), help=_endpoint_help("codec"))
@click.option("--audio-file", metavar="FILE", help=_doc(_E, "audio_file"))
@click.option("--video-file", metavar="FILE", help=_doc(_E, "video_file"))
@click.option("--loop", is_flag=True, default=None, help=_endpoint_help("loop"))
@click.option("--record", metavar="DIR", help=_doc(_E, "record"))
@click.option("--repair/--no-repair", default=None, help=_endpoint_help("repair"))
@_log_level_option
def endpoint_command(**options: Any) -> None:
    """Join a conference through an MDD, then send and verify double-encrypted media.

    The endpoint is the DTLS client of the KMF (its DTLS is relayed by the MDD). It offers
    both DOUBLE profiles and both EKT ciphers, accepts the server only if its certificate
    has --kmf-fingerprint, and has joined once the handshake completed and the conference's
    EKTKey arrived (logged as "joined ... profile=... spi=..."). It then sends --media,
    encrypted end to end with its own key (announced in EKT tags) and hop by hop for the
    MDD, verifies what the others send, switches keys on every new EKTKey, and stays until
    SIGINT/SIGTERM or --duration; then RTCP BYE, close_notify, and a "media summary" log
    line. SSLKEYLOGFILE, when set, receives the DTLS secrets.
    """
    from perc import endpoint as core
    from perc import keylog as keylog_module
    from perc.media.payload import PayloadUsageError, minimum_payload_size
    from perc.media.sources import SourceUsageError

    try:
        cfg = config.endpoint_config(**options)
        ident = identity.load(cfg.cert, cfg.key)
    except (config.ConfigError, identity.IdentityError) as e:
        raise CliError(str(e)) from None
    settings = core.JoinSettings.from_config(cfg, ident)
    try:
        minimum_payload_size(settings.name)  # every media payload carries the name
    except PayloadUsageError as e:
        raise CliError(f"--name: {settings.name!r}: {e}") from None
    try:
        media_options = core.MediaOptions.from_config(cfg)
    except SourceUsageError as e:
        raise CliError(f"--video-fps/--video-bitrate: {e}") from None
    if cfg.report is not None and not cfg.report.parent.is_dir():
        raise CliError(f"--report: folder {str(cfg.report.parent)!r} does not exist")
    pipeline = None
    if media_options.real is not None:
        pipeline = _media_pipeline(media_options, settings.name)
    _setup_logging()
    try:
        keylog = keylog_module.keylog_from_env()
    except keylog_module.KeyLogError as e:
        # The environment, not the arguments: exit 1, as perc kmf does.
        raise RuntimeFailure(str(e)) from None

    from perc.roles import endpoint

    run = endpoint.MediaRun(settings, media_options, pipeline)
    try:
        try:
            _run_role(
                _endpoint_main,
                (run, cfg.duration, keylog, cfg.keepalive or None),
                f"endpoint to {cfg.mdd}",
            )
        except core.JoinError as e:
            code, message = run.finish(e)
        else:
            code, message = run.finish()
    except RuntimeFailure:
        run.abandon(core.ExitCode.FAILURE)
        raise
    if message is not None:
        # One line, like CliError, but with the endpoint's own exit status.
        click.echo(f"perc: error: {config.one_line(message)}", err=True)
    click.get_current_context().exit(int(code))


def _media_pipeline(options: Any, name: str) -> Any:
    """Real media's codecs, files opened and the record folder checked before joining."""
    try:
        from perc.media import pipeline
    except ImportError:
        raise CliError(
            "--codec real, --audio-file, --video-file and --record need PyAV: "
            "pip install 'perc[media]'"
        ) from None
    media = options.media
    try:
        return pipeline.Pipeline(
            options.real,
            name,
            audio=options.codec == "real" and media in ("audio", "both"),
            video=options.codec == "real" and media in ("video", "both"),
        )
    except pipeline.MediaFileError as e:
        raise CliError(str(e)) from None
    except ValueError as e:  # e.g. a frame rate or size the encoder refuses
        raise CliError(f"--video-fps/--video-bitrate: {e}") from None


async def _endpoint_main(args: tuple[Any, float | None, Any, float | None]) -> None:
    run, duration, keylog, keepalive = args
    await run.run(duration=duration, keylog=keylog, keepalive=keepalive)


@main.command(
    "demo",
    epilog="\b\nExit status:\n  0  every endpoint verified every other end to end, both "
    "rekeys adopted\n  1  anything else (the reasons are printed)\n  2  bad arguments\n"
    "  130  interrupted (SIGINT/SIGTERM; every child process is stopped and reaped)",
)
@click.option(
    "--participants",
    metavar="N",
    type=int,
    default=None,
    help=f"Endpoints in the conference, 2 to {len(demo_plan.NAMES)} "
    f"[default: {demo_plan.DEFAULT_PARTICIPANTS}].",
)
@click.option(
    "--duration",
    metavar="S",
    type=float,
    default=None,
    help=f"Seconds of conference, at least {demo_plan.MIN_DURATION:g} (the leave and rejoin "
    f"happen halfway) [default: {demo_plan.DEFAULT_DURATION:g}].",
)
@click.option(
    "--media",
    type=click.Choice(demo_plan.MEDIA_CHOICES),
    default=None,
    help=f"What every endpoint sends [default: {demo_plan.DEFAULT_MEDIA}].",
)
@click.option(
    "--mdds",
    metavar="M",
    type=int,
    default=None,
    help=f"MDD processes, chained by cascade links, 1 to {demo_plan.MAX_MDDS}; the endpoints "
    "are spread over them [default: 1].",
)
@click.option(
    "--keep",
    is_flag=True,
    default=None,
    help="Keep the temporary folder (configs, identities, JSON reports, one log per process); "
    "also PERC_DEMO_KEEP=1.",
)
@click.option(
    "--metrics",
    is_flag=True,
    default=False,
    help="The KMF and the MDD also serve Prometheus metrics on free loopback ports; their "
    "URLs are printed and answer until the demo ends.",
)
@_log_level_option
def demo_command(
    *,
    participants: int | None,
    duration: float | None,
    media: str | None,
    keep: bool | None,
    metrics: bool,
    mdds: int | None,
) -> NoReturn:
    """Run a whole conference on loopback: one KMF, one MDD and N endpoints as processes.

    Throwaway identities and configs in a temporary folder; a live table per endpoint (peers
    verified, packets, failures, current SPI); the last endpoint leaves halfway and rejoins
    (two rekeys); then clean up. Exit 0 only if every endpoint verified every other.
    """
    _setup_logging()
    from perc.roles import demo

    given: dict[str, Any] = {}
    if participants is not None:
        given["participants"] = participants
    if duration is not None:
        given["duration"] = duration
    if media is not None:
        given["media"] = media
    if metrics:
        given["metrics"] = True
    if mdds is not None:
        given["mdds"] = mdds
    sys.exit(demo.main(**given, keep=keep or None))


# --- perc admin (D33) ---------------------------------------------------------------------------


@main.group("admin")
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The admin socket of a running KMF or MDD ([kmf] or [mdd] admin_socket); required.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the answer as one JSON object.")
@_log_level_option
@click.pass_context
def admin_group(ctx: click.Context, socket_path: Path | None, as_json: bool) -> None:
    """Talk to a running KMF or MDD over its admin socket (JSON lines, D33).

    KMF: conferences, members, kick, roster add|remove, rekey, audit. MDD: status, links.
    Prints a table (or --json the answer); a refused request prints one `perc: error:` line
    and exits 1.
    """
    ctx.obj = (socket_path, as_json)


def _admin(op: str, **fields: Any) -> None:
    from perc.admin import AdminError, render, request_line
    from perc.roles.admin import call

    socket_path, as_json = click.get_current_context().obj
    if socket_path is None:
        raise CliError("give --socket PATH (the admin_socket of a running KMF or MDD)")
    try:
        answer = call(socket_path, request_line(op, **fields))
    except AdminError as e:
        raise RuntimeFailure(f"admin socket {socket_path}: {e}") from None
    except OSError as e:
        raise RuntimeFailure(f"admin socket {socket_path}: {e.strerror or e}") from None
    if not answer["ok"]:
        raise RuntimeFailure(str(answer.get("error", "refused")))
    if as_json:
        import json

        click.echo(json.dumps(answer))
    else:
        for line in render(op, answer):
            click.echo(line)
    verdict = answer.get("verdict")
    if isinstance(verdict, dict) and not verdict.get("ok"):
        raise RuntimeFailure(str(verdict.get("text")))


@admin_group.command("conferences")
def admin_conferences() -> None:
    """KMF: each conference's members, roster size, current SPI."""
    _admin("conferences")


@admin_group.command("members")
@click.argument("conference")
def admin_members(conference: str) -> None:
    """KMF: the members of CONFERENCE (name, fingerprint, association, SPI)."""
    _admin("members", conference=conference)


@admin_group.command("kick")
@click.argument("conference")
@click.argument("who")
@click.option("--ban", is_flag=True, help="Also take it off the roster (kept in the state).")
def admin_kick(conference: str, who: str, ban: bool) -> None:
    """KMF: remove WHO (certificate name or fingerprint) from CONFERENCE.

    Its association is closed (close_notify: the endpoint exits 10), its MDD told, and every
    other member gets a new EKTKey at once, so WHO cannot read what follows.
    """
    _admin("kick", conference=conference, who=who, ban=ban)


@admin_group.group("roster")
def admin_roster() -> None:
    """KMF: change a conference's roster while it runs (kept in the state)."""


@admin_roster.command("add")
@click.argument("conference")
@click.argument("fingerprint")
@click.option("--name", default=None, help="A name for the audit log.")
def admin_roster_add(conference: str, fingerprint: str, name: str | None) -> None:
    """KMF: let FINGERPRINT join CONFERENCE."""
    _admin("roster_add", conference=conference, fingerprint=fingerprint, name=name)


@admin_roster.command("remove")
@click.argument("conference")
@click.argument("fingerprint")
def admin_roster_remove(conference: str, fingerprint: str) -> None:
    """KMF: refuse FINGERPRINT from now on (members stay until kicked)."""
    _admin("roster_remove", conference=conference, fingerprint=fingerprint)


@admin_group.command("rekey")
@click.argument("conference")
def admin_rekey(conference: str) -> None:
    """KMF: a new EKTKey for every member of CONFERENCE now."""
    _admin("rekey", conference=conference)


@admin_group.command("audit")
@click.option("--verify", is_flag=True, help="Check the hash chain (D32); exit 1 if broken.")
@click.option(
    "--limit", type=click.IntRange(0), default=100, show_default=True, help="Newest rows shown."
)
def admin_audit(verify: bool, limit: int) -> None:
    """KMF: the audit log (D32) of the running KMF."""
    _admin("audit", verify=verify, limit=limit)


@admin_group.command("status")
def admin_status() -> None:
    """MDD: per conference, tunnel, associations and counters."""
    _admin("status")


@admin_group.command("links")
@click.argument("conference")
def admin_links(conference: str) -> None:
    """MDD: the cascade links of CONFERENCE (none yet)."""
    _admin("links", conference=conference)
