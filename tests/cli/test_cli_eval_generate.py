"""`hyperbit eval`, `hyperbit generate` and `hyperbit prepare` on real (tiny) trained runs: eval
reproduces the validation numbers training logged, generation is deterministic and cache-exact,
and bad input ends in one line on stderr with exit code 2."""

from __future__ import annotations

import json
import math
import random
import shutil
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from hyperbit.cli import main
from hyperbit.data import ByteTokenizer, TokenShards
from hyperbit.models import generate
from hyperbit.models import VocabMask
from hyperbit.runs import generate_text, load_trained
from hyperbit.train import evaluate

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "every jovial packet of bytes in streams and hyper connections").split()


def _last_eval(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "val_loss" in r][-1]


def _json_eval(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _generate(capsys, run: Path, *args: str) -> str:
    capsys.readouterr()
    assert main(["generate", str(run), *args]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]


def _write_corpus(directory: Path, files: int, seed: int) -> Path:
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    for i in range(files):
        paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(4)]
        (directory / f"doc_{i:03d}.txt").write_text("\n\n".join(paragraphs) + "\n")
    return directory


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny byte-level run on pystdlib, trained once for the module."""
    out = tmp_path_factory.mktemp("byte") / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), "train.steps=30", "train.log_every=5"]) == 0
    return out


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> dict:
    """`hyperbit prepare` of a small text directory with a BPE tokenizer, and a run trained on it."""
    base = tmp_path_factory.mktemp("bpe")
    corpus = _write_corpus(base / "corpus", files=40, seed=1)
    prepared = base / "prepared"
    assert main(["prepare", str(corpus), str(prepared), "--tokenizer", "bpe", "--vocab-size", "300",
                 "--val-fraction", "0.2"]) == 0
    vocab = json.loads((prepared / "meta.json").read_text())["vocab_size"]
    out = base / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), f"data.path={prepared}",
                 f"model.vocab_size={vocab}", "train.steps=6", "train.eval_every=0",
                 "train.save_every=0"]) == 0
    return {"prepared": prepared, "vocab": vocab, "run": out, "base": base}


# --- eval ---------------------------------------------------------------------------------------


def test_eval_reproduces_the_validation_numbers_training_logged(run, capsys):
    logged = _last_eval(run)
    assert logged["step"] == 30
    report = _json_eval(capsys, str(run))
    assert report["step"] == 30 and report["split"] == "val"
    assert (report["batches"], report["batch_size"], report["seq_len"]) == (2, 4, 32)  # tiny's eval setup
    assert report["val_loss"] == pytest.approx(logged["val_loss"], abs=1e-6)
    assert report["val_bpb"] == pytest.approx(logged["val_bpb"], abs=1e-6)
    # The checkpoints dir and the step dir name the same checkpoint.
    for path in (run / "checkpoints", run / "checkpoints" / "step_00000030"):
        again = _json_eval(capsys, str(path))
        assert again["val_loss"] == report["val_loss"] and again["val_bpb"] == report["val_bpb"]
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and f"val loss {logged['val_loss']:.4f}" in line
    assert f"{logged['val_bpb']:.4f} bits/byte" in line


def test_eval_matches_evaluate_called_directly(run, capsys):
    report = _json_eval(capsys, str(run), "--batches", "3", "--seq", "16", "--batch-size", "2",
                        "--precision", "fp32")
    model, cfg, tok, info = load_trained(run, device="cpu")
    assert isinstance(tok, ByteTokenizer) and info["step"] == 30 and not model.training
    assert info["data_dir"].resolve() == (run / "data").resolve()
    direct = evaluate(model, TokenShards(run / "data", "val"), 16, 2, 3, torch.device("cpu"), nullcontext())
    assert report["tokens"] == 3 * 2 * 16
    assert report["val_loss"] == pytest.approx(direct["val_loss"], abs=1e-6)
    assert report["val_bpb"] == pytest.approx(direct["val_bpb"], abs=1e-6)


def test_eval_on_a_raw_text_file(run, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    rng = random.Random(0)
    text.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(30)))
    whole = _json_eval(capsys, str(run), "--data", str(text), "--batches", "0")
    assert whole["split"] == "train" and whole["data"] == str(text)  # the whole corpus
    assert whole["tokens"] > 1000 and math.isfinite(whole["val_loss"])
    # ASCII text with the byte tokenizer: one byte per token, so bits/byte = loss / ln 2.
    assert whole["val_bpb"] == pytest.approx(whole["val_loss"] / math.log(2), rel=1e-9)
    held_out = _json_eval(capsys, str(run), "--data", str(text), "--val-fraction", "0.3")
    assert held_out["split"] == "val" and math.isfinite(held_out["val_bpb"])
    assert not list(tmp_path.glob("*.bin"))  # nothing was written beside the corpus


def test_prepare_bpe_then_train_then_eval_and_generate(bpe, capsys):
    meta = json.loads((bpe["prepared"] / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "bpe" and 257 <= bpe["vocab"] <= 300
    assert meta["tokens"]["train"] > 0 and meta["tokens"]["val"] > 0
    report = _json_eval(capsys, str(bpe["run"]))
    logged = _last_eval(bpe["run"])
    assert report["val_loss"] == pytest.approx(logged["val_loss"], abs=1e-6)
    assert report["val_bpb"] == pytest.approx(logged["val_bpb"], abs=1e-6)
    same = _json_eval(capsys, str(bpe["run"]), "--data", str(bpe["prepared"]))
    assert same["val_loss"] == report["val_loss"]
    # A raw corpus is tokenised with the run's BPE tokenizer.
    fresh = _write_corpus(bpe["base"] / "fresh", files=5, seed=2)
    raw = _json_eval(capsys, str(bpe["run"]), "--data", str(fresh), "--batches", "0")
    assert raw["split"] == "train" and raw["tokens"] > 0 and math.isfinite(raw["val_bpb"])
    text = _generate(capsys, bpe["run"], "--prompt", "the quick brown", "--max-tokens", "10")
    assert text.startswith("the quick brown")


def test_prepare_prints_a_summary(tmp_path, capsys):
    corpus = _write_corpus(tmp_path / "c", files=20, seed=3)
    capsys.readouterr()
    assert main(["prepare", str(corpus), str(tmp_path / "p"), "--val-fraction", "0.25"]) == 0
    out = capsys.readouterr().out
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert f"train {meta['tokens']['train']:,} tokens" in out and f"val {meta['tokens']['val']:,} tokens" in out
    assert "byte tokenizer, vocab 256, uint16 shards" in out and "model.vocab_size=256" in out
    assert main(["prepare", str(corpus), str(tmp_path / "p")]) == 2  # exists: needs --overwrite
    err = capsys.readouterr().err
    assert "--overwrite" in err and err.count("\n") == 1
    assert main(["prepare", str(corpus), str(tmp_path / "p"), "--overwrite", "--max-bytes", "2000",
                 "--val-fraction", "0.3"]) == 0


# --- generate -----------------------------------------------------------------------------------


def test_generate_starts_with_the_prompt_and_is_deterministic(run, capsys):
    args = ("--prompt", "def main(", "--max-tokens", "24", "--seed", "7")
    first = _generate(capsys, run, *args)
    assert first.startswith("def main(") and len(first) > len("def main(")
    assert _generate(capsys, run, *args) == first
    assert _generate(capsys, run, "--prompt", "def main(", "--max-tokens", "24", "--seed", "8") != first


def test_generate_greedy_without_cache_matches_the_cache(run, capsys):
    # fp32: both ways compute the same numbers (bf16 autocast rounds incremental and whole-window
    # products differently, which can flip a near-tie in the argmax)
    args = ("--prompt", "import os\n", "--max-tokens", "30", "--temperature", "0", "--precision", "fp32")
    cached = _generate(capsys, run, *args)
    assert cached.startswith("import os\n")
    assert _generate(capsys, run, *args, "--no-cache") == cached


def test_generate_gives_max_tokens_past_the_context(run, capsys):
    """The model's context is 64 tokens: 60 + 200 runs through a sliding window, no note."""
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "x" * 60, "--max-tokens", "200"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("x" * 60)
    model, cfg, tok, info = load_trained(run, device="cpu")
    assert model.cfg.max_seq_len == 64 and tok.eot_id is None  # nothing can stop it early
    text, new, prompt_tokens = generate_text(model, tok, "x" * 60, 200)  # the command's defaults
    assert (new, prompt_tokens) == (200, 60)
    assert captured.out == text + "\n"


