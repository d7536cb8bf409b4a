"""The engine against the numpy reference (METHODS.md §1, §2, §5): bit-exact.

Every merge runs with the smallest RAM budget, so each big tensor is cut into many chunks
(and ends in a partial one). The working precision is f32 on both sides and the final
rounding is round-to-nearest-even, so the expected bytes are exact for every output dtype.
"""

from __future__ import annotations

import pytest
from support import models
from support import reference as ref

IN_DTYPES = ["bf16", "f16", "f32"]
OUT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
LAYOUTS = {"single": (1, 1, 1), "sharded": (3, 2, 4)}


def trio(zoo, dtype, layout):
    shards = LAYOUTS[layout]
    return [zoo(dtype, seed=s, shards=k) for s, k in zip((1, 2, 3), shards, strict=True)]


def w(weight, **more):
    return {"weight": weight, **more}


# Each case: (a, b, c) -> (config without out_dtype, {name: expected f32})


def case_linear_normalize(a, b, c):
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": a, "parameters": w(0.3)},
            {"model": b, "parameters": w(0.45)},
            {"model": c, "parameters": w(0.25)},
        ],
    }
    exp = {n: ref.linear([a.tensors[n], b.tensors[n], c.tensors[n]], [0.3, 0.45, 0.25]) for n in a.tensors}
    return cfg, exp


def case_linear_no_normalize(a, b, c):
    ws = [0.5, -0.25, 0.8]
    cfg = {
        "merge_method": "linear",
        "models": [{"model": m, "parameters": w(x)} for m, x in zip((a, b, c), ws, strict=True)],
        "parameters": {"normalize": False},
    }
    exp = {n: ref.linear([m.tensors[n] for m in (a, b, c)], ws, normalize=False) for n in a.tensors}
    return cfg, exp


def case_linear_base_listed(a, b, c):
    # The base is listed under models: it is an ordinary input at its own position.
    ws = [0.3, 0.45, 0.25]
    cfg = {
        "merge_method": "linear",
        "base_model": b,
        "models": [{"model": m, "parameters": w(x)} for m, x in zip((a, b, c), ws, strict=True)],
        "parameters": {"normalize": True},
    }
    exp = {n: ref.linear([m.tensors[n] for m in (a, b, c)], ws) for n in a.tensors}
    return cfg, exp


def case_linear_base_unlisted(a, b, c):
    # A base not listed under models is one more input; its weight comes from the
    # top-level parameters. Two inputs only, so the sum does not depend on where the
    # engine puts the base (f32 addition of two terms commutes).
    cfg = {
        "merge_method": "linear",
        "base_model": a,
        "models": [{"model": b, "parameters": w(0.3)}],
        "parameters": {"weight": 0.6},
    }
    exp = {n: ref.linear([a.tensors[n], b.tensors[n]], [0.6, 0.3]) for n in a.tensors}
    return cfg, exp


def case_task_arithmetic_lambda(a, b, c):
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": a,
        "models": [
            {"model": b, "parameters": w(0.6)},
            {"model": c, "parameters": w(-0.3)},
        ],
        "parameters": {"lambda": 0.7},
    }
    exp = {
        n: ref.task_arithmetic(a.tensors[n], [b.tensors[n], c.tensors[n]], [0.6, -0.3], lam=0.7)
        for n in a.tensors
    }
    return cfg, exp


def case_task_arithmetic_normalize(a, b, c):
    # The base is also listed under models: it is never one of the x_i, so its weight
    # does not enter the divisor (0.4 + 0.35, not 1.25).
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": a,
        "models": [
            {"model": a, "parameters": w(0.5)},
            {"model": b, "parameters": w(0.4)},
            {"model": c, "parameters": w(0.35)},
        ],
        "parameters": {"normalize": True, "lambda": 1.5},
    }
    exp = {
        n: ref.task_arithmetic(
            a.tensors[n],
            [b.tensors[n], c.tensors[n]],
            [0.4, 0.35],
            normalize=True,
            lam=1.5,
        )
        for n in a.tensors
    }
    return cfg, exp


def case_passthrough_scale(a, b, c):
    cfg = {
        "merge_method": "passthrough",
        "models": [{"model": b, "parameters": {"scale": 0.3}}],
    }
    exp = {n: ref.passthrough(b.tensors[n], 0.3) for n in b.tensors}
    return cfg, exp


def case_passthrough_plain(a, b, c):
    cfg = {"merge_method": "passthrough", "models": [{"model": c}]}
    exp = {n: ref.passthrough(c.tensors[n]) for n in c.tensors}
    return cfg, exp


CASES = {
    f.__name__.removeprefix("case_"): f
    for f in (
        case_linear_normalize,
        case_linear_no_normalize,
        case_linear_base_listed,
        case_linear_base_unlisted,
        case_task_arithmetic_lambda,
        case_task_arithmetic_normalize,
        case_passthrough_scale,
        case_passthrough_plain,
    )
}


