"""The Trainer's checkpoints: their files without pickles, whether one is complete, and their
copies in the MLflow run that resume a training on another machine.

Trainer writes the optimizer, scheduler, gradient scaler and random states with ``torch.save``
(pickles, which run code when loaded) and its arguments as ``training_args.bin`` (a pickle no
resume reads). The train stage's Trainer writes them as safetensors and JSON instead
(:func:`save_optimizer`, :func:`save_rng_state`, :func:`save_scaler`), so a checkpoint is plain
data on disk, in MLflow and after a download; resuming from one continues bit for bit (tested).

A train run logs its checkpoints under the artifact folder ``checkpoints/`` (``checkpoint-<step>``,
or ``<phase>/checkpoint-<step>`` for a run of two phases, with each earlier phase's
``final_state.json``), and ``train.resume_from=runs:/<run id>/checkpoints/<name>`` fetches one
back (:func:`fetch`) into the local checkpoint folder, from which training resumes as after a
local interruption.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from pipeline.errors import ConfigError

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.json"
SCALER_FILE = "scaler.json"
# The state a finished phase of a multi-phase run ended in, next to its checkpoints.
FINAL_STATE = "final_state.json"
ARTIFACT_DIR = "checkpoints"
# The train run's tag naming its training (pipeline.training.run_fingerprint): a checkpoint
# resumes only the training it comes from.
FINGERPRINT_TAG = "train_fingerprint"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# Bytes per element of each safetensors dtype.
_SAFETENSORS_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2,
                      "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8,
                      "I64": 8, "F64": 8}


def rng_file(process_index: Optional[int]) -> str:
    """The random states' file: one per process when several train together."""
    return ("rng_state.safetensors" if process_index is None
            else f"rng_state_{process_index}.safetensors")


# -- the files ---------------------------------------------------------------------------------


def _save_tensors(tensors: dict[str, Any], header: Any, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"json": json.dumps(header)})


def _load_tensors(path: Path) -> tuple[dict[str, Any], Any]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return ({key: handle.get_tensor(key) for key in handle.keys()},  # noqa: SIM118
                json.loads(handle.metadata()["json"]))


def save_optimizer(optimizer_state: dict[str, Any], scheduler_state: dict[str, Any],
                   folder: str | Path) -> None:
    """The optimizer's ``state_dict`` as safetensors (its tensors; the parameter groups and any
    plain values as JSON in the header) and the learning-rate scheduler's as JSON."""
    import torch

    tensors: dict[str, Any] = {}
    layout: dict[str, dict[str, Any]] = {}
    for param, values in optimizer_state["state"].items():
        entry = layout[str(param)] = {"tensors": [], "values": {}}
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{param}.{key}"] = value.detach().cpu().contiguous()
                entry["tensors"].append(key)
            else:
                entry["values"][key] = value
    header = {"param_groups": optimizer_state["param_groups"], "state": layout}
    _save_tensors(tensors, header, Path(folder) / OPTIMIZER_FILE)
    Path(folder, SCHEDULER_FILE).write_text(json.dumps(scheduler_state))


