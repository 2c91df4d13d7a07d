"""Checkpoints: bitwise-exact resume, tied / BitNet roundtrips, every corruption gives one
CheckpointError with a one-line message, kills mid-save never break `latest`, keep_last, no pickles."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

import hyperbit
from hyperbit.train import CheckpointError, load_checkpoint, restore_rng_state, save_checkpoint
from hyperbit.train import checkpoint as ckpt_mod

HC = dict(pathway="hc", expansion_rate=2)


def make(seed: int, lr: float = 1e-2, **overrides):
    torch.manual_seed(seed)
    cfg = hyperbit.preset("tiny", **{**HC, **overrides})
    model = hyperbit.build_model(cfg)
    return cfg, model, hyperbit.make_optimizer(model, lr=lr)


def train(model, opt, steps: int) -> list[torch.Tensor]:
    """Batch size from python's RNG, length from numpy's, tokens from torch's: all three matter."""
    losses = []
    for _ in range(steps):
        batch, length = 1 + random.randrange(2), 8 + int(np.random.randint(8))
        idx = torch.randint(0, 256, (batch, length + 1))
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return losses


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for name, va in sa["state"][i].items():
            vb = sb["state"][i][name]
            assert type(va) is type(vb), (i, name)
            if isinstance(va, torch.Tensor):
                assert va.dtype == vb.dtype and torch.equal(va, vb), (i, name)
            else:
                assert va == vb, (i, name)


def reseal(step_dir) -> None:
    """Rewrite COMPLETE with the files' current hashes, to reach the parsers behind the checksums."""
    manifest = json.loads((step_dir / "COMPLETE").read_text())
    for name, entry in manifest["files"].items():
        data = (step_dir / name).read_bytes()
        entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (step_dir / "COMPLETE").write_text(json.dumps(manifest))


def step_names(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


# ------------------------------------------------------------------------------------------------
# exact resume and roundtrips
# ------------------------------------------------------------------------------------------------

def test_resume_is_bitwise_identical(tmp_path):
    random.seed(0)
    np.random.seed(0)
    cfg, model, opt = make(0)
    train(model, opt, 3)
    step_dir = save_checkpoint(tmp_path, 3, model, opt, cfg.to_dict(), {"data_position": 42})
    assert step_dir == tmp_path / "checkpoints" / "step_00000003"
    ref_losses = train(model, opt, 3)
    ref_params = snapshot(model)

    # A fresh process: other seeds everywhere, another lr; the checkpoint must override all of it.
    random.seed(1)
    np.random.seed(1)
    _, model2, opt2 = make(1, lr=0.5)
    ckpt = load_checkpoint(tmp_path, model2, opt2)
    assert ckpt["path"] == step_dir and ckpt["step"] == 3
    assert ckpt["state"]["step"] == 3 and ckpt["state"]["data_position"] == 42
    assert ckpt["config"] == cfg.to_dict()
    assert hyperbit.ModelConfig.from_dict(ckpt["config"]) == cfg
    restore_rng_state(ckpt["state"])
    losses = train(model2, opt2, 3)

    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses)), (losses, ref_losses)
    assert_same(snapshot(model2), ref_params)
    assert_same_optimizer(opt2, opt)
    step = opt2.state_dict()["state"][0]["step"]
    assert isinstance(step, torch.Tensor) and step.item() == 6.0  # AdamW's step stays a tensor


def test_optimizer_state_roundtrips_exactly(tmp_path):
    cfg, model, opt = make(0)
    train(model, opt, 2)
    save_checkpoint(tmp_path, 2, model, opt, cfg.to_dict(), {})
    _, model2, opt2 = make(5)
    load_checkpoint(tmp_path, model2, opt2)
    assert_same_optimizer(opt2, opt)
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95)  # a tuple again, not a JSON list
    # Tensors are flattened as state.{index}.{name}; AdamW's tensor step stays a 0-dim tensor.
    step_dir = tmp_path / "checkpoints" / "step_00000002"
    with safe_open(str(step_dir / "optimizer.safetensors"), framework="pt") as f:
        assert {"state.0.step", "state.0.exp_avg", "state.0.exp_avg_sq"} <= set(f.keys())
        step = f.get_tensor("state.0.step")
    assert step.shape == () and step.dtype == torch.float32 and step.item() == 2.0
    assert json.loads((step_dir / "optimizer.json").read_text())["state"]["0"]["step"] == {
        "__tensor__": "state.0.step"}


class CountingSGD(torch.optim.SGD):
    """Per-param state mixing a tensor (momentum_buffer) with plain Python numbers."""

    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["count"] = self.state[p].get("count", 0) + 1
                self.state[p]["last_lr"] = group["lr"]


