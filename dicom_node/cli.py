"""``dicom-node``: the command line of the DICOM AI node (serve, config, jobs, worker, echo, render, demo)."""

from __future__ import annotations

import datetime as dt
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dicom_node.config import ConfigError, Settings, load_settings
from dicom_node.jobs.schema import JobState
from dicom_node.jobs.store import JobStore, StoreUnavailable
from dicom_node.logs import configure_logging
from dicom_node.permissions import restrict_umask
from dicom_node.tls import TLSConfigError, server_context
from dicom_node.work.heartbeat import WorkerInfo, live_workers
from dicom_node.work.queues import INFERENCE_QUEUE, QUEUES

if TYPE_CHECKING:
    from dicom_node.console.users import UserStore
    from dicom_node.work.heartbeat import Heartbeat
    from dicom_node.work.steps import WorkerContext

app = typer.Typer(help="PACS-integrated DICOM AI node.", no_args_is_help=True, add_completion=False)
config_app = typer.Typer(help="Check and show the configuration.", no_args_is_help=True)
jobs_app = typer.Typer(help="List, inspect, retry and cancel jobs.", no_args_is_help=True)
model_app = typer.Typer(help="Export the model for the onnxruntime and tensorrt backends, and check it.",
                        no_args_is_help=True)
app.add_typer(config_app, name="config")
users_app = typer.Typer(help="Users of the web console: add, remove, passwords, API tokens.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(model_app, name="model")
app.add_typer(users_app, name="users")

out = Console()
err = Console(stderr=True, soft_wrap=True)  # an error stays one line in a log, however long


def _fail(message: str, code: int = 1) -> NoReturn:
    """``error: <message>`` on stderr, the text as it is (square brackets are not markup), then exit ``code``."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML configuration file (default: the embedded defaults)."),
]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        _fail(str(exc), 2)


def _store(settings: Settings) -> JobStore:
    try:
        return JobStore(settings.store_url)
    except StoreUnavailable as exc:
        _fail(str(exc))


def _retention(settings: Settings) -> str:
    keep = settings.retention.keep_days
    return "off (study files are kept)" if keep is None else f"study files removed {keep:g} day(s) after their last job"


def _console(settings: Settings) -> str:
    node = settings.node
    if not node.http_port:
        return "off (node.http_port: 0)"
    scheme = "https" if node.http_tls else "http"
    return f"{scheme}://{node.http_bind}:{node.http_port}/, {len(settings.notifications.webhooks)} webhook(s)"


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the node: receive studies (C-STORE), assemble them, queue them, run them, send results back."""
    from dicom_node.node import Node

    settings = _settings(config)
    configure_logging(settings.logging.level, settings.logging.json_format, settings.node.data_dir)
    try:
        node = Node(settings, config_path=config.resolve() if config else None)
    except StoreUnavailable as exc:
        _fail(str(exc))
    from dicom_node.console.server import ConsoleStartError

    try:
        node.start()
    except TLSConfigError as exc:
        _fail(str(exc), 2)
    except ConsoleStartError as exc:
        node.stop()
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot listen on {settings.node.bind}:{settings.node.port}: {exc.strerror}")

    def _stop(signum: int, _frame: object) -> None:
        node.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    out.print(
        f"DICOM AI node {settings.node.ae_title} listening on {settings.node.bind}:{node.port}; "
        f"data in {settings.node.data_dir}. Ctrl-C stops."
    )
    if node.console is not None:
        out.print(f"Web console and API on {node.console.url}/ (users: dicom-node users add NAME --role admin)")
    node.wait()


@app.command()
def worker(
    config: ConfigOption = None,
    queues: Annotated[str, typer.Option(help="Queues: inference, export, or inference,export.")] = INFERENCE_QUEUE,
    device: Annotated[str | None, typer.Option(help="Model device (overrides model.device): cpu, cuda:N.")] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(help="Export: worker processes (default 1). Inference: studies held at once, whose images "
                          "share the model's batches (default queue.inference_concurrency); run one inference "
                          "worker per GPU."),
    ] = None,
) -> None:
    """Run a Celery worker. An inference worker loads its model once, warms it up, then consumes: it holds several
    studies at once (threads) and one batcher runs their images through the model together."""
    import os
    import socket

    from dicom_node.work.celery_app import make_celery
    from dicom_node.work.steps import WorkerContext
    from dicom_node.work.watchdog import HungJobWatchdog
    from dicom_node.work.worker_metrics import WorkerMetrics, serve_worker_metrics

    settings = _settings(config)
    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in wanted if q not in QUEUES]
    if not wanted or unknown:
        _fail(f"--queues takes {' and/or '.join(QUEUES)}, got {queues!r}", 2)
    if concurrency is not None and concurrency < 1:
        _fail(f"--concurrency must be at least 1, got {concurrency}", 2)
    if device is not None:
        try:
            settings.model = settings.model.model_copy(update={"device": device})
            settings.model.__class__.model_validate(settings.model.model_dump())
        except ValueError as exc:
            _fail(f"--device: {exc}", 2)
    configure_logging(settings.logging.level, settings.logging.json_format, settings.node.data_dir)
    ctx = WorkerContext(settings)
    metrics_url = ""
    if INFERENCE_QUEUE in wanted:
        from inference.engine import Engine
        from inference.errors import InferenceError, ModelLoadError

        model = settings.model
        try:
            Engine.preflight(model)  # a missing runtime (TensorRT, CUDA) stops here, before anything loads
        except ModelLoadError as exc:
            _fail(str(exc), 2)
        ctx.engine_factory = lambda: Engine.load(model, model.device)
        try:
            ctx.load_engine()  # once per worker, before it takes any job
        except InferenceError as exc:
            _fail(f"the model could not be loaded: {exc}")
        metrics = WorkerMetrics(model.device)
        ctx.metrics = metrics
        engine = ctx.engine
        engine.start_batching(on_batch=lambda report: metrics.observe_batch(report, engine.backend.last_stats))
        if settings.queue.worker_metrics_port:
            port = serve_worker_metrics(metrics, settings.queue.worker_metrics_port)
            metrics_url = f"http://{socket.gethostname()}:{port}/metrics" if port else ""
        # Threads, not processes: the studies in flight share the one loaded model and its batches. The threads
        # pool enforces no time limit, so a job past queue.inference_time_limit restarts the worker (work.watchdog).
        pool, threads = "threads", concurrency or settings.queue.inference_concurrency
        HungJobWatchdog(lambda: ctx.store, ctx.in_flight, settings.queue.inference_time_limit, ctx.study_of).start()
    else:
        pool, threads = "prefork", concurrency or 1
    app_ = make_celery(settings, ctx)
    heartbeat = _start_heartbeat(settings, ctx, wanted, metrics_url)
    argv = [
        "worker", "--queues", ",".join(wanted), "--concurrency", str(threads), "--pool", pool,
        "--hostname", f"{'-'.join(wanted)}-{os.getpid()}@%h", "--loglevel", settings.logging.level,
        "--without-gossip", "--without-mingle",
    ]
    try:
        app_.worker_main(argv)
    except SystemExit:
        pass
    finally:
        for beat in heartbeat:
            beat.stop()
        loaded = ctx.loaded_engine
        if loaded is not None and loaded.batcher is not None:
            loaded.batcher.close()


