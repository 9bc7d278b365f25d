"""The README's worked fork example is code, so it is tested like code: the diff shown there is
applied to a copy of omniclip.py, the patched model trains (a forward and a backward pass), and the
suite's own model tests run green on the forked file (`pytest --impl`), as they must for any fork
that keeps the public names."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def forked_file(tmp_path_factory):
    """omniclip.py with the README's fork diff applied, in a folder of its own."""
    diffs = re.findall(r"```diff\n(.*?)```", README, flags=re.S)
    assert len(diffs) == 1, "README should show exactly one fork diff"
    folder = tmp_path_factory.mktemp("fork")
    (folder / "omniclip.py").write_text((ROOT / "omniclip.py").read_text())
    # A reader who applied the fork to the repository itself runs this suite on the forked file:
    # then the diff applies in reverse, and the file under test is already the fork.
    already = subprocess.run(["git", "apply", "--reverse", "--check", "-"], cwd=folder,
                             input=diffs[0], text=True, capture_output=True).returncode == 0
    if not already:
        applied = subprocess.run(["git", "apply", "--verbose", "-"], cwd=folder, input=diffs[0],
                                 text=True, capture_output=True)
        assert applied.returncode == 0, f"the README's diff no longer applies:\n{applied.stderr}"
    changed = [line for line in diffs[0].splitlines()
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert sum(line.startswith("-") for line in changed) == 1, "the fork should change one line"
    assert sum(line.startswith("+class ") for line in changed) == 1, "the fork should add one class"
    return folder / "omniclip.py"


def test_readme_fork_example_applies_and_trains(forked_file):
    spec = importlib.util.spec_from_file_location("forked_omniclip", forked_file)
    forked = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(forked)
    torch.manual_seed(0)
    config = forked.OmniCLIPConfig(**forked.ARCHITECTURES["tiny"], frames=4)
    model = forked.OmniCLIP(config).train()
    adapters = [block.pta for block in model.blocks.values()]
    assert adapters and all(type(a).__name__ == "TemporalConvAdapter" for a in adapters)
    assert model.adapter_name() == "TemporalConvAdapter"   # what a checkpoint of the fork records

    logits = model(torch.randn(2, 4, 3, 64, 64), torch.randn(3, config.embed_dim))
    forked.video_loss(logits, torch.tensor([0, 2])).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert all(a.conv.weight.grad is not None for a in adapters)
    # The new adapter starts at zero like the PTA: identity with frame-average CLIP still holds.
    assert all(torch.count_nonzero(a.up.weight) == 0 for a in adapters)
    # The benchmark names the fork's adapter and counts it on the real ops, not as a PTA.
    macs = forked.analytic_macs(config, num_classes=3, adapter=adapters[0])
    assert "adapter:TemporalConvAdapter" in macs and macs["adapter:TemporalConvAdapter"] > 0


def test_the_suites_model_tests_pass_on_the_forked_file(forked_file):
    """Forks stay green: the equation and variant tests on the forked file. (The gallery of
    misreadings breaks the repository's own file whatever --impl says, so it has nothing to add.)"""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                          f"--impl={forked_file}", "tests/test_omniclip.py", "tests/test_variants.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert f"testing omniclip from {forked_file}" in run.stdout, run.stdout[-3000:]
    assert run.returncode == 0, f"model tests fail on the README's fork:\n{run.stdout[-6000:]}"


def test_readme_shows_the_two_commands_that_ci_runs():
    for marker in ("<!-- command: demo -->", "<!-- command: test -->"):
        assert marker in README
        block = README.split(marker, 1)[1]
        assert re.match(r"\s*```(bash|sh)\n.+?\n```", block, flags=re.S), marker
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command demo" in ci and "readme_command test" in ci
