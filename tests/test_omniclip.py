"""The model, one equation at a time. Read each test beside its equation in the paper (Sec. 3).

How these tests are built, so that they turn red on a wrong line and say which equation it is in:
- an oracle per equation: the expected output is computed here, from the module's own weights,
  with plain tensor operations (a loop over frames or token positions, an explicit softmax over the
  keys with its 1/sqrt(d) scale, heads cut as contiguous channel blocks), on tiny sizes, after every
  zero-initialised tensor has been moved off zero (`randomize`): a check cannot pass by zeros;
- gradients are part of the equation: each check also compares, by autograd, the gradients of the
  inputs and of every trainable parameter with the oracle's (a detached input, or a branch run
  under no_grad, gives the right values and fails here);
- the equation, not our layout: weights are read through a few documented names, any common
  attention layout (`attention_weights`), an MLP's Linears by type; scalars may be () or (1,); the
  SPG prompts are compared up to their order;
- isolation: a test feeds its equation reference inputs and replaces the model's other new parts
  by simple stand-ins (`use_stand_ins`), so a wrong Eq. (6) turns Eq. (6)'s tests red and no others
  (tests/test_isolation.py empties every part a test carries no marker for, and it must pass);
- each check is a plain function `check_...(oc)` that raises AssertionError with a message naming
  the equation and the first wrong value (expected, got, where). tests/test_misreadings.py breaks
  the model on purpose, the paper read another way, and asserts that the check catches it.

Every test carries its equation's marker: `pytest -m eq7` runs exactly Eq. (7)'s tests, and
`pytest --impl=my_omniclip.py -m eq7` runs them on your own file. All on CPU in seconds, with the
`tiny` architecture (the same code path as ViT-B/16: 4x4 patches, E = 128) at width D = 256, so the
PTA is one 64-channel head, 3 layers deep.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import omniclip

T, B, C = 4, 2, 3          # frames, videos, classes in the tiny tests
D, E = 256, 128            # ViT width (tiny's 128 doubled: the PTA is then 64 wide, one head of
                           # 64 channels, as the paper's; a learner's `d // 64` heads works) and joint embedding
K = 16                     # 64x64 pixels in 16x16 patches: a 4x4 grid
PROMPTS = K // 4           # Eq. (6): one prompt per 2x2 block of patches


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one CPU thread is faster than two that wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# Building tiny models, moving them off their initialisation, comparing values.

def tiny_config(oc=omniclip, **options):
    """The `tiny` architecture, with 3 ViT layers and a small text tower (these tests never run
    text): seconds per test on a shared CPU."""
    arch = dict(oc.ARCHITECTURES["tiny"], vision_layers=3, vision_width=options.pop("width", D),
                vocab_size=1000, text_layers=1)
    return oc.OmniCLIPConfig(**arch, frames=options.pop("frames", T), **options)


def tiny_model(oc=omniclip, **options):
    torch.manual_seed(0)
    return oc.OmniCLIP(tiny_config(oc, **options)).eval()


def randomize(module, seed=1, scale=0.2, clip_norms=True):
    """Move every trainable tensor (TE, Up, alpha, gamma, out projections: the ones that start at
    0 or 1) and every LayerNorm (CLIP's too, unless clip_norms=False) off its initialisation, so that
    no check passes by a zero, a one or an identity LayerNorm. Matrices move by scale/sqrt(fan-in),
    so activations keep their size; vectors and scalars by `scale`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad or (clip_norms and (".ln" in f".{name}" or "logit_scale" in name)):
                noise = scale * torch.randn(p.shape, generator=g)
                if p.dim() >= 2 and "weight" in name:         # a Linear's, or a 1x1 convolution's
                    noise /= math.sqrt(p[0].numel())
                p.add_(noise)
    return module


def videos(frames=T, seed=0):
    return torch.randn(B, frames, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def class_features(seed=3):
    return torch.randn(C, E, generator=torch.Generator().manual_seed(seed))


def first_wrong(got, expected, atol, rtol):
    """'first wrong value at (i, j): expected x, got y', or the shapes when they differ."""
    if got.shape != expected.shape:
        return f"shape: expected {tuple(expected.shape)}, got {tuple(got.shape)}"
    bad = ~torch.isclose(got.double(), expected.double(), rtol=rtol, atol=atol)
    if not bad.any():
        return "values match"
    where = tuple(bad.nonzero()[0].tolist())
    return (f"first wrong value at {where}: expected {expected[where].item():.6g}, "
            f"got {got[where].item():.6g}")


def assert_matches(got, expected, what, atol=5e-5, rtol=1e-4):
    """torch.testing.assert_close, its message naming the equation and the first wrong value.
    A scalar is a scalar, stored as shape () or (1,)."""
    if isinstance(got, torch.Tensor) and got.numel() == expected.numel() == 1:
        got, expected = got.reshape(()), expected.reshape(())
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise AssertionError(f"{what}: shape: expected {tuple(expected.shape)}, got {shape}")
    torch.testing.assert_close(
        got.detach().float(), expected.detach().float(), atol=atol, rtol=rtol,
        msg=lambda m: f"{what}: {first_wrong(got.detach(), expected.detach(), atol, rtol)}\n{m}")


def assert_gradients_match(got, expected, wrt, what):
    """Gradients are part of the equation: the gradients, by autograd, of one random projection of
    the output with respect to `wrt` (name -> input or parameter), the module's against the
    oracle's. A detached input or output, or a branch run under torch.no_grad(), fails here."""
    check(isinstance(got, torch.Tensor) and got.requires_grad, what,
          "the output carries no gradient (detached, or computed under torch.no_grad()): "
          "the adapters it feeds could not learn")
    if got.numel() == expected.numel() == 1:                    # a scalar: () or (1,)
        got, expected = got.reshape(()), expected.reshape(())
    names, tensors = zip(*wrt.items())
    w = torch.randn(expected.shape, generator=torch.Generator().manual_seed(12))
    ours = torch.autograd.grad((got * w).sum(), tensors, allow_unused=True, retain_graph=True)
    theirs = (torch.autograd.grad((expected * w).sum(), tensors, allow_unused=True, retain_graph=True)
              if expected.requires_grad else [None] * len(tensors))
    for name, a, b, t in zip(names, ours, theirs, tensors):
        a = torch.zeros_like(t) if a is None else a
        b = torch.zeros_like(t) if b is None else b
        scale = b.abs().max().item()
        assert_matches(a, b, f"{what}: gradient of {name}", atol=1e-4 * scale + 1e-6, rtol=1e-3)


def assert_values_and_gradients(got, expected, what, inputs=None, module=None):
    """Values, then the gradients of the inputs (name -> tensor) and of the module's parameters,
    whatever they are called: every parameter of a new module trains."""
    assert_matches(got, expected, what)
    wrt = dict(inputs or {})
    if module is not None:
        frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
        check(not frozen, what, f"parameter {', '.join(frozen[:3])} does not train (requires_grad False)")
        wrt.update({f"parameter {n}": p for n, p in module.named_parameters()})
    assert_gradients_match(got, expected, wrt, what)


def check(condition, what, detail):
    if not condition:
        raise AssertionError(f"{what}: {detail}")


def temporal_embedding(model, what="Eq. (1)"):
    """TE's T·D values, frame-major, however they are stored: a tensor (T, D), (1, T, 1, D), ...,
    or a module holding one tensor (an nn.Embedding(T, D): its weight)."""
    te = needs(model, "temporal_embedding", what)
    if isinstance(te, nn.Module):
        tensors = list(te.parameters()) + list(te.buffers())
        check(len(tensors) == 1, what, f"temporal_embedding is a {type(te).__name__} holding "
                                       f"{len(tensors)} tensors: the test reads TE from one (T, D) table")
        te = tensors[0]
    check(isinstance(te, torch.Tensor), what, f"temporal_embedding is a {type(te).__name__}, not a tensor")
    return te


def needs(obj, name, what):
    """obj.<name>, one of the few names the tests read (README, "Learn by tests", lists them all),
    or an AssertionError naming the equation and the name: never an AttributeError from a test.
    A module's LayerNorm `ln` may have another name when it is the module's only LayerNorm."""
    norms = [m for m in obj.modules() if isinstance(m, nn.LayerNorm)] if isinstance(obj, nn.Module) else []
    if name == "ln" and not hasattr(obj, name) and len(norms) == 1:
        return norms[0]
    if not hasattr(obj, name):
        raise AssertionError(f"{what}: the test reads the weights through {type(obj).__name__}.{name}, "
                             f"which your file does not have (README, 'Learn by tests', lists the "
                             f"names a file needs)")
    return getattr(obj, name)


# ----------------------------------------------------------------------------------------------
# Plain-tensor oracles of the building blocks. Written for one sequence at a time: (L, d).
# They read weights, never layout: a Linear is its weight and bias (no bias reads as 0), an MLP the
# Linears it holds in order, and an attention module its query, key, value and output projections
# in whichever of the common layouts it uses (`attention_weights`).

def weight_matrix(layer, what="a Linear"):
    """The (out, in) matrix of an nn.Linear, or of a 1x1 convolution (nn.Conv1d(k=1): (out, in, 1))."""
    W = needs(layer, "weight", what)
    if W.dim() > 2 and math.prod(W.shape[2:]) == 1:
        W = W.reshape(W.shape[0], -1)
    check(W.dim() == 2, what, f"{type(layer).__name__} has a weight of shape {tuple(W.shape)}: the test "
                              f"reads it as a Linear's (out, in) matrix")
    return W


def linear(x, layer, what="a Linear"):
    bias = getattr(layer, "bias", None)
    return torch.einsum("...i,oi->...o", x, weight_matrix(layer, what)) + (0 if bias is None else bias)


def linears(mlp, count, what):
    """The nn.Linear layers of an MLP in order, whatever they are called: exactly `count` of them."""
    found = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    check(len(found) == count, what, f"expected an MLP of {count} nn.Linear layers, "
                                     f"found {len(found)} in {type(mlp).__name__}")
    return found


def layer_norm(x, ln):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)             # biased variance, as LayerNorm
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def softmax_over_keys(scores):                                  # (L, S): rows sum to 1
    e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def gelu(x):                                                    # nn.GELU(), the erf form
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def quick_gelu(x):                                              # CLIP's activation
    return x * torch.sigmoid(1.702 * x)


SEPARATE_QKV = (("q", "k", "v"), ("q_proj", "k_proj", "v_proj"), ("query", "key", "value"),
                ("to_q", "to_k", "to_v"), ("wq", "wk", "wv"), ("w_q", "w_k", "w_v"))
FUSED_QKV = ("qkv", "to_qkv", "c_attn", "qkv_proj")
OUTPUT = ("out_proj", "proj", "o_proj", "out", "to_out", "wo", "w_o", "c_proj")


def attention_weights(attn, d, what):
    """[(W_q, b_q), (W_k, b_k), (W_v, b_v), (W_o, b_o)] of an attention module of width d, in the
    layout of nn.MultiheadAttention (in_proj_weight, in_proj_bias, out_proj; ours too), with
    separate Linears (q, k, v or q_proj, k_proj, v_proj or query, key, value, ...) or a fused one
    (qkv), and an output Linear (out_proj, proj, o_proj, out, ...). No bias reads as 0."""
    def weight_and_bias(layer):
        bias = getattr(layer, "bias", None)
        return layer.weight, torch.zeros(layer.weight.shape[0]) if bias is None else bias

    def thirds(W, b):
        return [(W[i * d:(i + 1) * d], b[i * d:(i + 1) * d]) for i in range(3)]

    bias = getattr(attn, "in_proj_bias", None)
    bias = torch.zeros(3 * d) if bias is None else bias
    if getattr(attn, "in_proj_weight", None) is not None:       # ours, nn.MultiheadAttention
        qkv = thirds(attn.in_proj_weight, bias)
    elif getattr(attn, "q_proj_weight", None) is not None:      # nn.MultiheadAttention, kdim != d
        qkv = [(attn.q_proj_weight, bias[:d]), (attn.k_proj_weight, bias[d:2 * d]),
               (attn.v_proj_weight, bias[2 * d:])]
    elif any(isinstance(getattr(attn, n, None), nn.Linear) for n in FUSED_QKV):
        qkv = thirds(*weight_and_bias(next(getattr(attn, n) for n in FUSED_QKV
                                           if isinstance(getattr(attn, n, None), nn.Linear))))
    else:
        names = next((names for names in SEPARATE_QKV
                      if all(isinstance(getattr(attn, n, None), nn.Linear) for n in names)), None)
        check(names is not None, what,
              f"the test reads the attention's weights from {type(attn).__name__}: in_proj_weight and "
              f"in_proj_bias (nn.MultiheadAttention's layout) or Linears q, k, v (or q_proj, k_proj, "
              f"v_proj; query, key, value; a fused qkv), and an output Linear out_proj (or proj, o_proj, "
              f"out); it has none of these")
        qkv = [weight_and_bias(getattr(attn, n)) for n in names]
    out = next((getattr(attn, n) for n in OUTPUT if isinstance(getattr(attn, n, None), nn.Module)), None)
    if isinstance(out, nn.Sequential):                          # to_out = Sequential(Linear, Dropout)
        out = out[0]
    if out is None:                                             # the one Linear that is not q, k, v
        used = {id(W) for W, _ in qkv}
        others = [m for m in attn.children() if isinstance(m, nn.Linear) and id(m.weight) not in used]
        out = others[0] if len(others) == 1 else None
    check(out is not None and hasattr(out, "weight"), what,
          f"the attention {type(attn).__name__} has no output Linear named out_proj (or proj, o_proj, out)")
    return qkv + [weight_and_bias(out)]


def attention(x, attn, context=None, causal=False, what="attention"):
    """Multi-head attention of queries x (L, d) on keys/values `context` (S, d), x itself when
    None. Heads are 64 channels wide (ViT's), each a contiguous block of the projected channels."""
    d = x.shape[-1]
    heads = max(1, d // 64)
    w = d // heads
    kv = x if context is None else context
    (Wq, bq), (Wk, bk), (Wv, bv), (Wo, bo) = attention_weights(attn, d, what)
    q = x @ Wq.T + bq                                           # (L, d)
    k = kv @ Wk.T + bk                                          # (S, d)
    v = kv @ Wv.T + bv                                          # (S, d)
    out = []
    for h in range(heads):
        cols = slice(h * w, (h + 1) * w)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(w)       # (L, S)
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores).triu(1).bool(), float("-inf"))
        out.append(softmax_over_keys(scores) @ v[:, cols])      # (L, w)
    return torch.cat(out, dim=-1) @ Wo.T + bo                   # (L, d)


