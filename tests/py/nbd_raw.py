"""The few raw NBD handshake pieces the wire-level test scripts share: they
write every byte themselves, so they can also write the wrong ones."""
import struct

IHAVEOPT = 0x49484156454F5054


def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError(f"server closed after {len(b)} of {n} bytes")
        b += c
    return b


def option(s, opt, data=b""):
    """Sends an option; returns its replies up to the ACK or an error."""
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
    out = []
    while True:
        _, _, typ, ln = struct.unpack(">QIII", recvn(s, 20))
        out.append((typ, recvn(s, ln)))
        if typ == 1 or typ & 0x80000000:
            return out


def open_export(path, extended):
    """A connection to the default export on unix socket `path`, with
    structured replies or extended headers and base:allocation selected."""
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    recvn(s, 18)
    s.sendall(struct.pack(">I", 3))
    assert option(s, 11 if extended else 8)[-1][0] == 1, "reply mode refused"
    ctx = b"base:allocation"
    replies = option(s, 10, struct.pack(">III", 0, 1, len(ctx)) + ctx)
    assert replies[0][0] == 4, f"no context: {replies}"
    assert option(s, 7, struct.pack(">IH", 0, 0))[-1][0] == 1, "GO refused"
    return s
