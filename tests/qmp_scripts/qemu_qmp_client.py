"""A third-party QMP client (python qemu.qmp from PyPI) against a daemon:
connect and negotiate, run commands, get an error as ExecuteError, and
receive an event. Prints one JSON line per result; the test compares the
output for qemu-storage-daemon and tidemark.

Usage: qemu_qmp_client.py QMP_SOCKET NBD_SOCKET"""
import asyncio
import json
import sys

from qemu.qmp import EventListener, ExecuteError, QMPClient


def out(what, value):
    print(json.dumps({what: value}, sort_keys=True), flush=True)


async def main(qmp_path, nbd_path):
    qmp = QMPClient("tidemark-test")
    await asyncio.wait_for(qmp.connect(qmp_path), 20)
    greeting = qmp.greeting.QMP
    qemu = greeting.version["qemu"]
    out("greeting", [qemu, list(greeting.capabilities)])
    out("query-version", (await qmp.execute("query-version"))["qemu"])
    await qmp.execute("block-dirty-bitmap-add", {"node": "disk", "name": "b0"})
    try:
        await qmp.execute("block-dirty-bitmap-add", {"node": "disk", "name": "b0"})
    except ExecuteError as e:
        out("duplicate", [e.error_class, str(e)])
    try:
        await qmp.execute("no-such-command")
    except ExecuteError as e:
        out("unknown", [e.error_class, str(e)])
    await qmp.execute("nbd-server-start",
                      {"addr": {"type": "unix", "data": {"path": nbd_path}}})
    await qmp.execute("block-export-add", {"type": "nbd", "id": "e0",
                                           "node-name": "disk", "writable": True,
                                           "bitmaps": ["b0"]})
    out("exports", await qmp.execute("query-block-exports"))
    listener = EventListener()
    with qmp.listen(listener):
        await qmp.execute("block-export-del", {"id": "e0"})
        event = await asyncio.wait_for(listener.get(), 20)
        out("event", [event["event"], event["data"], sorted(event["timestamp"])])
    nodes = await qmp.execute("query-named-block-nodes")
    out("bitmaps", [n.get("dirty-bitmaps") for n in nodes])
    await qmp.execute("quit")
    await qmp.disconnect()


asyncio.run(main(sys.argv[1], sys.argv[2]))