def test_non_tensor_optimizer_state_stays_numbers(tmp_path):
    cfg, model, _ = make(0)
    opt = CountingSGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, 2)
    save_checkpoint(tmp_path, 2, model, opt, cfg.to_dict(), {})
    _, model2, _ = make(1)
    opt2 = CountingSGD(model2.parameters(), lr=0.3, momentum=0.9)
    load_checkpoint(tmp_path, model2, opt2)
    assert_same_optimizer(opt2, opt)
    state = opt2.state_dict()["state"][0]
    assert type(state["count"]) is int and state["count"] == 2 and state["last_lr"] == 0.1


def test_tied_embeddings_roundtrip(tmp_path):
    cfg, model, opt = make(0, tie_embeddings=True)
    train(model, opt, 2)
    step_dir = save_checkpoint(tmp_path, 2, model, opt, cfg.to_dict(), {})
    with safe_open(str(step_dir / "model.safetensors"), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "embed.weight" in keys and "head.weight" not in keys  # stored once
    assert json.loads(meta["aliases"]) == {"head.weight": "embed.weight"}

    _, model2, opt2 = make(3, tie_embeddings=True)
    load_checkpoint(tmp_path, model2, opt2)
    assert model2.head.weight is model2.embed.weight  # still tied
    assert_same(snapshot(model2), snapshot(model))
    assert_same_optimizer(opt2, opt)


def test_untied_checkpoint_into_tied_model_is_refused(tmp_path):
    cfg, model, opt = make(0)
    save_checkpoint(tmp_path, 0, model, opt, cfg.to_dict(), {})
    _, tied, _ = make(1, tie_embeddings=True)
    with pytest.raises(CheckpointError, match="ties head.weight to embed.weight"):
        load_checkpoint(tmp_path, tied)


def test_bitnet_roundtrip(tmp_path):
    cfg, model, opt = make(0, linear="bitnet")
    train(model, opt, 2)
    save_checkpoint(tmp_path, 2, model, opt, cfg.to_dict(), {})
    _, model2, opt2 = make(7, linear="bitnet")
    load_checkpoint(tmp_path, model2, opt2)
    assert_same(snapshot(model2), snapshot(model))
    assert_same_optimizer(opt2, opt)
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(model2(idx)[0], model(idx)[0])


def test_accepts_run_dir_checkpoints_dir_and_step_dir(tmp_path):
    cfg, model, opt = make(0)
    save_checkpoint(tmp_path, 1, model, opt, cfg.to_dict(), {})
    step_dir = save_checkpoint(tmp_path, 2, model, opt, cfg.to_dict(), {})
    (tmp_path / "config.json").write_text("{}")  # a run dir may hold files of its own
    assert load_checkpoint(tmp_path)["path"] == step_dir
    assert load_checkpoint(tmp_path / "checkpoints")["path"] == step_dir
    assert load_checkpoint(tmp_path / "checkpoints" / "step_00000001")["step"] == 1
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000002\n"
    assert hyperbit.train.latest_checkpoint(tmp_path) == step_dir
    assert hyperbit.train.latest_checkpoint(tmp_path / "elsewhere") is None


def test_optimizer_is_optional(tmp_path):
    cfg, model, _ = make(0)
    save_checkpoint(tmp_path, 0, model, None, cfg.to_dict(), {})
    _, model2, opt2 = make(1)
    load_checkpoint(tmp_path, model2)
    assert_same(snapshot(model2), snapshot(model))
    with pytest.raises(CheckpointError, match="has no optimizer state"):
        load_checkpoint(tmp_path, model2, opt2)


def test_bad_state_is_rejected_before_writing(tmp_path):
    cfg, model, opt = make(0)
    with pytest.raises(CheckpointError, match="state is not JSON-serialisable"):
        save_checkpoint(tmp_path, 1, model, opt, cfg.to_dict(), {"sampler": object()})
    with pytest.raises(CheckpointError, match="reserved key"):
        save_checkpoint(tmp_path, 1, model, opt, cfg.to_dict(), {"step": 1})
    assert not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------
# bad input: one exception type, one line, model and optimizer untouched
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    cfg, model, opt = make(0)
    train(model, opt, 1)
    step_dir = save_checkpoint(tmp_path, 1, model, opt, cfg.to_dict(), {})
    return tmp_path, step_dir


def _truncate(d):
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def _flip(d):
    path = d / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _garbage_state(d):
    (d / "state.json").write_bytes(b"\x00garbage{{{")


def _garbage_state_resealed(d):
    _garbage_state(d)
    reseal(d)


def _bad_header_resealed(d):
    path = d / "model.safetensors"
    path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:])
    reseal(d)


def _optimizer_json_resealed(d):
    (d / "optimizer.json").write_text('{"param_groups": 3}')
    reseal(d)


