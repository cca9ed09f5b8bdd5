#!/usr/bin/env python3
"""Runs lb and the alternatives side by side, in one run, on the same
backend, and writes docs/benchmarks.md. Started by scripts/bench.sh, which
installs the tools and builds the binaries first.

Every process started here is stopped by pid (SIGTERM, then SIGKILL) in a
`finally`; every wait is bounded; every load run lasts DURATION seconds.
"""
import argparse
import datetime
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "scripts", "bench")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes

class Procs:
    """Every process a scenario starts, stopped by pid when it ends."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.procs = []

    def start(self, name, argv, env=None, cwd=None):
        out = open(os.path.join(self.workdir, f"{name}.log"), "w")
        full_env = dict(os.environ)
        full_env.update(env or {})
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                             cwd=cwd, stdin=subprocess.DEVNULL, start_new_session=True)
        p.log_path = out.name
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 10
        for p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what, pred, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def http_ok(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def cpu_ns(pids):
    """CPU time used so far by these processes, all their threads, in ns."""
    total = 0
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


# ---------------------------------------------------------------- backends

class Reports:
    """Per-backend counters written to REPORT_DIR/<pid> by backend.c and node-app.js."""

    def __init__(self, workdir):
        self.dir = tempfile.mkdtemp(prefix="reports-", dir=workdir)

    def pids(self):
        return sorted(int(f) for f in os.listdir(self.dir) if f.isdigit())

    def read(self, pid):
        try:
            with open(os.path.join(self.dir, str(pid))) as f:
                req, conns = f.read().split()
                return int(req), int(conns)
        except (FileNotFoundError, ValueError):
            return None

    def snapshot(self, sig=signal.SIGUSR2):
        """Asks every backend for fresh counters; {pid: (requests, conns)}."""
        pids = self.pids()
        before = {p: self.read(p) for p in pids}
        stamp = {p: os.stat(os.path.join(self.dir, str(p))).st_mtime_ns for p in pids}
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        def fresh():
            return all(os.stat(os.path.join(self.dir, str(p))).st_mtime_ns != stamp[p] for p in pids)
        try:
            wait_until("backend reports", fresh, timeout=5)
        except RuntimeError:
            pass  # an idle, unchanged backend may rewrite within the same ns tick
        return {p: self.read(p) or before[p] for p in pids}


# ---------------------------------------------------------------- fronts

class Front:
    """A way to serve PORT with N backends; `start` returns the front pids
    whose CPU counts (empty when there is no front)."""

    def __init__(self, name, group, start):
        self.name, self.group, self._start = name, group, start

    def start(self, ctx, port):
        return self._start(ctx, port)


def backend_env(ctx, **extra):
    env = {"REPORT_DIR": ctx.reports.dir, "SLOW_MS": str(ctx.slow_ms)}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_direct(ctx, port):
    ctx.procs.start("backend", [ctx.backend], backend_env(ctx, PORT=port))
    wait_until("direct backend", lambda: http_ok(port))
    return []


def start_reuseport(ctx, port):
    for i in range(ctx.workers):
        ctx.procs.start(f"backend{i}", [ctx.backend], backend_env(ctx, PORT=port, REUSEPORT=1))
    wait_until("reuseport backends", lambda: len(ctx.reports.pids()) == ctx.workers)
    wait_until("reuseport port", lambda: http_ok(port))
    return []


def start_lb(policy, binary="lb", extra=()):
    def start(ctx, port):
        p = ctx.procs.start(f"{binary}-{policy}", [getattr(ctx, binary), "--listen", f"127.0.0.1:{port}",
                                             "--workers", str(ctx.workers), "--policy", policy,
                                             *extra, "--", ctx.backend], backend_env(ctx))
        ready = lambda: open(p.log_path).read().count(": ready") >= ctx.workers
        wait_until("lb workers ready", ready)
        return [p.pid]
    return start


def start_fdpass(batch):
    def start(ctx, port):
        p = ctx.procs.start(f"fdpass-{batch}", [ctx.fdpass, str(port)],
                            backend_env(ctx, WORKERS=ctx.workers, BATCH=batch, BACKEND=ctx.backend))
        wait_until("fdpass-master", lambda: "fdpass-ready" in open(p.log_path).read())
        wait_until("fdpass backends", lambda: len(ctx.reports.pids()) == ctx.workers)
        return [p.pid]
    return start


def start_node(policy):
    def start(ctx, port):
        p = ctx.procs.start(f"node-{policy}", ["node", os.path.join(BENCH, "node-cluster.js")],
                            backend_env(ctx, PORT=port, WORKERS=ctx.workers,
                                        NODE_CLUSTER_SCHED_POLICY=policy))
        wait_until("node cluster", lambda: "node-cluster ready" in open(p.log_path).read())
        wait_until("node workers' reports", lambda: len(ctx.reports.pids()) == ctx.workers)
        return [p.pid]
    return start


def start_lb_mode(mode, policy="rr", binary="lb", extra=()):
    """lb in front of the same backend run as a server that knows nothing of
    lb: it binds lb's port under the shim, a port lb gives it under proxy,
    or accepts from lb's listener (LISTEN_FDS) in shared mode (from a
    listener of its own with `--dispatch kernel`)."""
    def start(ctx, port):
        env = backend_env(ctx, PORT=port) if mode == "shim" else backend_env(ctx)
        p = ctx.procs.start(f"{binary}-{mode}", [getattr(ctx, binary), "--listen", f"127.0.0.1:{port}",
                                           "--workers", str(ctx.workers), "--policy", policy,
                                           "--mode", mode, *extra, "--", ctx.backend], env)
        ready = lambda: open(p.log_path).read().count(": ready") >= ctx.workers
        wait_until(f"lb {mode} workers ready", ready)
        wait_until("backends' reports", lambda: len(ctx.reports.pids()) == ctx.workers)
        wait_until(f"lb {mode} serving", lambda: http_ok(port))
        return [p.pid]
    return start


def start_lb_node(policy, extra=()):
    """lb --mode node in front of the same node-app.js as Node's own primary."""
    def start(ctx, port):
        p = ctx.procs.start(f"lb-node-{policy}", [ctx.lb, "--listen", f"127.0.0.1:{port}",
                                                  "--workers", str(ctx.workers), "--policy", policy,
                                                  "--mode", "node", *extra, "--",
                                                  "node", os.path.join(BENCH, "node-app.js")],
                            backend_env(ctx, PORT=port))
        ready = lambda: open(p.log_path).read().count(": ready") >= ctx.workers
        wait_until("lb node workers ready", ready)
        wait_until("node workers' reports", lambda: len(ctx.reports.pids()) == ctx.workers)
        return [p.pid]
    return start


