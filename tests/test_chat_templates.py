"""``chat_template``: the built-in names render their format's prompt through transformers'
``apply_chat_template``; ``auto`` takes the inputs' most common template; Jinja text is
written as it is; the template lands in ``chat_template.jinja`` and
``tokenizer_config.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mergex import ConfigError
from support import models

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "alpaca": "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!\n\n"
    "### Instruction:\nBye\n\n### Response:\n",
    "mistral": "<s>[INST] Be brief.\n\nHi [/INST] Hello!</s>[INST] Bye [/INST]",
    "exaone": "[|system|]Be brief.[|endofturn|]\n[|user|]Hi\n[|assistant|]Hello![|endofturn|]\n"
    "[|user|]Bye\n[|assistant|]",
}


def with_tokenizer(path: Path, template: str | None = None) -> Path:
    """A tiny model with a real (word-level) tokenizer and, optionally, a chat template."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    models.make_llama(path, layers=1, seed=len(path.name))
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "Hi", "Bye"])}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    if template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def merge(mergex_mod, paths: list[Path], out: Path, template: str) -> Path:
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths],
        "chat_template": template,
    }
    mergex_mod.merge(cfg, out, progress=None)
    return out


def render(folder: Path) -> str:
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return str(tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_built_in_templates_render_their_format(mergex_mod, tmp_path, name):
    out = merge(mergex_mod, [with_tokenizer(tmp_path / "m")], tmp_path / "out", name)
    assert render(out) == EXPECTED[name]
    written = json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    assert (out / "chat_template.jinja").read_text() == written


def test_auto_takes_the_most_common_template_and_jinja_is_written_as_is(mergex_mod, tmp_path):
    a = with_tokenizer(tmp_path / "a", "{{ 'A' }}")
    b = with_tokenizer(tmp_path / "b", "{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    c = with_tokenizer(tmp_path / "c", "{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    out = merge(mergex_mod, [a, b, c], tmp_path / "auto", "auto")
    assert render(out) == "Be brief.|Hi|Hello!|Bye|"
    literal = "{{ messages | length }} turns"
    out = merge(mergex_mod, [a], tmp_path / "literal", literal)
    assert render(out) == "4 turns"


def test_auto_without_templates_warns_and_unknown_names_are_errors(mergex_mod, tmp_path):
    a = with_tokenizer(tmp_path / "a")
    cfg = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1.0}}]}
    result = mergex_mod.merge({**cfg, "chat_template": "auto"}, tmp_path / "out", progress=None)
    assert any("found no chat template" in w for w in result.warnings)
    with pytest.raises(ConfigError, match="unknown template 'chatm'"):
        mergex_mod.merge({**cfg, "chat_template": "chatm"}, tmp_path / "out2", progress=None)
