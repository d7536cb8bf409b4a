"""``mergex extract-lora``: the accuracy target (a delta of rank ≤ R reproduced to f32
rounding; a full-rank one within 1% of the optimal rank-R error), on matrices larger than
the budget (the randomized range finder) and smaller (the exact SVD); the same bytes on any
thread count; the peft round trip on a real transformers model; and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mergex import ConfigError
from support import models

BIG = "model.layers.0.mlp.up_proj.weight"
SHAPE = (1536, 768)  # 4.5 MiB in f32: larger than the 4 MiB budget below


def f32_model(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    models.write_model(path, tensors, "f32", layers=1, config=models.model_config(1, "f32"))
    return path


def spectrum_delta(rng: np.random.Generator, sigma: np.ndarray) -> np.ndarray:
    """A SHAPE matrix with singular values ``sigma`` (random singular vectors)."""
    m = len(sigma)
    u = np.linalg.qr(rng.standard_normal((SHAPE[0], m)))[0]
    v = np.linalg.qr(rng.standard_normal((SHAPE[1], m)))[0]
    return ((u * sigma) @ v.T).astype(np.float32)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A base and three fine-tunes of it: a rank-6 delta, a full-rank delta whose spectrum
    decays, and a Gaussian (flat-spectrum) delta; one small weight and a norm change too."""
    root = tmp_path_factory.mktemp("extract")
    rng = np.random.default_rng(0)
    base = {
        BIG: (rng.standard_normal(SHAPE) * 0.05).astype(np.float32),
        "model.layers.0.self_attn.q_proj.weight": (rng.standard_normal((64, 64)) * 0.05).astype(np.float32),
        "model.layers.0.input_layernorm.weight": np.ones(64, np.float32),
    }
    deltas = {
        "low": spectrum_delta(rng, np.linspace(1.0, 0.5, 6)),
        "decay": spectrum_delta(rng, 0.97 ** np.arange(min(SHAPE))),
        "flat": (rng.standard_normal(SHAPE) * 0.01).astype(np.float32),
    }
    out = {"base": f32_model(root / "base", base), "deltas": {}}
    for name, d in deltas.items():
        tuned = dict(base)
        tuned[BIG] = base[BIG] + d
        tuned["model.layers.0.self_attn.q_proj.weight"] = (
            base["model.layers.0.self_attn.q_proj.weight"] + 0.01
        )
        tuned["model.layers.0.input_layernorm.weight"] = base["model.layers.0.input_layernorm.weight"] * 1.5
        out[name] = f32_model(root / name, tuned)
        # The delta as the files hold it (each weight rounded to f32).
        out["deltas"][name] = tuned[BIG].astype(np.float64) - base[BIG]
    return out


def extracted(folder: Path, module: str) -> np.ndarray:
    from safetensors.numpy import load_file

    t = load_file(folder / "adapter_model.safetensors")
    prefix = f"base_model.model.{module.removesuffix('.weight')}"
    a, b = t[f"{prefix}.lora_A.weight"], t[f"{prefix}.lora_B.weight"]
    return b.astype(np.float64) @ a.astype(np.float64)


def optimal_error(d: np.ndarray, rank: int) -> float:
    s = np.linalg.svd(d, compute_uv=False)
    return float(np.sqrt(np.sum(s[rank:] ** 2)))


def extract(mergex_mod, pair, which: str, out: Path, **kw):
    kw = {"rank": 16, "ram_budget": "4MiB", "threads": 2, **kw}
    return mergex_mod.extract_lora(pair[which], pair["base"], out, **kw)


def test_a_low_rank_delta_is_reproduced_to_f32_rounding(mergex_mod, pair, tmp_path):
    res = extract(mergex_mod, pair, "low", tmp_path / "out")
    assert f"{BIG.removesuffix('.weight')}" in res.targets
    d = pair["deltas"]["low"]
    err = np.abs(extracted(tmp_path / "out", BIG) - d).max()
    assert err <= 1e-6 * np.abs(d).max(), err
    assert res.exact == 1  # the small q_proj; the big weight went through the range finder


@pytest.mark.parametrize("which", ["decay", "flat"])
def test_a_full_rank_delta_is_within_one_percent_of_the_optimal_error(mergex_mod, pair, tmp_path, which):
    extract(mergex_mod, pair, which, tmp_path / "out")
    d = pair["deltas"][which]
    err = np.linalg.norm(extracted(tmp_path / "out", BIG) - d)
    best = optimal_error(d, 16)
    assert err <= 1.01 * best, (err, best)


def test_the_exact_svd_is_optimal_when_the_weight_fits(mergex_mod, pair, tmp_path):
    res = extract(mergex_mod, pair, "decay", tmp_path / "out", ram_budget="256MiB")
    assert res.exact == 2
    d = pair["deltas"]["decay"]
    err = np.linalg.norm(extracted(tmp_path / "out", BIG) - d)
    assert err <= (1 + 1e-6) * optimal_error(d, 16)