# ----------------------------------------------------------------------------------------------
# Stand-ins: simple modules the tests trust, put in place of the new modules a test does not
# check, so that a wrong (or still empty) part cannot turn the tests of other equations red.
# Every part is a function of its own (tests/test_isolation.py lists them): a test runs only the
# parts whose markers it carries, and a stand-in for every other one it needs.

class Stop(Exception):
    """Raised by a hook or a stand-in once the test has what it needs: the rest does not run
    (so a later equation, right or wrong or still empty, cannot fail this test)."""


def embed_frames_oracle(model, videos):
    """Eq. (1) written here: patches through CLIP's frozen patch convolution, the class token and
    PE, then TE row t on every token of frame t: (B·T, 1+K, D). TE may be stored as (T, D) or any
    shape of T·D values, frame-major."""
    visual, (B, T_) = model.clip.visual, videos.shape[:2]
    P = visual.conv1.weight.shape[-1]
    x = F.conv2d(videos.flatten(0, 1), visual.conv1.weight, stride=P).flatten(2).transpose(1, 2)  # (B·T, K, D)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)  # (B·T, 1+K, D)
    x = (x + visual.positional_embedding).unflatten(0, (B, T_))     # (B, T, 1+K, D)
    te = temporal_embedding(model).reshape(T_, 1, -1)           # (T, 1, D)
    return (x + te).flatten(0, 1)


