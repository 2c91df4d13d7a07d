"""Smoke tests of the step-time benchmarks (benchmarks/gpu_step.py --smoke on the CPU,
train_throughput.py --models --quick) and of the plain GPT baseline they share: every ratio they
print follows from the times and bytes they stored, and the baseline is a real GPT of hyperbit's
Pre-Norm shape."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bench_check import REPO, run, table

sys.path.insert(0, str(REPO / "benchmarks"))
import _common as C  # noqa: E402

from hyperbit import ModelConfig, build_model  # noqa: E402


def test_plain_gpt_has_prenorm_shape_and_is_causal():
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=16).resolved()
    torch.manual_seed(0)
    plain = C.build_plain_gpt(64, 32, 2, 2, cfg.ffn_hidden, 16)
    assert sum(p.numel() for p in plain.parameters()) == build_model(cfg).num_params()
    idx = torch.randint(0, 64, (2, 16))
    logits, loss = plain(idx, idx)
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.1  # near-uniform at init
    idx2 = idx.clone()
    idx2[:, 10] = (idx2[:, 10] + 1) % 64
    logits2, _ = plain(idx2)
    torch.testing.assert_close(logits2[:, :10], logits[:, :10])  # the past never sees the future
    assert not torch.allclose(logits2[:, 10:], logits[:, 10:])


def _check_rows(out: str, results: dict, memory_key: str, modes: list[str], models: list[str]):
    rows = table(out, "model")
    keys = [f"{m}/{mode}" for mode in modes for m in models if mode != "compiled-plain" or m == "dhc4"]
    assert list(results) == keys and len(rows) == len(keys)
    for row, key in zip(rows, keys):
        r, mode = results[key], key.split("/")[1]
        pre, plain = results[f"prenorm/{mode.replace('-plain', '')}"], results[f"plain/{mode.replace('-plain', '')}"]
        assert row[1] == mode and row[0] == C.STEP_MODELS[r["model"]][0]
        assert len(r["step_s_per_round"]) == 1 and r["step_s"] == r["step_s_per_round"][0] > 0
        assert row[2] == f"{r['step_s'] * 1e3:.2f}"
        assert row[3] == f"{r['step_s'] / plain['step_s']:.3f}" and row[4] == f"{r['step_s'] / pre['step_s']:.3f}"
        assert r[memory_key] > 0 and row[7] == f"{r[memory_key] / pre[memory_key]:.3f}"
        assert r["compiled"] == (mode != "eager") and r["hc_path"] == ("plain" if mode == "compiled-plain" else "fused")
    # what the memory column measures: DHC x4 keeps its (B, T, 4, d) streams once per branch
    assert results["dhc4/eager"][memory_key] > results["prenorm/eager"][memory_key]


@pytest.mark.parametrize("modes", [["eager"], pytest.param(["eager", "compiled", "compiled-plain"],
                                                             marks=pytest.mark.slow)])
def test_gpu_step_smoke_on_cpu(tmp_path, modes):
    models = ["plain", "prenorm", "dhc4"]
    out, data = run("gpu_step.py", ["--smoke", "--models", ",".join(models), "--modes", ",".join(modes),
                                    "--backend", "eager"], {}, tmp_path / "g.json", timeout=600)
    assert data["benchmark"] == "gpu_step" and data["settings"]["smoke"] is True
    (entry,) = data["sizes"]
    memory_key = "peak_bytes" if torch.cuda.is_available() else "saved_bytes"
    _check_rows(out, entry["results"], memory_key, modes, models)
    targets = {t["name"]: t for t in data["targets"]}
    t = targets["dhc4_eager_step_s_d32"]
    res = entry["results"]
    assert t["ratio"] == pytest.approx(res["dhc4/eager"]["step_s"] / res["prenorm/eager"]["step_s"])
    assert t["passed"] is (t["ratio"] <= 1.30)
    assert targets["shc4_compiled_step_s_d32"]["passed"] is None  # SHC x4 not asked for: no verdict
    pre = targets["prenorm_eager_step_s_d32"]  # Pre-Norm against the plain GPT, not against itself
    assert pre["ratio"] == pytest.approx(res["prenorm/eager"]["step_s"] / res["plain/eager"]["step_s"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_gpu_step_without_cuda_says_so_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_step.py"), "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout.strip().count("\n") == 0 and "no CUDA" in proc.stdout
    assert proc.stderr == "" and not (tmp_path / "x.json").exists()


def test_train_throughput_models_quick(tmp_path):
    models, modes = ["plain", "prenorm", "dhc4"], ["eager"]
    out, data = run("train_throughput.py", ["--models", "--quick", "--models-list", ",".join(models), "--modes",
                                            "eager", "--threads", "1"], {}, tmp_path / "t.json", timeout=300)
    assert data["benchmark"] == "train_throughput_models" and data["settings"]["shape"]["dim"] == 32
    assert data["machine"]["avx512_bf16"] in (True, False)
    _check_rows(out, data["results"], "saved_bytes", modes, models)
    targets = {t["name"]: t for t in data["targets"]}
    res = data["results"]
    assert targets["dhc4_eager_saved_bytes"]["ratio"] == pytest.approx(
        res["dhc4/eager"]["saved_bytes"] / res["prenorm/eager"]["saved_bytes"])


def test_activation_checkpointing_quick(tmp_path):
    out, data = run("activation_checkpointing.py", ["--quick", "--threads", "1"], {}, tmp_path / "a.json")
    res = data["results"]
    rows = table(out, "model")
    assert [r[:2] for r in rows] == [["Pre-Norm", "plain"], ["Pre-Norm", "checkpointed"],
                                     ["DHC x4", "plain"], ["DHC x4", "checkpointed"]]
    for model in ("prenorm", "dhc4"):
        plain, ckpt = res[f"{model}/plain"], res[f"{model}/checkpointed"]
        assert ckpt["saved_ratio"] == pytest.approx(ckpt["saved_bytes"] / plain["saved_bytes"])
        assert ckpt["saved_ratio"] < 0.5
        assert ckpt["step_ratio"] == pytest.approx(ckpt["step_s"] / plain["step_s"])
    assert all(t["passed"] for t in data["targets"])


def test_stream_dtype_quick(tmp_path):
    out, data = run("stream_dtype.py", ["--quick"], {}, tmp_path / "s.json")
    rows = table(out, "model")
    for row, (model, run_name) in zip(rows, [(m, r) for m in ("prenorm", "dhc4") for r in ("ac+fp32", "ac+bf16")]):
        r = data["results"][model][run_name]
        assert row[1] == run_name and row[2] == f"{r['logits_rel_err']:.2e}" and row[4] == f"{r['grad_rel_err']:.2e}"
        assert 0 < r["grad_rel_err"] < 0.5 and 0 < r["logits_rel_err"] < 0.1  # bf16 autocast: small, not zero
