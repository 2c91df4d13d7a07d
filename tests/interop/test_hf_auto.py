"""``HyperbitForCausalLM`` through the Auto classes: exact logits for every pathway, fp and BitNet,
``save_pretrained`` round trips, greedy ``generate`` (with the KV cache) equal to hyperbit's own
greedy generation, the tokenizer through ``AutoTokenizer``, and the lazy registration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyperbit.config import preset
from hyperbit.data import BPETokenizer, ByteTokenizer
from hyperbit.models import build_model, generate
from hyperbit.train.config import RunConfig

transformers = pytest.importorskip("transformers")
from hyperbit.interop.hf_auto import to_hf, write_hf  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

SRC = str(Path(__file__).resolve().parents[2] / "src")

MODELS = {
    "prenorm-fp": dict(),
    "bitnet-relu2": dict(linear="bitnet", ffn="relu2"),
    "postnorm": dict(pathway="postnorm"),
    "dhc-x2-tied": dict(pathway="hc", expansion_rate=2, tie_embeddings=True),
    "shc-x2-bitnet": dict(pathway="hc", expansion_rate=2, hc_dynamic=False, linear="bitnet"),
    "mhc-x2-perms": dict(pathway="mhc", expansion_rate=2, mhc_res="permutations"),
    "frac-x2": dict(pathway="frac", frac_rate=2),
    "sequential": dict(pathway="sequential", expansion_rate=2),
    "parallel-x3": dict(pathway="parallel", expansion_rate=3),
    "moe": dict(ffn="moe", moe_experts=4, moe_top_k=2),
}


def _model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = preset("tiny", dim=32, n_layers=2, init_std=0.2, **overrides)
    model = build_model(cfg).eval()
    with torch.no_grad():  # move every connection off its init so the pathways matter
        for name, p in model.named_parameters():
            if not name.endswith(("proj.weight", "embed.weight", "head.weight")):
                p.add_(0.1 * torch.randn_like(p))
    return cfg, model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_auto_model_matches_hyperbit_exactly(tmp_path, name):
    cfg, model = _model(**MODELS[name])
    write_hf(model, RunConfig(model=cfg), ByteTokenizer(), {}, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == "HyperbitForCausalLM"
    assert hf.model.cfg == model.cfg
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(x).logits
    assert torch.equal(ours, theirs)
    # save_pretrained round trip
    hf.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.equal(again(x).logits, ours)
    # greedy generate with the KV cache equals hyperbit's greedy generation
    prompt = x[:1, :6]
    want = generate(model, prompt, 20, temperature=0)
    got = hf.generate(prompt, max_new_tokens=20, do_sample=False)
    assert got.tolist() == want.tolist()
    assert len(set(want[0, 6:].tolist())) > 1  # not a constant continuation


def test_labels_give_the_shifted_next_token_loss():
    cfg, model = _model()
    hf = to_hf(model)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        _, want = model(x[:, :-1], x[:, 1:])
        got = hf(x, labels=x, use_cache=False).loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_padding_is_refused():
    _, model = _model()
    hf = to_hf(model)
    x = torch.randint(0, 256, (2, 8))
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="padding"):
        hf(x, attention_mask=mask)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_auto_tokenizer_encodes_like_hyperbit(tmp_path, kind):
    docs = ["def f(x):\n    return x + 1\n", "héllo wörld, straße 😀"] * 40
    tok = ByteTokenizer() if kind == "byte" else BPETokenizer.train(docs, 300)
    cfg, model = _model(vocab_size=tok.vocab_size)
    write_hf(model, RunConfig(model=cfg), tok, {}, tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "def g(y):\n\treturn y * 2  # ünïcode ✓ <|endoftext|> end\n\n\x00"
    ids = hf_tok(text)["input_ids"]
    assert ids == tok.encode(text)
    assert hf_tok.decode(ids) == tok.decode(ids)
    assert hf_tok.eos_token_id == tok.eot_id


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **env})


def test_the_import_hook_runs_its_action_once_the_module_is_imported(tmp_path, monkeypatch):
    """The mechanism of the lazy registration, on a stand-in module (transformers is already
    imported in this process): nothing runs before the import, the action right after it, and
    the module itself is intact."""
    from hyperbit.interop import hf_register

    (tmp_path / "hyperbit_hook_probe.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []
    monkeypatch.setattr(hf_register, "ACTIONS", {"hyperbit_hook_probe": lambda: calls.append(
        sys.modules["hyperbit_hook_probe"].VALUE)})
    hf_register.install()
    assert calls == []
    import hyperbit_hook_probe

    assert calls == [41] and hyperbit_hook_probe.VALUE == 41
    monkeypatch.delitem(sys.modules, "hyperbit_hook_probe")


@pytest.mark.slow  # a fresh interpreter importing transformers' modelling code: ~10-30 s
def test_registration_is_lazy_and_works_after_import_hyperbit(tmp_path):
    cfg, model = _model(pathway="hc", expansion_rate=2)
    write_hf(model, RunConfig(model=cfg), ByteTokenizer(), {}, tmp_path)
    code = f"""
