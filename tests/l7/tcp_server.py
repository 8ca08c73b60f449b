"""A plain TCP server for the `auto` detection tests: `python -m tests.l7.tcp_server PORT
[BANNER]`.

With BANNER it is server-first, like SMTP, MySQL or SSH: BANNER and CRLF are sent as soon as a
connection is accepted, before the client says anything. Then (with or without a banner) it
echoes whatever it receives until the client closes. Threaded; prints "listening" once it
accepts connections.
"""

from __future__ import annotations

import socket
import sys
import threading


def serve(conn: socket.socket, banner: bytes) -> None:
    with conn:
        try:
            if banner:
                conn.sendall(banner + b"\r\n")
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass


def main() -> None:
    port = int(sys.argv[1])
    banner = sys.argv[2].encode() if len(sys.argv) > 2 else b""
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(128)
    print("listening", flush=True)
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=serve, args=(conn, banner), daemon=True).start()


if __name__ == "__main__":
    main()
