"""Meta-context IDs on the wire, raw: for each case, one connection that
lists contexts, selects some with SET_META_CONTEXT, goes to the default
export and asks BLOCK_STATUS for the whole export (and, with extended
headers, for chosen IDs through a payload). Prints one JSON line per reply
with its bytes in hex, for a byte-level comparison with qemu-nbd.

Usage: nbd_contexts.py SOCKET SIZE structured|extended CASES
CASES is JSON: a list of {"list": [query...] (optional), "set": [name...],
"ids": [[id...]...] (optional; extended headers only), "export": name
(optional; the default export "" otherwise)}.
"""
import json
import socket
import struct
import sys

from nbd_raw import option, recvn

OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11
CMD_DISC = 2
CMD_BLOCK_STATUS = 7
CMD_FLAG_PAYLOAD_LEN = 0x20
REQUEST_MAGIC = 0x25609513
EXT_REQUEST_MAGIC = 0x21E41C71


def meta_payload(export, queries):
    out = struct.pack(">I", len(export)) + export + struct.pack(">I", len(queries))
    for q in queries:
        q = q.encode()
        out += struct.pack(">I", len(q)) + q
    return out


def option_raw(s, opt, data):
    """The option's replies as raw bytes (headers included)."""
    replies = option(s, opt, data)
    return [
        struct.pack(">QIII", 0x3E889045565A9, opt, typ, len(body)) + body
        for typ, body in replies
    ]


def reply_chunks(s, ext):
    """The raw chunks of one structured reply, up to the DONE flag."""
    chunks = []
    while True:
        head = recvn(s, 32 if ext else 20)
        if ext:
            flags = struct.unpack(">H", head[4:6])[0]
            ln = struct.unpack(">Q", head[24:32])[0]
        else:
            flags = struct.unpack(">H", head[4:6])[0]
            ln = struct.unpack(">I", head[16:20])[0]
        chunks.append(head + recvn(s, ln))
        if flags & 1:
            return chunks


def show(label, raw):
    for r in raw:
        print(json.dumps([label, r.hex()]), flush=True)


def run_case(path, size, ext, case):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(path)
    recvn(s, 18)
    s.sendall(struct.pack(">I", 3))
    mode = option(s, OPT_EXTENDED_HEADERS if ext else OPT_STRUCTURED_REPLY)
    assert mode[-1][0] == 1, f"reply mode refused: {mode}"
    export = case.get("export", "").encode()
    if "list" in case:
        show("list", option_raw(s, OPT_LIST_META_CONTEXT, meta_payload(export, case["list"])))
    show("set", option_raw(s, OPT_SET_META_CONTEXT, meta_payload(export, case["set"])))
    go = option(s, OPT_GO, struct.pack(">I", len(export)) + export + struct.pack(">H", 0))
    assert go[-1][0] == 1, f"GO refused: {go}"
    cookie = 1
    # Compact requests carry at most 4 GiB - 1 bytes.
    whole = size if ext else min(size, 0xFFFFFFFF)
    if ext:
        s.sendall(struct.pack(">IHHQQQ", EXT_REQUEST_MAGIC, 0, CMD_BLOCK_STATUS, cookie, 0, whole))
    else:
        s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_BLOCK_STATUS, cookie, 0, whole))
    show("status", reply_chunks(s, ext))
    for ids in case.get("ids", []) if ext else []:
        cookie += 1
        payload = struct.pack(">Q", whole) + b"".join(struct.pack(">I", i) for i in ids)
        s.sendall(
            struct.pack(
                ">IHHQQQ", EXT_REQUEST_MAGIC, CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS,
                cookie, 0, len(payload),
            )
            + payload
        )
        show(f"status {ids}", reply_chunks(s, ext))
    if ext:
        s.sendall(struct.pack(">IHHQQQ", EXT_REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
    else:
        s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
    s.close()


def main():
    path, size, mode, cases = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    for case in cases:
        print(json.dumps(["case", case]), flush=True)
        run_case(path, size, mode == "extended", case)


main()
