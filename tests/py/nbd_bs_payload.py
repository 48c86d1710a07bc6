"""Malformed BLOCK_STATUS payloads over extended headers, on a raw socket.

Usage: nbd_bs_payload.py SOCKET
Negotiates extended headers and base:allocation, sends each payload case as
a BLOCK_STATUS with PAYLOAD_LEN, then a FLUSH, and prints one JSON line per
reply: {"cookie", "type", "errno", "msg"}. The caller checks that every
request got exactly one reply, and compares the lines with qemu-nbd's.
"""
import json
import socket
import struct
import sys

from nbd_raw import open_export, recvn

EXT_REQUEST_MAGIC = 0x21E41C71
EXT_REPLY_MAGIC = 0x6E8A278C


CASES = [
    ("no ids", struct.pack(">Q", 65536)),
    ("unknown id", struct.pack(">QI", 65536, 7)),
    ("length not 8+4n", struct.pack(">Q", 65536) + b"\0\0"),
    ("shorter than 8", b"\0" * 4),
    ("a known and an unknown id", struct.pack(">QII", 65536, 0, 9)),
]


def main():
    s = open_export(sys.argv[1], True)
    for i, (_, payload) in enumerate(CASES):
        s.sendall(struct.pack(">IHHQQQ", EXT_REQUEST_MAGIC, 0x20, 7, i + 1, 0, len(payload)) + payload)
    s.sendall(struct.pack(">IHHQQQ", EXT_REQUEST_MAGIC, 0, 3, 100, 0, 0))
    seen = 0
    while seen < len(CASES) + 1:
        magic, flags, typ, cookie, _, ln = struct.unpack(">IHHQQQ", recvn(s, 32))
        assert magic == EXT_REPLY_MAGIC, hex(magic)
        body = recvn(s, ln)
        line = {"cookie": cookie, "type": typ}
        if typ & 0x8000:
            err, mlen = struct.unpack(">IH", body[:6])
            line.update(errno=err, msg=body[6:6 + mlen].decode())
        if flags & 1:
            seen += 1
        print(json.dumps(line), flush=True)
    # Nothing more may come: one reply per request.
    s.settimeout(0.5)
    try:
        extra = s.recv(1)
    except socket.timeout:
        extra = b""
    print(json.dumps({"extra": len(extra)}))


main()
