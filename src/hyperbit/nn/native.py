"""hyperbit's CPU kernels (``native.c``, which includes ``native_mhc.c``): built on first use with
the system C compiler, loaded with ``ctypes``, and optional.

Each kernel fuses a chain of small tensor ops that PyTorch would run one op at a time (each a pass
over memory and a dispatch). The PyTorch implementation in the calling module stays the reference
and the fallback: it runs when no compiler is found, the build fails, the tensors are not on the
CPU, or with ``HYPERBIT_NATIVE=0``; the tests compare both, forward and backward. Inside
``torch.compile`` the kernels run as ``torch.library`` operators (the Sinkhorn's in
``pathways/sinkhorn.py``, the hyper-connections' in ``native_ops.py``): a ``ctypes`` call cannot be
traced. mHC's own kernels (eager) are called from ``native_mhc.py``.

The library is cached under ``$HYPERBIT_CACHE`` (default ``~/.cache/hyperbit``), named by a hash
of the sources, the compiler command and this CPU's flags (one library per kind of CPU in a shared
home directory), written to a temporary name and renamed, so concurrent processes (DDP ranks, test
workers) never load a partial file. The build takes about ten seconds, once per CPU and version.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from .native_args import _Depth, _Norm, _Streams, _depth, _norm_backward, _norm_forward, _ptr, _streams

SOURCE = Path(__file__).with_name("native.c")
# -fopenmp: torch's OpenMP runtime (same soname, one pool); -fno-unswitch-loops: half the build time,
# no measured cost; -ffp-contract=fast: fused multiply-adds (-std=c11 turns them off; 8% less kernel
# time in DHC x4 steps); kernels that must agree bit for bit share their code.
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fno-unswitch-loops", "-fopenmp", "-shared", "-fPIC",
         "-std=c11"]
_state: dict[str, object] = {}


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get("HYPERBIT_CACHE") or Path.home() / ".cache" / "hyperbit")


#: every entry point's arguments (ctypes would pass undeclared ones as C ints): p pointer, i int, l
#: int64, f float or double, nm / st / dp hb_norm / hb_streams / hb_depth pointers; all return int.
_SIGNATURES = {
    "hb_sinkhorn": "p p l i i f f i",
    "hb_sinkhorn_backward": "p p p l i i f f i",
    "hb_hc_forward": "p l i l p i p p p nm i",
    "hb_hc_streams": "st l i l p i p p i",
    "hb_hc_backward": "st l i l p i p p p p p p p f f i p p p nm dp i",
    "hb_hc_forward_dynamic": "p l i l p p p f f f i p p p p p p p p nm i",
    "hb_depth_forward": "p p i p i l i l p i",
    "hb_depth_backward": "p p i p i l i l p p i",
    "hb_mhc_project": "p l l p i f p p i",
    "hb_mhc_forward": "p l i l p i f p p i f f p p p p p p p p nm i",
    "hb_mhc_backward": "st l i l p p p p p p i p p dp i",
    "hb_mhc_backward_fused": "st l i l p p nm p p p p p p i f f p i p p p dp i",
}


def source_files() -> list[Path]:
    """:data:`SOURCE` and the files it includes (``#include "name"``: next to it, else this
    package's, as the build's ``-I``): every byte the build reads, for the cache key."""
    names = [line.split('"')[1] for line in SOURCE.read_text().splitlines() if line.startswith('#include "')]
    return [SOURCE, *(SOURCE.parent / n if (SOURCE.parent / n).exists() else Path(__file__).parent / n for n in names)]


def _build() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None or not SOURCE.exists():
        return None
    sources = [path.read_bytes() for path in source_files()]
    key = hashlib.sha256(b"\0".join([*sources, " ".join([compiler, *FLAGS]).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"hyperbit_native_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, f"-I{Path(__file__).parent}", "-o", tmp, str(SOURCE), "-lm"],
                           check=True, capture_output=True, timeout=120)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    structs = {"nm": ctypes.POINTER(_Norm), "st": ctypes.POINTER(_Streams), "dp": ctypes.POINTER(_Depth)}
    for suffix, ctype in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        types = {"p": ctypes.c_void_p, "i": ctypes.c_int, "l": ctypes.c_int64, "f": ctype, **structs}
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = [types[a] for a in args.split()]
            fn.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be used (see the module docstring). A failed
    build is tried once per process, and reported once as a warning."""
    if os.environ.get("HYPERBIT_NATIVE", "1") == "0":
        return None
    if "lib" not in _state:
        try:
            _state["lib"] = _build()
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
            import warnings

            detail = getattr(e, "stderr", b"") or b""
            warnings.warn(f"hyperbit: CPU kernels unavailable, using the PyTorch path "
                          f"({type(e).__name__}: {detail.decode(errors='replace')[:200] or e})", stacklevel=2)
            _state["lib"] = None
    return _state["lib"]  # type: ignore[return-value]


