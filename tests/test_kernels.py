"""The native CPU kernels (model/kernels.c) against the reference de-quantize-then-matmul path, and every
dispatch branch of QuantizedLinear / Linear (native decode, native prefill, torch fallback)."""

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from model import kernels
from model.modeling import Linear
from model.quantization import QuantizedLinear, dequantize_weight, quantize_weight, unpack_int4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
native = pytest.mark.skipif(not kernels.available(), reason=f"native kernels: {kernels.why_unavailable()}")
SHAPES = [(37, 70), (64, 256), (13, 34), (9, 200), (130, 4096)]  # odd row counts and tails of every width


def _cpu_has(*flags):
    return set(flags) <= kernels._cpu_flags()


def test_native_kernels_build_where_ci_expects_them():
    """On CI's x86 machines the kernels must build (kernels.c with AVX-512, kernels_avx2.c with AVX2): a
    silent fallback would hide a broken kernel source."""
    if not os.environ.get("CI"):
        pytest.skip("CI unset: elsewhere a missing compiler is allowed (the model falls back to torch)")
    if not (_cpu_has("avx512f", "avx512bw", "avx512vl") or _cpu_has("avx2", "fma")):
        pytest.skip("the CPU has neither AVX-512 nor AVX2 with FMA")
    assert kernels.available(), kernels.why_unavailable()
    assert kernels.decode_rows() >= 4


@pytest.mark.skipif(not (_cpu_has("avx512f", "avx512bw", "avx512vl") and _cpu_has("avx2", "fma")),
                    reason="this run already tests the only build this CPU uses")
@pytest.mark.slow
def test_avx2_build_on_an_avx512_cpu(tmp_path):
    """AVX-512 CPUs use kernels.c; kernels_avx2.c (what AVX2-only CPUs use) gets the same kernel tests here."""
    env = dict(os.environ, CHATGLM_NATIVE_KERNELS="avx2", CHATGLM_KERNEL_CACHE=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           os.path.join(ROOT, "tests", "test_decode_attention.py"), "-k",
                           "gemv or dequantize or every_path or bf16_linear or f32_kernel or decode_attention or glue"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout


@pytest.mark.skipif(not kernels.has_bf16(), reason="no AVX512-BF16")
@pytest.mark.slow
def test_bf16_kernels_with_the_other_way_of_forming_products():
    """The bf16 kernels form their products with vdpbf16ps or with float32 multiply-adds, one per process
    (by CPU vendor): the kernel tests again with the other one forced (CHATGLM_BF16_PRODUCTS)."""
    other = "dpbf16" if _cpu_vendor() == "GenuineIntel" else "fma"
    env = dict(os.environ, **{kernels.BF16_PRODUCTS_ENV: other})
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "gemv or bf16_linear or glue"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout
    # and the variable does switch: the two sum the same exact products in other orders, so their float32
    # results differ in the last bits somewhere in a large product
    code = ("import torch; from model import kernels; g = torch.Generator().manual_seed(4); "
            "w = torch.randn(64, 4096, generator=g).bfloat16(); x = torch.randn(3, 4096, generator=g).bfloat16(); "
            "print(kernels.gemv_bf16(x, w, None).double().sum().item().hex())")
    here = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    there = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           check=True)
    assert here.stdout.strip() and there.stdout.strip() and here.stdout != there.stdout


@pytest.mark.parametrize("value, warned", [("fma", False), ("dpbf16", False), ("", False), ("FMA", True),
                                           ("avx", True)])
def test_an_unknown_bf16_products_value_is_named_in_a_warning(monkeypatch, caplog, value, warned):
    monkeypatch.setenv(kernels.BF16_PRODUCTS_ENV, value)
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        kernels._check_bf16_products()
    assert [repr(value) in r.getMessage() for r in caplog.records] == ([True] if warned else [])


def _cpu_vendor() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":")[1].strip() for line in f if line.startswith("vendor_id")), "")


