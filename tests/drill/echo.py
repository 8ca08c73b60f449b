"""A drill backend: `python echo.py PORT` echoes every byte back on every connection.

Runs as a plain script inside a host's namespace, enrolled as an instance of the drilled service
(so the agent registers it as an endpoint), and imports nothing of meshnode's: it stands for an
application. asyncio, so that long-lived streams and short calls share one thread cheaply.
Prints `listening` once bound.
"""

from __future__ import annotations

import asyncio
import socket
import sys


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass  # a client that resets is not the backend's problem
    finally:
        writer.close()


async def serve(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a replacement reuses the port
    sock.bind(("127.0.0.1", port))
    server = await asyncio.start_server(_echo, sock=sock, backlog=1024)
    print("listening", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
