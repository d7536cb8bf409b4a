"""Configuration semantics (CONFIG.md): gradients, filters, the lookup order, per-layer
positions, slices, model references, and the planner's shape and dtype rules."""

from __future__ import annotations

import json
import math

import mergex
import numpy as np
import pytest
from mergex.params import NOT_FOUND, evaluate, gradient, layer_index, lookup, rename_layer, to_f32
from mergex.planner import build_job
from support import models


def f32(x: float) -> float:
    return float(np.float32(x))


# --------------------------------------------------------------------------- unit: values


def test_gradient_interpolates_over_equal_segments():
    assert gradient([0.0, 1.0], 0.5) == 0.5
    assert gradient([1.0, 0.7, 0.1], 0.0) == 1.0
    assert gradient([1.0, 0.7, 0.1], 1.0) == pytest.approx(0.1)
    assert gradient([1.0, 0.7, 0.1], 0.25) == pytest.approx(0.85)
    assert gradient([1.0, 0.7, 0.1], 0.75) == pytest.approx(0.4)
    assert gradient([0, 0.5, 0.3, 0.7, 1], 0.5) == pytest.approx(0.3)
    assert gradient([0.25], 0.9) == 0.25


def test_filtered_lists_take_the_first_match():
    value = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0, 1]}, {"value": 0.5}]
    assert evaluate(value, "model.layers.3.self_attn.q_proj.weight", 0.0) == 0.1
    assert evaluate(value, "model.layers.3.mlp.up_proj.weight", 0.25) == 0.25
    assert evaluate(value, "model.norm.weight", 0.25) == 0.5
    assert evaluate([{"filter": "*", "value": 2}], "x", 0) == 2
    assert evaluate([{"filter": "mlp", "value": 1}], "model.norm.weight", 0) is NOT_FOUND


def test_lookup_falls_through_levels():
    levels = [({"weight": [{"filter": "mlp", "value": 3}]}, "a.mlp.w"), ({"weight": 2}, "a.mlp.w")]
    assert lookup(levels, "weight", 0) == 3
    levels[0] = ({"weight": [{"filter": "attn", "value": 3}]}, "a.mlp.w")
    assert lookup(levels, "weight", 0) == 2
    assert lookup(levels, "density", 0) is NOT_FOUND


def test_layer_names():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("blocks.0.norm") == 0
    assert layer_index("model.norm.weight") is None
    assert rename_layer("model.layers.12.mlp.up_proj.weight", 4) == "model.layers.4.mlp.up_proj.weight"


def test_parameters_round_to_f32():
    assert to_f32(0.1) == f32(0.1)
    assert to_f32(1e300) == math.inf


# --------------------------------------------------------------------------- config loading


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"merge_method": "linear", "models": [{"model": "a"}], "bogus": 1}, "unknown key 'bogus'"),
        ({"merge_method": "frobnicate", "models": [{"model": "a"}]}, "unknown method 'frobnicate'"),
        ({"merge_method": "task_arithmetic", "models": [{"model": "a"}]}, "base_model"),
        ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"densty": 0.5}}]}, "densty"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "slices": []}, "exactly one of"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "out_dtype": "int4"}, "out_dtype"),
        (
            {"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {"source": 3}},
            "tokenizer.source",
        ),
        (
            {
                "merge_method": "linear",
                "models": [{"model": "a", "parameters": {"weight": [{"value": 1, "x": 2}]}}],
            },
            "'x'",
        ),
        (
            {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": {"a": 1}}}]},
            "weight",
        ),
        (
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [3, 1]}]}]},
            "layer_range",
        ),
    ],
)
def test_bad_configs_name_the_key(cfg, message):
    with pytest.raises(mergex.ConfigError, match=message):
        mergex.load_config(cfg)