@pytest.mark.slow
def test_unavailable_compiler_falls_back_to_torch(tmp_path):
    code = ("from model import kernels; import sys; "
            "print(kernels.available(), kernels.why_unavailable(), sep='|')")
    env = dict(os.environ, CC="/bin/false", CHATGLM_KERNEL_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    available, why = out.split("|")
    assert available == "False" and why
    env = dict(os.environ, CHATGLM_NATIVE_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False|disabled by CHATGLM_NATIVE_KERNELS=0"


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """The next kernels.library() builds anew (module state reset until the test ends) into tmp_path/cache."""
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_why_not", "")
    monkeypatch.setenv("CHATGLM_KERNEL_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _built(directory):
    return sorted(path.name for path in directory.rglob("*.so"))


@native
def test_cc_is_a_command_split_as_a_shell_would(fresh_build, monkeypatch):
    """CC="ccache gcc" is a command with arguments, not one path (here: env, then a gcc path with a space)."""
    gcc = shutil.which("gcc") or pytest.skip("no gcc")
    (fresh_build / "my tools").mkdir()
    (fresh_build / "my tools" / "gcc").symlink_to(gcc)
    monkeypatch.setenv("CC", f"env {shlex.quote(str(fresh_build / 'my tools' / 'gcc'))}")
    assert kernels.available(), kernels.why_unavailable()
    assert len(_built(fresh_build / "cache")) == 1


@native
@pytest.mark.slow
def test_a_compiler_without_openmp_builds_single_threaded(fresh_build, monkeypatch, caplog):
    """Apple's clang refuses -fopenmp: the kernels are built without it (with a warning) instead of not at all."""
    gcc = shutil.which("gcc") or pytest.skip("no gcc")
    compiler = fresh_build / "clang-like"
    compiler.write_text("#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = -fopenmp ] && "
                        "{ echo \"clang: error: unsupported option '-fopenmp'\" >&2; exit 1; }; done\n"
                        f"exec {shlex.quote(gcc)} \"$@\"\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", shlex.quote(str(compiler)))
    with caplog.at_level(logging.WARNING, logger=kernels.log.name):
        assert kernels.available(), kernels.why_unavailable()
    assert "no OpenMP" in caplog.text and len(_built(fresh_build / "cache")) == 1


def test_cpu_features_without_proc_cpuinfo(monkeypatch):
    """macOS has no /proc/cpuinfo (sysctl names the features); elsewhere torch's own dispatch tells."""
    real_open = open

    def no_cpuinfo(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_cpuinfo)
    monkeypatch.setattr(kernels.platform, "system", lambda: "Darwin")
    sysctl = "FPU VME SSE SSE2 AVX1.0 FMA\nAVX2 BMI2 AVX512F AVX512BW AVX512VL AVX512DQ\n"
    monkeypatch.setattr(kernels.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=sysctl, stderr=""))
    assert kernels.AVX512 | {"avx2", "fma"} <= kernels._cpu_flags()
    monkeypatch.setattr(kernels.platform, "system", lambda: "Windows")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert kernels._cpu_flags() == {"avx2", "fma"}
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert kernels.AVX512 <= kernels._cpu_flags()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert kernels._cpu_flags() == set()


def test_loading_a_cpu_model_builds_the_kernels_then(monkeypatch):
    """The native kernels are built (or found) while the model loads, not during the first request."""
    from conftest import model_dir
    from model import load_model

    calls = []
    monkeypatch.setattr(kernels, "library", lambda: calls.append(1))
    load_model(model_dir("chatglm2-tiny-int4"), device="cpu", dtype="float32")
    assert calls
    calls.clear()
    load_model(model_dir("chatglm2-tiny"), device="cpu", dtype="float32")  # float32: torch's kernels only
    assert not calls


@native
@pytest.mark.slow
def test_unusable_cache_dir_falls_back_to_a_private_temporary_dir(fresh_build, monkeypatch, caplog):
    (fresh_build / "a file").write_text("")
    monkeypatch.setenv("CHATGLM_KERNEL_CACHE", str(fresh_build / "a file" / "cache"))  # mkdir must fail
    (fresh_build / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(fresh_build / "tmp"))
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        assert kernels.available(), kernels.why_unavailable()
    fallback = fresh_build / "tmp" / f"chatglm-kernels-{os.getuid()}"
    assert len(_built(fallback)) == 1
    assert fallback.stat().st_mode & 0o777 == 0o700
    assert "CHATGLM_KERNEL_CACHE" in caplog.text and str(fallback) in caplog.text


@native
def test_fallback_dir_that_others_can_write_to_is_refused(fresh_build, monkeypatch):
    """The fallback holds a library this process loads: one that others could replace must not be used."""
    (fresh_build / "a file").write_text("")
    monkeypatch.setenv("CHATGLM_KERNEL_CACHE", str(fresh_build / "a file" / "cache"))
    fallback = fresh_build / "tmp" / f"chatglm-kernels-{os.getuid()}"
    fallback.mkdir(parents=True)
    fallback.chmod(0o777)
    monkeypatch.setattr(tempfile, "tempdir", str(fresh_build / "tmp"))
    assert not kernels.available()
    assert "private" in kernels.why_unavailable() and _built(fresh_build) == []


@native
def test_compiling_times_out(fresh_build, monkeypatch):
    """A hung compiler costs CHATGLM_KERNEL_COMPILE_TIMEOUT, not forever."""
    # sleep is the script's child and holds its output pipe: killing only the script would leave us waiting
    compiler = fresh_build / "slow_cc"
    compiler.write_text("#!/bin/sh\nsleep 60\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", shlex.quote(str(compiler)))
    monkeypatch.setenv("CHATGLM_KERNEL_COMPILE_TIMEOUT", "0.5")
    start = time.monotonic()
    assert not kernels.available()
    assert time.monotonic() - start < 20
    assert "timed out after 0.5 s" in kernels.why_unavailable()


@native
def test_unavailable_kernels_warn_once_with_what_to_do(fresh_build, monkeypatch, caplog):
    """int4 without the kernels is slower (2-4x in bf16, 30-50x in float32): say so once at WARNING, with the
    settings that fix it."""
    monkeypatch.setenv("CC", "/bin/false")
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        for _ in range(3):
            assert not kernels.available() and kernels.decode_rows() == 0 and kernels.why_unavailable()
    warnings = [r for r in caplog.records if r.name == kernels.__name__ and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "compiling failed" in message and "int4 about 2-4x slower" in message
    assert "CC=" in message and "CHATGLM_NATIVE_KERNELS=0" in message


def test_kernels_turned_off_on_purpose_do_not_warn(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("CHATGLM_NATIVE_KERNELS", "0")
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        assert not kernels.available()
    assert [r.levelno for r in caplog.records if r.name == kernels.__name__] == [logging.INFO]


@native
@pytest.mark.slow
def test_gemv_reports_allocation_failure_as_memory_error(tmp_path):
    """A kernel whose malloc fails raises MemoryError, neither crashing nor returning torch.empty's garbage."""
    # built with a malloc that always fails, through arguments in CC
    gcc = shutil.which("gcc") or pytest.skip("no gcc")
    header = tmp_path / "failing_malloc.h"
    header.write_text("#include <stdlib.h>\n"
                      "static inline void *failing_malloc(size_t size) { (void)size; return NULL; }\n"
                      "#define malloc failing_malloc\n")
    code = ("import torch; from model import kernels; from model.quantization import quantize_weight\n"
            "assert kernels.available(), kernels.why_unavailable()\n"
            "q, scale = quantize_weight(torch.randn(8, 64), 4)\n"
            "for integer in (False, True):\n"
            "    try: kernels.gemv_quantized(torch.randn(2, 64), q, 4, scale, None, integer)\n"
            "    except MemoryError as e: print('MemoryError:', e)\n"
            "    else: print('no error')\n")
    env = dict(os.environ, CC=f"{gcc} -include {shlex.quote(str(header))}", CHATGLM_KERNEL_CACHE=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        f"MemoryError: {name}: the native kernel could not allocate its work buffers" for name in ("gemv_q4", "gemv_q4v")]


def _case(bits, n, k, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    q, scale = quantize_weight(w, bits)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    exact = x.double() @ dequantize_weight(q, scale, bits, torch.float64).T + bias.double()
    return q, scale, x, bias, exact


def _rel(y, exact):
    return ((y.double() - exact).abs().max() / exact.abs().max()).item()


def _bf16_linear(k, n, seed):
    """A bf16 Linear with bias and random values."""
    g = torch.Generator().manual_seed(seed)
    linear = Linear(k, n, bias=True, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g)), linear.bias.copy_(torch.randn(n, generator=g))
    return linear, g


@pytest.mark.parametrize("bf16, amx", [(True, True), (True, False), (False, False)])
def test_bf16_prompts_take_torchs_bf16_gemm_only_with_amx(monkeypatch, bf16, amx):
    """torch's bf16 GEMM wins only with AMX tiles: with AVX512-BF16 alone it was slower than float32 GEMMs over
    the weight widened block by block (2-core Xeon: 705 against 534 ms for 512 rows of a 27392x4096 weight).
    bf16 stays the CPU's 'auto' dtype wherever bf16 is native (decoding reads half the bytes)."""
    from model.loading import pick_dtype
    monkeypatch.setattr(kernels, "native_bf16", lambda: bf16)
    monkeypatch.setattr(kernels, "_amx", lambda: amx)
    assert kernels.native_bf16_gemm() == (bf16 and amx)
    assert kernels.gemm_dtype(torch.bfloat16) == (torch.bfloat16 if bf16 and amx else torch.float32)
    assert pick_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if bf16 else torch.float32)
    monkeypatch.setattr(kernels, "decode_rows", lambda: 4)  # 20 rows: a prompt
    linear, g = _bf16_linear(64, 48, seed=3)
    works, blocked = [], kernels.blocked_gemm
    monkeypatch.setattr(kernels, "blocked_gemm", lambda *a: works.append(a[3]) or blocked(*a))
    x = torch.randn(20, 64, generator=g).bfloat16()
    with torch.inference_mode():
        y = linear(x)
    assert works == ([] if bf16 and amx else [torch.float32])
    exact = x.double() @ linear.weight.double().T + linear.bias.double()
    assert y.dtype == torch.bfloat16 and ((y.double() - exact).abs().max() / exact.abs().max()) < 1e-2


@native
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n,k", SHAPES)
def test_gemv_float32_is_a_float32_matmul(bits, n, k):
    q, scale, x, bias, exact = _case(bits, n, k, m=3)
    y = kernels.gemv_quantized(x, q, bits, scale, bias)
    ref = x @ dequantize_weight(q, scale, bits, torch.float32).T + bias
    assert _rel(y, exact) < 1e-6 and _rel(ref, exact) < 1e-6


@native
@pytest.mark.skipif(not kernels.has_integer_kernels(), reason="no integer-product kernels")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n,k", SHAPES)
def test_gemv_integer_path_is_finer_than_bf16(bits, n, k):
    """x rounded to 16 / 15 bits per row: far closer to exact than rounding x to bf16 (the model's dtype)."""
    q, scale, x, bias, exact = _case(bits, n, k, m=2, seed=1)
    y = kernels.gemv_quantized(x, q, bits, scale, bias, integer=True)
    bf16_input = x.bfloat16().double() @ dequantize_weight(q, scale, bits, torch.float64).T + bias.double()
    assert _rel(y, exact) < 2e-4
    assert _rel(y, exact) < _rel(bf16_input, exact)


@native
@pytest.mark.skipif(not kernels.has_bf16(), reason="no AVX512-BF16")
@pytest.mark.parametrize("n,k", SHAPES)
def test_gemv_bf16_forms_the_bf16_products(n, k):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(3, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g)
    exact = x.double() @ w.double().T + bias.double()
    assert _rel(kernels.gemv_bf16(x, w, bias), exact) < 1e-6


@native
@pytest.mark.parametrize("integer", [False, True], ids=["float", "integer"])
@pytest.mark.parametrize("bits", [8, 4, 16])
def test_gemv_gives_each_row_the_same_bits_alone_or_in_a_batch(bits, integer):
    """Batched decoding must not change a sequence's numbers: row i of a batch of up to decode_rows() rows
    equals row i computed alone, for every weight format and both product kinds."""
    if integer and (bits == 16 or not kernels.has_integer_kernels()):
        pytest.skip("no integer products for this case")
    if bits == 16 and not kernels.has_bf16():
        pytest.skip("no native bf16 kernel")
    m = max(kernels.decode_rows(), 1)
    g = torch.Generator().manual_seed(7)
    w, x, bias = torch.randn(301, 4098, generator=g), torch.randn(m, 4098, generator=g), torch.randn(301, generator=g)
    if bits == 16:
        w, x = w.bfloat16(), x.bfloat16()
        run = lambda rows: kernels.gemv_bf16(rows, w, bias)  # noqa: E731
    else:
        q, scale = quantize_weight(w, bits)
        run = lambda rows: kernels.gemv_quantized(rows, q, bits, scale.float(), bias, integer)  # noqa: E731
    batch = run(x)
    for i in range(m):
        assert torch.equal(run(x[i:i + 1].contiguous())[0], batch[i]), f"row {i} of {m}"
    for lo, hi in ((1, 3), (2, m)):  # other batch sizes and offsets within the batch
        assert torch.equal(run(x[lo:hi].contiguous()), batch[lo:hi])


GEMV_KINDS = {  # name: (weight format, integer products, tolerance against the exact product)
    "q8": (8, False, 1e-6), "q4": (4, False, 1e-6), "q8 integer": (8, True, 2e-4), "q4 integer": (4, True, 2e-4),
    "bf16": (16, False, 1e-6)}


def _gemv_case(kind: str, n: int, k: int, m: int, seed: int):
    """For a GEMV_KINDS kind (skipped where its kernel is absent): random x [m, k] in the kernel's input dtype,
    run(rows) multiplying rows of x by a random n x k weight in that format (with a bias), and the exact
    product of x (float64)."""
    bits, integer, _ = GEMV_KINDS[kind]
    if integer and not kernels.has_integer_kernels():
        pytest.skip("no integer-product kernels")
    if bits == 16 and not kernels.has_bf16():
        pytest.skip("no native bf16 kernel")
    g = torch.Generator().manual_seed(seed)
    w, x, bias = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    if bits == 16:
        w, x = w.bfloat16(), x.bfloat16()
        return x, lambda rows: kernels.gemv_bf16(rows, w, bias), x.double() @ w.double().T + bias.double()
    q, scale = quantize_weight(w, bits)
    exact = x.double() @ dequantize_weight(q, scale, bits, torch.float64).T + bias.double()
    return x, lambda rows: kernels.gemv_quantized(rows, q, bits, scale, bias, integer), exact


@native
@pytest.mark.parametrize("kind", GEMV_KINDS)
def test_gemv_every_batch_size_up_to_16(kind):
    """A server decodes up to 16 sequences together through these kernels (AMX tiles of 16 weight rows x up to 16
    rows of x where the CPU has AMX): every batch size 1-16 must give the exact product within the kernel's
    tolerance, and every row the bits it gets alone. 50 x 2600: whole tiles plus 2 rows, two passes of the
    integer batch tiles (the second a short one), and a tail of K in every format (int8: 40 columns past the
    64-column steps, int4: 40, bf16: 8 past 32). The float kernels' float32 sums over 2600 columns are held
    to 3e-6."""
    n, tol = 50, max(GEMV_KINDS[kind][2], 3e-6)
    x, run, exact = _gemv_case(kind, n, 2600, 16, seed=8)
    alone = [run(x[i:i + 1].contiguous())[0] for i in range(16)]
    for m in range(1, 17):
        y = run(x[:m].contiguous())
        assert y.shape == (m, n) and _rel(y, exact[:m]) < tol, f"batch of {m}"
        for i in range(m):
            assert torch.equal(y[i], alone[i]), f"row {i} of a batch of {m}"


@native
@pytest.mark.parametrize("kind", GEMV_KINDS)
def test_gemv_a_row_with_nan_or_inf_gives_no_finite_output_and_leaves_the_others(kind):
    """A NaN or an infinity in a row of x leaves none of that row's outputs finite, as in a float matmul (the
    integer kernels, which quantize each row by its largest value and would turn it into garbage integers, give
    NaN), and the other rows of the batch keep their bits. 1100 columns: bad values in the vector part and in
    the tail."""
    x, run, _ = _gemv_case(kind, 37, 1100, 5, seed=9)
    integer = GEMV_KINDS[kind][1]
    clean = run(x)
    bad = x.clone()
    bad[1, 5], bad[3, 1099], bad[4, 700] = float("nan"), float("inf"), float("-inf")
    y = run(bad)
    assert not y[[1, 3, 4]].isfinite().any()
    assert y[1].isnan().all() and (not integer or y[[3, 4]].isnan().all())
    assert torch.equal(y[[0, 2]], clean[[0, 2]])


@native
@pytest.mark.parametrize("mode", ["int4", "int8", "bf16"])
def test_a_decoding_batch_of_16_takes_the_gemv_kernels(mode, monkeypatch):
    """The model's linears send a batch of up to 16 sequences through the matrix-vector kernels on every build,
    never through the GEMM route, which first writes the whole layer out de-quantized (or widened). AVX-512
    CPUs without AMX used to send 5-16 rows that way: 3-4x slower per decoding step for int4."""
    if mode == "bf16" and not kernels.has_bf16():
        pytest.skip("no native bf16 kernel")
    assert kernels.decode_rows() == 16
    linear, g = _bf16_linear(96, 40, seed=9)
    layer = linear if mode == "bf16" else QuantizedLinear.from_linear(linear, {"int8": 8, "int4": 4}[mode])
    calls, kernel = [], kernels.linear_bf16io
    monkeypatch.setattr(kernels, "linear_bf16io", lambda x, *a, **k: calls.append(x.shape[0]) or kernel(x, *a, **k))
    monkeypatch.setattr(kernels, "blocked_gemm", lambda *a, **k: pytest.fail("the GEMM route for a decoding batch"))
    x = torch.randn(16, 1, 96, generator=g).bfloat16()
    with torch.inference_mode():
        batch = layer(x)
        assert calls == [16]
        for i in (0, 7, 15):  # and each row as alone
            assert torch.equal(layer(x[i:i + 1]), batch[i:i + 1])


@native
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n,k", [(37, 70), (13, 34), (130, 4096)])
def test_native_dequantize_is_exact(bits, n, k):
    q, scale, *_ = _case(bits, n, k, m=1)
    ref = dequantize_weight(q, scale, bits, torch.float32)
    assert torch.equal(kernels.dequantize(q, bits, scale, k, torch.float32), ref)
    assert torch.equal(kernels.dequantize(q, bits, scale, k, torch.bfloat16), ref.bfloat16())


# (what to change, how, the exception and the start of its message) for wrong arguments; each one would
# otherwise reach C, which reads and writes through raw pointers with the sizes it is given.
BAD_GEMV_ARGUMENTS = {
    "x float64": ("x", lambda a: a["x"].double(), TypeError, "x must be torch.float32, got torch.float64"),
    "x 1-d": ("x", lambda a: a["x"][0], ValueError, "x must have shape [M, K]"),
    "x on another K": ("x", lambda a: torch.randn(2, 36), ValueError, "weight must have shape"),
    "x not contiguous": ("x", lambda a: torch.randn(34, 2).t(), ValueError, "x must be contiguous"),
    "weight float32": ("weight", lambda a: a["weight"].float(), TypeError, "weight must be torch.int8"),
    "scale float16": ("scale", lambda a: a["scale"].half(), TypeError, "scale must be torch.float32"),
    "scale too short": ("scale", lambda a: a["scale"][:-1], ValueError, "scale must have shape [N] = [12]"),
    "scale strided": ("scale", lambda a: a["scale"].repeat_interleave(2)[::2], ValueError,
                      "scale must be contiguous"),
    "bias bf16": ("bias", lambda a: a["bias"].bfloat16(), TypeError, "bias must be torch.float32"),
    "bias too long": ("bias", lambda a: torch.randn(13), ValueError, "bias must have shape [N] = [12]"),
    "bits 2": ("bits", lambda a: 2, ValueError, "bits must be 4 or 8, got 2"),
    "bits '8'": ("bits", lambda a: "8", ValueError, "bits must be 4 or 8"),
}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("case", BAD_GEMV_ARGUMENTS)
def test_gemv_rejects_wrong_arguments(bits, case):
    q, scale, x, bias, _ = _case(bits, 12, 34, m=2)
    args = dict(x=x, weight=q, bits=bits, scale=scale, bias=bias)
    name, change, error, message = BAD_GEMV_ARGUMENTS[case]
    args[name] = change(args)
    with pytest.raises(error, match=re.escape(message)):
        kernels.gemv_quantized(**args)


def test_gemv_int4_rejects_an_odd_k():
    """Two int4 columns a byte: an odd K has no packed layout, and the kernels would read past x's rows."""
    with pytest.raises(ValueError, match="K must be even, got K=35"):
        kernels.gemv_quantized(torch.randn(2, 35), torch.zeros(12, 17, dtype=torch.int8), 4, torch.ones(12), None)


@pytest.mark.parametrize("change, error, message", [
    (dict(x=torch.randn(2, 34)), TypeError, "x must be torch.bfloat16"),
    (dict(weight=torch.randn(12, 34)), TypeError, "weight must be torch.bfloat16"),
    (dict(x=torch.randn(2, 36).bfloat16()), ValueError, "weight must have shape"),
    (dict(bias=torch.randn(12).bfloat16()), TypeError, "bias must be torch.float32"),
    (dict(bias=torch.randn(11)), ValueError, "bias must have shape"),
], ids=["x float32", "weight float32", "K mismatch", "bias bf16", "bias short"])
def test_gemv_bf16_rejects_wrong_arguments(change, error, message):
    args = dict(x=torch.randn(2, 34).bfloat16(), weight=torch.randn(12, 34).bfloat16(), bias=torch.randn(12))
    args.update(change)
    with pytest.raises(error, match=re.escape(message)):
        kernels.gemv_bf16(**args)


@pytest.mark.parametrize("change, error, message", [
    (dict(weight=torch.zeros(12, 34)), TypeError, "weight must be torch.int8"),
    (dict(scale=torch.ones(12, dtype=torch.float16)), TypeError, "scale must be torch.float32"),
    (dict(scale=torch.ones(11)), ValueError, "scale must have shape"),
    (dict(in_features=36), ValueError, "weight must have shape"),
    (dict(bits=2), ValueError, "bits must be 4 or 8"),
    (dict(dtype=torch.float64), TypeError, "dtype must be torch.bfloat16 or torch.float32"),
    (dict(in_features=-2), ValueError, "in_features must be"),
    (dict(bits=4, weight=torch.zeros(12, 17, dtype=torch.int8), in_features=35), ValueError, "K must be even"),
    (dict(out=torch.empty(12, 34, dtype=torch.bfloat16)), TypeError, "out must be torch.float32"),
], ids=["weight float32", "scale float16", "scale short", "K mismatch", "bits 2", "dtype float64",
        "negative K", "int4 odd K", "out of another dtype"])
def test_dequantize_rejects_wrong_arguments(change, error, message):
    args = dict(weight=torch.zeros(12, 34, dtype=torch.int8), bits=8, scale=torch.ones(12), in_features=34,
                dtype=torch.float32)
    args.update(change)
    with pytest.raises(error, match=re.escape(message)):
        kernels.dequantize(**args)


def _layer(bits, n=48, k=96, dtype=torch.float32):
    g = torch.Generator().manual_seed(4)
    linear = torch.nn.Linear(k, n, bias=True).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g))
        linear.bias.copy_(torch.randn(n, generator=g))
    return QuantizedLinear.from_linear(linear, bits)


def _reference(layer, x):
    w = dequantize_weight(layer.weight, layer.weight_scale, layer.bits, torch.float64)
    return x.double() @ w.T + layer.bias.double()


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tokens", [1, 3, 9, 20])  # decode-sized and prompt-sized inputs take different kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks", ["one", "several"])  # prompts: the weight made whole, or 64 rows at a time
def test_quantized_linear_every_path(monkeypatch, use_native, bits, tokens, dtype, blocks):
    if use_native and not kernels.available():
        pytest.skip("native kernels unavailable")
    if not use_native:
        monkeypatch.setattr(kernels, "available", lambda: False)
    if blocks == "several":
        monkeypatch.setattr(kernels, "GEMM_BLOCK_BYTES", 1)  # blocks of 64 output rows: 3, the last short
    layer = _layer(bits, n=150, dtype=dtype)
    x = torch.randn(2, tokens, layer.in_features, generator=torch.Generator().manual_seed(5)).to(dtype)
    y = layer(x)
    assert y.shape == (2, tokens, layer.out_features) and y.dtype == dtype
    assert y.is_contiguous()  # a strided result costs every consumer a copy (attention's bmm: one per head)
    exact = _reference(layer, x.reshape(-1, layer.in_features)).reshape(y.shape)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the output rounding alone is 2^-9 relative
    assert _rel(y, exact) < tol


