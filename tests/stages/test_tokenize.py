"""The tokenize stage's output depends on its inputs alone: the same bytes whatever
runtime.num_proc, and truncation statistics of the texts' full, untruncated lengths."""

from pathlib import Path

import pytest

from pipeline.contracts import TEXT, TEXT_PAIR, load_pretrained_tokenizer, load_snapshot
from pipeline.preparation import prepare_and_save
from pipeline.tokenization import length_stats, tokenize_dataset
from support import config_section


def snapshot(tmp_path: Path, pairs: bool) -> Path:
    """40 rows, from 4 to about 20 tokens (pairs: up to about 30), as the download stage saves
    them."""
    source = tmp_path / "source"
    source.mkdir()
    header = "sentence1\tsentence2\tlabel" if pairs else "sentence\tlabel"
    rows = [header]
    for i in range(40):
        first = f"the film was {'very ' * (i % 15)}great {i}"
        rows.append(f"{first}\tthe plot {'really ' * ((7 * i) % 11)}dull\t{i % 2}" if pairs
                    else f"{first}\t{i % 2}")
    (source / "train.tsv").write_text("\n".join(rows) + "\n")
    extra = {"text_pair_column": "sentence2"} if pairs else {}
    cfg = config_section("dataset", name="rows", source="local", path=str(source), format="tsv",
                         text_column="sentence1" if pairs else "sentence", validation_size=0.2,
                         test_size=0.2, **extra)
    prepare_and_save(cfg, 0, str(tmp_path / "raw"))
    return tmp_path / "raw"


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("pairs", [False, True], ids=["single", "pairs"])
def test_output_is_the_same_bytes_whatever_num_proc(tmp_path, tiny_checkpoint, pairs):
    raw = snapshot(tmp_path, pairs)
    outputs = {}
    for num_proc in (1, 2, "auto"):
        stats = tokenize_dataset(str(raw), str(tiny_checkpoint), str(tmp_path / f"tok{num_proc}"),
                                 max_length=12, num_proc=num_proc)
        outputs[num_proc] = files(tmp_path / f"tok{num_proc}")
    assert outputs[1] == outputs[2] == outputs["auto"]

    tokenizer = load_pretrained_tokenizer(str(tiny_checkpoint))
    for name, split in load_snapshot(str(raw)).items():
        full = tokenizer(list(split[TEXT]), list(split[TEXT_PAIR]) if pairs else None)["input_ids"]
        assert stats["splits"][name] == length_stats([len(ids) for ids in full], 12)
    assert stats["splits"]["train"]["truncated_examples"] > 0
