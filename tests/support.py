"""Helpers for tests that build and run a copy of the project (imported by conftest and tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
SHARED_GLUE = PROJECT.parent / "shared" / "data" / "glue"


def tiny_overrides(corpus: Path, checkpoint: Path) -> list[str]:
    """Hydra overrides that point the default composition at the tiny fixtures."""
    return [
        "dataset=glue_sst2",
        "dataset.name=tiny_sentiment",
        "dataset.source=local",
        f"dataset.path={corpus}",
        "dataset.format=jsonl",
        "dataset.revision=null",
        "dataset.metrics=null",  # the task's usual set: accuracy, f1, macro_f1, mcc
        "dataset.id_column=null",
        "dataset.submission_name=null",
        "model.name=tiny_bert",
        "model.source=local",
        f"model.path={checkpoint}",
        "model.revision=null",
        "model.base_model=null",
        "model.license=null",
        "tokenize.max_length=32",
        "train=smoke",
        "train.num_train_epochs=2",
        "train.learning_rate=1e-3",
        "train.max_train_samples=null",
        "train.max_eval_samples=null",
    ]


def paths_under(root: Path) -> list[str]:
    """Overrides that put every path of conf/ (data, models, checkpoints, ...) under ``root``."""
    return [f"paths.{key}={root / value}" for key, value in compose_params([])["paths"].items()]


def compose_params(overrides: list[str]) -> dict:
    """Compose conf/ exactly as DVC's Hydra integration does, resolved."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(PROJECT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def config_section(section_name: str, overrides: list[str] | tuple[str, ...] = (), **values):
    """Section ``section_name`` of conf/'s composition (with Hydra ``overrides``), ``values``
    replacing keys, validated into its dataclass. The dataset section starts from
    conf/base/dataset.yaml, not from the default dataset, so a test names only what its data
    needs."""
    import yaml
    from omegaconf import OmegaConf

    from pipeline.config import SECTIONS, load_section

    if section_name == "dataset":
        section = yaml.safe_load((PROJECT / "conf" / "base" / "dataset.yaml").read_text())
    else:
        section = compose_params(list(overrides))[section_name]
    return load_section(OmegaConf.create({section_name: {**section, **values}}), section_name,
                        SECTIONS[section_name])


def run_stages(cfg, *stages: str) -> None:
    """Run stage functions in-process as `python -m stages.<stage>` does: each on the view of
    ``cfg`` its PARAMS declare, so reading an undeclared value fails the test."""
    import importlib

    from pipeline.config import declared_view

    for stage in stages:
        module = importlib.import_module(f"stages.{stage}")
        getattr(module, stage)(declared_view(cfg, stage, module.PARAMS))