def use_stand_in_embedding(model):
    """In place of the model's Eq. (1) (OmniCLIP.embed_frames, which calls CLIP's
    VisionTransformer.embed): the oracle above, which is right,
    so the wiring tests that start from V^0 need no working Eq. (1). A file that computes Eq. (1)
    inside encode_frames has no embed_frames to replace; its own Eq. (1) runs then."""
    model.embed_frames = lambda videos: embed_frames_oracle(model, videos)
    return model


class StandInAdapter(nn.Module):
    """In place of the temporal adapter: each token mixed with itself one frame earlier."""

    def forward(self, x, frames):                               # (B·T, N, D)
        y = x.unflatten(0, (-1, frames))                        # (B, T, N, D)
        return (0.5 * y.roll(1, dims=1) - 0.25 * torch.tanh(y)).flatten(0, 1)


def stand_in_prompts(patches):                                  # (B·T, K, D) -> (B·T, K/4, D)
    return 0.5 * patches[:, :PROMPTS].flip(1) + torch.tanh(patches[:, -PROMPTS:])


class StandInPrompts(nn.Module):
    """In place of the SPG: K/4 tokens made from the patches, recording what it was given."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, patches):                                 # (B·T, K, D) -> (B·T, K/4, D)
        self.inputs.append(patches)
        return stand_in_prompts(patches)


class StandInAggregation(nn.Module):
    """In place of Eq. (5): not the plain average, recording its input and output."""

    def __init__(self):
        super().__init__()
        self.inputs, self.outputs, self.stop = [], [], False

    def forward(self, frame_features):                          # (B, T, E) -> (B, E)
        out = frame_features.mean(dim=1) + 0.5 * frame_features[:, -1]
        self.inputs.append(frame_features)
        self.outputs.append(out)
        if self.stop:
            raise Stop
        return out


class StandInVideoPrompts(nn.Module):
    """In place of the prompt generator: class features shifted by the video's patches, which it
    projects into the joint space with CLIP's frozen ln_post and proj (written out here)."""

    def __init__(self):
        super().__init__()
        self.inputs, self.outputs, self.stop = [], [], False

    def project_patches(self, patches, visual):                 # (B·T, K, D) -> (B·T, K, E)
        return layer_norm(patches, visual.ln_post) @ visual.proj

    def forward(self, class_features, patches):                 # (C, E), (B, K, E) -> (B, C, E)
        out = class_features + 0.3 * patches.mean(dim=1, keepdim=True)
        self.inputs.append((class_features, patches))
        self.outputs.append(out)
        if self.stop:
            raise Stop
        return out


def use_stand_ins(model):
    """Replace every new part but Eq. (4)'s fusion (Eq. 1's embedding, adapters, SPG, Eq. 5 head,
    prompt generator) by its stand-in. The frozen CLIP, TE and the blocks' alphas stay."""
    use_stand_in_embedding(model)
    for block in model.blocks.values():
        block.pta = StandInAdapter()
    if model.spg is not None:
        model.spg = StandInPrompts()
    model.frame_aggregation = StandInAggregation()
    if model.prompt_generator is not None:
        model.prompt_generator = StandInVideoPrompts()
    return model


def record_layer_inputs(model, stop_after_first=False):
    """Each layer's input V^{i-1}, as the model passes it to the layer's spatial-temporal block,
    or to CLIP's layer where the layer has no adapter: a list."""
    seen = []

    def layer_hook(module, args):
        seen.append(args[0])
        if stop_after_first:
            raise Stop

    for i, vit in enumerate(model.clip.visual.transformer.resblocks):
        layer = model.blocks[str(i)] if str(i) in model.blocks else vit
        layer.register_forward_pre_hook(layer_hook)
    return seen


def layer_output(model, i, x):
    """Layer i of the model applied to x: its spatial-temporal block, or CLIP's layer alone."""
    vit = model.clip.visual.transformer.resblocks[i]
    return model.blocks[str(i)](x, vit, T) if str(i) in model.blocks else vit(x)


def run(model, x=None, c=None):
    """The forward pass, with gradients (they are checked too), stopped early if a hook says so."""
    try:
        return model(videos() if x is None else x, class_features() if c is None else c)
    except Stop:
        return None


def trainable(model, *prefixes):
    """The model's trainable tensors whose names start with a prefix: what gradients are checked for."""
    return {f"parameter {n}": p for n, p in model.named_parameters()
            if p.requires_grad and n.startswith(prefixes)}


# ----------------------------------------------------------------------------------------------
# Eq. (1): V0 = X0 + PE + TE. Patch embedding, class token, positional embedding (CLIP's, frozen)
# and the learnable temporal embedding TE (T, D), one row per frame added to every token of it.

def eq1_oracle(model, x):
    """V0 of Eq. (1) then CLIP's ln_pre, frame by frame: (B·T, 1+K, D)."""
    visual = model.clip.visual
    P = visual.conv1.weight.shape[-1]
    W = visual.conv1.weight.reshape(D, -1)                      # (D, 3·P·P)
    te = temporal_embedding(model).reshape(T, D)                # however it is stored: (T, D)
    g = x.shape[-1] // P
    out = []
    for t in range(x.shape[1]):                                 # frame t of every video
        frames = x[:, t].reshape(x.shape[0], 3, g, P, g, P)     # (B, 3, row, y, column, x)
        patches = frames.permute(0, 2, 4, 1, 3, 5).reshape(x.shape[0], g * g, -1)  # (B, K, 3·P·P), row by row
        cls = visual.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, D)
        X0 = torch.cat([cls, patches @ W.T], dim=1)             # (B, 1+K, D)
        out.append(layer_norm(X0 + visual.positional_embedding + te[t], visual.ln_pre))
    return torch.stack(out, dim=1).flatten(0, 1)                # (B·T, 1+K, D), video-major


def check_eq1_temporal_embedding(oc=omniclip):
    model = randomize(tiny_model(oc, pta=False, spg=False))     # Eqs. (4), (6) cannot interfere
    seen = record_layer_inputs(model, stop_after_first=True)
    x = videos()
    run(model, x)
    check(len(seen) == 1, "Eq. (1)", "the first layer was never reached")
    assert_values_and_gradients(seen[0], eq1_oracle(model, x),
                                "Eq. (1) V0 = X0 + PE + TE (then CLIP's ln_pre), tokens of the first layer",
                                trainable(model, "temporal_embedding"))


@pytest.mark.eq1
def test_eq1_temporal_embedding_is_a_learnable_T_by_D_table_starting_at_zero():
    model = tiny_model()
    te = temporal_embedding(model)
    assert te.squeeze().shape == (T, D) and te.requires_grad, "Eq. (1): TE is a learnable (T, D) table"
    assert torch.count_nonzero(te) == 0, "Eq. (1): TE starts at zero, so frames are CLIP's frames"


