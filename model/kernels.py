"""Native CPU kernels, compiled on first use and called through ctypes.

Decoding reads every weight once per token, so its speed is the speed at which the matrix-vector products
stream the weights. torch's stock CPU kernels for these shapes are compute-bound well below the memory
bandwidth; our kernels read int8, packed int4 and bf16 weights in their stored layout at close to it.

Beside them, both builds carry the steps between the matrix products of a bf16 forward pass
(model/kernels_glue.h: RMSNorm, rotary, SiLU * b, bf16 in / out linears), each one call instead of several torch
ops: decoding one token of the 6B shape ran ~2,000 small ops, 47 of a 235 ms int4 step on a 2-core Xeon; and
attention of one new token over a bf16 KV cache (decode_attention_bf16, sharing model/kernels_attention.h).

Two builds of the same functions: model/kernels.c for x86-64 CPUs with AVX-512 (bf16 products need
AVX512-BF16, integer products AVX512-VNNI), model/kernels_avx2.c for those with only AVX2 and FMA (most
laptops and many servers). Each is built with the system C compiler (`cc`, -march=native, OpenMP) into a
per-user cache. Anything else (no compiler, another CPU, CHATGLM_NATIVE_KERNELS=0) leaves `available()` False
and the callers use torch. CHATGLM_NATIVE_KERNELS=avx2 uses the AVX2 build on AVX-512 CPUs too.

Settings: CC (the compiler command, split as a shell would: "ccache gcc"), CHATGLM_KERNEL_CACHE (where the
build goes; an unusable one falls back to a private directory under the system's temporary directory),
CHATGLM_KERNEL_COMPILE_TIMEOUT (seconds, default 300). Every entry point checks its arguments before calling C:
the C functions index raw pointers with the sizes they are given.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Inputs of up to decode_rows() rows (tokens) use the matrix-vector kernels; longer ones use a GEMM, which wins
# once the weights are reused across many rows. Each build says how many rows it is good for (decode_rows() in
# C: 16 in both, measured against the GEMM route). torch's own int8 kernel (no native kernels) takes up to this
# many.
DECODE_TOKENS = 4

SOURCE = Path(__file__).with_name("kernels.c")
AVX2_SOURCE = Path(__file__).with_name("kernels_avx2.c")
HEADERS = [Path(__file__).with_name(name) for name in ("kernels_glue.h", "kernels_attention.h")]  # both include
AVX512 = {"avx512f", "avx512bw", "avx512vl"}
ABI = 9
COMPILE_TIMEOUT = 300.0  # seconds; a build takes a few, a hung compiler must not hang model loading
# Return codes of the C functions (kernels.c, kernels_avx2.c)
NO_BF16, NO_MEMORY = -1, -2
NOT_THIS_SHAPE = -4  # decode_attention_bf16 of the AVX2 build: a group of heads it does not take
INT_MAX = 2**31 - 1  # the C functions take sizes as int
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_why_not = ""


# What torch's own dispatch found (torch.backends.cpu.get_cpu_capability()), as the cpuinfo flags it implies.
TORCH_CAPABILITY_FLAGS = {"AVX512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma"},
                          "AVX2": {"avx2", "fma"}}


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux names them: from /proc/cpuinfo, else macOS's sysctl, else what torch's
    own dispatch detected (Windows, or a container hiding /proc)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
                                 capture_output=True, text=True, timeout=10).stdout
            flags = {f.lower().replace(".", "_") for f in out.split()}
            if flags:
                return flags | ({"fma"} if "fma" in flags or "fma3" in flags else set())
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return set(TORCH_CAPABILITY_FLAGS.get(torch.backends.cpu.get_cpu_capability(), ()))
    except (AttributeError, RuntimeError):
        return set()


class _Declined(RuntimeError):
    """No native kernels because the user turned them off."""


class _Unsupported(RuntimeError):
    """No native kernels because this machine cannot run them: no build would help."""


def _cache_dir() -> Path:
    root = os.environ.get("CHATGLM_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "chatglm-kernels")
    return Path(root)


def _writable_dir(preferred: Path) -> Path:
    """preferred if this process can create files in it, else a private directory under the temporary one."""
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK | os.X_OK):
            return preferred
        reason = "not writable"
    except OSError as exc:
        reason = str(exc)
    fallback = Path(tempfile.gettempdir()) / f"chatglm-kernels-{os.getuid()}"
    fallback.mkdir(mode=0o700, exist_ok=True)
    # we load a shared library from there: anyone else able to write to it could run code in this process
    info = fallback.lstat()
    if not fallback.is_dir() or fallback.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise RuntimeError(f"kernel cache {preferred} is unusable ({reason}) and {fallback} is not a directory "
                           "private to this user; set CHATGLM_KERNEL_CACHE to a writable directory")
    log.warning("kernel cache %s is unusable (%s); building the native kernels in %s instead, which may not "
                "outlive a reboot: set CHATGLM_KERNEL_CACHE to a writable directory to keep them", preferred,
                reason, fallback)
    return fallback


def _compiler() -> list[str]:
    """The C compiler command: $CC split as a shell would (CC="ccache gcc" is two words), else cc or gcc."""
    command = shlex.split(os.environ.get("CC", ""))
    if command:
        return command
    found = shutil.which("cc") or shutil.which("gcc")
    if not found:
        raise RuntimeError("no C compiler (cc/gcc) found")
    return [found]


def _compile_timeout() -> float:
    value = os.environ.get("CHATGLM_KERNEL_COMPILE_TIMEOUT", "")
    try:
        return float(value) if value else COMPILE_TIMEOUT
    except ValueError:
        raise RuntimeError(f"CHATGLM_KERNEL_COMPILE_TIMEOUT must be a number of seconds, got {value!r}") from None


def _run_compiler(cmd: list[str], timeout: float) -> None:
    """Run cmd; RuntimeError with its diagnostics if it fails or outlives timeout seconds."""
    # A session of its own: on a timeout the whole group dies (cc1, as, ld, a wrapper script's children), so
    # no grandchild keeps the pipes open and communicate() returns.
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"compiling timed out after {timeout:g} s ({shlex.join(cmd)}); raise "
                               "CHATGLM_KERNEL_COMPILE_TIMEOUT for a slow compiler") from None
    if proc.returncode:
        error = RuntimeError(f"compiling failed ({shlex.join(cmd)}): {err.strip()[-500:]}")
        error.diagnostics = err  # what the compiler said
        raise error


def _compile(source_path: Path, required_flags: set[str], what: str) -> ctypes.CDLL:
    """Build source_path for this CPU into the per-user cache (once) and load it."""
    if os.environ.get("CHATGLM_NATIVE_KERNELS", "1") in ("0", "false", "no"):
        raise _Declined("disabled by CHATGLM_NATIVE_KERNELS=0")
    if platform.machine() not in ("x86_64", "AMD64"):
        raise _Unsupported(f"no native kernels for {platform.machine()}")
    flags = _cpu_flags()
    if not required_flags <= flags:
        raise _Unsupported(f"the CPU has no {what}")
    compiler = _compiler()
    source = source_path.read_bytes() + b"".join(h.read_bytes() for h in HEADERS)  # a change to any rebuilds
    key = hashlib.sha256(source + shlex.join(compiler).encode() + " ".join(sorted(flags)).encode()).hexdigest()[:16]
    name = f"{source_path.stem}_{key}.so"
    target = _cache_dir() / name
    if not target.exists():  # a read-only cache that holds the build is fine
        target = _writable_dir(target.parent) / name
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / name
            command = [*compiler, "-O3", "-march=native", "-shared", "-fPIC", "-o", str(out), str(source_path)]
            try:
                _run_compiler(command[:2] + ["-fopenmp"] + command[2:], _compile_timeout())
            except RuntimeError as e:
                if "openmp" not in getattr(e, "diagnostics", "").lower():
                    raise
                # Apple's clang has no -fopenmp: a single-threaded build still reads int4 at ~1/4 the bytes
                _run_compiler(command, _compile_timeout())
                log.warning("the C compiler has no OpenMP (%s): the native kernels were built single-threaded; "
                            "install libomp or gcc to use every core", e.diagnostics.strip()[-200:])
            os.replace(out, target)  # atomic: concurrent builders never load a half-written file
    return ctypes.CDLL(str(target))


BF16_PRODUCTS_ENV = "CHATGLM_BF16_PRODUCTS"  # read by kernels.c: fma or dpbf16 (default: by CPU vendor)


def _check_bf16_products() -> None:
    """Warn about a value of CHATGLM_BF16_PRODUCTS that kernels.c would ignore (it then chooses by vendor)."""
    value = os.environ.get(BF16_PRODUCTS_ENV, "")
    if value not in ("", "fma", "dpbf16"):
        log.warning("%s=%r is neither fma nor dpbf16: ignored, the bf16 kernels choose by CPU vendor",
                    BF16_PRODUCTS_ENV, value)


def _build() -> ctypes.CDLL:
    _check_bf16_products()
    flags = _cpu_flags()
    # CHATGLM_NATIVE_KERNELS=avx2 picks the AVX2 build on an AVX-512 CPU too (to test or compare it)
    avx512 = AVX512 <= flags and os.environ.get("CHATGLM_NATIVE_KERNELS") != "avx2"
    if avx512 or platform.machine() not in ("x86_64", "AMD64"):
        lib = _compile(SOURCE, AVX512, "AVX-512")
    else:
        lib = _compile(AVX2_SOURCE, {"avx2", "fma"}, "AVX-512 or AVX2 with FMA")
    if lib.chatglm_kernels_abi() != ABI:
        raise RuntimeError("stale kernel library")
    p, i = ctypes.c_void_p, ctypes.c_int
    functions = {name: [p, i, i, p, i, p, p, p] for name in ("gemv_q8", "gemv_q4", "gemv_q8v", "gemv_q4v")}
    functions.update(gemv_bf16=[p, i, i, p, i, p, p], dequantize=[p, i, i, i, p, p, p])
    if hasattr(lib, "linear_f32"):
        functions["linear_f32"] = [p, i, i, p, i, p, p]
    functions.update(rmsnorm_bf16=[p, i, i, p, ctypes.c_float, p],
                     rotary_bf16=[p, i, ctypes.c_int64, i, i, i, p, p], silu_mul_bf16=[p, i, i, p],
                     linear_bf16io=[i, p, i, i, p, i, p, p, p])
    if hasattr(lib, "decode_attention_bf16"):
        q = ctypes.c_int64
        functions["decode_attention_bf16"] = [p, i, i, i, i, i, p, q, q, q, p, q, q, q, p, p, q, q,
                                              ctypes.c_float, p]
    for name, argtypes in functions.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, i  # each returns 0 or NO_BF16 / NO_MEMORY (/ NOT_THIS_SHAPE)
    lib.has_vnni.restype = i
    # the AVX2 build widens bf16 to float32 in registers (exact), the AVX-512 one needs vdpbf16ps
    lib.has_bf16 = "avx512_bf16" in flags or not avx512
    lib.rows = lib.decode_rows() if hasattr(lib, "decode_rows") else DECODE_TOKENS
    return lib


def _log_unavailable(exc: Exception) -> None:
    """Say once why there are no native kernels: at WARNING, with what to do, unless the user asked for that."""
    if isinstance(exc, _Declined):
        log.info("native CPU kernels %s; using torch kernels", exc)
        return
    if isinstance(exc, _Unsupported):
        todo = "nothing on this machine (they need an x86-64 CPU with AVX-512, or AVX2 and FMA)"
    else:
        todo = ("install gcc with OpenMP or set CC to a C compiler command (e.g. CC='ccache gcc'); "
                "CHATGLM_KERNEL_CACHE sets where they are built")
    log.warning("native CPU kernels unavailable (%s): int8 / int4 / bf16 layers use torch's kernels, which decode "
                "int4 about 2-4x slower in bf16 (30-50x in float32). To fix: %s. CHATGLM_NATIVE_KERNELS=0 uses torch "
                "without this warning",
                exc, todo)


def library() -> ctypes.CDLL | None:
    global _lib, _tried, _why_not
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = _build()
                except Exception as exc:  # any failure means: use torch
                    _why_not = str(exc) or type(exc).__name__
                    _log_unavailable(exc)
                _tried = True
    return _lib


def available() -> bool:
    return library() is not None


def why_unavailable() -> str:
    library()
    return _why_not


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _native() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable: {_why_not}")
    return lib


def _call(name: str, *args, passing: tuple[int, ...] = ()) -> int:
    """Call C function `name`, turning its status into an exception unless it is 0 or one of `passing`."""
    status = getattr(_native(), name)(*args)
    if status in passing:
        return status
    if status == NO_MEMORY:
        raise MemoryError(f"{name}: the native kernel could not allocate its work buffers")
    if status == NO_BF16:
        raise RuntimeError(f"{name} needs AVX512-BF16")
    if status:
        raise RuntimeError(f"{name} failed with status {status}")


def _tensor(name: str, t: object, dtype: torch.dtype, dims: str, *sizes: int | None) -> None:
    """Raise unless t is a contiguous CPU tensor of dtype with the given sizes (None: any), named dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor (native kernels run on CPU tensors only), got {t.device}")
    if t.dim() != len(sizes) or any(want is not None and want != got for want, got in zip(sizes, t.shape)):
        want = ", ".join("any" if size is None else str(size) for size in sizes)
        raise ValueError(f"{name} must have shape {dims} = [{want}], got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if any(size > INT_MAX for size in t.shape):
        raise ValueError(f"{name} has a dimension over {INT_MAX}, more than the native kernels take")


def _check_quantized(weight: torch.Tensor, bits: int, k: int, scale: torch.Tensor) -> int:
    """Check an int8 / packed int4 weight for K input features and its scales; returns N."""
    if not isinstance(bits, int) or bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if bits == 4 and k % 2:
        raise ValueError(f"int4 packs two columns a byte: K must be even, got K={k}")
    _tensor("weight", weight, torch.int8, "[N, K]" if bits == 8 else "[N, K/2]", None, k if bits == 8 else k // 2)
    n = weight.shape[0]
    _tensor("scale", scale, torch.float32, "[N]", n)
    return n


def _check_bias(bias: torch.Tensor | None, n: int) -> None:
    if bias is not None:
        _tensor("bias", bias, torch.float32, "[N]", n)


def decode_rows() -> int:
    """Inputs of up to this many rows go to the matrix-vector kernels (0 without native kernels)."""
    lib = library()
    return 0 if lib is None else lib.rows


def has_bf16() -> bool:
    lib = library()
    return bool(lib is not None and lib.has_bf16)


def has_integer_kernels() -> bool:
    """The integer-product kernels (AVX512-VNNI in kernels.c, vpmaddwd in kernels_avx2.c) for bf16 inputs."""
    lib = library()
    return bool(lib is not None and lib.has_vnni())


def gemv_quantized(x: torch.Tensor, weight: torch.Tensor, bits: int, scale: torch.Tensor,
                   bias: torch.Tensor | None, integer: bool = False) -> torch.Tensor:
    """x [M, K] float32 contiguous -> [M, N] float32; scale and bias float32 [N].

    integer=False: a float32 matmul with the de-quantized weight, up to summation order.
    integer=True (CPUs with AVX512-VNNI): x is rounded per row to 16 (int8) / 15 (int4) bits and the
    products are integer dot products: for bf16 models, whose activations carry 8 bits anyway.
    """
    _tensor("x", x, torch.float32, "[M, K]", None, None)
    m, k = x.shape
    n = _check_quantized(weight, bits, k, scale)
    _check_bias(bias, n)
    y = torch.empty(m, n, dtype=torch.float32)
    name = {(8, False): "gemv_q8", (4, False): "gemv_q4", (8, True): "gemv_q8v", (4, True): "gemv_q4v"}
    _call(name[bits, bool(integer)], x.data_ptr(), m, k, weight.data_ptr(), n, scale.data_ptr(), _ptr(bias),
          y.data_ptr())
    return y


def gemv_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] bf16 contiguous, weight [N, K] bf16 -> [M, N] float32; bias float32 [N]."""
    _tensor("x", x, torch.bfloat16, "[M, K]", None, None)
    m, k = x.shape
    _tensor("weight", weight, torch.bfloat16, "[N, K]", None, k)
    n = weight.shape[0]
    _check_bias(bias, n)
    y = torch.empty(m, n, dtype=torch.float32)
    _call("gemv_bf16", x.data_ptr(), m, k, weight.data_ptr(), n, _ptr(bias), y.data_ptr())
    return y


# ---- the steps between the matrix products of a bf16 forward pass (kernels_glue.h): one call each.
# Their callers (model/modeling.py, model/quantization.py) make the tensors themselves; the checks below are
# one expression each (on the hot path of every layer and token), with _tensor's message when one fails.

LINEAR_KINDS = {(8, False): 0, (4, False): 1, (8, True): 2, (4, True): 3}  # linear_bf16io's kind; 4 = bf16


def _plain(t: torch.Tensor, dtype: torch.dtype, name: str, dims: str, *sizes: int | None) -> None:
    if not (isinstance(t, torch.Tensor) and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
            and t.dim() == len(sizes) and all(s is None or s == n for s, n in zip(sizes, t.shape))
            and max(t.shape, default=0) <= INT_MAX):
        _tensor(name, t, dtype, dims, *sizes)
        raise ValueError(f"{name}: not a tensor the native kernels take")  # _tensor found nothing (NaN sizes)


def _rows(rows: int) -> int:
    if rows > INT_MAX:
        raise ValueError(f"{rows} rows: more than the native kernels take ({INT_MAX})")
    return rows


def glue_available() -> bool:
    """Whether the bf16 glue kernels (RMSNorm, rotary, SiLU * b, bf16 in / out linears) can run."""
    return library() is not None


def rmsnorm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row of x [..., n] bf16 with weight [n] bf16: a new bf16 tensor shaped as x."""
    n = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None
    _plain(weight, torch.bfloat16, "weight", "[n]", n)
    _plain(x, torch.bfloat16, "x", "[..., n]", *x.shape[:-1], n)
    rows = _rows(x.numel() // n if n else 0)
    out = torch.empty_like(x)
    _call("rmsnorm_bf16", x.data_ptr(), rows, n, weight.data_ptr(), eps, out.data_ptr())
    return out


def rotary_bf16_(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place: the interleaved rotary on the first 2 * pairs values of the first `heads` heads (head_dim
    values each) of every row of x [rows, width] bf16, with cos, sin [rows, pairs] bf16 (one row each)."""
    _plain(x, torch.bfloat16, "x", "[rows, width]", None, None)
    rows, width = x.shape
    pairs = cos.shape[-1] if isinstance(cos, torch.Tensor) and cos.dim() == 2 else None
    _plain(cos, torch.bfloat16, "cos", "[rows, pairs]", rows, pairs)
    _plain(sin, torch.bfloat16, "sin", "[rows, pairs]", rows, pairs)
    if heads * head_dim > width or 2 * pairs > head_dim:
        raise ValueError(f"{heads} heads of {head_dim} with {pairs} rotary pairs do not fit rows of {width}")
    _call("rotary_bf16", x.data_ptr(), rows, width, heads, head_dim, pairs, cos.data_ptr(), sin.data_ptr())


def silu_mul_bf16(ab: torch.Tensor) -> torch.Tensor:
    """F.silu(a) * b of the two halves a, b of each row of ab [..., 2n] bf16: bf16 [..., n]."""
    _plain(ab, torch.bfloat16, "ab", "[..., 2n]", *ab.shape)
    if ab.dim() == 0 or ab.shape[-1] % 2:
        raise ValueError(f"ab must have an even last dimension, got {list(ab.shape)}")
    n = ab.shape[-1] // 2
    out = torch.empty(*ab.shape[:-1], n, dtype=torch.bfloat16)
    _call("silu_mul_bf16", ab.data_ptr(), _rows(ab.numel() // (2 * n) if n else 0), n, out.data_ptr())
    return out


def linear_bf16io(x: torch.Tensor, weight: torch.Tensor, kind: int, scale: torch.Tensor | None,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] bf16 -> [M, N] bf16 through the matrix-vector kernel of `kind` (LINEAR_KINDS, or 4: a bf16
    weight [N, K]): the float32 kernel's result rounded as .to(torch.bfloat16) would, without the float32
    copies of x and y as tensors. scale (quantized kinds) and bias float32 [N]."""
    if kind not in (0, 1, 2, 3, 4):
        raise ValueError(f"kind must be one of {sorted(LINEAR_KINDS.values())} or 4 (bf16), got {kind!r}")
    _plain(x, torch.bfloat16, "x", "[M, K]", None, None)
    m, k = x.shape
    if kind == 4:
        _plain(weight, torch.bfloat16, "weight", "[N, K]", None, k)
        n = weight.shape[0]
    else:
        bits = 8 if kind in (0, 2) else 4
        if bits == 4 and k % 2:
            _check_quantized(weight, bits, k, scale)  # raises: two columns a byte
        _plain(weight, torch.int8, "weight", "[N, K]" if bits == 8 else "[N, K/2]", None, k if bits == 8 else k // 2)
        n = weight.shape[0]
        _plain(scale, torch.float32, "scale", "[N]", n)
    if bias is not None:
        _plain(bias, torch.float32, "bias", "[N]", n)
    y = torch.empty(m, n, dtype=torch.bfloat16)
    _call("linear_bf16io", kind, x.data_ptr(), m, k, weight.data_ptr(), n, _ptr(scale), _ptr(bias), y.data_ptr())
    return y


def dequantize(weight: torch.Tensor, bits: int, scale: torch.Tensor, in_features: int,
               dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float weight [N, K] in dtype (bf16 or float32) from int8 / packed int4 and float32 scales,
    written into `out` (contiguous [N, K] of dtype) when given."""
    if dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"dtype must be torch.bfloat16 or torch.float32, got {dtype}")
    if not isinstance(in_features, int) or not 0 <= in_features <= INT_MAX:
        raise ValueError(f"in_features must be an int in 0..{INT_MAX}, got {in_features!r}")
    n = _check_quantized(weight, bits, in_features, scale)
    if out is None:
        out = torch.empty(n, in_features, dtype=dtype)
    _tensor("out", out, dtype, "[N, K]", n, in_features)
    bf16, f32 = (out, None) if dtype == torch.bfloat16 else (None, out)
    _call("dequantize", weight.data_ptr(), bits, n, in_features, scale.data_ptr(), _ptr(bf16), _ptr(f32))
    return out


# ---- prompts: GEMMs over a weight made block by block ---------------------------------------------------
GEMM_BLOCK_BYTES = 64 << 20  # the largest block of the float weight one GEMM multiplies (reused buffer)
@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX): bf16 is then its 'auto' dtype. Without
    it torch's bf16 GEMM is several times slower than float32 (measured on an AVX2 EPYC: 1.46 s against 0.30 s
    for 128 rows of a 27392x4096 weight)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


@functools.cache
def _amx() -> bool:
    """AMX tiles usable by this process (torch asks the OS for them), else what the CPU's flags say."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return "amx_bf16" in _cpu_flags()


def native_bf16_gemm() -> bool:
    """Whether torch's bf16 GEMM beats float32 GEMMs here: with AMX tiles (about 2 TFLOP/s on two Xeon cores).
    With AVX512-BF16 alone its GEMM was slower than float32's (2-core Xeon without AMX, 27392x4096 weight,
    512 rows: 705 against 534 ms, 4096x13696: 348 against 216 ms, float32 over the weight widened block by
    block), and without native bf16 several times slower. Where it does not win, bf16 prompts are multiplied
    in float32: the same bf16 products, summed in float32 as a bf16 GEMM does."""
    return native_bf16() and _amx()


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a CPU GEMM for inputs of `dtype` runs in."""
    if dtype == torch.bfloat16:
        return torch.bfloat16 if native_bf16_gemm() else torch.float32
    return dtype if dtype == torch.float32 else torch.float32


_scratch = threading.local()


def scratch(slot: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """`numel` elements of dtype from a buffer this thread keeps under `slot` and reuses: a fresh large tensor
    per call (a block GEMM's weight block, a layer's keys widened to float32) would be fresh pages from the
    kernel each time, and the page faults cost more than filling it (5.7 ms against 0.3 ms for the 8 MB of 8192
    cached tokens of the 6B shape). The buffer grows to the largest request and is kept; one made under
    inference mode is replaced outside it (an inference tensor cannot be written there)."""
    buf = getattr(_scratch, slot, None)
    if (buf is None or buf.dtype != dtype or buf.numel() < numel
            or (buf.is_inference() and not torch.is_inference_mode_enabled())):
        buf = torch.empty(numel, dtype=dtype)
        setattr(_scratch, slot, buf)
    return buf[:numel]


def blocked_gemm(rows: torch.Tensor, n_out: int, fill, work: torch.dtype) -> torch.Tensor:
    """rows [M, K] @ W^T -> [M, n_out] in `work` (contiguous), for a weight W that is written GEMM_BLOCK_BYTES at
    a time by fill(n0, n1, buffer) (rows n0..n1 of W into buffer, returned) and never exists whole: no
    weight-sized temporaries, and the block buffer is reused (no page faults per call)."""
    k = rows.shape[1]
    block = max(64, (GEMM_BLOCK_BYTES // (k * torch.finfo(work).bits // 8)) // 64 * 64)
    x = rows.to(work)
    buffer = scratch("gemm", min(block, n_out) * k, work).view(-1, k)
    if block >= n_out:  # one block: the product is the result (oneDNN's fastest orientation, x @ W^T)
        return torch.mm(x, fill(0, n_out, buffer[:n_out]).t())
    out = torch.empty(rows.shape[0], n_out, dtype=work)
    for n0 in range(0, n_out, block):
        n1 = min(n0 + block, n_out)
        out[:, n0:n1] = torch.mm(x, fill(n0, n1, buffer[: n1 - n0]).t())
    return out


# ---- float32 linears through oneDNN ------------------------------------------------------------------
# torch sends float32 F.linear on the CPU to MKL's sgemm. On CPUs MKL does not tune for (measured on a 2-core
# AMD EPYC with AVX2, torch 2.13) that is far from the memory bound: for a 27392x4096 weight, 36 ms for one row
# (12 GB/s) and 182 ms for eight. torch's oneDNN linear op (the one torch.compile's CPU backend emits) takes
# 21 ms and 62 ms on the same shapes, and is faster for prompt-sized inputs too, so float32 linears use it
# where it exists. CHATGLM_ONEDNN_LINEAR=0 turns it off; any error turns it off for the process.
_onednn_ok: bool | None = None


def onednn_linear_enabled() -> bool:
    global _onednn_ok
    if _onednn_ok is None:
        _onednn_ok = (os.environ.get("CHATGLM_ONEDNN_LINEAR", "1") not in ("0", "false", "no")
                      and torch.backends.mkldnn.is_available()
                      and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    return _onednn_ok


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x @ weight.T + bias for float32 CPU tensors through oneDNN; None when the op is unavailable."""
    global _onednn_ok
    if not onednn_linear_enabled():
        return None
    try:
        rows = x.reshape(-1, x.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(rows if rows.is_contiguous() else rows.contiguous(), weight, bias,
                                               "none", [], "")
    except Exception as e:  # an older or different torch build: use F.linear from now on
        log.warning("oneDNN linear unavailable (%s); using torch's default float32 linear", e)
        _onednn_ok = False
        return None
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ---- float32 linears for a few rows on AVX2 CPUs without AVX-512 (linear_f32 in model/kernels_avx2.c) -------
# Rows up to this many use it; it matched or beat oneDNN from 1 to 16 rows on the 2-core AMD EPYC (AVX2) we
# measured (27392x4096 weight: 19.6 / 32.6 / 51.7 ms for 1 / 8 / 16 rows against oneDNN's 22.3 / 61.0 / 75.7).
# CPUs with AVX-512 keep oneDNN, which we have not measured against it there.
F32_ROWS = 16


def f32_library() -> ctypes.CDLL | None:
    """The AVX2 build when it is the one in use (it has linear_f32), else None."""
    lib = library()
    return lib if lib is not None and hasattr(lib, "linear_f32") else None


def linear_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x @ weight.T + bias for float32 CPU tensors of up to F32_ROWS rows; None when the kernel is unavailable."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > F32_ROWS or not weight.is_contiguous() or f32_library() is None:
        return None
    rows = rows.contiguous()
    _tensor("x", rows, torch.float32, "[M, K]", None, None)
    _tensor("weight", weight, torch.float32, "[N, K]", None, rows.shape[1])
    n = weight.shape[0]
    bias = None if bias is None else bias.contiguous()
    _check_bias(bias, n)
    y = torch.empty(rows.shape[0], n, dtype=torch.float32)
    _call("linear_f32", rows.data_ptr(), rows.shape[0], rows.shape[1], weight.data_ptr(), n, _ptr(bias), y.data_ptr())
    return y.reshape(*x.shape[:-1], n)


# ---- decode attention over a bf16 KV cache (decode_attention_bf16 in both builds) ---------------------------
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
                     ) -> torch.Tensor | None:
    """Attention of one new token per sequence, all bf16 on the CPU: q (B, nh, 1, d) over k, v (B, g, S, d)
    (any strides with the last dimension dense, e.g. a view into a preallocated cache), query head h reading
    group h // (nh / g); mask None or broadcastable to (B, 1, 1, S), bool (True = may attend) or additive.
    Scores, softmax and the weighted sum in float32, the result (B, nh, 1, d) bf16. None where the kernel does
    not run: no native kernels, d not a multiple of 16, or on the AVX2 build a group of heads that is not a
    multiple of 8 (its kernel puts 8 heads in the lanes of a vector; ChatGLM2 / 3 have 16 a group, ChatGLM-6B
    one)."""
    lib = library()
    if lib is None:
        return None
    for name, t, dims in (("q", q, "(B, nh, 1, d)"), ("k", k, "(B, g, S, d)"), ("v", v, "(B, g, S, d)")):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.bfloat16 or t.device.type != "cpu" or t.dim() != 4:
            raise TypeError(f"{name} must be a 4-d bf16 CPU tensor {dims}, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}")
    B, nh, T, d = q.shape
    g, S = k.shape[1], k.shape[2]
    if T != 1 or k.shape != (B, g, S, d) or v.shape != k.shape or g == 0 or nh % g or S == 0:
        raise ValueError(f"decode attention takes q (B, nh, 1, d) and k, v (B, g, S, d) with g dividing nh and "
                         f"S >= 1, got q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if d % 16 or max(B * nh, S, d) > INT_MAX:
        return None
    q = q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    allowed = bias = None
    mask_strides = (0, 0)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.device.type != "cpu":
            raise TypeError("mask must be a CPU tensor")
        if mask.dtype == torch.bool:  # bytes 0 / 1
            allowed = full = mask.expand(B, 1, 1, S)  # raises unless it broadcasts
        else:
            bias = full = (mask if mask.dtype == torch.float32 else mask.float()).expand(B, 1, 1, S)
        mask_strides = (full.stride(0), full.stride(3))  # 0 where broadcast
    out = torch.empty(B, nh, 1, d, dtype=torch.bfloat16)
    status = _call("decode_attention_bf16", q.data_ptr(), B, nh, g, S, d, k.data_ptr(), *k.stride()[:3],
                   v.data_ptr(), *v.stride()[:3], _ptr(allowed), _ptr(bias), *mask_strides, d ** -0.5,
                   out.data_ptr(), passing=(NOT_THIS_SHAPE,))
    return None if status == NOT_THIS_SHAPE else out