def load_optimizer(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The optimizer's and the scheduler's ``state_dict`` that :func:`save_optimizer` wrote."""
    tensors, header = _load_tensors(Path(folder) / OPTIMIZER_FILE)
    state = {int(param): {**entry["values"],
                          **{key: tensors[f"{param}.{key}"] for key in entry["tensors"]}}
             for param, entry in header["state"].items()}
    scheduler = json.loads(Path(folder, SCHEDULER_FILE).read_text())
    return {"param_groups": header["param_groups"], "state": state}, scheduler


def save_rng_state(folder: str | Path, process_index: Optional[int]) -> None:
    """Python's, NumPy's, torch's and every GPU's random states, as Trainer saves them."""
    import numpy as np
    import torch

    version, keys, gauss = random.getstate()
    kind, mt, position, has_gauss, cached = np.random.get_state()
    tensors = {"cpu": torch.random.get_rng_state(),
               "numpy": torch.from_numpy(mt.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": state
                        for i, state in enumerate(torch.cuda.get_rng_state_all())})
    header = {"python": [version, list(keys), gauss],
              "numpy": [kind, int(position), int(has_gauss), float(cached)]}
    # A process may get here before process 0 has created the folder (as in Trainer's own).
    Path(folder).mkdir(parents=True, exist_ok=True)
    _save_tensors(tensors, header, Path(folder) / rng_file(process_index))


def restore_rng_state(folder: str | Path, process_index: Optional[int]) -> bool:
    """Set the random states :func:`save_rng_state` wrote; False if the checkpoint has none in
    this format. A machine with fewer GPUs restores those it has."""
    import numpy as np
    import torch

    path = Path(folder) / rng_file(process_index)
    if not path.is_file():
        return False
    tensors, header = _load_tensors(path)
    version, keys, gauss = header["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, position, has_gauss, cached = header["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss,
                         cached))
    torch.random.set_rng_state(tensors["cpu"])
    if torch.cuda.is_available():
        for device in range(torch.cuda.device_count()):
            if f"cuda.{device}" in tensors:
                torch.cuda.set_rng_state(tensors[f"cuda.{device}"], device)
    return True


def save_scaler(state: dict[str, Any], folder: str | Path) -> None:
    """fp16's gradient scaler (its state is a few numbers)."""
    Path(folder, SCALER_FILE).write_text(json.dumps(state))


def load_scaler(folder: str | Path) -> Optional[dict[str, Any]]:
    path = Path(folder, SCALER_FILE)
    return json.loads(path.read_text()) if path.is_file() else None


# -- complete or not ---------------------------------------------------------------------------


def safetensors_problem(path: Path) -> Optional[str]:
    """Why the safetensors file ``path`` is unusable (missing, truncated, bad header), or None.

    Checks that each tensor's byte range matches its dtype and shape and that the ranges end
    exactly at the end of the file, then opens it with ``safe_open``.
    """
    from safetensors import safe_open

    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            if header_size <= 0 or 8 + header_size > size:
                return f"{path.name} is {size} bytes, too short for its header"
            header = json.loads(handle.read(header_size))
        end = 0
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            begin, stop = tensor["data_offsets"]
            expected = math.prod(tensor["shape"]) * _SAFETENSORS_SIZES[tensor["dtype"]]
            if stop - begin != expected:
                return (f"{path.name}: tensor {name} spans {stop - begin} bytes, its shape and "
                        f"dtype need {expected}")
            end = max(end, stop)
        needed = 8 + header_size + end
        if size != needed:
            why = "truncated" if size < needed else "trailing bytes"
            return f"{path.name} is {size} bytes, its tensors need {needed} ({why})"
        with safe_open(str(path), "pt") as weights:
            weights.keys()
    except FileNotFoundError:
        return f"{path.name} is missing"
    except Exception as exc:  # any failure to read means "not usable"
        return f"{path.name} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    return None


def checkpoint_problem(folder: Path) -> Optional[str]:
    """Why the Trainer checkpoint ``folder`` cannot be resumed from, or None when it is complete.

    Trainer writes ``trainer_state.json`` last, after the weights, optimizer and scheduler, so a
    crash while saving leaves it missing; the other files are checked too, since a lost write
    can leave a truncated file behind an intact state (and resuming would then fail on every
    retry, or silently start with a fresh optimizer). A checkpoint pickled by an older version
    (``optimizer.pt``) is Trainer's to read: only its weights are checked.
    """
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            return f"{TRAINER_STATE} has no global_step"
    except FileNotFoundError:
        return f"{TRAINER_STATE} is missing"
    except (OSError, ValueError) as exc:
        return f"{TRAINER_STATE} does not parse ({str(exc).splitlines()[0]})"
    index = folder / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) \
            if index.is_file() else ["model.safetensors"]
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        return f"{index.name} does not parse ({exc})"
    documents = []
    if not (folder / "optimizer.pt").is_file():
        files += [OPTIMIZER_FILE, *sorted(p.name for p in folder.glob("rng_state*.safetensors"))]
        documents = [SCHEDULER_FILE] + [SCALER_FILE] * (folder / SCALER_FILE).exists()
    for name in files:
        problem = safetensors_problem(folder / name)
        if problem:
            return problem
    for name in documents:
        try:
            json.loads((folder / name).read_text())
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, ValueError) as exc:
            return f"{name} does not parse ({str(exc).splitlines()[0]})"
    return None


# -- in MLflow ---------------------------------------------------------------------------------


def artifact_path(phase: Optional[str], name: str = "") -> str:
    """Where a checkpoint (or a phase's final state, ``name`` empty) goes in the run:
    ``checkpoints/[<phase>/]<name>``."""
    return "/".join(part for part in (ARTIFACT_DIR, phase, name) if part)


def log_checkpoint(folder: Path, phase: Optional[str]) -> None:
    """Log the checkpoint ``folder`` to the open train run (surviving an outage), with the
    permissions the umask gives (the Trainer's safetensors files are written 0600, and MLflow's
    copy keeps them)."""
    from pipeline import tracking
    from pipeline.artifacts import share_as_umask_says

    share_as_umask_says(folder)
    tracking.log_artifact(str(folder), artifact_path(phase, folder.name))


def log_final_state(path: Path, phase: str) -> None:
    """Log a finished phase's final state, which resuming a later phase reads."""
    from pipeline import tracking

    tracking.log_artifact(str(path), artifact_path(phase))