@pytest.mark.eq1
def test_eq1_tokens_are_patches_class_token_positions_and_te_of_their_frame():
    check_eq1_temporal_embedding()


@pytest.mark.eq1
def test_eq1_te_tells_the_frames_of_a_still_video_apart():
    """A still video (one frame repeated) gives T equal frames without TE, different ones with it.
    No adapter here (pta=False): an adapter may tell frames apart by itself (a padded convolution)."""
    model = tiny_model(pta=False, spg=False)
    still = videos()[:, :1].expand(B, T, 3, 64, 64)
    seen = record_layer_inputs(model, stop_after_first=True)
    run(model, still)
    frames = seen[0].detach().unflatten(0, (B, T))              # (B, T, N, D)
    assert torch.allclose(frames[:, 0], frames[:, -1]), "Eq. (1): TE = 0 must leave frames equal"
    with torch.no_grad():
        temporal_embedding(model).normal_()
    seen.clear()
    run(model, still)
    frames = seen[0].detach().unflatten(0, (B, T))
    assert not torch.allclose(frames[:, 0], frames[:, -1], atol=1e-3), \
        "Eq. (1): with TE, the frames of a still video must differ"


@pytest.mark.eq1
def test_eq1_a_video_with_another_number_of_frames_is_a_clear_error():
    with pytest.raises(ValueError, match="6 frames"):           # TE has one row per frame
        run(tiny_model(), videos(frames=6))


# ----------------------------------------------------------------------------------------------
# Eq. (2): V_s = ViT(V), CLIP's frozen pre-LN layer, applied to each frame's tokens.

def check_eq2_clip_layer(oc=omniclip, causal=False):
    """CLIP's layer as the model builds it: the ViT's (Eq. 2) without a mask, the text tower's causal."""
    model = tiny_model(oc)
    block = (model.clip.transformer if causal else model.clip.visual.transformer).resblocks[0]
    block = randomize(block.requires_grad_())
    x = torch.randn(3, 6, block.ln_1.weight.shape[0]).requires_grad_()  # (frames, tokens, width)
    expected = []
    for seq in x:                                               # one frame at a time: (N, D)
        seq = seq + attention(layer_norm(seq, block.ln_1), block.attn, causal=causal)
        hidden = quick_gelu(linear(layer_norm(seq, block.ln_2), block.mlp.c_fc))
        expected.append(seq + linear(hidden, block.mlp.c_proj))
    assert_values_and_gradients(
        block(x), torch.stack(expected),
        f"Eq. (2) CLIP's {'causal ' if causal else ''}layer: V + Attn(LN V), then + MLP(LN V)",
        {"the input V": x}, block)


@pytest.mark.eq2
@pytest.mark.clip
@pytest.mark.parametrize("causal", [False, True], ids=["image", "text"])
def test_eq2_vit_layer_is_clips_pre_layernorm_block(causal):
    check_eq2_clip_layer(causal=causal)


# ----------------------------------------------------------------------------------------------
# Eqs. (2)-(4): V^i = ViT(V^{i-1}) + alpha_i * PTA(V^{i-1}), both branches fed the same V^{i-1}.
# The adapter is a stand-in here: these tests check the fusion, whatever adapter is plugged in.
# Gradients too: the frozen ViT branch must pass the gradient on to the earlier layers' adapters.

def check_eq4_fusion(oc=omniclip, connection="block-parallel"):
    model = randomize(tiny_model(oc, connection=connection))
    block, vit = model.blocks["1"], model.clip.visual.transformer.resblocks[1]
    block.pta = adapter = StandInAdapter()
    alpha = needs(block, "alpha", "Eq. (4)")
    for value in (0.37, -1.3):
        x = torch.randn(B * T, 1 + K + PROMPTS, D, generator=torch.Generator().manual_seed(5))
        x.requires_grad_()
        with torch.no_grad():
            alpha.fill_(value)
        got = block(x, vit, T)
        if connection == "block-parallel":                      # Fig. 5(c)
            expected = vit(x) + alpha * adapter(x, T)           # Eqs. (2)-(4)
            what = f"Eq. (4) V = ViT(V) + alpha * PTA(V), alpha = {value}"
        else:                                                   # Fig. 5(b): beside the attention
            h = x + vit.attn(vit.ln_1(x)) + alpha * adapter(x, T)
            expected = h + vit.mlp(vit.ln_2(h))
            what = (f"Table 11 attention-parallel (Eq. 4): V + Attn(LN V) + alpha * PTA(V), then the MLP, "
                    f"alpha = {value}")
        assert_values_and_gradients(got, expected, what, {"the input V": x}, block)


def check_eq4_layers_in_sequence(oc=omniclip, what="Eq. (4)", layers_with_adapter=None, tokens=None,
                                 **options):
    """Layer i's output is layer i+1's input: block(V, vit, T) where layer i has an adapter,
    CLIP's own layer where it has none; gradients flow from every layer back to TE.
    (Eq. 5 and the prompts check what the last one feeds.)"""
    model = use_stand_ins(randomize(tiny_model(oc, **options)))
    if layers_with_adapter is not None:
        check(sorted(model.blocks, key=int) == [str(i) for i in layers_with_adapter], what,
              f"layers with an adapter: expected {layers_with_adapter}, got {sorted(model.blocks, key=int)}")
    seen = record_layer_inputs(model)
    model.encode_frames(videos())                               # the layers only: not Eqs. (5), (8)
    resblocks = model.clip.visual.transformer.resblocks
    check(len(seen) == len(resblocks), what,
          f"every CLIP layer runs once: expected {len(resblocks)} layer inputs, got {len(seen)}")
    wrt = trainable(model, "temporal_embedding", "blocks")
    for i in range(len(resblocks)):
        x = seen[i]
        if tokens is not None:                                  # how many is Eq. (6)'s business
            check(x.shape == (B * T, tokens, D), what,
                  f"layer {i} input: expected shape {(B * T, tokens, D)}, got {tuple(x.shape)}")
        if i + 1 < len(resblocks):
            assert_values_and_gradients(seen[i + 1], layer_output(model, i, x),
                                        f"{what}: layer {i}'s output is layer {i + 1}'s input", wrt)


@pytest.mark.eq2
@pytest.mark.eq3
@pytest.mark.eq4
def test_eq4_block_parallel_fuses_clip_layer_and_adapter_with_alpha():
    check_eq4_fusion(connection="block-parallel")


@pytest.mark.eq2
@pytest.mark.eq3
@pytest.mark.eq4
def test_eq4_every_layer_is_a_spatial_temporal_block_in_order():
    check_eq4_layers_in_sequence(layers_with_adapter=range(3))


@pytest.mark.eq4
def test_eq4_alpha_is_one_learnable_scalar_per_layer_starting_at_one():
    alphas = [needs(block, "alpha", "Eq. (4)") for block in tiny_model().blocks.values()]
    assert len(alphas) == 3 and len({id(a) for a in alphas}) == 3, "Eq. (4): one alpha per layer"
    for a in alphas:                                            # (), (1,) or (1, 1, 1): one scalar
        assert a.numel() == 1, f"Eq. (4): alpha is one scalar, got shape {tuple(a.shape)}"
        assert a.requires_grad and a.item() == 1.0, "Eq. (4): alpha is learnable and starts at 1"


@pytest.mark.eq4
@pytest.mark.table11
def test_table11_attention_parallel_puts_the_adapter_beside_the_attention_not_the_mlp():
    check_eq4_fusion(connection="attention-parallel")
    check_eq4_layers_in_sequence(what="Table 11 attention-parallel (Eq. 4)", connection="attention-parallel")