def test_yaml_errors_name_the_file_and_line(tmp_path):
    p = tmp_path / "bad.yml"
    p.write_text("merge_method: linear\nmodels: [\n")
    with pytest.raises(mergex.ConfigError, match=r"bad\.yml: invalid YAML \(line"):
        mergex.load_config(p)


# --------------------------------------------------------------------------- planning


def _weights(job, out_name):
    t = next(t for t in job.spec.tensors if t.name == out_name)
    return [i.params["weight"] for i in t.inputs]


def _plan(cfg, **kw):
    return build_job(
        mergex.load_config(models._plain(cfg)),
        ram_budget=1 << 20,
        threads=1,
        shard_size=1 << 40,
        seed=0,
        **kw,
    )


def test_lookup_order_and_layer_positions(make_model):
    a, b = make_model("a", seed=1), make_model("b", seed=2)  # 3 layers: p = 0, 0.5, 1
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": a, "parameters": {"weight": [{"filter": "mlp", "value": [0.0, 1.0]}]}},
            {"model": b},
        ],
        "parameters": {"weight": [{"filter": "self_attn", "value": 0.25}, {"value": [1.0, 3.0]}]},
    }
    job = _plan(cfg)
    # Model level wins where its filter matches; otherwise the top level applies.
    assert _weights(job, "model.layers.1.mlp.up_proj.weight") == [0.5, 2.0]
    assert _weights(job, "model.layers.2.mlp.up_proj.weight") == [1.0, 3.0]
    assert _weights(job, "model.layers.2.self_attn.q_proj.weight") == [0.25, 0.25]
    # Tensors outside the layers use p = 0.
    assert _weights(job, "model.norm.weight") == [1.0, 1.0]


def test_slice_parameters_and_single_layer_slices(make_model):
    a, b = make_model("a", seed=1), make_model("b", seed=2)
    cfg = {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [{"model": a, "layer_range": [0, 1]}, {"model": b, "layer_range": [0, 1]}],
                "parameters": {"weight": [0.0, 1.0]},
            },
            {
                "sources": [
                    {"model": a, "layer_range": [1, 3], "parameters": {"weight": 0.1}},
                    {"model": b, "layer_range": [1, 3]},
                ]
            },
        ],
        "parameters": {"weight": 0.7},
    }
    job = _plan(cfg)
    # A one-layer slice sits at p = 1; the slice's parameters beat the top level.
    assert _weights(job, "model.layers.0.mlp.up_proj.weight") == [1.0, 1.0]
    assert _weights(job, "model.layers.2.mlp.up_proj.weight") == [f32(0.1), f32(0.7)]
    # Before-layer tensors come from the first slice (p = 0), after-layer ones from the last.
    assert _weights(job, "model.embed_tokens.weight") == [0.0, 0.0]
    assert _weights(job, "lm_head.weight") == [f32(0.1), f32(0.7)]
    assert job.total_layers == 3


def test_missing_required_parameter_names_model_and_tensor(make_model):
    a = make_model("a")
    with pytest.raises(
        mergex.ConfigError, match=r"'weight' of model .*a.* tensor 'model.embed_tokens.weight'"
    ):
        _plan({"merge_method": "linear", "models": [{"model": a}]})


def test_base_must_be_a_slice_source(make_model):
    a, b = make_model("a"), make_model("b", seed=1)
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": a,
        "slices": [{"sources": [{"model": b, "layer_range": [0, 3], "parameters": {"weight": 1}}]}],
    }
    with pytest.raises(mergex.ConfigError, match=r"slices\[0\]: the base model must be one of"):
        _plan(cfg)