def _start_heartbeat(settings: Settings, ctx: WorkerContext, queues: list[str], metrics_url: str) -> list[Heartbeat]:
    """Record this worker in the job store once it consumes, with what it is doing, until it stops (see
    work.heartbeat); the list holds the heartbeat once it started, for the caller to stop."""
    import os
    import socket

    from celery.signals import worker_ready

    from dicom_node.work.heartbeat import Heartbeat

    running: list[Heartbeat] = []
    engine = ctx.loaded_engine
    device = model = ""
    if engine is not None:
        identity, params = engine.identity, engine.identity.parameters
        model = f"{identity.family} {identity.name} (version {identity.version}) on {params.get('backend', '')}"
        device = f"{params.get('device', '')} {params.get('dtype', '')}".strip()

    @worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        running.append(
            Heartbeat(
                lambda: JobStore(settings.store_url), f"{'-'.join(queues)}-{os.getpid()}@{socket.gethostname()}",
                queues, device=device, model=model, period=settings.queue.worker_heartbeat_seconds,
                activity=ctx.activity, metrics_url=metrics_url,
            ).start()
        )

    return running


@app.command()
def demo(
    config: ConfigOption = None,
    keep_running: Annotated[bool, typer.Option(help="Keep the node and the PACS running afterwards.")] = False,
) -> None:
    """Start the node with the demo model, send it a real study through a PACS, and show the results."""
    from dicom_node.devtools.demo import run_demo

    settings = _settings(config)
    configure_logging("WARNING", False, None)
    raise typer.Exit(run_demo(settings, out, keep_running=keep_running))


