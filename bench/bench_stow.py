"""STOW-RS send rate to a real Orthanc with its DICOMweb plugin: N small instances in requests of
``objects_per_request`` objects (1, and the default 16), against C-STORE over one association as the baseline.

All modes run in the same process against the same Orthanc, interleaved, so drift on a shared machine hits them
alike. The instances are copies of pydicom's CT_small.dcm (39 KB) with fresh UIDs, the size class of our SR/GSPS
results. Prints instances/s per mode and the ratios: what batching STOW-RS requests buys, and what DICOMweb costs
against DIMSE on loopback.

    .venv/bin/python -m bench.bench_stow [--count 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.bench_scu import batch, make_instances, timed
from dicom_node.config import DestinationSettings, DicomWebDestinationSettings
from dicom_node.export.outcome import Outcome
from dicom_node.export.stow import send_files
from tests.orthanc import DICOMWEB_PLUGIN, ORTHANC_BINARY, Orthanc


def stow(destination: DicomWebDestinationSettings, files: Sequence[Path]) -> int:
    report = send_files(destination, files)
    assert report.outcome == Outcome.DELIVERED, report.reason
    return len(report.delivered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not (ORTHANC_BINARY.exists() and DICOMWEB_PLUGIN.exists()):
        raise SystemExit(f"needs Orthanc and its DICOMweb plugin ({DICOMWEB_PLUGIN}: Debian 'orthanc-dicomweb')")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = make_instances(args.count, work)
        size_kb = files[0].stat().st_size // 1024
        server = Orthanc(work / "orthanc", dicomweb=True).start()
        try:
            dimse = DestinationSettings(name="bench", ae_title="ORTHANC", host="127.0.0.1", port=server.dicom_port)
            web = {
                n: DicomWebDestinationSettings(
                    name="bench", kind="dicomweb", url=server.dicomweb_url, objects_per_request=n
                )
                for n in (1, 16)
            }
            stow(web[16], files[:2])  # warm-up: imports, first connection
            batch(dimse, files[:2])
            rates: dict[str, list[float]] = {"stow-1": [], "stow-16": [], "c-store": []}
            for _ in range(args.repeat):
                rates["stow-1"].append(timed(lambda: stow(web[1], files)))
                rates["stow-16"].append(timed(lambda: stow(web[16], files)))
                rates["c-store"].append(timed(lambda: batch(dimse, files)))
        finally:
            server.kill()

    median = {mode: statistics.median(runs) for mode, runs in rates.items()}
    print(f"peer: Orthanc with DICOMweb plugin; {args.count} instances of {size_kb} KB; median of {args.repeat}")
    for mode, label in (
        ("stow-1", "STOW-RS, 1 object per request  "),
        ("stow-16", "STOW-RS, 16 objects per request"),
        ("c-store", "C-STORE, one association      "),
    ):
        print(f"{label}: {median[mode]:8.1f} instances/s   (runs: {[round(r, 1) for r in rates[mode]]})")
    print(f"ratio STOW-RS 16 / 1 per request: {median['stow-16'] / median['stow-1']:6.2f}x")
    print(f"ratio STOW-RS 16 / C-STORE      : {median['stow-16'] / median['c-store']:6.2f}x")


if __name__ == "__main__":
    main()