def own_port_backends(ctx):
    ports = []
    for i in range(ctx.workers):
        bport = free_port()
        ctx.procs.start(f"backend{i}", [ctx.backend], backend_env(ctx, PORT=bport))
        ports.append(bport)
    for bport in ports:
        wait_until("backend", lambda: http_ok(bport))
    return ports


def start_haproxy(balance):
    def start(ctx, port):
        ports = own_port_backends(ctx)
        cfg = os.path.join(ctx.workdir, f"haproxy-{balance}.cfg")
        with open(cfg, "w") as f:
            f.write(f"""global
    maxconn 8000
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
listen front
    bind 127.0.0.1:{port}
    balance {balance}
""" + "".join(f"    server b{i} 127.0.0.1:{bp}\n" for i, bp in enumerate(ports)))
        p = ctx.procs.start(f"haproxy-{balance}", ["haproxy", "-db", "-f", cfg])
        wait_until("haproxy", lambda: http_ok(port))
        return [p.pid]
    return start


def start_behind_haproxy(send_proxy):
    """lb rr behind one HAProxy (`mode tcp`, as an L4 balancer in front of
    lb would be), with or without `send-proxy-v2` and lb's
    `--proxy-protocol v2`. The CPU counted is lb's alone, so the two rows
    compare what reading the header costs lb per connection (wrk cannot
    send a PROXY header itself)."""
    def start(ctx, port):
        lb_port = free_port()
        extra = ("--proxy-protocol", "v2", "--proxy-trusted", "127.0.0.0/8") if send_proxy else ()
        lb = ctx.procs.start("lb-pp" if send_proxy else "lb-nopp",
                             [ctx.lb, "--listen", f"127.0.0.1:{lb_port}", "--workers", str(ctx.workers),
                              "--policy", "rr", *extra, "--", ctx.backend], backend_env(ctx))
        wait_until("lb workers ready", lambda: open(lb.log_path).read().count(": ready") >= ctx.workers)
        cfg = os.path.join(ctx.workdir, f"haproxy-front-{int(send_proxy)}.cfg")
        with open(cfg, "w") as f:
            f.write(f"""global
    maxconn 8000
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
listen front
    bind 127.0.0.1:{port}
    server lb 127.0.0.1:{lb_port}{" send-proxy-v2" if send_proxy else ""}
""")
        ctx.procs.start(f"haproxy-front-{int(send_proxy)}", ["haproxy", "-db", "-f", cfg])
        wait_until("haproxy in front of lb", lambda: http_ok(port))
        return [lb.pid]
    return start


