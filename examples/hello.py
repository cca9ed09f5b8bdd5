#!/usr/bin/env python3
"""A minimal lb worker in Python, standard library only.

lb starts this with its end of the channel at fd 3 (LB_FD). Each message is
one SOCK_SEQPACKET datagram with a 16-byte header (see docs/protocol.md):
version u8, kind u8, 6 reserved bytes, value u64 little-endian. A CONN
carries the client's socket as one fd (SCM_RIGHTS).

Deliberately simple: it serves one connection at a time and closes it after
one response (Connection: close). Run it with:

    lb --workers 2 -- python3 examples/hello.py
"""
import os
import socket
import struct

HEADER = struct.Struct("<BBxxxxxxQ")
VERSION = 1
CONN, DRAIN, READY, CLOSED = 1, 2, 16, 17


def serve(conn: socket.socket, body: bytes) -> None:
    conn.settimeout(10)
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = conn.recv(4096)
        if not chunk or len(request) > 65536:
            return
        request += chunk
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


def main() -> None:
    if os.environ.get("LB_PROTOCOL") != str(VERSION):
        raise SystemExit("hello.py: start me with lb: lb -- python3 examples/hello.py")
    chan = socket.socket(fileno=int(os.environ["LB_FD"]))
    body = b"hello from worker %s (pid %d)\n" % (os.environ["LB_WORKER_ID"].encode(), os.getpid())
    chan.send(HEADER.pack(VERSION, READY, 0))
    while True:
        msg, fds, _flags, _addr = socket.recv_fds(chan, 4096, 4)
        if not msg:
            return  # the master is gone
        if len(msg) < HEADER.size:
            continue
        _version, kind, _value = HEADER.unpack_from(msg)
        if kind == DRAIN:
            return  # nothing in flight: one connection at a time
        if kind != CONN or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            continue
        with socket.socket(fileno=fds[0]) as conn:
            conn.setblocking(True)
            try:
                serve(conn, body)
            except OSError:
                pass
        chan.send(HEADER.pack(VERSION, CLOSED, 1))


if __name__ == "__main__":
    main()
