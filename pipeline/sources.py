"""Reading a dataset source into memory, as it is, before any validation.

Sources: the Hugging Face Hub (id + pinned revision), local files (csv, tsv with quoting off,
jsonl, parquet, or a folder per class of .txt files), or a folder inside an installed Python
package. Each split comes back as columns plus where every row came from (``file:line``), so
that the checks in :mod:`pipeline.preparation` can name the row at fault. Every reader refuses
what would silently misalign texts and labels or leave a split empty: blank, repeated or
case-colliding column names, bytes that are not valid in ``dataset.encoding``, and files
without data rows (:mod:`pipeline.textfiles` holds the checks, shared with the inference
command).

The readers are hand-written rather than ``load_dataset("csv", ...)`` because the contract needs
errors that name the file and line of a malformed row, and TSV read with quoting off (GLUE text
has unbalanced quotes that a quoting reader silently merges across rows).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets
import pyarrow.parquet as pq

from pipeline.config import DatasetConfig
from pipeline.contracts import LABEL, TEXT
from pipeline.errors import ConfigError, DataValidationError
from pipeline.textfiles import (
    check_column_names,
    check_encoding,
    decode_error,
    is_utf8,
    iter_records,
    no_data_rows,
)

logger = logging.getLogger(__name__)

_EXTENSIONS = {"csv": ".csv", "tsv": ".tsv", "jsonl": ".jsonl", "parquet": ".parquet"}
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_ENCODING_HINT = "set dataset.encoding"


@dataclass
class SourceSplit:
    """One split as read from its source, before validation.

    ``locations`` names where each row came from (``file:line``, or the file of a folder
    corpus) so that errors can point at it; without it rows are named by their 0-based index.
    """

    name: str
    columns: dict[str, list[Any]]
    origin: str
    locations: Optional[list[str]] = None
    label_names: Optional[list[str]] = None

    def where(self, row: int) -> str:
        if self.locations is not None:
            return self.locations[row]
        return f"{self.origin}, row {row}"

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


@dataclass
class Provenance:
    source: str
    path: str
    subset: Optional[str]
    revision: Optional[str]
    files: list[str] = field(default_factory=list)


def resolve_package_path(spec: str, revision: Optional[str] = None) -> tuple[Path, str]:
    """``"pkg/sub/dir"`` -> (folder inside the installed package, installed version).

    Raises:
        ConfigError: the package is not installed, the folder is missing, or the installed
            version differs from the pinned ``revision``.
    """
    package, _, inner = spec.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"package '{package}' (from path '{spec}') is not installed")
    folder = Path(list(found.submodule_search_locations)[0]) / inner
    if not folder.is_dir():
        raise ConfigError(f"package '{package}' has no folder '{inner}' (looked in {folder})")
    distributions = importlib.metadata.packages_distributions().get(package, [package])
    version = importlib.metadata.version(distributions[0])
    if revision is not None and str(revision) != version:
        raise ConfigError(f"package '{distributions[0]}' is version {version}, but the config "
                          f"pins revision {revision}")
    return folder, version


def read_source(cfg: DatasetConfig) -> tuple[dict[str, SourceSplit], Provenance]:
    """Read every split of the configured source into memory.

    Raises:
        ConfigError: the source, or ``dataset.encoding``, cannot be used.
        DataValidationError: naming the file (and line) of bad column names, bytes that are
            not valid in ``dataset.encoding``, a malformed row, or a split with no data rows.
    """
    encoding = check_encoding(cfg.encoding, "dataset.encoding")
    if cfg.source == "hub":
        splits, provenance = _read_hub(cfg)
    elif cfg.source == "package":
        folder, version = resolve_package_path(cfg.path, cfg.revision)
        provenance = Provenance("package", cfg.path, cfg.subset, version)
        splits = _read_local(folder, cfg.format or "folders", encoding, provenance)
    else:
        path = Path(cfg.path)
        if not path.exists():
            raise ConfigError(f"dataset.path '{cfg.path}' does not exist")
        provenance = Provenance("local", cfg.path, cfg.subset, cfg.revision)
        splits = _read_local(path, cfg.format or "", encoding, provenance)
    for split in splits.values():
        if not len(split):
            raise no_data_rows(split.origin)
    return splits, provenance


def _read_hub(cfg: DatasetConfig) -> tuple[dict[str, SourceSplit], Provenance]:
    if cfg.revision is None or not _COMMIT_SHA.match(str(cfg.revision)):
        logger.warning("dataset.revision=%s is not a commit sha: the data may change under you",
                       cfg.revision)
    try:
        loaded = datasets.load_dataset(cfg.path, cfg.subset, revision=cfg.revision)
    except Exception as exc:  # the Hub client raises many types; the message is what matters
        raise DataValidationError(f"could not load '{cfg.path}' ({cfg.subset}) at revision "
                                  f"{cfg.revision} from the Hub: {exc}") from None
    splits = {}
    for name, split in loaded.items():
        origin = f"hf://datasets/{cfg.path}@{cfg.revision}/{cfg.subset or ''}/{name}"
        splits[name] = _from_hf_dataset(name, split, origin)
    return splits, Provenance("hub", cfg.path, cfg.subset, cfg.revision)


def _from_hf_dataset(name: str, split: datasets.Dataset, origin: str) -> SourceSplit:
    check_column_names(split.column_names, origin)
    names = None
    for feature in split.features.values():
        if isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
    return SourceSplit(name, split.to_dict(), origin, label_names=names)


def _read_local(path: Path, fmt: str, encoding: str,
                provenance: Provenance) -> dict[str, SourceSplit]:
    if fmt == "folders":
        split_dirs = {d.name: d for d in sorted(path.iterdir())
                      if d.is_dir() and d.name in ("train", "validation", "test")}
        if "train" not in split_dirs:
            split_dirs = {"train": path}
        splits = {name: _read_class_folders(name, d, encoding) for name, d in split_dirs.items()}
        provenance.files = [_relative(d, path) for d in split_dirs.values()]
        return splits
    suffix = _EXTENSIONS[fmt]
    files = ({"train": path} if path.is_file()
             else {p.stem: p for p in sorted(path.glob(f"*{suffix}"))})
    if not files:
        raise DataValidationError(f"{path}: no *{suffix} files (one per split, e.g. train{suffix})")
    if "train" not in files:
        raise DataValidationError(f"{path}: no train split; found {', '.join(files)}")
    provenance.files = [_relative(p, path) for p in files.values()]
    if fmt == "parquet":
        return {name: _read_parquet(name, file) for name, file in files.items()}
    return {name: _read_text(name, file, fmt, encoding) for name, file in files.items()}


def _relative(file: Path, root: Path) -> str:
    """A source file named relative to the configured path: snapshots must not depend on
    where a machine installed or checked out the source."""
    return file.name if file == root else str(file.relative_to(root))


def _read_text(name: str, path: Path, fmt: str, encoding: str) -> SourceSplit:
    """A csv (standard quoting), tsv (quoting off; both with a header row) or jsonl file; a
    column that some jsonl lines lack reads as missing (None) on those lines."""
    columns: dict[str, list[Any]] = {}
    lines = []
    for where, record in iter_records(path, fmt, encoding, _ENCODING_HINT):
        for key in record:
            if key not in columns:
                columns[key] = [None] * len(lines)
        for key, values in columns.items():
            values.append(record.get(key))
        lines.append(where)
    return SourceSplit(name, columns, str(path), locations=lines)


def _read_parquet(name: str, path: Path) -> SourceSplit:
    try:
        # The names first: pyarrow writes repeated field names, then fails to read them by name.
        check_column_names(pq.read_schema(path).names, str(path))
        table = pq.read_table(path)
    except DataValidationError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataValidationError(f"{path}: not a readable parquet file: {exc}") from None
    return _from_hf_dataset(name, datasets.Dataset(table), str(path))


def _read_class_folders(name: str, root: Path, encoding: str) -> SourceSplit:
    """Each ``<class>/*.txt`` file is one text. With the default UTF-8, a file that is not valid
    UTF-8 is read as cp1252 with a warning: older corpora (BBC News among them) hold a few cp1252
    bytes such as 0xA3 (£). Another ``dataset.encoding`` is used as it is, strictly."""
    fallback = is_utf8(encoding)
    texts, labels, origins = [], [], []
    for class_dir in sorted(d for d in root.iterdir() if d.is_dir()):
        for file in sorted(class_dir.glob("*.txt")):
            raw = file.read_bytes()
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as exc:
                if not fallback:
                    line = raw.count(b"\n", 0, exc.start) + 1
                    raise decode_error(f"{file}:{line}", 0, exc, encoding,
                                       _ENCODING_HINT) from None
                text = raw.decode("cp1252", errors="replace")
                logger.warning("%s is not valid UTF-8; read it as cp1252", file)
            texts.append(text.strip())
            labels.append(class_dir.name)
            origins.append(str(file))
    if not texts:
        raise DataValidationError(f"{root}: no <class>/*.txt files found")
    return SourceSplit(name, {TEXT: texts, LABEL: labels}, str(root), locations=origins)


