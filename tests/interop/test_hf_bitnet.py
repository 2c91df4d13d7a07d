"""The Hugging Face ``bitnet`` format both ways, checked against the installed ``transformers``:
its packing, its ``BitNetForCausalLM`` logits on our exported checkpoints, and our logits on
checkpoints made with ``transformers``' own packing (``weight_scale`` dividing and multiplying)."""

from __future__ import annotations

import json

import pytest
import torch

from hyperbit.config import ConfigError, preset
from hyperbit.data import ByteTokenizer
from hyperbit.interop.hf_bitnet import check_bitnet_exportable, latent_weight, read_bitnet, write_bitnet
from hyperbit.models import build_model
from hyperbit.nn.bitlinear import quantize_weight
from hyperbit.nn.packed import pack_ternary, unpack_ternary
from hyperbit.nn.rope import RotaryEmbedding
from hyperbit.train.config import RunConfig
from hyperbit.train.errors import CheckpointError

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402
from transformers import BitNetConfig, BitNetForCausalLM  # noqa: E402
from transformers.integrations.bitnet import pack_weights, unpack_weights  # noqa: E402
from transformers.models.bitnet.modeling_bitnet import apply_rotary_pos_emb  # noqa: E402


@pytest.fixture(autouse=True)
def eager_transformers(monkeypatch):
    """transformers' BitLinear is wrapped in ``torch.compile``: on a CPU that compiles C++ for half a
    minute per shape (its result equals the eager one). Its BitNet quantizer also insists on
    ``accelerate`` before loading, which the CPU path never uses."""
    from transformers.quantizers.quantizer_bitnet import BitNetHfQuantizer

    monkeypatch.setattr(BitNetHfQuantizer, "validate_environment", lambda self, *a, **k: None)
    with torch._dynamo.config.patch(disable=True):
        yield


# Logits of a few units; both sides compute the same ternary matmuls in fp32 but round in another
# order (x_q/s @ (c*gamma) here, (x_q @ c) / (s / gamma) there): ~1e-6 apart.
ATOL = 1e-4


def _model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = preset("tiny", linear="bitnet", dim=64, n_layers=2, init_std=0.2, **overrides)
    return cfg, build_model(cfg).eval()


def test_packing_is_transformers_packing():
    codes = torch.randint(-1, 2, (64, 24)).float()
    ours = pack_ternary(codes)
    assert torch.equal(ours, pack_weights(codes.clone()))
    assert torch.equal(unpack_ternary(ours).float(), unpack_weights(ours, dtype=torch.float32))


def test_rope_is_transformers_rotate_half():
    """Our RoPE rotates the two halves of each head, as transformers' does: no q/k permutation."""
    torch.manual_seed(0)
    hd, T, start = 16, 9, 5
    q, k = torch.randn(2, 4, T, hd), torch.randn(2, 2, T, hd)
    rope = RotaryEmbedding(hd, 64, theta=500000.0)
    ours = rope(q, k, start)
    inv = 1.0 / 500000.0 ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.arange(start, start + T).float()[:, None] * inv
    emb = torch.cat([angles, angles], -1)[None]
    theirs = apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("ffn,tie", [("relu2", False), ("swiglu", True)])
def test_export_loads_in_transformers_with_our_logits(tmp_path, ffn, tie):
    cfg, model = _model(ffn=ffn, tie_embeddings=tie)
    write_bitnet(model, RunConfig(model=cfg), ByteTokenizer(), {}, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitnet"
    assert config["hidden_act"] == {"relu2": "relu2", "swiglu": "silu"}[ffn]
    hf = BitNetForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf.model.layers[0].mlp.down_proj).__name__ == "BitLinear"
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(x).logits
    assert ours.abs().max() > 1.0  # not a vacuous comparison
    assert (ours - theirs).abs().max() < ATOL
    # and back: the exported checkpoint read again computes the same logits
    _, back = read_bitnet(tmp_path)
    with torch.no_grad():
        assert (back(x)[0] - theirs).abs().max() < ATOL