@app.command()
def echo(
    destination: Annotated[
        str | None, typer.Argument(help="Destination name from the configuration's destinations.")
    ] = None,
    config: ConfigOption = None,
    self_check: Annotated[
        bool,
        typer.Option(
            "--self",
            help="C-ECHO this node's own Storage SCP (node.ae_title on node.port), as a container health check does.",
        ),
    ] = False,
) -> None:
    """Check that a configured destination answers: C-ECHO (DIMSE), a QIDO-RS search (DICOMweb), or a C-ECHO of each
    known AE (kind: sender); or the node itself (--self, the container health check). Prints the round trip, or the
    exact failure."""
    from dicom_node.config import DestinationSettings
    from dicom_node.export.destinations import echo as check
    from dicom_node.export.scu import echo as c_echo

    settings = _settings(config)
    if self_check == (destination is not None):
        err.print("[red]error:[/red] give a destination name or --self, not both or neither")
        raise typer.Exit(2)
    if destination is None:
        node = settings.node
        if node.tls_cert_file is not None:
            err.print("[red]error:[/red] --self checks a plain TCP intake; this node's intake is DICOM TLS")
            raise typer.Exit(2)
        host = "127.0.0.1" if node.bind in ("0.0.0.0", "::", "") else node.bind
        target = DestinationSettings(name="self", ae_title=node.ae_title, host=host, port=node.port, timeout=5)
        results = [c_echo(target, node.ae_title)]
    else:
        chosen = settings.destination(destination)
        if chosen is None:
            names = sorted(d.name for d in settings.destinations)
            _fail(f"no destination {destination!r}; configured: {names or 'none'}", 2)
        results = check(chosen, settings)
    for result in results:
        (out if result.ok else err).print(str(result), highlight=False, markup=False)
    if not all(r.ok for r in results):
        raise typer.Exit(1)


@app.command()
def render(file: Annotated[Path, typer.Argument(help="A DICOM SR file (for example from the outbox).")]) -> None:
    """Print a structured report as readable text: findings, boxes, narrative."""
    from sr_writer.render import render_sr

    try:
        text = render_sr(file)
    except (OSError, ValueError, AttributeError) as exc:
        _fail(f"cannot render {file}: {exc}")
    out.print(text, highlight=False, markup=False)


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Validate a configuration file; prints what is wrong (key, value, rule) or a summary, and warnings."""
    from sqlalchemy.engine import make_url

    settings = _settings(config)
    try:
        tls = server_context(settings.node)
    except TLSConfigError as exc:
        _fail(str(exc), 2)
    intake = "plain TCP" if tls is None else "DICOM TLS"
    if tls is not None and settings.node.tls_ca_file is not None:
        intake += f", peer certificates signed by {settings.node.tls_ca_file}"
    out.print(f"[green]ok[/green]: {config or 'embedded defaults'}")
    out.print(
        f"  node {settings.node.ae_title} on {settings.node.bind}:{settings.node.port} ({escape(intake)}), data in "
        f"{settings.node.data_dir}\n  broker {settings.queue.broker_url}; model {settings.model.family}"
        f" ({settings.model.path or 'packaged'}) on {settings.model.device}\n"
        f"  job store {make_url(settings.store_url).render_as_string(hide_password=True)}; "
        f"retention: {_retention(settings)}\n"
        f"  {len(settings.destinations)} destination(s), {len(settings.known_aes)} known AE(s), "
        f"{len(settings.rules)} rule(s)\n"
        f"  console: {_console(settings)}",
        highlight=False,
    )
    from dicom_node.config import DicomWebDestinationSettings
    from dicom_node.jobs.rules import risky_patterns

    for line in risky_patterns(settings.rules):
        out.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False)
    for d in settings.destinations:
        for line in d.warnings() if isinstance(d, DicomWebDestinationSettings) else []:
            out.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False)


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the effective configuration (file, defaults and environment merged) as JSON."""
    settings = _settings(config)
    out.print_json(settings.model_dump_json())


