"""The project's DVC remote as a team uses it: the default remote (a folder beside the checkout)
takes a `dvc push` with no set-up; `dvc remote modify --local` points a clone at an SSH server
(Debian's OpenSSH, started here on 127.0.0.1); a fresh clone pulls what was pushed to the same
hashes with nothing left to run, and applies a pushed experiment with its model."""

from __future__ import annotations

import getpass
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from support import (
    compose_params,
    dvc_executable,
    free_port,
    make_project,
    run,
    subprocess_env,
    tiny_overrides,
)

SSHD = Path("/usr/sbin/sshd")  # sshd re-executes itself, so it must be started by absolute path
DEFAULT_REMOTE = "hf-text-pipeline-dvc-remote"  # .dvc/config's remote, beside the checkout
UP_TO_DATE = "Data and pipelines are up to date."
MODEL_WEIGHTS = Path("models/model/model.safetensors")
EXPERIMENT = "lr-3e-3"


def _wait_for_banner(port: int, server: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    """Wait until sshd answers with its protocol banner; fail with its log if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, f"sshd exited:\n{log.read_text()[-3000:]}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
                if connection.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"sshd: no banner in {timeout:g} s:\n" \
                                            f"{log.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.fixture
def ssh_remote(tmp_path):
    """OpenSSH's sshd in the foreground on a free 127.0.0.1 port, with its own host key and one
    client key authorised for this user (keys only: no password, no PAM); yields the URL of an
    empty store folder, the client key and the folder."""
    if not SSHD.exists() or not shutil.which("ssh-keygen"):
        if os.environ.get("REQUIRE_SSHD"):
            pytest.fail(f"{SSHD} is not installed (apt-get install openssh-server)")
        pytest.skip(f"{SSHD} is not installed (apt-get install openssh-server)")
    folder = tmp_path / "sshd"
    folder.mkdir()
    for key in ("host_key", "client_key"):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], folder)
    shutil.copy(folder / "client_key.pub", folder / "authorized_keys")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # root's sshd drops privileges there
    port = free_port()
    config = folder / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {folder / 'host_key'}",
        f"PidFile {folder / 'sshd.pid'}", f"AuthorizedKeysFile {folder / 'authorized_keys'}",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no",
        "Subsystem sftp internal-sftp", ""]))
    log_path = folder / "sshd.log"
    store = tmp_path / "ssh-store"
    store.mkdir()
    with open(log_path, "w") as log:
        server = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_banner(port, server, log_path)
            yield f"ssh://{getpass.getuser()}@127.0.0.1:{port}{store}", folder / "client_key", \
                store
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def _tiny_experiment(corpus: Path, checkpoint: Path) -> dict:
    """conf/experiment/tiny.yaml: the tiny fixtures, so `dvc exp run -S experiment=tiny ...`
    composes the same params.yaml as the committed baseline."""
    return {
        "defaults": [{"override /dataset": "glue_sst2"}, {"override /train": "smoke"}],
        "dataset": {"name": "tiny_sentiment", "source": "local", "path": str(corpus),
                    "format": "jsonl", "revision": None, "metrics": None, "id_column": None,
                    "submission_name": None},
        "model": {"name": "tiny_bert", "source": "local", "path": str(checkpoint),
                  "revision": None, "base_model": None, "license": None},
        "tokenize": {"max_length": 32},
        "train": {"num_train_epochs": 2, "learning_rate": 1e-3, "max_train_samples": None,
                  "max_eval_samples": None},
        "tracking": {"log_model": False},
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _outputs(root: Path) -> list[Path]:
    """Every output dvc.lock records."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return [root / out["path"] for stage in lock["stages"].values()
            for out in stage.get("outs", [])]


def _stored_files(store: Path) -> int:
    return sum(1 for path in (store / "files" / "md5").rglob("*") if path.is_file())


def test_a_fresh_clone_pulls_over_ssh_what_was_pushed_and_applies_a_pushed_experiment(
        tmp_path, ssh_remote, tiny_corpus, tiny_checkpoint):
    url, key, ssh_store = ssh_remote
    dvc = dvc_executable()
    env = subprocess_env(SSH_AUTH_SOCK=None)  # the key named in config.local, not an agent's
    origin = tmp_path / "origin.git"
    alice = make_project(tmp_path / "alice" / "project",
                         compose_params(tiny_overrides(tiny_corpus, tiny_checkpoint)))
    (alice / "conf" / "experiment" / "tiny.yaml").write_text(
        "# @package _global_\n" + yaml.safe_dump(_tiny_experiment(tiny_corpus, tiny_checkpoint),
                                                 sort_keys=False))
    run([sys.executable, "-c", "import os; from dvc.utils.hydra import compose_and_dump; "
         "compose_and_dump('params.yaml', os.path.abspath('conf'), None, 'config', os.getcwd(), "
         "['experiment=tiny'])"], alice, env=env)
    run([dvc, "repro"], alice, env=env)
    run(["git", "add", "-A"], alice)
    run(["git", "commit", "-qm", "tiny baseline"], alice)
    run(["git", "clone", "-q", "--bare", str(alice), str(origin)], tmp_path)
    run(["git", "remote", "add", "origin", str(origin)], alice)

    # Out of the box: the default remote, a folder beside the checkout.
    run([dvc, "push"], alice, env=env)
    default_store = alice.parent / DEFAULT_REMOTE
    pushed = _stored_files(default_store)
    assert pushed > 0, f"nothing pushed to {default_store}"

    # The team's SSH server, in .dvc/config.local (not committed).
    for option, value in (("url", url), ("keyfile", str(key))):
        run([dvc, "remote", "modify", "--local", "storage", option, value], alice, env=env)
    run([dvc, "push"], alice, env=env)
    assert _stored_files(ssh_store) == pushed

    bob = tmp_path / "bob" / "project"
    run(["git", "clone", "-q", str(origin), str(bob)], tmp_path)
    for option, value in (("url", url), ("keyfile", str(key))):
        run([dvc, "remote", "modify", "--local", "storage", option, value], bob, env=env)
    run([dvc, "pull"], bob, env=env)
    assert not (bob.parent / DEFAULT_REMOTE).exists()
    assert all(path.exists() for path in _outputs(bob)), _outputs(bob)
    assert _sha256(bob / MODEL_WEIGHTS) == _sha256(alice / MODEL_WEIGHTS)
    assert UP_TO_DATE in run([dvc, "status"], bob, env=env).stdout
    assert UP_TO_DATE in run([dvc, "repro"], bob, env=env).stdout
    assert (bob / "dvc.lock").read_text() == (alice / "dvc.lock").read_text()

    baseline_weights = _sha256(alice / MODEL_WEIGHTS)
    run([dvc, "exp", "run", "-n", EXPERIMENT, "-S", "experiment=tiny",
         "-S", "train.learning_rate=3e-3"], alice, env=env)
    weights, lock = _sha256(alice / MODEL_WEIGHTS), (alice / "dvc.lock").read_text()
    assert weights != baseline_weights
    run([dvc, "exp", "push", "origin", EXPERIMENT], alice, env=env)

    run([dvc, "exp", "pull", "origin", EXPERIMENT], bob, env=env)
    run([dvc, "exp", "apply", EXPERIMENT], bob, env=env)
    assert _sha256(bob / MODEL_WEIGHTS) == weights
    assert (bob / "dvc.lock").read_text() == lock
    assert UP_TO_DATE in run([dvc, "status"], bob, env=env).stdout
