"""``dicom-node demo``: the whole loop on one machine, offline, in about a minute.

It starts the node on embedded defaults with the built-in demonstration model, plays a PACS (Orthanc when it is
installed, with a routing rule that sends each new study to the node; otherwise a small built-in receiver), sends a
real study from the PyPI package ``pydicom-data`` into it, waits for the results, and shows them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pydicom
import yaml
from pydicom.data import get_testdata_file
from pynetdicom import AE
from rich.console import Console
from rich.table import Table

from dicom_node.config import Settings, load_settings
from dicom_node.devtools.receiver import Receiver, free_port
from dicom_node.jobs.schema import JobState
from dicom_node.jobs.store import JobStore
from dicom_node.logs import configure_logging

__all__ = ["DEMO_STUDY", "run_demo"]

#: A real chest radiograph (CR, MONOCHROME1) from pydicom-data.
DEMO_STUDY = "RG1_UNCI.dcm"
ORTHANC_BINARY = Path("/usr/sbin/Orthanc")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _demo_settings(base: Settings, data_dir: Path, pacs: dict[str, Any]) -> tuple[Settings, Path]:
    """The node's settings for the demo, written to a file so that the node's workers read the same ones."""
    port = base.node.port if _port_free(base.node.port) else free_port()
    data = base.model_dump(mode="json", exclude={"store"})
    data["node"].update({"port": port, "bind": "127.0.0.1", "data_dir": str(data_dir)})
    # The web console on 127.0.0.1 (8080 unless configured, or taken): the demo's jobs can be looked at there.
    http_port = base.node.http_port or 8080
    data["node"]["http_port"] = http_port if _port_free(http_port) else free_port()
    data["node"]["http_bind"] = "127.0.0.1"
    # Secrets dump masked: the file gets their values (it is the node's own, under its private data_dir).
    if base.console.secret_key is not None:
        data["console"]["secret_key"] = base.console.secret_key.get_secret_value()
    for hook, given in zip(data["notifications"]["webhooks"], base.notifications.webhooks, strict=True):
        hook["url"] = given.url.get_secret_value()
    data["study"]["stable_seconds"] = 3
    data["queue"].update({"start_workers": True, "reconcile_seconds": 5})
    data["destinations"] = [pacs]
    for rule in data["rules"]:
        rule["destinations"] = []
        rule["outputs"] = sorted(set(rule["outputs"]) | {"sr", "gsps"})
    path = data_dir / "node.yaml"
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return load_settings(path), path


def _send(port: int, ae_title: str, path: Path) -> None:
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="DEMOSCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        raise RuntimeError(f"the node at 127.0.0.1:{port} refused the association")
    status = assoc.send_c_store(ds)
    assoc.release()
    if not status or status.Status != 0:
        raise RuntimeError(f"the node answered C-STORE with status {status.get('Status') if status else None}")


def run_demo(base: Settings, console: Console, keep_running: bool = False, timeout: float = 600) -> int:
    """Run the demo; returns the process exit code (0 when results came back)."""
    from dicom_node.node import Node

    source = get_testdata_file(DEMO_STUDY, download=False)
    if source is None:
        console.print("[red]error:[/red] the demo study needs the PyPI package pydicom-data (pip install pydicom-data)")
        return 1
    data_dir = (base.node.data_dir / "demo").resolve()
    if data_dir.exists():
        shutil.rmtree(data_dir)
    configure_logging("WARNING", False, data_dir)  # the audit trail goes to data_dir/audit.log
    study_uid = str(pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID)

    orthanc = None
    receiver = None
    if ORTHANC_BINARY.exists():
        from dicom_node.devtools.orthanc import NodeModality, Orthanc

        node_port = base.node.port if _port_free(base.node.port) else free_port()
        base = base.model_copy(update={"node": base.node.model_copy(update={"port": node_port})})
        orthanc = Orthanc(data_dir / "orthanc", node=NodeModality(base.node.ae_title, "127.0.0.1", node_port))
        pacs = {"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
    else:
        (data_dir / "pacs").mkdir(parents=True, exist_ok=True)
        receiver = Receiver(ae_title="DEMOPACS", store_dir=data_dir / "pacs")
        pacs = receiver.destination("pacs")
    settings, config_path = _demo_settings(base, data_dir, pacs)
    console.print(
        f"[bold]DICOM AI node demo[/bold]: model [cyan]{settings.model.family}[/cyan] "
        "(a demonstration model trained on synthetic phantoms, not for clinical use)"
    )
    node = Node(settings, config_path=config_path)
    try:
        if orthanc is not None:
            orthanc.start()
            console.print(f"PACS: Orthanc on DICOM port {orthanc.dicom_port}, REST {orthanc.url}")
        elif receiver is not None:
            receiver.start()
            console.print(f"PACS: built-in receiver {pacs['ae_title']} on port {pacs['port']} (Orthanc not installed)")
        node.start()
        console.print(f"Node {settings.node.ae_title} listening on 127.0.0.1:{node.port}; data in {data_dir}")
        if orthanc is not None:
            orthanc.upload(Path(source))
            console.print(f"Uploaded {DEMO_STUDY} (chest CR) to Orthanc; its routing rule sends the study to the node")
        else:
            _send(node.port, settings.node.ae_title, Path(source))
            console.print(f"Sent {DEMO_STUDY} (chest CR) to the node over C-STORE")
        job = _wait(settings, study_uid, console, timeout)
        if job is None or job.state is not JobState.DELIVERED:
            state = "no job" if job is None else f"{job.state.value}: {job.error or ''}"
            console.print(f"[red]The study did not complete[/red] ({state}). See {data_dir / 'logs'}.")
            return 1
        _show(settings, job.id, console, orthanc, receiver, study_uid)
        if node.console is not None and keep_running:
            console.print(
                f"Web console: {node.console.url}/jobs/{job.id} (add a user first: dicom-node users add admin "
                f"--role admin --config {config_path})"
            )
        elif node.console is not None:
            console.print("With --keep-running the node stays up and its web console shows this job.")
        if keep_running:
            console.print("Running until Ctrl-C: send more studies to the node or the PACS.")
            node.wait()
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        node.stop()
        if orthanc is not None:
            orthanc.stop()
        if receiver is not None:
            receiver.stop()


def _wait(settings: Settings, study_uid: str, console: Console, timeout: float) -> Any:
    store = JobStore(settings.store_url)
    deadline = time.monotonic() + timeout
    last = ""
    job = None
    try:
        with console.status("waiting for the PACS to route the study...") as status:
            while time.monotonic() < deadline:
                jobs = [j for j in store.list_jobs() if j.study_uid == study_uid]
                job = jobs[0] if jobs else None
                now = "receiving" if job is None else job.state.value
                if now != last:
                    console.print(f"  {time.strftime('%H:%M:%S')} study {now}")
                    status.update(f"study {now}...")
                    last = now
                if job is not None and job.state.finished:
                    return job
                time.sleep(0.5)
    finally:
        store.close()
    return job


def _show(settings: Settings, job_id: int, console: Console, orthanc: Any, receiver: Any, study_uid: str) -> None:
    from sr_writer.render import render_sr

    store = JobStore(settings.store_url)
    results = store.job_results(job_id)
    store.close()
    sr = [r for r in results if r["kind"] == "sr"]
    if sr:
        console.rule("The AI report (TID 1500 SR), as a viewer reads it")
        console.print(render_sr(Path(sr[0]["path"])), highlight=False, markup=False)
    table = Table("series", "modality", "instances", title="The study in the PACS now")
    if orthanc is not None:
        study_id = orthanc.find_study(study_uid)
        for series in orthanc.study_series(study_id) if study_id else []:
            tags = series.get("MainDicomTags", {})
            table.add_row(tags.get("SeriesDescription", ""), tags.get("Modality", ""), str(len(series["Instances"])))
        console.print(table)
        console.print(f"Orthanc's REST API: {orthanc.url}/studies/{study_id}")
    elif receiver is not None:
        kinds: dict[str, int] = {}
        for modality in receiver.modalities.values():
            kinds[modality] = kinds.get(modality, 0) + 1
        for modality, count in sorted(kinds.items()):
            table.add_row("AI results", modality, str(count))
        console.print(table)
    console.print(f"Result files: {settings.node.data_dir / 'outbox' / f'job-{job_id}'}")
