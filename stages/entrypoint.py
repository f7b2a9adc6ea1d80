"""What every stage entrypoint shares: Hydra config, logging, one-line errors.

Each stage's primary config is ``conf/stage.yaml``: the values in ``params.yaml`` (what DVC
tracked) plus Hydra's runtime settings, so any value can be overridden on the command line and
``-m`` sweeps work, while ``dvc repro`` runs exactly what ``params.yaml`` says.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.config import PipelineConfig, load_config
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

# Set by stages.sweep.MlflowSweepCallback in the launching process; launcher workers inherit it.
SWEEP_PARENT_ENV = "PIPELINE_SWEEP_PARENT_RUN_ID"


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_dir() -> Path:
    """This Hydra job's own output folder (multirun jobs write there, never to DVC outs)."""
    return Path(HydraConfig.get().runtime.output_dir)


def _quiet_libraries() -> None:
    import datasets
    import transformers

    datasets.disable_caching()  # DVC is the cache; stale datasets caches would shadow it
    datasets.logging.set_verbosity_warning()
    transformers.logging.set_verbosity_warning()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def run_stage(name: str, body: Callable[[PipelineConfig], Any]) -> None:
    """Run ``body`` on the validated config; a user-fixable error exits with one line."""

    # Stages run from the project root (as DVC runs them), and read that project's params.yaml.
    @hydra.main(version_base="1.3", config_path=str(Path.cwd()), config_name="conf/stage")
    def main(cfg: DictConfig) -> Any:
        _quiet_libraries()
        try:
            config = load_config(cfg)
            return body(config)
        except PipelineError as exc:
            if in_multirun():
                raise  # Hydra records the job as failed and the sweep goes on
            logger.debug("error details", exc_info=True)
            print(f"{name}: error: {exc}", file=sys.stderr)
            sys.exit(1)

    main()