def test_frankenmerge_with_overlapping_ranges(make_model, run_merge, out_dir):
    a, b = make_model("a", seed=1), make_model("b", seed=2)
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}]},
            {"sources": [{"model": b, "layer_range": [1, 3], "parameters": {"scale": 2.0}}]},
        ],
    }
    out = run_merge(cfg, out_dir)
    assert out.config()["num_hidden_layers"] == 4
    expect = {0: (a, 0, 1.0), 1: (a, 1, 1.0), 2: (b, 1, 2.0), 3: (b, 2, 2.0)}
    for k, (m, src, scale) in expect.items():
        for suffix in ("mlp.up_proj.weight", "self_attn.q_proj.weight", "input_layernorm.weight"):
            want = m.tensors[f"model.layers.{src}.{suffix}"] * np.float32(scale)
            models.assert_tensor_equal(out, f"model.layers.{k}.{suffix}", want, "BF16")
    models.assert_tensor_equal(
        out, "model.embed_tokens.weight", a.tensors["model.embed_tokens.weight"], "BF16"
    )
    # After-layer tensors go through the last slice's source, with its parameters.
    models.assert_tensor_equal(out, "lm_head.weight", b.tensors["lm_head.weight"] * np.float32(2), "BF16")
    assert sorted(n for n in out.raw if "layers." in n) == sorted(
        f"model.layers.{k}.{s}"
        for k in range(4)
        for s in ("mlp.up_proj.weight", "self_attn.q_proj.weight", "input_layernorm.weight")
    )


def test_relative_paths_resolve_against_the_config_folder(make_model, tmp_path, out_dir, monkeypatch):
    make_model("a", seed=1)
    (tmp_path / "cfg.yml").write_text(
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
    )
    monkeypatch.chdir(out_dir.parent)
    result = mergex.merge(tmp_path / "cfg.yml", out_dir, progress=False, ram_budget="1MiB")
    assert (result.out_dir / "model.safetensors").is_file()


def test_models_resolve_from_the_hugging_face_cache(make_model, tmp_path, out_dir, monkeypatch):
    cache = tmp_path / "hf"
    snap = cache / "models--acme--tiny" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    make_model("src", seed=3).path.rename(snap)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cfg = {"merge_method": "linear", "models": [{"model": "acme/tiny", "parameters": {"weight": 1}}]}
    mergex.merge(cfg, out_dir, progress=False)
    assert (out_dir / "model.safetensors").is_file()
    cfg["models"][0]["model"] = "acme/other"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # else it would be looked up on the Hub
    with pytest.raises(mergex.ModelNotFoundError, match="not in the Hugging Face cache"):
        mergex.plan(cfg)


def test_padded_vocabularies_are_refused_without_a_tokenizer_setting(make_model):
    a = make_model("a", seed=1)
    b = make_model("b", seed=2, vocab=models.VOCAB + 13)
    cfg = {"merge_method": "linear", "models": [{"model": a}, {"model": b}], "parameters": {"weight": 1.0}}
    with pytest.raises(
        mergex.ConfigError, match=r"vocabularies differ \(323 rows in .*, 336 in .*\); set tokenizer_source"
    ):
        mergex.plan(models._plain(cfg))


def test_tied_embeddings_feed_lm_head(make_model, run_merge, out_dir):
    a = make_model("a", seed=1)
    shapes = models.llama_shapes()
    tensors = models.random_tensors(shapes, "bf16", 5)
    del tensors["lm_head.weight"]
    cfg_json = models.model_config(models.LAYERS, "bf16", tie_word_embeddings=True)
    b = models.write_model(a.path.parent / "tied", tensors, "bf16", config=cfg_json)
    cfg = {"merge_method": "linear", "models": [{"model": a}, {"model": b}], "parameters": {"weight": 1.0}}
    out = run_merge(cfg, out_dir)
    want = (a.tensors["lm_head.weight"] + b.tensors["model.embed_tokens.weight"]) / np.float32(2)
    models.assert_tensor_equal(out, "lm_head.weight", want, "BF16")


