"""Vocabularies: ``tokenizer_source`` / ``tokenizer:`` put every input's vocabulary-indexed
rows (embeddings, ``lm_head``) in the output tokenizer's order before the method runs, with
the default rows of the tool users know for tokens an input lacks; checked against a numpy
reference of the row mapping, and the output loads in transformers with its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mergex import ConfigError
from support import models
from support import reference as ref

HIDDEN = 16
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
COMMON = ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "mat"]


def tiny(path: Path, words: list[str], seed: int, added: list[str] = ()) -> dict[str, np.ndarray]:
    """A one-layer llama with a word-level tokenizer over ``words`` (ids in that order) plus
    ``added`` special tokens; its tensors as f32."""
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    n = len(words) + len(added)
    shapes = {
        EMB: (n, HIDDEN),
        "model.layers.0.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        "model.layers.0.input_layernorm.weight": (HIDDEN,),
        "model.norm.weight": (HIDDEN,),
        HEAD: (n, HIDDEN),
    }
    tensors = models.random_tensors(shapes, "f32", seed)
    config = models.model_config(1, "f32", hidden_size=HIDDEN, vocab_size=n, intermediate_size=8)
    config.update(num_attention_heads=2, num_key_value_heads=2)
    models.write_model(path, tensors, "f32", layers=1, config=config, extras=False)
    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in added])
    tok.save(str(path / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tensors


@pytest.fixture
def trio(tmp_path):
    """A base, a model with the same words in another order plus a special token, and one
    with an extra word."""
    base = tiny(tmp_path / "base", COMMON, 1)
    swapped = tiny(tmp_path / "swapped", COMMON[:3] + COMMON[3:][::-1], 2, added=["<|tool|>"])
    extra = tiny(tmp_path / "extra", [*COMMON, "dog"], 3)
    return tmp_path, {"base": base, "swapped": swapped, "extra": extra}


def vocab_of(path: Path) -> dict[str, int]:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path).get_vocab()


def gathered(
    path: Path, tensors: dict[str, np.ndarray], name: str, out_vocab: dict[str, int], default
) -> np.ndarray:
    """The model's rows of ``name`` in the output order; ``default(token)`` for tokens it lacks."""
    own = vocab_of(path)
    rows = np.zeros((len(out_vocab), HIDDEN), np.float32)
    for token, i in out_vocab.items():
        rows[i] = tensors[name][own[token]] if token in own else default(token)
    return rows


def linear_config(root: Path, names: list[str], **extra) -> dict:
    return {
        "merge_method": "linear",
        "base_model": str(root / names[0]),
        "models": [{"model": str(root / n), "parameters": {"weight": 1.0}} for n in names],
        "dtype": "float32",
        **extra,
    }


def test_union_aligns_swapped_ids_and_fills_missing_tokens(mergex_mod, trio, run_merge, tmp_path):
    root, t = trio
    cfg = linear_config(root, ["base", "swapped", "extra"], tokenizer_source="union")
    out = run_merge(cfg, tmp_path / "out")
    out_vocab = vocab_of(tmp_path / "out")
    assert set(out_vocab) == {*COMMON, "dog", "<|tool|>"} and len(out_vocab) == 10
    vocabs = {n: vocab_of(root / n) for n in t}
    for name in (EMB, HEAD):

        def default(token: str, name: str = name) -> np.ndarray:
            # One model has the token: its row (the base has every other token).
            (only,) = [n for n in t if token in vocabs[n]]
            return t[only][name][vocabs[only][token]]

        xs = [gathered(root / n, t[n], name, out_vocab, default) for n in ("base", "swapped", "extra")]
        models.assert_tensor_equal(out, name, ref.linear(xs, [1.0, 1.0, 1.0]), "F32")
    config = out.config()
    assert config["vocab_size"] == 10
    # transformers loads it, and the tokenizer round-trips the added tokens.
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tok("the dog <|tool|>")["input_ids"]
    assert tok.decode(ids) == "the dog <|tool|>"
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert model.get_input_embeddings().weight.shape[0] == 10


def test_base_source_tokens_block_and_padding(mergex_mod, trio, run_merge, tmp_path):
    root, t = trio
    cfg = linear_config(
        root,
        ["base", "swapped", "extra"],
        tokenizer={
            "source": "base",
            "pad_to_multiple_of": 5,
            "tokens": {
                "cat": {"source": {"kind": "zero"}, "force": True},
                "mat": {
                    "source": {"kind": "model_token", "model": str(root / "extra"), "token": "dog"},
                    "force": True,
                },
                "sat": {
                    "source": {"kind": "model_token", "model": str(root / "swapped"), "token_id": 3},
                    "force": True,
                },
                "on": {"source": str(root / "swapped"), "force": True},
            },
        },
    )
    out = run_merge(cfg, tmp_path / "out")
    out_vocab = vocab_of(root / "base")
    vocabs = {n: vocab_of(root / n) for n in t}
    for name in (EMB, HEAD):
        forced = {
            "cat": np.zeros(HIDDEN, np.float32),
            "mat": t["extra"][name][vocabs["extra"]["dog"]],
            "sat": t["swapped"][name][3],
            "on": t["swapped"][name][vocabs["swapped"]["on"]],
        }
        xs = []
        for n in ("base", "swapped", "extra"):
            rows = gathered(root / n, t[n], name, out_vocab, None)
            for token, row in forced.items():
                rows[out_vocab[token]] = row
            total = np.zeros(HIDDEN)
            for row in rows:  # summed in order, as mergex does
                total += row.astype(np.float64)
            mean = (total / len(out_vocab)).astype(np.float32)
            xs.append(np.concatenate([rows, np.stack([mean] * 2)]))
        models.assert_tensor_equal(out, name, ref.linear(xs, [1.0, 1.0, 1.0]), "F32")
    assert out.config()["vocab_size"] == 10
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert model.get_input_embeddings().weight.shape[0] == 10
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.decode(tok("the cat")["input_ids"]) == "the cat"


