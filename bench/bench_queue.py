"""The queue's own overhead: enqueue to task start, and task end to export start, on Redis and the embedded broker.

What is measured. A bench Celery app is built from the node's own ``make_celery(settings)``: the broker URL and
transport options come from ``dicom_node.work.celery_app.broker_settings`` and every setting ``make_celery`` changes
(acks_late, reject on worker lost, prefetch 1, routes, publish retry policy, pool limit, remote control, the
embedded polling interval...) is copied onto it, found by comparing its configuration with a fresh Celery app's.
Its two tasks carry the node's task names, queues and time limits, and their bodies only record timestamps:
``inference`` records ``time.time()`` at its first line and just before it publishes ``export`` with
``app.send_task(EXPORT_TASK, args=[job_id], queue=EXPORT_QUEUE)`` exactly as ``celery_app.py`` does; ``export``
records its first line. The workers are real Celery workers in their own processes, started like
``dicom-node worker`` (prefork, concurrency 1, ``--without-gossip --without-mingle``, one per queue). The model,
the job store and DICOM work are not measured: only broker and worker overhead with the node's settings.

Per job: hop1 = inference start - enqueue (taken just before ``send_task`` in the publisher), hop2 = export start -
inference end (which includes the publish from inside the task). Two phases per variant:

- ``sequential``: one job in flight (the next is sent when the previous export started): pure hop latency;
- ``burst``: all jobs sent at once: jobs/s; its hop figures include waiting behind earlier jobs.

Baselines measured in the same run: a raw redis-py LPUSH -> BRPOP between two processes (the floor for Redis),
and a file create + rename -> ``os.listdir`` poll loop between two processes (the floor for the filesystem
transport), at a 1 ms poll and at the embedded broker's polling interval.

    .venv/bin/python -m bench.bench_queue [--jobs 200] [--variants redis,embedded,...]

Variants: ``redis`` (the node's settings), ``redis-noheartbeat`` (+ worker ``--without-heartbeat``),
``redis-prefetch4`` (worker_prefetch_multiplier 4), ``embedded`` (the node's settings), ``embedded-poll<S>``
(polling_interval S seconds, e.g. ``embedded-poll0.01``). Exit status is non-zero only when a job was lost (its
export never started), never on a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery, Task
from celery.signals import worker_ready

from dicom_node.config import Settings, load_settings
from dicom_node.work.celery_app import EXPORT_TASK, INFERENCE_TASK, make_celery
from dicom_node.work.queues import EXPORT_QUEUE, INFERENCE_QUEUE

DEFAULT_VARIANTS = "redis,redis-noheartbeat,embedded,embedded-poll0.01,embedded-poll0.005"
WORKER_FLAGS = ["--without-gossip", "--without-mingle"]  # what `dicom-node worker` passes
WARMUP_JOBS = 5

# --- the bench app --------------------------------------------------------------------------------------------


def node_settings(broker_url: str, data_dir: Path) -> Settings:
    return load_settings(overrides={"node": {"data_dir": str(data_dir)}, "queue": {"broker_url": broker_url}})


def node_conf(settings: Settings) -> dict[str, Any]:
    """Every setting ``make_celery`` gives the node's app that differs from Celery's defaults."""
    real = make_celery(settings)
    fresh = Celery("fresh", set_as_current=False).conf
    changed: dict[str, Any] = {}
    for key in real.conf.keys():
        if key in ("dicom_node_context",):
            continue
        value = real.conf.get(key)
        if fresh.get(key) != value:
            changed[key] = value
    return changed


def bench_app(settings: Settings, conf: dict[str, Any], stamps: Path, notify: Path | None,
              polling: float | None, prefetch: int | None) -> Celery:
    """A Celery app with the node's configuration ``conf`` whose two tasks only record timestamps.

    ``conf`` comes from :func:`node_conf` in the publisher: a worker process never calls ``make_celery``, whose
    tasks are shared (Celery's default) and would be registered on this app too, under the same names.
    """
    conf = dict(conf)
    app = Celery("dicom_node_bench", broker=conf.pop("broker_url"), set_as_current=False)
    app.conf.update(conf)
    if polling is not None:
        app.conf.broker_transport_options = {**app.conf.broker_transport_options, "polling_interval": polling}
    if prefetch is not None:
        app.conf.worker_prefetch_multiplier = prefetch
    q = settings.queue
    files: dict[str, Any] = {}
    sock: list[socket.socket] = []

    def record(kind: str, *values: float | int) -> None:
        if files.get("pid") != os.getpid():  # a prefork child opens its own files
            files.clear()
            files["pid"] = os.getpid()
        handle = files.get(kind)
        if handle is None:
            handle = files[kind] = (stamps / f"{kind}-{os.getpid()}.log").open("a", encoding="utf-8")
        handle.write(" ".join(repr(v) for v in values) + "\n")
        handle.flush()

    def wake(job_id: int) -> None:
        if notify is None:
            return
        if not sock:
            sock.append(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
            sock[0].setblocking(False)  # a full receive queue (burst phase) drops the wake-up, never blocks the task
        with contextlib.suppress(OSError):
            sock[0].sendto(str(job_id).encode(), str(notify))

    @app.task(name=INFERENCE_TASK, bind=True, shared=False, soft_time_limit=q.inference_time_limit * 0.9,
              time_limit=q.inference_time_limit)
    def inference_task(self: Task, job_id: int) -> None:
        started = time.time()
        ended = time.time()  # the model would run here
        record("inference", job_id, started, ended)
        app.send_task(EXPORT_TASK, args=[job_id], queue=EXPORT_QUEUE)

    @app.task(name=EXPORT_TASK, bind=True, shared=False, soft_time_limit=q.export_time_limit * 0.9,
              time_limit=q.export_time_limit)
    def export_task(self: Task, job_id: int) -> None:
        started = time.time()
        record("export", job_id, started)
        wake(job_id)

    return app


# --- worker processes -----------------------------------------------------------------------------------------


def worker_main(args: argparse.Namespace) -> None:
    """Entry point of a worker subprocess: the bench app, run like `dicom-node worker --queues <queue>`."""
    from dicom_node.logs import configure_logging

    settings = node_settings(args.broker, Path(args.data_dir))
    configure_logging(settings.logging.level, settings.logging.json_format, settings.node.data_dir)
    stamps = Path(args.stamps)
    conf = json.loads((Path(args.data_dir) / "conf.json").read_text(encoding="utf-8"))
    app = bench_app(settings, conf, stamps, Path(args.notify), args.polling, args.prefetch)

    @worker_ready.connect(weak=False)
    def _ready(**_: Any) -> None:
        (stamps / f"ready-{args.worker}").touch()

    argv = [
        "worker", "--queues", args.worker, "--concurrency", "1", "--pool", "prefork",
        "--hostname", f"{args.worker}-{os.getpid()}@%h", "--loglevel", settings.logging.level, *WORKER_FLAGS,
        *args.extra_flags,
    ]
    app.worker_main(argv)


@dataclass
class Variant:
    name: str
    transport: str  # redis or embedded
    polling: float | None = None
    prefetch: int | None = None
    flags: list[str] = field(default_factory=list)


def parse_variant(name: str) -> Variant:
    if name == "redis":
        return Variant(name, "redis")
    if name == "redis-noheartbeat":
        return Variant(name, "redis", flags=["--without-heartbeat"])
    if name.startswith("redis-prefetch"):
        return Variant(name, "redis", prefetch=int(name.removeprefix("redis-prefetch")))
    if name == "embedded":
        return Variant(name, "embedded")
    if name.startswith("embedded-poll"):
        return Variant(name, "embedded", polling=float(name.removeprefix("embedded-poll")))
    raise SystemExit(f"--variants: unknown variant {name!r}; known: redis, redis-noheartbeat, redis-prefetchN, "
                     "embedded, embedded-pollS")


@contextlib.contextmanager
def workers(variant: Variant, broker: str, data_dir: Path, stamps: Path, notify: Path) -> Iterator[None]:
    procs = []
    repo = Path(__file__).resolve().parents[1]
    for queue in (INFERENCE_QUEUE, EXPORT_QUEUE):
        cmd = [sys.executable, "-m", "bench.bench_queue", "--worker", queue, "--broker", broker,
               "--data-dir", str(data_dir), "--stamps", str(stamps), "--notify", str(notify)]
        if variant.polling is not None:
            cmd += ["--polling", str(variant.polling)]
        if variant.prefetch is not None:
            cmd += ["--prefetch", str(variant.prefetch)]
        for flag in variant.flags:
            cmd.append(f"--extra-flag={flag}")
        log_file = (data_dir / f"worker-{queue}.log").open("ab")
        procs.append(subprocess.Popen(cmd, cwd=repo, stdout=log_file, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        log_file.close()
    try:
        deadline = time.monotonic() + 60
        while not all((stamps / f"ready-{q}").exists() for q in (INFERENCE_QUEUE, EXPORT_QUEUE)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise SystemExit(f"{variant.name}: workers did not start; see {data_dir}/worker-*.log")
            time.sleep(0.1)
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


# --- measurement ----------------------------------------------------------------------------------------------


def read_stamps(stamps: Path) -> tuple[dict[int, tuple[float, float]], dict[int, float]]:
    inference: dict[int, tuple[float, float]] = {}
    export: dict[int, float] = {}
    for path in stamps.glob("inference-*.log"):
        for line in path.read_text(encoding="utf-8").splitlines():
            job, start, end = line.split()
            inference.setdefault(int(job), (float(start), float(end)))
    for path in stamps.glob("export-*.log"):
        for line in path.read_text(encoding="utf-8").splitlines():
            job, start = line.split()
            export.setdefault(int(job), float(start))
    return inference, export


def summary(values_ms: list[float]) -> dict[str, float]:
    if not values_ms:
        return {"median": float("nan"), "p90": float("nan"), "max": float("nan")}
    ordered = sorted(values_ms)
    return {
        "median": statistics.median(ordered),
        "p90": ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))],
        "max": ordered[-1],
    }


def run_variant(variant: Variant, jobs: int, redis_url: str | None, workdir: Path) -> dict[str, Any]:
    data_dir = workdir / variant.name
    stamps = data_dir / "stamps"
    stamps.mkdir(parents=True)
    broker = redis_url if variant.transport == "redis" else "embedded"
    assert broker is not None
    settings = node_settings(broker, data_dir)
    conf = node_conf(settings)
    (data_dir / "conf.json").write_text(json.dumps(conf), encoding="utf-8")
    app = bench_app(settings, conf, stamps, None, variant.polling, variant.prefetch)
    notify = data_dir / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    enqueued: dict[int, float] = {}
    result: dict[str, Any] = {
        "variant": variant.name,
        "polling_interval": app.conf.broker_transport_options.get("polling_interval"),
        "prefetch": app.conf.worker_prefetch_multiplier,
        "worker_flags": " ".join(WORKER_FLAGS + variant.flags),
    }

    def send(job_id: int) -> None:
        enqueued[job_id] = time.time()
        app.send_task(INFERENCE_TASK, args=[job_id], queue=INFERENCE_QUEUE)

    def wait_for(job_id: int, timeout: float) -> bool:
        listener.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = int(listener.recv(64))
            except TimeoutError:
                return False
            if got == job_id:
                return True
        return False

    with workers(variant, broker, data_dir, stamps, notify):
        for i in range(WARMUP_JOBS):
            send(-1 - i)
            if not wait_for(-1 - i, 30):
                print(f"{variant.name}: warm-up job {-1 - i} did not finish in 30 s", flush=True)
        # sequential: one job in flight
        seq_ids = list(range(1, jobs + 1))
        started = time.monotonic()
        for job_id in seq_ids:
            send(job_id)
            wait_for(job_id, 15)
        seq_elapsed = time.monotonic() - started
        # burst: all jobs at once
        burst_ids = list(range(100_001, 100_001 + jobs))
        for job_id in burst_ids:
            send(job_id)
        deadline = time.monotonic() + 60 + jobs * 0.5
        while time.monotonic() < deadline:
            _, export = read_stamps(stamps)
            if all(j in export for j in burst_ids):
                break
            time.sleep(0.2)
        time.sleep(0.5)
    listener.close()
    inference, export = read_stamps(stamps)
    for phase, ids in (("sequential", seq_ids), ("burst", burst_ids)):
        done = [j for j in ids if j in inference and j in export]
        hop1 = [(inference[j][0] - enqueued[j]) * 1000 for j in done]
        hop2 = [(export[j] - inference[j][1]) * 1000 for j in done]
        span = (max(export[j] for j in done) - min(enqueued[j] for j in ids)) if done else float("nan")
        result[phase] = {
            "jobs": len(ids),
            "lost": len(ids) - len(done),
            "hop1_ms": summary(hop1),
            "hop2_ms": summary(hop2),
            "jobs_per_s": len(done) / (seq_elapsed if phase == "sequential" else span),
        }
    if not os.environ.get("BENCH_KEEP"):
        shutil.rmtree(data_dir, ignore_errors=True)
    return result


# --- baselines ------------------------------------------------------------------------------------------------


def _redis_consumer(url: str) -> None:
    import redis

    r = redis.Redis.from_url(url)
    while True:
        _, raw = r.brpop(["bench:q"])
        now = time.time()
        if raw == b"stop":
            return
        r.lpush("bench:ack", repr(now - float(raw)))


def redis_floor(url: str, count: int) -> dict[str, float]:
    """One-way latency of a raw LPUSH -> BRPOP between two processes, one message in flight."""
    import redis

    ctx = mp.get_context("fork")
    proc = ctx.Process(target=_redis_consumer, args=(url,), daemon=True)
    proc.start()
    r = redis.Redis.from_url(url)
    latencies = []
    for i in range(count + WARMUP_JOBS):
        r.lpush("bench:q", repr(time.time()))
        _, raw = r.brpop(["bench:ack"])
        if i >= WARMUP_JOBS:
            latencies.append(float(raw) * 1000)
    r.lpush("bench:q", "stop")
    proc.join(10)
    return summary(latencies)


def _fs_consumer(folder: str, poll: float, conn: Any) -> None:
    while True:
        names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
        if not names:
            time.sleep(poll)
            continue
        for name in names:
            now = time.time()
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as fh:
                raw = fh.read()
            os.unlink(path)
            if raw == "stop":
                return
            conn.send(now - float(raw))


def fs_floor(workdir: Path, count: int, poll: float) -> dict[str, float]:
    """One-way latency of a file written, renamed into a folder, and found by a process polling that folder."""
    folder = workdir / f"fs-floor-{poll}"
    folder.mkdir()
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_fs_consumer, args=(str(folder), poll, child), daemon=True)
    proc.start()
    latencies = []

    def put(i: int, text: str) -> None:
        tmp = folder / f".{i}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.rename(tmp, folder / f"{i:08d}.msg")

    for i in range(count + WARMUP_JOBS):
        put(i, repr(time.time()))
        value = parent.recv()
        if i >= WARMUP_JOBS:
            latencies.append(value * 1000)
    put(count + WARMUP_JOBS, "stop")
    proc.join(10)
    shutil.rmtree(folder, ignore_errors=True)
    return summary(latencies)


# --- redis-server ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        r = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


# --- report ---------------------------------------------------------------------------------------------------


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def print_report(results: list[dict[str, Any]], floors: dict[str, dict[str, float]], jobs: int) -> None:
    print()
    print(f"Queue overhead, {jobs} jobs per phase, {os.cpu_count()} CPUs, {load()}")
    print("Baselines (one-way, one message in flight, ms):")
    for name, s in floors.items():
        print(f"  {name:<28} median {s['median']:7.2f}  p90 {s['p90']:7.2f}  max {s['max']:7.2f}")
    print()
    header = (f"{'variant':<22} {'phase':<10} {'hop1 med':>9} {'p90':>7} {'max':>7} {'hop2 med':>9} {'p90':>7} "
              f"{'max':>7} {'jobs/s':>7} {'lost':>4} {'x floor':>8}")
    print(header)
    print("-" * len(header))
    for r in results:
        floor_name = "redis LPUSH->BRPOP" if r["variant"].startswith("redis") else "file rename->poll 1ms"
        floor = floors.get(floor_name, {}).get("median", float("nan"))
        for phase in ("sequential", "burst"):
            p = r[phase]
            h1, h2 = p["hop1_ms"], p["hop2_ms"]
            ratio = statistics.mean([h1["median"], h2["median"]]) / floor if floor else float("nan")
            print(f"{r['variant']:<22} {phase:<10} {h1['median']:9.2f} {h1['p90']:7.2f} {h1['max']:7.2f} "
                  f"{h2['median']:9.2f} {h2['p90']:7.2f} {h2['max']:7.2f} {p['jobs_per_s']:7.1f} {p['lost']:4d} "
                  f"{ratio:8.1f}")
    print()
    print("hop1 = inference task start - enqueue (publisher, before send_task); hop2 = export task start - "
          "inference task end (before its send_task). 'x floor' = mean of the two hop medians / the median of "
          "the transport's floor (redis LPUSH->BRPOP, or file rename->poll at 1 ms). burst hops include waiting "
          "behind earlier jobs; its jobs/s is jobs / (last export start - first enqueue).")


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200, help="jobs per phase (sequential, burst)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated; see the module docstring")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    # worker subprocess (internal)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--stamps", help=argparse.SUPPRESS)
    parser.add_argument("--notify", help=argparse.SUPPRESS)
    parser.add_argument("--polling", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--prefetch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--extra-flag", dest="extra_flags", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}")
    signal.signal(signal.SIGTERM, _terminate)  # stop the workers and redis-server on the way out
    variants = [parse_variant(v.strip()) for v in args.variants.split(",") if v.strip()]
    print(f"start: {load()}", flush=True)
    results: list[dict[str, Any]] = []
    floors: dict[str, dict[str, float]] = {}
    keep = bool(os.environ.get("BENCH_KEEP"))
    with contextlib.ExitStack() as stack:
        if keep:
            workdir = Path(tempfile.mkdtemp(prefix="bench-queue-"))
            print(f"keeping {workdir}")
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-queue-")))
        with redis_server(workdir) as url:
            if any(v.transport == "redis" for v in variants):
                floors["redis LPUSH->BRPOP"] = redis_floor(url + "/15", args.jobs)
            floors["file rename->poll 1ms"] = fs_floor(workdir, args.jobs, 0.001)
            if any(v.transport == "embedded" for v in variants):
                floors["file rename->poll 50ms"] = fs_floor(workdir, args.jobs, 0.05)
            for db, variant in enumerate(variants):
                began = time.monotonic()
                r = run_variant(variant, args.jobs, f"{url}/{db}", workdir)
                r["load"] = load()
                results.append(r)
                s = r["sequential"]
                print(f"{variant.name}: hop1 median {s['hop1_ms']['median']:.2f} ms, hop2 median "
                      f"{s['hop2_ms']['median']:.2f} ms, lost {s['lost']}+{r['burst']['lost']}, "
                      f"{time.monotonic() - began:.0f} s, {r['load']}", flush=True)
    print_report(results, floors, args.jobs)
    if args.json:
        args.json.write_text(json.dumps({"floors": floors, "results": results}, indent=2), encoding="utf-8")
    lost = sum(r[p]["lost"] for r in results for p in ("sequential", "burst"))
    if lost:
        print(f"error: {lost} job(s) lost (no export start recorded)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