@pytest.mark.eq4
@pytest.mark.table11
def test_table11_unknown_connections_are_refused():
    with pytest.raises(ValueError, match="connection"):
        tiny_config(connection="serial")


@pytest.mark.eq4
@pytest.mark.table10
def test_table10_pta_layers_choose_which_layers_get_an_adapter():
    check_eq4_layers_in_sequence(what="Table 10 pta_layers=[0, 2] (Eq. 4)", layers_with_adapter=[0, 2],
                                 pta_layers=[2, 0])
    with pytest.raises(ValueError, match="pta_layers"):
        tiny_config(pta_layers=[3])                             # the test model has layers 0-2


@pytest.mark.eq4
@pytest.mark.table7
def test_table7_without_pta_every_layer_is_clips_own():
    check_eq4_layers_in_sequence(what="Table 7 pta=False (Eq. 4)", layers_with_adapter=[], pta=False)


def check_gradient_checkpointing(oc=omniclip):
    """gradient_checkpointing=True: every layer runs again in the backward pass (that is what saves
    the memory), and the gradients are those of the plain run."""
    what = "gradient checkpointing (Eq. 4's layers): config.gradient_checkpointing=True"
    grads = []
    for flag in (False, True):
        model = tiny_model(oc, gradient_checkpointing=flag, spg=False, video_prompts=False)
        clip = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("clip.")]
        check(not clip, what if flag else "Eq. (2), the frozen CLIP",
              f"CLIP's weights are frozen (requires_grad False), but {', '.join(clip[:3])} train")
        model = use_stand_ins(randomize(model)).train()
        calls = []
        for vit in model.clip.visual.transformer.resblocks:
            vit.register_forward_pre_hook(lambda m, args: calls.append(m))
        frames, _ = model.encode_frames(videos())
        forward = len(calls)
        check(frames.requires_grad, what, "the frame features carry no gradient (detached, or under no_grad)")
        frames.pow(2).sum().backward()
        if flag:
            check(len(calls) == 2 * forward, what,
                  f"the layers must run again in the backward pass (torch.utils.checkpoint): "
                  f"{forward} layer calls in the forward, {len(calls) - forward} in the backward")
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        check(grads[1][name] is not None, what, f"{name} gets no gradient")
        assert_matches(grads[1][name], grads[0][name], f"{what}: the gradient of {name}", atol=1e-5)


@pytest.mark.eq4
@pytest.mark.model
def test_model_gradient_checkpointing_reruns_the_layers_and_gives_the_same_gradients():
    check_gradient_checkpointing()


# ----------------------------------------------------------------------------------------------
# Eq. (6): R = Projector(Avg(V0)). 2x2 pooling of each frame's patch grid (class token excluded),
# a residual two-layer MLP, and the K/4 prompts appended after the patches, through ln_pre.
# The prompts carry no position, so their order is free: outputs are compared up to one order of
# the prompt tokens, the same for every frame (a scrambled grid still fails: its values differ).

def eq6_oracle(spg, patches, grid, pooling, projector, what="Eq. (6)", ceil=True):
    """(n, K, D) patches -> (n, ceil(g/2)^2, D) prompts, cell by cell of the pooled grid (or
    floor(g/2)^2 with ceil=False: an odd grid's last row and column left out)."""
    n, _, width = patches.shape
    tokens = patches.reshape(n, grid, grid, width)              # patch k sits at (k // g, k % g)
    cells = []
    end = grid if ceil else grid - grid % 2
    for i in range(0, end, 2):
        for j in range(0, end, 2):
            cell = tokens[:, i:i + 2, j:j + 2].reshape(n, -1, width)  # 4 patches, fewer at an odd edge
            cells.append(cell.mean(dim=1) if pooling == "avg" else cell.amax(dim=1))
    A = torch.stack(cells, dim=1)                               # (n, K/4, D): Avg(V0)
    if not projector:
        return A
    first, last = linears(needs(spg, "projector", what), 2, what + ", the projector")
    return A + linear(gelu(linear(A, first)), last)             # Projector, residual


def in_prompt_order_of(got, expected):
    """`got` with its prompt tokens (dim 1) put in the order of `expected`'s, one order for every
    frame, when some order makes them match; `got` unchanged otherwise (then the values differ)."""
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or got.dim() != 3:
        return got
    order = torch.cdist(expected[0].detach(), got[0].detach()).argmin(dim=1)  # nearest of each
    if sorted(order.tolist()) != list(range(got.shape[1])):
        return got
    return got[:, order]


def check_eq6_spg(spg, grid=4, pooling="avg", projector=True, width=D):
    randomize(spg.requires_grad_())
    patches = torch.randn(3, grid * grid, width, generator=torch.Generator().manual_seed(7))
    patches.requires_grad_()
    what = f"Eq. (6) R = Projector(Avg(V0)), {pooling} pooling, projector {'on' if projector else 'off'}"
    got = spg(patches)
    if not projector:
        check(not any(p.requires_grad for p in spg.parameters()), what, "projector=False must build no projector")
    expected = eq6_oracle(spg, patches, grid, pooling, projector, what)
    if grid % 2 and isinstance(got, torch.Tensor) and got.shape[1] == (grid // 2) ** 2:
        # an odd grid (ViT-B/32's 7x7) is where the paper is silent: our ceil (the edge cells
        # pooled over what is there) or F.avg_pool2d's floor (the last row and column left out)
        what += f", {grid}x{grid} grid pooled with floor"
        expected = eq6_oracle(spg, patches, grid, pooling, projector, what, ceil=False)
    assert_values_and_gradients(in_prompt_order_of(got, expected), expected, what,
                                {"the patches V0": patches}, spg)


def check_eq6_wiring(oc=omniclip):
    model = use_stand_ins(randomize(tiny_model(oc, pta=False)))
    what = "Eq. (6) wiring: SPG(patches of V0, after TE), prompts appended, all through ln_pre"
    seen = record_layer_inputs(model)
    x = videos()
    model.encode_frames(x)                                      # the layers only: not Eqs. (5), (8)
    check(len(model.spg.inputs) == 1, what, f"SPG called {len(model.spg.inputs)} times, expected once")
    patches, first = model.spg.inputs[0], seen[0]
    check(patches.shape == (B * T, K, D), what,
          f"SPG input: expected the K patch tokens {(B * T, K, D)}, got {tuple(patches.shape)}")
    check(first.shape == (B * T, 1 + K + PROMPTS, D), what,
          f"first layer input: expected 1 + K + K/4 tokens, got shape {tuple(first.shape)}")
    ln_pre = model.clip.visual.ln_pre
    V0 = embed_frames_oracle(model, x)                          # Eq. (1), written in the test
    te = trainable(model, "temporal_embedding")
    assert_values_and_gradients(patches, V0[:, 1:],
                                what + ": the SPG sees the patch tokens of V0 (with TE, no class token)", te)
    assert_values_and_gradients(first[:, 1 + K:], layer_norm(stand_in_prompts(V0[:, 1:]), ln_pre),
                                what + ": prompts after the patches", te)
    for i, x in enumerate(seen):
        check(x.shape[1] == 1 + K + PROMPTS, what,
              f"layer {i} sees {x.shape[1]} tokens, expected {1 + K + PROMPTS}")


def check_eq6_model_spg(oc=omniclip):
    check_eq6_spg(needs(tiny_model(oc), "spg", "Eq. (6)"))


@pytest.mark.eq6
def test_eq6_spg_pools_2x2_blocks_and_adds_its_projector():
    check_eq6_model_spg()


@pytest.mark.eq6
def test_eq6_prompts_come_from_the_patches_and_flow_through_ln_pre_and_every_layer():
    check_eq6_wiring()


@pytest.mark.eq6
def test_eq6_projector_starts_at_zero_so_prompts_start_as_the_2x2_averages():
    spg = tiny_model().spg
    patches = torch.randn(3, K, D)
    expected = eq6_oracle(spg, patches, 4, "avg", projector=False)
    with torch.no_grad():
        assert_matches(in_prompt_order_of(spg(patches), expected), expected, "Eq. (6) at init: R = Avg(V0)")


def check_table9_options(oc=omniclip, pooling="max", projector=True):
    check_eq6_spg(tiny_model(oc, spg_pooling=pooling, spg_projector=projector).spg, 4, pooling, projector)


@pytest.mark.eq6
@pytest.mark.spg
@pytest.mark.table9
@pytest.mark.parametrize("pooling,projector", [("max", True), ("avg", False), ("max", False)])
def test_eq6_table9_pooling_and_projector_options(pooling, projector):
    check_table9_options(pooling=pooling, projector=projector)


@pytest.mark.eq6
@pytest.mark.spg
@pytest.mark.table9
def test_eq6_table9_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="spg_pooling"):
        tiny_config(spg_pooling="mean")