def _spy_int4pack(monkeypatch):
    """Counts of torch's int4 packed product and repack, the real ops still run."""
    calls = {"mm": 0, "convert": 0}
    mm, convert = torch.ops.aten._weight_int4pack_mm_for_cpu, torch.ops.aten._convert_weight_to_int4pack_for_cpu

    def spy_mm(*args):
        calls["mm"] += 1
        return mm(*args)

    def spy_convert(*args):
        calls["convert"] += 1
        return convert(*args)

    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", spy_mm)
    monkeypatch.setattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", spy_convert)
    return calls


@pytest.mark.parametrize("dtype,tokens", [(torch.float32, 1), (torch.float32, 4), (torch.bfloat16, 1),
                                          (torch.bfloat16, 9), (torch.bfloat16, 48)])
def test_int4_without_native_kernels_uses_torchs_packed_product(monkeypatch, caplog, dtype, tokens):
    """No native kernels: int4 goes through _weight_int4pack_mm_for_cpu on weights repacked once (not the
    whole-matrix de-quantization per call, ~200x slower), with the de-quantized reference's results."""
    import logging

    from model import quantization

    if not quantization.int4pack_available():
        pytest.skip("this torch has no _weight_int4pack_mm_for_cpu")
    monkeypatch.setattr(kernels, "available", lambda: False)
    monkeypatch.setattr(quantization, "_logged", set())
    calls = _spy_int4pack(monkeypatch)
    layer = _layer(4, n=48, k=96, dtype=dtype)
    g = torch.Generator().manual_seed(6)
    with caplog.at_level(logging.INFO, logger="model.quantization"):
        for _ in range(3):
            x = torch.randn(tokens, layer.in_features, generator=g).to(dtype)
            y = layer(x)
            assert y.shape == (tokens, layer.out_features) and y.dtype == dtype
            assert _rel(y, _reference(layer, x)) < (1e-5 if dtype == torch.float32 else 2e-2)
    assert calls == {"mm": 3, "convert": 1}  # repacked once, kept on the layer
    assert "_weight_int4pack_mm_for_cpu" in caplog.text
    packed = layer.__dict__["_int4pack_cache"]["packed"]
    assert packed.numel() * packed.element_size() == layer.weight.numel()  # as packed as the stored weight


