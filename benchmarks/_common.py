"""Shared helpers for the scripts in ``benchmarks/``.

Everything here is deliberately dependency-free beyond torch and the standard library:

* :func:`setup_paths` - make ``hyperbit`` (src layout) and this folder importable.
* :func:`machine_info` - platform, CPU model, torch version, threads, date, load, git commit.
* :func:`median`, :func:`summarize`, :func:`ratio` - small statistics.
* :func:`warmup` and :func:`interleaved_timing` - the round-robin timing loop: every round runs
  each configuration once for a few steps, and the starting configuration rotates from round to
  round, so slow drift of a shared machine hits every configuration alike.
* :func:`make_train_step` - one full training step (forward + backward + optimizer step).
* :func:`saved_activation_bytes` - exact bytes held for backward by one forward.
* :func:`current_rss_bytes`, :func:`peak_rss_bytes` - process memory on Linux.
* :func:`run_json_child` - run a subprocess that reports one JSON object.
* :func:`format_table`, :func:`write_json`, :func:`finish` (warning, verdicts, JSON).
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
CHILD_MARKER = "BENCH_JSON:"  # prefix of the one stdout line a child process reports on


def setup_paths() -> None:
    """Put ``src/`` (if ``hyperbit`` is not installed) and ``benchmarks/`` on ``sys.path``."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    try:
        import hyperbit  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT / "src"))


# --- machine description ----------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    """Read-only git queries (``rev-parse``, ``status --porcelain``); None when unavailable."""
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_digest(package_dir: str | os.PathLike | None = None) -> str:
    """Short sha256 of every ``.py`` file of the package (path + contents): tells whether the code
    measured changed during a run (parent vs child processes, start vs end)."""
    import hashlib

    root = Path(package_dir) if package_dir else REPO_ROOT / "src" / "hyperbit"
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def machine_info(device: str = "cpu") -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": device,
    }
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = list(os.getloadavg())
    if device.startswith("cuda") and torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
        info["cuda_version"] = torch.version.cuda
    commit = _git("rev-parse", "HEAD")
    if commit:
        info["git_commit"] = commit
        status = _git("status", "--porcelain", "--untracked-files=no")
        info["git_dirty"] = bool(status)
    info["source_digest"] = source_digest()
    return info


def allocator_as_train(info: dict[str, Any]) -> None:
    """Set the CPU allocator as ``hyperbit train`` does on the CPU (freed memory kept for the next
    step, ``hyperbit.train.allocator``), so steps timed here fault in what a training run's do;
    ``info["malloc_kept"]`` records whether it applied (``HYPERBIT_MALLOC_TUNING=0``: not)."""
    from hyperbit.train.allocator import keep_freed_memory

    info["malloc_kept"] = keep_freed_memory()


# --- statistics -------------------------------------------------------------------------------

def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else math.nan


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    if not sorted_xs:
        return math.nan
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(xs: Iterable[float]) -> dict[str, float]:
    """median, min, max, mean, p25, p75 and count of a sample."""
    s = sorted(xs)
    if not s:
        return {"n": 0}
    return {"n": len(s), "median": statistics.median(s), "min": s[0], "max": s[-1],
            "mean": statistics.fmean(s), "p25": _quantile(s, 0.25), "p75": _quantile(s, 0.75)}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


# --- timing -----------------------------------------------------------------------------------

def warmup(step_fns: dict[str, Callable[[], Any]], steps: int) -> None:
    for fn in step_fns.values():
        for _ in range(steps):
            fn()


def interleaved_timing(step_fns: dict[str, Callable[[], Any]], rounds: int, steps: int,
                       sync: Callable[[], None] | None = None,
                       after_config: Callable[[str], None] | None = None,
                       progress: Callable[[int, int], None] | None = None) -> dict[str, list[list[float]]]:
    """Time ``step_fns`` round-robin; returns ``{name: [[seconds per step] per round]}``.

    Round ``r`` runs the configurations in their given order rotated by ``r``, each for ``steps``
    consecutive steps, each step timed alone (``sync`` is called before reading the clock, e.g.
    ``torch.cuda.synchronize``). The Python garbage collector is off while a round runs.
    ``after_config(name)`` runs untimed after each configuration's steps (e.g. to free grads).
    """
    names = list(step_fns)
    times: dict[str, list[list[float]]] = {n: [] for n in names}
    sync = sync or (lambda: None)
    for r in range(rounds):
        k = r % len(names) if names else 0
        order = names[k:] + names[:k]
        gc.collect()
        gc.disable()
        try:
            for name in order:
                fn, per_round = step_fns[name], []
                for _ in range(steps):
                    sync()
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    per_round.append(time.perf_counter() - t0)
                times[name].append(per_round)
                if after_config is not None:
                    after_config(name)
        finally:
            gc.enable()
        if progress is not None:
            progress(r + 1, rounds)
    return times


