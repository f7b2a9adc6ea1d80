"""What every stage entrypoint shares: Hydra config, declared params, help, one-line errors.

Each stage's primary config is ``conf/stage.yaml``: the values in ``params.yaml`` (what DVC
tracked) plus Hydra's runtime settings, so any value can be overridden on the command line and
``-m`` sweeps work, while ``dvc repro`` runs exactly what ``params.yaml`` says. A stage declares
the params it reads (the same list as its ``params`` in dvc.yaml, checked by a test) and sees
only those, so DVC re-runs it whenever something it reads changes.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.config import SECTIONS, PipelineConfig, declared_view, load_config
from pipeline.errors import ConfigError, PipelineError

logger = logging.getLogger(__name__)


# conf/stage.yaml names a sweep's folder multirun/${oc.env:<this>}. Set once in the launching
# process (launcher workers inherit it), so two sweeps started in the same second still differ.
SWEEP_STAMP_ENV = "PIPELINE_SWEEP_STAMP"


def sweep_stamp(now: datetime | None = None, pid: int | None = None) -> str:
    """``<date>/<time>-<pid>``: a sweep's folder under multirun/, unique per launching process."""
    now = now or datetime.now()
    return f"{now:%Y-%m-%d}/{now:%H-%M-%S}-{pid or os.getpid()}"


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def command_line_overrides() -> list[str]:
    """This run's (or sweep job's) overrides of params.yaml values (none under DVC)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def job_dir() -> Path:
    """This Hydra job's own output folder (multirun jobs write there, never to DVC outs)."""
    return Path(HydraConfig.get().runtime.output_dir)