def test_same_bytes_on_any_thread_count_and_what_else_is_written(mergex_mod, pair, tmp_path):
    one = extract(mergex_mod, pair, "decay", tmp_path / "one", threads=1)
    two = extract(mergex_mod, pair, "decay", tmp_path / "two", threads=2)
    assert (one.out_dir / "adapter_model.safetensors").read_bytes() == (
        two.out_dir / "adapter_model.safetensors"
    ).read_bytes()
    # The norm differs and is no matrix: saved whole, with a warning naming it.
    assert one.saved == ["model.layers.0.input_layernorm.weight"]
    assert any("input_layernorm" in w for w in one.warnings)
    cfg = json.loads((one.out_dir / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["model.layers.0.input_layernorm"]
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 16 and cfg["peft_type"] == "LORA"
    assert sorted(cfg["target_modules"]) == sorted(one.targets)
    # The folder is mergex's: --overwrite replaces it.
    again = extract(mergex_mod, pair, "low", tmp_path / "one", threads=1, overwrite=True)
    assert (again.out_dir / "mergex_config.yml").is_file()


def test_include_exclude_and_identical_weights(mergex_mod, pair, tmp_path):
    res = extract(mergex_mod, pair, "low", tmp_path / "only", include=r"self_attn")
    assert res.targets == ["model.layers.0.self_attn.q_proj"] and res.saved == []
    res = extract(mergex_mod, pair, "low", tmp_path / "none", exclude=r"self_attn|layernorm")
    assert res.targets == ["model.layers.0.mlp.up_proj"]
    same = extract(mergex_mod, pair, "base", tmp_path / "same")
    assert same.targets == [] and any("identical" in w for w in same.warnings)


def test_bad_options_are_one_line_errors_with_no_output(mergex_mod, pair, tmp_path):
    out = tmp_path / "out"
    for kw, message in (
        ({"rank": 0}, "rank: expected a positive integer"),
        ({"include": "("}, "include: invalid regular expression"),
        ({"ram_budget": "96KiB"}, "cannot hold the rank-16 factorization"),
    ):
        with pytest.raises(ConfigError, match=message):
            extract(mergex_mod, pair, "low", out, **kw)
        assert not out.exists()


def test_a_weight_whose_shape_changed_is_saved_whole(mergex_mod, pair, tmp_path):
    wide = {
        BIG: np.zeros((SHAPE[0] + 2, SHAPE[1]), np.float32),
        "model.layers.0.self_attn.q_proj.weight": np.zeros((64, 64), np.float32),
    }
    res = mergex_mod.extract_lora(f32_model(tmp_path / "wide", wide), pair["base"], tmp_path / "out", rank=4)
    assert BIG in res.saved and any("base's shape is" in w for w in res.warnings)


def test_torch_linear_algebra_gives_the_same_factors_as_numpy():
    pytest.importorskip("torch")
    from mergex.lowrank import LinAlg, Sketch, factorize

    rng = np.random.default_rng(3)
    d = rng.standard_normal((300, 200))

    def read(r0: int, r1: int) -> np.ndarray:
        return d[r0:r1]

    for sketch in (None, Sketch(20, 2, 64)):
        a = factorize(read, d.shape, 12, LinAlg(), sketch, 0, "w", 64)
        b = factorize(read, d.shape, 12, LinAlg("cpu", use_torch=True), sketch, 0, "w", 64)
        np.testing.assert_allclose(b.b @ b.a, a.b @ a.a, atol=1e-5)


def test_peft_loads_the_adapter_and_its_weights_equal_base_plus_delta(mergex_mod, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    torch.manual_seed(0)
    config = models.tiny_llama_config(transformers, attention_bias=True)
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for n, p in base.named_parameters():
            p.add_(torch.randn_like(p) * 0.01 if "mlp" in n or "bias" in n or "norm" in n else 0)
    base.save_pretrained(tmp_path / "tuned")
    res = mergex_mod.extract_lora(
        tmp_path / "tuned", tmp_path / "base", tmp_path / "adapter", rank=8, embeddings=True
    )
    assert "model.layers.0.self_attn.q_proj.bias" in res.saved
    fresh = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").merge_and_unload().state_dict()
    want = load_file(tmp_path / "base" / "model.safetensors")
    tuned = load_file(tmp_path / "tuned" / "model.safetensors")
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for name, w in want.items():
        prefix = "base_model.model." + name.removesuffix(".weight")
        if f"{prefix}.lora_A.weight" in adapter:
            a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
            w = w + (b.double() @ a.double()).float()
        elif name in res.saved:
            w = tuned[name]
        torch.testing.assert_close(merged[name], w, rtol=1e-6, atol=1e-6, msg=name)
    loaded = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32),
        tmp_path / "adapter",
    )
    assert bool(torch.isfinite(loaded(torch.tensor([[1, 2, 3]])).logits).all())


def test_cli_extracts_and_reports_errors_in_one_line(pair, tmp_path):
    res = models.run_cli(["extract-lora", pair["low"], pair["base"], tmp_path / "out", "--rank", "8"])
    assert res.returncode == 0, res.stderr
    assert "rank-8 adapters for 2 modules" in res.stdout
    assert "input_layernorm" in res.stderr  # the warning naming the tensor saved whole
    res = models.run_cli(
        ["extract-lora", pair["low"], tmp_path / "missing", tmp_path / "out2", "--rank", "8"]
    )
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing" in lines[0], res.stderr