def test_int4_packed_product_follows_a_changed_weight(monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: False)
    layer = _layer(4, dtype=torch.bfloat16)
    x = torch.randn(2, layer.in_features).to(torch.bfloat16)
    layer(x)
    with torch.no_grad():
        layer.weight.copy_(layer.weight.flip(0))
        layer.weight_scale.mul_(2)
    assert _rel(layer(x), _reference(layer, x)) < 2e-2


def test_int4_repacking_in_row_chunks_equals_one_whole_matrix_call(monkeypatch):
    from model import quantization

    if not quantization.int4pack_available():
        pytest.skip("this torch has no _weight_int4pack_mm_for_cpu")
    monkeypatch.setattr(quantization, "INT4PACK_CHUNK_ROWS", 64)  # 112 rows: a full block and a tail
    layer = _layer(4, n=112, k=64)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        unpack_int4(layer.weight).to(torch.int32) + 8, quantization._INT4PACK_INNER_K_TILES)
    assert torch.equal(quantization._int4pack_weight(layer.weight), whole)


@pytest.mark.parametrize("case", ["shape", "missing op", "rows", "float16"])
def test_int4_falls_back_to_dequantizing_where_the_packed_product_does_not_fit(monkeypatch, case):
    from model import quantization

    monkeypatch.setattr(kernels, "available", lambda: False)
    calls = _spy_int4pack(monkeypatch) if quantization.int4pack_available() else {"mm": 0}
    dtype, n, tokens = torch.bfloat16, 48, 2
    if case == "shape":
        n = 40  # out_features % 16 != 0
    elif case == "missing op":
        monkeypatch.setattr(quantization, "int4pack_available", lambda: False)
    elif case == "rows":
        tokens = quantization.INT4PACK_MAX_ROWS + 1
    else:
        dtype = torch.float16
    layer = _layer(4, n=n, dtype=dtype)
    x = torch.randn(tokens, layer.in_features).to(dtype)
    assert _rel(layer(x), _reference(layer, x)) < 2e-2
    assert calls["mm"] == 0


