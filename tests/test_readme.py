"""The README's fork recipe and learner steps are code, so they are tested like code, as a reader
follows them: in a copy of the repository, each diff shown there is applied with `git apply`, the
forked model trains (a forward and a backward pass) and starts as CLIP, and the README's check
command runs green (in full for the first example; for the second, its tests that run the adapter)."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DIFFS = re.findall(r"```diff\n(.*?)```", README, flags=re.S)
EXAMPLES = {"TemporalConvAdapter": "M2-CLIP's temporal convolution", "FrameMixAdapter": "needs the frame count"}


def readme_block(marker):
    """The shell block right after `marker` in README.md."""
    found = re.search(re.escape(marker) + r"\s*```(?:bash|sh)\n(.+?)\n```", README, flags=re.S)
    assert found, f"README has no code block after {marker}"
    return found.group(1)


def test_readme_shows_two_fork_examples_each_one_class_and_one_line():
    assert len(DIFFS) == 2, "README should show two fork diffs"
    for diff, name in zip(DIFFS, EXAMPLES):
        changed = [line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        assert sum(line.startswith("-") for line in changed) == 1, f"{name}: the fork should change one line"
        assert [line for line in changed if line.startswith("+class ")] == [f"+class {name}(nn.Module):"]
        [removed] = [line for line in changed if line.startswith("-")]
        assert "# fork: your adapter here" in removed, f"{name}: the changed line is the marked one"


@pytest.fixture(scope="module", params=list(EXAMPLES))
def forked_repository(request, tmp_path_factory):
    """A copy of the repository's model code and tests with one README diff applied by `git apply`.
    (A reader who applied the fork to the repository itself runs this on the forked file: then the
    diff applies in reverse, and the copy is already the fork.)"""
    name = request.param
    diff = DIFFS[list(EXAMPLES).index(name)]
    folder = tmp_path_factory.mktemp(f"fork-{name}")
    shutil.copy(ROOT / "omniclip.py", folder / "omniclip.py")
    shutil.copytree(ROOT / "tests", folder / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "fork.diff").write_text(diff)
    already = subprocess.run(["git", "apply", "--reverse", "--check", "fork.diff"], cwd=folder,
                             capture_output=True).returncode == 0
    if not already:
        applied = subprocess.run(["git", "apply", "fork.diff"], cwd=folder, text=True, capture_output=True)
        assert applied.returncode == 0, f"the README's {name} diff no longer applies:\n{applied.stderr}"
    return name, folder


def test_readme_fork_trains_starts_as_clip_and_passes_the_check_command(forked_repository):
    name, folder = forked_repository
    spec = importlib.util.spec_from_file_location(f"forked_omniclip_{name}", folder / "omniclip.py")
    forked = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(forked)
    torch.manual_seed(0)
    config = forked.OmniCLIPConfig(**forked.ARCHITECTURES["tiny"], frames=4, spg=False)
    model = forked.OmniCLIP(config).train()
    adapters = [block.pta for block in model.blocks.values()]
    assert adapters and all(type(a).__name__ == name for a in adapters)
    assert model.adapter_name() == name                       # what a checkpoint of the fork records
    x, c = torch.randn(2, 4, 3, 64, 64), torch.randn(3, config.embed_dim)
    with torch.no_grad():                                     # it starts at zero: CLIP's frame average
        baseline = forked.FrameAverageCLIP(model.clip)(x, c).softmax(-1)
        torch.testing.assert_close(model(x, c).softmax(-1), baseline, atol=1e-5, rtol=1e-5)
    forked.video_loss(model(x, c), torch.tensor([0, 2])).backward()
    for param_name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, param_name
    assert all(any(p.grad.abs().sum() > 0 for p in a.parameters()) for a in adapters), f"{name} does not learn"
    macs = forked.analytic_macs(config, num_classes=3, adapter=adapters[0])
    assert macs[f"adapter:{name}"] > 0                        # counted on the real ops, named

    # The check command as written; for the second example, to save the suite's time, only the tests
    # that run the adapter (the whole model, the fusion, the cost model): the rest is the first's.
    command = readme_block("<!-- fork check -->") + " -p no:cacheprovider"
    if name != list(EXAMPLES)[0]:
        command += ' -m "model or cost or eq4"'
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    run = subprocess.run(command, shell=True, cwd=folder, env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"the README's check command fails on the {name} fork:\n{run.stdout[-6000:]}"


def test_readme_fork_check_command_runs_on_a_fresh_clone():
    """As written, the check command needs nothing a fresh clone lacks: the model tests on omniclip.py."""
    command = readme_block("<!-- fork check -->")
    assert command.startswith("python -m pytest") and "--impl=omniclip.py" in command
    for path in re.findall(r"tests/\S+\.py", command):
        assert (ROOT / path).is_file(), f"the README's check command names {path}, which does not exist"


def test_readme_learner_steps_run_as_written(tmp_path):
    """"To write a part yourself": the copy, the emptied function and the `-m eq7` run, as written,
    in a copy of the repository: Eq. (7)'s tests fail on the emptied forward, with its error."""
    block = re.search(r"To write a part yourself.*?```bash\n(.+?)\n```", README, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if not line.startswith("#")]
    copy, run_eq7, run_all = [c for c in commands if c]
    assert copy == "cp omniclip.py my_omniclip.py" and "ParallelTemporalAdapter.forward" in block
    assert run_eq7.startswith("python -m pytest --impl=my_omniclip.py") and "-m eq7" in run_eq7
    assert run_all == "python -m pytest --impl=my_omniclip.py"
    shutil.copy(ROOT / "omniclip.py", tmp_path / "omniclip.py")
    shutil.copytree(ROOT / "tests", tmp_path / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(copy, shell=True, cwd=tmp_path, check=True)
    mine = tmp_path / "my_omniclip.py"
    source = mine.read_text()
    forward = source[source.index("class ParallelTemporalAdapter"):source.index("class STAdapter")]
    body = forward[forward.index("    def forward(self, x, frames):"):]
    emptied = "    def forward(self, x, frames):\n        raise NotImplementedError\n\n\n"
    mine.write_text(source.replace(body, emptied))
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    run = subprocess.run(run_eq7 + " -p no:cacheprovider -q -rf --tb=line", shell=True, cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    failed = re.findall(r"^FAILED (\S+)", run.stdout, flags=re.M)
    assert run.returncode == 1 and failed, run.stdout[-3000:]
    assert "NotImplementedError" in run.stdout, run.stdout[-3000:]


def test_readme_shows_the_two_commands_that_ci_runs():
    for marker in ("<!-- command: demo -->", "<!-- command: test -->"):
        assert marker in README
        block = README.split(marker, 1)[1]
        assert re.match(r"\s*```(bash|sh)\n.+?\n```", block, flags=re.S), marker
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command demo" in ci and "readme_command test" in ci
