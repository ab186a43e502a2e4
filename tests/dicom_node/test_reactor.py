"""The accepted associations' threads wait for work instead of polling (dicom_node.intake.reactor), on real
associations.

A wake-up the reactor threads miss costs a whole :data:`IDLE_WAIT`. The first tests raise it to two minutes, so
that a missed wake-up shows as a transfer or an association end that does not finish in the minute the test allows
(normally they take a fraction of a second); the last checks that a timer still fires with the real value.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node.intake import reactor
from dicom_node.node import Node
from tests.conftest import make_study

pytestmark = pytest.mark.integration

#: Far beyond what any step here takes when woken, far below what a missed wake-up costs.
_LIMIT = 60.0


@pytest.fixture
def long_idle_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reactor, "IDLE_WAIT", 2 * _LIMIT)


def _accepted(node: Node) -> list[Association]:
    server = node._server
    assert server is not None
    return list(server.active_associations)


def _wait_until(predicate: Callable[[], bool], limit: float = _LIMIT) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > limit:
            raise AssertionError(f"not done within {limit} s: a reactor thread missed its wake-up")
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.usefixtures("long_idle_wait")
def test_a_study_over_one_association_and_its_release_need_no_timeout(
    running_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = running_node()
    files = make_study(tmp_path / "study", 40)
    started = time.monotonic()
    done = subprocess.run(
        ["storescu", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, files)],
        capture_output=True, text=True, timeout=2 * _LIMIT + 60,
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert node.intake.counters.stored == 40
    assert took < _LIMIT, f"40 instances and a release took {took:.1f} s"
    _wait_until(lambda: not _accepted(node))  # the node's side of the association ended too


@pytest.mark.usefixtures("long_idle_wait")
def test_the_accepted_association_is_event_driven_and_ends_at_once_on_a_peer_abort(
    running_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = running_node()
    [path] = make_study(tmp_path / "study", 1)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    assert assoc.is_established
    [accepted] = _accepted(node)
    assert isinstance(accepted, reactor._EventDrivenAssociation)
    assert isinstance(accepted.dul, reactor._EventDrivenDUL)
    assert assoc.send_c_echo().Status == 0x0000
    assert assoc.send_c_store(path).Status == 0x0000
    assoc.abort()
    _wait_until(lambda: not _accepted(node) and not accepted.dul.is_alive())
    assert accepted.is_aborted
    # The wake-up channel of the ended association is closed (no descriptor left behind per association).
    assert accepted.dul._wake_reader.fileno() == -1 and accepted.dul._wake_writer.fileno() == -1


@pytest.mark.usefixtures("long_idle_wait")
def test_several_associations_at_once_each_get_their_answers(
    running_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = running_node()
    shares = [make_study(tmp_path / f"study{i}", 10) for i in range(4)]
    started = time.monotonic()
    senders = [
        subprocess.Popen(
            ["storescu", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, files)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for files in shares
    ]
    codes = [s.wait(timeout=2 * _LIMIT + 60) for s in senders]
    took = time.monotonic() - started
    assert codes == [0, 0, 0, 0]
    assert node.intake.counters.stored == 40
    assert took < _LIMIT, f"4 associations of 10 instances took {took:.1f} s"


def test_the_network_timeout_still_ends_an_idle_association(
    running_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = running_node(node={"network_timeout": 1})
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    # Nothing more is sent: the node's idle timer, checked between waits, ends the association.
    _wait_until(lambda: not assoc.is_established and not _accepted(node), limit=30)
