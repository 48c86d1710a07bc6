#!/usr/bin/python3
"""NBD load for tests/shutdown_hang.rs: whole-disk trims on several connections.

    /usr/bin/python3 shutdown_trimmer.py SOCKET EXPORT CONNECTIONS

Each of CONNECTIONS connections negotiates extended headers (so that one
request may cover the whole 1 TiB disk; libnbd 1.14 has no extended headers,
hence the raw protocol here) and keeps DEPTH trims of the whole disk in
flight. Every trim marks the node's bitmaps over the whole disk, so each
holds a bitmap lock for as long as the biggest merge does.

Protocol on stdout, one line:
  -> "ready"   once every connection has had a trim acknowledged
From then on a failed command or a closed connection (the daemon shutting
down) ends the script quietly with exit 0. Before "ready" any failure is
fatal: a message on stderr, exit 1. EOF on stdin also ends it.
"""

import os
import select
import socket
import struct
import sys

DEPTH = 2

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
OPT_GO = 7
OPT_EXTENDED_HEADERS = 11
REP_ACK = 1
REP_INFO = 3
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
EXT_REQUEST_MAGIC = 0x21E41C71
EXT_REPLY_MAGIC = 0x6E8A278C
CMD_TRIM = 4
REPLY_FLAG_DONE = 1


class Failed(Exception):
    pass


def recv_exact(s, n):
    out = b""
    while len(out) < n:
        b = s.recv(n - len(out))
        if not b:
            raise Failed("connection closed")
        out += b
    return out


def option(s, opt, data):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)


def opt_reply(s):
    magic, opt, typ, n = struct.unpack(">QIII", recv_exact(s, 20))
    if magic != OPT_REPLY_MAGIC:
        raise Failed(f"bad option reply magic {magic:#x}")
    return typ, recv_exact(s, n)


def connect(path, export):
    """A connection in transmission phase with extended headers; its size."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    magic, ihaveopt, _flags = struct.unpack(">QQH", recv_exact(s, 18))
    if magic != NBDMAGIC or ihaveopt != IHAVEOPT:
        raise Failed("not a newstyle NBD server")
    s.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    option(s, OPT_EXTENDED_HEADERS, b"")
    typ, _ = opt_reply(s)
    if typ != REP_ACK:
        raise Failed(f"extended headers refused ({typ:#x})")
    name = export.encode()
    option(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    size = None
    while True:
        typ, data = opt_reply(s)
        if typ == REP_INFO and struct.unpack(">H", data[:2])[0] == 0:
            size = struct.unpack(">Q", data[2:10])[0]
        elif typ == REP_ACK:
            break
        elif typ != REP_INFO:
            raise Failed(f"NBD_OPT_GO failed ({typ:#x}): {data!r}")
    if size is None:
        raise Failed("no export size")
    return s, size


class Conn:
    def __init__(self, path, export):
        self.s, self.size = connect(path, export)
        self.in_flight = 0
        self.acked = 0
        self.cookie = 0
        self.buf = b""

    def trim_all(self):
        self.cookie += 1
        self.s.sendall(struct.pack(">IHHQQQ", EXT_REQUEST_MAGIC, 0, CMD_TRIM,
                                   self.cookie, 0, self.size))
        self.in_flight += 1

    def on_readable(self):
        b = self.s.recv(65536)
        if not b:
            raise Failed("connection closed")
        self.buf += b
        while len(self.buf) >= 32:
            magic, flags, typ, _cookie, _off, n = struct.unpack(
                ">IHHQQQ", self.buf[:32])
            if magic != EXT_REPLY_MAGIC:
                raise Failed(f"bad reply magic {magic:#x}")
            if len(self.buf) < 32 + n:
                return
            self.buf = self.buf[32 + n:]
            if typ & 0x8000:
                raise Failed(f"trim failed (reply type {typ:#x})")
            if flags & REPLY_FLAG_DONE:
                self.in_flight -= 1
                self.acked += 1


def main():
    path, export, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    stdin = sys.stdin.fileno()
    ready = False
    try:
        conns = [Conn(path, export) for _ in range(n)]
        while True:
            for c in conns:
                while c.in_flight < DEPTH:
                    c.trim_all()
            if not ready and all(c.acked for c in conns):
                print("ready", flush=True)
                ready = True
            r, _, _ = select.select([stdin] + [c.s for c in conns], [], [])
            if stdin in r and not os.read(stdin, 4096):
                return 0
            for c in conns:
                if c.s in r:
                    c.on_readable()
    except (Failed, OSError) as e:
        if ready:
            return 0
        print(f"trimmer: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
