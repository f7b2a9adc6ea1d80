"""Tokenizing single texts and pairs: truncation without padding, segment ids, statistics,
one tokenizer pass per batch, and how many processes `auto` uses."""

import datasets
import pytest
from transformers import BatchEncoding

from pipeline.contracts import TEXT, TEXT_PAIR, load_pretrained_tokenizer
from pipeline.preparation import prepare_and_save
from pipeline.tokenization import (
    _UNTRUNCATED,
    ROWS_PER_PROCESS,
    encode_batch,
    length_stats,
    tokenize_dataset,
    tokenize_processes,
)
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


class CountingTokenizer:
    """The tokenizer, counting the rows it is asked to tokenize; ``slow``: without the backend
    encodings a fast tokenizer returns, as a slow (Python) tokenizer answers."""

    def __init__(self, tokenizer, slow: bool = False):
        self.tokenizer, self.slow, self.rows = tokenizer, slow, 0

    def __call__(self, texts, pairs=None, **kwargs):
        self.rows += len(texts)
        encoded = self.tokenizer(texts, pairs, **kwargs)
        return BatchEncoding(dict(encoded)) if self.slow else encoded

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def tokenizer_with(processor: str, tiny_checkpoint):
    """The tiny checkpoint's tokenizer (a template adding [CLS]/[SEP]), or it with BERT's legacy
    processor, or with no special tokens; or a byte-level BPE with RoBERTa's processor."""
    from tokenizers import ByteLevelBPETokenizer, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = load_pretrained_tokenizer(str(tiny_checkpoint))
    if processor == "template":
        return tokenizer
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    specials = {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    if processor == "bert":
        backend.post_processor = processors.BertProcessing(
            ("[SEP]", backend.token_to_id("[SEP]")), ("[CLS]", backend.token_to_id("[CLS]")))
    elif processor == "none":
        backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    else:
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(["the film was very great the plot really dull"] * 5,
                                vocab_size=300, special_tokens=["<s>", "<pad>", "</s>"])
        backend = bpe._tokenizer
        backend.post_processor = processors.RobertaProcessing(
            ("</s>", backend.token_to_id("</s>")), ("<s>", backend.token_to_id("<s>")))
        specials = {"pad_token": "<pad>", "cls_token": "<s>", "sep_token": "</s>"}
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=64, **specials)


@pytest.mark.parametrize("processor", ["template", "bert", "none", "roberta", "slow"])
@pytest.mark.parametrize("pairs", [False, True], ids=["single", "pairs"])
def test_encode_batch_is_the_truncating_tokenizer_in_one_pass(tiny_checkpoint, pairs, processor):
    tokenizer = tokenizer_with("template" if processor == "slow" else processor, tiny_checkpoint)
    max_length = 14 if pairs else 10
    # 6 to 20 tokens alone, 10 to 34 as pairs (either side the longer one), some exactly at
    # max_length.
    texts = ["the film was " + "very " * (i % 15) + "great" for i in range(40)]
    batch = {TEXT: texts}
    if pairs:
        batch[TEXT_PAIR] = ["the plot " + "really " * ((7 * i) % 11) + "dull" for i in range(40)]
    counting = CountingTokenizer(tokenizer, slow=processor == "slow")

    encoded = encode_batch(batch, counting, max_length)

    expected = tokenizer(texts, batch.get(TEXT_PAIR), truncation=True, max_length=max_length)
    assert list(encoded) == [*expected, _UNTRUNCATED]
    assert {key: encoded[key] for key in expected} == dict(expected)
    full = tokenizer(texts, batch.get(TEXT_PAIR), truncation=False)["input_ids"]
    assert encoded[_UNTRUNCATED] == [len(ids) for ids in full]
    assert any(len(ids) > max_length for ids in full) and any(len(ids) < max_length for ids in full)
    if pairs or processor == "slow":  # cut rows tokenized again, for their length
        at_max_length = sum(len(ids) == max_length for ids in expected["input_ids"])
        assert counting.rows == len(texts) + at_max_length
    else:
        assert counting.rows == len(texts)


def test_auto_uses_processes_only_for_large_splits_on_idle_cores():
    assert tokenize_processes(3, rows=10) == 3
    assert tokenize_processes("auto", rows=5000, cores=16, load=0.0) == 1
    assert tokenize_processes("auto", rows=2 * ROWS_PER_PROCESS, cores=16, load=0.0) == 2
    assert tokenize_processes("auto", rows=10 * ROWS_PER_PROCESS, cores=4, load=0.3) == 4
    assert tokenize_processes("auto", rows=10 * ROWS_PER_PROCESS, cores=4, load=2.0) == 2
    assert tokenize_processes("auto", rows=10 * ROWS_PER_PROCESS, cores=2, load=3.5) == 1
    assert tokenize_processes("auto", rows=0) == 1
