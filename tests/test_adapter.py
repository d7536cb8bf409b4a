"""LoRA adapters as merge inputs (``BASE+ADAPTER``): the reader adds ``s·B·A`` to each
targeted weight, chunk by chunk. Checked against a numpy reference (W + s·B·A, then the
method), at budgets that cut every tensor into many chunks, on both engines; against peft's
own merge of a real adapter; and every bad adapter is a one-line error with no output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from mergex import CheckpointError, ConfigError
from support import models
from support import reference as ref

HIDDEN, INTER, VOCAB = models.HIDDEN, models.INTERMEDIATE, models.VOCAB
Q0, UP1 = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"


def factor(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.1).astype(np.float32)


class Adapter:
    """An adapter written by the tests, with what the reference needs to apply it."""

    def __init__(self, path: Path, config: dict, factors: dict, scales: dict, transposed: set, saved: dict):
        self.path, self.config, self.factors = path, config, factors
        self.scales, self.transposed, self.saved = scales, transposed, saved

    def apply(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {**tensors, **self.saved}
        for module, (a, b) in self.factors.items():
            name = module + ".weight"
            out[name] = ref.lora_apply(out[name], a, b, self.scales[module], module in self.transposed)
        return out


def make_adapter(root: Path, name: str, seed: int, *, rslora: bool = False, fan_in_fan_out: bool = False):
    """q_proj and up_proj of every layer, the embedding (lora_embedding_*) and lm_head saved
    whole; rank 4 with a rank and an alpha pattern."""
    rng = np.random.default_rng(seed)
    config = {
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "rank_pattern": {"up_proj": 2},
        "alpha_pattern": {"layers.1.mlp.up_proj": 3},
        "modules_to_save": ["lm_head"],
    }
    factors, scales = {}, {}
    for i in range(models.LAYERS):
        for module, (out, inp), r in (
            (f"model.layers.{i}.self_attn.q_proj", (HIDDEN, HIDDEN), 4),
            (f"model.layers.{i}.mlp.up_proj", (INTER, HIDDEN), 2),
        ):
            if fan_in_fan_out:
                out, inp = inp, out
            factors[module] = (factor(rng, (r, inp)), factor(rng, (out, r)))
            alpha = 3 if module == UP1 else 8
            scales[module] = alpha / math.sqrt(r) if rslora else alpha / r
    transposed = {m for m in factors} if fan_in_fan_out else set()
    factors["model.embed_tokens"] = (factor(rng, (4, VOCAB)), factor(rng, (HIDDEN, 4)))
    scales["model.embed_tokens"] = 8 / 2 if rslora else 8 / 4
    transposed.add("model.embed_tokens")
    saved = {"lm_head.weight": factor(rng, (VOCAB, HIDDEN))}
    path = models.write_adapter(
        root / name, factors, config, saved, embeddings=["model.embed_tokens"], adapter_name="default"
    )
    return Adapter(path, config, factors, scales, transposed, saved)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = models.make_llama(root / "base", seed=1)
    other = models.make_llama(root / "other", seed=2)
    return {
        "base": base,
        "other": other,
        "a1": make_adapter(root, "a1", 11),
        "a2": make_adapter(root, "a2", 12, rslora=True),
        "fan": make_adapter(root, "fan", 13, fan_in_fan_out=True),
    }


def merge(mergex_mod, cfg: dict, out: Path, **kw) -> models.Output:
    kw = {"ram_budget": "64KiB", "threads": 2, "progress": None, **kw}
    mergex_mod.merge(models._plain(cfg), out, **kw)
    return models.read_output(out)


def with_adapter(base, adapter) -> str:
    return f"{base.path}+{adapter.path}"


def test_linear_of_adapter_inputs_equals_the_numpy_reference(family, mergex_mod, tmp_path):
    base, other, a1, a2 = family["base"], family["other"], family["a1"], family["a2"]
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": with_adapter(base, a1), "parameters": {"weight": 0.5}},
            {"model": with_adapter(base, a2), "parameters": {"weight": 0.3}},
            {"model": str(other.path), "parameters": {"weight": 0.2}},
        ],
        "dtype": "float32",
    }
    out = merge(mergex_mod, cfg, tmp_path / "small")
    x1, x2 = a1.apply(base.tensors), a2.apply(base.tensors)
    for name in base.tensors:
        want = ref.linear([x1[name], x2[name], other.tensors[name]], [0.5, 0.3, 0.2])
        models.assert_tensor_equal(out, name, want, "F32")
    # The same bytes at any budget and thread count, and from the torch engine.
    big = merge(mergex_mod, cfg, tmp_path / "big", ram_budget="8MiB", threads=1)
    assert big.raw == out.raw
    torch_out = merge(mergex_mod, cfg, tmp_path / "torch", engine="torch", ram_budget="1MiB", threads=1)
    assert torch_out.raw == out.raw


def test_ties_with_adapter_experts_and_fan_in_fan_out(family, mergex_mod, tmp_path):
    base, a1, fan = family["base"], family["a1"], family["fan"]
    cfg = {
        "merge_method": "ties",
        "base_model": str(base.path),
        "models": [
            {"model": with_adapter(base, a1), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": with_adapter(base, fan), "parameters": {"weight": 0.7, "density": 0.3}},
        ],
    }
    out = merge(mergex_mod, cfg, tmp_path / "small")
    xs = [a1.apply(base.tensors), fan.apply(base.tensors)]
    for name, b in base.tensors.items():
        want = ref.task_family("ties", b, [x[name] for x in xs], name, [1.0, 0.7], densities=[0.5, 0.3])
        models.assert_tensor_equal(out, name, want, "BF16")
    assert merge(mergex_mod, cfg, tmp_path / "big", ram_budget="8MiB", threads=1).raw == out.raw


def test_slerp_with_an_adapter_base(family, mergex_mod, tmp_path):
    base, other, a2 = family["base"], family["other"], family["a2"]
    cfg = {
        "merge_method": "slerp",
        "base_model": with_adapter(base, a2),
        "models": [{"model": with_adapter(base, a2)}, {"model": str(other.path)}],
        "parameters": {"t": 0.4},
    }
    out = merge(mergex_mod, cfg, tmp_path / "out")
    x = a2.apply(base.tensors)
    for name in base.tensors:
        models.assert_tensor_equal(out, name, ref.slerp(x[name], other.tensors[name], 0.4), "BF16")


def test_plan_counts_the_adapter_bytes(family, mergex_mod):
    base, a1 = family["base"], family["a1"]

    def plan(model: str):
        cfg = {"merge_method": "linear", "models": [{"model": model, "parameters": {"weight": 1.0}}]}
        return mergex_mod.plan(cfg, ram_budget="64MiB")

    plain, adapted = plan(str(base.path)), plan(with_adapter(base, a1))
    # q_proj and up_proj of each layer and the embedding.
    assert f"LoRA adapter, {2 * models.LAYERS + 1} adapted weights" in adapted.formats
    extra = adapted.bytes_read - plain.bytes_read
    factors = sum(a.nbytes + b.nbytes for a, b in a1.factors.values())
    # The factors, once each (L once, R once per chunk: one chunk a tensor at 64 MiB), with
    # lm_head read from the adapter in place of the base's.
    assert factors <= extra <= factors + 4 * VOCAB * HIDDEN, (extra, factors)


def test_peft_adapter_matches_peft_merge_and_loads_in_transformers(mergex_mod, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    torch.manual_seed(0)
    config = models.tiny_llama_config(transformers)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "base")
    lc = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 3},
        use_rslora=True,
    )
    pm = peft.get_peft_model(model, lc)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(tmp_path / "adapter")
    cfg = {
        "merge_method": "linear",
        "models": [{"model": f"{tmp_path / 'base'}+{tmp_path / 'adapter'}", "parameters": {"weight": 1.0}}],
        "dtype": "float32",
    }
    out = tmp_path / "out"
    merge(mergex_mod, cfg, out)
    got = load_file(out / "model.safetensors")
    fresh = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    want = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").merge_and_unload().state_dict()
    assert set(got) <= set(want)
    for name, x in got.items():
        torch.testing.assert_close(x, want[name], rtol=1e-6, atol=2e-6, msg=name)
    loaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    logits = loaded(torch.tensor([[1, 2, 3, 4]])).logits
    assert bool(torch.isfinite(logits).all())


# --------------------------------------------------------------------------- bad adapters


def bad_adapter(family, root: Path, edit) -> str:
    """A copy of adapter a1 with ``edit(path)`` applied; the ``BASE+ADAPTER`` reference."""
    import shutil

    path = root / "bad"
    shutil.copytree(family["a1"].path, path)
    edit(path)
    return f"{family['base'].path}+{path}"


def set_config(**changes):
    def edit(path: Path) -> None:
        f = path / "adapter_config.json"
        cfg = json.loads(f.read_text())
        for k, v in changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        f.write_text(json.dumps(cfg))

    return edit


def rewrite_tensor(name: str, fn):
    """Rewrite the adapter tensor whose name ends with ``name`` through ``fn(array)``."""

    def edit(path: Path) -> None:
        f = path / "adapter_model.safetensors"
        _meta, raw = models.read_safetensors_raw(f)
        tensors = {}
        for k, (dtype, shape, data) in raw.items():
            x = np.frombuffer(data, np.float32).reshape(shape)
            if k.endswith(name):
                x = fn(x.copy())
            tensors[k] = (dtype, tuple(x.shape), np.ascontiguousarray(x).tobytes())
        models.write_safetensors(f, tensors, {"format": "pt"})

    return edit


def write_text(name: str, text: str):
    return lambda path: (path / name).write_text(text)


def remove(name: str):
    return lambda path: (path / name).unlink()


def pickle_only(path: Path) -> None:
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")


def rename_module(path: Path) -> None:
    f = path / "adapter_model.safetensors"
    _meta, raw = models.read_safetensors_raw(f)
    renamed = {k.replace("self_attn.q_proj", "self_attn.qkv_proj"): v for k, v in raw.items()}
    models.write_safetensors(f, renamed, {"format": "pt"})


Q0_A = f"{Q0}.lora_A.default.weight"
BAD = {
    "config missing": (remove("adapter_config.json"), "adapter_config.json is missing"),
    "config not JSON": (write_text("adapter_config.json", "{r: 4"), "invalid JSON"),
    "no r": (set_config(r=None), "key 'r' is missing"),
    "no lora_alpha": (set_config(lora_alpha=None), "key 'lora_alpha' is missing"),
    "no target_modules": (set_config(target_modules=None), "key 'target_modules' is missing"),
    "r zero": (set_config(r=0), "the rank must be positive"),
    "r mismatch": (set_config(r=8), "rank 4 does not match r = 8"),
    "missing module": (rename_module, "does not have"),
    "shape": (rewrite_tensor(Q0_A, lambda x: x[:, :-1]), "does not fit"),
    "dora": (set_config(use_dora=True), "DoRA adapters (use_dora) are not supported"),
    "loha": (set_config(peft_type="LOHA"), "LoHa adapters"),
    "ia3": (set_config(peft_type="IA3"), "IA³ adapters"),
    "prompt tuning": (set_config(peft_type="PROMPT_TUNING"), "prompt tuning adapters"),
    "pickle": (pickle_only, "pickle adapters are refused"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_is_a_one_line_error_naming_it(family, mergex_mod, tmp_path, case):
    edit, message = BAD[case]
    model = bad_adapter(family, tmp_path, edit)
    cfg = {"merge_method": "linear", "models": [{"model": model, "parameters": {"weight": 1.0}}]}
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as e:
        merge(mergex_mod, cfg, out)
    text = str(e.value)
    assert message in text and "\n" not in text, text
    assert str(tmp_path / "bad") in text, text
    assert not out.exists()


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_adapter_values_fail_the_merge_naming_the_tensor(family, mergex_mod, tmp_path, value):
    def poison(x: np.ndarray) -> np.ndarray:
        x[1, 3] = value
        return x

    model = bad_adapter(family, tmp_path, rewrite_tensor(Q0_A, poison))
    cfg = {"merge_method": "linear", "models": [{"model": model, "parameters": {"weight": 1.0}}]}
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as e:
        merge(mergex_mod, cfg, out)
    assert Q0_A in str(e.value) and e.value.tensor.endswith(Q0_A), str(e.value)
    assert not out.exists()


def test_adapter_for_another_architecture_is_refused(family, mergex_mod, tmp_path):
    wide = models.make_llama(tmp_path / "wide", seed=3, hidden=64)
    cfg = {
        "merge_method": "linear",
        "models": [{"model": f"{wide.path}+{family['a1'].path}", "parameters": {"weight": 1.0}}],
    }
    with pytest.raises(CheckpointError, match=r"an adapter for another model\?"):
        merge(mergex_mod, cfg, tmp_path / "out")


def test_structured_reference_and_bad_syntax(family, mergex_mod, tmp_path):
    base, a1 = family["base"], family["a1"]
    structured = {"model": {"path": str(base.path)}, "lora": {"path": str(a1.path)}}
    cfg = {"merge_method": "linear", "models": [{"model": structured, "parameters": {"weight": 1.0}}]}
    cfg["dtype"] = "float32"
    out = merge(mergex_mod, cfg, tmp_path / "out")
    x = a1.apply(base.tensors)
    models.assert_tensor_equal(out, f"{Q0}.weight", x[f"{Q0}.weight"], "F32")
    cfg["models"][0]["model"] = f"{base.path}+"
    with pytest.raises(ConfigError, match=r"BASE\+ADAPTER"):
        merge(mergex_mod, cfg, tmp_path / "out2")


def test_cli_reports_a_bad_adapter_in_one_line(family, tmp_path):
    model = bad_adapter(family, tmp_path, set_config(use_dora=True))
    cfg = models.dump_yaml(
        {"merge_method": "linear", "models": [{"model": model, "parameters": {"weight": 1.0}}]},
        tmp_path / "c.yml",
    )
    res = models.run_cli(["merge", cfg, tmp_path / "out"])
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "DoRA" in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_an_adapter_on_a_block_fp8_base(family, mergex_mod, tmp_path):
    # A base quantized to block FP8 (the adapter's own dtype is F32): the reader decodes the
    # codes, then adds B·A, for the chunk's rows only.
    from support import quant_ref as qref

    base, a1 = family["base"], family["a1"]
    rng = np.random.default_rng(4)
    tensors, decoded = {}, {}
    for name, x in base.tensors.items():
        if name.endswith("_proj.weight"):
            codes = rng.integers(0, 0x7F, size=x.shape, dtype=np.uint8)
            grid = (-(-x.shape[0] // 32), -(-x.shape[1] // 32))
            scales = (rng.random(grid) * 0.01 + 1e-3).astype(np.float32)
            tensors[name] = ("F8_E4M3", x.shape, codes.tobytes())
            tensors[name + "_scale_inv"] = ("F32", grid, scales.tobytes())
            full = np.repeat(np.repeat(scales, 32, axis=0), 32, axis=1)[: x.shape[0], : x.shape[1]]
            decoded[name] = (qref.e4m3(codes) * full).astype(np.float32)
        else:
            tensors[name] = models.encode(x, "bf16")
            decoded[name] = x
    quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [32, 32]}
    fp8 = models.write_quantized(tmp_path / "fp8", tensors, quant)
    cfg = {
        "merge_method": "linear",
        "models": [{"model": f"{fp8}+{a1.path}", "parameters": {"weight": 1.0}}],
        "dtype": "float32",
    }
    out = merge(mergex_mod, cfg, tmp_path / "out")
    want = a1.apply(decoded)
    for name in base.tensors:
        models.assert_tensor_equal(out, name, want[name], "F32")
    assert merge(mergex_mod, cfg, tmp_path / "big", ram_budget="8MiB", threads=1).raw == out.raw
