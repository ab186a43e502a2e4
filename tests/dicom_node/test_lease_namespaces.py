"""A worker in another PID namespace (a container on the host's network shares the host name) is never judged by
its pid: only its lease tells whether it is gone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from dicom_node.jobs.lease import owner_gone, process_host

CHECK = (
    "import json, os, sys; from dicom_node.jobs.lease import owner_gone, process_host; "
    "print(json.dumps([process_host(), owner_gone(sys.argv[1]), owner_gone(process_host() + ':999999')]))"
)


def test_own_namespace_pids_are_checked() -> None:
    assert owner_gone(f"{process_host()}:{os.getpid()}") is False
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert owner_gone(f"{process_host()}:{int(dead.stdout)}") is True


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_a_process_in_another_pid_namespace_does_not_judge_this_hosts_pids() -> None:
    # Our own pid does not exist inside the new namespace: without the namespace in the host part, the process
    # there would take this live process for a dead one.
    mine = f"{process_host()}:{os.getpid()}"
    run = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", CHECK, mine],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    if run.returncode != 0 and "Operation not permitted" in run.stderr:
        pytest.skip(f"no new PID namespace here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    host, judged_mine, judged_own_dead = json.loads(run.stdout)
    assert host != process_host() and host.startswith(process_host().split("~")[0])
    assert judged_mine is False, "a pid of another namespace is left to its lease"
    assert judged_own_dead is True, "its own namespace's pids are still checked"
