"""Deterministic UIDs for result objects (DESIGN invariant 2: results exactly once in effect)."""

from __future__ import annotations

from sr_writer.findings import AlgorithmIdentity, result_uid

__all__ = ["ResultUIDs"]


class ResultUIDs:
    """Hands out the UIDs of one run's result objects, derived from (study, algorithm, profile, run).

    The same arguments always give the same UIDs, so a retried export regenerates byte-identical UIDs and a PACS
    overwrites instead of duplicating. ``run`` distinguishes deliberate re-runs (for example a re-read requested by
    a user); a retry of the same job must pass the same ``run``.

    >>> uids = ResultUIDs("1.2.3", algorithm, profile="chest", run=1)
    >>> uids.uid("sr", "series")            # the SR series
    >>> uids.uid("gsps", "instance", sop)   # the GSPS instance for the source image ``sop``
    """

    def __init__(self, study_instance_uid: str, algorithm: AlgorithmIdentity, profile: str, run: int | str = 1):
        if not study_instance_uid:
            raise ValueError("ResultUIDs: study_instance_uid must not be empty")
        if not profile:
            raise ValueError("ResultUIDs: profile must not be empty")
        self.study_instance_uid = study_instance_uid
        self.algorithm = algorithm
        self.profile = profile
        self.run = run
        self._seed: tuple[str | int, ...] = (
            study_instance_uid,
            algorithm.family,
            algorithm.name,
            algorithm.version,
            profile,
            run,
        )

    def uid(self, *parts: str | int) -> str:
        """The UID for ``parts`` (e.g. ``("sr", "instance")``) within this run; never the same for other parts."""
        if not parts:
            raise ValueError("ResultUIDs.uid needs at least one part, e.g. ('sr', 'series')")
        return result_uid(*self._seed, *parts)

    def __repr__(self) -> str:
        return f"ResultUIDs(profile={self.profile!r}, run={self.run!r}, algorithm={self.algorithm.name!r})"
