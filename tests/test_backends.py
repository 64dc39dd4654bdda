"""The plan and the backends: one choice policy for every entry point, the reference backend's written-out
backward, one module for every environment switch, kernel modules that do not import the package back.

CPU tier; fast (no kernel runs here except the reference).
"""
import ast
import re
from pathlib import Path

import pytest
import torch

from helpers import LONG, SHORT, random_inputs
from scaled_rope import (BackendUnsupported, RopeScaling, apply_scaled_rope, explain_backend, reference,
                         scaled_rope_attention, scaled_rope_attention_with_kvcache)
from scaled_rope import _env, _plan

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "scaled_rope"
KERNELS = ROOT / "triton_kernels"


# ---- the reference backend's backward ----------------------------------------------------------------------------
CASES = {
    "longrope rows": dict(rope="longrope", q_positions="rows", causal=True),
    "gqa window logn": dict(rope="yarn", window=5, logn_base=3.0, causal=False),
    "rerope": dict(rope="default", rerope_window=4),
    "leaky rerope": dict(rope="yarn", rerope_window=4, rerope_leak=3.0, softmax_scale=-0.4),
    "no rope, empty rows": dict(rope=None, q_positions="negative"),
    "xpos interleaved, window, logn, empty rows": dict(rope="yarn", q_positions="negative", xpos_scale_base=0.5,
                                                       window=6, logn_base=3.0),
    "xpos longrope rows": dict(rope="longrope", q_positions="rows", xpos_scale_base=2.0),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("with_dlse", [False, True])
def test_reference_backward_equals_autograd(name, with_dlse):
    """reference.attention_backward (what the reference backend runs inside the custom ops) gives autograd's
    gradients of reference.attention, in float64, with and without a gradient on lse."""
    options = dict(CASES[name])
    rope = {"longrope": RopeScaling.longrope(16, 8, 64, SHORT[:8], LONG[:8], n_hat=2),
            "yarn": RopeScaling.yarn(16, 4.0, 8, rotary_dim=12, layout="interleaved"),
            "default": RopeScaling.default(16), None: None}[options.pop("rope")]
    q, k, v = random_inputs(2, 9, 11, 4, 2, 16, torch.float64, seed=3)
    positions = options.pop("q_positions", None)
    if positions == "rows":  # row 0 short, row 1 long
        options["k_positions"] = torch.arange(11)[None] + torch.tensor([[-4], [6]])
        options["q_positions"] = options["k_positions"][:, -9:]
    elif positions == "negative":  # the first queries sit before every key
        options["q_positions"] = torch.arange(9)[None].expand(2, 9) - 3
    g = torch.Generator().manual_seed(4)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    dlse = torch.randn(2, 4, 9, generator=g, dtype=torch.float64) if with_dlse else None
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out, lse = reference.attention(*leaves, rope, **options)
    loss = (out * dout).sum() + ((lse.double() * dlse).nan_to_num().sum() if with_dlse else 0)
    loss.backward()
    got = reference.attention_backward(q, k, v, rope, dout, None if dlse is None else dlse.float(), **options)
    for label, mine, want in zip(("dq", "dk", "dv"), got, (x.grad for x in leaves)):
        assert torch.allclose(mine, want, rtol=1e-6, atol=1e-9), (label, (mine - want).abs().max().item())


# ---- one choice policy ---------------------------------------------------------------------------------------------
def test_explicit_backends_that_cannot_run_raise_everywhere():
    """The same exception, naming why, from every entry point; it is both a NotImplementedError and a
    ValueError."""
    q, k, v = random_inputs(1, 3, 3, 2, 1, 32, torch.float64)
    rope = RopeScaling.default(32)
    calls = {
        "attention": lambda b: scaled_rope_attention(q, k, v, rope, backend=b),
        "kvcache": lambda b: scaled_rope_attention_with_kvcache(q, k, v, rope, cache_seqlens=torch.tensor([1]),
                                                                backend=b),
        "rotation": lambda b: apply_scaled_rope(q, rope, backend=b),
    }
    for name, call in calls.items():
        for backend, why in (("cuda", "CUDA|KV-cache"), ("triton", "float64")):
            with pytest.raises(BackendUnsupported, match=why) as info:
                call(backend)
            assert isinstance(info.value, NotImplementedError) and isinstance(info.value, ValueError), name
        assert call("reference") is not None
        with pytest.raises(ValueError, match="backend must be one of"):
            call("fastest")


def test_auto_falls_through_to_the_reference_and_says_why(monkeypatch):
    """On the CPU without the interpreter nothing but the reference runs; the switch is read at call time."""
    q = torch.empty(1, 1, 2, 32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    chosen, why = explain_backend(q)
    assert chosen == "reference" and set(why) == {"triton", "cuda"}
    assert "TRITON_INTERPRET" in why["triton"] and "CUDA" in why["cuda"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert explain_backend(q)[0] == ("triton" if _triton_installed() else "reference")
    assert explain_backend(q.double())[0] == "reference"


def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def test_plan_folds_the_scale_and_builds_tables_only_for_kernels():
    q, k, v = random_inputs(2, 4, 6, 2, 1, 32, torch.float32)
    rope = RopeScaling.longrope(32, 4, 64, SHORT[:16], LONG[:16])
    options = dict(causal=True, q_positions=None, k_positions=None, window=None, rerope_window=None,
                   rerope_leak=None, logn_base=None)
    plan = _plan.attention_plan(q, k, v, rope, softmax_scale=-0.25, backend="reference", **options)
    assert (plan.backend, plan.call.q_sign, plan.call.kernel_scale, plan.call.tables) == ("reference", -1.0, 0.25,
                                                                                         None)
    plan = _plan.attention_plan(q, k, v, None, softmax_scale=None, backend="reference", **options)
    assert plan.call.softmax_scale == 32 ** -0.5 and plan.call.q_sign == 1.0


# ---- environment switches ---------------------------------------------------------------------------------------
SWITCH = re.compile(r"\b(SCALED_ROPE_[A-Z0-9_]+|TRITON_INTERPRET)\b")
# files owned elsewhere that still read the environment themselves (to move onto scaled_rope._env)
READ_ELSEWHERE = {"python/scaled_rope/__main__.py"}


def _sources():
    return sorted(list(PACKAGE.rglob("*.py")) + list(KERNELS.glob("*.py")))


def test_only_the_env_module_reads_the_environment():
    readers = {str(path.relative_to(ROOT)) for path in _sources()
               if path.name != "_env.py" and re.search(r"os\.environ|getenv", path.read_text())}
    assert readers <= READ_ELSEWHERE, f"environment read outside scaled_rope/_env.py: {readers - READ_ELSEWHERE}"


def test_every_switch_is_spelled_out_in_the_env_module_and_the_readme():
    """grep finds each switch of the package in _env.py (no names built from parts); the README's table lists
    those, setup.py's build-time ones and the test suite's own."""
    env_text = (PACKAGE / "_env.py").read_text()
    in_env = set(SWITCH.findall(env_text))
    in_package = set()
    for path in _sources():
        in_package |= set(SWITCH.findall(path.read_text()))
    build_time = set(SWITCH.findall((ROOT / "setup.py").read_text()))
    assert in_package <= in_env | build_time, f"switches not in _env.py: {in_package - in_env - build_time}"
    built = [path.name for path in _sources() if re.search(r"SCALED_ROPE_[A-Z0-9_]*\{", path.read_text())]
    assert not built, f"switch names built from parts (f-strings) in {built}"
    in_tests = set()
    for path in sorted((ROOT / "tests").glob("*.py")):
        in_tests |= set(SWITCH.findall(path.read_text()))
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Environment switches", 1)[1].split("\n## ", 1)[0]
    table = {m for line in section.splitlines() if line.startswith("| `") for m in SWITCH.findall(line.split("|")[1])}
    assert table == in_env | build_time | in_tests


def test_switches_are_read_at_call_time(monkeypatch):
    monkeypatch.setenv("SCALED_ROPE_L2_SECTION_HEADS", "3")
    assert _env.l2_section_heads() == 3
    monkeypatch.setenv("SCALED_ROPE_L2_SECTION_HEADS", "0")
    with pytest.raises(ValueError, match="SCALED_ROPE_L2_SECTION_HEADS"):
        _env.l2_section_heads()
    monkeypatch.setenv("SCALED_ROPE_FWD_CONFIG", "16,32,4,1")
    assert _env.forced_config("fwd") == ("SCALED_ROPE_FWD_CONFIG", "16,32,4,1")
    monkeypatch.setenv("SCALED_ROPE_FLASH_SM80", "0")
    assert not _env.flash_sm80()
    monkeypatch.setenv("SCALED_ROPE_FLASH_SM80", "1")
    assert _env.flash_sm80()


# ---- kernel modules take plain tensors and numbers --------------------------------------------------------------
def test_kernel_modules_do_not_import_the_package_back():
    """triton_kernels/* and the CUDA launcher import, of the package, only the leaf modules _env and _alloc (and
    the launcher the extension _C)."""
    for path in list(KERNELS.glob("*.py")) + [PACKAGE / "_cuda.py"]:
        parent = 2 if path.parent == KERNELS else 1  # the level of a relative import that reaches scaled_rope
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == parent:
                names = [node.module] if node.module else [alias.name for alias in node.names]
                assert set(names) <= {"_env", "_alloc", "_C"}, (path.name, names)
