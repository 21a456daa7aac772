"""Run a role's async serve function until SIGINT or SIGTERM, then return (exit status 0).

``perc kmf``/``perc mdd`` call :func:`run_until_signal` with ``perc.roles.kmf.serve`` and a
loaded config. The signal handler is a trio signal receiver, so a signal cancels the role's
tasks (which close their sockets and tunnels on the way out) instead of raising
``KeyboardInterrupt`` in the middle of a write. An exception from the role (e.g. an address
already in use) propagates unwrapped, for the CLI to report.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

__all__ = ["run_until_signal"]

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def _watch(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for signum in signals:
        log.info("stopping on %s", signal.Signals(signum).name)
        scope.cancel()
        return


async def _main(async_fn: Callable[..., Awaitable[object]], args: tuple[object, ...]) -> None:
    with trio.open_signal_receiver(*_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch, signals, nursery.cancel_scope)
            await async_fn(*args)
            # The role returned on its own (e.g. a finished demo): stop watching.
            nursery.cancel_scope.cancel()


def run_until_signal(async_fn: Callable[..., Awaitable[object]], *args: object) -> None:
    """``trio.run(async_fn, *args)``, returning normally on SIGINT/SIGTERM or when it returns."""
    try:
        trio.run(_main, async_fn, args)
    except KeyboardInterrupt:
        # SIGINT before the signal receiver was installed (during start-up).
        log.info("stopping on SIGINT")
    except BaseExceptionGroup as group:
        # The nursery wraps the role's own failure; hand the CLI the exception itself.
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc))
        else:
            out.append(exc)
    return out
