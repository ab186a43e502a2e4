"""Where a checkpoint's ONNX export lives, what its manifest records, and whether it still fits the checkpoint.

One export folder per checkpoint version: ``<model.export_dir>/<family>-<fingerprint>/`` holding the graphs
(``vision.onnx``, ``embed.onnx``, ``decoder.onnx``, their ``.data`` weight files) and ``manifest.json``. The folder
name carries the checkpoint fingerprint (the model version of the algorithm identity), so a fine-tuned checkpoint
never runs an old export: its folder is simply missing, and :func:`find_export` says which export exists instead
and the command that makes the right one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inference.errors import ModelLoadError

__all__ = [
    "EXPORT_COMMAND",
    "FORMAT_VERSION",
    "DecoderLayout",
    "ExportManifest",
    "ExportMissingError",
    "ExportUnsupportedError",
    "GraphInfo",
    "export_folder",
    "find_export",
]

#: Bumped whenever the graphs' inputs or outputs change meaning: an export of another format version is stale.
FORMAT_VERSION = 2  # 2: the decoder reads preallocated KV buffers and gives the new tokens' keys and values
#: What an administrator runs to make an export; quoted in every message about a missing or stale one.
EXPORT_COMMAND = "dicom-node model export"
MANIFEST = "manifest.json"


class ExportUnsupportedError(ModelLoadError):
    """The family has no ONNX export (yet): the graph backends refuse it at load, naming the family and why."""


class ExportMissingError(ModelLoadError):
    """The backend needs an ONNX export of this checkpoint and there is none (or only a stale one)."""


@dataclass(frozen=True)
class GraphInfo:
    """One exported graph: its file and its input and output names, in order."""

    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class DecoderLayout:
    """The KV cache of the decoder graph: buffer inputs ``cache_key_<i>``/``cache_value_<i>`` (``(batch, kv_heads,
    capacity, head_dim)``), outputs ``new_key_<i>``/``new_value_<i>`` (the new tokens' own, ``(batch, kv_heads, seq,
    head_dim)``) that the caller writes into its buffers."""

    layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    #: Rows of ``position_ids``: 1 (``(batch, seq)``) or 3 (M-RoPE, ``(3, batch, seq)``).
    position_rows: int = 1

    def cache_names(self) -> list[str]:
        return [f"cache_{kind}_{i}" for i in range(self.layers) for kind in ("key", "value")]

    def new_names(self) -> list[str]:
        return [f"new_{kind}_{i}" for i in range(self.layers) for kind in ("key", "value")]


@dataclass(frozen=True)
class ExportManifest:
    """What an export folder holds and what it was made from."""

    family: str
    checkpoint: str  # the checkpoint folder's name
    fingerprint: str  # :func:`inference.adapters.base.checkpoint_fingerprint` of the checkpoint
    dtype: str  # float32 | float16
    graphs: dict[str, GraphInfo]
    decoder: DecoderLayout
    image_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    opset: int
    versions: dict[str, str] = field(default_factory=dict)  # torch, transformers, onnx at export time
    #: (min, opt, max) of the vision graph's own dynamic axes (the decoder's are derived from the settings).
    dim_ranges: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    created: str = ""

    def write(self, folder: Path) -> None:
        data = asdict(self)
        (folder / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, folder: Path) -> ExportManifest:
        """The manifest in ``folder``; :class:`ExportMissingError` when it is absent or unreadable."""
        path = folder / MANIFEST
        try:
            data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            graphs = {name: GraphInfo(g["file"], tuple(g["inputs"]), tuple(g["outputs"]))
                      for name, g in data.pop("graphs").items()}
            decoder = DecoderLayout(**data.pop("decoder"))
            ranges = {k: (int(v[0]), int(v[1]), int(v[2])) for k, v in data.pop("dim_ranges", {}).items()}
            return cls(graphs=graphs, decoder=decoder, eos_token_ids=tuple(data.pop("eos_token_ids")),
                       dim_ranges=ranges, **data)
        except FileNotFoundError:
            raise ExportMissingError(f"{path} is missing: the export in {folder} is incomplete; run "
                                     f"`{EXPORT_COMMAND}` again") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ExportMissingError(f"{path} cannot be read ({type(exc).__name__}: {exc}); run "
                                     f"`{EXPORT_COMMAND} --force`") from None


def export_folder(export_dir: Path, family: str, fingerprint: str) -> Path:
    """The folder of one checkpoint version's export."""
    return Path(export_dir).expanduser() / f"{family}-{fingerprint}"


def find_export(export_dir: Path, family: str, checkpoint: Path, fingerprint: str) -> tuple[Path, ExportManifest]:
    """The export folder and manifest for this checkpoint version; :class:`ExportMissingError` saying why not."""
    folder = export_folder(export_dir, family, fingerprint)
    if not folder.is_dir():
        others = sorted(p.name for p in Path(export_dir).expanduser().glob(f"{family}-*") if p.is_dir())
        found = (f"; the exports there ({', '.join(others)}) were made from another version of the checkpoint "
                 "(stale)" if others else "")
        raise ExportMissingError(
            f"no ONNX export of the {family!r} checkpoint {str(checkpoint)!r} (version {fingerprint}) in "
            f"{str(export_dir)!r}{found}: run `{EXPORT_COMMAND}` with this configuration (it takes minutes for a "
            "real checkpoint), or use model.backend: transformers"
        )
    manifest = ExportManifest.read(folder)
    if manifest.format_version != FORMAT_VERSION:
        raise ExportMissingError(
            f"the export in {str(folder)!r} has format {manifest.format_version}, this node reads format "
            f"{FORMAT_VERSION}: run `{EXPORT_COMMAND} --force`"
        )
    if manifest.fingerprint != fingerprint or manifest.family != family:
        raise ExportMissingError(
            f"the export in {str(folder)!r} was made from {manifest.family} version {manifest.fingerprint}, not "
            f"{family} version {fingerprint} (stale): run `{EXPORT_COMMAND} --force`"
        )
    for name, graph in manifest.graphs.items():
        if not (folder / graph.file).is_file():
            raise ExportMissingError(f"graph {name!r} ({graph.file}) is missing from {str(folder)!r}: run "
                                     f"`{EXPORT_COMMAND} --force`")
    return folder, manifest