def _hf_checkpoint(path, linear_class="bitlinear", mode="offline", act="relu2", tie=False, seed=1):
    """A random BitNetForCausalLM quantised the way transformers quantises (``WeightQuant``:
    ``scale = 1 / mean|W|``), packed with transformers' ``pack_weights``, saved as a checkpoint."""
    torch.manual_seed(seed)
    cfg = BitNetConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       hidden_act=act, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None,
                       tie_word_embeddings=tie, initializer_range=0.3)
    model = BitNetForCausalLM(cfg)
    tensors = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and tie:
            continue
        if key.endswith("_proj.weight") and mode == "offline":
            scale = 1.0 / value.abs().mean().clamp(min=1e-5)
            codes = (value * scale).round().clamp(-1, 1)
            tensors[key] = pack_weights(codes.clone())
            # bitlinear divides by weight_scale, autobitlinear multiplies
            ws = scale if linear_class == "bitlinear" else 1.0 / scale
            tensors[key.replace(".weight", ".weight_scale")] = ws.reshape(1)
        else:
            tensors[key] = value.contiguous()
    cfg.quantization_config = {"quant_method": "bitnet", "linear_class": linear_class,
                               "quantization_mode": mode}
    cfg.save_pretrained(path)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return BitNetForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("linear_class,mode,act,tie", [("bitlinear", "offline", "relu2", False),
                                                       ("autobitlinear", "offline", "silu", True),
                                                       ("autobitlinear", "online", "relu2", False)])
def test_import_of_a_transformers_checkpoint_gives_its_logits(tmp_path, linear_class, mode, act, tie):
    hf = _hf_checkpoint(tmp_path, linear_class, mode, act, tie)
    cfg, model = read_bitnet(tmp_path)
    assert (cfg.linear, cfg.pathway, cfg.subln, cfg.ffn) == ("bitnet", "prenorm", True,
                                                             {"relu2": "relu2", "silu": "swiglu"}[act])
    assert (cfg.norm_eps, cfg.rope_theta, cfg.tie_embeddings) == (1e-5, 500000.0, tie)
    x = torch.randint(0, 96, (2, 30))
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(x).logits
    assert theirs.abs().max() > 1.0
    assert (ours - theirs).abs().max() < ATOL


def test_latent_weights_quantise_back_to_the_stored_codes_and_scale():
    torch.manual_seed(0)
    codes = torch.randint(-1, 2, (32, 16)).float()
    for gamma in (0.013, 0.7, 3.5):
        w = latent_weight(codes, gamma)
        got_codes, got_gamma = quantize_weight(w)
        assert torch.equal(got_codes, codes)
        assert abs(float(got_gamma) - gamma) <= 1e-6 * gamma
    assert torch.equal(latent_weight(torch.zeros(4, 4), 0.5), torch.zeros(4, 4))


@pytest.mark.parametrize("overrides,field", [
    (dict(pathway="hc", expansion_rate=2), "pathway"), (dict(pathway="postnorm"), "pathway"),
    (dict(linear="fp"), "linear"), (dict(subln=False), "subln"), (dict(ffn="moe"), "ffn"), (dict(dim=24, n_heads=4, n_kv_heads=1), "n_kv_heads"),
])
def test_export_refuses_what_the_format_cannot_hold(tmp_path, overrides, field):
    cfg = preset("tiny", **{"linear": "bitnet", **overrides})
    with pytest.raises(ConfigError, match=field):
        check_bitnet_exportable(cfg)
    with pytest.raises(ConfigError):
        write_bitnet(build_model(cfg), RunConfig(model=cfg), ByteTokenizer(), {}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,match", [
    ({"hidden_act": "gelu"}, "hidden_act"), ({"attention_bias": True}, "attention_bias"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quant_method"),
    ({"quantization_config": {"quant_method": "bitnet", "use_rms_norm": True}}, "use_rms_norm"),
    ({"model_type": "llama"}, "model_type"), ({"head_dim": 8}, "head_dim"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type"),
])
def test_import_refuses_what_hyperbit_cannot_hold(tmp_path, change, match):
    cfg, model = _model()
    write_bitnet(model, RunConfig(model=cfg), ByteTokenizer(), {}, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match=match):
        read_bitnet(tmp_path)


def test_import_refuses_damaged_tensors(tmp_path):
    from safetensors.torch import load_file

    cfg, model = _model()
    write_bitnet(model, RunConfig(model=cfg), ByteTokenizer(), {}, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    bad = dict(tensors)
    bad["model.layers.0.mlp.up_proj.weight"] = bad["model.layers.0.mlp.up_proj.weight"] | 0b11
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="pattern 3"):
        read_bitnet(tmp_path)
    del tensors["model.layers.1.self_attn.k_proj.weight_scale"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="weight_scale"):
        read_bitnet(tmp_path)