def precision(device: str) -> str:
    """The precision hyperbit's ``train.precision=auto`` picks on ``device``: ``bf16`` where it is
    native (CUDA with bf16, CPUs with avx512_bf16 / amx_bf16), else ``fp32``."""
    from hyperbit.train.precision import resolve_precision

    return resolve_precision("auto", device)


def autocast(device: str, dtype=None):
    """``torch.autocast`` for ``device`` ("cpu" / "cuda[:i]") in ``dtype``; by default the
    precision of :func:`precision` (no autocast where that is fp32), as ``hyperbit train`` does."""
    import torch
    from hyperbit.train.precision import autocast as hb_autocast

    if dtype is not None:
        return torch.autocast(device.split(":")[0], dtype=dtype)
    return hb_autocast(precision(device), device)


def make_train_step(model, optimizer, idx, targets, device: str, dtype=None) -> Callable[[], float]:
    """One training step: zero grads, forward under autocast, backward, optimizer step.

    ``model(idx, targets)`` must return ``(logits, loss)``. The step returns nothing measured
    (no ``.item()``, which would add a sync); call it and time it from outside.
    """
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            _, loss = model(idx, targets)
        loss.backward()
        optimizer.step()

    return step


def saved_activation_bytes(model, forward: Callable[[], Any], exclude: Iterable[Any] = ()) -> dict[str, int]:
    """Bytes of tensors autograd saves for backward during ``forward()``.

    Deduplicated by storage (``untyped_storage().data_ptr()``: views and repeated saves of one
    tensor count once, at the size of the whole storage). Storages of the model's parameters and
    buffers, and of the tensors in ``exclude`` (e.g. the input batch), are skipped. The graph is
    dropped before returning.
    """
    import torch

    skip: set[int] = set()
    for t in [*model.parameters(), *model.buffers(), *exclude]:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            skip.add(t.untyped_storage().data_ptr())
    seen: dict[int, int] = {}
    n_saved = 0

    def pack(t: torch.Tensor):
        nonlocal n_saved
        n_saved += 1
        if t.device.type != "meta":
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in skip and ptr not in seen:
                seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return {"bytes": sum(seen.values()), "storages": len(seen), "saved_tensors": n_saved}


# --- memory -----------------------------------------------------------------------------------