def make_project(root: Path, params: dict, with_git: bool = True) -> Path:
    """A copy of the project (code, conf, dvc.yaml) with its own params.yaml, as a git+DVC repo."""
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    for name in ("conf", "pipeline", "stages", "hydra_plugins"):
        shutil.copytree(PROJECT / name, root / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("/mlflow.db\n/mlflow.db.lock\n/mlartifacts/\n/checkpoints/\n"
                                     "/multirun/\n/.state/\n")
    if with_git:
        run(["git", "init", "-q"], root)
        run(["git", "config", "user.email", "ci@example.invalid"], root)
        run(["git", "config", "user.name", "ci"], root)
        run([dvc_executable(), "init", "-q"], root)
        shutil.copy(PROJECT / ".dvc" / "config", root / ".dvc" / "config")  # Hydra composition on
        run(["git", "add", "-A"], root)
        run(["git", "commit", "-qm", "project"], root)
    return root


def dvc_executable() -> str:
    return str(Path(sys.executable).parent / "dvc")


def dvc_experiments(shown: list) -> dict[str, dict]:
    """``dvc exp show --json`` as {experiment name: its params.yaml and metrics.json data}."""
    found = {}

    def walk(node, in_experiments=False):  # the baseline commit sits outside "experiments"
        if isinstance(node, dict):
            data = node.get("data")
            if in_experiments and node.get("name") and isinstance(data, dict) \
                    and data.get("params"):
                found[node["name"]] = {
                    "params": data["params"]["params.yaml"]["data"],
                    "metrics": (data.get("metrics") or {}).get("metrics/metrics.json", {})
                    .get("data", {})}
            for key, value in node.items():
                walk(value, in_experiments or key == "experiments")
        elif isinstance(node, list):
            for value in node:
                walk(value, in_experiments)

    walk(shown)
    return found


def subprocess_env(**overrides: str | None) -> dict:
    """The test's environment, with this interpreter's bin folder first on PATH (as `make` does);
    an override of None removes the variable."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(url: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll ``url`` until it answers; fail with the end of ``log`` if ``server`` exits first or
    ``timeout`` seconds pass."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, f"{url}: the server exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            assert time.monotonic() < deadline, \
                f"{url}: no answer in {timeout:g} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)


def chromium(auth: tuple[str, str] | None = None):
    """Headless Chromium (Debian's chromium and chromium-driver packages) through Selenium;
    with ``auth``, every request carries it as HTTP basic auth (credentials in the URL do not
    reach the XHRs of MLflow's single-page app)."""
    import base64

    import pytest

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are not installed (apt-get install chromium "
                        "chromium-driver)")
        pytest.skip("chromium and chromedriver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1600,1400"):
        options.add_argument(argument)
    session = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    if auth:
        token = base64.b64encode(":".join(auth).encode()).decode()
        session.execute_cdp_cmd("Network.enable", {})
        session.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                                {"headers": {"Authorization": f"Basic {token}"}})
    return session


def page_text(browser) -> str:
    """All of the page's text, also what is scrolled out of view: MLflow draws its params and
    metrics tables as virtualized grids, whose rows exist only once scrolled to."""
    import time

    seen = browser.execute_script("return document.body.textContent")
    for grid in browser.find_elements("css selector", ".ReactVirtualized__Grid"):
        step = max(50, grid.get_property("clientHeight") // 2)
        for top in range(0, grid.get_property("scrollHeight") + step, step):
            browser.execute_script("arguments[0].scrollTop = arguments[1]", grid, top)
            time.sleep(0.2)
            seen += grid.get_property("textContent")
    return seen


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 600,
        env: dict | None = None, umask: int = -1) -> subprocess.CompletedProcess:
    """Run ``cmd`` (with ``umask`` where given, else the test's); fail with its output."""
    done = subprocess.run(cmd, cwd=cwd, env=env or subprocess_env(), capture_output=True,
                          text=True, timeout=timeout, umask=umask)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                             f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


# Words the tiny checkpoint's vocabulary knows (see conftest._vocabulary).
_GLUE_WORDS = ["the", "film", "plot", "cast", "story", "was", "is", "really", "quite", "very",
               "and", "with", "a", "great", "dull", "charming", "awful", "superb", "boring"]


def write_glue_fixture(root: Path, dataset: dict, rows: int = 24) -> Path:
    """Parquet splits with the Hub schema of the GLUE task ``dataset`` (a composed dataset
    config): its text columns, ``idx``, and a ClassLabel (or float score) ``label``; the test
    splits are unlabelled (-1) as on the Hub. MNLI gets its matched and mismatched splits."""
    import random

    import datasets

    rng = random.Random(dataset["name"])
    regression = dataset["task"] == "regression"
    names = dataset.get("label_names") or []
    features = {dataset["text_column"]: datasets.Value("string")}
    if dataset.get("text_pair_column"):
        features[dataset["text_pair_column"]] = datasets.Value("string")
    features["label"] = (datasets.Value("float32") if regression
                         else datasets.ClassLabel(names=names))
    features["idx"] = datasets.Value("int32")
    splits = ["train", "validation_matched", "validation_mismatched", "test_matched",
              "test_mismatched"] if dataset["subset"] == "mnli" else ["train", "validation", "test"]
    root.mkdir(parents=True, exist_ok=True)
    for split in splits:
        count = rows if split == "train" else rows // 2
        columns: dict[str, list] = {name: [] for name in features}
        for i in range(count):
            label = rng.uniform(0, 5) if regression else i % len(names)
            # The label shows in the text, so a model can learn something in a few steps.
            cue = ("great" if label > 2.5 else "dull") if regression else \
                ["great", "dull", "charming"][label % 3]
            for column in features:
                if column in (dataset["text_column"], dataset.get("text_pair_column")):
                    filler = " ".join(rng.choice(_GLUE_WORDS) for _ in range(rng.randint(2, 8)))
                    columns[column].append(f"{split.split('_')[0]} {cue} {filler} {i}")
            columns["label"].append(-1 if split.startswith("test") else label)
            columns["idx"].append(i)
        table = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
        table.to_parquet(str(root / f"{split}.parquet"))
    return root


def assert_same_predictions(predicted: list[dict], written: list[dict]) -> None:
    """Inference output equals the evaluate stage's predictions: same labels, and the same
    probabilities (or scores) up to the last of their six rounded decimals."""
    from pytest import approx

    assert len(predicted) == len(written)
    for ours, theirs in zip(predicted, written):
        if "score" in theirs:
            assert ours["score"] == approx(theirs["score"], abs=2e-6)
            continue
        assert ours["label"] == theirs["label"]
        assert ours["probabilities"].keys() == theirs["probabilities"].keys()
        for name, probability in theirs["probabilities"].items():
            assert ours["probabilities"][name] == approx(probability, abs=2e-6)
