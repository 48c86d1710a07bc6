"""Raw NBD against a server that requires TLS: every byte written by hand,
so the replies to options sent before STARTTLS (and the bad TLS input
after it) can be compared with qemu-nbd's.

Usage: nbd_tls_raw.py MODE ADDRESS [CERTDIR]
  ADDRESS   unix:PATH or tcp:HOST:PORT
  CERTDIR   a client directory (ca-cert.pem, client-cert.pem, client-key.pem)

Modes:
  refusals     options before TLS, one line per reply: the transcript that
               must equal qemu-nbd's byte for byte. With CERTDIR, also the
               same connection after STARTTLS and a TLS handshake, and
               EXPORT_NAME and a read over TLS on another.
  garbage      STARTTLS, then bytes that are no TLS record.
  truncated    STARTTLS, then the first half of a real ClientHello and EOF.
  stall        STARTTLS, then nothing: how long until the server closes.
  idle         STARTTLS, a TLS handshake, then no option: the same.
  version      STARTTLS and a TLS handshake: the protocol version chosen.
  renegotiate  STARTTLS, a TLS 1.2 handshake, one option, then a client
               renegotiation (pyOpenSSL; python's ssl cannot renegotiate).

Every mode prints facts, one a line, and exits 0 if it could run; the Rust
test decides what they must be. Lines that start with "# " (timings, bytes
of TLS alerts) are informational, not part of the comparison. A server that closes prints "closed"
whether it was an orderly EOF or a reset.
"""
import socket
import ssl
import struct
import sys
import time

from nbd_raw import IHAVEOPT, recvn

# How long any single wait on the server may take. Longer than the 10 s
# handshake limit of both servers, so "stall" sees the close.
WAIT = 20.0

CLOSED = (EOFError, ConnectionResetError, BrokenPipeError)


def connect(address):
    kind, _, rest = address.partition(":")
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(WAIT)
        s.connect(rest)
    elif kind == "tcp":
        host, _, port = rest.rpartition(":")
        s = socket.create_connection((host, int(port)), timeout=WAIT)
    else:
        raise SystemExit(f"bad address {address!r}")
    greeting = recvn(s, 18)
    assert greeting[:16] == b"NBDMAGICIHAVEOPT", f"greeting {greeting!r}"
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    return s, greeting


def read_reply(s):
    """One option reply: (raw bytes, opt, type, payload)."""
    hdr = recvn(s, 20)
    magic, opt, typ, ln = struct.unpack(">QIII", hdr)
    assert magic == 0x3E889045565A9, f"reply magic {magic:#x}"
    data = recvn(s, ln)
    return hdr + data, opt, typ, data


def describe(raw, opt, typ, data):
    text = data.decode("utf-8", "backslashreplace")
    return f"reply opt={opt:#x} type={typ:#x} len={len(data)} text={text!r} raw={raw.hex()}"


def send_option(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)


def ask(s, label, opt, data=b""):
    """Sends an option and prints its first reply, or that the server closed."""
    try:
        send_option(s, opt, data)
        print(f"{label}: {describe(*read_reply(s))}", flush=True)
        return True
    except CLOSED:
        print(f"{label}: closed", flush=True)
        return False


def until_closed(s, label):
    """Prints 'closed' once the server ends the connection; anything it
    sends first is counted."""
    got = 0
    try:
        while True:
            b = s.recv(4096)
            if not b:
                break
            got += len(b)
    except CLOSED[1:]:
        pass
    except socket.timeout:
        print(f"{label}: still open after {WAIT:.0f}s", flush=True)
        print(f"# {label}: {got} bytes received", flush=True)
        return
    print(f"{label}: closed", flush=True)
    # A TLS alert before the close is the server's business: informational.
    print(f"# {label}: {got} bytes before the close", flush=True)


def go_payload(name=b""):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", 0)


def ctx_payload(query=b"base:allocation"):
    return struct.pack(">II", 0, 1) + struct.pack(">I", len(query)) + query