def start_nginx(ctx, port):
    ports = own_port_backends(ctx)
    d = tempfile.mkdtemp(prefix="nginx-", dir=ctx.workdir)
    module = "/usr/lib/nginx/modules/ngx_stream_module.so"
    cfg = os.path.join(d, "nginx.conf")
    with open(cfg, "w") as f:
        f.write(f"""load_module {module};
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 8000; }}
stream {{
    upstream backends {{
""" + "".join(f"        server 127.0.0.1:{bp};\n" for bp in ports) + f"""    }}
    server {{
        listen 127.0.0.1:{port};
        proxy_pass backends;
    }}
}}
""")
    p = ctx.procs.start("nginx", ["nginx", "-p", d, "-e", f"{d}/error.log", "-c", cfg])
    wait_until("nginx", lambda: http_ok(port))
    children = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    return [p.pid] + [int(c) for c in children]


FRONTS = [
    Front("direct", "no front", start_direct),
    Front("reuseport", "no front", start_reuseport),
    Front("fdpass-c", "C floor", start_fdpass(1)),
    Front("fdpass-c batch", "C floor", start_fdpass(8)),
    Front("lb rr", "lb", start_lb("rr")),
    Front("lb rr behind haproxy", "PROXY protocol", start_behind_haproxy(False)),
    Front("lb rr behind haproxy send-proxy-v2", "PROXY protocol", start_behind_haproxy(True)),
    Front("lb wrr", "lb", start_lb("wrr")),
    Front("lb lc", "lb", start_lb("lc")),
    Front("lb shim", "lb", start_lb_mode("shim")),
    Front("lb proxy", "lb", start_lb_mode("proxy")),
    Front("lb shared", "lb", start_lb_mode("shared")),
    Front("lb kernel", "lb", start_lb_mode("shared", extra=("--dispatch", "kernel"))),
    Front("lb native kernel", "lb", start_lb("rr", extra=("--dispatch", "kernel"))),
    Front("lb native kernel lc", "lb", start_lb("lc", extra=("--dispatch", "kernel"))),
    Front("lb shim kernel", "lb", start_lb_mode("shim", extra=("--dispatch", "kernel"))),
    Front("lb shim kernel lc", "lb", start_lb_mode("shim", "lc", extra=("--dispatch", "kernel"))),
    Front("node-cluster rr", "node", start_node("rr")),
    Front("node-cluster none", "node", start_node("none")),
    Front("lb node rr", "node", start_lb_node("rr")),
    Front("lb node lc", "node", start_lb_node("lc")),
    Front("lb node kernel", "node", start_lb_node("rr", ("--dispatch", "kernel"))),
    Front("lb node kernel lc", "node", start_lb_node("lc", ("--dispatch", "kernel"))),
    Front("haproxy rr", "haproxy", start_haproxy("roundrobin")),
    Front("haproxy lc", "haproxy", start_haproxy("leastconn")),
    Front("nginx stream", "nginx", start_nginx),
]
# Another lb build (--baseline), for a before/after comparison in one run.
BASELINE_FRONTS = [
    Front("baseline rr", "baseline", start_lb("rr", "baseline")),
    Front("baseline lc", "baseline", start_lb("lc", "baseline")),
    Front("baseline shim", "baseline", start_lb_mode("shim", binary="baseline")),
    Front("baseline proxy", "baseline", start_lb_mode("proxy", binary="baseline")),
]
SKEW_FRONTS = ["lb rr", "lb lc", "lb kernel", "lb native kernel lc", "lb shim kernel lc",
               "node-cluster rr", "lb node rr", "lb node lc", "lb node kernel lc", "haproxy lc"]


