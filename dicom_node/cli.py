"""``dicom-node``: the command line of the DICOM AI node (serve, config, jobs, worker, echo, render, demo)."""

from __future__ import annotations

import datetime as dt
import json
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dicom_node.config import ConfigError, Settings, load_settings
from dicom_node.jobs.schema import JobState, StudyState, WorkerRecord
from dicom_node.jobs.store import JobStore, StoreUnavailable
from dicom_node.logs import configure_logging
from dicom_node.permissions import restrict_umask
from dicom_node.tls import TLSConfigError, server_context
from dicom_node.work.queues import INFERENCE_QUEUE, QUEUES
from dicom_node.work.worker_status import HEARTBEAT_SECONDS

app = typer.Typer(help="PACS-integrated DICOM AI node.", no_args_is_help=True, add_completion=False)
config_app = typer.Typer(help="Check and show the configuration.", no_args_is_help=True)
jobs_app = typer.Typer(help="List, inspect, retry and cancel jobs.", no_args_is_help=True)
model_app = typer.Typer(help="Export the model for the onnxruntime and tensorrt backends, and check it.",
                        no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(jobs_app, name="jobs")
app.add_typer(model_app, name="model")

out = Console()
err = Console(stderr=True, soft_wrap=True)  # an error stays one line in a log, however long

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML configuration file (default: the embedded defaults)."),
]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None


def _store(settings: Settings) -> JobStore:
    try:
        return JobStore(settings.store_url)
    except StoreUnavailable as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None


def _retention(settings: Settings) -> str:
    keep = settings.retention.keep_days
    return "off (study files are kept)" if keep is None else f"study files removed {keep:g} day(s) after their last job"


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
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None
    try:
        node.start()
    except TLSConfigError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    except OSError as exc:
        err.print(f"[red]error:[/red] cannot listen on {settings.node.bind}:{settings.node.port}: {exc.strerror}")
        raise typer.Exit(1) from None

    def _stop(signum: int, _frame: object) -> None:
        node.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    out.print(
        f"DICOM AI node {settings.node.ae_title} listening on {settings.node.bind}:{node.port}; "
        f"data in {settings.node.data_dir}. Ctrl-C stops."
    )
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

    from dicom_node.work.celery_app import make_celery
    from dicom_node.work.steps import WorkerContext
    from dicom_node.work.worker_status import Heartbeat, WorkerMetrics, serve_worker_metrics

    settings = _settings(config)
    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in wanted if q not in QUEUES]
    if not wanted or unknown:
        err.print(f"[red]error:[/red] --queues takes {' and/or '.join(QUEUES)}, got {queues!r}")
        raise typer.Exit(2)
    if concurrency is not None and concurrency < 1:
        err.print(f"[red]error:[/red] --concurrency must be at least 1, got {concurrency}")
        raise typer.Exit(2)
    if device is not None:
        try:
            settings.model = settings.model.model_copy(update={"device": device})
            settings.model.__class__.model_validate(settings.model.model_dump())
        except ValueError as exc:
            err.print(f"[red]error:[/red] --device: {exc}")
            raise typer.Exit(2) from None
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
            err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(2) from None
        ctx.engine_factory = lambda: Engine.load(model, model.device)
        try:
            ctx.load_engine()  # once per worker, before it takes any job
        except InferenceError as exc:
            err.print(f"[red]error:[/red] the model could not be loaded: {escape(str(exc))}", highlight=False)
            raise typer.Exit(1) from None
        metrics = WorkerMetrics(model.device)
        ctx.metrics = metrics
        engine = ctx.engine
        engine.start_batching(on_batch=lambda report: metrics.observe_batch(report, engine.backend.last_stats))
        if settings.queue.worker_metrics_port:
            port = serve_worker_metrics(metrics, settings.queue.worker_metrics_port)
            metrics_url = f"http://{_hostname()}:{port}/metrics" if port else ""
        # Threads, not processes: the studies in flight share the one loaded model and its batches.
        pool, threads = "threads", concurrency or settings.queue.inference_concurrency
    else:
        pool, threads = "prefork", concurrency or 1
    app_ = make_celery(settings, ctx)
    heartbeat = Heartbeat(lambda: ctx.store, ",".join(wanted), ctx._engine, ctx.activity, metrics_url).start()
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
        heartbeat.stop()
        if ctx.engine_factory is not None and ctx._engine is not None and ctx._engine.batcher is not None:
            ctx._engine.batcher.close()


