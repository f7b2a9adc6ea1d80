"""The project's default DVC remote: a folder beside the checkout, so `dvc push` works in a new
clone with no set-up and never writes inside the workspace."""

from __future__ import annotations

from pathlib import Path

from dvc.config import Config

from support import PROJECT


def test_the_default_dvc_remote_is_a_folder_beside_the_checkout():
    # The committed .dvc/config alone: a developer's config.local may point it elsewhere.
    config = Config(dvc_dir=str(PROJECT / ".dvc"), validate=False).load_one("repo")
    name = config["core"].get("remote")
    assert name, ".dvc/config names no default remote (dvc remote add -d)"
    assert Path(config["remote"][name]["url"]) == PROJECT.parent / "hf-text-pipeline-dvc-remote"
