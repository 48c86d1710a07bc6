#!/usr/bin/python3
"""Makes the fuzz targets' seed corpora from real images and real traffic.

- qcow2 images made by qemu-img / qemu-io: v2 and v3, cluster sizes from
  512 B to 64 KiB, extended L2, zlib and zstd compressed clusters, a
  backing file, 1- and 64-bit refcounts, persistent bitmaps (enabled,
  disabled, in use). Whole images seed qcow2_image; their first cluster
  seeds qcow2_header, their L1/L2/bitmap tables qcow2_tables and their
  bitmap directories qcow2_bitmap_dir.
- NBD traffic: what nbdinfo, nbdcopy, qemu-img, qemu-io and libnbd send to
  qemu-nbd (the reference server), recorded by a proxy. The handshake part
  seeds nbd_handshake; the part after it seeds nbd_transmission.
- QMP: the commands of tests/qmp_scenarios (and the raw inputs they send),
  and their command-line options as keyval strings.

Run by fuzz/seeds/gen.sh; the output is committed, so this only needs to
run again when the seeds should change. Needs qemu-img, qemu-io, qemu-nbd,
nbdinfo, nbdcopy and libnbd's Python binding (/usr/bin/python3).
"""

import glob
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "fuzz", "seeds")
# Largest whole image kept as a seed (qcow2_image's -max_len).
MAX_IMAGE = 512 << 10


def run(*args, **kw):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, **kw)


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- qcow2


def be32(b, at):
    return struct.unpack_from(">I", b, at)[0]


def be64(b, at):
    return struct.unpack_from(">Q", b, at)[0]


def header_info(img):
    """The header fields the seed extraction needs, and the extensions."""
    cluster_bits = be32(img, 20)
    version = be32(img, 4)
    h = {
        "cluster_bits": cluster_bits,
        "version": version,
        "l1_size": be32(img, 36),
        "l1_offset": be64(img, 40),
        "incompatible": be64(img, 72) if version == 3 else 0,
        "exts": {},
    }
    at = be32(img, 100) if version == 3 else 72
    while at + 8 <= len(img):
        kind, n = be32(img, at), be32(img, at + 4)
        if kind == 0:
            break
        h["exts"][kind] = img[at + 8 : at + 8 + n]
        at += 8 + (n + 7) // 8 * 8
    return h