# ---------------------------------------------------------------- load

def parse_duration_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    v = float(m.group(1))
    return {"us": v / 1000, "ms": v, "s": v * 1000}[m.group(2)]


def wrk(ctx, port, close, seconds, script=None):
    argv = ["wrk", f"-t{ctx.threads}", f"-c{ctx.conns}", f"-d{seconds}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    if script:
        argv += ["-s", script]
    argv.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    res = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
           "requests": int(re.search(r"(\d+) requests in", out).group(1))}
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    res["p50"] = parse_duration_ms(lat["50"])
    res["p99"] = parse_duration_ms(lat["99"])
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["errors"] = (sum(int(x) for x in errs.groups()) if errs else 0) + (int(non2xx.group(1)) if non2xx else 0)
    return res


class Ctx:
    pass


def median_of(runs):
    """One result from several rounds of the same front and workload: the
    median of each rate, latency and CPU figure; errors and splits summed."""
    def med(key):
        vals = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(vals) if vals else None
    out = {k: med(k) for k in ("rps", "p50", "p99", "cpu_us_per_conn", "cpu_us_per_req")}
    out["errors"] = sum(r["errors"] for r in runs)
    out["requests"] = sum(r["requests"] for r in runs)
    out["split"] = [sum(col) for col in zip(*(r["split"] for r in runs))] if runs[0].get("split") else []
    out["rounds"] = len(runs)
    out["rps_all"] = [r["rps"] for r in runs]
    return out


def run_front(ctx, front, workloads):
    """Starts `front`, runs each workload, returns {workload: result}."""
    port = free_port()
    ctx.procs = Procs(ctx.workdir)
    ctx.reports = Reports(ctx.workdir)
    results = {}
    try:
        front_pids = front.start(ctx, port)
        wrk(ctx, port, True, 1)  # warm-up
        for name, close, script in workloads:
            before = ctx.reports.snapshot()
            cpu0 = cpu_ns(front_pids)
            r = wrk(ctx, port, close, ctx.duration, script)
            cpu1 = cpu_ns(front_pids)
            after = ctx.reports.snapshot()
            counts = [(after[p][0] - before[p][0], after[p][1] - before[p][1]) for p in sorted(after)]
            conns = sum(c for _, c in counts)
            r["split"] = [c if close else q for q, c in counts]
            r["conns_split"] = [c for _, c in counts]
            r["conns"] = conns
            r["cpu_us_per_conn"] = (cpu1 - cpu0) / 1000 / conns if front_pids and conns else None
            r["cpu_us_per_req"] = (cpu1 - cpu0) / 1000 / r["requests"] if front_pids and r["requests"] else None
            results[name] = r
            per = r["cpu_us_per_conn"] if close else r["cpu_us_per_req"]
            log(f"  {front.name:18} {name:10} {r['rps']:10.0f} req/s  p50 {r['p50']:.2f} ms  "
                f"p99 {r['p99']:.2f} ms  errors {r['errors']}  requests {[q for q, _ in counts]}  "
                f"conns {r['conns_split']}  "
                + (f"front {per:.2f} us/{'conn' if close else 'req'}" if per is not None else ""))
    finally:
        ctx.procs.stop_all()
    return results


# ---------------------------------------------------------------- redis

REDIS_RUNS = [
    ("keep-alive", ["-t", "ping,set,get", "-n", "100000", "-c", "50"]),
    ("new connection per request", ["-t", "ping", "-n", "20000", "-c", "50", "-k", "0"]),
]


def redis_up(port):
    try:
        out = subprocess.run(["redis-cli", "-p", str(port), "PING"], capture_output=True,
                             text=True, timeout=2).stdout
    except subprocess.TimeoutExpired:
        return False
    return out.strip() == "PONG"


def redis_rps(port, args):
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-q", *args],
                         capture_output=True, text=True, timeout=300).stdout
    # "-q" prints "\r<progress>\r" before each final "NAME: N requests per second".
    rps = {}
    for line in out.replace("\r", "\n").splitlines():
        m = re.match(r"\s*(\w+): ([\d.]+) requests per second", line)
        if m:
            rps[m.group(1)] = float(m.group(2))
    return rps


