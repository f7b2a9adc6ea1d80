"""Training and inference speed: the pipeline against the plain recipes, side by side in one run.

    python bench/speed.py [--glue ../shared/data/glue] [--rounds 1] [--seeds 42 1 2] [--quick]
                          [--out speed.json]

Train: the course's plain Trainer recipe (bench/plain_recipe.py) and the train stage with the
preset a user would run (`mrpc_minilm`: MRPC, 3 epochs; `sst2_minilm` on 10,000 SST-2 training
sentences, 1 epoch, 64 tokens), same MiniLM-L6, rows, epochs and seed, each arm in a fresh
process, interleaved round by round. Per arm: training samples/s (rows x epochs / Trainer's
train_runtime, which includes the per-epoch validation and checkpoint writes), real (non-pad)
tokens/s, padding share, the process's wall time and peak RSS, validation accuracy and F1, and
the share of the matrix-multiply peak measured in the same run for the arm's precision (model
FLOPs 6 x non-embedding parameters x real tokens). With --seeds, each arm trains once per seed
(same prepared data) and its accuracy and F1 are the mean over the seeds, each seed's shown too:
one seed's accuracy on MRPC's 408 validation pairs has a standard error of about 2 points.

Inference, on the SST-2 validation sentences and the model the SST-2 pipeline arm trained:
`transformers.pipeline("text-classification", model=<folder>, top_k=None)` with its defaults
against the inference command's Classifier (fp32 and int8) and the evaluate stage's predictor,
interleaved; labels compared in fp32, accuracy compared for int8.

Also: each stage's start-up (bench/startup.py) and a no-op `dvc repro` in this checkout (when it
is up to date). --quick shrinks everything to a smoke run (figures meaningless).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT), str(PROJECT / "bench")]

TASKS = {
    # the snapshot's columns (pipeline.contracts): text, and text_pair for pairs
    "mrpc": {"overrides": ["experiment=mrpc_minilm"], "text": ["text", "text_pair"],
             "quick_rows": 96},
    "sst2": {"overrides": ["experiment=sst2_minilm", "train.max_train_samples=10000"],
             "text": ["text"], "quick_rows": 128},
}


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU model, cores, the flags that decide speed."""
    import torch

    flags, model = set(), platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    facts = {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
             "flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
             "torch": torch.__version__}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def matmul_peak(dtype_name: str) -> float:
    """TFLOP/s of a large square matrix product on this machine (CPU, or the GPU if present)."""
    import torch

    dtype = getattr(torch, dtype_name)
    cuda = torch.cuda.is_available()
    n = 8192 if cuda else 1024
    a = torch.randn(n, n, dtype=dtype, device="cuda" if cuda else "cpu")
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    repeats = 20 if cuda else 10
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12


