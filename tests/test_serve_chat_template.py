"""The chat template travels with the model: found where transformers looks, carried byte for byte
by every conversion, and `rosetool generate --chat` equals transformers' apply_chat_template + generate."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from chat_model import OTHER_TEMPLATE, TEMPLATE, build_chat_model, hf_chat_greedy
from rosetool.errors import RosetoolError
from rosetool.serve.chat_template import chat_prompt_ids, find_chat_template

CARRIED = ("chat_template.jinja", "tokenizer_config.json", "tokenizer.json", "generation_config.json")
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where is the fox?"}]


@pytest.fixture(scope="module", params=[False, True], ids=["jinja", "tokenizer_config"])
def chat_hf(request, tmp_path_factory):
    return build_chat_model(tmp_path_factory.mktemp("chat") / "hf", in_tokenizer_config=request.param)


def test_template_found_where_transformers_reads_it(chat_hf, tmp_path):
    assert find_chat_template(chat_hf) == TEMPLATE
    assert AutoTokenizer.from_pretrained(chat_hf).chat_template == TEMPLATE
    override = tmp_path / "other.jinja"
    override.write_text(OTHER_TEMPLATE)
    assert find_chat_template(chat_hf, override) == OTHER_TEMPLATE
    with pytest.raises(RosetoolError, match="missing.jinja: no such file"):
        find_chat_template(chat_hf, tmp_path / "missing.jinja")


def test_named_templates_pick_default(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert find_chat_template(tmp_path) == "D"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    assert find_chat_template(tmp_path) is None


def test_rendering_equals_transformers(chat_hf):
    tokenizer = AutoTokenizer.from_pretrained(chat_hf)
    for add in (True, False):
        expected = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=add, return_dict=True)["input_ids"]
        assert chat_prompt_ids(tokenizer, TEMPLATE, MESSAGES, add) == expected
    parts = [{"role": "user", "content": [{"type": "text", "text": "Where is "}, {"type": "text", "text": "the fox?"}]}]
    assert chat_prompt_ids(tokenizer, TEMPLATE, parts) == chat_prompt_ids(tokenizer, TEMPLATE, MESSAGES[1:])
    with pytest.raises(RosetoolError, match="no chat template"):
        chat_prompt_ids(tokenizer, None, MESSAGES)
    with pytest.raises(RosetoolError, match="chat template: roles"):
        chat_prompt_ids(tokenizer, "{{ raise_exception('roles must alternate') }}", MESSAGES)


@pytest.mark.parametrize("route", ["native", "megatron", "megatron_dist"])
def test_template_survives_round_trips_byte_for_byte(chat_hf, tmp_path, cli, route):
    steps = {"native": [("convert", "hf-to-native"), ("export-hf",)],
             "megatron": [("convert", "hf-to-megatron", "--tp", "2"), ("convert", "megatron-to-hf")],
             "megatron_dist": [("convert", "hf-to-megatron", "--format", "torch_dist"), ("export-hf",)]}[route]
    middle, back = tmp_path / route, tmp_path / "hf"
    for cmd, src, dst in ((steps[0], chat_hf, middle), (steps[1], middle, back)):
        result = cli(*cmd, src, dst)
        assert result.code == 0, result.err
    for name in CARRIED:
        if (chat_hf / name).exists():
            assert (back / name).read_bytes() == (chat_hf / name).read_bytes(), name
    assert find_chat_template(back) == TEMPLATE
    assert find_chat_template(middle) == TEMPLATE   # the runtime and `serve` read the middle format too


def test_generate_chat_equals_transformers(chat_hf, cli, tmp_path):
    expected = hf_chat_greedy(chat_hf, MESSAGES[1:], max_new_tokens=12)
    result = cli("generate", chat_hf, MESSAGES[1]["content"], "--chat", "--temperature", "0", "--max-tokens", "12",
                 "--device", "cpu", "--dtype", "float32")
    assert result.code == 0, result.err
    assert result.out == expected + "\n"
    override = tmp_path / "other.jinja"
    override.write_text(OTHER_TEMPLATE)
    expected = hf_chat_greedy(chat_hf, MESSAGES[1:], max_new_tokens=12, template=OTHER_TEMPLATE)
    result = cli("generate", chat_hf, MESSAGES[1]["content"], "--chat", "--chat-template", override,
                 "--temperature", "0", "--max-tokens", "12", "--device", "cpu", "--dtype", "float32")
    assert result.code == 0 and result.out == expected + "\n"


def test_generate_chat_without_template_is_a_one_line_error(cli, gpt2_hf):
    result = cli("generate", gpt2_hf, "hi", "--chat", "--max-tokens", "2")
    assert result.code == 2
    assert "no chat template" in result.err and "Traceback" not in result.err


def test_serve_refuses_bad_model_or_template_in_one_line(cli, gpt2_hf, tmp_path):
    for args, message in (([tmp_path / "nowhere"], "no such file or folder"),
                          ([gpt2_hf, "--chat-template", tmp_path / "missing.jinja"], "missing.jinja: no such file")):
        result = cli("serve", *args, "--port", "1")
        assert result.code == 2 and message in result.err and "Traceback" not in result.err