def redis_bench(ctx):
    """redis-server (which knows nothing of lb) direct, behind the shim and
    behind the proxy, with redis-benchmark; {front: {run: {test: rps}}}."""
    if not shutil.which("redis-server") or not shutil.which("redis-benchmark"):
        log("redis-server or redis-benchmark missing: redis rows skipped")
        return None
    results = {}
    fronts = [("redis direct (1 server)", None), ("lb shim (2 redis)", "shim"),
              ("lb proxy (2 redis)", "proxy")]
    for name, mode in fronts:
        port = free_port()
        ctx.procs = Procs(ctx.workdir)
        try:
            redis = ["redis-server", "--port", "{port}" if mode else str(port), "--save", "",
                     "--appendonly", "no", "--dir", ctx.workdir]
            if mode:
                p = ctx.procs.start(f"lb-redis-{mode}", [ctx.lb, "--listen", f"127.0.0.1:{port}",
                                                         "--workers", str(ctx.workers), "--mode",
                                                         mode, "--", *redis])
                wait_until("lb redis ready",
                           lambda: open(p.log_path).read().count(": ready") >= ctx.workers)
            else:
                ctx.procs.start("redis", redis)
            wait_until("redis", lambda: redis_up(port))
            results[name] = {run: redis_rps(port, args) for run, args in REDIS_RUNS}
            log(f"  {name}: {results[name]}")
        finally:
            ctx.procs.stop_all()
    return results


# ---------------------------------------------------------------- allocations

def alloc_check(ctx):
    """Allocations per connection of the real lb binary, via an LD_PRELOAD counter."""
    port = free_port()
    ctx.procs = Procs(ctx.workdir)
    ctx.reports = Reports(ctx.workdir)
    count_file = os.path.join(ctx.workdir, "alloc-count")
    try:
        p = ctx.procs.start("lb-alloc", [ctx.lb, "--listen", f"127.0.0.1:{port}", "--workers",
                                          str(ctx.workers), "--policy", "lc", "--", ctx.backend],
                            backend_env(ctx, LD_PRELOAD=ctx.alloccount, ALLOC_COUNT_FILE=count_file))
        wait_until("lb workers ready", lambda: open(p.log_path).read().count(": ready") >= ctx.workers)
        wrk(ctx, port, True, 1)

        def count():
            stamp = os.stat(count_file).st_mtime_ns if os.path.exists(count_file) else 0
            os.kill(p.pid, signal.SIGWINCH)
            wait_until("allocation count", lambda: os.path.exists(count_file)
                       and os.stat(count_file).st_mtime_ns != stamp and open(count_file).read().strip())
            return int(open(count_file).read())

        a0, c0 = count(), sum(c for _, c in ctx.reports.snapshot().values())
        target = ctx.alloc_conns
        deadline = time.time() + 120
        while sum(c for _, c in ctx.reports.snapshot().values()) - c0 < target and time.time() < deadline:
            wrk(ctx, port, True, 2)
        a1, c1 = count(), sum(c for _, c in ctx.reports.snapshot().values())
        return {"allocations": a1 - a0, "connections": c1 - c0}
    finally:
        ctx.procs.stop_all()


# ---------------------------------------------------------------- report

def version(argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0] if text else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"