def composed(task: str, glue: Path, work: Path, quick: bool, seed: int = 42) -> dict:
    """The config a user gets from the task's preset on the local GLUE copy, paths under work."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    spec = TASKS[task]
    overrides = [*spec["overrides"], "dataset.source=local", f"dataset.path={glue / task}",
                 f"seed={seed}"]
    if quick:
        overrides += [f"train.max_train_samples={spec['quick_rows']}", "train.num_train_epochs=1",
                      "train.max_eval_samples=64"]
    with initialize_config_dir(config_dir=str(PROJECT / "conf"), version_base="1.3"):
        config = OmegaConf.to_container(compose(config_name="config", overrides=overrides),
                                        resolve=True)
    config["paths"] = {key: str(work / value) for key, value in config["paths"].items()}
    config["tracking"]["pending_dir"] = str(work / "mlruns-pending")
    return config


def load(config_path: Path):
    from omegaconf import OmegaConf

    from pipeline.config import load_config

    return load_config(OmegaConf.load(config_path))


def run_arm(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one arm in a fresh process; its last stdout line is JSON. Adds the wall time."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=PROJECT)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]),
            "wall": time.perf_counter() - start}


def pipeline_train(config_path: Path, tracking: bool = True) -> None:
    """Inside an arm's process: the train stage on the composed config; prints its figures.
    Without ``tracking``, the stage's training alone (no MLflow run: for machines without it)."""
    cfg = load(config_path)
    if tracking:
        from stages.train import train

        metrics = train(cfg)
    else:
        from pipeline.training import train_model

        paths = cfg.paths
        metrics = train_model(cfg.train, cfg.head, cfg.runtime, seed=cfg.seed,
                              main_metric=cfg.dataset.main_metric, metrics=cfg.dataset.metrics,
                              pretrained_dir=paths.pretrained_dir,
                              tokenized_dir=paths.tokenized_dir, output_dir=paths.model_dir,
                              history_path=paths.history_path,
                              work_dir=paths.trainer_checkpoints_dir).eval_metrics
    history = json.loads(Path(cfg.paths.history_path).read_text())
    end = [entry for entry in history if "train_runtime" in entry]
    runtime = sum(entry["train_runtime"] for entry in end)
    import datasets

    rows = len(datasets.load_from_disk(cfg.paths.tokenized_dir)["train"])
    rows = min(rows, cfg.train.max_train_samples or rows)
    real = sum(entry["train_tokens_per_second"] * entry["train_runtime"] for entry in end)
    share = end[-1]["train_padding_share"]
    print(json.dumps({"train_rows": rows, "epochs": total_epochs(cfg),
                      "train_runtime": runtime, "real_tokens": real,
                      "batch_tokens": real / (1 - share), "accuracy": metrics["accuracy"],
                      "f1": metrics.get("f1"), "peak_rss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(task: str, glue: Path, work: Path, quick: bool, seed: int) -> Path:
    """Download and tokenize the task (both arms read the snapshot); the tokenize stage is
    timed against the plain ``map(batched=True)`` on the same rows."""
    from omegaconf import OmegaConf

    from stages.download import download
    from stages.tokenize import tokenize

    config = composed(task, glue, work / task, quick, seed)
    path = work / task / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(config), path)
    cfg = load(path)
    download(cfg)
    stages, plains = [], []
    for _ in range(1 if quick else 3):  # interleaved: a second or so each, so the median of 3
        start = time.perf_counter()
        tokenize(cfg)
        stages.append(time.perf_counter() - start)
        plains.append(plain_tokenize(cfg))
    stage, plain = statistics.median(stages), statistics.median(plains)
    print(f"{task}: tokenize stage {stage:.2f} s, plain map(batched=True) {plain:.2f} s, median "
          f"of {len(stages)} (stage / plain time {stage / plain:.2f})", flush=True)
    return path


def plain_tokenize(cfg) -> float:
    """Seconds of the plain recipe's tokenization of the same snapshot (every split), from
    reading the snapshot and loading the tokenizer to the written output, as the stage's time."""
    from transformers import AutoTokenizer

    from pipeline.contracts import load_snapshot

    start = time.perf_counter()
    snapshot = load_snapshot(cfg.paths.raw_dir)
    tokenizer = AutoTokenizer.from_pretrained(cfg.paths.pretrained_dir)
    encoded = snapshot.map(lambda b: tokenizer(*[b[c] for c in ("text", "text_pair") if c in b],
                                               truncation=True, max_length=cfg.tokenize.max_length),
                           batched=True, load_from_cache_file=False, keep_in_memory=True)
    with tempfile.TemporaryDirectory() as folder:  # the stage writes its output: so does this
        encoded.save_to_disk(folder)
    return time.perf_counter() - start


def with_seed(config_path: Path, seed: int) -> Path:
    """The task's config trained at another seed: a copy beside it (the prepared data stays)."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(config_path)
    if config.seed == seed:
        return config_path
    config.seed = seed
    path = config_path.with_name(f"config-seed{seed}.yaml")
    OmegaConf.save(config, path)
    return path


def train_rounds(tasks: list[str], configs: dict[str, Path], rounds: int, seeds: list[int],
                 env: dict[str, str], work: Path,
                 tracking: bool) -> dict[str, dict[str, list[dict]]]:
    results: dict[str, dict[str, list[dict]]] = {t: {"plain": [], "pipeline": []} for t in tasks}
    for round_, seed, task in itertools.product(range(rounds), seeds, tasks):
        config_path = with_seed(configs[task], seed)
        cfg = load(config_path)
        plain = [sys.executable, str(PROJECT / "bench" / "plain_recipe.py"),
                 "--raw", cfg.paths.raw_dir, "--model", cfg.paths.pretrained_dir,
                 "--text", *TASKS[task]["text"], "--epochs", str(total_epochs(cfg)),
                 "--max-length", str(load_stats(cfg)["max_length"]), "--seed", str(cfg.seed),
                 "--work", str(work / task / "plain")]
        if cfg.train.max_train_samples:
            plain += ["--max-rows", str(cfg.train.max_train_samples)]
        ours = [sys.executable, __file__, "--internal-train", str(config_path),
                *([] if tracking else ["--no-tracking"])]
        for arm, cmd in (("plain", plain), ("pipeline", ours)):
            result = {**run_arm(cmd, env), "seed": seed}
            results[task][arm].append(result)
            print(f"round {round_ + 1} seed {seed} {task} {arm}: "
                  f"{result['train_rows'] * result['epochs'] / result['train_runtime']:.1f} "
                  f"samples/s, accuracy {result['accuracy']:.4f}", flush=True)
    return results


def total_epochs(cfg) -> float:
    """Passes over the training rows, every phase of the strategy counted (two_phase: the
    head's, then everything's): the plain arm runs as many."""
    from pipeline.training import plan_phases

    return sum(phase.epochs for phase in plan_phases(cfg.train))


def load_stats(cfg) -> dict:
    from pipeline.contracts import load_tokenize_stats

    return load_tokenize_stats(cfg.paths.tokenized_dir)


def inference_rounds(config_path: Path, rounds: int) -> dict[str, Any]:
    """texts/s of transformers.pipeline against the inference command and the evaluate stage's
    predictor on the validation sentences, interleaved; labels and int8 accuracy compared."""
    import datasets
    import numpy as np
    import transformers

    from pipeline.contracts import LABEL, TEXT, load_snapshot
    from pipeline.evaluation import Predictor
    from pipeline.inference import Classifier

    cfg = load(config_path)
    model_dir = cfg.paths.model_dir
    split = load_snapshot(cfg.paths.raw_dir)["validation"]
    texts, gold = list(split[TEXT]), np.asarray(split[LABEL])
    tokenized = datasets.load_from_disk(cfg.paths.tokenized_dir)["validation"]
    names = split.features[LABEL].names
    reference = transformers.pipeline("text-classification", model=model_dir, top_k=None)
    import torch

    ours = {"fp32": Classifier(model_dir, precision="fp32")}
    auto = Classifier(model_dir)  # the default: bf16 where the hardware has it natively
    if auto.precision != "fp32":
        ours[f"auto ({auto.precision})"] = auto
    if not torch.cuda.is_available():  # int8 dynamic quantization is a CPU path
        ours["int8"] = Classifier(model_dir, quantize=True)
    predictors = {"fp32": Predictor(model_dir, cfg.runtime.eval_batch_size, precision="fp32")}
    default = Predictor(model_dir, cfg.runtime.eval_batch_size)
    if default.precision != "fp32":
        predictors[f"auto ({default.precision})"] = default
    timings: dict[str, list[float]] = {}
    labels: dict[str, list[str]] = {}

    def timed(name, call):
        start = time.perf_counter()
        out = call()
        timings.setdefault(name, []).append(len(texts) / (time.perf_counter() - start))
        return out

    rows = [{TEXT: text} for text in texts]
    for _ in range(rounds):
        answers = timed("transformers.pipeline", lambda: reference(texts))
        labels["transformers.pipeline"] = [max(a, key=lambda s: s["score"])["label"]
                                           for a in answers]
        for precision, classifier in ours.items():
            records = timed(f"predict {precision}", lambda c=classifier: list(c.predict(rows)))
            labels[f"predict {precision}"] = [r["label"] for r in records]
        for precision, predictor in predictors.items():
            logits = timed(f"evaluate {precision}", lambda p=predictor: p.logits(tokenized))
            labels[f"evaluate {precision}"] = [names[i] for i in logits.argmax(axis=-1)]
    accuracy = {name: float(np.mean([names.index(x) for x in found] == gold))
                for name, found in labels.items()}
    base = statistics.median(timings["transformers.pipeline"])
    return {"texts": len(texts), "texts_per_second": {k: statistics.median(v)
                                                        for k, v in timings.items()},
            "ratio": {k: statistics.median(v) / base for k, v in timings.items()},
            "labels_identical_to_pipeline": {
                k: labels[k] == labels["transformers.pipeline"] for k in labels},
            "accuracy": accuracy}


def noop_repro() -> list[float] | None:
    """Seconds of `dvc repro` in this checkout, three times, if it is up to date (else None)."""
    dvc = [str(Path(sys.executable).parent / "dvc")]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    status = subprocess.run([*dvc, "status", "--json"], cwd=PROJECT, capture_output=True,
                            text=True, env=env)
    if status.returncode or json.loads(status.stdout or "{}"):
        return None
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([*dvc, "repro"], cwd=PROJECT, capture_output=True, check=True, env=env)
        times.append(time.perf_counter() - start)
    return times


def model_flops_per_token(pretrained_dir: str) -> float:
    """6 x the non-embedding parameters of the checkpoint (training: forward and backward)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(pretrained_dir)
    d, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    return 6 * layers * (4 * d * d + 2 * d * ff)


def report(facts, peaks, train, inference, startup, repro, per_token) -> None:
    print(f"\nmachine: {facts}")
    print(f"matmul peak: fp32 {peaks['float32']:.2f} TFLOP/s, bf16 {peaks['bfloat16']:.2f}")
    for task, arms in train.items():
        print(f"\n{task}: {'arm':<9}{'samples/s':>10}{'tokens/s':>10}{'padding':>9}{'wall s':>8}"
              f"{'RSS MiB':>9}{'acc':>8}{'F1':>8}{'MFU':>8}")
        speed, seeds = {}, {}
        for arm, runs in arms.items():
            best = max(runs, key=lambda r: r["train_rows"] * r["epochs"] / r["train_runtime"])
            seeds[arm] = {r["seed"]: r for r in runs}  # deterministic: a seed's rounds agree
            accuracy = statistics.mean(r["accuracy"] for r in seeds[arm].values())
            f1s = [r["f1"] for r in seeds[arm].values() if r.get("f1") is not None]
            speed[arm] = statistics.median(r["train_rows"] * r["epochs"] / r["train_runtime"]
                                           for r in runs)
            tokens = statistics.median(r["real_tokens"] / r["train_runtime"] for r in runs)
            padding = 1 - best["real_tokens"] / best["batch_tokens"]
            peak = peaks[best.get("dtype", "float32")] * 1e12
            f1 = f"{statistics.mean(f1s):.4f}" if f1s else "-"
            print(f"{'':6}{arm:<9}{speed[arm]:>10.1f}{tokens:>10.0f}{padding:>9.1%}"
                  f"{best['wall']:>8.0f}{best.get('peak_rss_mib', 0):>9.0f}"
                  f"{accuracy:>8.4f}{f1:>8}{tokens * per_token / peak:>8.1%}")
        print(f"{'':6}pipeline / plain: {speed['pipeline'] / speed['plain']:.2f}x")
        if len(seeds["plain"]) > 1:
            print(f"{'':6}acc and F1 above: the mean over seeds " +
                  ", ".join(map(str, seeds["plain"])) + "; each seed:")
            for arm, runs in seeds.items():
                print(f"{'':8}{arm:<9}" + "  ".join(
                    f"{seed}: {r['accuracy']:.4f}"
                    + ("" if r.get("f1") is None else f"/{r['f1']:.4f}")
                    for seed, r in runs.items()))
    if inference:
        print(f"\ninference on {inference['texts']} SST-2 validation sentences:")
        for name, rate in inference["texts_per_second"].items():
            print(f"  {name:<24}{rate:>8.1f} texts/s  {inference['ratio'][name]:>5.2f}x  "
                  f"accuracy {inference['accuracy'][name]:.4f}  labels identical to pipeline: "
                  f"{inference['labels_identical_to_pipeline'][name]}")
    if startup:
        from startup import print_startup

        print()
        print_startup(startup)
    print("\nno-op dvc repro: " + (", ".join(f"{t:.2f} s" for t in repro) if repro else
                                   "not measured (checkout not up to date, --quick, --prepared)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--glue", type=Path, default=PROJECT.parent / "shared" / "data" / "glue")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hf-text-pipeline-bench"))
    parser.add_argument("--rounds", type=int, default=1, help="interleaved training rounds")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--quick", action="store_true", help="a smoke run, figures meaningless")
    parser.add_argument("--seed", type=int, default=42, help="of both arms (and data splits)")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="train both arms once per seed and compare mean accuracy (default: "
                        "--seed alone); the inference figures use the last seed's model")
    parser.add_argument("--out", type=Path, help="write every figure here as JSON")
    parser.add_argument("--prepare-only", action="store_true",
                        help="download and tokenize into --work, then stop")
    parser.add_argument("--prepared", action="store_true",
                        help="reuse --work's downloaded and tokenized data (e.g. carried to a GPU "
                        "machine) instead of preparing it")
    parser.add_argument("--no-tracking", action="store_true",
                        help="train without the MLflow run (where MLflow is not installed)")
    parser.add_argument("--internal-train", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.internal_train:
        return pipeline_train(args.internal_train, tracking=not args.no_tracking)

    import shutil

    if not args.prepared:
        shutil.rmtree(args.work, ignore_errors=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{args.work / 'mlflow.db'}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT),
                                                       os.environ.get("PYTHONPATH")]))}
    os.environ.update(env)
    facts = machine()
    peaks = {name: matmul_peak(name) for name in ("float32", "bfloat16")}
    configs = {task: args.work / task / "config.yaml" if args.prepared
               else prepare(task, args.glue, args.work, args.quick, args.seed)
               for task in args.tasks}
    if args.prepare_only:
        return None
    train = train_rounds(args.tasks, configs, args.rounds, args.seeds or [args.seed], env,
                         args.work, not args.no_tracking)
    for task in train:
        for run in train[task]["pipeline"]:
            run["dtype"] = "bfloat16" if _precision(configs[task]) == "bf16" else "float32"
    inference = inference_rounds(configs["sst2"], 1 if args.quick else 3) \
        if "sst2" in configs else None
    startup = repro = None
    if not args.prepared:  # figures of this checkout, not of data carried elsewhere
        from startup import measure_startup

        startup = measure_startup(repeats=1 if args.quick else 3)
        repro = None if args.quick else noop_repro()
    if args.out:
        args.out.write_text(json.dumps({"machine": facts, "matmul_peak_tflops": peaks,
                                        "train": train, "inference": inference,
                                        "startup": startup, "noop_repro": repro}, indent=1))
    pretrained = load(next(iter(configs.values()))).paths.pretrained_dir
    report(facts, peaks, train, inference, startup, repro, model_flops_per_token(pretrained))


def _precision(config_path: Path) -> str:
    from pipeline.training import resolve_precision

    return resolve_precision(load(config_path).train.precision)[1]


if __name__ == "__main__":
    main()