def check(out: models.Output, expected: dict, dtype: str) -> None:
    assert set(out.raw) == set(expected), "output tensor names differ from the inputs'"
    for name, want in expected.items():
        models.assert_tensor_equal(out, name, want, dtype)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("out_dtype", list(OUT_DTYPES))
@pytest.mark.parametrize("in_dtype", IN_DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_method_matches_reference(zoo, run_merge, out_dir, case, in_dtype, out_dtype, layout):
    a, b, c = trio(zoo, in_dtype, layout)
    cfg, expected = CASES[case](a, b, c)
    cfg["out_dtype"] = out_dtype
    out = run_merge(cfg, out_dir)
    check(out, expected, OUT_DTYPES[out_dtype])


@pytest.mark.parametrize("in_dtype", IN_DTYPES)
def test_passthrough_same_dtype_is_a_byte_copy(zoo, run_merge, out_dir, in_dtype):
    src = zoo(in_dtype, seed=4, shards=2)
    out = run_merge({"merge_method": "passthrough", "models": [{"model": src}]}, out_dir)
    original = models.read_output(src.path)
    assert set(out.raw) == set(original.raw)
    for name, t in original.raw.items():
        assert out.raw[name] == t, f"{name} changed by a passthrough without scale"


def test_mixed_input_dtypes_and_sizes_of_chunks(zoo, run_merge, out_dir):
    # One input of each dtype: each is converted exactly to f32 before the sum.
    a, b, c = zoo("bf16", seed=1), zoo("f16", seed=2, shards=2), zoo("f32", seed=3)
    ws = [0.7, 0.2, 0.35]
    cfg = {
        "merge_method": "linear",
        "models": [{"model": m, "parameters": w(x)} for m, x in zip((a, b, c), ws, strict=True)],
        "out_dtype": "bfloat16",
    }
    exp = {n: ref.linear([m.tensors[n] for m in (a, b, c)], ws) for n in a.tensors}
    for budget in ("64KiB", "100KiB", "1MiB"):
        target = out_dir.parent / f"merged-{budget}"
        check(run_merge(cfg, target, ram_budget=budget), exp, "BF16")


# --------------------------------------------------------------------------- output dtype


@pytest.mark.parametrize(
    ("extra", "base", "expected"),
    [
        ({}, None, "F32"),  # f16 with bf16 promotes to f32, as torch (and mergekit) do
        ({}, "b", "F32"),  # whichever model is the base
        ({"dtype": "float32"}, None, "F32"),  # dtype sets the output dtype ...
        (
            {"dtype": "bfloat16", "out_dtype": "float16"},
            None,
            "F16",
        ),  # ... unless out_dtype
        ({"out_dtype": "torch.bfloat16"}, None, "BF16"),  # torch.-prefixed names
    ],
)
def test_output_dtype_rule(zoo, run_merge, out_dir, extra, base, expected):
    a, b = zoo("f16", seed=1), zoo("bf16", seed=2)
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": a, "parameters": w(1.0)},
            {"model": b, "parameters": w(3.0)},
        ],
        **extra,
    }
    if base == "b":
        cfg["base_model"] = b
    out = run_merge(cfg, out_dir)
    exp = {n: ref.linear([a.tensors[n], b.tensors[n]], [1.0, 3.0]) for n in a.tensors}
    check(out, exp, expected)
    assert out.config()["torch_dtype"] == ref.TORCH_DTYPE[expected]


# --------------------------------------------------------------------------- parameters


def expected_weights(cfg: dict, model_index: int, name: str, num_layers: int) -> float:
    """Per-tensor weight of a model per CONFIG.md: model's, then top-level parameters."""
    p = ref.position(name, num_layers)
    levels = [cfg["models"][model_index].get("parameters"), cfg.get("parameters")]
    value = ref.lookup(levels, "weight", name, p)
    assert value is not None, f"no weight for model {model_index} at {name}"
    return value


