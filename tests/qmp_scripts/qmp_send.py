#!/usr/bin/python3
"""Minimal QMP client for shell scripts: qmp_send.py SOCKET CMD_JSON...

Connects, negotiates, runs each command and prints each reply on a line.
The command `quit` is followed by a wait for the daemon to close the
socket (it exits), so the script continues only once it is gone."""
import json
import socket
import sys

sock = socket.socket(socket.AF_UNIX)
sock.settimeout(30)
sock.connect(sys.argv[1])
f = sock.makefile("rwb", buffering=0)


def reply():
    while True:
        line = f.readline()
        if not line:
            return None
        msg = json.loads(line)
        if "event" not in msg:
            return msg


json.loads(f.readline())  # greeting
f.write(b'{"execute": "qmp_capabilities"}\n')
reply()
for cmd in sys.argv[2:]:
    f.write(cmd.encode() + b"\n")
    print(json.dumps(reply(), sort_keys=True))
    if json.loads(cmd).get("execute") == "quit":
        # EOF, or a reset when the daemon exits with our bytes unread.
        try:
            while f.readline():
                pass
        except ConnectionResetError:
            pass
