"""The CUDA source of the CuPy kernels compiles, on the host, for the GPUs we target.

NVRTC runs without a driver or a device (``cuda-bindings`` and the ``nvidia-cuda-nvrtc-cu12``
wheel, both in the ``dev`` extra), so a kernel that does not compile fails here, on every
machine, rather than at its first launch on a GPU. The options are the ones CuPy compiles
with: the module's ``OPTIONS``, then ``-ftz=true`` (CuPy appends it; the last occurrence wins),
then the architecture.
"""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import pytest
from mpiopt.kernels._gpu_source import OPTIONS, SOURCE

ROOT = Path(__file__).resolve().parents[2]
ARCHS = ("compute_80", "compute_90")  # A100, H100/H200

try:
    from cuda.bindings import nvrtc
except ImportError:
    nvrtc = None
    pytestmark = pytest.mark.skip(
        reason="cuda-bindings is not installed: pip install -e '.[dev]' (CI must have it)")


def _check(result) -> tuple:
    err, *rest = result
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, nvrtc.nvrtcGetErrorString(err)[1]
    return tuple(rest)


def _text(size_fn, get_fn, prog) -> str:
    (size,) = _check(size_fn(prog))
    buf = b" " * size
    _check(get_fn(prog, buf))
    return buf.rstrip(b"\0").decode()


def compile_ptx(arch: str, source: str = SOURCE) -> tuple[str, str, object]:
    """Compile ``source`` for ``arch``; return the log, the PTX and NVRTC's result."""
    (prog,) = _check(nvrtc.nvrtcCreateProgram(source.encode(), b"mpiopt_kernels.cu", 0, [], []))
    try:
        options = [o.encode() for o in (*OPTIONS, "-ftz=true", f"--gpu-architecture={arch}")]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        log = _text(nvrtc.nvrtcGetProgramLogSize, nvrtc.nvrtcGetProgramLog, prog)
        ptx = "" if result != nvrtc.nvrtcResult.NVRTC_SUCCESS else _text(
            nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX, prog)
        return log, ptx, result
    finally:
        _check(nvrtc.nvrtcDestroyProgram(prog))


def launched_names() -> list[str]:
    """Return every kernel name that kernels/gpu.py launches.

    A name is a literal; a local variable (each string assigned to it in the function); or an
    f-string whose fields call a function of gpu.py (each string that function returns).
    """
    tree = ast.parse((ROOT / "kernels" / "gpu.py").read_text())
    defs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    names = []
    for fn in defs.values():
        for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call)):
            if getattr(call.func, "id", None) == "_launch":
                names += _spellings(call.args[0], fn, defs)
    return names


def _strings(nodes) -> list[str]:
    return [c.value for node in nodes for c in ast.walk(node)
            if isinstance(c, ast.Constant) and isinstance(c.value, str)]


def _spellings(arg, fn, defs) -> list[str]:
    if isinstance(arg, ast.Constant):
        return [arg.value]
    if isinstance(arg, ast.Name):
        return _strings(a.value for a in ast.walk(fn) if isinstance(a, ast.Assign)
                        and any(getattr(t, "id", None) == arg.id for t in a.targets))
    assert isinstance(arg, ast.JoinedStr), f"unexpected kernel name: {ast.dump(arg)}"
    parts = []
    for p in arg.values:
        if isinstance(p, ast.Constant):
            parts.append([p.value])
        else:
            called = defs[p.value.func.id]  # a field must call a function of gpu.py
            parts.append(_strings(r.value for r in ast.walk(called)
                                  if isinstance(r, ast.Return)))
    return ["".join(combo) for combo in itertools.product(*parts)]


def test_every_launch_in_gpu_py_is_found():
    names = launched_names()
    assert {"pack_signs", "qsgd_dequant4", "qsgd_dequant", "lattice_encode_u8",
            "lattice_decode_u16"} <= set(names)


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_compile_with_nvrtc(arch):
    log, ptx, result = compile_ptx(arch)
    assert result == nvrtc.nvrtcResult.NVRTC_SUCCESS, log
    assert "error" not in log.lower(), log
    assert f".target sm_{arch.split('_')[1]}" in ptx
    entries = set(re.findall(r"\.entry\s+(\w+)\s*\(", ptx))
    missing = sorted(set(launched_names()) - entries)
    assert not missing, f"kernels launched by gpu.py but not in the PTX: {missing}"


def test_a_broken_kernel_fails_with_its_log():
    broken = SOURCE + '\nextern "C" __global__ void broken(float* y) { y[0] = undeclared; }\n'
    log, _, result = compile_ptx(ARCHS[0], broken)
    assert result != nvrtc.nvrtcResult.NVRTC_SUCCESS and "undeclared" in log
