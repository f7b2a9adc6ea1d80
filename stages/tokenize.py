"""DVC stage `tokenize`: paths.raw_dir -> paths.tokenized_dir (Arrow), with the checkpoint's tokenizer."""

from pipeline.artifacts import log_inputs
from pipeline.config import PipelineConfig
from pipeline.tokenization import tokenize_dataset
from stages.entrypoint import run_stage


def tokenize(cfg: PipelineConfig) -> None:
    log_inputs(cfg.paths.raw_dir, cfg.paths.checkpoint_dir)
    tokenize_dataset(cfg.paths.raw_dir, cfg.paths.checkpoint_dir, cfg.paths.tokenized_dir,
                     cfg.tokenize.max_length, num_proc=cfg.runtime.num_proc)


if __name__ == "__main__":
    run_stage("tokenize", tokenize)