CORRUPTIONS = {
    "truncated-model": (_truncate, r"truncated checkpoint file \S+model\.safetensors: 1000 bytes"),
    "flipped-byte": (_flip, r"corrupt checkpoint file \S+model\.safetensors: sha256 mismatch"),
    "no-COMPLETE": (lambda d: (d / "COMPLETE").unlink(), r"incomplete checkpoint \S+: no COMPLETE marker"),
    "garbage-COMPLETE": (lambda d: (d / "COMPLETE").write_text("{not json"),
                         r"corrupt checkpoint file \S+COMPLETE: invalid JSON"),
    "garbage-state": (_garbage_state, r"\S+state\.json: \d+ bytes, expected"),
    "garbage-state-resealed": (_garbage_state_resealed, r"corrupt checkpoint file \S+state\.json: invalid JSON"),
    "bad-safetensors-header": (_bad_header_resealed,
                               r"corrupt checkpoint file \S+model\.safetensors: not a readable safetensors"),
    "bad-optimizer-json": (_optimizer_json_resealed, r"optimizer\.json: expected param_groups and state"),
    "missing-file": (lambda d: (d / "optimizer.safetensors").unlink(),
                     r"missing checkpoint file \S+optimizer\.safetensors"),
    "garbage-latest": (lambda d: (d.parent / "latest").write_text("../../etc"), r"corrupt \S+latest"),
    "dangling-latest": (lambda d: (d.parent / "latest").write_text("step_00000099\n"),
                        r"latest points to step_00000099, which does not exist"),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corruption_raises_checkpoint_error(saved, corrupt):
    run_dir, step_dir = saved
    damage, pattern = corrupt
    damage(step_dir)
    _, model, opt = make(1)
    before, opt_before = snapshot(model), opt.state_dict()
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_checkpoint(run_dir, model, opt)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)
    assert_same(snapshot(model), before)  # nothing was loaded
    assert opt.state_dict() == opt_before


def test_wrong_model_shape_names_key_and_shapes(saved):
    run_dir, _ = saved
    _, wider, _ = make(1, dim=128)
    with pytest.raises(CheckpointError, match=r"embed\.weight has shape \(256, 64\) in the checkpoint "
                                              r"but \(256, 128\) in the model") as info:
        load_checkpoint(run_dir, wider)
    assert "\n" not in str(info.value)
    _, deeper, _ = make(1, ffn_hidden=256)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ffn\.\S+ has shape \(192, 64\) in the "
                                              r"checkpoint but \(256, 64\) in the model"):
        load_checkpoint(run_dir, deeper)


def test_wrong_model_keys(saved):
    run_dir, _ = saved
    _, plain, _ = make(1, pathway="prenorm", expansion_rate=1)
    before = snapshot(plain)
    with pytest.raises(CheckpointError, match=r"checkpoint key 'blocks\.0\.attn_path\.\S+' is not in the model"):
        load_checkpoint(run_dir, plain)
    assert_same(snapshot(plain), before)
    _, three, _ = make(1, n_layers=3)
    with pytest.raises(CheckpointError, match=r"model key 'blocks\.2\.\S+' is missing from the checkpoint"):
        load_checkpoint(run_dir, three)


def test_optimizer_mismatch_leaves_model_untouched(saved):
    run_dir, _ = saved
    _, model, _ = make(1)
    before = snapshot(model)
    single_group = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(CheckpointError, match="2 param groups saved, 1 in the optimizer"):
        load_checkpoint(run_dir, model, single_group)
    assert_same(snapshot(model), before)


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint path \S+nope does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"no checkpoint found in"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match=r"no checkpoint found in"):
        load_checkpoint(tmp_path)
    assert hyperbit.train.latest_checkpoint(tmp_path) is None


# ------------------------------------------------------------------------------------------------
# kills mid-save
# ------------------------------------------------------------------------------------------------

def _save_with_crash(monkeypatch, run_dir, step, model, opt, cfg, target, attr, cleanup=False):
    """Run save_checkpoint with ``target.attr`` raising, as a kill would interrupt it. Without
    ``cleanup`` the except-handler's cleanup is disabled too, like a SIGKILL."""
    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed")
    with monkeypatch.context() as m:
        m.setattr(target, attr, boom)
        if not cleanup:
            m.setattr(ckpt_mod, "_remove_tree", lambda path: None)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(run_dir, step, model, opt, cfg.to_dict(), {})


