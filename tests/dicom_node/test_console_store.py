"""The job store's queries behind the console's jobs list, on SQLite and PostgreSQL: filters and keyset paging."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from dicom_node.console.users import LoginResult, Role, UserStore
from dicom_node.jobs.schema import JobState
from dicom_node.jobs.store import JobStore
from tests.dicom_node.test_store import record


def test_job_page_filters_and_pages_newest_first(store_url: str) -> None:
    store = JobStore(store_url)
    try:
        specs = [  # (study, modalities, calling AE, accession, created at)
            ("1.9.1", ["CT"], "CTSCANNER", "ACC1", 1000.0),
            ("1.9.2", ["MR", "SR"], "MRSCANNER", "ACC2", 2000.0),
            ("1.9.3", ["CR"], "CTSCANNER", None, 3000.0),
            ("1.9.4", ["CT"], "CTSCANNER", "ACC4", 90000.0),
        ]
        ids = {}
        for study, modalities, calling, accession, at in specs:
            for n, modality in enumerate(modalities):
                rec = dataclasses.replace(
                    record(study, n), modality=modality, calling_ae=calling, accession_number=accession
                )
                store.record_instance(rec, now=at)
            ids[study] = store.complete_study(study, rule="all", now=at)
        job = store.job(ids["1.9.2"])
        assert job is not None
        assert (job.modality, job.calling_ae, job.accession_number) == ("MR SR", "MRSCANNER", "ACC2")
        store.transition(ids["1.9.3"], JobState.FAILED, error="x")

        def page(**kw: object) -> list[int]:
            return [j.id for j in store.job_page(**kw)]  # type: ignore[arg-type]

        assert page() == [ids[s] for s in ("1.9.4", "1.9.3", "1.9.2", "1.9.1")]
        assert page(limit=2) == [ids["1.9.4"], ids["1.9.3"]]
        assert page(limit=2, before_id=ids["1.9.3"]) == [ids["1.9.2"], ids["1.9.1"]]  # the next page
        assert page(states=["failed"]) == [ids["1.9.3"]]
        assert page(modality="mr") == [ids["1.9.2"]] and page(modality="SR") == [ids["1.9.2"]]
        assert page(modality="M") == []  # a whole modality, not a part of one
        assert page(calling_ae="CTSCANNER") == [ids[s] for s in ("1.9.4", "1.9.3", "1.9.1")]
        assert page(accession_number="ACC4") == [ids["1.9.4"]]
        assert page(since=1500.0, until=3500.0) == [ids["1.9.3"], ids["1.9.2"]]
        assert store.jobs_since(2500.0) == {"failed": 1, "queued": 1}
    finally:
        store.close()


def test_a_lock_opens_by_itself_after_lockout_minutes_and_the_count_starts_again(tmp_path: Path) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 'users.db'}")
    try:
        timed = UserStore(store, max_failed=2, lockout_minutes=0.02)  # 1.2 s
        timed.add("admin", "a long password 1", Role.ADMIN)
        token = timed.new_token("admin")
        assert timed.authenticate("admin", "wrong")[0] is LoginResult.WRONG
        assert timed.authenticate("admin", "wrong")[0] is LoginResult.LOCKED
        assert timed.authenticate("admin", "a long password 1")[0] is LoginResult.LOCKED  # even the right one
        assert timed.by_token(token) is None and timed.get("admin").locked  # type: ignore[union-attr]
        time.sleep(1.5)
        assert timed.by_token(token) is not None and not timed.get("admin").locked  # type: ignore[union-attr]
        assert timed.authenticate("admin", "wrong")[0] is LoginResult.WRONG  # one wrong guess, not a new lock
        assert timed.authenticate("admin", "a long password 1")[0] is LoginResult.OK

        forever = UserStore(store, max_failed=2, lockout_minutes=0)  # locked until an administrator acts
        forever.add("viewer", "a long password 2", Role.VIEWER)
        for _ in range(2):
            forever.authenticate("viewer", "wrong")
        time.sleep(1.5)
        assert forever.authenticate("viewer", "a long password 2")[0] is LoginResult.LOCKED
        forever.set_password("viewer", "a long password 3")
        assert forever.authenticate("viewer", "a long password 3")[0] is LoginResult.OK
    finally:
        store.close()