@pytest.mark.eq6
@pytest.mark.spg
def test_eq6_odd_patch_grid_pools_with_ceil_or_floor():
    """ViT-B/32 has a 7x7 grid: ours makes 4x4 prompts, the last row and column pooled over what
    is there; 3x3 prompts leaving them out (F.avg_pool2d's default) is the other reading."""
    for pooling in ("avg", "max"):
        check_eq6_spg(omniclip.SelfPromptGenerator(32, 5, pooling, True), 5, pooling, True, width=32)


def check_table7_without_spg(oc=omniclip):
    check(tiny_model(oc, spg=False).spg is None, "Table 7 spg=False", "the model still has an SPG")
    check_eq4_layers_in_sequence(oc, what="Table 7 spg=False", tokens=1 + K, spg=False, pta=False)


@pytest.mark.eq6
@pytest.mark.table7
def test_table7_without_spg_there_are_no_prompt_tokens():
    check_table7_without_spg()


# ----------------------------------------------------------------------------------------------
# Eq. (7): V_t = PTA(V) = Up(Attn(Down(V))): each token position attends over the T frames.

def pta_parts(pta, what):
    """The PTA's Down, LayerNorm, attention and Up: the names the Eq. (7) oracle reads."""
    return [needs(pta, name, what) for name in ("down", "ln", "attn", "up")]


