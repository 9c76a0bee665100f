"""A TCP proxy that adds latency: every byte arrives ``delay_ms`` later than it was sent, in each direction.

This kernel has no ``netem`` qdisc, so slow links between the lab's namespaces (tunefarm/testing/netns.py) are
made in user space: ``python -m tunefarm.testing.delayproxy LISTEN_HOST:PORT TARGET_HOST:PORT DELAY_MS``
accepts connections and forwards each to the target; data read at time t is written at t + delay (order kept,
no bandwidth limit), so a round trip through it costs 2 x delay more. Used by bench/ and tests; never by the
farm itself.
"""
from __future__ import annotations

import asyncio
import sys
import time

CHUNK = 1 << 16


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def read() -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                await queue.put((time.monotonic() + delay_s, data))
                if not data:
                    return
        except (ConnectionError, OSError):
            await queue.put((time.monotonic() + delay_s, b""))

    async def write() -> None:
        try:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            return

    await asyncio.gather(read(), write())


async def _handle(client_r, client_w, target: tuple[str, int], delay_s: float) -> None:
    try:
        server_r, server_w = await asyncio.open_connection(*target)
    except OSError:
        client_w.close()
        return
    try:
        await asyncio.gather(_pump(client_r, server_w, delay_s), _pump(server_r, client_w, delay_s))
    finally:
        for w in (server_w, client_w):
            w.close()


async def serve(listen: tuple[str, int], target: tuple[str, int], delay_ms: float) -> None:
    server = await asyncio.start_server(lambda r, w: _handle(r, w, target, delay_ms / 1000.0), *listen)
    print(f"delay proxy {listen[0]}:{listen[1]} -> {target[0]}:{target[1]}, +{delay_ms} ms each way", flush=True)
    async with server:
        await server.serve_forever()


def start(listen: str, target: str, delay_ms: float, wait_s: float = 30.0):
    """This proxy in a process of its own (``listen`` and ``target`` as HOST:PORT), returned once it accepts
    connections; the caller kills it."""
    # pylint: disable=import-outside-toplevel
    import socket

    from tunefarm.core.procs import start_process

    proc = start_process([sys.executable, "-m", "tunefarm.testing.delayproxy", listen, target, str(delay_ms)],
                         new_session=False)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            socket.create_connection(_hostport(listen), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the delay proxy on {listen} did not start") from None
            time.sleep(0.1)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: python -m tunefarm.testing.delayproxy LISTEN_HOST:PORT TARGET_HOST:PORT DELAY_MS", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(_hostport(argv[0]), _hostport(argv[1]), float(argv[2])))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
