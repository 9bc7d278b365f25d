"""Shared test helpers: OpenAI's reference CLIP code, imported from its file.

The reference is the `clip` package of `clip-anytorch` (pip install clip-anytorch==2.6.0 --no-deps).
We load its model.py and simple_tokenizer.py by path: `import clip` would run clip/__init__.py,
which needs torchvision, a dependency of nothing else here. A missing package fails the tests:
parity with OpenAI is what they check, so skipping would hide the check.
"""
import importlib.util
import os
import sys
import sysconfig

import pytest


def _reference_dir():
    for root in [sysconfig.get_paths()["purelib"], *sys.path]:
        folder = os.path.join(root, "clip")
        if os.path.isfile(os.path.join(folder, "model.py")):
            return folder
    pytest.fail("OpenAI's reference `clip` package is not installed: "
                "pip install clip-anytorch==2.6.0 --no-deps", pytrace=False)


def load_reference(module):
    """clip/<module>.py of OpenAI's package as a standalone module named openai_clip_<module>."""
    name = f"openai_clip_{module}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(_reference_dir(), f"{module}.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.fixture(scope="session")
def openai_model():
    return load_reference("model")


@pytest.fixture(scope="session")
def openai_tokenizer():
    return load_reference("simple_tokenizer")