def refusals(address, certdir):
    s, greeting = connect(address)
    print(f"greeting: {greeting.hex()}")
    cases = [
        ("LIST", 3, b""),
        ("LIST with a payload", 3, b"xyz"),
        ("INFO", 6, go_payload()),
        ("GO", 7, go_payload(b"vda")),
        ("STRUCTURED_REPLY", 8, b""),
        ("LIST_META_CONTEXT", 9, ctx_payload()),
        ("SET_META_CONTEXT", 10, ctx_payload()),
        ("EXTENDED_HEADERS", 11, b""),
        ("unknown option 99", 99, b""),
        ("unknown option 0x7fffffff with a payload", 0x7FFFFFFF, b"\0" * 100),
    ]
    for label, opt, data in cases:
        if not ask(s, label, opt, data):
            return
    ask(s, "ABORT", 2)
    until_closed(s, "after ABORT")
    s.close()

    s, _ = connect(address)
    try:
        send_option(s, 1, b"vda")
        raw, opt, typ, data = read_reply(s)
        print(f"EXPORT_NAME: {describe(raw, opt, typ, data)}")
    except CLOSED:
        print("EXPORT_NAME: closed")
    s.close()

    s, _ = connect(address)
    if ask(s, "STARTTLS with a payload", 5, b"x"):
        until_closed(s, "after STARTTLS with a payload")
    s.close()

    s, _ = connect(address)
    ask(s, "STRUCTURED_REPLY before STARTTLS", 8)
    if not ask(s, "STARTTLS", 5):
        return
    if certdir is None:
        return
    t = tls_wrap(s, certdir, address)
    print("TLS handshake: done")
    ask(t, "STARTTLS again over TLS", 5)
    ask(t, "STRUCTURED_REPLY over TLS", 8)
    send_option(t, 3)
    while True:
        raw, opt, typ, data = read_reply(t)
        print(f"LIST over TLS: {describe(raw, opt, typ, data)}")
        if typ != 2:
            break
    ask(t, "ABORT over TLS", 2)
    t.close()

    # The old way in, over TLS: EXPORT_NAME, then a read with a simple reply.
    s, _ = connect(address)
    ask(s, "STARTTLS", 5)
    t = tls_wrap(s, certdir, address)
    send_option(t, 1, b"vda")
    size, flags = struct.unpack(">QH", recvn(t, 10))
    print(f"EXPORT_NAME over TLS: size={size} flags={flags:#x}")
    t.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 1 << 20, 512))
    magic, err, handle = struct.unpack(">IIQ", recvn(t, 16))
    data = recvn(t, 512) if err == 0 else b""
    print(f"read over TLS: magic={magic:#x} error={err} handle={handle} data={data[:8].hex()}...{len(data)} bytes")
    t.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 2, 0, 0))
    until_closed(t, "after DISC over TLS")


def tls_wrap(s, certdir, address):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(f"{certdir}/ca-cert.pem")
    ctx.load_cert_chain(f"{certdir}/client-cert.pem", f"{certdir}/client-key.pem")
    return ctx.wrap_socket(s, server_hostname="localhost")


