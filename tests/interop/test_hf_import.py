"""``import_bitnet``: the tokenizer travels with the checkpoint into the run (BPE and byte), the run's
checkpoint holds exactly the imported weights, and a missing tokenizer stops it before any file."""

from __future__ import annotations

import json

import pytest
import torch

from hyperbit.config import preset
from hyperbit.data import BPETokenizer, DataError, same_tokenizer
from hyperbit.interop.hf_bitnet import read_bitnet, write_bitnet
from hyperbit.interop.hf_import import import_bitnet
from hyperbit.models import build_model
from hyperbit.runs import load_trained
from hyperbit.train.config import RunConfig, TrainConfig


def _export(path, tok):
    torch.manual_seed(0)
    cfg = preset("tiny", linear="bitnet", ffn="relu2", dim=32, n_layers=1, vocab_size=tok.vocab_size,
                 max_seq_len=48)
    write_bitnet(build_model(cfg), RunConfig(model=cfg, train=TrainConfig(seq_len=32)), tok, {}, path)
    return cfg


def test_bpe_tokenizer_and_weights_arrive_in_the_run(tmp_path):
    tok = BPETokenizer.train(["def add(a, b):\n    return a + b\n"] * 50, 280)
    _export(tmp_path / "hf", tok)
    step_dir = import_bitnet(tmp_path / "hf", tmp_path / "run", ["train.steps=5", "train.warmup_steps=1"])
    model, cfg, run_tok, info = load_trained(tmp_path / "run", device="cpu")
    assert same_tokenizer(run_tok, tok) and run_tok.eot_id == tok.eot_id
    assert cfg.data.tokenizer == str((tmp_path / "run" / "tokenizer.json").resolve())
    assert (cfg.train.steps, cfg.train.seq_len, info["path"]) == (5, 48, step_dir)
    _, direct = read_bitnet(tmp_path / "hf")
    for (k, a), (_, b) in zip(model.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), k
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"] == cfg.model.to_dict()


def test_tokenizer_override_and_missing_tokenizer(tmp_path):
    tok = BPETokenizer.train(["x = 1\n"] * 20, 260)
    _export(tmp_path / "hf", tok)
    (tmp_path / "hf" / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="tokenizer"):
        import_bitnet(tmp_path / "hf", tmp_path / "run")
    assert not (tmp_path / "run").exists()
    tok.save(tmp_path / "tok.json")
    import_bitnet(tmp_path / "hf", tmp_path / "run", tokenizer=tmp_path / "tok.json")
    assert same_tokenizer(load_trained(tmp_path / "run", device="cpu")[2], tok)
