#!/usr/bin/env python3
"""A minimal lb worker in Python, standard library only.

lb starts this with its end of the channel at fd 3 (LB_FD). Each message is
one SOCK_SEQPACKET datagram with a 16-byte header (see docs/protocol.md):
version u8, kind u8, 6 reserved bytes, value u64 little-endian. A CONN
carries clients' sockets as fds (SCM_RIGHTS): one here, since READY does
not say BATCH (a worker that does gets up to 8, their count in byte 2; this
one would still take them, one after the other).

Under kernel dispatch (LB_OWN_LISTENER=1) the first message is LISTENER,
carrying a listening socket of this worker's own: it accepts from that
instead, says so in READY, and stops it on DRAIN.

Behind a balancer that sends PROXY headers, a CONN's payload is the client's
address ("IP:port", "[v6]:port"; READY says PEER_ADDRESS), one line per fd:
the reply names it.

Deliberately simple: it serves one connection at a time and closes it after
one response (Connection: close). Run it with:

    lb --workers 2 -- python3 examples/hello.py
"""
import ipaddress
import os
import select
import socket
import struct

HEADER = struct.Struct("<BBxxxxxxQ")
VERSION = 1
CONN, DRAIN, LISTENER, READY, CLOSED, ACCEPTED = 1, 2, 3, 16, 17, 20
OWN_LISTENER, PEER_ADDRESS, BATCH = 1, 2, 4
MAX_CONN_FDS = 8


def client_of(payload: bytes) -> bytes:
    """The client's address a CONN carries, or b"" (none, or not an address)."""
    try:
        host, port = payload.decode("ascii").rsplit(":", 1)
        v6 = host.startswith("[") and host.endswith("]")
        ip = ipaddress.ip_address(host[1:-1] if v6 else host)
        return payload if (ip.version == 6) == v6 and port.isdigit() and int(port) < 65536 else b""
    except ValueError:
        return b""


def body(client: bytes) -> bytes:
    to = b" to a client from " + client if client else b""
    return b"hello from worker %s%s (pid %d)\n" % (os.environ["LB_WORKER_ID"].encode(), to, os.getpid())


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
    listener, report = None, True
    if os.environ.get("LB_OWN_LISTENER") == "1":  # kernel dispatch
        msg, fds, _flags, _addr = socket.recv_fds(chan, 4096, 4)
        if msg[1:2] != bytes([LISTENER]) or len(fds) != 1:
            raise SystemExit("hello.py: LB_OWN_LISTENER=1 but lb sent no LISTENER first")
        listener = socket.socket(fileno=fds[0])
        listener.setblocking(False)
        report = os.environ.get("LB_REPORT_CLOSED") == "1"
    # No BATCH: this worker serves one connection at a time, blocking, and
    # the rest of a several-fd CONN would wait behind a slow request, out
    # of the master's reach (a CONN still in the channel can be rescued).
    chan.send(HEADER.pack(VERSION, READY, OWN_LISTENER if listener else PEER_ADDRESS))
    while True:
        clients = []
        if listener and chan not in select.select([chan, listener], [], [])[0]:
            try:
                fds = [listener.accept()[0].detach()]
            except BlockingIOError:
                continue
            if report:  # before its CLOSED, which lb would not expect otherwise
                chan.send(HEADER.pack(VERSION, ACCEPTED, 1))
        else:
            msg, fds, _flags, _addr = socket.recv_fds(chan, 4096, MAX_CONN_FDS)
            if not msg:
                return  # the master is gone
            if len(msg) < HEADER.size:
                continue
            _version, kind, _value = HEADER.unpack_from(msg)
            if kind == DRAIN:
                if listener:  # stopped, not just closed (lb may hold a copy):
                    listener.shutdown(socket.SHUT_RD)  # its queue moves to others
                return  # nothing in flight: one connection at a time
            count = max(msg[2], 1)  # 0 (or 1): one fd
            if kind != CONN or len(fds) > count:
                for fd in fds:
                    os.close(fd)
                continue
            if len(fds) < count and report:  # the kernel had no fd for the rest
                chan.send(HEADER.pack(VERSION, CLOSED, count - len(fds)))
            payload = msg[HEADER.size:]
            clients = [client_of(line) for line in payload.split(b"\n")] if payload else []
        for i, fd in enumerate(fds):
            with socket.socket(fileno=fd) as conn:
                conn.setblocking(True)
                try:
                    serve(conn, body(clients[i] if i < len(clients) else b""))
                except OSError:
                    pass
            if report:
                chan.send(HEADER.pack(VERSION, CLOSED, 1))

if __name__ == "__main__":
    main()
