"""DVC experiments as users compare them, on the tiny config: `make exps` at a terminal's width,
the training curves in `dvc plots diff` and its offline page (looked at in headless Chromium),
and a Hydra sweep's best job run again as a DVC experiment."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from support import (
    PROJECT,
    compose_params,
    dvc_executable,
    make_project,
    run,
    subprocess_env,
    tiny_overrides,
)

SCREENSHOTS = PROJECT / "test-artifacts"
WIDTH = 120
# 48 training rows in batches of 8 for 2 epochs, a log entry per step, an evaluation per epoch.
TRAIN_STEPS = list(range(1, 13))
EVALUATION_STEPS = [6, 12]
# The project copy's commands (the console script would import the checkout it was installed from).
COMMAND = [sys.executable, "-m", "pipeline.commands"]


@pytest.fixture(scope="module")
def experiments(tmp_path_factory, tiny_corpus, tiny_checkpoint):
    """A project whose committed baseline has no results, then two DVC experiments: `first` by
    `dvc exp run`, and the best job of a two-job sweep by `hf-text-pipeline exp-from-sweep`."""
    root = make_project(tmp_path_factory.mktemp("experiments") / "project",
                        compose_params(tiny_overrides(tiny_corpus, tiny_checkpoint)))
    shutil.copy(PROJECT / "Makefile", root / "Makefile")
    (root / "conf" / "experiment" / "tiny.yaml").write_text("# @package _global_\n" + yaml.dump({
        "defaults": [{"override /dataset": "glue_sst2"}, {"override /train": "smoke"}],
        "dataset": {"name": "tiny_sentiment", "source": "local", "path": str(tiny_corpus),
                    "format": "jsonl", "revision": None, "metrics": None, "id_column": None,
                    "submission_name": None},
        "model": {"name": "tiny_bert", "source": "local", "path": str(tiny_checkpoint),
                  "revision": None},
        "tokenize": {"max_length": 32},
        "train": {"num_train_epochs": 2, "learning_rate": 1e-3, "max_train_samples": None,
                  "max_eval_samples": None},
        "tracking": {"log_model": False},
    }, sort_keys=False))
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "tiny experiment"], root)
    env = subprocess_env(MLFLOW_TRACKING_URI=None)
    run([dvc_executable(), "exp", "run", "-n", "first", "-S", "experiment=tiny"], root, env=env)
    run([sys.executable, "-m", "stages.train", "-m", "train.learning_rate=1e-2,3e-3"], root,
        env=env)
    (sweep_dir,) = (root / "multirun").glob("*/*")
    refused = run([*COMMAND, "exp-from-sweep", str(sweep_dir)], root, check=False, env=env)
    promoted = run([*COMMAND, "exp-from-sweep", str(sweep_dir), "-S", "experiment=tiny"], root,
                   env=env)
    return root, env, sweep_dir, refused, promoted


def _jobs(sweep_dir: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in sweep_dir.glob("*/job.json")),
                  key=lambda job: job["num"])


def _best(sweep_dir: Path) -> dict:
    return max(_jobs(sweep_dir), key=lambda job: job["validation"][job["main_metric"]])


def _experiment_name(sweep_dir: Path) -> str:
    """exp-from-sweep's default name: the sweep's time of day (its folder's name is
    <time>-<pid>) and the job."""
    return f"sweep-{sweep_dir.name.rsplit('-', 1)[0]}-job{_best(sweep_dir)['num']}"


def test_make_exps_fits_120_columns_with_the_changed_params_and_the_metrics(experiments):
    root, env, sweep_dir, *_ = experiments
    shown = run(["make", "-s", "exps", f"BIN={Path(sys.executable).parent}"], root,
                env={**env, "COLUMNS": str(WIDTH)}).stdout
    lines = shown.splitlines()
    assert lines and max(len(line) for line in lines) <= WIDTH, shown
    header = next(line for line in lines if "Experiment" in line)
    assert "train.learning_rate" in header.split(), shown
    assert {"test.accuracy", "test.mcc"} <= set(header.split()), shown
    assert "…" not in header, f"columns collapsed:\n{shown}"
    assert "[first]" in shown and f"[{_experiment_name(sweep_dir)}]" in shown, shown
    for hidden in ("paths.", "tracking.", "runtime.", "stages/", "data/", "validation.",
                   "examples", "Created"):
        assert hidden not in header, (hidden, shown)


def test_plots_diff_holds_both_experiments_loss_curves(experiments):
    root, env, sweep_dir, *_ = experiments
    revisions = ["first", _experiment_name(sweep_dir)]
    done = run([dvc_executable(), "plots", "diff", *revisions, "--json"], root, env=env)
    plots = json.loads(done.stdout)
    assert not plots.get("errors"), plots["errors"]
    assert {"loss", "learning_rate", "validation", "metrics/confusion.csv"} <= set(plots["data"])
    (loss,) = plots["data"]["loss"]
    assert loss["revisions"] == revisions
    values = loss["content"]["data"]["values"]
    for revision in revisions:
        steps = {name: [int(v["step"]) for v in values
                        if v["rev"] == revision and v["filename"] == name]
                 for name in ("train.tsv", "validation.tsv")}
        assert steps == {"train.tsv": TRAIN_STEPS, "validation.tsv": EVALUATION_STEPS}, revision
        assert all(float(v["loss"]) > 0 for v in values if v["rev"] == revision)
    (validation,) = plots["data"]["validation"]  # the dataset's main metric per evaluation
    points = validation["content"]["data"]["values"]
    for revision in revisions:
        assert [int(v["step"]) for v in points if v["rev"] == revision] == EVALUATION_STEPS
        assert all(0 <= float(v["accuracy"]) <= 1 for v in points if v["rev"] == revision)


def _offline_chromium():
    """Headless Chromium that can reach nothing on the network: a page that needs a CDN stays
    blank."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("chromium and chromedriver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1600,1400", "--proxy-server=http://127.0.0.1:9",
                     "--host-resolver-rules=MAP * ~NOTFOUND"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