@app.command()
def status(config: ConfigOption = None) -> None:
    """Health at a glance: jobs per state, studies still receiving, spool space, oldest unfinished job, the queue by
    priority, and each live worker (host, device, model, what it is doing)."""
    import shutil
    import time

    settings = _settings(config)
    store = _store(settings)
    counts = store.counts()
    table = Table("what", "count")
    for key in sorted(counts):
        table.add_row(key.replace("_", " "), str(counts[key]))
    out.print(table)
    spool = settings.node.data_dir / "spool"
    if spool.exists():
        free = shutil.disk_usage(spool).free / 2**30
        out.print(f"spool {spool}: {free:.1f} GiB free (floor {settings.node.min_free_disk_mb} MB)")
    out.print(f"retention: {_retention(settings)}", highlight=False)
    pending = store.unfinished_jobs()
    if pending:
        oldest = min(pending, key=lambda j: j.created_at)
        out.print(
            f"oldest unfinished job: {oldest.id} ({oldest.state.value}) for {time.time() - oldest.created_at:.0f} s",
            highlight=False,
        )
    failed = counts.get("jobs_failed", 0)
    if failed:
        out.print(f"[red]{failed} failed job(s)[/red]: dicom-node jobs list --state failed")
    queued = store.queued_by_priority()
    out.print(f"waiting for inference: {queued['urgent']} urgent, {queued['routine']} routine", highlight=False)
    if settings.notifications.webhooks:
        from dicom_node.console.webhooks import Notifier

        waiting = Notifier.waiting(store)
        out.print("webhook notifications waiting: " + ", ".join(
            f"{hook.name} {waiting.get(hook.name, 0)}" for hook in settings.notifications.webhooks), highlight=False)
    _print_workers(live_workers(store, settings.queue.worker_heartbeat_seconds), settings)


def _print_workers(workers: list[WorkerInfo], settings: Settings) -> None:
    """The live workers: name, queues, device, model, what each is doing, where its metrics are."""
    import time

    if not workers:
        out.print(f"no live worker (none reported in the last {3 * settings.queue.worker_heartbeat_seconds:.0f} s): "
                  "start one with `dicom-node worker`", highlight=False)
        return
    table = Table(title=f"{len(workers)} live worker(s)")
    for column in ("worker", "queues", "device", "model", "doing", "metrics", "seen"):
        table.add_column(column)
    now = time.time()
    for w in workers:
        table.add_row(w.name, ",".join(w.queues), w.device or "-", w.model or "-", w.activity or "-",
                      w.metrics_url or "-", f"{now - w.seen_at:.0f} s ago")
    out.print(table)


