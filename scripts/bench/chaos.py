#!/usr/bin/env python3
"""kill -9 one worker every second under load, and count what fails.

    scripts/bench.sh builds what this needs; then, for example:
    python3 scripts/bench/chaos.py --lb target/release/lb --backend target/bench/backend \
        --only "lb kernel,lb rr" --seconds 30

For each front (the names of scripts/bench/run.py), wrk runs for
--seconds with `Connection: close` and then with keep-alive, while a
random worker is killed with SIGKILL every --every seconds (lb restarts
it). It reports requests, every failure wrk counts (connect, read, write,
timeout, non-2xx), the kills, the connections the killed workers held
when they were killed (their TCP sockets, from /proc), and what lb says
it rescued: connections
queued for a killed worker that went to the others (read back from its
channel under master dispatch, moved by the kernel from its listener
under kernel dispatch). What the killed worker had accepted is lost with
it; nothing else should be.

Every process is stopped by pid in a `finally`; every wait is bounded.
"""
import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the fronts and the load tools, shared)


def workers_of(lb_pid, backend):
    """The pids of lb's workers running `backend` (not the reaper)."""
    out = subprocess.run(["pgrep", "-P", str(lb_pid)], capture_output=True, text=True).stdout
    pids = []
    for p in out.split():
        try:
            if os.path.realpath(f"/proc/{p}/exe") == os.path.realpath(backend):
                pids.append(int(p))
        except OSError:
            pass
    return pids


def tcp_states():
    """{socket inode: TCP state} of every TCP socket on the machine."""
    states = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in f.readlines()[1:]:
                    cols = line.split()
                    states[cols[9]] = cols[3]
        except OSError:
            pass
    return states


def held_by(pid):
    """Connections `pid` (stopped) holds: its TCP sockets that are not
    listening, which a kill loses with it."""
    inodes = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                m = re.match(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
            if m:
                inodes.append(m.group(1))
    except OSError:
        pass
    states = tcp_states()
    return sum(1 for i in inodes if states.get(i, "0A") != "0A")  # 0A: LISTEN


def killer(lb_pid, backend, every, stop, kills):
    while not stop.wait(every):
        pids = workers_of(lb_pid, backend)
        if pids:
            victim = random.choice(pids)
            try:
                # Stopped first, so that what it holds is counted exactly.
                os.kill(victim, 19)
                held = held_by(victim)
                os.kill(victim, 9)
                kills.append(held)
            except ProcessLookupError:
                pass


def wrk_errors(ctx, port, close, seconds):
    argv = ["wrk", f"-t{ctx.threads}", f"-c{ctx.conns}", f"-d{seconds}s", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    e = dict(zip(("connect", "read", "write", "timeout"), map(int, errs.groups()))) if errs else {}
    e["non2xx"] = int(non2xx.group(1)) if non2xx else 0
    return requests, e


def rescued_in(log_path):
    with open(log_path) as f:
        return sum(int(n) for n in re.findall(r"rescued (\d+) queued connections", f.read()))


def chaos(ctx, front, close, seconds, every):
    port = run.free_port()
    ctx.procs = run.Procs(ctx.workdir)
    ctx.reports = run.Reports(ctx.workdir)
    try:
        pids = front.start(ctx, port)
        lb = next(p for p in ctx.procs.procs if p.pid == pids[0])
        run.wrk(ctx, port, True, 1)  # warm-up
        before = rescued_in(lb.log_path)
        stop, kills = threading.Event(), []
        t = threading.Thread(target=killer, args=(lb.pid, ctx.backend, every, stop, kills))
        t.start()
        try:
            requests, errors = wrk_errors(ctx, port, close, seconds)
        finally:
            stop.set()
            t.join()
        time.sleep(0.5)
        return {"requests": requests, "errors": errors, "kills": len(kills), "held": sum(kills),
                "rescued": rescued_in(lb.log_path) - before}
    finally:
        ctx.procs.stop_all()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lb", required=True)
    ap.add_argument("--backend", required=True)
    ap.add_argument("--only", default="lb kernel,lb rr")
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--every", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    ctx = run.Ctx()
    ctx.lb, ctx.backend = os.path.abspath(args.lb), os.path.abspath(args.backend)
    ctx.workers, ctx.conns, ctx.threads, ctx.slow_ms = args.workers, args.conns, args.threads, 5
    ctx.workdir = tempfile.mkdtemp(prefix="lb-chaos-")
    fronts = {f.name: f for f in run.FRONTS}
    rows = []
    for name in args.only.split(","):
        for close in (True, False):
            kind = "close" if close else "keep-alive"
            run.log(f"{name}, {kind}: {args.seconds} s, a worker killed every {args.every} s")
            r = chaos(ctx, fronts[name], close, args.seconds, args.every)
            failed = sum(r["errors"].values())
            run.log(f"  {r}")
            rows.append(f"| {name} | {kind} | {r['requests']:,} | {failed} "
                        f"({', '.join(f'{k} {v}' for k, v in r['errors'].items() if v) or 'none'}) | "
                        f"{r['kills']} | {r['held']} | {r['rescued']} |")
    print(f"{args.workers} workers, wrk -t{args.threads} -c{args.conns} -d{args.seconds}s, "
          f"kill -9 of a random worker every {args.every} s (work directory {ctx.workdir})\n")
    print("| front | workload | requests | failed | kills | held by the killed workers | rescued |")
    print("|---|---|---:|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
