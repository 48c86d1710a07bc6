#!/usr/bin/python3
"""Check 5: protocol features through python3-libnbd (libnbd 1.14).

Run by tests/libnbd_features.rs as

    /usr/bin/python3 libnbd_features.py CHECK URI IMAGE [--multi-conn]

against a server serving IMAGE (a raw file the Rust side laid out as
LAYOUT below). Each CHECK is one function; a failed assertion exits non-zero
with a message naming what was expected and what came back.
"""

import errno
import os
import sys

import nbd

KIB = 1024
MIB = 1024 * KIB
SIZE = 4 * MIB
# (offset, length) ranges holding data; everything else is a hole.
LAYOUT = [(0, 64 * KIB), (1 * MIB, 64 * KIB), (3 * MIB, 1 * MIB)]


def expected_byte_at(off):
    """Content the Rust side wrote: byte = (offset // 4096 + 1) % 251 + 1 in
    data ranges, zero in holes."""
    for start, length in LAYOUT:
        if start <= off < start + length:
            return (off // 4096 + 1) % 251 + 1
    return 0


def expected(off, count):
    return bytes(expected_byte_at(o) for o in range(off, off + count))


def fail(msg):
    raise AssertionError(msg)


def check(cond, msg):
    if not cond:
        fail(msg)


def connect(uri, contexts=()):
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    check(h.get_structured_replies_negotiated(),
          "structured replies were not negotiated")
    return h


def read_chunks(h, count, offset, flags=0):
    """pread_structured, returning (buf, [(status, offset, length)])."""
    chunks = []

    def cb(subbuf, off, status, err):
        chunks.append((status, off, len(subbuf)))
        return 0

    buf = h.pread_structured(count, offset, cb, flags)
    return bytes(buf), chunks


def status_name(s):
    return {nbd.READ_DATA: "DATA", nbd.READ_HOLE: "HOLE",
            nbd.READ_ERROR: "ERROR"}.get(s, str(s))


def assert_chunks_cover(chunks, offset, count):
    covered = sorted((o, n) for _, o, n in chunks)
    pos = offset
    for o, n in covered:
        check(o == pos, "chunks overlap or leave a gap at %d: %r" % (pos, chunks))
        check(n > 0, "zero-length chunk: %r" % (chunks,))
        pos += n
    check(pos == offset + count,
          "chunks cover up to %d, not %d: %r" % (pos, offset + count, chunks))


# ---- checks ---------------------------------------------------------------

def structured_read_over_holes(uri, image, multi_conn):
    h = connect(uri)
    count = 2 * MIB
    buf, chunks = read_chunks(h, count, 0)
    check(buf == expected(0, count), "read over holes returned wrong bytes")
    assert_chunks_cover(chunks, 0, count)
    # Every byte of the two holes inside [0, 2 MiB) must arrive in HOLE chunks.
    for hole_start, hole_end in [(64 * KIB, 1 * MIB), (1 * MIB + 64 * KIB, 2 * MIB)]:
        for status, o, n in chunks:
            if o < hole_end and o + n > hole_start and status != nbd.READ_HOLE:
                fail("hole [%d, %d) was sent as a %s chunk (%d+%d); all chunks: %s"
                     % (hole_start, hole_end, status_name(status), o, n,
                        [(status_name(s), o, n) for s, o, n in chunks]))
    for status, o, n in chunks:
        if status == nbd.READ_HOLE:
            check(expected(o, n) == bytes(n),
                  "HOLE chunk %d+%d over data" % (o, n))
    # A read entirely inside a hole is a single HOLE chunk (tidemark looks
    # for holes in reads of 128 KiB or more; proto/nbd.md).
    buf, chunks = read_chunks(h, 1 * MIB, 2 * MIB)
    check(buf == bytes(1 * MIB), "hole did not read as zeroes")
    check([c[0] for c in chunks] == [nbd.READ_HOLE],
          "read inside a hole: expected one HOLE chunk, got %r" % (chunks,))
    h.shutdown()


def df_read_is_one_chunk(uri, image, multi_conn):
    h = connect(uri)
    check(h.can_df(), "server does not advertise NBD_FLAG_SEND_DF")
    count = 2 * MIB
    buf, chunks = read_chunks(h, count, 0, nbd.CMD_FLAG_DF)
    check(buf == expected(0, count), "DF read returned wrong bytes")
    check(len(chunks) == 1,
          "DF read must come as a single chunk, got %d: %r"
          % (len(chunks), [(status_name(s), o, n) for s, o, n in chunks]))
    status, o, n = chunks[0]
    check((o, n) == (0, count), "DF chunk covers %d+%d" % (o, n))
    h.shutdown()


def block_status_req_one(uri, image, multi_conn):
    h = connect(uri, ["base:allocation"])
    check(h.can_meta_context("base:allocation"),
          "base:allocation was not negotiated")

    def probe(count, offset, flags):
        got = []

        def cb(ctx, off, entries, err):
            got.append((ctx, off, list(entries)))
            return 0

        h.block_status(count, offset, cb, flags)
        check(len(got) == 1 and got[0][0] == "base:allocation",
              "expected one base:allocation reply, got %r" % (got,))
        e = got[0][2]
        return list(zip(e[0::2], e[1::2]))

    # REQ_ONE: exactly one extent, no longer than the request.
    for offset, count, want_flags in [
        (0, 2 * MIB, 0),                   # data first
        (64 * KIB, 2 * MIB, 3),            # hole first
        (32 * KIB, 16 * KIB, 0),           # inside data, short request
        (1 * MIB + 64 * KIB, 4096, 3),     # inside a hole, short request
    ]:
        ext = probe(count, offset, nbd.CMD_FLAG_REQ_ONE)
        check(len(ext) == 1,
              "REQ_ONE at %d+%d: expected exactly one extent, got %r"
              % (offset, count, ext))
        length, flags = ext[0]
        check(0 < length <= count,
              "REQ_ONE at %d+%d: extent length %d not in (0, %d]"
              % (offset, count, length, count))
        check(flags & 1 == want_flags & 1,
              "REQ_ONE at %d+%d: flags %d, expected hole bit of %d"
              % (offset, count, flags, want_flags))
    # Without REQ_ONE: consecutive extents describing the layout.
    ext = probe(SIZE, 0, 0)
    pos = 0
    for length, flags in ext:
        check(length > 0, "zero-length extent in %r" % (ext,))
        is_data = expected_byte_at(pos) != 0
        check((flags & 1 == 0) == is_data,
              "extent at %d (%d bytes, flags %d) disagrees with the layout: %r"
              % (pos, length, flags, ext))
        pos += length
    check(len(ext) >= 2, "expected several extents, got %r" % (ext,))
    h.shutdown()


def fua_writes(uri, image, multi_conn):
    h = connect(uri)
    check(h.can_fua(), "server does not advertise NBD_FLAG_SEND_FUA")
    data = bytes((i * 7 + 3) % 256 for i in range(12345))
    off = 2 * MIB + 777
    h.pwrite(data, off, nbd.CMD_FLAG_FUA)
    check(h.pread(len(data), off) == data, "FUA write did not read back")
    # Acknowledged with FUA: the bytes are in the image file already.
    with open(image, "rb") as f:
        f.seek(off)
        check(f.read(len(data)) == data, "FUA write is not in the image file")
    h.shutdown()


def trim_then_read_zeroes(uri, image, multi_conn):
    h = connect(uri)
    check(h.can_trim(), "server does not advertise NBD_FLAG_SEND_TRIM")
    off, count = 3 * MIB, 512 * KIB
    check(h.pread(count, off) != bytes(count), "test range should start as data")
    h.trim(count, off)
    check(h.pread(count, off) == bytes(count), "trimmed range does not read as zeroes")
    h.flush()
    with open(image, "rb") as f:
        f.seek(off)
        check(f.read(count) == bytes(count), "trimmed range is not zero in the file")
    # Unaligned trim: the bytes around it are untouched.
    off2 = 3 * MIB + 600 * KIB + 123
    before = h.pread(8192, off2 - 4096)
    h.trim(1000, off2)
    after = h.pread(8192, off2 - 4096)
    check(after[:4096] == before[:4096] and after[5096:] == before[5096:],
          "unaligned trim changed bytes outside its range")
    check(after[4096:5096] in (before[4096:5096], bytes(1000)),
          "unaligned trim left neither the old data nor zeroes")
    h.shutdown()


def zero_fast_zero_and_no_hole(uri, image, multi_conn):
    h = connect(uri)
    check(h.can_zero(), "server does not advertise NBD_FLAG_SEND_WRITE_ZEROES")
    check(h.can_fast_zero(), "server does not advertise NBD_FLAG_SEND_FAST_ZERO")
    off, count = 3 * MIB, 256 * KIB
    check(h.pread(count, off) != bytes(count), "test range should start as data")
    try:
        h.zero(count, off, nbd.CMD_FLAG_FAST_ZERO)
        check(h.pread(count, off) == bytes(count),
              "FAST_ZERO write-zeroes succeeded but the range is not zero")
    except nbd.Error as e:
        check(e.errno == errno.ENOTSUP,
              "FAST_ZERO may only fail with ENOTSUP, got %r" % (e,))
        check(h.pread(count, off) == expected(off, count),
              "a failed FAST_ZERO must not change the data")
    # NO_HOLE: zeroes, without punching.
    off2 = 3 * MIB + 512 * KIB
    h.zero(count, off2, nbd.CMD_FLAG_NO_HOLE)
    check(h.pread(count, off2) == bytes(count), "NO_HOLE write-zeroes did not zero")
    # Unaligned, with FUA.
    off3 = 1 * MIB + 1000
    h.zero(3000, off3, nbd.CMD_FLAG_FUA)
    got = h.pread(5000, off3 - 1000)
    check(got[1000:4000] == bytes(3000), "unaligned write-zeroes did not zero")
    check(got[:1000] == expected(off3 - 1000, 1000)
          and got[4000:] == expected(off3 + 3000, 1000),
          "unaligned write-zeroes changed neighbouring bytes")
    h.shutdown()


def multi_conn_flush_is_visible_on_other_connection(uri, image, multi_conn):
    a = connect(uri)
    b = connect(uri)
    if multi_conn:
        check(a.can_multi_conn(), "server does not advertise NBD_FLAG_CAN_MULTI_CONN")
    # Prime B's view of the range first, so a per-connection cache would show.
    off, count = 2 * MIB + 64 * KIB, 64 * KIB
    old = b.pread(count, off)
    new = bytes((i * 13 + 5) % 256 for i in range(count))
    check(old != new, "test data must differ from the old contents")
    a.pwrite(new, off)
    a.flush()
    check(b.pread(count, off) == new, "B does not see A's flushed write")
    # And the other way, with FUA instead of a flush.
    new2 = bytes((i * 31 + 1) % 256 for i in range(count))
    b.pwrite(new2, off, nbd.CMD_FLAG_FUA)
    check(a.pread(count, off) == new2, "A does not see B's FUA write")
    # Zeroing and trimming are covered too.
    a.zero(count, off)
    a.flush()
    check(b.pread(count, off) == bytes(count), "B does not see A's flushed zero")
    a.shutdown()
    b.shutdown()


def pipelined_requests_complete_out_of_order(uri, image, multi_conn):
    h = connect(uri)
    n, size = 64, 16 * KIB
    base = 2 * MIB
    bufs = [bytes([(i * 3 + 1) % 256]) * size for i in range(n)]
    cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(bufs[i])),
                            base + i * size) for i in range(n)]
    check(h.aio_in_flight() > 1 or all(h.aio_command_completed(c) for c in cookies),
          "requests were not pipelined")
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        check(h.aio_command_completed(c), "write %d did not complete" % c)
    reads = []
    for i in range(n):
        rb = nbd.Buffer(size)
        reads.append((i, rb, h.aio_pread(rb, base + i * size)))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for i, rb, c in reads:
        check(h.aio_command_completed(c), "read %d did not complete" % i)
        check(rb.to_bytearray() == bufs[i], "pipelined read %d returned wrong data" % i)
    h.shutdown()


CHECKS = {f.__name__: f for f in [
    structured_read_over_holes,
    df_read_is_one_chunk,
    block_status_req_one,
    fua_writes,
    trim_then_read_zeroes,
    zero_fast_zero_and_no_hole,
    multi_conn_flush_is_visible_on_other_connection,
    pipelined_requests_complete_out_of_order,
]}


def main():
    if len(sys.argv) < 4 or sys.argv[1] not in CHECKS:
        sys.exit("usage: %s {%s} URI IMAGE [--multi-conn]"
                 % (sys.argv[0], "|".join(CHECKS)))
    name, uri, image = sys.argv[1:4]
    multi_conn = "--multi-conn" in sys.argv[4:]
    check(os.path.getsize(image) == SIZE, "image is not %d bytes" % SIZE)
    try:
        CHECKS[name](uri, image, multi_conn)
    except AssertionError as e:
        sys.exit("%s FAILED: %s" % (name, e))
    except nbd.Error as e:
        sys.exit("%s FAILED with a libnbd error: %s (errno %s)" % (name, e, e.errno))
    print("%s ok" % name)


if __name__ == "__main__":
    main()