import sys
import hyperbit
assert "transformers" not in sys.modules, "import hyperbit imported transformers"
from transformers import AutoConfig, AutoModelForCausalLM
assert type(AutoConfig.from_pretrained({str(tmp_path)!r})).__name__ == "HyperbitConfig"
m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
print(type(m).__name__)
"""
    result = _python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("HyperbitForCausalLM")


def test_without_transformers_hyperbit_imports_and_hf_export_is_one_line(tmp_path):
    """transformers made unimportable: ``import hyperbit`` works, the bitnet format too, and
    ``--format hf`` is a one-line error (exit 2) that leaves nothing behind."""
    code = f"""
import sys
sys.modules["transformers"] = None  # import transformers -> ImportError
import hyperbit
from hyperbit.cli import main
from hyperbit.config import preset
from hyperbit.models import build_model
from hyperbit.train.checkpoint import save_checkpoint
from hyperbit.train.config import RunConfig
cfg = RunConfig.from_dict({{"model": preset("tiny", dim=32, n_layers=1, linear="bitnet").to_dict(),
                           "train": {{"seq_len": 32}}}})
save_checkpoint({str(tmp_path / 'run')!r}, 1, build_model(cfg.model), None, cfg.to_dict())
print("hf", main(["export", {str(tmp_path / 'run')!r}, {str(tmp_path / 'hf')!r}, "--format", "hf"]))
print("bitnet", main(["export", {str(tmp_path / 'run')!r}, {str(tmp_path / 'bn')!r}, "--format", "bitnet"]))
"""
    result = _python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "hf 2" in result.stdout and "bitnet 0" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("hyperbit: error")]
    assert len(errors) == 1 and "transformers" in errors[0] and "hyperbit[hf]" in errors[0]
    assert not (tmp_path / "hf").exists() and (tmp_path / "bn" / "model.safetensors").is_file()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load_and_generate(tmp_path, device, dtype):
    """``from_pretrained(dtype=...)`` on a device gives what hyperbit's model cast the same way gives."""
    cfg, model = _model(pathway="hc", expansion_rate=2, linear="bitnet")
    write_hf(model, RunConfig(model=cfg), ByteTokenizer(), {}, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).to(device).eval()
    ours = model.to(device=device, dtype=dtype)
    assert next(hf.parameters()).dtype == dtype
    x = torch.randint(0, 256, (1, 12), device=device)
    with torch.no_grad():
        assert torch.equal(hf(x).logits, ours(x)[0])
    want = generate(ours, x[:, :5], 12, temperature=0)
    assert hf.generate(x[:, :5], max_new_tokens=12, do_sample=False).tolist() == want.tolist()
