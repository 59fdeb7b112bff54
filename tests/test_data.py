"""Data loading, validation, splitting, templating and tensors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from kd_core.data.sources import DataError, check_report, normalize_rows, read_file
from kd_core.data.split import split_rows
from kd_core.data.template import format_prompt
from kd_core.data.tokenize import IGNORE_INDEX, CausalCollator, encode_example, left_pad, train_bpe_tokenizer

ROWS = [{"id": f"r{i}", "instruction": f"say {i}", "context": "", "response": f"number {i}", "category": "c"}
        for i in range(200)]


def _normalize(path, **kw):
    defaults = dict(field_map={}, max_chars=200, template="minimal", id_prefix="x")
    return normalize_rows(read_file(path), **(defaults | kw))


def test_jsonl_bad_rows_are_counted_with_their_line(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"instruction": "a", "response": "b"}).encode(),
             json.dumps({"instruction": "", "response": "b"}).encode(),          # empty field
             json.dumps({"instruction": "a"}).encode(),                          # missing field
             b'{"instruction": "caf\xe9", "response": "x"}',                     # not UTF-8
             json.dumps({"instruction": "a" * 500, "response": "b"}).encode()]   # too long
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows, report = _normalize(path)
    assert len(rows) == 1 and report.total == 5 and report.kept == 1
    assert sum(report.bad.values()) == 4
    assert any(f"{path}:4: not valid UTF-8" in e for e in report.examples)
    assert any(f"{path}:2: missing or empty" in e for e in report.examples)
    with pytest.raises(DataError, match=r"4 of 5 rows are bad .*max_bad_fraction=0.5"):
        check_report(report, 0.5, str(path))
    check_report(report, 0.9, str(path))  # within the allowed share: no error


def test_malformed_json_line_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "a", "response": \n')
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON"):
        _normalize(path)


def test_empty_after_filtering_and_missing_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "", "response": ""}) + "\n")
    rows, report = _normalize(path)
    with pytest.raises(DataError, match="no valid rows"):
        check_report(report, 1.0, str(path))
    with pytest.raises(DataError, match="data file not found"):
        read_file(tmp_path / "missing.jsonl")
    text_file = tmp_path / "d.txt"
    text_file.write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        read_file(text_file)


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_tabular_and_json_with_field_map(tmp_path, suffix):
    frame = pd.DataFrame({"q": ["what?", "why?"], "a": ["this", "that"], "ctx": ["", "because"]})
    path = tmp_path / f"d{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        path.write_text(json.dumps(frame.to_dict(orient="records")))
    rows, report = _normalize(path, field_map={"instruction": "q", "response": "a", "context": "ctx"})
    assert report.kept == 2
    assert rows[1]["instruction"] == "why?" and rows[1]["context"] == "because" and rows[1]["response"] == "that"


def test_a_mapped_column_that_is_missing_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"q": "what?", "answer": "this"}) + "\n")
    rows, report = _normalize(path, field_map={"instruction": "q", "response": "output"})
    assert report.kept == 0 and report.to_dict()["bad"] == {"missing or empty field(s) 'response' (column 'output')": 1}


def test_split_is_deterministic_disjoint_and_stable_under_additions():
    a = split_rows(ROWS, 0.1, 0.2, seed=0)
    b = split_rows(list(reversed(ROWS)), 0.1, 0.2, seed=0)
    assert a == b  # independent of input order
    ids = [r["id"] for part in a.values() for r in part]
    assert sorted(ids) == sorted(r["id"] for r in ROWS)  # a partition
    assert 20 <= len(a["test"]) <= 60 and 5 <= len(a["val"]) <= 40
    more = split_rows(ROWS + [dict(ROWS[0], id="new")], 0.1, 0.2, seed=0)
    for name in a:  # old rows keep their split
        assert {r["id"] for r in a[name]} <= {r["id"] for r in more[name]}
    assert split_rows(ROWS, 0.1, 0.2, seed=1) != a
    with pytest.raises(ValueError, match="duplicate row ids"):
        split_rows(ROWS + ROWS[:1], 0.1, 0.1, 0)


def test_template_with_and_without_context():
    p = format_prompt({"instruction": " add ", "context": "1 and 2"}, "alpaca")
    assert p.startswith("Below is an instruction") and "### Input:\n1 and 2" in p and p.endswith("### Response:\n")
    q = format_prompt({"instruction": "add", "context": ""}, "minimal")
    assert q == "### Instruction:\nadd\n### Response:\n"


@pytest.fixture(scope="module")
def tokenizer():
    texts = [format_prompt(r, "minimal") + r["response"] for r in ROWS]
    return train_bpe_tokenizer(texts, vocab_size=300)


def test_labels_cover_response_and_eos_only(tokenizer):
    row = ROWS[3]
    ex = encode_example(row, tokenizer, "minimal", max_length=64)
    n_prompt = len(tokenizer(format_prompt(row, "minimal"))["input_ids"])
    assert all(l == IGNORE_INDEX for l in ex.labels[:n_prompt])
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex.labels[n_prompt:-1]) == row["response"]


def test_overlong_truncate_or_drop(tokenizer):
    row = dict(ROWS[0], response="number " * 40)
    full = encode_example(row, tokenizer, "minimal", max_length=512)
    cut = encode_example(row, tokenizer, "minimal", max_length=20)
    assert len(full.input_ids) > 20 and len(cut.input_ids) == 20 and cut.input_ids == full.input_ids[:20]
    assert encode_example(row, tokenizer, "minimal", max_length=20, overlong="drop") is None
    assert encode_example(row, tokenizer, "minimal", max_length=3) is None  # no response token fits


def test_collator_right_pads_and_left_pad_for_generation(tokenizer):
    feats = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = CausalCollator(pad_token_id=1)(feats)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=1)
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long


def test_loss_on_prompt_labels_every_token(tokenizer):
    row = ROWS[5]
    ex = encode_example(row, tokenizer, "minimal", max_length=64, loss_on_prompt=True)
    assert ex.labels == ex.input_ids
    plain = encode_example(row, tokenizer, "minimal", max_length=64)
    assert plain.input_ids == ex.input_ids and IGNORE_INDEX in plain.labels


def test_digits_are_single_tokens(tokenizer):
    assert tokenizer.tokenize("sum 1234")[-4:] == ["1", "2", "3", "4"]


def test_chatml_template_matches_the_chat_format():
    with_ctx = format_prompt({"instruction": " Sum ", "context": "1 and 2 "}, "chatml")
    assert with_ctx == "<|im_start|>user\nSum\n\n1 and 2<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt({"instruction": "Hi", "context": ""}, "chatml") == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_max_rows_keeps_the_first_valid_rows():
    from kd_core.config import parse_config
    from kd_core.stages.prepare import load_main_rows as _load_main_rows
    from tests.conftest import tiny_params

    full, _ = _load_main_rows(parse_config(tiny_params()))
    params = tiny_params()
    params["data"] = {**params["data"], "max_rows": 50}
    cut, _ = _load_main_rows(parse_config(params))
    assert len(full) > 50 and cut == full[:50]


def test_real_model_profile_is_valid():
    from kd_core.config import load_config
    from tests.conftest import REPO

    cfg = load_config(REPO / "bench/smollm2.yaml")
    assert cfg.data.template == "chatml" and cfg.teacher.model.gguf_file
    assert {s.train_data for n, s in cfg.students.items() if n != "sft"} == set(cfg.transfer_sets)


def test_cross_tokenizer_real_model_profile_is_valid():
    """bench/gemma_smollm2.yaml: a GGUF teacher SFT'd with LoRA, GGUF students of another family with methods that
    work across tokenizers (text only, or `cross_tokenizer`), every KD student on the teacher's answers."""
    from kd_core.config import load_config
    from kd_core.config.methods import METHOD_SPECS
    from tests.conftest import REPO

    cfg = load_config(REPO / "bench/gemma_smollm2.yaml")
    assert cfg.teacher.train and cfg.teacher.finetune == "lora" and cfg.teacher.model.gguf_file
    for name, st in cfg.students.items():
        spec = METHOD_SPECS[st.method]
        assert st.model.gguf_file != cfg.teacher.model.gguf_file, name
        assert spec.cross_tokenizer or not spec.needs_teacher, name
        assert st.train_data == ("train" if st.method == "sft" else "teacher_responses"), name


def test_rows_of_one_prompt_land_in_one_split():
    """Several answers to one prompt, or one row given twice: all in the same split (before, each row was split by
    its own id, and a test prompt was also a training prompt; 20 rows given four times put 11 of 11 test prompts
    in train)."""
    base = [{"id": f"r{i}", "instruction": f"say {i}", "context": "", "response": f"ok {i}"} for i in range(20)]
    rows = [dict(r, id=f"{r['id']}-{k}", response=r["response"] + ("" if k % 2 else " again")) for k in range(4)
            for r in base]
    splits = split_rows(rows, 0.2, 0.3, seed=0)
    prompts = {name: {r["instruction"] for r in part} for name, part in splits.items()}
    assert prompts["train"] and prompts["val"] and prompts["test"]
    assert not (prompts["train"] & prompts["test"]) and not (prompts["train"] & prompts["val"])
    assert not (prompts["val"] & prompts["test"])
    assert all(len(part) == 4 * len(prompts[name]) for name, part in splits.items())  # each prompt's 4 rows together
    from kd_core.stages.prepare import repeats

    assert repeats(rows) == {"repeated_prompts": 60, "duplicate_rows": 40}
