"""Requests that every server must refuse, on a raw socket; prints one
JSON line per reply chunk, for a byte-level comparison with qemu-nbd.

Usage: nbd_errors.py SOCKET SIZE structured|extended
"""
import json
import struct
import sys

from nbd_raw import open_export, recvn


def main():
    path, size, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ext = mode == "extended"
    s = open_export(path, ext)
    cases = [
        ("read past the end", 0, 0, size - 512, 1024),
        ("write past the end", 0, 1, size - 512, 1024),
        ("trim past the end", 0, 4, size, 512),
        ("write zeroes past the end", 0, 6, size - 512, 1024),
        ("cache past the end", 0, 5, size, 512),
        ("block status past the end", 0, 7, size, 512),
        ("block status of length 0", 0, 7, 0, 0),
        ("read over 32 MiB", 0, 0, 0, (32 << 20) + 1),
        ("a flag read does not take", 0x80, 0, 0, 512),
        ("an unknown command", 0, 99, 0, 512),
        ("a read of length 0", 0, 0, 0, 0),
        ("an offset far past the end", 0, 0, 1 << 62, 512),
    ]
    for i, (name, flags, typ, off, ln) in enumerate(cases):
        payload = b"\0" * ln if typ == 1 else b""
        if ext:
            s.sendall(struct.pack(">IHHQQQ", 0x21E41C71, flags, typ, i + 1, off, ln) + payload)
        else:
            s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, typ, i + 1, off, ln) + payload)
        while True:
            magic = struct.unpack(">I", recvn(s, 4))[0]
            if magic == 0x67446698:
                err, _ = struct.unpack(">IQ", recvn(s, 12))
                print(json.dumps([name, "simple", err]))
                break
            if ext:
                fl, ty, _, off_, ln_ = struct.unpack(">HHQQQ", recvn(s, 28))
            else:
                fl, ty, _, ln_ = struct.unpack(">HHQI", recvn(s, 16))
            body = recvn(s, ln_)
            if ty & 0x8000:
                err, ml = struct.unpack(">IH", body[:6])
                print(json.dumps([name, ty, fl, err, body[6:6 + ml].decode()]))
            else:
                print(json.dumps([name, ty, fl, ln_]))
            if fl & 1:
                break


main()
