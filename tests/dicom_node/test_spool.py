"""The spool's staged writes: what is left on disk after a commit, a discard, and a commit that fails."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import Settings
from dicom_node.intake.spool import Spool
from dicom_node.jobs.schema import instances
from dicom_node.node import Node
from tests.conftest import RecordingDispatcher, make_study


def test_a_committed_instance_is_in_place_with_its_source_and_nothing_is_left_staged(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    staged = spool.stage((b"head", memoryview(b"body")), source_ae="PACS")
    assert list(spool.incoming.iterdir()) == [staged.tmp]
    target = spool.path_for("1.2", "1.2.3", "1.2.3.4")
    staged.commit(target)
    staged.discard()  # after a commit: nothing to drop
    assert target.read_bytes() == b"headbody" and staged.size == 8
    assert spool.relative(target) == "1.2/1.2.3/1.2.3.4.dcm"
    if spool.carries_source:
        assert spool.source_ae(target) == "PACS"
    assert list(spool.incoming.iterdir()) == []


def test_a_discarded_or_failed_commit_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.stage(b"refused").discard()
    assert list(spool.incoming.iterdir()) == []

    blocker = spool.root / "1.2"
    blocker.write_bytes(b"a file where the study folder should be")
    staged = spool.stage(b"data")
    with pytest.raises(OSError):
        staged.commit(spool.path_for("1.2", "1.2.3", "1.2.3.5"))
    staged.discard()
    assert list(spool.incoming.iterdir()) == []


def test_start_up_clears_what_a_crash_left_staged(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.stage(b"written, never acknowledged")  # the process dies here
    assert Spool(tmp_path / "spool").clear_incoming() == 1
    assert list(spool.incoming.iterdir()) == []


def test_a_staging_file_takes_pieces_as_they_arrive_and_refuses_writes_once_dropped(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    staging = spool.open_staging("PACS")
    pieces = [b"head", bytes(300 * 1024), memoryview(b"tail")]  # past the writeback step, then a short piece
    for piece in pieces:
        staging.write(piece)
    staged = staging.finish()
    with staged.mapped() as mapped:
        assert mapped[:4] == b"head" and mapped[-4:] == b"tail" and len(mapped) == staged.size
    target = spool.path_for("1.2", "1.2.3", "1.2.3.5")
    staged.commit(target)
    assert target.read_bytes() == b"".join(bytes(p) for p in pieces)
    with pytest.raises(OSError, match="already finished"):
        staging.write(b"late")  # a fragment after the hand-over never reaches the committed file

    aborted = spool.open_staging("PACS")
    aborted.write(b"half of a transfer")
    aborted.discard()
    aborted.discard()
    with pytest.raises(OSError):
        aborted.write(b"the rest")
    with pytest.raises(OSError):
        aborted.finish()
    assert list(spool.incoming.iterdir()) == []


def test_start_up_recovers_over_long_values_and_passes_over_a_bad_file(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Files spooled but never recorded (a crash between the two) are recorded at start-up, cut to the job store's
    column lengths as intake cuts them; a file that cannot be read is logged and left, and the node starts."""
    [source] = make_study(tmp_path / "s", 1)
    ds = pydicom.dcmread(source)
    ds.Modality = "M" * 70
    ds.StudyDescription = "D" * 200
    settings = make_settings()
    node = Node(settings, dispatcher=RecordingDispatcher())
    target = node.spool.path_for(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    target.parent.mkdir(parents=True)
    ds.save_as(target, enforce_file_format=True)
    garbage = node.spool.path_for(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), "1.2.3.4")
    garbage.write_bytes(b"not DICOM at all")
    node.start()
    try:
        [record] = node.store.study_instances(str(ds.StudyInstanceUID))
        assert record.sop_instance_uid == ds.SOPInstanceUID
        assert record.modality == "M" * instances.c.modality.type.length
        assert record.study_description == "D" * instances.c.study_description.type.length
        assert garbage.exists()  # left for an administrator, not deleted
    finally:
        node.stop()
