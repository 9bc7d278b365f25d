"""The README's worked fork example is code, so it is tested like code: the diff shown there is
applied to a copy of omniclip.py, and the patched model trains (a forward and a backward pass)."""
import importlib.util
import re
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_fork_example_applies_and_trains(tmp_path):
    diffs = re.findall(r"```diff\n(.*?)```", README, flags=re.S)
    assert len(diffs) == 1, "README should show exactly one fork diff"
    (tmp_path / "omniclip.py").write_text((ROOT / "omniclip.py").read_text())
    applied = subprocess.run(["git", "apply", "--verbose", "-"], cwd=tmp_path, input=diffs[0],
                             text=True, capture_output=True)
    assert applied.returncode == 0, f"the README's diff no longer applies:\n{applied.stderr}"

    spec = importlib.util.spec_from_file_location("forked_omniclip", tmp_path / "omniclip.py")
    forked = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(forked)
    torch.manual_seed(0)
    config = forked.OmniCLIPConfig(**forked.ARCHITECTURES["tiny"], frames=4)
    model = forked.OmniCLIP(config).train()
    adapters = [block.pta for block in model.blocks.values()]
    assert adapters and all(type(a).__name__ == "TemporalConvAdapter" for a in adapters)

    logits = model(torch.randn(2, 4, 3, 64, 64), torch.randn(3, config.embed_dim))
    forked.video_loss(logits, torch.tensor([0, 2])).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert all(a.conv.weight.grad is not None for a in adapters)
    # The new adapter starts at zero like the PTA: identity with frame-average CLIP still holds.
    assert all(torch.count_nonzero(a.up.weight) == 0 for a in adapters)


def test_readme_shows_the_two_commands_that_ci_runs():
    for marker in ("<!-- command: demo -->", "<!-- command: test -->"):
        assert marker in README
        block = README.split(marker, 1)[1]
        assert re.match(r"\s*```(bash|sh)\n.+?\n```", block, flags=re.S), marker
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command demo" in ci and "readme_command test" in ci