@jobs_app.command("list")
def jobs_list(
    config: ConfigOption = None,
    state: Annotated[list[JobState] | None, typer.Option(help="Only jobs in this state (repeatable).")] = None,
    limit: Annotated[int, typer.Option(help="Newest N jobs.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List jobs, newest first."""
    settings = _settings(config)
    store = _store(settings)
    found = store.list_jobs([s.value for s in state or []], limit=limit)
    if as_json:
        print(json.dumps([j.as_dict() for j in found], indent=2))
        return
    table = Table("id", "state", "priority", "study", "run", "rule", "profile", "attempts", "updated", "error")
    colours = {"failed": "red", "delivered": "green", "skipped": "yellow"}
    for j in found:
        colour = colours.get(j.state.value, "white")
        table.add_row(
            str(j.id),
            f"[{colour}]{j.state.value}[/{colour}]",
            "[bold red]urgent[/bold red]" if j.priority == "urgent" else "routine",
            j.study_uid[-24:],
            str(j.run),
            j.rule or "-",
            j.profile or "-",
            str(j.attempts),
            _when(j.updated_at),
            (j.error or "")[:60],
        )
    out.print(table)


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[int, typer.Argument(help="Job id (from `jobs list`).")],
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One job: its state, reason, history and result objects."""
    settings = _settings(config)
    store = _store(settings)
    job = store.job(job_id)
    if job is None:
        _fail(f"no job {job_id}")
    history = store.job_events(job_id)
    objects = store.job_results(job_id)
    if as_json:
        print(json.dumps({"job": job.as_dict(), "events": history, "results": objects}, indent=2, default=str))
        return
    out.print(f"[bold]job {job.id}[/bold]: {job.state.value}", highlight=False)
    out.print(f"  study {job.study_uid} run {job.run}", highlight=False)
    out.print(f"  rule {job.rule or '-'}; profile {job.profile or '-'} ({job.language or '-'}); "
              f"priority {job.priority}", highlight=False)
    out.print(f"  outputs {job.outputs}; destinations {job.destinations}", highlight=False)
    out.print(f"  attempts {job.attempts}; redeliveries {job.redeliveries}", highlight=False)
    if job.owner:
        doing = "exporting" if job.state is JobState.SUCCEEDED else "running"
        out.print(f"  {doing} on {job.owner}", highlight=False)
    if job.error:
        out.print(f"  [red]reason:[/red] {job.error}", highlight=False)
    out.print("  history:")
    for e in history:
        out.print(f"    {_when(e['at'])}  {e['kind']:<14} {e['detail'] or ''}", highlight=False)
    if objects:
        out.print("  results:")
        for r in objects:
            out.print(f"    {r['kind']:<5} {r['sop_instance_uid']}  delivered to {r['delivered_to']}", highlight=False)


@jobs_app.command("retry")
def jobs_retry(job_id: Annotated[int, typer.Argument()], config: ConfigOption = None) -> None:
    """Run a failed or cancelled job again (same run, so the same result UIDs: the PACS overwrites)."""
    from dicom_node.jobs.actions import ActionRefused, retry_job

    try:
        retry_job(_store(_settings(config)), job_id)
    except ActionRefused as exc:
        _fail(str(exc))
    out.print(f"job {job_id} queued again; the node picks it up within its reconcile period")


@jobs_app.command("cancel")
def jobs_cancel(job_id: Annotated[int, typer.Argument()], config: ConfigOption = None) -> None:
    """Cancel a job that has not been delivered yet."""
    from dicom_node.jobs.actions import ActionRefused, cancel_job

    try:
        cancel_job(_store(_settings(config)), job_id)
    except ActionRefused as exc:
        _fail(str(exc))
    out.print(f"job {job_id} cancelled")


@model_app.command("export")
def model_export(
    config: ConfigOption = None,
    dtype: Annotated[str, typer.Option(
        help="Graph precision: float32 (token for token equal to transformers) or float16 (half the memory, for "
        "GPUs; answers close to float32's)."
    )] = "float32",
    force: Annotated[bool, typer.Option(help="Export again even when a valid export exists.")] = False,
) -> None:
    """Export the configured checkpoint to ONNX graphs (once per checkpoint version; minutes for a real one)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from inference.errors import ModelLoadError
    from inference.export.exporter import export_checkpoint

    settings = _settings(config)
    configure_logging("WARNING", False, None)
    model = settings.model
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=err, transient=False,
    ) as progress:
        task = progress.add_task(f"exporting {model.family}", total=1)

        def report(stage: str, done: int, total: int) -> None:
            progress.update(task, description=stage, completed=done, total=total)

        try:
            folder, written = export_checkpoint(model, dtype=dtype, force=force, progress=report)
        except ModelLoadError as exc:
            progress.stop()
            _fail(str(exc))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    verb = "exported to" if written else "a valid export already exists in"
    out.print(f"{model.family} checkpoint {verb} {folder} ({size / 1e6:.1f} MB); "
              f"run it with model.backend: onnxruntime or tensorrt", highlight=False)


@model_app.command("check")
def model_check(
    config: ConfigOption = None,
    compare: Annotated[bool, typer.Option(help="Also run transformers on the same input and compare the tokens.")]
    = False,
) -> None:
    """Check that the configured model loads on its backend (export present and current) and generates."""
    from inference.errors import InferenceError
    from inference.model_check import check_model

    settings = _settings(config)
    configure_logging("WARNING", False, None)
    try:
        lines, agreed = check_model(settings.model, compare=compare)
    except InferenceError as exc:
        _fail(str(exc))
    for line in lines:
        out.print(line, highlight=False, markup=False)
    if not agreed:
        err.print("[red]error:[/red] the backends do not give the same tokens for the same input")
        raise typer.Exit(1)

def _password(given: str | None, from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    if given is not None:
        return given
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


def _users(config: Path | None) -> UserStore:
    from dicom_node.console.users import UserStore

    settings = _settings(config)
    return UserStore(_store(settings), settings.console.max_failed_logins, settings.console.lockout_minutes)


PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from the first line of standard input.")
]


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="User name.")],
    role: Annotated[str, typer.Option(help="viewer (reads) or admin (also retries, cancels, echoes).")] = "viewer",
    password_stdin: PasswordStdin = False,
    config: ConfigOption = None,
) -> None:
    """Add a console user (asks for the password unless --password-stdin)."""
    from dicom_node.console.users import Role, UserError

    if role not in [r.value for r in Role]:
        _fail(f"--role takes viewer or admin, got {role!r}", 2)
    accounts = _users(config)
    try:
        accounts.add(name, _password(None, password_stdin), Role(role))
    except UserError as exc:
        _fail(str(exc))
    out.print(f"user {name} added ({role})", highlight=False)


