"""Isolation, proved: emptying one part of omniclip.py turns red only the tests that carry its marker.

A learner writes one part at a time (README, "Learn by tests"): with the others still empty, the
tests of the parts already written must stay green. So every model test carries the marker of each
part it runs, or replaces that part by a stand-in (tests/test_omniclip.py).

How this is checked, in one run of the model tests: a copy of omniclip.py where each part's
function starts with `if <part> is emptied: raise NotImplementedError`, tested as `--impl`; while a
test runs, every part it carries no marker for is emptied, all at once. A test that passes with all
of them empty passes with any one of them empty. (Tests that carry every part's marker have nothing
to empty and are left out.) This file tests the test suite, so it is not among the model tests that
`--impl` runs on your file.
"""
import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The parts a learner writes, the marker of each, and the function(s) that hold it in omniclip.py.
PARTS = {
    "eq1": ["OmniCLIP.embed_frames", "VisionTransformer.embed"],  # V^0 = X^0 + PE + TE
    "eq4": ["SpatialTemporalBlock.forward"],              # V^i = ViT(V) + alpha * PTA(V)
    "eq5": ["FrameAggregation.forward"],                  # F_V = Avg(MHA(F_1 .. F_T))
    "eq6": ["SelfPromptGenerator.forward"],               # R = Projector(Avg(V))
    "eq7": ["ParallelTemporalAdapter.forward"],           # PTA = Up(Attn(Down(V)))
    "eq8": ["cosine_logits"],                             # exp(s) * cos(F_V, c_hat)
    "eq9": ["video_loss"],                                # cross-entropy
    "prompts": ["VideoSpecificPrompt.forward", "VideoSpecificPrompt.project_patches"],
}

RUNNER = r'''
import json, sys
import pytest

PARTS, out = json.loads(sys.argv[1]), sys.argv[2]
failed = []


class EmptyTheOtherParts:
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        marks = {m.name for m in item.iter_markers()}
        sys.modules["omniclip"]._EMPTIED = set(PARTS) - marks

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(self, item):
        sys.modules["omniclip"]._EMPTIED = set()

    def pytest_runtest_logreport(self, report):
        if report.failed:
            emptied = sorted(sys.modules["omniclip"]._EMPTIED)
            failed.append(dict(test=report.nodeid, when=report.when, emptied=emptied,
                               error=str(report.longrepr).splitlines()[-1:]))


every = " and ".join(PARTS)
code = pytest.main(sys.argv[3:] + ["-m", f"not ({every})"], plugins=[EmptyTheOtherParts()])
json.dump(dict(code=int(code), failed=failed), open(out, "w"))
'''


def emptiable_copy(source):
    """omniclip.py with `if "<part>" in _EMPTIED: raise NotImplementedError(...)` as the first
    statement of each part's function."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    inserts = []
    for part, names in PARTS.items():
        for name in names:
            owner, _, function = name.rpartition(".")
            scope = tree.body
            if owner:
                scope = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == owner).body
            node = next(n for n in scope if isinstance(n, ast.FunctionDef) and n.name == function)
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and len(node.body) > 1:
                first = node.body[1]                        # after the docstring
            indent = " " * first.col_offset
            inserts.append((first.lineno - 1, f"{indent}if {part!r} in _EMPTIED:\n"
                                              f"{indent}    raise NotImplementedError('{part} emptied: {name}')\n"))
    for index, text in sorted(inserts, reverse=True):
        lines.insert(index, text)
    return "".join(lines) + "\n_EMPTIED = set()\n"


def test_emptying_a_part_turns_red_only_the_tests_marked_with_it(tmp_path):
    copy = tmp_path / "omniclip_emptiable.py"
    copy.write_text(emptiable_copy((ROOT / "omniclip.py").read_text()))
    runner, out = tmp_path / "runner.py", tmp_path / "failed.json"
    runner.write_text(textwrap.dedent(RUNNER))
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, str(runner), json.dumps(list(PARTS)), str(out), "-q", "-p", "no:cacheprovider",
         f"--impl={copy}", "tests/test_omniclip.py", "tests/test_variants.py", "tests/test_misreadings.py"],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.exists(), f"the isolation run did not finish:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert not result["failed"], (
        "tests that fail when a part they carry no marker for is emptied (mark them, or give them "
        "a stand-in):\n" + "\n".join(f"{f['test']} ({f['when']}), emptied {f['emptied']}: {f['error']}"
                                     for f in result["failed"]))
    assert result["code"] == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and "no tests ran" not in run.stdout, run.stdout[-2000:]


def test_an_emptied_part_does_turn_its_own_tests_red(tmp_path):
    """The emptying works: with Eq. (7) emptied, Eq. (7)'s check raises; with nothing emptied, it passes."""
    import importlib.util

    import pytest
    import test_omniclip

    copy = tmp_path / "omniclip_emptiable.py"
    copy.write_text(emptiable_copy((ROOT / "omniclip.py").read_text()))
    spec = importlib.util.spec_from_file_location("omniclip_emptiable", copy)
    oc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oc)
    oc._EMPTIED = {"eq7"}
    with pytest.raises(NotImplementedError, match="eq7 emptied: ParallelTemporalAdapter.forward"):
        test_omniclip.check_eq7_pta(oc, width=128)
    oc._EMPTIED = set()
    test_omniclip.check_eq7_pta(oc, width=128)