def fetch(uri: str, work_dir: Path, phases: Sequence[str], fingerprint: str) -> Path:
    """Download ``train.resume_from``'s checkpoint (``runs:/<run id>/checkpoints/<name>``) into
    its place under ``work_dir``, with what resuming it needs: the run's best checkpoint that
    its state names (the run ends on it) and the final states of the phases before its own.
    Returns its folder. A complete copy already there is used as it is; processes of one
    machine (torchrun) fetch one after the other.

    Raises:
        ConfigError: not a checkpoint name of this strategy's phases, not a run of this very
            training (its ``train_fingerprint`` differs), not found, or incomplete.
    """
    from filelock import FileLock

    run_id, phase, name = _parse(uri, phases)
    _check_run(uri, run_id, fingerprint)
    phase_dir = work_dir / phase if phase else work_dir
    phase_dir.mkdir(parents=True, exist_ok=True)
    target = phase_dir / name
    with FileLock(str(work_dir / ".fetch.lock"), timeout=3600), \
            tempfile.TemporaryDirectory(dir=work_dir, prefix=".fetch-") as staging:
        if checkpoint_problem(target) is not None:
            _place(_download(uri, run_id, artifact_path(phase, name), Path(staging)), target)
        state = json.loads((target / TRAINER_STATE).read_text())
        best = state.get("best_model_checkpoint")
        if best is not None:
            state["best_model_checkpoint"] = _fetch_best(uri, run_id, phase, phase_dir,
                                                         Path(best).name, Path(staging))
            (target / TRAINER_STATE).write_text(json.dumps(state, indent=2))
        for earlier in phases[:phases.index(phase)] if phase else []:
            final = work_dir / earlier / FINAL_STATE
            if not final.is_file():
                final.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(_download(uri, run_id, f"{artifact_path(earlier)}/{FINAL_STATE}",
                                      Path(staging)), final)
    logger.info("resuming from %s, fetched into %s", uri, target)
    return target


def _parse(uri: str, phases: Sequence[str]) -> tuple[str, Optional[str], str]:
    match = re.fullmatch(rf"runs:/([^/]+)/{ARTIFACT_DIR}/(?:([^/]+)/)?(checkpoint-\d+)/?", uri)
    several = len(phases) > 1
    if match is None or (match.group(2) is not None) != several or \
            (several and match.group(2) not in phases):
        form = (f"<phase>/checkpoint-<step> (phases {', '.join(phases)})" if several
                else "checkpoint-<step>")
        raise ConfigError(f"train.resume_from={uri}: expected runs:/<run id>/{ARTIFACT_DIR}/"
                          f"{form} for train.strategy's phases")
    return match.group(1), match.group(2), match.group(3)


def _check_run(uri: str, run_id: str, fingerprint: str) -> None:
    from mlflow import MlflowClient

    from pipeline.tracking import tracking_uri

    try:
        tags = MlflowClient(tracking_uri()).get_run(run_id).data.tags
    except Exception as exc:  # MlflowException, a connection error: the message says which
        # Not the tracking URI itself: it may hold credentials.
        raise ConfigError(f"train.resume_from={uri}: could not read run {run_id} "
                          f"({_first_line(exc)})") from None
    theirs = tags.get(FINGERPRINT_TAG)
    if theirs != fingerprint:
        raise ConfigError(
            f"train.resume_from={uri}: run {run_id} trained other data or settings "
            f"({FINGERPRINT_TAG} {theirs or 'missing'}, this training's {fingerprint}); a "
            "checkpoint continues only its own training: use that run's params, or set "
            "train.resume_from=null")


def _download(uri: str, run_id: str, path: str, staging: Path) -> Path:
    import mlflow

    from pipeline.tracking import tracking_uri

    into = Path(tempfile.mkdtemp(dir=staging))
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                        dst_path=str(into),
                                                        tracking_uri=tracking_uri()))
    except Exception as exc:  # MlflowException, OSError: the message says which
        raise ConfigError(f"train.resume_from={uri}: could not download {path} of run {run_id} "
                          f"({_first_line(exc)})") from None


def _place(downloaded: Path, target: Path) -> None:
    problem = checkpoint_problem(downloaded)
    if problem is not None:
        raise ConfigError(f"train.resume_from: the logged {target.name} is incomplete: {problem}")
    shutil.rmtree(target, ignore_errors=True)
    downloaded.rename(target)


def _fetch_best(uri: str, run_id: str, phase: Optional[str], phase_dir: Path, best: str,
                staging: Path) -> Optional[str]:
    """The local path of the run's best checkpoint, fetched if needed; None (with a warning)
    if the run did not log it."""
    target = phase_dir / best
    if checkpoint_problem(target) is not None:
        try:
            _place(_download(uri, run_id, artifact_path(phase, best), staging), target)
        except ConfigError as error:
            logger.warning("%s; the resumed run cannot end on that best checkpoint, only on a "
                           "better one it reaches", error)
            return None
    return str(target)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