def test_scale_cache_follows_the_parameter():
    layer = _layer(8)
    x = torch.randn(1, layer.in_features)
    before = layer(x)
    with torch.no_grad():
        layer.weight_scale.mul_(2)
        layer.bias.zero_()
    after = layer(x)
    torch.testing.assert_close(after, (before - _layer(8).bias) * 2, rtol=1e-5, atol=1e-4)


def test_layer_quantized_under_inference_mode_runs():
    """Parameters made under torch.inference_mode() have no version counter; the scale cache must cope."""
    linear = torch.nn.Linear(64, 24)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        layer = QuantizedLinear.from_linear(linear, 8)
        for rows in (x[:1], x):
            torch.testing.assert_close(layer(rows).double(), _reference(layer, rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("native", [True, False])
def test_a_state_dict_loaded_into_inference_tensors_reaches_the_kernels(monkeypatch, bits, native):
    """Tensors made under inference mode have no version counter, so the caches made from them (float32 scale
    and bias, torch's int4 packing) cannot see them change in place: loading a state dict must drop them."""
    if not native:
        monkeypatch.setattr(kernels, "library", lambda: None)
    x = torch.randn(3, 96).bfloat16()
    with torch.inference_mode():
        layer, other = _layer(bits, dtype=torch.bfloat16), _layer(bits, dtype=torch.bfloat16)
        for name in ("weight", "weight_scale", "bias"):  # as a model loaded under inference mode holds them
            getattr(layer, name).data = getattr(layer, name).detach().clone()
        assert layer.weight_scale.is_inference()
        other.weight_scale.mul_(3)
        other.bias.add_(1)
        layer(x)  # fills the caches
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), other(x))