def test_different_vocabularies_without_a_setting_are_refused(mergex_mod, trio, tmp_path):
    root, _ = trio
    with pytest.raises(
        ConfigError, match=r"vocabularies differ \(8 rows in .*base, 9 in .*extra\); set tokenizer_source"
    ):
        mergex_mod.plan(linear_config(root, ["base", "extra"]))


def test_a_head_bias_and_tied_embeddings_follow_the_rows_on_any_budget_and_engine(
    mergex_mod, trio, run_merge, tmp_path
):
    root, t = trio
    # The extra model ties its head to its embedding (no lm_head tensor) and both others
    # carry a head bias (a 1-D vocabulary-indexed tensor).
    rng = np.random.default_rng(9)
    for n in ("base", "swapped"):
        t[n]["lm_head.bias"] = rng.standard_normal(t[n][HEAD].shape[0]).astype(np.float32)
        config = json.loads((root / n / "config.json").read_text())
        models.write_model(root / n, t[n], "f32", layers=1, config=config, extras=False)
    tied = dict(t["extra"])
    del tied[HEAD]
    config = json.loads((root / "extra" / "config.json").read_text())
    models.write_model(
        root / "extra", tied, "f32", layers=1, config={**config, "tie_word_embeddings": True}, extras=False
    )
    t["extra"][HEAD] = t["extra"][EMB]
    cfg = linear_config(root, ["base", "swapped"], tokenizer_source=str(root / "extra"))
    out = run_merge(cfg, tmp_path / "small")
    out_vocab = vocab_of(root / "extra")
    vocabs = {n: vocab_of(root / n) for n in t}
    for name in (EMB, HEAD, "lm_head.bias"):

        def default(token: str, name: str = name) -> np.ndarray:
            return np.zeros(t["base"][name].shape[1:], np.float32)  # "dog": in no input

        xs = [
            gathered(root / n, t[n], name, out_vocab, default) if name != "lm_head.bias" else None
            for n in ("base", "swapped")
        ]
        if name == "lm_head.bias":
            xs = [
                np.array(
                    [
                        t[n][name][vocabs[n][tok]] if tok in vocabs[n] else 0.0
                        for tok in sorted(out_vocab, key=out_vocab.get)
                    ],
                    np.float32,
                )
                for n in ("base", "swapped")
            ]
        models.assert_tensor_equal(out, name, ref.linear(xs, [1.0, 1.0]), "F32")
    assert run_merge(cfg, tmp_path / "big", ram_budget="8MiB", threads=1).raw == out.raw
    assert run_merge(cfg, tmp_path / "torch", engine="torch", ram_budget="1MiB").raw == out.raw
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "small")
    assert tok.get_vocab() == out_vocab and tok.decode(tok("the dog")["input_ids"]) == "the dog"
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "small")  # the bias is left unused
    assert model.get_output_embeddings().weight.shape[0] == len(out_vocab)
    # A model with tied embeddings gives its head rows from its embedding.
    del t["base"]["lm_head.bias"]
    config = json.loads((root / "base" / "config.json").read_text())
    models.write_model(root / "base", t["base"], "f32", layers=1, config=config, extras=False)
    cfg = linear_config(root, ["base", "extra"], tokenizer_source="union")
    del cfg["base_model"]
    out = run_merge(cfg, tmp_path / "tied")
    out_vocab = vocab_of(tmp_path / "tied")

    def only_extra(token: str) -> np.ndarray:
        return t["extra"][EMB][vocabs["extra"][token]]

    xs = [gathered(root / n, t[n], HEAD, out_vocab, only_extra) for n in ("base", "extra")]
    models.assert_tensor_equal(out, HEAD, ref.linear(xs, [1.0, 1.0]), "F32")


def test_the_base_tokens_beyond_its_vocab_size_are_dropped(mergex_mod, trio, run_merge, tmp_path):
    from tokenizers import AddedToken, Tokenizer

    root, _ = trio
    # The base's tokenizer knows one token more than its 8 embedding rows (vocab_size 8).
    tok = Tokenizer.from_file(str(root / "base" / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<|beyond|>", special=True)])
    tok.save(str(root / "base" / "tokenizer.json"))
    out = run_merge(linear_config(root, ["base", "extra"], tokenizer_source="union"), tmp_path / "out")
    out_vocab = vocab_of(tmp_path / "out")
    assert "<|beyond|>" not in out_vocab and len(out_vocab) == 9
    assert out.raw[EMB][1] == (9, HIDDEN)