# Each plot vega-embed drew: its id, how many canvases and svgs it holds, and where it is.
_DRAWN = """
return Array.from(document.querySelectorAll('div[id].vega-embed')).map(plot => {
  const box = plot.getBoundingClientRect();
  return [plot.id, plot.querySelectorAll('canvas, svg').length,
          [box.left, box.top, box.right, box.bottom].map(v => Math.round(v * devicePixelRatio))];
});
"""


def _inked(screenshot: Path, box: list[int]) -> int:
    """Pixels of ``box`` in the screenshot that are neither white nor light grey."""
    from PIL import Image

    with Image.open(screenshot) as image:
        left, top, right, bottom = box
        region = image.convert("L").crop((max(left, 0), max(top, 0), min(right, image.width),
                                          min(bottom, image.height)))
        return sum(1 for value in region.getdata() if value < 200)


def test_offline_plots_page_draws_every_plot_in_headless_chromium(experiments, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    root, env, sweep_dir, *_ = experiments
    run([*COMMAND, "offline-plots"], root, env=env)
    out = tmp_path / "plots"
    run([dvc_executable(), "plots", "diff", "first", _experiment_name(sweep_dir), "-o",
         str(out)], root, env=env)
    page = (out / "index.html").read_text()
    assert "<script src=" not in page, "the page loads scripts from elsewhere"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    screenshot = SCREENSHOTS / "dvc-plots-offline.png"
    browser = _offline_chromium()
    try:
        browser.get((out / "index.html").as_uri())
        with contextlib.suppress(TimeoutException):  # the assertions below say what is missing
            WebDriverWait(browser, 60).until(
                lambda b: len(b.execute_script(_DRAWN)) >= 4
                and all(elements for _, elements, _ in b.execute_script(_DRAWN)))
        drawn = browser.execute_script(_DRAWN)
        browser.save_screenshot(str(screenshot))
        errors = [entry["message"] for entry in browser.get_log("browser")
                  if entry["level"] == "SEVERE"]
    finally:
        browser.quit()
    assert not errors, errors
    assert {plot for plot, *_ in drawn} >= {"loss", "learning_rate", "validation"}, drawn
    assert any("confusion" in plot for plot, *_ in drawn), drawn
    for plot, elements, box in drawn:
        # A drawn plot: axes, labels and lines or cells, thousands of dark pixels.
        assert elements and _inked(screenshot, box) > 2000, (plot, elements, box)
    assert screenshot.stat().st_size > 10_000


def test_a_sweeps_best_job_becomes_a_dvc_experiment_that_trains_the_same(experiments):
    root, env, sweep_dir, _, promoted = experiments
    best = _best(sweep_dir)
    assert f"dvc exp run -n {_experiment_name(sweep_dir)} -S experiment=tiny " \
           f"-S {best['overrides'][0]}" in promoted.stderr
    shown = json.loads(run([dvc_executable(), "exp", "show", "--json"], root, env=env).stdout)
    rates = {exp["name"]: exp["data"]["params"]["params.yaml"]["data"]["train"]["learning_rate"]
             for baseline in shown for exp in (baseline.get("experiments") or [])
             for exp in [exp["revs"][0]]}
    assert rates[_experiment_name(sweep_dir)] == best["config"]["train"]["learning_rate"]
    # The experiment ran in the workspace: its curves are the job's, step for step.
    for name in ("train.tsv", "validation.tsv"):
        assert (root / "metrics" / "curves" / name).read_text() == \
            (sweep_dir / str(best["num"]) / "curves" / name).read_text(), name


def test_exp_from_sweep_refuses_a_composition_that_is_not_the_jobs(experiments):
    """The project's params.yaml came from `-S experiment=tiny`: without it, conf/ composes
    another dataset and model, and the command says so instead of running them."""
    *_, refused, _ = experiments
    assert refused.returncode == 1
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("exp-from-sweep: error: ")
    assert "dataset.name: \"tiny_sentiment\" in the job, \"bbc_news\" from conf/" in line
    assert "-S experiment=<name>" in line
