"""Reading a dataset source into memory, as it is, before any validation.

Sources: the Hugging Face Hub (id + pinned revision), local files (csv, tsv with quoting off,
jsonl, parquet, or a folder per class of .txt files), or a folder inside an installed Python
package. Each split comes back as columns plus where every row came from (``file:line``), so
that the checks in :mod:`pipeline.preparation` can name the row at fault.

The readers are hand-written rather than ``load_dataset("csv", ...)`` because the contract needs
errors that name the file and line of a malformed row, and TSV read with quoting off (GLUE text
has unbalanced quotes that a quoting reader silently merges across rows).
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets
import pyarrow.parquet as pq

from pipeline.artifacts import iter_jsonl
from pipeline.config import DatasetConfig
from pipeline.contracts import LABEL, TEXT
from pipeline.errors import ConfigError, DataValidationError

logger = logging.getLogger(__name__)

_EXTENSIONS = {"csv": ".csv", "tsv": ".tsv", "jsonl": ".jsonl", "parquet": ".parquet"}
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


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
    """Read every split of the configured source into memory."""
    if cfg.source == "hub":
        return _read_hub(cfg)
    if cfg.source == "package":
        folder, version = resolve_package_path(cfg.path, cfg.revision)
        provenance = Provenance("package", cfg.path, cfg.subset, version)
        return _read_local(folder, cfg.format or "folders", provenance), provenance
    path = Path(cfg.path)
    if not path.exists():
        raise ConfigError(f"dataset.path '{cfg.path}' does not exist")
    provenance = Provenance("local", cfg.path, cfg.subset, cfg.revision)
    return _read_local(path, cfg.format or "", provenance), provenance


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
    names = None
    for feature in split.features.values():
        if isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
    return SourceSplit(name, split.to_dict(), origin, label_names=names)


def _read_local(path: Path, fmt: str, provenance: Provenance) -> dict[str, SourceSplit]:
    if fmt == "folders":
        split_dirs = {d.name: d for d in sorted(path.iterdir())
                      if d.is_dir() and d.name in ("train", "validation", "test")}
        if "train" not in split_dirs:
            split_dirs = {"train": path}
        splits = {name: _read_class_folders(name, d) for name, d in split_dirs.items()}
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
    reader = {"csv": _read_delimited, "tsv": _read_delimited, "jsonl": _read_jsonl,
              "parquet": _read_parquet}[fmt]
    return {name: reader(name, file) for name, file in files.items()}


def _relative(file: Path, root: Path) -> str:
    """A source file named relative to the configured path: snapshots must not depend on
    where a machine installed or checked out the source."""
    return file.name if file == root else str(file.relative_to(root))


def _read_delimited(name: str, path: Path) -> SourceSplit:
    """CSV with standard quoting, or TSV with quoting off (QUOTE_NONE), header row required."""
    tsv = path.suffix == ".tsv"
    dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {"delimiter": ","}
    kind = "tab" if tsv else "comma"
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, **dialect)
        try:
            header = next(reader)
        except StopIteration:
            raise DataValidationError(f"{path}: file is empty (a header row is required)") from None
        columns: dict[str, list[Any]] = {h: [] for h in header}
        lines = []
        start = reader.line_num + 1
        for row in reader:
            if not row:
                start = reader.line_num + 1
                continue
            if len(row) != len(header):
                raise DataValidationError(
                    f"{path}:{start}: malformed row: expected {len(header)} {kind}-separated "
                    f"fields ({', '.join(header)}), found {len(row)}")
            for key, value in zip(header, row):
                columns[key].append(value)
            lines.append(f"{path}:{start}")
            start = reader.line_num + 1
    return SourceSplit(name, columns, str(path), locations=lines)


def _read_jsonl(name: str, path: Path) -> SourceSplit:
    columns: dict[str, list[Any]] = {}
    lines = []
    for number, record in iter_jsonl(path):
        for key in record.keys() - columns.keys():
            columns[key] = [None] * len(lines)
        for key, values in columns.items():
            values.append(record.get(key))
        lines.append(f"{path}:{number}")
    return SourceSplit(name, columns, str(path), locations=lines)


def _read_parquet(name: str, path: Path) -> SourceSplit:
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataValidationError(f"{path}: not a readable parquet file: {exc}") from None
    return _from_hf_dataset(name, datasets.Dataset(table), str(path))


def _read_class_folders(name: str, root: Path) -> SourceSplit:
    texts, labels, origins = [], [], []
    for class_dir in sorted(d for d in root.iterdir() if d.is_dir()):
        for file in sorted(class_dir.glob("*.txt")):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                # Older corpora (BBC News among them) hold a few cp1252 bytes such as 0xA3 (£).
                text = raw.decode("cp1252", errors="replace")
                logger.warning("%s is not valid UTF-8; read it as cp1252", file)
            texts.append(text.strip())
            labels.append(class_dir.name)
            origins.append(str(file))
    if not texts:
        raise DataValidationError(f"{root}: no <class>/*.txt files found")
    return SourceSplit(name, {TEXT: texts, LABEL: labels}, str(root), locations=origins)