def test_generate_greedy_past_the_context_without_cache_matches_the_cache(run, capsys):
    args = ("--prompt", "import os\n", "--max-tokens", "150", "--temperature", "0", "--precision", "fp32")
    cached = _generate(capsys, run, *args)
    assert cached.startswith("import os\n") and len(cached.encode()) > 64
    assert _generate(capsys, run, *args, "--no-cache") == cached


def test_vocab_mask_keeps_generation_inside_the_tokenizer(run):
    model, cfg, tok, info = load_trained(run, device="cpu")
    masked = VocabMask(model, 100)
    out = generate(masked, torch.tensor([[120, 121, 122]]), 20, temperature=1.5,
                   generator=torch.Generator().manual_seed(0))
    assert int(out[0, 3:].max()) < 100


# --- bad input ----------------------------------------------------------------------------------


def _fails_with_one_line(capsys, argv: list[str], needle: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_checkpoint_is_exit_2(tmp_path, capsys):
    for command in (["eval"], ["generate", "--prompt", "hi"]):
        _fails_with_one_line(capsys, [command[0], str(tmp_path / "nope"), *command[1:]], "does not exist")
    (tmp_path / "empty").mkdir()
    _fails_with_one_line(capsys, ["eval", str(tmp_path / "empty")], "no checkpoint found")


def test_truncated_weights_are_exit_2(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = copy / "checkpoints" / "step_00000030" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _fails_with_one_line(capsys, ["eval", str(copy)], "truncated checkpoint file")
    _fails_with_one_line(capsys, ["generate", str(copy), "--prompt", "hi"], "truncated checkpoint file")


def test_prompt_longer_than_the_context_is_read_from_its_last_tokens_with_a_note(run, capsys):
    prompt = "".join(WORDS)[:100]  # 100 bytes: longer than the context of 64
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", prompt, "--max-tokens", "20", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ("hyperbit: note: the prompt is 100 tokens and the model's max_seq_len is 64: "
                            "it reads only the prompt's last 64 tokens\n")
    assert captured.out.startswith(prompt) and len(captured.out) > len(prompt) + 1
    # what follows is what the last 64 tokens alone are continued by
    model, cfg, tok, info = load_trained(run, device="cpu")
    tail = generate_text(model, tok, prompt[-64:], 20, temperature=0)[0]
    assert captured.out == prompt + tail[64:] + "\n"


def test_bad_generate_options_are_exit_2(run, capsys):
    _fails_with_one_line(capsys, ["generate", str(run), "--prompt", "hi", "--temperature", "-1"],
                         "temperature must be >= 0")
    _fails_with_one_line(capsys, ["generate", str(run), "--prompt", "hi", "--max-tokens", "-1"],
                         "--max-tokens must be >= 0")


def test_eval_on_data_of_another_tokenizer_is_exit_2(run, bpe, capsys):
    # BPE shards (vocab ~300) against the byte model (vocab 256), and byte shards against the BPE model.
    _fails_with_one_line(capsys, ["eval", str(run), "--data", str(bpe["prepared"])], "different tokenizer")
    _fails_with_one_line(capsys, ["eval", str(bpe["run"]), "--data", str(run / "data")], "different tokenizer")


def test_eval_bad_options_are_exit_2(run, tmp_path, capsys):
    _fails_with_one_line(capsys, ["eval", str(run), "--data", str(tmp_path / "missing.txt")],
                         "no such file or directory")
    _fails_with_one_line(capsys, ["eval", str(run), "--seq", "65"], "max_seq_len")
    _fails_with_one_line(capsys, ["eval", str(run), "--seq", "100000", "--batches", "1"], "max_seq_len")


def test_generate_follows_the_precision_rule(run, capsys, monkeypatch):
    """``auto`` autocasts to bf16 only where the device computes it natively."""
    from hyperbit.train import precision

    model, cfg, tok, info = load_trained(run, device="cpu")
    seen = []
    real = precision.autocast

    def spy(p, device):
        seen.append(p)
        return real(p, device)

    import hyperbit.runs as runs_module
    monkeypatch.setattr(runs_module, "precision_autocast", spy)
    for native, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(precision, "native_bf16", lambda device, native=native: native)
        generate_text(model, tok, "def ", 3, temperature=0)
        assert seen[-1] == expected
    generate_text(model, tok, "def ", 3, temperature=0, precision="fp32")
    assert seen[-1] == "fp32"