def client_hello():
    """The bytes python's TLS client would send first, never sent."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = out.read()
    assert hello[:1] == b"\x16" and len(hello) > 100, f"ClientHello {hello[:8].hex()}"
    return hello


def starttls(address):
    s, _ = connect(address)
    send_option(s, 5)
    raw, opt, typ, data = read_reply(s)
    assert (opt, typ, data) == (5, 1, b""), f"STARTTLS not acknowledged: {describe(raw, opt, typ, data)}"
    print("STARTTLS: ack", flush=True)
    return s


def timed_close(s, label, t0):
    until_closed(s, label)
    print(f"# {label}: after {time.monotonic() - t0:.1f}s", flush=True)


def garbage(address):
    s = starttls(address)
    t0 = time.monotonic()
    s.sendall(b"GET / HTTP/1.1\r\nHost: nbd\r\n\r\n" + bytes(range(256)) * 4)
    timed_close(s, "garbage", t0)


def truncated(address):
    hello = client_hello()
    s = starttls(address)
    t0 = time.monotonic()
    s.sendall(hello[: len(hello) // 2])
    s.shutdown(socket.SHUT_WR)
    timed_close(s, "truncated ClientHello", t0)


def stall(address):
    t0 = time.monotonic()
    s = starttls(address)
    # Nothing more: the server's handshake limit (counted from the
    # connection) must end it.
    timed_close(s, "stalled handshake", t0)


def idle(address, certdir):
    t0 = time.monotonic()
    s = starttls(address)
    t = tls_wrap(s, certdir, address)
    print("TLS handshake: done", flush=True)
    timed_close(t, "idle after the TLS handshake", t0)


def version(address, certdir):
    s = starttls(address)
    t = tls_wrap(s, certdir, address)
    print(f"TLS version: {t.version()}", flush=True)
    ask(t, "ABORT over TLS", 2)
    t.close()


def renegotiate(address, certdir):
    from OpenSSL import SSL

    s = starttls(address)
    # pyOpenSSL drives the descriptor itself: a blocking socket with a
    # kernel receive timeout, so no wait is unbounded.
    s.settimeout(None)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(WAIT), 0))
    ctx = SSL.Context(SSL.TLSv1_2_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.use_certificate_file(f"{certdir}/client-cert.pem")
    ctx.use_privatekey_file(f"{certdir}/client-key.pem")
    ctx.load_verify_locations(f"{certdir}/ca-cert.pem")
    ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: ok)
    c = SSL.Connection(ctx, s)
    c.set_connect_state()
    c.do_handshake()
    print(f"TLS handshake: {c.get_protocol_version_name()}", flush=True)

    def tls_recvn(n):
        b = b""
        while len(b) < n:
            chunk = c.recv(n - len(b))
            if not chunk:
                raise EOFError
            b += chunk
        return b

    def tls_option(opt):
        c.sendall(struct.pack(">QII", IHAVEOPT, opt, 0))
        _, o, typ, ln = struct.unpack(">QIII", tls_recvn(20))
        tls_recvn(ln)
        return o, typ

    o, typ = tls_option(8)
    print(f"STRUCTURED_REPLY over TLS: opt={o:#x} type={typ:#x}", flush=True)
    if not c.renegotiate():
        print("renegotiation: client would not start one")
        return
    try:
        c.do_handshake()
        o, typ = tls_option(8)
        print(f"renegotiation: completed; STRUCTURED_REPLY after it: opt={o:#x} type={typ:#x}")
    except (SSL.Error, EOFError, OSError) as e:
        print("renegotiation: failed", flush=True)
        print(f"# renegotiation: {type(e).__name__}: {e}", flush=True)
        # qemu-nbd closes at once (gnutls: "Rehandshake was requested by
        # the peer"); OpenSSL answers with a no_renegotiation alert, and
        # the client's fatal alert that follows ends the connection.
        t0 = time.monotonic()
        s.settimeout(WAIT)
        timed_close(s, "after the failed renegotiation", t0)
    finally:
        s.close()


def noread(address, certdir, count, size):
    """A TLS client that asks for `count` reads of `size` bytes and never
    reads a reply: it prints 'sent' and holds on until stdin closes."""
    s = starttls(address)
    t = tls_wrap(s, certdir, address)
    ask(t, "STRUCTURED_REPLY", 8)
    ask(t, "GO", 7, go_payload(b"vda"))
    for handle in range(count):
        t.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, handle, 0, size))
    print("sent", flush=True)
    sys.stdin.read()
    s.close()


def main():
    mode, address = sys.argv[1], sys.argv[2]
    certdir = sys.argv[3] if len(sys.argv) > 3 else None
    if mode == "refusals":
        refusals(address, certdir)
    elif mode == "garbage":
        garbage(address)
    elif mode == "truncated":
        truncated(address)
    elif mode == "stall":
        stall(address)
    elif mode == "idle":
        idle(address, certdir)
    elif mode == "version":
        version(address, certdir)
    elif mode == "renegotiate":
        renegotiate(address, certdir)
    elif mode == "noread":
        noread(address, certdir, int(sys.argv[4]), int(sys.argv[5]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


main()
