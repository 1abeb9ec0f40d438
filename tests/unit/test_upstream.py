"""The gateway's client for its workers, against a raw asyncio server on 127.0.0.1 that answers scripted bytes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gallama_kernel.gateway.upstream import UpstreamClient, UpstreamError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return head, await reader.readexactly(length)


def serve(handler: Handler, test: Callable[[UpstreamClient, int, list[int]], Awaitable[None]]) -> None:
    """Run ``test(client, port, connections)``; ``connections`` counts accepted connections."""

    async def main() -> None:
        connections: list[int] = []

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(1)
            try:
                await handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        client = UpstreamClient(keepalive_s=30)
        try:
            await test(client, server.sockets[0].getsockname()[1], connections)
        finally:
            client.close()
            server.close()

    asyncio.run(main())


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


async def keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer every request on the connection with the request body as a two-chunk event stream."""
    while True:
        _, body = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     + chunked(b"data: " + body + b"\n\n", b"data: [DONE]\n\n"))
        await writer.drain()


def test_chunked_stream_arrives_piece_by_piece_and_the_connection_is_reused():
    async def test(client: UpstreamClient, port: int, connections: list[int]) -> None:
        for n in range(3):
            response = await client.post("127.0.0.1", port, "/v1/chat/completions", b'{"n": %d}' % n)
            assert response.status == 200
            assert response.headers["content-type"] == "text/event-stream"
            assert [p async for p in response.pieces()] == [b'data: {"n": %d}\n\n' % n, b"data: [DONE]\n\n"]
        assert len(connections) == 1

    serve(keep_answering, test)


def test_closing_a_stream_early_closes_its_connection():
    async def test(client: UpstreamClient, port: int, connections: list[int]) -> None:
        response = await client.post("127.0.0.1", port, "/x", b"{}")
        pieces = response.pieces()
        assert await anext(pieces) == b"data: {}\n\n"
        await pieces.aclose()  # the client went away mid-stream
        response = await client.post("127.0.0.1", port, "/x", b"{}")
        assert len([p async for p in response.pieces()]) == 2
        assert len(connections) == 2

    serve(keep_answering, test)


def test_content_length_and_until_close_bodies():
    replies = [b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n"
               b'{"e": "x"}\n',
               b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nall of it"]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(replies.pop(0))
        await writer.drain()

    async def test(client: UpstreamClient, port: int, connections: list[int]) -> None:
        response = await client.post("127.0.0.1", port, "/x", b"{}")
        assert (response.status, await response.read()) == (400, b'{"e": "x"}\n')
        response = await client.post("127.0.0.1", port, "/x", b"{}")
        assert (response.status, await response.read()) == (200, b"all of it")

    serve(handler, test)


def test_a_broken_stream_raises_and_an_unreachable_worker_too():
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\nff\r\nshort")
        await writer.drain()  # then the connection closes: the worker died mid-stream

    async def test(client: UpstreamClient, port: int, connections: list[int]) -> None:
        response = await client.post("127.0.0.1", port, "/x", b"{}")
        pieces = response.pieces()
        assert await anext(pieces) == b"data: 1\n\n"
        with pytest.raises(UpstreamError):
            await anext(pieces)

    serve(handler, test)

    async def unreachable(client: UpstreamClient, port: int, connections: list[int]) -> None:
        with pytest.raises(UpstreamError):
            await client.post("127.0.0.1", 1, "/x", b"{}")

    serve(keep_answering, unreachable)


def test_an_idle_connection_the_worker_closed_is_replaced():
    async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()  # then closes: a keep-alive connection dropped by the worker

    async def test(client: UpstreamClient, port: int, connections: list[int]) -> None:
        assert await (await client.post("127.0.0.1", port, "/x", b"first")).read() == b"first"
        await asyncio.sleep(0.05)
        assert await (await client.post("127.0.0.1", port, "/x", b"second")).read() == b"second"
        assert len(connections) == 2

    serve(one_answer, test)


def test_idle_connections_expire_after_the_keep_alive():
    async def test(client: UpstreamClient, port: int, connections: list[int]) -> None:
        client.keepalive_s = 0.05
        for _ in range(2):
            assert len([p async for p in (await client.post("127.0.0.1", port, "/x", b"{}")).pieces()]) == 2
            await asyncio.sleep(0.1)
        assert len(connections) == 2  # the first one had expired: not reused

    serve(keep_answering, test)
