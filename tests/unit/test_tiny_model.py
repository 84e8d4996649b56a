"""Tests for pipeline.demo_world.tiny_model: deterministic offline build, loading, chat template, reuse rules."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BatchEncoding,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from pipeline.demo_world.tiny_model import SPECIAL_TOKENS, STAMP_FILE, TinyModelSpec, build_tiny_model

EXPECTED_FILES = {
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    STAMP_FILE,
}


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def model_copy(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "copy"))


def test_same_seed_and_spec_give_byte_identical_files(model_dir: Path, tmp_path: Path) -> None:
    second = build_tiny_model(tmp_path / "second")
    assert set(_digests(model_dir)) == EXPECTED_FILES
    assert _digests(second) == _digests(model_dir)


def test_other_seed_changes_only_the_weights(model_dir: Path, tmp_path: Path) -> None:
    other = _digests(build_tiny_model(tmp_path / "seed1", seed=1))
    same = {name for name, digest in _digests(model_dir).items() if other[name] == digest}
    assert same == EXPECTED_FILES - {"model.safetensors", STAMP_FILE}


def test_config_matches_spec(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    spec = TinyModelSpec()
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["head_dim"] == 64 == spec.head_dim
    assert config["hidden_size"] == spec.num_attention_heads * spec.head_dim
    assert config["vocab_size"] == spec.vocab_size
    assert config["dtype"] == "float32"
    stamp = json.loads((model_dir / STAMP_FILE).read_text())
    assert stamp["spec"] == json.loads(json.dumps(spec.__dict__)) and stamp["seed"] == 0


def test_model_loads_and_generates(model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float32
    assert model.generation_config.eos_token_id == [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|end|>"),
    ]
    inputs = tokenizer(["Hello, my order", "2 + 2 ="], return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] > inputs["input_ids"].shape[1]


def test_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    assert len(tokenizer) == TinyModelSpec().vocab_size
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (
        "<|pad|>",
        "<|bos|>",
        "<|eos|>",
    )
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    for token in SPECIAL_TOKENS:
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [
            tokenizer.convert_tokens_to_ids(token)
        ]
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id


def test_chat_template_renders_all_roles_and_generation_prompt(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is order 10037?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": {"id": 10037}}}],
        },
        {"role": "tool", "content": '{"status": "shipped"}'},
        {"role": "assistant", "content": "It has shipped."},
        {"role": "user", "content": "Thanks!"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)
    assert text.startswith("<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nWhere is order 10037?<|end|>\n")
    assert (
        '<|assistant|>\n<tool_call>{"name": "lookup", "arguments": {"id": 10037}}</tool_call><|end|>\n'
        in text
    )
    assert '<|user|>\n<tool_response>\n{"status": "shipped"}\n</tool_response><|end|>\n' in text
    assert text.endswith("<|assistant|>\nIt has shipped.<|end|>\n<|user|>\nThanks!<|end|>\n<|assistant|>\n")
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without_prompt == text.removesuffix("<|assistant|>\n")
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    assert isinstance(encoded, BatchEncoding)
    ids = encoded["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids) == text


def test_chat_template_rejects_unknown_role(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(Exception, match="Unknown chat role"):
        tokenizer.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


@pytest.mark.parametrize(
    "text",
    [
        "jane.doe+billing@example.com",
        "Card 4111 1111 1111 1111, phone +1 (555) 010-9999, IBAN DE89370400440532013000",
        "Zoë Saldaña lives at Rua São João 12, München; naïve résumé, Łódź, Ærøskøbing",
        "日本語のテキスト 🙂 emoji\tand tabs\n\nand  double  spaces ",
        '{"email": "chloé.dubois@example.com", "total": 12.5}',
    ],
)
def test_pii_like_text_round_trips(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
    assert isinstance(chat, str)
    assert text in tokenizer.decode(tokenizer(chat, add_special_tokens=False)["input_ids"])


def test_rebuild_into_same_dir_is_a_noop(model_dir: Path) -> None:
    before = _mtimes(model_dir)
    assert build_tiny_model(model_dir) == model_dir
    assert _mtimes(model_dir) == before


def test_overwrite_rebuilds_in_place(model_copy: Path, model_dir: Path) -> None:
    before = _mtimes(model_copy)
    assert build_tiny_model(model_copy, overwrite=True) == model_copy.resolve()
    assert _mtimes(model_copy) != before
    assert _digests(model_copy) == _digests(model_dir)


def test_empty_existing_dir_is_built_into(tmp_path: Path, model_dir: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert _digests(build_tiny_model(tmp_path / "empty")) == _digests(model_dir)


@pytest.mark.parametrize("overwrite", [False, True])
def test_dir_with_other_content_raises(tmp_path: Path, overwrite: bool) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="not a tiny-model build"):
        build_tiny_model(tmp_path, overwrite=overwrite)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_dir_with_other_seed_or_spec_raises(model_copy: Path) -> None:
    with pytest.raises(FileExistsError, match="another spec/seed"):
        build_tiny_model(model_copy, seed=1)
    with pytest.raises(FileExistsError, match="another spec/seed"):
        build_tiny_model(model_copy, spec=TinyModelSpec(num_hidden_layers=3))


def test_dir_with_modified_files_raises(model_copy: Path) -> None:
    (model_copy / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="files changed"):
        build_tiny_model(model_copy)


def test_spec_rejects_inconsistent_sizes() -> None:
    with pytest.raises(ValueError, match="head_dim"):
        TinyModelSpec(hidden_size=96)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        TinyModelSpec(num_attention_heads=3, num_key_value_heads=2, hidden_size=192)
