"""An HTTP proxy in front of a listener that counts the uploads in flight, and of how many VMs.

The agent is pointed at the proxy's port instead of the listener's.  Every
request is passed on unchanged (method, path with query, headers, body
streamed as it comes), so signatures stay valid.  An upload is a ``PUT`` with
a body (an initial window or a cycle, with a length or chunked); it is in flight from the moment its
request line arrives until its answer is sent back.
"""

from __future__ import annotations

import asyncio
import threading

import aiohttp
from aiohttp import web

from daemons import free_tcp_port

HOP_HEADERS = {"host", "transfer-encoding", "connection", "keep-alive"}


class UploadCounter:
    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_tcp_port()
        self.in_flight: dict[str, int] = {}  # vm_id -> uploads of it in flight
        self.most_vms = 0  # most VMs uploading at the same time
        self.uploads = 0
        self.received: list[tuple[float, int]] = []  # (loop time, bytes) of every piece of an upload body
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("upload counter did not start")

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application(client_max_size=1 << 34)
        app.router.add_route("*", "/{tail:.*}", self._pass_on)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            self._session = session
            await site.start()
            self._ready.set()
            await self._stop.wait()
        await runner.cleanup()

    async def _pass_on(self, request: web.Request) -> web.StreamResponse:
        # a body with a length, or chunked (a streamed cycle, whose commit request follows it)
        upload = request.method == "PUT" and request.body_exists and "/replicas/" in request.path
        vm = request.path.split("/")[3] if upload else ""
        if upload:
            self.uploads += 1
            self.in_flight[vm] = self.in_flight.get(vm, 0) + 1
            self.most_vms = max(self.most_vms, len(self.in_flight))
        try:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
            body = self._recorded(request.content) if request.can_read_body else None
            async with self._session.request(request.method, f"http://127.0.0.1:{self.target_port}{request.path_qs}",
                                             headers=headers, data=body, allow_redirects=False) as resp:
                answer = await resp.read()
                return web.Response(status=resp.status, body=answer,
                                    headers={"Content-Type": resp.headers.get("Content-Type", "application/json")})
        finally:
            if upload:
                self.in_flight[vm] -= 1
                if not self.in_flight[vm]:
                    del self.in_flight[vm]

    async def _recorded(self, content):
        loop = asyncio.get_running_loop()
        async for piece in content.iter_any():
            self.received.append((loop.time(), len(piece)))
            yield piece

    def rate(self) -> float:
        """Bytes per second of upload bodies from the first byte received to the last."""
        (first, _), (last, _) = self.received[0], self.received[-1]
        return sum(n for _, n in self.received[1:]) / (last - first)

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def __enter__(self) -> UploadCounter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