def current_rss_bytes() -> int:
    """Resident set size now (``VmRSS`` from /proc/self/status; falls back to the peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def proc_status_bytes(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in bytes (e.g. ``RssAnon``, ``RssFile``); {} off Linux."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def maxrss_bytes() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in bytes (KiB on Linux, bytes on macOS).

    Beware on Linux: at ``exec`` the kernel folds the *old* address space's high-water mark into
    it, so a child started by ``subprocess`` (vfork/fork + exec) from a large parent reports at
    least the parent's peak RSS. Use :func:`peak_rss_bytes` (VmHWM) for children.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_rss_bytes() -> int:
    """Peak RSS of this process's own address space (``VmHWM``; since the last
    :func:`reset_peak_rss`). Falls back to ``ru_maxrss`` where /proc is missing."""
    return proc_status_bytes("VmHWM").get("VmHWM") or maxrss_bytes()


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0).
    Returns False when not possible; then :func:`peak_rss_bytes` is the lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


MIB = 1024 * 1024


def run_json_child(cmd: list[str], timeout: float = 900, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` and return the JSON object on its last ``CHILD_MARKER`` stdout line."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {cmd} failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(CHILD_MARKER):])


def report_to_parent(obj: dict) -> None:
    """The child side of :func:`run_json_child`."""
    print(CHILD_MARKER + json.dumps(obj), flush=True)


def busy_warning(info: dict[str, Any]) -> str | None:
    """A warning line when the 1-minute load average (start or end of the run) exceeded the
    usable CPUs: other work was competing, so timings are unreliable."""
    cpus = info.get("usable_cpus") or info.get("logical_cpus") or 1
    loads = [info[k][0] for k in ("loadavg_start", "loadavg_end") if k in info]
    if loads and max(loads) > cpus:
        return (f"WARNING: machine busy (1-min load average up to {max(loads):.1f} on {cpus} CPUs): "
                "other processes competed for the CPUs, step times are unreliable")
    return None


# --- output -----------------------------------------------------------------------------------

def fmt(x: Any, spec: str = ".2f", suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:{spec}}{suffix}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (creating parent folders), atomically via a temp file.
    NaN / inf become ``null`` so the file is strict JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(_clean(obj), f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _clean(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, Path):
        return str(o)
    return o


def report_targets(targets: list[dict], quick: bool, source_changed: bool) -> None:
    """Print the source-change warning (if any) and one PASS/FAIL/SKIP line per target."""
    if source_changed:
        print("WARNING: src/hyperbit changed while the benchmark ran (source digests differ); "
              "numbers may mix code versions")
    print("\ntargets" + (" (quick mode: not representative)" if quick else "") + ":")
    for t in targets:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[t["passed"]]
        print(f"  [{verdict}] {t['description']}: {fmt(t['ratio'], '.3f', 'x')}")


def finish(benchmark: str, info: dict[str, Any], targets: list[dict], out_path: str | os.PathLike, *,
           quick: bool, source_changed: bool, **sections: Any) -> Path:
    """The end every benchmark shares: the busy-machine warning (printed, and kept in the JSON),
    one verdict line per target, then ``{"benchmark", "machine", **sections, "targets"}`` written
    to ``out_path``."""
    busy = busy_warning(info)
    if busy:
        print(busy)
        info["busy_warning"] = busy
    report_targets(targets, quick, source_changed)
    path = write_json(out_path, {"benchmark": benchmark, "machine": info, **sections, "targets": targets})
    print(f"\nwrote {path}")
    return path


# --- step-time comparison of whole models (train_throughput --models, gpu_step) -----------------

def build_plain_gpt(vocab_size: int, dim: int, n_layers: int, n_heads: int, ffn_hidden: int,
                    max_seq_len: int):
    """The strong baseline: a plain PyTorch GPT of the same shape as hyperbit's Pre-Norm model
    (``nn.RMSNorm``, one fused q/k/v ``nn.Linear``, RoPE, SDPA, SwiGLU with one fused gate/up
    ``nn.Linear``, an untied head), written here with nothing from hyperbit."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    head_dim = dim // n_heads
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)  # (T, head_dim / 2)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm, self.ffn_norm = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.out = nn.Linear(dim, dim, bias=False)
            self.gate_up = nn.Linear(dim, 2 * ffn_hidden, bias=False)
            self.down = nn.Linear(ffn_hidden, dim, bias=False)

        def forward(self, x, cos, sin):
            B, T, _ = x.shape
            q, k, v = self.qkv(self.attn_norm(x)).view(B, T, 3, n_heads, head_dim).transpose(1, 3).unbind(2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)  # (B, H, T, hd)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.out(a.transpose(1, 2).reshape(B, T, dim))
            gate, up = self.gate_up(self.ffn_norm(x)).chunk(2, dim=-1)
            return x + self.down(F.silu(gate) * up)

    def rope(x, cos, sin):  # rotate-half RoPE, x: (B, H, T, hd)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    class PlainGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab_size, dim)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layers))
            self.norm = nn.RMSNorm(dim, eps=1e-6)
            self.head = nn.Linear(dim, vocab_size, bias=False)
            self.register_buffer("cos", angles.cos(), persistent=False)
            self.register_buffer("sin", angles.sin(), persistent=False)
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layers) if name.endswith(("out.weight", "down.weight")) else 0.02)

        def forward(self, idx, targets=None):
            T = idx.shape[1]
            cos, sin = self.cos[:T], self.sin[:T]
            h = self.embed(idx)
            for block in self.blocks:
                h = block(h, cos, sin)
            logits = self.head(self.norm(h))
            loss = None if targets is None else F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            return logits, loss

    return PlainGPT()


