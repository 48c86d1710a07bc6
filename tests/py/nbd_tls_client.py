"""A well-behaved TLS client that stays connected while a test does bad
things to the same server: connects (libnbd, the URI says how: nbds+unix://
with tls-certificates= or tls-psk-file=), reads, prints "connected SIZE";
then for each stdin line "check OFFSET BYTE" writes 64 KiB of BYTE at
OFFSET, flushes, reads it back and prints "ok" or "MISMATCH"; at stdin EOF
disconnects cleanly and prints "bye".

Usage: nbd_tls_client.py URI
"""
import sys

import nbd

h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
if not h.get_tls_negotiated():
    raise SystemExit("connected without TLS")
h.pread(4096, 0)
print(f"connected {h.get_size()}", flush=True)
for line in sys.stdin:
    words = line.split()
    if not words:
        continue
    assert words[0] == "check", f"unknown command {line!r}"
    off, byte = int(words[1]), int(words[2], 16)
    data = bytes([byte]) * 65536
    h.pwrite(data, off)
    h.flush()
    got = h.pread(len(data), off)
    print("ok" if got == data else "MISMATCH", flush=True)
h.shutdown()
print("bye", flush=True)