@pytest.mark.parametrize("tokens", [1, 4, 7, 17, 40])  # matrix-vector kernel; GEMM (blocked where no native bf16)
def test_bf16_linear_matches_torch(tokens, monkeypatch):
    monkeypatch.setattr(kernels, "GEMM_BLOCK_BYTES", 1)  # blocks of 64 output rows: 3 blocks, the last short
    g = torch.Generator().manual_seed(6)
    layer = Linear(200, 150, bias=True).to(torch.bfloat16)
    x = torch.randn(tokens, 200, generator=g).bfloat16()
    with torch.inference_mode():
        ours = layer(x)
    theirs = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert ours.dtype == torch.bfloat16 and ours.is_contiguous()
    # equal up to summation order, then one bf16 rounding each
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-2, atol=1e-2)


# ---- float32 linears: the AVX2 few-row kernel and oneDNN ---------------------------------------------
f32_native = pytest.mark.skipif(kernels.f32_library() is None, reason="no AVX2 float32 kernel on this CPU")


def test_f32_kernel_builds_on_avx2_cpus_without_avx512():
    if not os.environ.get("CI"):
        pytest.skip("CI unset: elsewhere a missing compiler is allowed (the model falls back to torch)")
    if not _cpu_has("avx2", "fma") or (_cpu_has("avx512f") and os.environ.get("CHATGLM_NATIVE_KERNELS") != "avx2"):
        pytest.skip("this run does not use the AVX2 build")
    assert kernels.f32_library() is not None