# name -> (label, ModelConfig overrides); "plain" is build_plain_gpt
STEP_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("plain GPT", {}),
    "prenorm": ("Pre-Norm", {}),
    "shc4": ("SHC x4", dict(pathway="hc", expansion_rate=4, hc_dynamic=False)),
    "dhc4": ("DHC x4", dict(pathway="hc", expansion_rate=4)),
    "prenorm_bit": ("Pre-Norm + BitLinear", dict(linear="bitnet")),
    "mhc4": ("mHC x4", dict(pathway="mhc", expansion_rate=4)),
    "frac2": ("frac x2", dict(pathway="frac", frac_rate=2)),
    "frac4": ("frac x4", dict(pathway="frac", frac_rate=4)),
}


def build_step_model(name: str, shape: dict[str, int], device: str, compiled: bool, fused_hc: bool = False,
                     compile_kwargs: dict[str, Any] | None = None):
    """One model of :data:`STEP_MODELS` on ``device``; ``compiled``: regional compile of its blocks
    (``hyperbit.models.compile_blocks``; the plain GPT's blocks compiled the same way)."""
    import torch
    from hyperbit import ModelConfig
    from hyperbit.models import build_model, compile_blocks

    torch.manual_seed(0)
    if name == "plain":
        from hyperbit.config import ModelConfig as _MC

        hidden = _MC(dim=shape["dim"]).resolved().ffn_hidden  # the same FFN width as hyperbit's
        model = build_plain_gpt(shape["vocab_size"], shape["dim"], shape["n_layers"], shape["n_heads"],
                                hidden, shape["seq_len"]).to(device)
        if compiled:
            for block in model.blocks:
                block.compile(**(compile_kwargs or {}))
        return model
    cfg = ModelConfig(vocab_size=shape["vocab_size"], dim=shape["dim"], n_layers=shape["n_layers"],
                      n_heads=shape["n_heads"], max_seq_len=shape["seq_len"], **STEP_MODELS[name][1])
    model = build_model(cfg).to(device)
    if compiled:
        compile_blocks(model, fused_hc=fused_hc, **(compile_kwargs or {}))
    return model


def step_configs(models: Sequence[str], modes: Sequence[str]) -> list[tuple[str, str, bool, str]]:
    """``(key, model name, compiled, hc path)`` for every model x mode; mode ``compiled`` is
    ``compile_blocks``' default (hyper-connections keep their custom autograd nodes), mode
    ``compiled-plain`` the compiled DHC x4 with plain-autograd hyper-connections instead."""
    out = []
    for mode in modes:
        for m in models:
            if mode == "compiled-plain" and m != "dhc4":
                continue
            if mode == "eager-pytorch" and m not in NATIVE_MODELS:
                continue
            hc = {"compiled-plain": "plain", "eager-pytorch": "pytorch"}.get(mode, "fused")
            out.append((f"{m}/{mode}", m, mode.startswith("compiled"), hc))
    return out


#: models whose connections run C kernels on CPU (``hyperbit/nn/native.c``); mode ``eager-pytorch``
#: runs them with ``HYPERBIT_NATIVE=0``, the PyTorch implementation of the same fused nodes
NATIVE_MODELS = ("shc4", "dhc4", "mhc4")


def without_native(step: Callable[[], Any]) -> Callable[[], Any]:
    """``step`` with the C kernels off (``HYPERBIT_NATIVE=0`` while it runs)."""
    def run() -> Any:
        old = os.environ.get("HYPERBIT_NATIVE")
        os.environ["HYPERBIT_NATIVE"] = "0"
        try:
            return step()
        finally:
            if old is None:
                del os.environ["HYPERBIT_NATIVE"]
            else:
                os.environ["HYPERBIT_NATIVE"] = old

    return run


