"""Prompt files: JSONL and Parquet rows through the chat template; bad rows fail at start naming
file and line; the epoch order resumes exactly from the cursor alone, shuffled across epochs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launchers.file_task import PromptEncoder, eval_sets, file_task, load_tokenizer
from launchers.prompt_data import EpochOrder, read_rows
from policies.chat import prompt_ids
from runtime.config import ConfigError
from tests.launchers.chat_model import build_chat_model

ROWS = [
    {"input": "what is 3 + 4", "label": 7, "metadata": {"terms": 2}},
    {"input": [{"role": "system", "content": "1"}, {"role": "user", "content": "2 + 2"}], "label": "4"},
    {"input": "what is 1 + 1", "label": "2", "metadata": json.dumps({"terms": 2})},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_chat_model(tmp_path_factory.mktemp("chat_model"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def write_parquet(path: Path, rows: list, key: str = "input") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{key: r["input"], "label": str(r["label"])} for r in rows]), path)
    return path


def test_jsonl_rows_through_the_chat_template(tmp_path: Path, model_dir: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    task = file_task(model_dir=str(model_dir), prompt_data=str(path), input_key="input", label_key="label",
                     metadata_key="metadata", apply_chat_template=True, template_kwargs="", shuffle=False, seed=0)
    tok = task.tokenizer
    first, second, third = (task.train_prompt(i) for i in range(3))
    assert first.text == "<|user|> what is 3 + 4 <|end|> <|assistant|> "
    assert first.input_ids == tok("<|user|> what is 3 + 4 <|end|> <|assistant|> ",
                                  add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(second.input_ids)[:3] == ["<|system|>", "1", "<|end|>"]  # messages kept as given
    assert (first.label, second.label) == ("7", "4")  # numbers become text
    assert first.metadata == {"terms": 2} and third.metadata == {"terms": 2} and second.metadata == {}
    # stop tokens: the generation config's end-of-turn token and the tokenizer's EOS
    assert task.stop_token_ids == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")})
    assert task.train_prompt(3).input_ids == first.input_ids and task.train_prompt(3).index == 3  # epoch 2


def test_parquet_rows_plain_text_and_messages(tmp_path: Path, model_dir: Path) -> None:
    texts = [r for r in ROWS if isinstance(r["input"], str)]
    path = write_parquet(tmp_path / "p.parquet", texts)
    read = read_rows(path, input_key="input", label_key="label")
    assert [r.input for r in read] == [r["input"] for r in texts]
    assert read[1].where == f"{path}:row 2"
    tok = load_tokenizer(model_dir)
    prompts = PromptEncoder(tok, apply_chat_template=False).prompts(read, flag="--prompt-data")
    assert prompts[0].text == "what is 3 + 4"  # no template: the text as it is
    assert prompts[0].input_ids == prompt_ids(tok, "what is 3 + 4", apply_chat_template=False)[1]
    # a messages column (list of structs) comes back as messages
    msgs = read_rows(write_parquet(tmp_path / "m.parquet", [ROWS[1]], key="messages"), input_key="messages")
    assert msgs[0].input == ROWS[1]["input"]
    prompt, = PromptEncoder(tok, apply_chat_template=True).prompts(msgs, flag="--prompt-data")
    assert prompt.text == "<|system|> 1 <|end|> <|user|> 2 + 2 <|end|> <|assistant|> "


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "what is 1 + 1", "label": "2"}, "no key 'input'"),
    ({"input": 3, "label": "2"}, "'input' must be a non-empty string or a list of messages, got int"),
    ({"input": [{"role": "user"}], "label": "2"}, "message 0 is not a {role, content} object"),
    ({"input": "what is 1 + 1"}, "no key 'label'"),
    ({"input": "what is 1 + 1", "label": [2]}, "'label' must be a string or a number, got list"),
    ({"input": "what is 1 + 1", "label": "2", "metadata": [1]}, "'metadata' must be an object, got list"),
])
def test_a_bad_row_names_file_and_line(tmp_path: Path, row: dict, reason: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], ROWS[2], row])
    with pytest.raises(ConfigError) as err:
        read_rows(path, input_key="input", label_key="label", metadata_key="metadata")
    assert err.value.flag == "--prompt-data"
    assert err.value.reason.startswith(f"{path}:3: ") and reason in err.value.reason


def test_bad_json_and_messages_without_a_template(tmp_path: Path, model_dir: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"broken.jsonl:2: not a JSON object"):
        read_rows(path, input_key="input")
    path = write_jsonl(tmp_path / "msgs.jsonl", ROWS[:2])
    with pytest.raises(ConfigError, match=r"msgs.jsonl:2: a messages prompt needs --apply-chat-template"):
        file_task(model_dir=str(model_dir), prompt_data=str(path), input_key="input", label_key="label",
                  metadata_key="", apply_chat_template=False, template_kwargs="", shuffle=False, seed=0)
    with pytest.raises(ConfigError, match="--apply-chat-template-kwargs: must be a JSON object"):
        PromptEncoder(load_tokenizer(model_dir), apply_chat_template=True, template_kwargs="[1]")


def test_eval_sets_are_named_and_read_like_prompt_data(tmp_path: Path, model_dir: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    b = write_jsonl(tmp_path / "b.jsonl", ROWS[1:])
    encoder = PromptEncoder(load_tokenizer(model_dir), apply_chat_template=True)
    sets = eval_sets(["easy", str(a), "hard", str(b)], encoder, input_key="input", label_key="label",
                     metadata_key="metadata")
    assert list(sets) == ["easy", "hard"] and [len(v) for v in sets.values()] == [1, 2]
    with pytest.raises(ConfigError, match="--eval-prompt-data: the name 'easy' is given twice"):
        eval_sets(["easy", str(a), "easy", str(b)], encoder, input_key="input", label_key="label", metadata_key="")


def test_epoch_order_resumes_from_the_cursor_across_an_epoch_boundary() -> None:
    n = 7
    run = EpochOrder(n, shuffle=True, seed=5)
    full = [run(c) for c in range(3 * n)]
    epochs = [full[i * n:(i + 1) * n] for i in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)  # each epoch visits every row once
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled each epoch
    assert epochs[0] != list(range(n))
    for cursor in (n - 2, n, 2 * n - 1):  # a checkpoint's cursor mid-epoch, at and before a boundary
        resumed = EpochOrder(n, shuffle=True, seed=5)  # a new process: nothing but the cursor
        assert [resumed(c) for c in range(cursor, 3 * n)] == full[cursor:]
    assert [EpochOrder(n, shuffle=False, seed=5)(c) for c in range(2 * n)] == list(range(n)) * 2
    assert [EpochOrder(n, shuffle=True, seed=6)(c) for c in range(n)] != epochs[0]  # the seed matters
