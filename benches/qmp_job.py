#!/usr/bin/python3
"""A tiny QMP client for benches/backup.sh: run commands, time one, wait for events.

    qmp_job.py SOCKET [--timeout SECS] STEP...

STEPs run in order on one connection (after the greeting and
qmp_capabilities):

    -c 'NAME [ARGS-JSON]'   run a command; an error reply fails the run
    -t 'NAME [ARGS-JSON]'   the same, and the clock starts just before it is sent
    -w EVENT[:ID]           wait for EVENT (for a job event: the one whose
                            data.device, or data.id, is ID); the clock stops
                            when it arrives

Prints one JSON line on stdout:

    {"ok": true, "secs": <clock, if it was started and stopped>,
     "returns": [<each command's return value>],
     "event": <data of the last event waited for>,
     "events": ["JOB_STATUS_CHANGE:created", "BLOCK_JOB_COMPLETED", ...]}

and exits 0; on a failure it prints {"ok": false, "failed": STEP,
"error": {"class": ..., "desc": ...}, ...} and exits 1. A job that ends
otherwise than awaited fails the run: BLOCK_JOB_CANCELLED or
BLOCK_JOB_ERROR while waiting for BLOCK_JOB_COMPLETED (of the same job),
and BLOCK_JOB_COMPLETED carrying an "error". So does a deadline
(--timeout, default 600 s, for the whole run) or a closed socket.

python3 standard library only.
"""

import json
import socket
import sys
import time

JOB_END = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR")


class Failed(Exception):
    def __init__(self, step, cls, desc):
        super().__init__(desc)
        self.step, self.cls, self.desc = step, cls, desc


class Qmp:
    def __init__(self, path, deadline):
        self.deadline = deadline
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(max(0.1, deadline - time.monotonic()))
        self.sock.connect(path)
        self.buf = b""
        self.events = []  # (name, data, arrival time) not consumed yet
        self.seen = []    # every event name, in order of arrival
        self.next_id = 0

    def _line(self, step):
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise Failed(step, "Timeout", "nothing within the --timeout")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise Failed(step, "Timeout", "nothing within the --timeout") from None
            if not chunk:
                raise Failed(step, "Closed", "the monitor closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line), time.monotonic()

    def _read(self, step):
        """Next non-event message; events are queued on the way."""
        while True:
            msg, at = self._line(step)
            if "event" in msg:
                self._queue(msg, at)
                continue
            return msg

    def _queue(self, msg, at):
        name, data = msg["event"], msg.get("data", {})
        self.seen.append(name + (":" + data["status"] if name == "JOB_STATUS_CHANGE" else ""))
        self.events.append((name, data, at))

    def greet(self):
        msg = self._read("greeting")
        if "QMP" not in msg:
            raise Failed("greeting", "Protocol", "no QMP greeting: %r" % msg)
        self.execute("qmp_capabilities", {}, "qmp_capabilities")

    def send(self, name, args):
        self.next_id += 1
        cmd = {"execute": name, "id": self.next_id}
        if args:
            cmd["arguments"] = args
        self.sock.sendall(json.dumps(cmd).encode() + b"\n")
        return self.next_id

    def reply(self, want, step):
        while True:
            msg = self._read(step)
            if msg.get("id") != want:
                continue
            if "error" in msg:
                e = msg["error"]
                raise Failed(step, e.get("class", "?"), e.get("desc", "?"))
            return msg.get("return")

    def execute(self, name, args, step):
        return self.reply(self.send(name, args), step)

    def wait(self, event, ident, step):
        """Waits for event EVENT (of job IDENT); returns (data, arrival)."""
        while True:
            while self.events:
                name, data, at = self.events.pop(0)
                job = data.get("device", data.get("id"))
                if ident is not None and job != ident:
                    continue
                if name == event:
                    if event == "BLOCK_JOB_COMPLETED" and "error" in data:
                        raise Failed(step, "JobError", "job failed: %s" % data["error"])
                    return data, at
                if name in JOB_END and event in JOB_END:
                    raise Failed(step, "JobEnded", "%s while waiting for %s: %s"
                                 % (name, event, json.dumps(data)))
            msg, at = self._line(step)
            if "event" in msg:
                self._queue(msg, at)


def parse_cmd(text):
    name, _, rest = text.strip().partition(" ")
    return name, (json.loads(rest) if rest.strip() else {})


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    path, rest = argv[1], argv[2:]
    timeout = 600.0
    steps = []
    i = 0
    while i < len(rest):
        opt = rest[i]
        if i + 1 >= len(rest):
            print("qmp_job.py: %s needs an argument" % opt, file=sys.stderr)
            return 2
        val = rest[i + 1]
        i += 2
        if opt == "--timeout":
            timeout = float(val)
        elif opt in ("-c", "-t", "-w"):
            steps.append((opt, val))
        else:
            print("qmp_job.py: unknown option %s" % opt, file=sys.stderr)
            return 2

    out = {"ok": True, "returns": []}
    t0 = t1 = None
    q = None
    try:
        q = Qmp(path, time.monotonic() + timeout)
        q.greet()
        for opt, val in steps:
            if opt in ("-c", "-t"):
                name, args = parse_cmd(val)
                if opt == "-t":
                    t0 = time.monotonic()
                out["returns"].append(q.execute(name, args, name))
            else:
                event, _, ident = val.partition(":")
                data, at = q.wait(event, ident or None, val)
                out["event"] = data
                if t0 is not None:
                    t1 = at
    except Failed as e:
        out.update(ok=False, failed=e.step, error={"class": e.cls, "desc": e.desc})
    except (OSError, ValueError) as e:
        out.update(ok=False, failed="connection", error={"class": type(e).__name__, "desc": str(e)})
    if t0 is not None and t1 is not None:
        out["secs"] = round(t1 - t0, 6)
    out["events"] = q.seen if q else []
    print(json.dumps(out))
    if not out["ok"]:
        print("qmp_job.py: %s: %s" % (out["failed"], out["error"]["desc"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