def measure_steps(models: Sequence[str], modes: Sequence[str], shape: dict[str, int], device: str,
                  dtype, rounds: int, steps: int, warmup_steps: int, log=print,
                  compile_kwargs: dict[str, Any] | None = None) -> dict[str, dict]:
    """Build every (model, mode), warm it up (compiling), then time training steps round-robin.

    Per configuration: step seconds (median over rounds of per-round medians), compile / first-step
    seconds, and memory: on CUDA the peak allocated by one step (gradients included) above what was
    allocated before it, plus the model's parameters and AdamW state (so models held side by side do not
    count each other); on CPU the bytes autograd saves in one forward (:func:`saved_activation_bytes`).
    """
    import torch
    import torch._dynamo

    # Every model's blocks share one code object (Block.forward): each model of another shape is a
    # recompile of it, and past dynamo's recompile limit (8) the rest would silently run eager.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
            break
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else None
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq_len"]), generator=g).to(device)
    targets = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq_len"]), generator=g).to(device)
    fns, results = {}, {}
    for key, name, compiled, hc in step_configs(models, modes):
        model = build_step_model(name, shape, device, compiled, fused_hc=hc == "fused", compile_kwargs=compile_kwargs)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if cuda else None)
        step = make_train_step(model, opt, idx, targets, device, dtype)
        if hc == "pytorch":
            step = without_native(step)
        t0 = time.perf_counter()
        step()
        if sync:
            sync()
        first = time.perf_counter() - t0
        warmup({key: step}, warmup_steps)
        mem: dict[str, Any] = {}
        if cuda:
            sync()
            static = sum(t.numel() * t.element_size() for p in model.parameters()
                         for t in (p, *opt.state[p].values()) if torch.is_tensor(t))
            opt.zero_grad(set_to_none=True)  # the step's gradients count in its peak, not here
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            sync()
            mem = {"peak_bytes": torch.cuda.max_memory_allocated() - before + static, "static_bytes": static}
        else:
            forward = lambda: model(idx, targets)[1]  # noqa: E731
            with autocast(device, dtype), torch.enable_grad():
                mem = saved_activation_bytes(model, without_native(forward) if hc == "pytorch" else forward,
                                             exclude=[idx, targets])
            mem = {"saved_bytes": mem["bytes"]}
        opt.zero_grad(set_to_none=True)
        fns[key] = step
        results[key] = {"model": name, "label": STEP_MODELS[name][0], "compiled": compiled, "hc_path": hc,
                        "first_step_s": first, "params": sum(p.numel() for p in model.parameters()), **mem}
        log(f"  {key}: built, first step {first:.1f}s")
    times = interleaved_timing(fns, rounds, steps, sync=sync,
                               progress=lambda r, n: log(f"  round {r}/{n}"))
    for key, per_round in times.items():
        results[key]["step_s_per_round"] = [median(r) for r in per_round]
        results[key]["step_s"] = median(results[key]["step_s_per_round"])
    return results


def step_table(results: dict[str, dict], memory_key: str) -> tuple[list[str], list[list[str]]]:
    """Rows: model, mode, step ms, x plain GPT, x Pre-Norm (same mode), memory MiB, x Pre-Norm."""
    rows = []
    for key, r in results.items():
        mode = key.split("/", 1)[1]
        base_mode = {"compiled-plain": "compiled", "eager-pytorch": "eager"}.get(mode, mode)
        plain, pre = results.get(f"plain/{base_mode}"), results.get(f"prenorm/{base_mode}")
        mem = r.get(memory_key)
        rows.append([r["label"], mode, fmt(r["step_s"] * 1e3), fmt(ratio(r["step_s"], plain and plain["step_s"]), ".3f"),
                     fmt(ratio(r["step_s"], pre and pre["step_s"]), ".3f"), fmt(r["first_step_s"], ".1f"),
                     fmt(mem / MIB if mem is not None else None, ".1f"),
                     fmt(ratio(mem, pre and pre.get(memory_key)), ".3f")])
    headers = ["model", "mode", "step ms", "x plain", "x Pre-Norm", "first step s", f"{memory_key} MiB", "x Pre-Norm"]
    return headers, rows


def at_most(name: str, description: str, value: float | None, threshold: float) -> dict:
    """A target met when ``value <= threshold`` (``passed`` None when there is no value)."""
    return {"name": name, "description": description, "ratio": value, "threshold": threshold,
            "passed": None if value is None else bool(value <= threshold)}


def step_target(results: dict, model: str, mode: str, threshold: float, what: str = "step_s",
                base: str = "prenorm") -> dict:
    a, b = results.get(f"{model}/{mode}"), results.get(f"{base}/{mode}")
    value = ratio(a and a.get(what), b and b.get(what))
    label = STEP_MODELS[model][0]
    return at_most(f"{model}_{mode}_{what}", f"{label} {mode} {what} <= {threshold}x {STEP_MODELS[base][0]} {mode}",
                   value, threshold)