def _hostname() -> str:
    import socket

    return socket.gethostname()


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
    destination: Annotated[str, typer.Argument(help="Destination name from the configuration's destinations.")],
    config: ConfigOption = None,
) -> None:
    """C-ECHO a configured destination: success and round trip, or the exact failure."""
    from dicom_node.export.scu import echo as c_echo

    settings = _settings(config)
    by_name = {d.name: d for d in settings.destinations}
    if destination not in by_name:
        err.print(f"[red]error:[/red] no destination {destination!r}; configured: {sorted(by_name) or 'none'}")
        raise typer.Exit(2)
    result = c_echo(by_name[destination], settings.node.ae_title)
    (out if result.ok else err).print(str(result), highlight=False)
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def render(file: Annotated[Path, typer.Argument(help="A DICOM SR file (for example from the outbox).")]) -> None:
    """Print a structured report as readable text: findings, boxes, narrative."""
    from sr_writer.render import render_sr

    try:
        text = render_sr(file)
    except (OSError, ValueError, AttributeError) as exc:
        err.print(f"[red]error:[/red] cannot render {file}: {exc}")
        raise typer.Exit(1) from None
    out.print(text, highlight=False, markup=False)


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Validate a configuration file; prints what is wrong (key, value, rule) or a summary, and warnings."""
    from sqlalchemy.engine import make_url

    settings = _settings(config)
    try:
        tls = server_context(settings.node)
    except TLSConfigError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
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
        f"  {len(settings.destinations)} destination(s), {len(settings.rules)} rule(s)",
        highlight=False,
    )
    from dicom_node.jobs.rules import risky_patterns

    for line in risky_patterns(settings.rules):
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
    _print_workers(store.live_workers(3 * HEARTBEAT_SECONDS))


def _print_workers(workers: list[WorkerRecord]) -> None:
    """The live workers: host:pid, queues, device, model, what each is doing, where its metrics are."""
    import time

    if not workers:
        out.print(f"no live worker (none reported in the last {3 * HEARTBEAT_SECONDS:.0f} s): start one with "
                  "`dicom-node worker`", highlight=False)
        return
    table = Table(title=f"{len(workers)} live worker(s)")
    for column in ("worker", "queues", "device", "model", "doing", "metrics", "seen"):
        table.add_column(column)
    now = time.time()
    for w in workers:
        table.add_row(w.worker_id, w.queues, w.device or "-", w.model or "-", w.activity, w.metrics_url or "-",
                      f"{now - w.last_seen:.0f} s ago")
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
        err.print(f"[red]error:[/red] no job {job_id}")
        raise typer.Exit(1)
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


def _move_job(store: JobStore, job_id: int, to: JobState, expect: list[JobState], verb: str, done: str) -> None:
    if not store.transition(job_id, to, expect=expect, detail=f"{done} by administrator"):
        job = store.job(job_id)
        allowed = ", ".join(s.value for s in expect)
        why = "no such job" if job is None else f"it is {job.state.value}; only {allowed} jobs can be"
        err.print(f"[red]error:[/red] cannot {verb} job {job_id}: {why}")
        raise typer.Exit(1)


@jobs_app.command("retry")
def jobs_retry(job_id: Annotated[int, typer.Argument()], config: ConfigOption = None) -> None:
    """Run a failed or cancelled job again (same run, so the same result UIDs: the PACS overwrites)."""
    store = _store(_settings(config))
    job = store.job(job_id)
    if job is not None and store.study_state(job.study_uid) is StudyState.PURGED:
        err.print(
            f"[red]error:[/red] cannot retry job {job_id}: its study's files were removed after "
            f"retention.keep_days; send the study again from the PACS (it then runs as a new run)"
        )
        raise typer.Exit(1)
    _move_job(store, job_id, JobState.QUEUED, [JobState.FAILED, JobState.CANCELLED], "retry", "retried")
    out.print(f"job {job_id} queued again; the node picks it up within its reconcile period")


@jobs_app.command("cancel")
def jobs_cancel(job_id: Annotated[int, typer.Argument()], config: ConfigOption = None) -> None:
    """Cancel a job that has not been delivered yet."""
    unfinished = [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]
    _move_job(_store(_settings(config)), job_id, JobState.CANCELLED, unfinished, "cancel", "cancelled")
    out.print(f"job {job_id} cancelled")


@model_app.command("export")
def model_export(
    config: ConfigOption = None,
    dtype: Annotated[str, typer.Option(help="Graph precision: float32 (CPU, exact) or float16 (GPU).")] = "float32",
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
            err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(1) from None
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
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None
    for line in lines:
        out.print(line, highlight=False, markup=False)
    if not agreed:
        err.print("[red]error:[/red] the backends do not give the same tokens for the same input")
        raise typer.Exit(1)


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
