import socket

import trio

from tests.netutil.impair import ImpairmentProxy, _recv


async def test_proxy_forwards_drops_and_reorders_both_ways() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.setblocking(False)
    server.bind(("127.0.0.1", 0))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setblocking(False)
    client.bind(("127.0.0.1", 0))
    proxy = ImpairmentProxy(server.getsockname(), drop=0.1, reorder=0.1, seed=7, reorder_delay=0.02)
    n = 400
    seen_at_server: list[int] = []
    seen_at_client: list[int] = []
    upstream_addrs: set[tuple[str, int]] = set()

    async def echo() -> None:
        while True:
            data, addr = await _recv(server)
            upstream_addrs.add(addr)
            seen_at_server.append(int.from_bytes(data, "big"))
            server.sendto(data, addr)

    async def collect() -> None:
        while True:
            data, _ = await _recv(client)
            seen_at_client.append(int.from_bytes(data, "big"))

    with client, server:
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(proxy.serve)
            nursery.start_soon(echo)
            nursery.start_soon(collect)
            for i in range(n):
                client.sendto(i.to_bytes(4, "big"), addr)
                if i % 20 == 0:
                    await trio.sleep(0.001)
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()

    assert len(upstream_addrs) == 1
    to_server = proxy.to_server
    assert to_server.dropped + to_server.forwarded == n
    assert 0.05 * n < to_server.dropped < 0.16 * n
    assert to_server.reordered > 0.05 * n
    assert len(seen_at_server) == to_server.forwarded
    assert seen_at_server != sorted(seen_at_server)  # something overtook something
    back = proxy.to_client
    assert back.dropped > 0 and back.reordered > 0
    assert len(seen_at_client) == back.forwarded


async def test_proxy_drops_in_one_direction_only() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.setblocking(False)
    server.bind(("127.0.0.1", 0))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setblocking(False)
    client.bind(("127.0.0.1", 0))
    proxy = ImpairmentProxy(server.getsockname(), drop=0.0, reorder=0.0, drop_to_client=0.2, seed=3)
    n = 300
    back = 0

    async def echo() -> None:
        while True:
            data, addr = await _recv(server)
            server.sendto(data, addr)

    async def collect() -> None:
        nonlocal back
        while True:
            await _recv(client)
            back += 1

    with client, server:
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(proxy.serve)
            nursery.start_soon(echo)
            nursery.start_soon(collect)
            for i in range(n):
                client.sendto(i.to_bytes(4, "big"), addr)
                if i % 20 == 0:
                    await trio.sleep(0.001)
            with trio.fail_after(20):  # every echo is decided, then every survivor arrives
                while proxy.to_client.forwarded + proxy.to_client.dropped < n:
                    await trio.sleep(0.01)
                while back < proxy.to_client.forwarded:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    assert proxy.to_server.dropped == 0 and proxy.to_server.forwarded == n
    assert 0.1 * n < proxy.to_client.dropped < 0.3 * n
    assert back == proxy.to_client.forwarded