@pytest.mark.parametrize("where", ["rename", "write", "write-cleaned-up"])
def test_kill_mid_save_keeps_previous_latest(tmp_path, monkeypatch, where):
    cfg, model, opt = make(0)
    train(model, opt, 1)
    good = save_checkpoint(tmp_path, 1, model, opt, cfg.to_dict(), {})
    good_params = snapshot(model)
    train(model, opt, 1)
    if where == "rename":  # everything written and fsynced, killed at the directory rename
        _save_with_crash(monkeypatch, tmp_path, 2, model, opt, cfg, os, "rename")
    else:  # killed half-way through writing the optimizer file
        real = ckpt_mod.save_file

        def half_then_die(tensors, filename, metadata=None):
            if filename.endswith("optimizer.safetensors"):
                with open(filename, "wb") as f:
                    f.write(b"\x00" * 100)
                raise KeyboardInterrupt("killed")
            return real(tensors, filename, metadata=metadata)
        with monkeypatch.context() as m:
            m.setattr(ckpt_mod, "save_file", half_then_die)
            if where == "write":
                m.setattr(ckpt_mod, "_remove_tree", lambda path: None)
            with pytest.raises(KeyboardInterrupt):
                save_checkpoint(tmp_path, 2, model, opt, cfg.to_dict(), {})

    leftovers = [n for n in step_names(tmp_path) if n.startswith(".tmp-step_00000002")]
    assert len(leftovers) == (0 if where == "write-cleaned-up" else 1)
    assert "step_00000002" not in step_names(tmp_path)
    _, model2, opt2 = make(1)
    assert load_checkpoint(tmp_path, model2, opt2)["path"] == good
    assert_same(snapshot(model2), good_params)
    # Even without `latest`, the temporary dir is never mistaken for a checkpoint.
    (tmp_path / "checkpoints" / "latest").unlink()
    assert load_checkpoint(tmp_path)["path"] == good
    # And the next save of the same step succeeds.
    save_checkpoint(tmp_path, 2, model, opt, cfg.to_dict(), {})
    assert load_checkpoint(tmp_path)["step"] == 2


def test_kill_before_latest_update_then_resave(tmp_path, monkeypatch):
    cfg, model, opt = make(0)
    save_checkpoint(tmp_path, 1, model, opt, cfg.to_dict(), {})
    _save_with_crash(monkeypatch, tmp_path, 2, model, opt, cfg, os, "replace")  # latest's rename
    assert "step_00000002" in step_names(tmp_path)  # complete, but not the latest
    assert not [n for n in step_names(tmp_path) if n.startswith(".tmp-")]
    assert load_checkpoint(tmp_path)["step"] == 1
    # The resumed run reaches step 2 again: the orphan is moved aside, never deleted.
    with pytest.warns(UserWarning, match="not the latest checkpoint"):
        save_checkpoint(tmp_path, 2, model, opt, cfg.to_dict(), {})
    assert "step_00000002.superseded-1" in step_names(tmp_path)
    assert load_checkpoint(tmp_path)["step"] == 2
    # Overwriting the latest checkpoint itself is refused.
    with pytest.raises(CheckpointError, match="already exists and is the latest one"):
        save_checkpoint(tmp_path, 2, model, opt, cfg.to_dict(), {})
    assert load_checkpoint(tmp_path)["step"] == 2


# ------------------------------------------------------------------------------------------------
# keep_last, no pickles
# ------------------------------------------------------------------------------------------------

def test_keep_last(tmp_path):
    cfg, model, opt = make(0)
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, opt, cfg.to_dict(), {}, keep_last=2)
    assert step_names(tmp_path) == ["latest", "step_00000004", "step_00000005"]
    assert load_checkpoint(tmp_path)["step"] == 5


def test_keep_last_never_deletes_latest(tmp_path):
    cfg, model, opt = make(0)
    for step in (10, 20):
        save_checkpoint(tmp_path, step, model, opt, cfg.to_dict(), {})
    # Restarted from an earlier point: step 5 becomes latest though 20 has the highest step.
    save_checkpoint(tmp_path, 5, model, opt, cfg.to_dict(), {}, keep_last=1)
    assert step_names(tmp_path) == ["latest", "step_00000005", "step_00000020"]
    assert load_checkpoint(tmp_path)["step"] == 5


def test_no_pickles(saved, monkeypatch):
    run_dir, step_dir = saved
    for name in sorted(os.listdir(step_dir)):
        data = (step_dir / name).read_bytes()
        assert not data.startswith((b"\x80", b"PK")), name  # pickle protocol 2+ / torch zip
        if name.endswith(".safetensors"):
            with safe_open(str(step_dir / name), framework="pt") as f:
                list(f.keys())
        else:
            json.loads(data)

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling is forbidden")
    for target, attr in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(target, attr, forbidden)
    _, model, opt = make(1)
    ckpt = load_checkpoint(run_dir, model, opt)
    restore_rng_state(ckpt)
