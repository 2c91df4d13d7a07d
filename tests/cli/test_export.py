"""``hyperbit export --format packed`` and packed directories in ``hyperbit eval`` / ``generate``:
the same numbers as the checkpoint, and bad input as one line, exit code 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hyperbit.runs
from hyperbit._io import sha256_file
from hyperbit.cli import main
from hyperbit.interop.packed import PACKED_FILE, WEIGHTS_FILE
from hyperbit.models import build_model
from hyperbit.train.checkpoint import save_checkpoint
from hyperbit.train.errors import CheckpointError
from hyperbit.train.config import RunConfig



def make_run(root: Path, linear: str = "bitnet") -> Path:
    """A run directory with one checkpoint of a randomly initialised tiny model (no training)."""
    cfg = RunConfig.from_dict({"model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                         "max_seq_len": 64, "linear": linear},
                               "train": {"seq_len": 32, "device": "cpu"}})
    torch.manual_seed(0)
    net = build_model(cfg.model)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(root / "run", 7, net, None, cfg.to_dict())
    return root / "run"

TEXT = "def add(a, b):\n    return a + b\n\n" * 40


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    run = make_run(root / "bit")
    assert main(["export", str(run), str(root / "packed"), "--format", "packed"]) == 0
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    return {"run": run, "packed": root / "packed", "fp": make_run(root / "fp", linear="fp"), "corpus": corpus}


def _fails(capsys, argv: list[str], needle: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hyperbit: error:") and "\n" not in err and "Traceback" not in err
    assert needle in err, err
    return err


def _eval(capsys, path: Path, corpus: Path) -> dict:
    capsys.readouterr()
    assert main(["eval", str(path), "--data", str(corpus), "--json", "--batches", "2", "--seq", "32",
                 "--precision", "fp32"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_of_the_packed_dir_matches_the_checkpoint(runs, capsys):
    a, b = _eval(capsys, runs["run"], runs["corpus"]), _eval(capsys, runs["packed"], runs["corpus"])
    assert a["tokens"] == b["tokens"] > 0 and b["step"] == 7
    assert abs(a["val_loss"] - b["val_loss"]) < 1e-3 * a["val_loss"]  # see ATOL notes in tests/interop


def test_generate_from_the_packed_dir_matches_the_checkpoint(runs, capsys):
    outs = []
    for path in (runs["run"], runs["packed"]):
        capsys.readouterr()
        assert main(["generate", str(path), "--prompt", "def ", "--max-tokens", "12", "--temperature", "0",
                     "--precision", "fp32"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("def ")


def test_packed_dir_is_self_contained(runs, tmp_path, capsys):
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in runs["packed"].iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    listing = sorted(p.name for p in moved.iterdir())
    assert listing == [WEIGHTS_FILE, PACKED_FILE, "tokenizer.json"]
    assert main(["generate", str(moved), "--prompt", "x", "--max-tokens", "3", "--temperature", "0"]) == 0


def test_non_bitnet_checkpoint_is_refused_and_nothing_written(runs, tmp_path, capsys):
    out = tmp_path / "out"
    _fails(capsys, ["export", str(runs["fp"]), str(out), "--format", "packed"], "model.linear='fp'")
    assert list(tmp_path.iterdir()) == []  # no OUT, no temporary directory left behind


def test_existing_output_is_refused_and_untouched(runs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(capsys, ["export", str(runs["run"]), str(out), "--format", "packed"], "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_missing_checkpoint_and_unknown_format(runs, tmp_path, capsys):
    _fails(capsys, ["export", str(tmp_path / "nope"), str(tmp_path / "out"), "--format", "packed"], "does not exist")
    with pytest.raises(SystemExit) as e:
        main(["export", str(runs["run"]), str(tmp_path / "out"), "--format", "gguf"])
    assert e.value.code == 2
    assert list(tmp_path.iterdir()) == []


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _rehash(d: Path) -> None:
    """Make packed.json's file table agree with a tampered payload (so the shape check is reached)."""
    header = json.loads((d / PACKED_FILE).read_text())
    for name in header["files"]:
        header["files"][name] = {"size": (d / name).stat().st_size, "sha256": sha256_file(d / name)}
    (d / PACKED_FILE).write_text(json.dumps(header))


def _damaged(kind: str, src: Path, tmp_path: Path) -> Path:
    d = _copy(src, tmp_path / kind)
    if kind == "wrong_shape":
        tensors = load_file(str(d / WEIGHTS_FILE))
        key = next(k for k in tensors if k.endswith("q_proj.packed"))
        tensors[key] = torch.zeros(tensors[key].shape[0] // 2, tensors[key].shape[1], dtype=torch.uint8)
        save_file(tensors, str(d / WEIGHTS_FILE))
        _rehash(d)
    elif kind == "wrong_dtype":
        tensors = load_file(str(d / WEIGHTS_FILE))
        key = next(k for k in tensors if k.endswith("weight_scale"))
        tensors[key] = tensors[key].double()
        save_file(tensors, str(d / WEIGHTS_FILE))
        _rehash(d)
    elif kind == "truncated":
        data = (d / WEIGHTS_FILE).read_bytes()
        (d / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    elif kind == "truncated_rehashed":  # the table agrees, the safetensors payload itself is cut
        data = (d / WEIGHTS_FILE).read_bytes()
        (d / WEIGHTS_FILE).write_bytes(data[: len(data) - 100])
        _rehash(d)
    elif kind == "missing_key":
        header = json.loads((d / PACKED_FILE).read_text())
        del header["config"]
        (d / PACKED_FILE).write_text(json.dumps(header))
    elif kind == "bad_config":
        header = json.loads((d / PACKED_FILE).read_text())
        header["config"]["model"]["dim"] = 96
        (d / PACKED_FILE).write_text(json.dumps(header))
    return d


@pytest.mark.parametrize("kind,needle", [
    ("wrong_shape", "q_proj.packed is torch.uint8"), ("wrong_dtype", "torch.float64"),
    ("truncated", "truncated"), ("truncated_rehashed", "not a readable safetensors file"),
    ("missing_key", "lacks the key(s) ['config']"), ("bad_config", "the config needs"),
])
@pytest.mark.parametrize("command", ["eval", "generate"])
def test_damaged_packed_dir_is_one_line_exit_2(runs, tmp_path, capsys, kind, needle, command):
    d = _damaged(kind, runs["packed"], tmp_path)
    before = sorted((p.name, p.stat().st_size) for p in d.iterdir())
    args = ["--data", str(runs["corpus"])] if command == "eval" else ["--prompt", "x"]
    _fails(capsys, [command, str(d), *args], needle)
    assert sorted((p.name, p.stat().st_size) for p in d.iterdir()) == before


def test_export_from_a_packed_dir_is_refused(runs, tmp_path, capsys):
    _fails(capsys, ["export", str(runs["packed"]), str(tmp_path / "again"), "--format", "packed"],
           "already a packed directory")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [CheckpointError("the writer failed half-way"), OSError(28, "No space left on device")])
def test_a_writer_failing_half_way_leaves_nothing_behind(runs, tmp_path, capsys, monkeypatch, error):
    def half_writer(model, run_config, tokenizer, info, out_dir):
        (out_dir / "part.safetensors").write_bytes(b"partial")
        raise error

    monkeypatch.setitem(hyperbit.runs.EXPORT_FORMATS, "packed", half_writer)
    needle = "half-way" if isinstance(error, CheckpointError) else "No space left"
    _fails(capsys, ["export", str(runs["run"]), str(tmp_path / "out"), "--format", "packed"], needle)
    assert list(tmp_path.iterdir()) == []