def test_linear_gradients_and_filtered_lists(make_model, run_merge, out_dir):
    # Five layers: p = 0, 0.25, 0.5, 0.75, 1 for layers 0..4, and 0 outside the layers.
    # The values are dyadic so that any correct f64 interpolation gives the same weight.
    a = make_model("a", "bf16", seed=11, layers=5)
    b = make_model("b", "f16", seed=12, layers=5, shards=2)
    c = make_model("c", "f32", seed=13, layers=5)
    cfg = {
        "merge_method": "linear",
        "models": [
            {
                "model": a,
                "parameters": {
                    "weight": [
                        {"filter": "self_attn", "value": [0.5, 1.0, 0.25]},
                        {"filter": "mlp", "value": 2.0},
                        # no catch-all: other tensors fall through to the top level
                    ]
                },
            },
            {"model": b, "parameters": {"weight": [1.0, 0.5]}},
            {"model": c},
        ],
        "parameters": {
            "weight": [
                {"filter": "layernorm", "value": [0.25, 0.75]},
                {"filter": "*", "value": 0.625},
            ],
            "normalize": True,
        },
        "out_dtype": "float32",
    }
    # A few hand-checked values of the lookup itself, so the test's own resolver is sane.
    assert expected_weights(cfg, 0, "model.layers.1.self_attn.q_proj.weight", 5) == 0.75
    assert expected_weights(cfg, 0, "model.layers.3.mlp.up_proj.weight", 5) == 2.0
    assert expected_weights(cfg, 0, "model.layers.2.input_layernorm.weight", 5) == 0.5
    assert expected_weights(cfg, 0, "model.norm.weight", 5) == 0.625
    assert expected_weights(cfg, 1, "model.layers.3.mlp.up_proj.weight", 5) == 0.625
    assert expected_weights(cfg, 1, "lm_head.weight", 5) == 1.0
    assert expected_weights(cfg, 2, "model.layers.4.input_layernorm.weight", 5) == 0.75

    exp = {}
    for n in a.tensors:
        ws = [expected_weights(cfg, i, n, 5) for i in range(3)]
        exp[n] = ref.linear([a.tensors[n], b.tensors[n], c.tensors[n]], ws)
    check(run_merge(cfg, out_dir), exp, "F32")


def test_task_arithmetic_gradient_lambda_and_weights(make_model, run_merge, out_dir):
    a = make_model("base", "bf16", seed=21, layers=5)
    b = make_model("b", "bf16", seed=22, layers=5)
    c = make_model("c", "bf16", seed=23, layers=5, shards=3)
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": a,
        "models": [
            {"model": b, "parameters": {"weight": [0.25, 1.25]}},
            {
                "model": c,
                "parameters": {"weight": [{"filter": "up_proj", "value": -0.5}]},
            },
        ],
        "parameters": {
            "weight": 0.75,
            "lambda": [{"filter": "mlp", "value": 0.5}, {"value": [1.0, 2.0]}],
            "normalize": True,
        },
        "out_dtype": "bfloat16",
    }
    exp = {}
    for n in a.tensors:
        p = ref.position(n, 5)
        ws = [expected_weights(cfg, i, n, 5) for i in range(2)]
        lam = ref.lookup([cfg["parameters"]], "lambda", n, p)
        exp[n] = ref.task_arithmetic(a.tensors[n], [b.tensors[n], c.tensors[n]], ws, True, lam)
    # Layer 1's up_proj: weights 0.5 and -0.5 sum to 0, so the divisor falls back to 1.
    assert expected_weights(cfg, 0, "model.layers.1.mlp.up_proj.weight", 5) == 0.5
    assert expected_weights(cfg, 1, "model.layers.1.mlp.up_proj.weight", 5) == -0.5
    assert ref.lookup([cfg["parameters"]], "lambda", "model.layers.2.self_attn.q_proj.weight", 0.5) == 1.5
    check(run_merge(cfg, out_dir), exp, "BF16")


def test_passthrough_slices_stack_layers(make_model, run_merge, out_dir):
    # Layers [0, 2) of a, then [1, 4) of b: 5 output layers. Embeddings come from the first
    # slice's source, the final norm and lm_head from the last slice's.
    a = make_model("a", "bf16", seed=31, layers=4)
    b = make_model("b", "bf16", seed=32, layers=4, shards=2)
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}]},
            {
                "sources": [
                    {
                        "model": b,
                        "layer_range": [1, 4],
                        # p = 0, 0.5, 1 over the 3 layers of this output slice
                        "parameters": {
                            "scale": [
                                {"filter": "self_attn", "value": [1.0, 0.5]},
                                {"value": 2.0},
                            ]
                        },
                    }
                ],
            },
        ],
        "out_dtype": "bfloat16",
    }
    exp = {"model.embed_tokens.weight": a.tensors["model.embed_tokens.weight"]}
    for k in range(2):
        for suffix in (
            "self_attn.q_proj.weight",
            "mlp.up_proj.weight",
            "input_layernorm.weight",
        ):
            exp[f"model.layers.{k}.{suffix}"] = a.tensors[f"model.layers.{k}.{suffix}"]
    for k, src in enumerate(range(1, 4)):
        p = k / 2
        for suffix in (
            "self_attn.q_proj.weight",
            "mlp.up_proj.weight",
            "input_layernorm.weight",
        ):
            scale = 1.0 - 0.5 * p if "self_attn" in suffix else 2.0
            exp[f"model.layers.{2 + k}.{suffix}"] = ref.passthrough(
                b.tensors[f"model.layers.{src}.{suffix}"], scale
            )
    # Outside the layers p = 0 and the filtered scale's catch-all applies.
    exp["model.norm.weight"] = ref.passthrough(b.tensors["model.norm.weight"], 2.0)
    exp["lm_head.weight"] = ref.passthrough(b.tensors["lm_head.weight"], 2.0)
    out = run_merge(cfg, out_dir)
    check(out, exp, "BF16")
    assert out.config()["num_hidden_layers"] == 5