@f32_native
@pytest.mark.parametrize("change, error, message", [
    (dict(weight=torch.randn(12, 36)), ValueError, "weight must have shape"),
    (dict(weight=torch.randn(12, 34).double()), TypeError, "weight must be torch.float32"),
    (dict(bias=torch.randn(12).double()), TypeError, "bias must be torch.float32"),
    (dict(bias=torch.randn(13)), ValueError, "bias must have shape"),
], ids=["K mismatch", "weight float64", "bias float64", "bias long"])
def test_f32_kernel_rejects_wrong_arguments(change, error, message):
    args = dict(x=torch.randn(2, 34), weight=torch.randn(12, 34), bias=torch.randn(12))
    args.update(change)
    with pytest.raises(error, match=re.escape(message)):
        kernels.linear_f32(**args)


@f32_native
@pytest.mark.parametrize("n,k", SHAPES + [(5, 3)])
@pytest.mark.parametrize("m", [1, 2, 3, 7, 16])
def test_f32_kernel_equals_a_float64_matmul(n, k, m):
    g = torch.Generator().manual_seed(n * k + m)
    w, x, bias = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    exact = x.double() @ w.double().T + bias.double()
    y = kernels.linear_f32(x, w, bias)
    assert y.shape == (m, n) and _rel(y, exact) < 1e-5
    assert _rel(kernels.linear_f32(x, w, None), exact - bias.double()) < 1e-5


@f32_native
def test_f32_kernel_gives_each_row_the_same_bits_alone_or_in_a_batch():
    """Batched decoding must not change a sequence's numbers: row i of a batch equals row i computed alone."""
    g = torch.Generator().manual_seed(1)
    w, x, bias = torch.randn(300, 520, generator=g), torch.randn(13, 520, generator=g), torch.randn(300, generator=g)
    batch = kernels.linear_f32(x, w, bias)
    for i in range(13):
        assert torch.equal(kernels.linear_f32(x[i:i + 1], w, bias)[0], batch[i])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("native", [True, False])
def test_the_last_tokens_slice_is_multiplied_without_copying_the_weight(monkeypatch, dtype, native):
    """The output layer gets hidden[:, -1:], a [1, 1, K] view of the whole prompt's states. torch's matmul
    of such a view (batch stride T * K) copied the weight into a batched product on every call: 2.2 s for the
    65024x4096 bf16 output layer of a 6B model, once per prompt, on CPUs without the native kernels (and on a
    GPU a transient copy of it). Linear multiplies its 2-D view instead: no bmm, no weight-sized copy, the
    same numbers; also on torch's own path (as on a GPU: here in float16, which has no CPU route of ours)."""
    if not native:
        monkeypatch.setattr(kernels, "library", lambda: None)  # as CHATGLM_NATIVE_KERNELS=0
    # as the loaded output layer: no bias, no gradient (torch folds the view when either is there)
    layer = Linear(64, 96, bias=False, dtype=dtype).requires_grad_(False)
    hidden = torch.randn(1, 30, 64, dtype=dtype)
    last = hidden[:, -1:]
    with torch.inference_mode(), torch.profiler.profile() as profile:  # sees inside aten::linear
        y = layer(last)
    assert y.shape == (1, 1, 96)
    ops = {event.name for event in profile.events()}
    assert not ops & {"aten::bmm", "aten::clone"}, ops  # the batched product over a copy of the weight
    with torch.inference_mode():
        expected = torch.nn.functional.linear(last.reshape(1, 64).float(), layer.weight.float())
    torch.testing.assert_close(y.reshape(1, 96).float(), expected, atol=2e-2, rtol=2e-2)


def test_float32_linear_paths_agree_with_torch():
    """Linear's float32 CPU routes (AVX2 kernel for few rows, oneDNN, or plain F.linear) give F.linear's result."""
    layer = Linear(96, 40)
    with torch.no_grad():
        layer.weight.normal_(), layer.bias.normal_()
    for rows in (1, 5, 16, 17, 64):
        x = torch.randn(2, rows, 96)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias),
                                       atol=1e-4, rtol=1e-5)
    if kernels.onednn_linear_enabled():
        x = torch.randn(33, 96)
        torch.testing.assert_close(kernels.onednn_linear(x, layer.weight.detach(), layer.bias.detach()),
                                   torch.nn.functional.linear(x, layer.weight.detach(), layer.bias.detach()),
                                   atol=1e-4, rtol=1e-5)


# ---- the bf16 glue between the matrix products (kernels_glue.h) -----------------------------------------

def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bf16 bits, -0.0 and 0.0 apart, NaN equal to NaN (torch's own NaN bits vary with its code path)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(_bits(a[~nan]), _bits(b[~nan]))


@native
@pytest.mark.parametrize("rows", [1, 3, 9])  # 9: split over the threads
def test_glue_rotary_equals_apply_rotary(rows):
    from model.modeling import apply_rotary

    g = torch.Generator().manual_seed(11)
    heads, groups, d, pairs = 6, 2, 16, 4  # q heads, k heads (rotated), v heads (not)
    qkv = (torch.randn(rows, (heads + 2 * groups) * d, generator=g) * 3).bfloat16()
    qkv[0, :3] = torch.tensor([float("inf"), float("nan"), -0.0])
    cos, sin = (torch.randn(rows, pairs, generator=g).bfloat16() for _ in range(2))
    ours = qkv.clone()
    kernels.rotary_bf16_(ours, heads + groups, d, cos, sin)
    per_head = qkv.view(rows, heads + 2 * groups, d).transpose(0, 1)[None]  # (1, heads, T, d)
    want = apply_rotary(per_head, cos[None, None], sin[None, None])[0].transpose(0, 1).reshape(rows, -1)
    rotated = (heads + groups) * d
    assert _same_bits(ours[:, :rotated], want[:, :rotated])
    assert torch.equal(_bits(ours[:, rotated:]), _bits(qkv[:, rotated:]))  # the values are left alone
    with pytest.raises(ValueError, match="do not fit"):
        kernels.rotary_bf16_(ours, heads + 2 * groups + 1, d, cos, sin)


@native
@pytest.mark.parametrize("rows", [1, 2, 8])
def test_glue_silu_times_b_equals_torch(rows):
    g = torch.Generator().manual_seed(12)
    n = 1000
    ab = torch.randn(rows, 2 * n, generator=g) * torch.tensor([1.0, 8.0, 40.0]).repeat_interleave(n * 2 // 3 + 1)[:2 * n]
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 87.0, -87.5, 88.8, -88.8, 100.0, -100.0, float("inf"),
                            float("-inf"), 3.0, -3.0])
    ab[0, :len(special)] = special
    ab[0, n:n + len(special)] = special.flip(0)
    ab = ab.bfloat16()
    a, b = ab.chunk(2, dim=-1)
    want = torch.nn.functional.silu(a) * b
    ours = kernels.silu_mul_bf16(ab)
    assert ours.shape == (rows, n) and ours.dtype == torch.bfloat16
    assert _same_bits(ours, want)
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # each bf16 a
    for b in (1.0, -3.0):
        ab = torch.cat([every, torch.full_like(every, b)])[None]
        assert _same_bits(kernels.silu_mul_bf16(ab)[0], torch.nn.functional.silu(every) * b)