def test_integer_tensors_are_copied_and_f64_inputs_merge(tmp_path, run_merge, out_dir):
    # 8-bit float codes without a scale are refused (tests/test_quant_refusal.py).
    rng = np.random.default_rng(0)
    ids = np.arange(1000, dtype=np.int64)
    x64 = [rng.standard_normal(3000) for _ in range(2)]
    paths = []
    for k in range(2):
        p = tmp_path / f"m{k}"
        p.mkdir()
        models.write_safetensors(
            p / "model.safetensors",
            {
                "position_ids": ("I64", (1000,), (ids + k).tobytes()),
                "w64": ("F64", (3000,), x64[k].tobytes()),
            },
            {"format": "pt"},
        )
        (p / "config.json").write_text(json.dumps({"model_type": "toy"}))
        paths.append(p)
    cfg = {"merge_method": "linear", "models": [{"model": p} for p in paths], "parameters": {"weight": 1.0}}
    out = run_merge(cfg, out_dir)
    assert out.dtype("position_ids") == "I64"
    assert np.array_equal(np.frombuffer(out.raw["position_ids"][2], np.int64), ids)
    # F64 inputs are merged in f64 and written as F64.
    assert out.dtype("w64") == "F64"
    assert np.array_equal(np.frombuffer(out.raw["w64"][2], np.float64), (x64[0] + x64[1]) / 2.0)


def test_yaml_1_1_strings_that_are_numbers_are_numbers(tmp_path):
    # PyYAML reads `1e-3` (no dot) as a string; YAML 1.2 and the tool users know read a number.
    text = """
merge_method: ties
base_model: ./base
models:
  - model: ./a
    parameters: {weight: 1e-3, density: [1e-1, 0.5]}
parameters:
  lambda: [{filter: mlp, value: 2E0}, {value: 1}]
"""
    path = tmp_path / "merge.yml"
    path.write_text(text)
    cfg = mergex.load_config(path)
    assert cfg.models is not None
    assert cfg.models[0].parameters == {"weight": 0.001, "density": [0.1, 0.5]}
    assert cfg.parameters["lambda"] == [{"filter": "mlp", "value": 2.0}, {"value": 1}]
    path.write_text(text.replace("1e-3", "1e-3x"))
    cfg = mergex.load_config(path)
    assert cfg.models is not None and cfg.models[0].parameters["weight"] == "1e-3x"  # not a number


def test_another_methods_parameter_is_ignored_with_a_warning(make_model):
    a, b = make_model("a", seed=1), make_model("b", seed=2)
    cfg = {
        "merge_method": "slerp",
        "base_model": str(a.path),
        "models": [{"model": str(b.path), "parameters": {"weight": 0.5}}],
        "parameters": {"t": 0.3},
    }
    plan = mergex.plan(cfg)
    assert any(
        "models[0].parameters.weight: slerp takes no 'weight'" in w and "ignored" in w for w in plan.warnings
    )
    # Any other method's parameter too, one warning a name however often it appears.
    cfg["models"][0]["parameters"] = {"density": 0.5, "weight": 1.0}
    cfg["parameters"] = {"t": 0.3, "density": 0.2}
    warnings = mergex.plan(cfg).warnings
    assert [w for w in warnings if "'density'" in w] == [
        "parameters.density and 1 more: slerp takes no 'density' (it takes: t); ignored"
    ]
    cfg["models"][0]["parameters"] = {"wieght": 0.5}  # a typo is still an error, with a hint
    with pytest.raises(mergex.ConfigError, match=r"wieght: not a parameter of slerp .*did you mean 'weight'"):
        mergex.plan(cfg)


