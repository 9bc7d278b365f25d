"""Shared test helpers: equation markers, learner mode (`--impl`), OpenAI's reference CLIP code.

Learner mode: `python -m pytest --impl my_omniclip.py -m eq7` imports my_omniclip.py as the module
`omniclip` before any test is collected (so every `import omniclip` sees it), runs only the model
tests, and says at the top which file it tested.

The reference CLIP is the `clip` package of `clip-anytorch` (pip install clip-anytorch==2.6.0 --no-deps).
We load its model.py and simple_tokenizer.py by path: `import clip` would run clip/__init__.py,
which needs torchvision, a dependency of nothing else here. A missing package fails the tests:
parity with OpenAI is what they check, so skipping would hide the check.
"""
import importlib.util
import os
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_TEST_FILES = ("test_omniclip.py", "test_variants.py", "test_misreadings.py")
# The part of the paper each class or function of omniclip.py computes: an error raised in a
# learner's file is named by the part whose code raised it.
PART_OF_CODE = {"embed_frames": "eq1", "VisionTransformer": "eq1", "SpatialTemporalBlock": "eq4",
                "FrameAggregation": "eq5", "SelfPromptGenerator": "eq6", "ParallelTemporalAdapter": "eq7",
                "cosine_logits": "eq8", "video_loss": "eq9", "VideoSpecificPrompt": "prompts",
                "XCLIPPrompt": "prompts", "PromptBlock": "prompts"}
MARKERS = {
    "eq1": "Eq. (1): V0 = X0 + PE + TE, the temporal embedding",
    "eq2": "Eq. (2): V_s = ViT(V), the frozen CLIP layer",
    "eq3": "Eq. (3): V_t = PTA(V), the adapter beside it",
    "eq4": "Eq. (4): V = V_s + alpha * V_t, the fusion",
    "eq5": "Eq. (5): F_V = Avg(MHA(F_1..F_T)), frame aggregation",
    "eq6": "Eq. (6): R = Projector(Avg(V0)), the self-prompt generator",
    "eq7": "Eq. (7): PTA = Up(Attn(Down(V))) over time",
    "eq8": "Eq. (8): cosine logits",
    "eq9": "Eq. (9): the loss",
    "spg": "the options of Eq. (6): pooling, projector",
    "table7": "Table 7: PTA and SPG on/off",
    "table8": "Table 8: the temporal ratio",
    "table9": "Table 9: SPG pooling and projector",
    "table10": "Table 10: which layers get a PTA",
    "table11": "Table 11: how the adapter is connected",
    "prompts": "X-CLIP's video-specific text prompts (Sec. 3.1, 'following [26]')",
    "clip": "CLIP itself, written from scratch",
    "model": "whole-model properties that involve several equations",
    "cost": "multiply-adds: the cost model (analytic_macs) against torch's flop counter",
}


def pytest_addoption(parser):
    parser.addoption("--impl", metavar="PATH", default=None,
                     help="learner mode: test PATH as the module `omniclip` (only the model tests run)")


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    impl = config.getoption("--impl")
    if impl:
        path = os.path.abspath(impl)
        if not os.path.isfile(path):
            raise pytest.UsageError(f"--impl {impl}: no such file")
        spec = importlib.util.spec_from_file_location("omniclip", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["omniclip"] = module      # before collection: every `import omniclip` gets it
        spec.loader.exec_module(module)


def pytest_ignore_collect(collection_path, config):
    """In learner mode, collect only the model tests (the others test train.py, data.py, ...)."""
    if config.getoption("--impl") and collection_path.is_file():
        return collection_path.name not in MODEL_TEST_FILES
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """A model test that fails by an error other than an AssertionError (a RuntimeError from a shape
    mismatch in the file under test, its NotImplementedError) fails as an AssertionError naming the
    equations the test carries and the line of the tested file that raised it, the error chained
    below it with its own traceback."""
    outcome = yield
    error = outcome.excinfo[1] if outcome.excinfo else None
    if (not isinstance(error, Exception) or isinstance(error, AssertionError)
            or item.path.name not in MODEL_TEST_FILES or not hasattr(outcome, "force_exception")):
        return
    parts = [MARKERS[m.name] for m in item.iter_markers() if m.name in MARKERS]
    said = (f": {error}" if str(error)
            else " (not written yet)" if isinstance(error, NotImplementedError) else "")
    tested = os.path.abspath(getattr(sys.modules.get("omniclip"), "__file__", "") or "")
    where, raiser, tb = "", None, error.__traceback__
    while tb is not None:                                   # the innermost line of the file under test
        code = tb.tb_frame.f_code
        if os.path.abspath(code.co_filename) == tested:
            qualname = getattr(code, "co_qualname", code.co_name)
            where = f", raised in {os.path.basename(tested)} line {tb.tb_lineno} ({qualname})"
            raiser = next((PART_OF_CODE[n] for n in qualname.split(".") if n in PART_OF_CODE), raiser)
        tb = tb.tb_next
    equations = "; ".join(dict.fromkeys(parts)) or item.name
    if raiser is not None:                                  # the part whose code raised
        equations = MARKERS[raiser] + ("" if MARKERS[raiser] in parts else f" (in a test of {equations})")
    named = AssertionError(f"{equations}: {type(error).__name__}{said}{where}")
    named.__cause__ = error
    outcome.force_exception(named)


def pytest_report_header(config):
    impl = config.getoption("--impl")
    if impl:
        return f"testing omniclip from {os.path.abspath(impl)} (learner mode: model tests only)"
    spec = importlib.util.find_spec("omniclip")
    return f"testing omniclip from {spec.origin if spec else 'nowhere: omniclip is not importable'}"


def reference_omniclip():
    """The repository's own omniclip.py, whatever `--impl` loaded: the gallery of misreadings
    (test_misreadings.py) breaks the reference on purpose, to show that each check catches it."""
    here = sys.modules.get("omniclip") or importlib.import_module("omniclip")
    path = os.path.join(ROOT, "omniclip.py")
    if here is not None and os.path.abspath(here.__file__) == path:
        return here
    if "omniclip_reference" not in sys.modules:
        spec = importlib.util.spec_from_file_location("omniclip_reference", path)
        sys.modules["omniclip_reference"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["omniclip_reference"])
    return sys.modules["omniclip_reference"]


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


@pytest.fixture
def one_torch_thread():
    """Tiny tensors on shared cores: one thread is many times faster than several. A module opts
    in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
