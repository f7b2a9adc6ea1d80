"""DVC stage `tokenize`: paths.raw_dir -> paths.tokenized_dir (Arrow), with the pretrained
tokenizer."""

from pipeline.artifacts import log_inputs
from pipeline.config import PipelineConfig
from pipeline.tokenization import tokenize_dataset
from stages.entrypoint import run_stage

PARAMS = ["tokenize"]


def tokenize(cfg: PipelineConfig) -> None:
    log_inputs(cfg.paths.raw_dir, cfg.paths.pretrained_dir)
    tokenize_dataset(cfg.paths.raw_dir, cfg.paths.pretrained_dir, cfg.paths.tokenized_dir,
                     cfg.tokenize.max_length, num_proc=cfg.runtime.num_proc)


if __name__ == "__main__":
    run_stage("tokenize", tokenize, PARAMS)