@users_app.command("remove")
def users_remove(name: Annotated[str, typer.Argument()], config: ConfigOption = None) -> None:
    """Remove a console user; their sessions and API token stop working at once."""
    from dicom_node.console.users import UserError

    try:
        _users(config).remove(name)
    except UserError as exc:
        _fail(str(exc))
    out.print(f"user {name} removed", highlight=False)


@users_app.command("passwd")
def users_passwd(
    name: Annotated[str, typer.Argument()],
    password_stdin: PasswordStdin = False,
    role: Annotated[str | None, typer.Option(help="Change the role too: viewer or admin.")] = None,
    config: ConfigOption = None,
) -> None:
    """Set a user's password; this also unlocks an account locked after wrong passwords."""
    from dicom_node.console.users import Role, UserError

    if role is not None and role not in [r.value for r in Role]:
        _fail(f"--role takes viewer or admin, got {role!r}", 2)
    accounts = _users(config)
    try:
        if accounts.get(name) is None:
            raise UserError(f"no user {name!r}")
        accounts.set_password(name, _password(None, password_stdin))
        if role is not None:
            accounts.set_role(name, Role(role))
    except UserError as exc:
        _fail(str(exc))
    out.print(f"password of {name} changed; the account is unlocked", highlight=False)


@users_app.command("token")
def users_token(name: Annotated[str, typer.Argument()], config: ConfigOption = None) -> None:
    """Make a new API token for a user (the previous one stops working) and print it, once."""
    from dicom_node.console.users import UserError

    try:
        token = _users(config).new_token(name)
    except UserError as exc:
        _fail(str(exc))
    print(token)


@users_app.command("list")
def users_list(config: ConfigOption = None) -> None:
    """The console users, their role and whether they are locked."""
    table = Table("user", "role", "locked", "API token")
    for u in _users(config).all():
        table.add_row(u.name, u.role.value, "yes" if u.locked else "", "yes" if u.has_token else "")
    out.print(table)


def main() -> None:
    # The process boundary of every command (serve, worker, demo, and the workers serve starts, which inherit it):
    # whatever this process creates is not for other local users (see dicom_node.permissions).
    restrict_umask()
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
