"""A throwaway certificate authority for the DICOM TLS tests, made with the openssl command."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["make_pki"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(name: str, cwd: Path) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1", "-subj", f"/CN={name}",
        cwd=cwd,
    )  # fmt: skip


def _signed(name: str, ca: str, cwd: Path) -> None:
    (cwd / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=cwd,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext",
        cwd=cwd,
    )  # fmt: skip


def make_pki(cwd: Path) -> Path:
    """In ``cwd``: CAs ``ca`` and ``other-ca``, and ``pacs``, ``node`` and ``stranger`` certificates for
    127.0.0.1 (``.pem`` and ``.key``), the first two signed by ``ca``, the last by ``other-ca``."""
    _ca("ca", cwd)
    _ca("other-ca", cwd)
    _signed("pacs", "ca", cwd)
    _signed("node", "ca", cwd)
    _signed("stranger", "other-ca", cwd)
    return cwd
