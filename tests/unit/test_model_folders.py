"""Model folders that would run code when loaded are refused, in one line naming what and why."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.commands.predict import main as predict
from pipeline.contracts import check_model_folder
from pipeline.errors import CheckpointError
from pipeline.pretrained import snapshot_pretrained
from support import config_section


def _pickled_only(tmp_path, tiny_checkpoint):
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return folder


def test_pickled_weights_are_refused_by_name(tmp_path, tiny_checkpoint):
    folder = _pickled_only(tmp_path, tiny_checkpoint)
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights; refused "
                                              r"pytorch_model.bin: pickled weights can run code"):
        check_model_folder(folder, str(folder))


def test_a_config_asking_for_custom_code_is_refused(tmp_path, tiny_checkpoint):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: refused: it asks for custom code"):
        snapshot_pretrained(config_section("model", name="x", source="local", path=str(folder),
                                           revision=None), str(tmp_path / "pretrained"))
    assert not (tmp_path / "pretrained").exists()


def test_predict_on_a_pickled_model_is_one_line(tmp_path, tiny_checkpoint, capsys):
    folder = _pickled_only(tmp_path, tiny_checkpoint)
    assert predict(["--model", str(folder), "a fine film"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("predict: error: ")
    assert "refused pytorch_model.bin" in err[0]