def eq7_oracle(pta, x, frames, what="Eq. (7)"):
    """One token position of one video at a time: a (T, D) sequence through Down, LN + MHA, Up."""
    down, ln, attn, up = pta_parts(pta, what)
    rows = []
    for b in range(x.shape[0] // frames):
        video = x[b * frames:(b + 1) * frames]                  # (T, N, D): the T frames of video b
        columns = []
        for n in range(x.shape[1]):
            h = linear(video[:, n], down, what + ", Down")      # (T, d): Down
            h = attention(layer_norm(h, ln), attn, what=what)   # (T, d): Attn, over time
            columns.append(linear(h, up, what + ", Up"))        # (T, D): Up
        rows.append(torch.stack(columns, dim=1))                # (T, N, D)
    return torch.cat(rows)                                      # (B·T, N, D)


def check_eq7_pta(oc=omniclip, width=512, ratio=0.25, pta=None):
    torch.manual_seed(0)
    pta = randomize(oc.ParallelTemporalAdapter(width, ratio) if pta is None else pta)
    what = f"Eq. (7) PTA = Up(Attn(Down(V))), width {width}, temporal ratio {ratio}"
    down, _, _, up = pta_parts(pta, what)
    width = up.weight.shape[0]
    check(down.weight.shape[0] == int(width * ratio), what,
          f"Down: expected {int(width * ratio)} channels (width x ratio), got {down.weight.shape[0]}")
    x = torch.randn(B * T, 3, width, generator=torch.Generator().manual_seed(9)).requires_grad_()
    assert_values_and_gradients(pta(x, T), eq7_oracle(pta, x, T, what), what, {"the input V": x}, pta)


@pytest.mark.eq3
@pytest.mark.eq7
def test_eq7_pta_matches_its_oracle():
    check_eq7_pta()                                             # 512 wide: 128 after Down, 2 heads


@pytest.mark.eq7
def test_eq7_pta_attends_only_across_time_at_one_token_position():
    torch.manual_seed(0)
    pta = randomize(omniclip.ParallelTemporalAdapter(D))
    x = torch.randn(B * T, 6, D)                                # (B·T, N, D)
    changed = x.clone()
    changed[1 * T + 2, 3] += 1.0                                # video 1, frame 2, token 3
    with torch.no_grad():
        diff = (pta(changed, T) - pta(x, T)).abs().amax(dim=-1).unflatten(0, (B, T))  # (B, T, N)
    assert (diff[1, :, 3] > 1e-6).all(), "Eq. (7): token 3 of every frame of video 1 must change"
    diff[1, :, 3] = 0
    assert diff.max() == 0, "Eq. (7): nothing else may change: other tokens, other videos"


@pytest.mark.eq7
def test_eq7_model_builds_a_pta_per_layer_with_up_at_zero():
    model = tiny_model()
    for i, block in model.blocks.items():
        if isinstance(block.pta, omniclip.ParallelTemporalAdapter):   # a fork may plug in another
            up = pta_parts(block.pta, "Eq. (7)")[3]
            assert all(torch.count_nonzero(p) == 0 for p in up.parameters()), f"Eq. (7): layer {i}'s Up starts at 0"
            check_eq7_pta(pta=block.pta)


@pytest.mark.eq7
@pytest.mark.table8
@pytest.mark.parametrize("ratio", [1 / 8, 1 / 2, 1])
def test_eq7_table8_temporal_ratio_sets_the_bottleneck(ratio):
    check_eq7_pta(width=512, ratio=ratio)                       # 64, 256, 512 channels: 1, 4, 8 heads
    for block in tiny_model(temporal_ratio=ratio, width=512).blocks.values():  # >= 64 channels
        if isinstance(block.pta, omniclip.ParallelTemporalAdapter):
            down = pta_parts(block.pta, "Table 8")[0]
            assert down.weight.shape[0] == int(512 * ratio), "Table 8: the config's ratio"


@pytest.mark.eq7
@pytest.mark.model
def test_model_every_adapter_starts_at_zero():
    """The model zeroes an adapter's `up`; an adapter without one (a fork's) must add 0 by itself."""
    model = tiny_model()
    x = torch.randn(B * T, 1 + K + PROMPTS, D)
    for i, block in model.blocks.items():
        name = type(block.pta).__name__
        with torch.no_grad():
            assert torch.count_nonzero(block.pta(x, T)) == 0, (
                f"{name} (layer {i}) must add 0 at init: the model zeroes an adapter's `up`; one without `up` must start at zero itself")


# ----------------------------------------------------------------------------------------------
# Eq. (5): F_V = Avg(MHA([F_1 .. F_T])) on the class token of each frame after ln_post and proj.
# Our reading adds a residual and a LayerNorm: F_V = mean_t(F + MHA(LN(F))).

def check_eq5_head(oc=omniclip, head=None):
    torch.manual_seed(0)
    head = randomize(oc.FrameAggregation(E) if head is None else head)
    what = "Eq. (5) F_V = mean over frames of F + MHA(LN(F))"
    ln, attn = needs(head, "ln", what), needs(head, "attn", what)
    F_ = torch.randn(B, T, E, generator=torch.Generator().manual_seed(4)).requires_grad_()  # (B, T, E)
    expected = torch.stack([(f + attention(layer_norm(f, ln), attn, what=what)).mean(dim=0)
                            for f in F_])                       # one video at a time, mean over T
    assert_values_and_gradients(head(F_), expected, what, {"the frame features F": F_}, head)


def check_eq5_frame_features(oc=omniclip):
    model = use_stand_ins(randomize(tiny_model(oc, pta=False)))
    model.frame_aggregation.stop = True                         # what comes after is not Eq. (5)'s
    what = "Eq. (5) F_V,t = ln_post(class token of frame t, last layer) @ proj"
    seen = record_layer_inputs(model)
    run(model)
    visual = model.clip.visual
    last = layer_output(model, len(seen) - 1, seen[-1])         # V^L: (B·T, N, D)
    expected = (layer_norm(last[:, 0], visual.ln_post) @ visual.proj).unflatten(0, (B, T))
    check(len(model.frame_aggregation.inputs) == 1, what, "Eq. (5) head not called once")
    assert_values_and_gradients(model.frame_aggregation.inputs[0], expected, what,
                                trainable(model, "temporal_embedding"))


@pytest.mark.eq5
def test_eq5_frame_aggregation_matches_its_oracle():
    check_eq5_head()


@pytest.mark.eq5
def test_eq5_frame_features_are_each_frames_class_token_through_ln_post_and_proj():
    check_eq5_frame_features()


@pytest.mark.eq5
def test_eq5_at_init_video_features_are_the_frame_average():
    head = tiny_model().frame_aggregation
    F_ = torch.randn(3, T, E)
    with torch.no_grad():
        assert_matches(head(F_), F_.mean(dim=1), "Eq. (5) at init: F_V = mean over frames")


# ----------------------------------------------------------------------------------------------
# Video-specific text prompts (X-CLIP, which the paper follows): c_hat = c + gamma * c_tilde,
# c_tilde from the class features attending to the video's patch tokens in two blocks.

PROMPTS_WHAT = ("video-specific prompts: c + gamma * c_tilde, c_tilde = blocks of "
                "x + CrossAttn(LN x, LN patches), x + MLP(LN x)")


def prompts_oracle(vp, c, patches, what=PROMPTS_WHAT):
    out = []
    blocks = [[needs(block, name, what) for name in ("ln_1", "attn", "ln_2", "mlp")]
              for block in needs(vp, "blocks", what)]
    ln, gamma = needs(vp, "ln", what), needs(vp, "gamma", what)
    check(isinstance(gamma, nn.Parameter) and gamma.requires_grad, what,
          "gamma is learnable (X-CLIP: an nn.Parameter, init 0.1), got a tensor that does not train")
    for p in patches:                                           # one video at a time: (K, E)
        kv = layer_norm(p, ln)
        x = c                                                   # (C, E): the queries
        for ln_1, attn, ln_2, mlp in blocks:
            x = x + attention(layer_norm(x, ln_1), attn, context=kv, what=what)
            c_fc, c_proj = linears(mlp, 2, what)
            x = x + linear(quick_gelu(linear(layer_norm(x, ln_2), c_fc)), c_proj)
        out.append(c + gamma * x)
    return torch.stack(out)                                     # (B, C, E)


def check_prompts_generator(oc=omniclip, vp=None):
    torch.manual_seed(0)
    vp = randomize(oc.VideoSpecificPrompt(E, layers=2) if vp is None else vp)
    g = torch.Generator().manual_seed(2)
    c = torch.randn(C, E, generator=g).requires_grad_()
    patches = torch.randn(B, 5, E, generator=g).requires_grad_()
    assert_values_and_gradients(vp(c, patches), prompts_oracle(vp, c, patches), PROMPTS_WHAT,
                                {"the class features c": c, "the patches": patches}, vp)


def check_prompts_wiring(oc=omniclip):
    model = use_stand_ins(randomize(tiny_model(oc, pta=False)))
    model.prompt_generator.stop = True                          # what comes after is Eq. (8)'s
    what = "video-specific prompts: keys/values = the patch tokens of all frames, ln_post, proj, mean over T"
    seen = record_layer_inputs(model)
    c = class_features()
    run(model, c=c)
    check(len(model.prompt_generator.inputs) == 1, what, "prompt generator not called once")
    given_c, patches = model.prompt_generator.inputs[0]
    visual = model.clip.visual
    last = layer_output(model, len(seen) - 1, seen[-1])         # V^L: (B·T, N, D)
    tokens = (layer_norm(last[:, 1:1 + K], visual.ln_post) @ visual.proj).unflatten(0, (B, T))
    assert_values_and_gradients(patches, tokens.mean(dim=1), what, trainable(model, "temporal_embedding"))
    assert_matches(given_c, c, "video-specific prompts: the queries are the class features given")


@pytest.mark.prompts
def test_prompts_generator_matches_its_oracle():
    model = tiny_model()
    assert len(model.prompt_generator.blocks) == 2, "X-CLIP's released configuration: 2 blocks"
    check_prompts_generator(vp=model.prompt_generator)


@pytest.mark.prompts
def test_prompts_use_the_patch_tokens_of_every_frame_as_keys_and_values():
    check_prompts_wiring()


def check_prompts_keys(oc=omniclip):
    model = randomize(tiny_model(oc))
    patches, visual = torch.randn(B * T, K, D).requires_grad_(), model.clip.visual
    got = model.prompt_generator.project_patches(patches, visual)
    assert_values_and_gradients(got, layer_norm(patches, visual.ln_post) @ visual.proj,
                                "video-specific prompts: keys/values = ln_post(patch tokens) @ proj",
                                {"the patch tokens": patches})


@pytest.mark.prompts
def test_prompts_keys_go_through_clips_frozen_ln_post_and_proj():
    """Our reading: the patch tokens join the joint space the way the class token does."""
    check_prompts_keys()


@pytest.mark.prompts
def test_prompts_start_as_scaled_class_features():
    """Output projections at zero and gamma at 0.1: c_hat = 1.1 c, the same cosines as c."""
    vp = tiny_model().prompt_generator
    c, patches = class_features(), torch.randn(B, K, E)
    with torch.no_grad():
        assert_matches(vp(c, patches), 1.1 * c.expand(B, C, E), "prompts at init: c_hat = 1.1 c")


# ----------------------------------------------------------------------------------------------
# Eq. (8): logits = exp(logit_scale) * cos(F_V, c_hat), CLIP's frozen logit scale.

def cosine_oracle(v, c, scale):
    """v (B, E); c (C, E) shared, or (B, C, E) per video; scale a tensor (log of the factor)."""
    c = c.expand(v.shape[0], *c.shape[-2:])
    rows = []
    for b in range(v.shape[0]):
        rows.append(torch.stack([(v[b] * c[b, j]).sum() / (v[b].norm() * c[b, j].norm())
                                 for j in range(c.shape[1])]))
    return torch.exp(scale) * torch.stack(rows)


def check_eq8_cosine(oc=omniclip):
    g = torch.Generator().manual_seed(8)
    v, c = torch.randn(B, 8, generator=g), torch.randn(C, 8, generator=g)     # (B, E), (C, E)
    per_video = torch.randn(B, C, 8, generator=g)                                # (B, C, E)
    scale = torch.tensor(1.7)
    for t in (v, c, per_video, scale):
        t.requires_grad_()
    inputs = {"F_V": v, "the class features": c, "the logit scale": scale}
    assert_values_and_gradients(oc.cosine_logits(v, c, scale), cosine_oracle(v, c, scale),
                                "Eq. (8) exp(s) * cos(F_V, F_T), class features (C, E)", inputs)
    inputs["the class features"] = per_video
    assert_values_and_gradients(oc.cosine_logits(v, per_video, scale), cosine_oracle(v, per_video, scale),
                                "Eq. (8) exp(s) * cos(F_V, c_hat), class features per video (B, C, E)", inputs)


def check_eq8_wiring(oc=omniclip, video_prompts=True):
    model = use_stand_ins(randomize(tiny_model(oc, pta=False, video_prompts=video_prompts)))
    with torch.no_grad():
        model.clip.logit_scale.fill_(2.1)
    c = class_features()
    logits = run(model, c=c)
    check(len(model.frame_aggregation.outputs) == 1, "Eq. (8)", "F_V must come from the Eq. (5) head")
    F_V = model.frame_aggregation.outputs[0]
    c_hat = model.prompt_generator.outputs[0] if video_prompts else c
    assert_values_and_gradients(logits, cosine_oracle(F_V, c_hat, torch.tensor(2.1)),
                                f"Eq. (8) logits = exp(CLIP's logit scale) * cos(F_V of Eq. 5, "
                                f"{'c_hat of the prompts' if video_prompts else 'class features'})",
                                trainable(model, "temporal_embedding"))


@pytest.mark.eq8
def test_eq8_cosine_logits_match_their_oracle():
    check_eq8_cosine()


@pytest.mark.eq8
@pytest.mark.parametrize("video_prompts", [True, False])
def test_eq8_logits_compare_video_features_with_class_features(video_prompts):
    check_eq8_wiring(video_prompts=video_prompts)


# ----------------------------------------------------------------------------------------------
# Eq. (9): cross-entropy of softmax(logits), averaged over the batch; soft targets (mixup/cutmix)
# and label smoothing as Table 1 asks. The paper writes a sum over samples: we take the mean,
# which only rescales the learning rate.

def check_eq9_loss(oc=omniclip):
    g = torch.Generator().manual_seed(10)
    logits = (3 * torch.randn(4, 7, generator=g)).requires_grad_()
    labels = torch.tensor([0, 3, 6, 2])
    log_p = torch.stack([row - torch.log(torch.exp(row).sum()) for row in logits])  # log softmax per video
    one_hot = torch.eye(7)[labels]
    wrt = {"the logits": logits}
    assert_values_and_gradients(oc.video_loss(logits, labels), -(one_hot * log_p).sum(-1).mean(),
                                "Eq. (9) -mean_i log softmax(sim_i)[y_i]", wrt)
    soft = torch.softmax(torch.randn(4, 7, generator=g), dim=-1)   # mixup targets: not one-hot
    assert_values_and_gradients(oc.video_loss(logits, soft), -(soft * log_p).sum(-1).mean(),
                                "Eq. (9) with soft targets: -mean_i sum_c y_ic log softmax(sim_i)_c", wrt)
    smooth = 0.9 * one_hot + 0.1 / 7
    assert_values_and_gradients(oc.video_loss(logits, labels, label_smoothing=0.1),
                                -(smooth * log_p).sum(-1).mean(),
                                "Eq. (9) with label smoothing 0.1: targets 0.9 one-hot + 0.1 / C", wrt)
    half = oc.video_loss(logits.detach().bfloat16(), labels)
    check(half.dtype == torch.float32, "Eq. (9)", f"the loss is computed in fp32, got {half.dtype}")
    bf16_log_p = torch.log_softmax(logits.detach().bfloat16().float(), dim=-1)
    assert_matches(half.reshape(()), -(one_hot * bf16_log_p).sum(-1).mean(), "Eq. (9) on bf16 logits, in fp32")


@pytest.mark.eq9
def test_eq9_loss_matches_its_oracle():
    check_eq9_loss()


# ----------------------------------------------------------------------------------------------
# Properties of the whole model. They run every part at once, so they carry the marker of each
# part they run (`model` too): they teach what the parts add up to.

PARTS = ("eq1", "eq4", "eq5", "eq6", "eq7", "eq8", "eq9", "prompts")


def part_of(name):
    """The part of the paper a model tensor belongs to, from its name."""
    parts = (("temporal_embedding", "Eq. (1) TE"), ("spg", "Eq. (6) SPG"), ("frame_aggregation", "Eq. (5)"),
             ("prompt_generator", "video-specific prompts"), ("clip.", "the frozen CLIP"))
    if name.startswith("blocks."):
        return "Eq. (4) alpha" if name.endswith("alpha") else "Eq. (7) PTA"
    return next((part for prefix, part in parts if name.startswith(prefix)), name)


def runs_every_part(test):
    """The markers of a test that runs the whole model: `pytest -m eq6` includes it."""
    for name in ("model",) + PARTS:
        test = getattr(pytest.mark, name)(test)
    return test


@pytest.mark.model
@pytest.mark.eq1
@pytest.mark.eq4
@pytest.mark.eq5
@pytest.mark.eq7
@pytest.mark.eq8
@pytest.mark.prompts
@pytest.mark.table11
@pytest.mark.parametrize("connection", ["block-parallel", "attention-parallel"])
def test_model_identity_at_init_equals_frame_average_clip(connection):
    """With SPG off, an untrained OmniCLIP is CLIP averaging its frames: the same probabilities,
    because TE, every Up, the Eq. (5) output and the prompts' output projections start at zero."""
    model = tiny_model(spg=False, connection=connection)
    baseline = omniclip.FrameAverageCLIP(model.clip)
    x, c = videos(), class_features()
    with torch.no_grad():
        ours, theirs = model(x, c).softmax(-1), baseline(x, c).softmax(-1)
    assert_matches(ours, theirs, "identity at init: OmniCLIP = frame-average CLIP")
    randomize(model)                                            # the test can fail: trained adapters differ
    with torch.no_grad():
        assert not torch.allclose(model(x, c).softmax(-1), theirs, atol=1e-3)


@runs_every_part
def test_model_trainable_tensors_are_exactly_the_adapters_and_all_get_gradients():
    model = randomize(tiny_model())         # a zero Up would stop the gradients of Down and Attn
    loss = omniclip.video_loss(model.train()(videos(), class_features()), torch.tensor([1, 2]))
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = sorted(set(model.trainable_state_dict()) - trainable)
    assert not frozen, (f"{part_of(frozen[0])}: {frozen[0]} does not train (a buffer, or requires_grad "
                        f"False): every new tensor is learnable, and a checkpoint holds exactly them")
    assert trainable == set(model.trainable_state_dict()), "a checkpoint holds the trainable tensors"
    assert {n.split(".")[0] for n in trainable} == {
        "temporal_embedding", "spg", "blocks", "frame_aggregation", "prompt_generator"}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{part_of(name)}: {name} gets no gradient"
        else:
            assert name.startswith("clip.") and p.grad is None, f"{part_of(name)}: {name} should train"


@runs_every_part
def test_model_trainable_state_dict_round_trip_is_strict():
    model, other = randomize(tiny_model(), clip_norms=False), tiny_model()
    other.load_trainable_state_dict(model.trainable_state_dict())
    with torch.no_grad():
        assert torch.equal(model(videos(), class_features()), other(videos(), class_features()))
    assert not any(k.startswith("clip.") for k in model.trainable_state_dict())
    with pytest.raises(KeyError, match="missing"):
        tiny_model(pta_layers=[0]).load_trainable_state_dict(model.trainable_state_dict())
    state = model.trainable_state_dict()
    te = next(k for k in state if k.startswith("temporal_embedding"))   # (T, D), or an Embedding's weight
    state[te] = torch.zeros(state[te].numel() + D)                      # one frame too many
    with pytest.raises(ValueError, match="temporal_embedding"):
        other.load_trainable_state_dict(state)
