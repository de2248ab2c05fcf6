"""Text in and out: tokenizer prompts, streamed deltas, stop strings cut exactly, and the CLI."""

import pytest
import typer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from typer.testing import CliRunner

from rosetool.cli.generate import generate
from rosetool.runtime import LLM, SamplingParams
from test_runtime_engine import save_random_model

CORPUS = ["the quick brown fox jumps over the lazy dog", "paged attention keeps blocks of keys",
          "héllo wörld, ünïcode text — with dashes"] * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny GPT-2 with a real byte-level BPE tokenizer trained offline on a few sentences."""
    path = tmp_path_factory.mktemp("gpt2-text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=tok.get_vocab_size(),
                        n_positions=128, bos_token_id=0, eos_token_id=1)
    save_random_model(GPT2LMHeadModel(config), path)
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, dtype="float32", device="cpu", block_size=4)


def stream(llm, prompt, params):
    rid = llm.add_request(prompt, params)
    deltas, last = [], None
    while llm.has_unfinished():
        for event in llm.step():
            if event.request_id == rid:
                deltas.append(event.text_delta)
                last = event
    return "".join(deltas), last


def test_text_matches_decode_and_stream(llm):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    out = llm.generate(["the quick brown"], params)[0]
    assert out.prompt_token_ids == llm.tokenizer.encode("the quick brown")
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    streamed, last = stream(llm, "the quick brown", params)
    assert streamed == out.text and last.finished and last.finish_reason == "length"


def test_stop_string_cuts_text_exactly(llm):
    free = llm.generate(["paged"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].text
    assert len(free) >= 8 and len(set(free)) > 3, free
    stop = free[4:7]
    expected = free[: free.index(stop)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop, "\x00never"])
    out = llm.generate(["paged"], params)[0]
    assert out.text == expected and out.finish_reason == "stop"
    streamed, last = stream(llm, "paged", params)
    assert streamed == expected and last.finish_reason == "stop"


def test_cli_streams_text(model_dir):
    app = typer.Typer()
    app.command()(generate)
    result = CliRunner().invoke(app, [str(model_dir), "the lazy", "--max-tokens", "5", "--temperature", "0",
                                      "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    llm = LLM(model_dir, dtype="float32", device="cpu")
    expected = llm.generate(["the lazy"], SamplingParams(temperature=0, max_tokens=5))[0].text
    assert result.output == expected + "\n"
