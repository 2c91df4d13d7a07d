"""``hyperbit import``: a ``bitnet`` checkpoint made by ``transformers`` becomes a run directory that
``eval``, ``generate``, ``inspect``, ``train --resume`` and ``export`` accept, computing the logits
``transformers`` computes; what hyperbit cannot hold is one line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from hyperbit.cli import main
from hyperbit.runs import load_trained

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402
from transformers import BitNetConfig, BitNetForCausalLM  # noqa: E402
from transformers.integrations.bitnet import pack_weights  # noqa: E402

from hyperbit.interop.hf_tokenizer import write_hf_tokenizer  # noqa: E402
from hyperbit.data import ByteTokenizer  # noqa: E402

ATOL = 1e-4  # the two sides round the same ternary matmuls in another order (test_hf_bitnet.py)


@pytest.fixture(autouse=True)
def eager_transformers(monkeypatch):
    """transformers' BitLinear is ``torch.compile``d (half a minute of C++ compilation on a CPU;
    same result) and its BitNet quantizer demands ``accelerate``, which loading on a CPU never uses."""
    from transformers.quantizers.quantizer_bitnet import BitNetHfQuantizer

    monkeypatch.setattr(BitNetHfQuantizer, "validate_environment", lambda self, *a, **k: None)
    with torch._dynamo.config.patch(disable=True):
        yield


def _hf_checkpoint(path, hidden_act="relu2"):
    """A random byte-level BitNetForCausalLM packed the transformers way, with its tokenizer."""
    torch.manual_seed(3)
    cfg = BitNetConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       hidden_act=hidden_act, bos_token_id=None, eos_token_id=None, initializer_range=0.3)
    tensors = {}
    for key, value in BitNetForCausalLM(cfg).state_dict().items():
        if key.endswith("_proj.weight"):
            scale = 1.0 / value.abs().mean().clamp(min=1e-5)
            tensors[key] = pack_weights((value * scale).round().clamp(-1, 1))
            tensors[key.replace(".weight", ".weight_scale")] = scale.reshape(1)
        else:
            tensors[key] = value.contiguous()
    cfg.quantization_config = {"quant_method": "bitnet", "linear_class": "bitlinear",
                               "quantization_mode": "offline"}
    cfg.save_pretrained(path)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    write_hf_tokenizer(ByteTokenizer(), path, 64)


def _corpus(tmp_path):
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(1500))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


def test_import_then_eval_generate_train_inspect_export(tmp_path, capsys):
    hf_dir, run = tmp_path / "hf", tmp_path / "run"
    _hf_checkpoint(hf_dir)
    corpus = _corpus(tmp_path)
    settings = [f"data.path={corpus}", "data.val_fraction=0.1", "train.steps=2", "train.batch_size=2",
                "train.seq_len=16", "train.warmup_steps=1", "train.eval_every=0", "train.eval_batches=1",
                "train.save_every=0", "train.monitor_every=0", "train.device=cpu", "train.precision=fp32"]
    assert main(["import", str(hf_dir), "--out", str(run), *settings]) == 0
    # the run computes what transformers computes
    hf = BitNetForCausalLM.from_pretrained(hf_dir).eval()
    model, cfg, tok, info = load_trained(run, device="cpu")
    assert (info["step"], tok.kind, cfg.model.linear, cfg.model.ffn) == (0, "byte", "bitnet", "relu2")
    x = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        theirs = hf(x).logits
        assert theirs.abs().max() > 1.0
        assert (model(x)[0] - theirs).abs().max() < ATOL
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(corpus), "--batches", "1", "--seq", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 0 and report["val_loss"] > 0
    assert main(["generate", str(run), "--prompt", "def f", "--max-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def f")
    # continued training from the imported checkpoint
    assert main(["train", "--out", str(run), "--resume"]) == 0
    model2, _, _, info2 = load_trained(run, device="cpu")
    assert info2["step"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert main(["inspect", str(run), "--out", str(tmp_path / "inspect"), "--batch-size", "2", "--seq", "16",
                 "--json"]) == 0
    # and out again, in the bitnet format: transformers computes what the trained run computes
    assert main(["export", str(run), str(tmp_path / "bn"), "--format", "bitnet"]) == 0
    back = BitNetForCausalLM.from_pretrained(tmp_path / "bn").eval()
    with torch.no_grad():
        assert (back(x).logits - model2(x)[0]).abs().max() < ATOL
    # and in the hf format: the Auto classes compute exactly what the run computes
    assert main(["export", str(run), str(tmp_path / "auto"), "--format", "hf"]) == 0
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "auto").eval()
    with torch.no_grad():
        assert torch.equal(auto(x).logits, model2(x)[0])


def test_refusals_are_one_line_exit_2_and_write_nothing(tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    _hf_checkpoint(hf_dir, hidden_act="gelu")
    capsys.readouterr()
    assert main(["import", str(hf_dir), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hidden_act='gelu'" in err[0] and "allowed" in err[0]
    assert not (tmp_path / "run").exists()

    ok_dir = tmp_path / "ok"
    _hf_checkpoint(ok_dir)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    for argv, needle in ([["--out", str(tmp_path / "busy")], "not an empty directory"],
                         [["--out", str(tmp_path / "r2"), "model.dim=64"], "model.dim"],
                         [["--out", str(tmp_path / "r3"), "train.lr=-1"], "train.lr"]):
        capsys.readouterr()
        assert main(["import", str(ok_dir), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "hf", "ok"]
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["file"]


def test_export_refusal_through_the_cli(tmp_path, capsys):
    """A hyper-connection run cannot be a BitNetForCausalLM: one line, exit 2, no output dir."""
    from hyperbit.config import preset
    from hyperbit.models import build_model
    from hyperbit.train.checkpoint import save_checkpoint
    from hyperbit.train.config import RunConfig

    cfg = RunConfig.from_dict({"model": preset("tiny", dim=32, n_layers=1, linear="bitnet", pathway="hc",
                                               expansion_rate=2).to_dict(), "train": {"seq_len": 32}})
    save_checkpoint(tmp_path / "run", 1, build_model(cfg.model), None, cfg.to_dict())
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--format", "bitnet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.pathway='hc'" in err[0] and "prenorm" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