def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def render(ctx, results, skew, alloc, started, redis=None):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `scripts/bench.sh` on {started:%Y-%m-%d %H:%M} UTC (lb {rev}). Everything below comes "
        "from one run on one machine; compare rows with each other, not with other machines.",
        "",
        f"- Machine: {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}",
        f"- Load: `wrk -t{ctx.threads} -c{ctx.conns} -d{ctx.duration}s --latency` on 127.0.0.1, "
        f"after a 1 s warm-up; {ctx.workers} backends behind every front",
        f"- {ctx.rounds} rounds, interleaved (every front once per round); each figure is the median over "
        "the rounds, errors and splits are summed. `req/s per round` shows the spread.",
        f"- Backend: `scripts/bench/backend.c` (single-threaded epoll, replies `ok`) behind every front "
        "except the node-cluster and lb node rows, whose workers are the same unmodified "
        "`scripts/bench/node-app.js` (lb node: `lb --mode node -- node node-app.js`). Under `lb shim`, "
        "`lb proxy` and `lb shared` the backend runs as a server that knows nothing of lb: it binds "
        "lb's port (taken over by the accept shim), a loopback port of its own (lb relays with splice) "
        "or accepts from lb's listener (LISTEN_FDS), respectively",
        f"- Versions: {version(['wrk', '-v'])}; {version(['haproxy', '-v'])}; "
        f"{version(['nginx', '-v'])}; node {version(['node', '--version'])}; {version(['rustc', '--version'])}",
        "- Front CPU: CPU time of the front process (all threads; for nginx master and worker) during the run, "
        "from `/proc/<pid>/task/*/schedstat`, divided by connections (`close`) or requests (`keep-alive`).",
        "- `fdpass-c` is `scripts/bench/fdpass-master.c`: accept4 → sendmsg → close, round-robin, nothing "
        "else; `batch` sends up to 8 fds per sendmsg. It is the floor for a master's CPU per connection.",
        "",
    ]
    ref = {w: results.get("reuseport", {}).get(w, {}).get("rps") for w in ("close", "keep-alive")}
    node = {w: results.get("node-cluster rr", {}).get(w, {}).get("rps") for w in ("close", "keep-alive")}
    for workload, title, unit in (("close", "New connection per request (`Connection: close`)", "µs/conn"),
                                  ("keep-alive", "Keep-alive", "µs/req")):
        lines += [f"## {title}", "",
                  f"| front | req/s | × reuseport | × node-cluster rr | p50 ms | p99 ms | errors | split per backend | front CPU {unit} | req/s per round |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
        for front in FRONTS + BASELINE_FRONTS:
            r = results.get(front.name, {}).get(workload)
            if not r:
                continue
            split = r["split"]
            total = sum(split) or 1
            split_text = " / ".join(f"{100 * s / total:.1f}%" for s in split)
            per = r["cpu_us_per_conn"] if workload == "close" else r["cpu_us_per_req"]
            lines.append(
                f"| {front.name} | {r['rps']:,.0f} | {fmt(ref[workload] and r['rps'] / ref[workload], '.2f')} | "
                f"{fmt(node[workload] and r['rps'] / node[workload], '.2f')} | {r['p50']:.2f} | {r['p99']:.2f} | "
                f"{r['errors']} | {split_text} | {fmt(per, '.1f')} | "
                + " ".join(f"{v / 1000:.1f}k" for v in r["rps_all"]) + " |")
        lines.append("")
    ours, theirs = results.get("lb node rr", {}).get("close"), results.get("node-cluster rr", {}).get("close")
    if ours and theirs:
        lines += ["## lb as the primary of unmodified Node.js workers", "",
                  "The same app and worker count under Node's own cluster primary and under `lb --mode node` "
                  "(new connection per request). Target: ≥ 2× the connection rate at ≤ 1/5 of the primary's "
                  "CPU per connection.", "",
                  "| primary | conn/s | CPU µs/conn | conn/s × Node's | CPU × Node's |",
                  "|---|---:|---:|---:|---:|"]
        for name in ("node-cluster rr", "lb node rr", "lb node lc"):
            r = results.get(name, {}).get("close")
            if r:
                lines.append(f"| {name} | {r['rps']:,.0f} | {fmt(r['cpu_us_per_conn'], '.1f')} | "
                             f"{r['rps'] / theirs['rps']:.2f} | "
                             f"{fmt(r['cpu_us_per_conn'] and theirs['cpu_us_per_conn'] and r['cpu_us_per_conn'] / theirs['cpu_us_per_conn'], '.2f')} |")
        lines.append("")
    if skew:
        lines += ["## Skewed load", "",
                  f"`Connection: close`; every 10th request is `GET /slow`, which burns {ctx.slow_ms} ms of CPU "
                  "in the backend, so a worker's queue builds up behind it under round-robin.", "",
                  "| front | req/s | p50 ms | p99 ms | errors | p99 × node-cluster rr | p99 × lb rr |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        base = skew.get("node-cluster rr", {}).get("p99")
        lb_rr = skew.get("lb rr", {}).get("p99")
        for name in SKEW_FRONTS:
            r = skew.get(name)
            if r:
                lines.append(f"| {name} | {r['rps']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['errors']} | "
                             f"{fmt(base and r['p99'] / base, '.2f')} | {fmt(lb_rr and r['p99'] / lb_rr, '.2f')} |")
        lines.append("")
    if redis:
        lines += ["## redis-server behind lb", "",
                  f"`redis-benchmark -q` (single-threaded client) against one redis-server on its own "
                  f"port, and against {ctx.workers} redis-servers behind lb's shim (they bind lb's port; "
                  "the shim hands them lb's connections) and behind lb's proxy (each on a port of its "
                  "own). requests/s; the client is the bottleneck in keep-alive runs.", "",
                  "| front | " + " | ".join(f"{t} ({run})" for run, _ in REDIS_RUNS
                                           for t in (["PING_INLINE", "SET", "GET"] if run == "keep-alive"
                                                     else ["PING_INLINE"])) + " |",
                  "|---|" + "---:|" * 4]
        for name, runs in redis.items():
            cells = [runs["keep-alive"].get(t) for t in ("PING_INLINE", "SET", "GET")]
            cells.append(runs["new connection per request"].get("PING_INLINE"))
            lines.append(f"| {name} | " + " | ".join(fmt(c, ",.0f") for c in cells) + " |")
        lines.append("")
    if alloc:
        per = alloc["allocations"] / alloc["connections"] if alloc["connections"] else float("nan")
        lines += ["## Allocations of the real binary", "",
                  f"`lb --policy lc` with `scripts/bench/alloccount.c` preloaded (counts every malloc-family call "
                  f"in the master, all threads): **{alloc['allocations']} allocations over "
                  f"{alloc['connections']:,} connections = {per:.4f} per connection** after warm-up.", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lb", required=True)
    ap.add_argument("--backend", required=True)
    ap.add_argument("--fdpass")
    ap.add_argument("--alloccount")
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3,
                    help="every front runs once per round, rounds interleaved; medians are reported")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slow-ms", type=int, default=5)
    ap.add_argument("--alloc-conns", type=int, default=100_000)
    ap.add_argument("--only", help="comma-separated front names")
    ap.add_argument("--baseline", help="another lb binary: adds the 'baseline rr/lc/shim/proxy' "
                    "fronts, to compare two builds side by side (with --only)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    args = ap.parse_args()
    ctx = Ctx()
    ctx.lb, ctx.backend, ctx.fdpass, ctx.alloccount = args.lb, args.backend, args.fdpass, args.alloccount
    ctx.baseline = args.baseline
    ctx.duration, ctx.workers, ctx.conns, ctx.threads = args.duration, args.workers, args.conns, args.threads
    ctx.rounds = args.rounds
    ctx.slow_ms, ctx.alloc_conns = args.slow_ms, args.alloc_conns
    ctx.workdir = tempfile.mkdtemp(prefix="lb-bench-")
    started = datetime.datetime.now(datetime.timezone.utc)
    only = set(args.only.split(",")) if args.only else None
    fronts = [f for f in FRONTS + (BASELINE_FRONTS if ctx.baseline else []) if (not only or f.name in only)
              and (f.group != "C floor" or ctx.fdpass) and (f.group != "node" or version(["node", "--version"]) != "not installed")]
    runs, skew_runs = {}, {}
    log(f"work directory: {ctx.workdir}")
    skew_script = os.path.join(BENCH, "skew.lua")
    for round_no in range(1, ctx.rounds + 1):
        for front in fronts:
            log(f"round {round_no}/{ctx.rounds}, {front.name}:")
            got = run_front(ctx, front, [("close", True, None), ("keep-alive", False, None)])
            for workload, r in got.items():
                runs.setdefault(front.name, {}).setdefault(workload, []).append(r)
        for front in fronts:
            if front.name in SKEW_FRONTS:
                log(f"round {round_no}/{ctx.rounds}, {front.name} (skewed):")
                r = run_front(ctx, front, [("skew", True, skew_script)])["skew"]
                skew_runs.setdefault(front.name, []).append(r)
    results = {f: {w: median_of(rs) for w, rs in ws.items()} for f, ws in runs.items()}
    skew = {f: median_of(rs) for f, rs in skew_runs.items()}
    alloc = alloc_check(ctx) if ctx.alloccount and (not only or "alloc" in only) else None
    redis = redis_bench(ctx) if not only or "redis" in only else None
    if alloc:
        log(f"allocations: {alloc}")
    text = render(ctx, results, skew, alloc, started, redis)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