def config_groups(root: Path) -> list[str]:
    """The groups of conf/config.yaml's defaults list (dataset, model, ...): what `dvc exp run
    -S group=option` switches."""
    try:
        defaults = yaml.safe_load((root / "conf" / "config.yaml").read_text())["defaults"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return []
    groups = []
    for entry in defaults:
        if isinstance(entry, dict):
            groups += [key.removeprefix("optional ").removeprefix("override ").strip()
                       for key in entry]
    return groups


class _ArgvError(Exception):
    """The command line does not parse; Hydra says why when it parses it itself."""


def _raise_argv_error(message: str) -> None:
    raise _ArgvError(message)


def _refuse_group_switches(stage: str, argv: Sequence[str]) -> None:
    """Refuse a config group on a stage's command line, in one line that shows the `dvc exp run
    -S` form: a stage reads params.yaml, where each group is already a resolved section, so
    Hydra would turn ``dataset=glue_mrpc`` into the string "glue_mrpc", delete the section for
    ``~dataset``, find no ``strategy`` or ``experiment`` to override, and start a failing job per
    value of ``-m dataset=a,b``. The command line is parsed the way Hydra parses it (its own
    argument and override parsers), before Hydra runs anything.

    Raises:
        ConfigError: naming the override and the DVC command that does what it asks.
    """
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = get_args_parser()
    parser.error = _raise_argv_error  # type: ignore[method-assign]
    try:
        args = parser.parse_args(list(argv))
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except (_ArgvError, HydraException):
        return
    groups = config_groups(Path.cwd())
    for override in overrides:
        group = override.key_or_group
        if group not in groups:
            continue  # a value (dataset.path=...), or one of Hydra's groups (hydra/launcher=...)
        line = override.input_line or group
        if override.is_delete():
            dvc = f"dvc exp run -S {group}=<option>` to choose another option"
        elif override.is_sweep_override():
            dvc = (f"dvc exp run --queue -S {group}={override.get_value_string()}` and "
                   "`dvc queue start` (an experiment per option)")
        else:
            dvc = f"dvc exp run -S {group}={override.get_value_string()}`"
        values = (f", or override single values here, e.g. `python -m stages.{stage} "
                  f"{group}.<key>=<value>`" if group in SECTIONS else "")
        raise ConfigError(f"'{line}' {'removes' if override.is_delete() else 'switches'} the "
                          f"config group '{group}', which a stage cannot do (it reads "
                          f"params.yaml): run `{dvc}{values}")


def _dvc_stage(root: Path, stage: str) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of ``stage`` in dvc.yaml, with ``${paths.*}`` filled from params.yaml."""
    try:
        spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]
        paths = yaml.safe_load((root / "params.yaml").read_text()).get("paths", {})
    except (OSError, KeyError, TypeError, AttributeError, yaml.YAMLError):
        return [], []

    def fill(entry: Any) -> str:
        text = next(iter(entry)) if isinstance(entry, dict) else str(entry)
        for key, value in paths.items():
            text = text.replace(f"${{paths.{key}}}", str(value))
        return text

    inputs = [fill(d) for d in spec.get("deps", []) if not str(d).endswith(".py")]
    outputs = [fill(o) for kind in ("outs", "metrics", "plots") for o in spec.get(kind, [])]
    return inputs, outputs


def stage_help(stage: str, summary: str, params: Sequence[str]) -> str:
    """What ``python -m stages.<stage> --help`` prints: what the stage reads, writes and which
    params it depends on, and how to change them."""
    root = Path.cwd()
    inputs, outputs = _dvc_stage(root, stage)
    groups = ", ".join(config_groups(root)) or "see conf/"
    command = f"python -m stages.{stage}"
    return f"""{command}: {summary}

reads:   {', '.join(inputs) or '(the sources named in params.yaml)'}
writes:  {', '.join(outputs)}
params:  {', '.join(params)}   (DVC re-runs the stage when one of them changes)

The stage runs on params.yaml, which `dvc exp run` composes from conf/. Change what DVC tracks:
  dvc exp run -S dataset=glue_mrpc               switch a config group ({groups})
  dvc exp run -S train.learning_rate=3e-5         change one value
  dvc repro                                       run what is out of date

Run this stage alone with overrides (not recorded by DVC; for debugging and sweeps):
  {command} train.num_train_epochs=1
  {command} --cfg job                  print the config it would run with
  {command} -m train.learning_rate=2e-5,5e-5   a Hydra sweep (README, Sweeps)

A group cannot be switched here (`{command} dataset=glue_mrpc` is refused): a stage reads the
resolved params.yaml. Hydra's own options: --hydra-help.
"""


def print_error(prefix: str, exc: BaseException) -> None:
    """``<prefix>: error: <message>`` on a line of its own: progress bars still drawn (a
    tokenizer's map, the Trainer's steps) are closed first, so the message never continues
    a bar's line."""
    close_progress_bars()
    print(f"{prefix}: error: {exc}", file=sys.stderr)


def close_progress_bars() -> None:
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _quiet_libraries() -> None:
    import datasets
    import transformers

    datasets.disable_caching()  # DVC is the cache; stale datasets caches would shadow it
    datasets.logging.set_verbosity_warning()
    transformers.logging.set_verbosity_warning()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def run_stage(name: str, body: Callable[[PipelineConfig], Any], params: Sequence[str]) -> None:
    """Run ``body`` on the validated config, restricted to ``params`` (the stage's params in
    dvc.yaml); a user-fixable error exits with one line."""
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        # Hydra's --help lists config groups by walking the whole config folder, which for a
        # stage is the project root: minutes with a .venv in it, and the groups it lists are
        # conf/'s, which a stage cannot switch. This help says what a stage user needs.
        module = sys.modules[body.__module__]
        # The summary is the docstring's first paragraph, which may wrap over several lines.
        summary = " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())
        print(stage_help(name, summary, params))
        sys.exit(0)

    try:
        _refuse_group_switches(name, sys.argv[1:])
    except ConfigError as exc:
        print_error(name, exc)
        sys.exit(1)

    os.environ.setdefault(SWEEP_STAMP_ENV, sweep_stamp())

    # Stages run from the project root (as DVC runs them), and read that project's params.yaml.
    @hydra.main(version_base="1.3", config_path=str(Path.cwd()), config_name="conf/stage")
    def main(cfg: DictConfig) -> Any:
        _quiet_libraries()
        try:
            config = load_config(cfg)
            return body(declared_view(config, name, params))
        except PipelineError as exc:
            if in_multirun():
                raise  # Hydra records the job as failed and the sweep goes on
            logger.debug("error details", exc_info=True)
            print_error(name, exc)
            sys.exit(1)

    main()