@native
def test_glue_rmsnorm_is_torchs_up_to_the_order_of_its_sum():
    from model.modeling import RMSNorm

    g = torch.Generator().manual_seed(13)
    norm = RMSNorm(4096 + 7, 1e-5, torch.bfloat16)  # a tail past the 16-wide partial sums
    with torch.no_grad():
        norm.weight.copy_(torch.randn(4096 + 7, generator=g))
    x = (torch.randn(2, 20, 4096 + 7, generator=g) * torch.logspace(-3, 3, 20)[:, None]).bfloat16()
    ours = kernels.rmsnorm_bf16(x, norm.weight, 1e-5)
    with torch.enable_grad():  # torch's ops (the glue is for inference only)
        want = norm(x).detach()
    assert ours.shape == x.shape and ours.dtype == torch.bfloat16
    ulps = (_bits(ours).int() - _bits(want).int()).abs()  # same sign: adjacent bf16 values differ by 1
    assert ulps.max() <= 1 and (ulps > 0).float().mean() < 1e-3
    for i in (0, 7, 19):  # a row alone: the same bits as in the batch (9+ rows run on several threads)
        assert torch.equal(kernels.rmsnorm_bf16(x[1, i:i + 1], norm.weight, 1e-5), ours[1, i:i + 1])


@native
@pytest.mark.parametrize("kind", ["int8", "int4", "int8 integer", "int4 integer", "bf16"])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_glue_bf16_in_and_out_linear_is_the_float_kernel_rounded(kind, m):
    g = torch.Generator().manual_seed(14)
    n, k = 37, 200
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g).bfloat16()
    x[0, 0] = float("nan") if m == 3 else x[0, 0]  # NaN in, NaN out (torch's 0x7fc0)
    bias = torch.randn(n, generator=g)
    if kind == "bf16":
        if not kernels.has_bf16():
            pytest.skip("no native bf16 kernel")
        weight, scale = w.bfloat16(), None
        want = kernels.gemv_bf16(x, weight, bias)
        code = 4
    else:
        bits, integer = (8 if kind.startswith("int8") else 4), kind.endswith("integer")
        if integer and not kernels.has_integer_kernels():
            pytest.skip("no integer products on this CPU")
        weight, scale = quantize_weight(w, bits)
        scale = scale.float()
        want = kernels.gemv_quantized(x.float(), weight, bits, scale, bias, integer)
        code = kernels.LINEAR_KINDS[bits, integer]
    ours = kernels.linear_bf16io(x, weight, code, scale, bias)
    assert ours.dtype == torch.bfloat16 and ours.shape == (m, n)
    assert _same_bits(ours, want.to(torch.bfloat16))
    with pytest.raises(ValueError, match="weight must have shape"):
        kernels.linear_bf16io(x[:, :-2].contiguous(), weight, code, scale, bias)
    with pytest.raises(ValueError, match="kind must be"):
        kernels.linear_bf16io(x, weight, 5, scale, bias)


@native
def test_glue_keeps_a_bf16_model_close_to_torchs_ops(monkeypatch):
    """A bf16 model with the glue against the same model with torch's ops for norms, rotary and SiLU * b (close,
    not equal: RMSNorm sums in another order): two sequences at different positions (each row its own rotary
    angles), read whole and then one token at a time on top of the cache."""
    from conftest import loaded
    from model.cache import KVCache

    model, tokenizer = loaded("chatglm3-tiny", "bfloat16")
    ids = torch.tensor([tokenizer.encode("Tell me a story about the weather in 北京 today, please.")] * 2)
    T = ids.shape[1]
    positions = torch.stack([torch.arange(T), torch.arange(T) + 7])  # row 1 as if 7 tokens came before

    def run():
        with torch.inference_mode():
            cache = KVCache.for_model(model.config, 2, model.dtype, "cpu", capacity=T + 3)
            out = [model.transformer(ids, positions, None, cache).logits.float()]
            for step in range(3):
                out.append(model.transformer(ids[:, step:step + 1], positions[:, -1:] + step + 1, None,
                                             cache).logits.float())
        return torch.cat(out, dim=1)

    calls = []
    for name in ("rmsnorm_bf16", "rotary_bf16_", "silu_mul_bf16"):
        fn = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    ours = run()
    assert {"rmsnorm_bf16", "rotary_bf16_", "silu_mul_bf16"} <= set(calls), "the glue did not run"
    monkeypatch.setattr(kernels, "glue_available", lambda: False)
    theirs = run()
    assert not torch.equal(ours[0], ours[1])  # the rows' positions differ, and so do their results
    torch.testing.assert_close(ours, theirs, atol=0.01 * theirs.abs().max().item(), rtol=0)


def test_glue_stays_off_where_torchs_ops_must_run(monkeypatch):
    """Autograd, other dtypes and devices, and a forced GPU code path (its tests run GPU branches on the CPU)."""
    from model.devices import FORCE_ENV
    from model.modeling import glue

    x = torch.ones(2, 4, dtype=torch.bfloat16)
    monkeypatch.setattr(kernels, "glue_available", lambda: True)
    with torch.inference_mode():
        assert glue(x)
        assert not glue(x.float()) and not glue(torch.ones(2, 4, dtype=torch.bfloat16, device="meta"))
        monkeypatch.setenv(FORCE_ENV, "cuda")
        assert not glue(x)
    monkeypatch.delenv(FORCE_ENV)
    with torch.enable_grad():
        assert not glue(x)
