"""``hydra/sweeper=optuna_search``: Optuna (ask-and-tell) driving any Hydra launcher.

Why not the published ``hydra-optuna-sweeper``: it requires ``optuna<3`` (2.10, from 2021), and
that Optuna's database storage fails against SQLAlchemy 2, which MLflow 3 requires; its search
would also pin this project to an unmaintained Optuna. This plugin keeps its command-line
syntax (Hydra's sweep grammar: ``choice``, ``range``, ``interval``, ``tag(log, ...)``) on the
current Optuna, in one small file.

    python -m stages.train -m hydra/sweeper=optuna_search hydra.sweeper.n_trials=8 \\
        'train.learning_rate=tag(log, interval(1e-5, 1e-3))' 'train.warmup_ratio=choice(0,0.1)'

Each trial is one Hydra job, launched ``n_jobs`` at a time by the configured launcher (basic,
joblib, submitit). A job's return value is the objective, or ``metric`` of it when it is a
mapping (the train stage returns its validation metrics). A failed job is a failed trial: the
search goes on, and the sweep raises at the end so that it exits non-zero.
"""

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf

logger = logging.getLogger(__name__)

RESULTS = "optimization_results.yaml"
# No `from __future__ import annotations` here: Hydra loads plugin modules without entering them
# in sys.modules, where dataclasses look up string annotations.


@dataclass
class OptunaSearchConf:
    _target_: str = "hydra_plugins.optuna_search.sweeper.OptunaSearchSweeper"
    direction: str = "maximize"
    # Key of the job's returned mapping to optimise; this project's stages return their
    # validation metrics, keyed by metric name.
    metric: Optional[str] = "${dataset.main_metric}"
    n_trials: int = 8
    n_jobs: int = 1  # trials launched together: parallel with a parallel launcher
    sampler: str = "tpe"  # tpe | random
    seed: Optional[int] = 0
    study_name: Optional[str] = None
    storage: Optional[str] = None  # e.g. sqlite:///optuna.db to resume a search
    # Search space in Hydra's sweep grammar, beside any sweeps given on the command line.
    params: dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna_search", node=OptunaSearchConf,
                             provider="hf-text-pipeline")


class SweepFailedError(RuntimeError):
    pass


def distribution(override: Override):
    """The Optuna distribution of a Hydra sweep override."""
    import optuna.distributions as dist

    value = override.value()
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if "int" in value.tags or (isinstance(value.start, int) and isinstance(value.end, int)):
            return dist.IntDistribution(int(value.start), int(value.end), log=log)
        return dist.FloatDistribution(float(value.start), float(value.end), log=log)
    # choice(...) and range(...): categorical over the values, written as overrides.
    return dist.CategoricalDistribution(list(override.sweep_string_iterator()))


class OptunaSearchSweeper(Sweeper):
    def __init__(self, direction: str, metric: Optional[str], n_trials: int, n_jobs: int,
                 sampler: str, seed: Optional[int], study_name: Optional[str],
                 storage: Optional[str], params: Mapping[str, str]) -> None:
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"hydra.sweeper.direction={direction!r}: maximize or minimize")
        if sampler not in ("tpe", "random"):
            raise ValueError(f"hydra.sweeper.sampler={sampler!r}: tpe or random")
        if n_trials < 1 or n_jobs < 1:
            raise ValueError("hydra.sweeper.n_trials and hydra.sweeper.n_jobs must be at least 1")
        self.direction, self.metric, self.sampler, self.seed = direction, metric, sampler, seed
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.study_name, self.storage = study_name, storage
        self.params = dict(params or {})
        self.launcher = None
        self.config = None
        self.job_idx = 0

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)
        self.hydra_context = hydra_context

    def _space(self, arguments: list[str]) -> tuple[list[str], dict[str, Any]]:
        parser = OverridesParser.create()
        lines = [*arguments, *(f"{k}={v}" for k, v in self.params.items())]
        fixed, space = [], {}
        for override in parser.parse_overrides(lines):
            if override.is_sweep_override():
                space[override.get_key_element()] = distribution(override)
            else:
                fixed.append(override.input_line)
        if not space:
            raise ValueError("optuna_search has nothing to search: give a sweep override "
                             "(interval(...), choice(...), range(...)) or hydra.sweeper.params")
        return fixed, space

    def _objective(self, value: Any, overrides: list[str]) -> float:
        if isinstance(value, Mapping):
            if self.metric not in value:
                raise SweepFailedError(f"hydra.sweeper.metric={self.metric!r} is not in what the "
                                       f"job ({' '.join(overrides)}) returned: "
                                       f"{', '.join(map(str, value))}")
            value = value[self.metric]
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SweepFailedError(f"the job ({' '.join(overrides)}) returned {value!r}, not a "
                                   "number; set hydra.sweeper.metric") from None

    def sweep(self, arguments: list[str]) -> Any:
        import optuna

        fixed, space = self._space(arguments)
        samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
        study = optuna.create_study(study_name=self.study_name, storage=self.storage,
                                    direction=self.direction, load_if_exists=True,
                                    sampler=samplers[self.sampler](seed=self.seed))
        logger.info("optuna_search: %d trials, %d at a time, %s %s over %s", self.n_trials,
                    self.n_jobs, self.direction, self.metric, ", ".join(space))
        failed: list[str] = []
        while self.job_idx < self.n_trials:
            trials = [study.ask(space)
                      for _ in range(min(self.n_jobs, self.n_trials - self.job_idx))]
            batch = [[*fixed, *(f"{key}={_format(trial.params[key])}" for key in space)]
                     for trial in trials]
            self.validate_batch_is_legal(batch)
            returns = self.launcher.launch(batch, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            for trial, overrides, job in zip(trials, batch, returns):
                trial.set_user_attr("overrides", overrides)
                if job.status == JobStatus.COMPLETED:
                    study.tell(trial, self._objective(job.return_value, overrides))
                else:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    failed.append(f"{' '.join(overrides)}: {job._return_value!r}")
        self._write_results(study)
        if failed:
            raise SweepFailedError(f"{len(failed)} of {self.n_trials} trials failed: "
                                   + "; ".join(failed))
        return study

    def _write_results(self, study) -> None:
        import optuna

        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        results: dict[str, Any] = {"direction": self.direction, "metric": self.metric,
                                   "trials": [{"number": t.number, "state": t.state.name,
                                               "value": t.value, "params": t.params}
                                              for t in study.trials]}
        if done:
            results.update(best_params=study.best_params, best_value=study.best_value)
        out = Path(self.config.hydra.sweep.dir) / RESULTS
        out.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), out)
        logger.info("optuna_search: best %s", results.get("best_params", "none (all failed)"))


def _format(value: Any) -> str:
    # repr keeps every digit of a float; categorical values are already override strings.
    return repr(value) if isinstance(value, float) else str(value)