def image_seeds(name, path):
    img = open(path, "rb").read()
    h = header_info(img)
    cs = 1 << h["cluster_bits"]
    if len(img) <= MAX_IMAGE:
        put("qcow2_image", name, img)
    put("qcow2_header", name, img[: min(cs, 4096)])
    ext_l2 = h["incompatible"] & (1 << 4) != 0
    # qcow2_tables' geometry byte (see the target).
    if ext_l2:
        g = 0x80 | 0x40 | (h["cluster_bits"] - 14)
    else:
        g = (0x40 if h["version"] == 3 else 0) | (h["cluster_bits"] - 9)
    l1 = img[h["l1_offset"] : h["l1_offset"] + 8 * h["l1_size"]]
    if l1:
        put("qcow2_tables", name + "-l1", bytes([g]) + l1[:4096])
    for i in range(len(l1) // 8):
        l2_off = be64(l1, i * 8) & 0x00FFFFFFFFFFFE00
        if l2_off and l2_off < len(img):
            put("qcow2_tables", "%s-l2-%d" % (name, i), bytes([g]) + img[l2_off : l2_off + min(cs, 4096)])
            break
    bm = h["exts"].get(0x23852875)
    if bm:
        nb, dsize, doff = be32(bm, 0), be64(bm, 8), be64(bm, 16)
        d = img[doff : doff + dsize]
        put("qcow2_bitmap_dir", name, struct.pack(">H", nb) + bytes([h["cluster_bits"] - 9]) + d)
        # The first bitmap's table.
        t_off, t_size = be64(d, 0), be32(d, 8)
        put("qcow2_tables", name + "-bitmap", bytes([g]) + img[t_off : t_off + 8 * t_size][:4096])


def qemu_io(path, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, path)


def make_images(tmp):
    images = []

    def create(name, size, *opts, backing=None):
        p = os.path.join(tmp, name + ".qcow2")
        args = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if backing:
            args += ["-b", backing, "-F", "qcow2"]
        if opts:
            args += ["-o", ",".join(opts)]
        run(*args, p, str(size))
        images.append((name, p))
        return p

    p = create("v3-4k", "4M", "cluster_size=4096")
    qemu_io(p, "write -P 0x11 0 8k", "write -z 64k 4k", "write -P 0x22 1M 4k", "discard 0 4k")
    run("qemu-img", "bitmap", "--add", p, "b0")
    run("qemu-img", "bitmap", "--add", "-g", "65536", "--disable", p, "b1")

    p = create("v3-512", "1M", "cluster_size=512")
    qemu_io(p, "write -P 0x33 0 2k", "write -P 0x44 512k 512")

    p = create("v2-4k", "2M", "compat=0.10", "cluster_size=4096")
    qemu_io(p, "write -P 0x55 4k 8k")

    # qemu's default cluster size; small enough for qcow2_image only bare.
    p = create("v3-64k", "16M")
    qemu_io(p, "write -P 0x65 1M 4k")

    p = create("v3-64k-bitmaps", "16M")
    qemu_io(p, "write -P 0x66 0 4k")
    for b in ("inc0", "a-much-longer-bitmap-name-for-the-directory"):
        run("qemu-img", "bitmap", "--add", p, b)
    run("qemu-img", "bitmap", "--add", "-g", "1M", "--disable", p, "frozen")

    p = create("extl2-16k", "4M", "cluster_size=16384", "extended_l2=on")
    qemu_io(p, "write -P 0x77 0 1k", "write -P 0x78 20k 2k", "write -z 40k 4k")

    p = create("refcount1", "1M", "cluster_size=4096", "refcount_bits=1")
    qemu_io(p, "write -P 0x12 0 4k")
    p = create("refcount64", "1M", "cluster_size=4096", "refcount_bits=64", "lazy_refcounts=on")
    qemu_io(p, "write -P 0x13 8k 4k")

    base = create("base-4k", "2M", "cluster_size=4096")
    qemu_io(base, "write -P 0x21 0 64k")
    p = create("overlay-4k", "2M", "cluster_size=4096", backing=base)
    qemu_io(p, "write -P 0x31 4k 4k")

    # Compressed clusters: written raw, converted with -c.
    raw = os.path.join(tmp, "src.raw")
    with open(raw, "wb") as f:
        f.write(b"tidemark " * 4000)
    for kind in ("zlib", "zstd"):
        p = os.path.join(tmp, "compressed-" + kind + ".qcow2")
        run("qemu-img", "convert", "-q", "-c", "-O", "qcow2", "-o",
            "cluster_size=4096,compression_type=" + kind, raw, p)
        images.append(("compressed-" + kind, p))

    # A bitmap left in use: qemu-io (read-write) was killed mid-way.
    p = create("in-use", "1M", "cluster_size=4096")
    run("qemu-img", "bitmap", "--add", p, "live")
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", p], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    proc.stdin.write(b"write -P 0x41 0 4k\n")
    proc.stdin.flush()
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    return images


# ---------------------------------------------------------------- NBD


class Recorder:
    """A unix-socket proxy in front of qemu-nbd that keeps, per client
    connection, every byte the client sent."""

    def __init__(self, listen, upstream):
        self.upstream = upstream
        self.conns = []
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(listen)
        self.sock.listen(8)
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.socket(socket.AF_UNIX)
            u.connect(self.upstream)
            rec = bytearray()
            self.conns.append(rec)
            threading.Thread(target=self.pump, args=(c, u, rec), daemon=True).start()
            threading.Thread(target=self.pump, args=(u, c, None), daemon=True).start()

    @staticmethod
    def pump(src, dst, rec):
        try:
            while True:
                b = src.recv(65536)
                if not b:
                    break
                if rec is not None:
                    rec += b
                dst.sendall(b)
        except OSError:
            pass
        for s in (dst, src):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def take(self):
        time.sleep(0.3)
        out = [bytes(c) for c in self.conns]
        self.conns.clear()
        return out


CONTEXT_IDS = {"base:allocation": 0, "qemu:allocation-depth": 1, "qemu:dirty-bitmap:b0": 2}


def split_handshake(stream):
    """(handshake bytes, transmission bytes, state byte) of one client
    stream, the state byte as nbd_transmission reads it; None when the
    client never entered transmission."""
    at, mode, ids = 4, 0, set()
    while at + 16 <= len(stream):
        opt, n = be32(stream, at + 8), be32(stream, at + 12)
        data = stream[at + 16 : at + 16 + n]
        at += 16 + n
        if opt == 8 and mode == 0:
            mode = 1
        elif opt == 11:
            mode = 2
        elif opt == 10:
            ids = set()
            c = 4 + be32(data, 0)
            for _ in range(be32(data, c)):
                ln = be32(data, c + 4)
                q = data[c + 8 : c + 8 + ln].decode()
                c += 4 + ln
                if q in CONTEXT_IDS:
                    ids.add(CONTEXT_IDS[q])
        elif opt in (1, 7):
            state = mode | sum(4 << i for i in ids)
            return stream[:at], stream[at:], state
        elif opt == 2:
            break
    return None


def capture_nbd(tmp):
    img = os.path.join(tmp, "nbd.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
    run("qemu-img", "bitmap", "--add", img, "b0")
    qemu_io(img, "write -P 0x11 0 1M", "write -z 8M 1M")
    sock = os.path.join(tmp, "qemu-nbd.sock")
    srv = subprocess.Popen(["qemu-nbd", "-k", sock, "-f", "qcow2", "-x", "", "-B", "b0",
                            "-A", "-D", "fuzz export", "-e", "4", "-t", img])
    for _ in range(100):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    try:
        record_clients(tmp, sock)
    finally:
        srv.terminate()
        srv.wait()


def record_clients(tmp, sock):
    front = os.path.join(tmp, "front.sock")
    rec = Recorder(front, sock)
    uri = "nbd+unix:///?socket=" + front
    clients = {
        "nbdinfo": ["nbdinfo", uri],
        "nbdinfo-list": ["nbdinfo", "--list", uri],
        "nbdinfo-map": ["nbdinfo", "--map", uri],
        "nbdinfo-map-bitmap": ["nbdinfo", "--map=qemu:dirty-bitmap:b0", uri],
        "nbdinfo-map-depth": ["nbdinfo", "--map=qemu:allocation-depth", uri],
        "nbdcopy": ["nbdcopy", "--requests=4", "--request-size=1048576", uri, "null:"],
        "qemu-img-map": ["qemu-img", "map", "--output=json", "--image-opts",
                         "driver=nbd,server.type=unix,server.path=" + front],
        "qemu-img-bitmap-map": ["qemu-img", "map", "--output=json", "--image-opts",
                                "driver=nbd,server.type=unix,server.path=" + front
                                + ",x-dirty-bitmap=qemu:dirty-bitmap:b0"],
        "qemu-io-rw": ["qemu-io", "-f", "raw", "-c", "read 0 64k", "-c", "write -P 0x42 64k 4k",
                       "-c", "write -z 1M 64k", "-c", "discard 2M 64k", "-c", "flush",
                       "-c", "write -z -u 3M 4k", "-c", "writev 5M 512 512", uri],
    }
    for name, args in clients.items():
        run(*args)
        for i, s in enumerate(rec.take()):
            nbd_seeds("%s-%d" % (name, i), s)
    # libnbd by hand: options qemu's clients never send, and every command.
    sys.path.insert(0, "/usr/lib/python3/dist-packages")
    import nbd

    h = nbd.NBD()
    h.set_opt_mode(True)
    h.add_meta_context("base:allocation")
    h.add_meta_context("qemu:dirty-bitmap:b0")
    h.add_meta_context("qemu:allocation-depth")
    h.connect_uri(uri)
    h.opt_list(lambda name, desc: 0)
    h.opt_list_meta_context(lambda ctx: 0)
    h.opt_info()
    h.opt_go()
    steps = [
        lambda: h.pread(4096, 0),
        lambda: h.pread_structured(4096, 4096, lambda *a: 0),
        lambda: h.pwrite(b"x" * 4096, 8192, nbd.CMD_FLAG_FUA),
        lambda: h.zero(65536, 65536, nbd.CMD_FLAG_NO_HOLE),
        lambda: h.zero(1 << 20, 1 << 20, nbd.CMD_FLAG_FAST_ZERO),
        lambda: h.trim(65536, 1 << 21),
        lambda: h.cache(65536, 0),
        lambda: h.block_status(1 << 24, 0, lambda *a: 0),
        lambda: h.block_status(1 << 20, 4096, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE),
        lambda: h.flush(),
    ]
    for step in steps:
        try:
            step()
        except nbd.Error:
            pass  # a refusal is traffic too
    h.shutdown()
    for i, s in enumerate(rec.take()):
        nbd_seeds("libnbd-%d" % i, s)


def nbd_seeds(name, stream):
    parts = split_handshake(stream)
    if parts is None:
        put("nbd_handshake", name, stream[:65536])
        return
    hs, tx, state = parts
    put("nbd_handshake", name, hs)
    if tx:
        put("nbd_transmission", name, bytes([state]) + tx[:65536])


# ---------------------------------------------------------------- QMP


def qmp_seeds():
    cap = b'{"execute": "qmp_capabilities"}\n'
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "qmp_scenarios", "*.json"))):
        name = os.path.splitext(os.path.basename(path))[0]
        sc = json.load(open(path))
        lines = [cap]
        for step in sc.get("steps", []):
            if "qmp" in step:
                lines.append(json.dumps(step["qmp"]).encode() + b"\n")
            if "raw" in step:
                lines.append(step["raw"].encode())
        data = b"".join(lines)
        # The chunking byte first (see the target), then what a client sends.
        put("qmp_input", name, b"\x07" + data[:16384])
        args = [a for a in sc.get("args", []) if "=" in a and not a.startswith("-")]
        if args:
            text = b"".join(json.dumps(a).encode() + b"\n" for a in args)
            put("qmp_input", name + "-cmdline", b"\x00" + text)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in make_images(tmp):
            image_seeds(name, path)
        capture_nbd(tmp)
    qmp_seeds()


if __name__ == "__main__":
    main()