#: the largest n of the n x n Sinkhorn kernel (MAXN in native.c)
SINKHORN_MAX_N = 8


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the kernels are built and on (a constant to ``torch.compile``: ops that call them
    through :mod:`torch.library` can sit inside compiled graphs)."""
    return library() is not None


def takes(*tensors: Tensor) -> bool:
    """Whether the kernels can take these tensors: CPU, fp32 or fp64, and the library built (also
    true inside ``torch.compile``, for kernels wrapped as :mod:`torch.library` ops)."""
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
               for t in tensors) and available()


def _threads() -> int:
    """Threads for the kernels' OpenMP regions: torch's intra-op thread count."""
    return torch.get_num_threads()


def _fn(name: str, dtype: torch.dtype):
    return getattr(library(), f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")


def _check(code: int, name: str) -> None:
    if code != 0:
        raise RuntimeError(f"hyperbit native kernel {name} failed with code {code}")


def sinkhorn(z: Tensor, iters: int, logit_range: float, deficit_floor: float) -> Tensor:
    """:func:`hyperbit.pathways.sinkhorn._sinkhorn_reference` for logits ``z`` ``(N, n, n)``
    (fp32 or fp64, ``n <= SINKHORN_MAX_N``): the Sinkhorn rounds and the rounding step."""
    N, n = z.shape[0], z.shape[-1]
    z = z.contiguous()
    out = torch.empty_like(z)
    _check(_fn("hb_sinkhorn", z.dtype)(z.data_ptr(), out.data_ptr(), N, n, iters, logit_range,
                                        deficit_floor, _threads()), "sinkhorn")
    return out


def sinkhorn_backward(z: Tensor, grad: Tensor, iters: int, logit_range: float,
                      deficit_floor: float) -> Tensor:
    """dL/dz given ``grad`` = dL/d(:func:`sinkhorn`'s result), both ``(N, n, n)`` like ``z``."""
    N, n = z.shape[0], z.shape[-1]
    z, grad = z.contiguous(), grad.to(z.dtype).contiguous()
    out = torch.empty_like(z)
    _check(_fn("hb_sinkhorn_backward", z.dtype)(z.data_ptr(), grad.data_ptr(), out.data_ptr(), N, n,
                                                 iters, logit_range, deficit_floor, _threads()),
           "sinkhorn_backward")
    return out


#: the largest n of the hyper-connection kernels
HC_MAX_N = 16


def hc_forward(h: Tensor, alpha: Tensor, save_bf16: bool, norm_w: Tensor | None = None,
               norm_eps: float = 0.0, mixed: bool = True
               ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The width connection's mixing in one pass per token: ``h`` (B, T, n, d) in the compute
    dtype, ``alpha`` (n, n+1) static or (B, T, n, n+1) per token. Returns the branch input
    ``x = A_m^T H`` (B, T, d), RMS-normed with gain ``norm_w`` if given, the mixed streams
    ``A_r^T H`` (B, T, n, d) when ``mixed`` (else None: the depth connection mixes, see
    :func:`hc_rebuild`), a bf16 copy of ``h`` when ``save_bf16`` (else None), and the norm's
    per-token rstd (B, T, 1) (None without a norm)."""
    lead, (n, d) = h.shape[:-2], h.shape[-2:]
    # contiguous copies are held in names until the call returns (a temporary's memory could be
    # reused while C still reads it)
    h, alpha = h.contiguous(), alpha.contiguous()
    x, mixed = h.new_empty(*lead, d), h.new_empty(*lead, n, d) if mixed else None
    saved = torch.empty(h.shape, dtype=torch.bfloat16) if save_bf16 else None
    nm, rstd, hold = _norm_forward(norm_w, norm_eps, x)
    _check(_fn("hb_hc_forward", h.dtype)(
        h.data_ptr(), x[..., 0].numel(), n, d, alpha.data_ptr(), int(alpha.dim() > 2), x.data_ptr(),
        _ptr(mixed), _ptr(saved), nm, _threads()), "hc_forward")
    del hold
    return x, mixed, saved, rstd


def hc_forward_dynamic(h: Tensor, static_alpha: Tensor, static_beta: Tensor, wt: Tensor,
                       s_alpha: float, s_beta: float, eps: float, use_tanh: bool, save_bf16: bool,
                       norm_w: Tensor | None = None, norm_eps: float = 0.0, mixed: bool = True
                       ) -> tuple[tuple[Tensor, Tensor | None, Tensor | None, Tensor | None], tuple[Tensor, ...]]:
    """DHC's width connection forward in one pass per token: the dynamic weights (the stream
    norm's ``r`` (B, T, n, 1), ``p = H Wt^T`` and ``t = tanh(p r)`` (B, T, n, n+2), alpha
    (B, T, n, n+1), beta (B, T, n)), then the mixing of :func:`hc_forward` (and its branch
    norm). Returns ``(x, mixed, saved, x_rstd)`` and ``(alpha, beta, r, p, t)``; ``wt`` (n+2, d)
    and the static weights in the dtype of ``h``."""
    lead, (n, d) = h.shape[:-2], h.shape[-2:]
    h, static_alpha, static_beta, wt = (h.contiguous(), static_alpha.contiguous(),
                                        static_beta.contiguous(), wt.contiguous())
    x, mixed = h.new_empty(*lead, d), h.new_empty(*lead, n, d) if mixed else None
    saved = torch.empty(h.shape, dtype=torch.bfloat16) if save_bf16 else None
    r, p, t = h.new_empty(*lead, n, 1), h.new_empty(*lead, n, n + 2), h.new_empty(*lead, n, n + 2)
    alpha, beta = h.new_empty(*lead, n, n + 1), h.new_empty(*lead, n)
    nm, rstd, hold = _norm_forward(norm_w, norm_eps, x)
    _check(_fn("hb_hc_forward_dynamic", h.dtype)(
        h.data_ptr(), x[..., 0].numel(), n, d, static_alpha.data_ptr(), static_beta.data_ptr(),
        wt.data_ptr(), s_alpha, s_beta, eps, int(use_tanh), r.data_ptr(), p.data_ptr(), t.data_ptr(),
        alpha.data_ptr(), beta.data_ptr(), x.data_ptr(), _ptr(mixed), _ptr(saved), nm, _threads()),
        "hc_forward_dynamic")
    del hold
    return (x, mixed, saved, rstd), (alpha, beta, r, p, t)


def hc_rebuild(prev: Tensor, alpha: Tensor, beta: Tensor, y: Tensor, compute: torch.dtype,
               round_bf16: bool = False) -> Tensor:
    """``A_r^T prev + beta y`` (B, T, n, d) in ``compute``: the streams a depth connection made,
    rebuilt from the previous width connection's saved streams ``prev`` and ``alpha`` and the
    depth connection's ``beta`` and branch output ``y`` (``prev``, ``y`` in ``compute`` or bf16;
    ``round_bf16``: through bf16, as bf16 streams were), with the forward kernels' arithmetic (bit
    for bit from ``prev`` in ``compute``)."""
    st, hold, lead, n, d = _streams(None, (prev, alpha, beta, y), round_bf16)
    out = torch.empty(*lead, n, d, dtype=compute)
    _check(_fn("hb_hc_streams", compute)(ctypes.byref(st), out[..., 0, 0].numel(), n, d, None, 0,
                                          out.data_ptr(), None, _threads()), "hc_rebuild")
    del hold
    return out


def hc_branch_input(h: Tensor | None, alpha: Tensor, compute: torch.dtype,
                    source: tuple[Tensor, ...] | None = None, round_bf16: bool = False) -> Tensor:
    """``x = A_m^T H`` (B, T, d) in ``compute``, from ``h`` (B, T, n, d) in ``compute`` or bf16, or
    (``h`` None) from the streams ``source`` rebuilds per token (:func:`hc_rebuild`)."""
    st, hold, lead, n, d = _streams(h, source, round_bf16)
    x = torch.empty(*lead, d, dtype=compute)
    alpha = alpha.contiguous()
    _check(_fn("hb_hc_streams", compute)(
        ctypes.byref(st), x[..., 0].numel(), n, d, alpha.data_ptr(), int(alpha.dim() > 2), None,
        x.data_ptr(), _threads()), "hc_branch_input")
    del hold
    return x


def hc_backward(h: Tensor | None, alpha: Tensor, g_x: Tensor, g_mixed: Tensor | None, g_beta: Tensor | None,
                t: Tensor | None, r: Tensor | None, p: Tensor | None, wt: Tensor | None,
                s_alpha: float, s_beta: float, use_tanh: bool,
                source: tuple[Tensor, ...] | None = None, round_bf16: bool = False,
                norm: tuple[Tensor, Tensor, bool] | None = None,
                depth: tuple[Tensor, Tensor, Tensor, Tensor] | None = None):
    """dL/dH (B, T, n, d), dL/dalpha per token (B, T, n, n+1), dL/dWt (n+2, d) when ``wt`` is
    given, and dL/d(norm gain) (d,) when ``norm`` asks for it, from dL/d mixed and ``g_x``: dL/dx,
    or with ``norm = (x_rstd, norm_w, need_gain_grad)`` dL/d(the normed branch input), the norm's
    backward run per token in the kernel. All in the dtype of ``g_x``. The streams: ``h``, or
    (``h`` None) rebuilt per token from ``source`` (:func:`hc_rebuild`). ``depth = (beta, y, g_y,
    g_beta)``: also the backward of the depth connection whose output H is (:func:`depth_backward`
    on dL/dH), written into ``g_y`` (B, T, d) and ``g_beta`` (B, T, n), contiguous, in the dtype of
    ``g_x``."""
    g_h, g_alpha, g_wt, g_w, _ = _hc_backward(h, alpha, g_x, g_mixed, g_beta, t, r, p, wt, s_alpha, s_beta,
                                              use_tanh, source, round_bf16, norm, depth, True)
    return g_h, g_alpha, g_wt, g_w


def _hc_backward(h, alpha, g_x, g_mixed, g_beta, t, r, p, wt, s_alpha, s_beta, use_tanh, source, round_bf16,
                 norm, depth, want_g_h: bool):
    compute = g_x.dtype
    st, hold, lead, n, d = _streams(h, source, round_bf16)
    nm, g_w, g_xn = _norm_backward(norm, g_x, not want_g_h, hold)
    g_h = torch.empty(*lead, n, d, dtype=compute) if want_g_h else None
    g_alpha = torch.empty(*lead, n, n + 1, dtype=compute)
    g_wt = torch.empty(n + 2, d, dtype=compute) if wt is not None else None
    c = lambda x: None if x is None else x.contiguous()  # noqa: E731
    alpha, g_x, g_mixed, g_beta, t, r, p = c(alpha), c(g_x), c(g_mixed), c(g_beta), c(t), c(r), c(p)
    dp = _depth(depth, hold)
    _check(_fn("hb_hc_backward", compute)(
        ctypes.byref(st), g_x[..., 0].numel(), n, d,
        alpha.data_ptr(), int(alpha.dim() > 2), g_x.data_ptr(),
        _ptr(g_mixed), _ptr(g_beta), _ptr(t), _ptr(r), _ptr(p), _ptr(wt), s_alpha, s_beta,
        int(use_tanh), _ptr(g_h), g_alpha.data_ptr(), _ptr(g_wt), nm, dp, _threads()),
        "hc_backward")
    del hold
    return g_h, g_alpha, g_wt, g_w, g_xn


def depth_forward(mixed: Tensor, beta: Tensor, y: Tensor) -> Tensor:
    """``mixed + beta^T y``: ``mixed`` (B, T, n, d) contiguous in the compute dtype, ``beta`` (n,) or
    (B, T, n) in it too, ``y`` (B, T, d) in it or in bf16. One pass, in the compute dtype."""
    n, d = mixed.shape[-2:]
    mixed, beta, y = mixed.contiguous(), beta.contiguous(), y.contiguous()
    out = torch.empty_like(mixed)
    _check(_fn("hb_depth_forward", mixed.dtype)(
        mixed.data_ptr(), beta.data_ptr(), int(beta.dim() > 1), y.data_ptr(), int(y.dtype == torch.bfloat16),
        y[..., 0].numel(), n, d, out.data_ptr(), _threads()), "depth_forward")
    return out


def depth_backward(g: Tensor, beta: Tensor, y: Tensor, need_y: bool, need_beta: bool
                   ) -> tuple[Tensor | None, Tensor | None]:
    """dL/dy (B, T, d) and dL/dbeta per token (B, T, n), in the dtype of ``g``, in one pass."""
    lead, (n, d) = g.shape[:-2], g.shape[-2:]
    g, beta, y = g.contiguous(), beta.contiguous(), y.contiguous()
    g_y = torch.empty(*lead, d, dtype=g.dtype) if need_y else None
    g_beta = torch.empty(*lead, n, dtype=g.dtype) if need_beta else None
    _check(_fn("hb_depth_backward", g.dtype)(
        g.data_ptr(), beta.data_ptr(), int(beta.dim() > 1), y.data_ptr(), int(y.dtype == torch.bfloat16),
        y[..., 0].numel(), n, d, _ptr(g_y), _ptr(g_beta), _threads()), "depth_backward")
    return g_y, g_beta