def test_glob_filters_match_the_whole_name_and_plain_ones_a_substring():
    from mergex.params import evaluate

    value = [
        {"filter": "*.self_attn.*", "value": 1.0},
        {"filter": "model.layers.?.mlp.[gu]*", "value": 2.0},
        {"filter": "norm", "value": 3.0},
        {"value": 4.0},
    ]
    assert evaluate(value, "model.layers.3.self_attn.q_proj.weight", 0) == 1.0
    # A hybrid model's linear attention is not `self_attn`, which a substring could not tell.
    assert evaluate(value, "model.layers.3.linear_attn.q_proj.weight", 0) == 4.0
    assert evaluate(value, "model.layers.3.mlp.up_proj.weight", 0) == 2.0
    assert evaluate(value, "model.layers.3.mlp.down_proj.weight", 0) == 4.0
    assert evaluate(value, "model.layers.12.mlp.up_proj.weight", 0) == 4.0  # ? is one character
    assert evaluate(value, "model.layers.3.input_layernorm.weight", 0) == 3.0


def test_mixed_input_dtypes_promote_as_torch_does(make_model, run_merge, out_dir, tmp_path):
    from support import reference as ref

    a, b = make_model("a", "bf16", seed=1), make_model("b", "f16", seed=2)
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(a.path), "parameters": {"weight": 0.5}},
            {"model": str(b.path), "parameters": {"weight": 0.5}},
        ],
    }
    out = run_merge(cfg, out_dir)
    for name, x in a.tensors.items():
        models.assert_tensor_equal(out, name, ref.linear([x, b.tensors[name]], [0.5, 0.5]), "F32")
    assert out.config()["torch_dtype"] == "float32"
    # One dtype among the inputs stays; `dtype` decides when it is set.
    c = make_model("c", "bf16", seed=3)
    cfg["models"][1]["model"] = str(c.path)
    assert {t[0] for t in run_merge(cfg, tmp_path / "same").raw.values()} == {"BF16"}
    cfg["models"][1]["model"], cfg["dtype"] = str(b.path), "float16"
    assert {t[0] for t in run_merge(cfg, tmp_path / "set").raw.values()} == {"F16"}


def test_a_slice_can_name_its_own_base_and_residual_weight_is_accepted(make_model, run_merge, out_dir):
    from support import reference as ref

    a, b, c = (make_model(n, seed=s) for n, s in (("a", 1), ("b", 2), ("c", 3)))
    cfg = {
        "merge_method": "task_arithmetic",
        "slices": [
            {
                "sources": [{"model": str(m.path), "layer_range": [0, 2]} for m in (a, b)],
                "base_model": str(a.path),
                "residual_weight": 0.5,
            },
            {
                "sources": [{"model": str(m.path), "layer_range": [2, 3]} for m in (c, b)],
                "base_model": str(c.path),
            },
        ],
        "parameters": {"weight": 0.5},
    }
    out = run_merge(cfg, out_dir)
    for name, x in b.tensors.items():
        layer = ref.layer_index(name)
        if layer is None:
            continue
        base = (a if layer < 2 else c).tensors[name]
        models.assert_tensor_equal(out, name, ref.task_arithmetic(base, [x], [0.5]), "BF16")


def test_stacking_rebuilds_per_layer_lists_and_transformers_loads_it(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    config = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        layer_types=["sliding_attention", "full_attention"],
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen")
    src = str(tmp_path / "qwen")
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": src, "layer_range": [0, 2]}]},
            {"sources": [{"model": src, "layer_range": [1, 2]}]},
        ],
    }
    mergex.merge(cfg, tmp_path / "out", progress=None)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_hidden_layers"] == 3
    assert written["layer_types"] == ["sliding_attention", "full_attention", "full_attention"]
    model = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.layer_types == written["layer_types"]
    assert bool(torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all())


def test_a_layer_pattern_that_slices_break_is_an_error_before_writing(make_model, tmp_path):
    m = make_model("moe")
    config = json.loads((m.path / "config.json").read_text())
    (m.path / "config.json").write_text(json.dumps({**config, "first_k_dense_replace": 1}))
    cfg = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(m.path), "layer_range": [1, 3]}]}],
    }
    with pytest.raises(mergex.ConfigError, match="first_k_dense_replace = 1 cannot describe"):
        mergex.plan(cfg)
