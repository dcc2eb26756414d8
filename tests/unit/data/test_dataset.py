"""Prompt datasets from local parquet/jsonl files written here: DAPO-Math-17k / AIME-2024 layout and the simple
layout; chat templates; every kind of bad row is an error naming row and column, or skipped and reported."""
import json
import logging

import pandas as pd
import pytest

from megatron_rl.data import DataError, PromptDataConfig, build_prompt_dataset

DAPO_INSTRUCTION = ("Solve the following math problem step by step. The last line of your response should be of the "
                    "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{}\n\n"
                    "Remember to put your answer on its own line after \"Answer:\".")


def dapo_row(problem, answer, index, data_source="math_dapo"):
    """A row exactly as in BytedTsinghua-SIA/DAPO-Math-17k and AIME-2024 (column names, nesting, field order)."""
    return {
        "data_source": data_source,
        "prompt": [{"content": DAPO_INSTRUCTION.format(problem), "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": index},
    }


@pytest.fixture
def dapo_parquet(tmp_path):
    rows = [dapo_row("What is 1+1?", "2", "a1"), dapo_row("Find x if 2x=1.", "\\frac{1}{2}", "a2"),
            dapo_row("Compute 6*7.", "42", "a3", data_source="aime")]
    path = tmp_path / "dapo.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def config(path, tmp_path, **overrides):
    return PromptDataConfig(path=str(path), cache_dir=str(tmp_path / "hf_cache"), **overrides)


def test_dapo_layout_parquet(dapo_parquet, tmp_path, tiny_tokenizer):
    dataset = build_prompt_dataset(config(dapo_parquet, tmp_path), tiny_tokenizer)
    assert len(dataset) == 3 and dataset.report.skipped == [] and dataset.report.num_rows == 3
    first = dataset[0]
    expected_text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": DAPO_INSTRUCTION.format("What is 1+1?")}], add_generation_prompt=True,
        tokenize=False)
    assert first.prompt_text == expected_text and expected_text.endswith("<|im_start|>assistant\n")
    assert first.prompt_token_ids == tiny_tokenizer(expected_text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(first.prompt_token_ids) == expected_text
    assert [e.ground_truth for e in dataset] == ["2", "\\frac{1}{2}", "42"]
    assert [e.data_source for e in dataset] == ["math_dapo", "math_dapo", "aime"]
    assert [e.extra_info for e in dataset] == [{"index": "a1"}, {"index": "a2"}, {"index": "a3"}]
    assert [e.row for e in dataset] == [0, 1, 2]


def test_aime_2024_layout_parquet(tmp_path, tiny_tokenizer):
    """An AIME-2024 evaluation file in the DAPO release's layout: the same columns as DAPO-Math-17k, integer
    answers stored as strings, each problem repeated (avg@k by repetition): every copy is kept, in file order."""
    problems = [("Find the number of ordered pairs ...", "33"), ("Let x be the least ...", "902")]
    rows = [dapo_row(problem, answer, f"aime-{p}", data_source="aime_2024")
            for p, (problem, answer) in enumerate(problems) for _ in range(3)]
    path = tmp_path / "aime-2024.parquet"
    pd.DataFrame(rows).to_parquet(path)
    dataset = build_prompt_dataset(config(path, tmp_path), tiny_tokenizer)
    assert dataset.report.num_rows == 6 and dataset.report.skipped == []
    assert [e.ground_truth for e in dataset] == ["33"] * 3 + ["902"] * 3
    assert [e.data_source for e in dataset] == ["aime_2024"] * 6
    assert dataset[0].prompt_token_ids == dataset[2].prompt_token_ids != dataset[3].prompt_token_ids
    assert dataset[3].messages == [{"role": "user", "content": DAPO_INSTRUCTION.format("Let x be the least ...")}]


def test_dapo_layout_jsonl_and_a_system_prompt(tmp_path, tiny_tokenizer):
    path = tmp_path / "aime.jsonl"
    path.write_text("".join(json.dumps(dapo_row(f"Problem {i}", i, f"id{i}")) + "\n" for i in range(4)))
    dataset = build_prompt_dataset(config(path, tmp_path, system_prompt="Think."), tiny_tokenizer)
    assert [e.ground_truth for e in dataset] == ["0", "1", "2", "3"]  # integer answers become strings
    assert dataset[0].messages[0] == {"role": "system", "content": "Think."}
    assert dataset[0].prompt_text.startswith("<|im_start|>system\nThink.<|im_end|>\n<|im_start|>user\n")


def test_simple_layout_with_configured_columns_and_template(tmp_path, tiny_tokenizer):
    path = tmp_path / "simple.parquet"
    pd.DataFrame({"question": ["What is 3+4?", "What is 2+2?"], "solution": ["7", "4"]}).to_parquet(path)
    dataset = build_prompt_dataset(config(path, tmp_path, layout="simple", prompt_key="question",
                                          ground_truth_key="solution", data_source="synthetic/arithmetic",
                                          prompt_template="{prompt} Put the answer in \\boxed{}."), tiny_tokenizer)
    assert dataset[0].messages == [{"role": "user", "content": "What is 3+4? Put the answer in \\boxed{}."}]
    assert [e.ground_truth for e in dataset] == ["7", "4"]
    assert dataset[1].data_source == "synthetic/arithmetic"  # no data_source column: the configured one


def test_without_chat_template_the_raw_text_is_tokenized(tmp_path, tiny_tokenizer):
    path = tmp_path / "simple.jsonl"
    path.write_text(json.dumps({"prompt": "3+4=", "answer": "7"}) + "\n")
    dataset = build_prompt_dataset(config(path, tmp_path, layout="simple", apply_chat_template=False),
                                   tiny_tokenizer)
    assert dataset[0].prompt_text == "3+4="
    assert dataset[0].prompt_token_ids == tiny_tokenizer("3+4=")["input_ids"]


def test_a_tokenizer_without_chat_template_is_a_clear_error(dapo_parquet, tmp_path, tiny_tokenizer):
    import copy

    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    with pytest.raises(DataError, match="has no chat_template.*apply_chat_template=false"):
        build_prompt_dataset(config(dapo_parquet, tmp_path), plain)


def test_missing_columns_name_the_column_and_list_what_is_there(tmp_path, tiny_tokenizer):
    path = tmp_path / "wrong.parquet"
    pd.DataFrame({"question": ["q"], "reward_model": [{"ground_truth": "1"}]}).to_parquet(path)
    with pytest.raises(DataError, match=r"missing column\(s\) \['prompt'\].*columns \['question', 'reward_model'\]"):
        build_prompt_dataset(config(path, tmp_path), tiny_tokenizer)
    with pytest.raises(DataError, match=r"missing column\(s\) \['answer'\]"):
        build_prompt_dataset(config(path, tmp_path, layout="simple", prompt_key="question"), tiny_tokenizer)


BAD_ROWS = [
    # (row, problem column, reason fragment)
    ({"prompt": [{"role": "user", "content": "   "}], "reward_model": {"ground_truth": "1"}}, "prompt", "empty prompt"),
    ({"prompt": [], "reward_model": {"ground_truth": "1"}}, "prompt", "got an empty list"),
    ({"prompt": None, "reward_model": {"ground_truth": "1"}}, "prompt", "missing"),
    ({"prompt": "plain text", "reward_model": {"ground_truth": "1"}}, "prompt", "expected a non-empty list"),
    ({"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "1"}}, "prompt", "content is NoneType"),
    ({"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": ""}},
     "reward_model.ground_truth", "empty ground truth"),
    ({"prompt": [{"role": "user", "content": "q"}], "reward_model": None}, "reward_model.ground_truth", "missing"),
    ({"prompt": [{"role": "user", "content": "q"}], "reward_model": {"style": "rule"}},
     "reward_model.ground_truth", "missing"),
]
GOOD_ROW = {"prompt": [{"role": "user", "content": "What is 1+1?"}], "reward_model": {"ground_truth": "2"}}


@pytest.fixture
def messy_jsonl(tmp_path):
    path = tmp_path / "messy.jsonl"
    rows = [GOOD_ROW] + [row for row, _, _ in BAD_ROWS] + [GOOD_ROW]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_malformed_rows_are_an_error_listing_every_row_and_column(messy_jsonl, tmp_path, tiny_tokenizer):
    with pytest.raises(DataError) as caught:
        build_prompt_dataset(config(messy_jsonl, tmp_path), tiny_tokenizer)
    message = str(caught.value)
    assert f"{len(BAD_ROWS)} invalid rows" in message and "data.on_invalid=skip" in message
    for row, (_, column, reason) in enumerate(BAD_ROWS, start=1):
        assert f"row {row}, column {column!r}: " in message
        assert reason in message


def test_malformed_rows_are_skipped_counted_and_listed_when_configured(messy_jsonl, tmp_path, tiny_tokenizer,
                                                                       caplog):
    with caplog.at_level(logging.WARNING):
        dataset = build_prompt_dataset(config(messy_jsonl, tmp_path, on_invalid="skip"), tiny_tokenizer)
    assert [e.row for e in dataset] == [0, len(BAD_ROWS) + 1]
    report = dataset.report
    assert report.num_rows == len(BAD_ROWS) + 2 and report.num_examples == 2
    assert [(issue.row, issue.column) for issue in report.skipped] == [
        (row, column) for row, (_, column, _) in enumerate(BAD_ROWS, start=1)]
    assert all(reason in issue.reason for issue, (_, _, reason) in zip(report.skipped, BAD_ROWS))
    assert f"skipped {len(BAD_ROWS)} ({len(BAD_ROWS)} invalid)" in caplog.text and "row 1, column 'prompt': empty prompt" in caplog.text


def test_over_long_prompts_error_or_skip(dapo_parquet, tmp_path, tiny_tokenizer):
    lengths = [len(e.prompt_token_ids) for e in build_prompt_dataset(config(dapo_parquet, tmp_path), tiny_tokenizer)]
    limit = sorted(lengths)[1]  # exactly one prompt is longer
    longest = lengths.index(max(lengths))
    assert sum(n > limit for n in lengths) == 1
    with pytest.raises(DataError, match=rf"1 over-long prompts: row {longest}, column 'prompt': prompt is "
                                        rf"{max(lengths)} tokens, longer than data.max_prompt_len={limit}"):
        build_prompt_dataset(config(dapo_parquet, tmp_path, max_prompt_len=limit), tiny_tokenizer)
    dataset = build_prompt_dataset(config(dapo_parquet, tmp_path, max_prompt_len=limit, on_overlong="skip"),
                                   tiny_tokenizer)
    assert longest not in [e.row for e in dataset] and len(dataset) == 2
    assert [issue.row for issue in dataset.report.skipped] == [longest]
    assert "kept 2 of 3 rows; skipped 1 (1 overlong)" in dataset.report.summary()


def test_nothing_usable_is_an_error_even_when_skipping(tmp_path, tiny_tokenizer):
    path = tmp_path / "empty_prompts.jsonl"
    path.write_text(json.dumps({"prompt": "", "answer": "1"}) + "\n")
    with pytest.raises(DataError, match="no usable prompts.*kept 0 of 1 rows"):
        build_prompt_dataset(config(path, tmp_path, layout="simple", on_invalid="skip"), tiny_tokenizer)


def test_max_examples_reads_the_head(dapo_parquet, tmp_path, tiny_tokenizer):
    dataset = build_prompt_dataset(config(dapo_parquet, tmp_path, max_examples=2), tiny_tokenizer)
    assert [e.row for e in dataset] == [0, 1] and dataset.report.num_rows == 2


@pytest.mark.parametrize("name, content, message", [
    ("missing.parquet", None, "data.path: file not found"),
    ("data.csv", "a,b\n", "must all be .parquet or all .jsonl"),
    ("broken.jsonl", '{"prompt": "q", "answer": "1"}\n{not json\n', "cannot read"),
])
def test_unreadable_files(tmp_path, tiny_tokenizer, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        build_prompt_dataset(config(path, tmp_path, layout="simple"), tiny_tokenizer)


@pytest.mark.parametrize("overrides, message", [
    ({"path": ""}, "data.path: is required"), ({"layout": "chat"}, "data.layout"),
    ({"on_invalid": "ignore"}, "data.on_invalid"), ({"max_prompt_len": 0}, "data.max_prompt_len"),
    ({"layout": "simple", "prompt_template": "no placeholder"}, "must contain '{prompt}'"),
    ({"prompt_template": "{prompt}!"}, "simple layout only"),
])
def test_bad_config_names_the_setting(overrides, message):
    with pytest.raises(ValueError, match=message):
        PromptDataConfig(**{"path": "x.parquet", **overrides})
