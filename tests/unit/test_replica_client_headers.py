"""What the agent does with a replica server's answer headers it cannot use: a clear transient error,
never a ValueError from int() (a hostile or broken server on a real socket)."""

from __future__ import annotations

import uuid

import pytest
from aiohttp import web

from hvr_agent.replica_client import ReplicaClient, ReplicaEndpoint, ReplicaUnavailableError
from hvr_common.pure.token_auth import Key
from hvr_common.pure.wire import routes
from hvr_common.pure.wire.messages import DigestQuery

VM_ID, DISK_ID = uuid.uuid4(), uuid.uuid4()


async def _served(header_value: str | None):
    async def digests(_request: web.Request) -> web.Response:
        headers = {} if header_value is None else {routes.APPLIED_SEQUENCE_HEADER: header_value}
        return web.Response(body=bytes(32), headers=headers, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_post(routes.digests_path(VM_ID, DISK_ID), digests)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, ReplicaClient(ReplicaEndpoint("127.0.0.1", port), Key.generate("primary.example"))


async def _ask(header_value: str | None):
    runner, client = await _served(header_value)
    try:
        async with client:
            return await client.digests(VM_ID, DISK_ID, DigestQuery(65536, 1, (0,)))
    finally:
        await runner.cleanup()


async def test_a_good_applied_sequence_is_read():
    raw, applied = await _ask("17")
    assert (raw, applied) == (bytes(32), 17)


@pytest.mark.parametrize("value", [None, "", "²", "١٢", "-1", "9" * 30])
async def test_an_applied_sequence_that_is_not_ascii_digits_in_range_is_a_transient_refusal(value):
    with pytest.raises(ReplicaUnavailableError) as info:
        await _ask(value)
    assert routes.APPLIED_SEQUENCE_HEADER in info.value.message
    assert info.value.transient
