"""Tokenizing single texts and pairs: truncation without padding, segment ids, statistics."""

import datasets

from pipeline.preparation import prepare_and_save
from pipeline.tokenization import length_stats, tokenize_dataset
from support import config_section


def test_pairs_get_segment_ids_and_are_truncated_not_padded(tmp_path, tiny_checkpoint):
    source = tmp_path / "source"
    source.mkdir()
    rows = ["sentence1\tsentence2\tlabel"]
    rows += [f"the film was great {' very' * (i % 9)}\tthe plot was dull {i}\t{i % 2}"
             for i in range(30)]
    (source / "train.tsv").write_text("\n".join(rows) + "\n")
    cfg = config_section("dataset", name="pairs", source="local", path=str(source), format="tsv",
                         text_column="sentence1", text_pair_column="sentence2",
                         validation_size=0.2, test_size=0.2)
    prepare_and_save(cfg, 0, str(tmp_path / "raw"))
    stats = tokenize_dataset(str(tmp_path / "raw"), str(tiny_checkpoint), str(tmp_path / "tok"),
                             max_length=14)
    train = datasets.load_from_disk(str(tmp_path / "tok"))["train"]
    for ids, segments in zip(train["input_ids"], train["token_type_ids"]):
        assert len(ids) == len(segments) <= 14
        assert segments[0] == 0 and segments[-1] == 1  # second text is segment 1
    assert len({len(ids) for ids in train["input_ids"]}) > 1
    assert stats["splits"]["train"]["truncated_examples"] > 0
    assert set(stats["columns"]) == {"labels", "input_ids", "token_type_ids", "attention_mask"}


def test_length_stats():
    stats = length_stats([10, 20, 30, 40], max_length=25)
    assert stats["examples"] == 4
    assert stats["tokens"] == 10 + 20 + 25 + 25
    assert stats["truncated_examples"] == 2 and stats["truncation_rate"] == 0.5
    assert stats["length_max"] == 40
