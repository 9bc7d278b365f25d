"""The model, one equation at a time. Read each test beside its equation in the paper (Sec. 3).

How these tests are built, so that they turn red on a wrong line and say which equation it is in:
- an oracle per equation: the expected output is computed here, from the module's own weights,
  with plain tensor operations (a loop over frames or token positions, an explicit softmax over the
  keys with its 1/sqrt(d) scale, heads cut as contiguous channel blocks), on tiny sizes, after every
  zero-initialised tensor has been moved off zero (`randomize`): a check cannot pass by zeros;
- isolation: a test feeds its equation reference inputs and replaces the model's other new modules
  by simple stand-ins (`use_stand_ins`), so a wrong Eq. (6) turns Eq. (6)'s tests red and no others;
- each check is a plain function `check_...(oc)` that raises AssertionError with a message naming
  the equation and the first wrong value (expected, got, where). tests/test_misreadings.py breaks
  the model on purpose, the paper read another way, and asserts that the check catches it.

Every test carries its equation's marker: `pytest -m eq7` runs exactly Eq. (7)'s tests, and
`pytest --impl=my_omniclip.py -m eq7` runs them on your own file. All on CPU in seconds, with the
`tiny` architecture (the same code path as ViT-B/16: D = E = 128, 4x4 patches), 3 layers deep.
"""
import math

import pytest
import torch
import torch.nn as nn

import omniclip

T, B, C = 4, 2, 3          # frames, videos, classes in the tiny tests
D = E = 128                # the tiny architecture's ViT width and joint embedding
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
    arch = dict(oc.ARCHITECTURES["tiny"], vision_layers=3, vocab_size=1000, text_layers=1)
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
                if p.dim() == 2 and "weight" in name:
                    noise /= math.sqrt(p.shape[1])
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
    """torch.testing.assert_close, its message naming the equation and the first wrong value."""
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise AssertionError(f"{what}: shape: expected {tuple(expected.shape)}, got {shape}")
    torch.testing.assert_close(
        got.detach().float(), expected.detach().float(), atol=atol, rtol=rtol,
        msg=lambda m: f"{what}: {first_wrong(got.detach(), expected.detach(), atol, rtol)}\n{m}")


def check(condition, what, detail):
    if not condition:
        raise AssertionError(f"{what}: {detail}")


# ----------------------------------------------------------------------------------------------
# Plain-tensor oracles of the building blocks. Written for one sequence at a time: (L, d).

def linear(x, layer):
    return torch.einsum("...i,oi->...o", x, layer.weight) + layer.bias


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


def attention(x, attn, context=None, causal=False):
    """Multi-head attention of queries x (L, d) on keys/values `context` (S, d), x itself when
    None. Heads are 64 channels wide (ViT's), each a contiguous block of the projected channels.
    Weights in nn.MultiheadAttention's layout: in_proj rows are [W_q; W_k; W_v]."""
    d = x.shape[-1]
    heads = max(1, d // 64)
    w = d // heads
    kv = x if context is None else context
    W = attn.in_proj_weight
    b = torch.zeros(3 * d) if attn.in_proj_bias is None else attn.in_proj_bias
    q = x @ W[:d].T + b[:d]                                     # (L, d)
    k = kv @ W[d:2 * d].T + b[d:2 * d]                          # (S, d)
    v = kv @ W[2 * d:].T + b[2 * d:]                            # (S, d)
    out = []
    for h in range(heads):
        cols = slice(h * w, (h + 1) * w)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(w)       # (L, S)
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores).triu(1).bool(), float("-inf"))
        out.append(softmax_over_keys(scores) @ v[:, cols])      # (L, w)
    return linear(torch.cat(out, dim=-1), attn.out_proj)        # (L, d)


# ----------------------------------------------------------------------------------------------
# Stand-ins: simple modules the tests trust, put in place of the new modules a test does not
# check, so that a wrong (or still empty) PTA, SPG, Eq. (5) head or prompt generator cannot turn
# the tests of other equations red.

class Stop(Exception):
    """Raised by a hook or a stand-in once the test has what it needs: the rest does not run
    (so a later equation, right or wrong or still empty, cannot fail this test)."""


class StandInAdapter(nn.Module):
    """In place of the temporal adapter: each token mixed with itself one frame earlier."""

    def forward(self, x, frames):                               # (B·T, N, D)
        y = x.unflatten(0, (-1, frames))                        # (B, T, N, D)
        return (0.5 * y.roll(1, dims=1) - 0.25 * torch.tanh(y)).flatten(0, 1)


class StandInPrompts(nn.Module):
    """In place of the SPG: K/4 tokens made from the patches, recording what it was given."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, patches):                                 # (B·T, K, D) -> (B·T, K/4, D)
        self.inputs.append(patches)
        return 0.5 * patches[:, :PROMPTS].flip(1) + 1.0


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
    """Replace every new module (adapters, SPG, Eq. 5 head, prompt generator) by its stand-in.
    The frozen CLIP, the temporal embedding and the blocks' fusion (Eq. 4) stay."""
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
    with torch.no_grad():
        return model.blocks[str(i)](x, vit, T) if str(i) in model.blocks else vit(x)


def run(model, x=None, c=None):
    """The forward pass, stopped early if a hook says so."""
    try:
        with torch.no_grad():
            return model(videos() if x is None else x, class_features() if c is None else c)
    except Stop:
        return None


# ----------------------------------------------------------------------------------------------
# Eq. (1): V0 = X0 + PE + TE. Patch embedding, class token, positional embedding (CLIP's, frozen)
# and the learnable temporal embedding TE (T, D), one row per frame added to every token of it.

def eq1_oracle(model, x):
    """V0 of Eq. (1) then CLIP's ln_pre, frame by frame: (B·T, 1+K, D)."""
    visual = model.clip.visual
    P = visual.conv1.weight.shape[-1]
    W = visual.conv1.weight.reshape(D, -1)                      # (D, 3·P·P)
    out = []
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            frame, g = x[b, t], x.shape[-1] // P                # (3, H, W)
            patches = torch.stack([frame[:, i * P:(i + 1) * P, j * P:(j + 1) * P].reshape(-1)
                                   for i in range(g) for j in range(g)])  # (K, 3·P·P), row by row
            X0 = torch.cat([visual.class_embedding[None], patches @ W.T])  # (1+K, D)
            V0 = X0 + visual.positional_embedding + model.temporal_embedding[t]
            out.append(layer_norm(V0, visual.ln_pre))
    return torch.stack(out)


def check_eq1_temporal_embedding(oc=omniclip):
    model = randomize(tiny_model(oc, pta=False, spg=False))     # Eqs. (4), (6) cannot interfere
    seen = record_layer_inputs(model, stop_after_first=True)
    x = videos()
    run(model, x)
    assert_matches(seen[0], eq1_oracle(model, x),
                   "Eq. (1) V0 = X0 + PE + TE (then CLIP's ln_pre), tokens of the first layer")


@pytest.mark.eq1
def test_eq1_temporal_embedding_is_a_learnable_T_by_D_table_starting_at_zero():
    model = tiny_model()
    te = model.temporal_embedding
    assert te.shape == (T, D) and te.requires_grad, "Eq. (1): TE is a learnable (T, D) table"
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
    frames = seen[0].unflatten(0, (B, T))                       # (B, T, N, D)
    assert torch.allclose(frames[:, 0], frames[:, -1]), "Eq. (1): TE = 0 must leave frames equal"
    with torch.no_grad():
        model.temporal_embedding.normal_()
    seen.clear()
    run(model, still)
    frames = seen[0].unflatten(0, (B, T))
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
    x = torch.randn(3, 6, D)                                    # (frames, tokens, D)
    expected = []
    for seq in x:                                               # one frame at a time: (N, D)
        seq = seq + attention(layer_norm(seq, block.ln_1), block.attn, causal=causal)
        hidden = quick_gelu(linear(layer_norm(seq, block.ln_2), block.mlp.c_fc))
        expected.append(seq + linear(hidden, block.mlp.c_proj))
    with torch.no_grad():
        assert_matches(block(x), torch.stack(expected),
                       f"Eq. (2) CLIP's {'causal ' if causal else ''}layer: V + Attn(LN V), then + MLP(LN V)")


@pytest.mark.eq2
@pytest.mark.clip
@pytest.mark.parametrize("causal", [False, True], ids=["image", "text"])
def test_eq2_vit_layer_is_clips_pre_layernorm_block(causal):
    check_eq2_clip_layer(causal=causal)


# ----------------------------------------------------------------------------------------------
# Eqs. (2)-(4): V^i = ViT(V^{i-1}) + alpha_i * PTA(V^{i-1}), both branches fed the same V^{i-1}.
# The adapter is a stand-in here: these tests check the fusion, whatever adapter is plugged in.

def check_eq4_fusion(oc=omniclip, connection="block-parallel"):
    model = randomize(tiny_model(oc, connection=connection))
    block, vit = model.blocks["1"], model.clip.visual.transformer.resblocks[1]
    block.pta = adapter = StandInAdapter()
    x = torch.randn(B * T, 1 + K + PROMPTS, D, generator=torch.Generator().manual_seed(5))
    for alpha in (0.37, -1.3):
        with torch.no_grad():
            block.alpha.fill_(alpha)
            got = block(x, vit, T)
            if connection == "block-parallel":                  # Fig. 5(c)
                expected = vit(x) + alpha * adapter(x, T)       # Eqs. (2)-(4)
                what = f"Eq. (4) V = ViT(V) + alpha * PTA(V), alpha = {alpha}"
            else:                                               # Fig. 5(b): beside the attention
                h = x + vit.attn(vit.ln_1(x)) + alpha * adapter(x, T)
                expected = h + vit.mlp(vit.ln_2(h))
                what = (f"Table 11 attention-parallel: V + Attn(LN V) + alpha * PTA(V), then the MLP, "
                        f"alpha = {alpha}")
        assert_matches(got, expected, what)


def check_eq4_layers_in_sequence(oc=omniclip, what="Eq. (4)", layers_with_adapter=None, tokens=None,
                                 **options):
    """Layer i's output is layer i+1's input: block(V, vit, T) where layer i has an adapter,
    CLIP's own layer where it has none. (Eq. 5 and the prompts check what the last one feeds.)"""
    model = use_stand_ins(randomize(tiny_model(oc, **options)))
    if layers_with_adapter is not None:
        check(sorted(model.blocks, key=int) == [str(i) for i in layers_with_adapter], what,
              f"layers with an adapter: expected {layers_with_adapter}, got {sorted(model.blocks, key=int)}")
    seen = record_layer_inputs(model)
    with torch.no_grad():
        model.encode_frames(videos())                           # the layers only: not Eqs. (5), (8)
    resblocks = model.clip.visual.transformer.resblocks
    check(len(seen) == len(resblocks), what,
          f"every CLIP layer runs once: expected {len(resblocks)} layer inputs, got {len(seen)}")
    for i in range(len(resblocks)):
        x = seen[i]
        if tokens is not None:                                  # how many is Eq. (6)'s business
            check(x.shape == (B * T, tokens, D), what,
                  f"layer {i} input: expected shape {(B * T, tokens, D)}, got {tuple(x.shape)}")
        if i + 1 < len(resblocks):
            assert_matches(seen[i + 1], layer_output(model, i, x),
                           f"{what}: layer {i}'s output is layer {i + 1}'s input")


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
    alphas = [block.alpha for block in tiny_model().blocks.values()]
    assert len(alphas) == 3 and len({id(a) for a in alphas}) == 3, "Eq. (4): one alpha per layer"
    for a in alphas:
        assert a.shape == () and a.requires_grad and a.item() == 1.0, "Eq. (4): scalar, learnable, init 1"


@pytest.mark.eq4
@pytest.mark.table11
def test_table11_attention_parallel_puts_the_adapter_beside_the_attention_not_the_mlp():
    check_eq4_fusion(connection="attention-parallel")
    check_eq4_layers_in_sequence(what="Table 11 attention-parallel", connection="attention-parallel")


@pytest.mark.eq4
@pytest.mark.table11
def test_table11_unknown_connections_are_refused():
    with pytest.raises(ValueError, match="connection"):
        tiny_config(connection="serial")


@pytest.mark.eq4
@pytest.mark.table10
def test_table10_pta_layers_choose_which_layers_get_an_adapter():
    check_eq4_layers_in_sequence(what="Table 10 pta_layers=[0, 2]", layers_with_adapter=[0, 2],
                                 pta_layers=[2, 0])
    with pytest.raises(ValueError, match="pta_layers"):
        tiny_config(pta_layers=[3])                             # the test model has layers 0-2


@pytest.mark.eq4
@pytest.mark.table7
def test_table7_without_pta_every_layer_is_clips_own():
    check_eq4_layers_in_sequence(what="Table 7 pta=False", layers_with_adapter=[], pta=False)


# ----------------------------------------------------------------------------------------------
# Eq. (6): R = Projector(Avg(V0)). 2x2 pooling of each frame's patch grid (class token excluded),
# a residual two-layer MLP, and the K/4 prompts appended after the patches, through ln_pre.

def eq6_oracle(spg, patches, grid, pooling, projector):
    """(n, K, D) patches -> (n, ceil(g/2)^2, D) prompts, cell by cell of the pooled grid."""
    n, _, width = patches.shape
    tokens = patches.reshape(n, grid, grid, width)              # patch k sits at (k // g, k % g)
    cells = []
    for i in range(0, grid, 2):
        for j in range(0, grid, 2):
            cell = tokens[:, i:i + 2, j:j + 2].reshape(n, -1, width)  # 4 patches, fewer at an odd edge
            cells.append(cell.mean(dim=1) if pooling == "avg" else cell.amax(dim=1))
    A = torch.stack(cells, dim=1)                               # (n, K/4, D): Avg(V0)
    if not projector:
        return A
    first, last = spg.projector[0], spg.projector[2]
    return A + linear(gelu(linear(A, first)), last)             # Projector, residual


def check_eq6_spg(spg, grid=4, pooling="avg", projector=True, width=D):
    randomize(spg.requires_grad_())
    patches = torch.randn(3, grid * grid, width, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = spg(patches)
    what = f"Eq. (6) R = Projector(Avg(V0)), {pooling} pooling, projector {'on' if projector else 'off'}"
    if projector:
        check(spg.projector is not None, what, "the model has no projector")
    else:
        check(spg.projector is None, what, "projector=False must build no projector")
    assert_matches(got, eq6_oracle(spg, patches, grid, pooling, projector), what)


def check_eq6_wiring(oc=omniclip):
    model = use_stand_ins(randomize(tiny_model(oc, pta=False)))
    what = "Eq. (6) wiring: SPG(patches of V0, after TE), prompts appended, all through ln_pre"
    seen = record_layer_inputs(model)
    with torch.no_grad():
        model.encode_frames(videos())                           # the layers only: not Eqs. (5), (8)
    check(len(model.spg.inputs) == 1, what, f"SPG called {len(model.spg.inputs)} times, expected once")
    patches, first = model.spg.inputs[0], seen[0]
    check(patches.shape == (B * T, K, D), what,
          f"SPG input: expected the K patch tokens {(B * T, K, D)}, got {tuple(patches.shape)}")
    check(first.shape == (B * T, 1 + K + PROMPTS, D), what,
          f"first layer input: expected 1 + K + K/4 tokens, got shape {tuple(first.shape)}")
    ln_pre = model.clip.visual.ln_pre
    with torch.no_grad():
        assert_matches(first[:, 1:1 + K], layer_norm(patches, ln_pre),
                       what + ": the SPG sees the patch tokens the ViT sees (V0 with TE, no class token)")
        prompts = 0.5 * patches[:, :PROMPTS].flip(1) + 1.0      # what the stand-in SPG returned
        assert_matches(first[:, 1 + K:], layer_norm(prompts, ln_pre), what + ": prompts after the patches")
    for i, x in enumerate(seen):
        check(x.shape[1] == 1 + K + PROMPTS, what,
              f"layer {i} sees {x.shape[1]} tokens, expected {1 + K + PROMPTS}")


def check_eq6_model_spg(oc=omniclip):
    check_eq6_spg(tiny_model(oc).spg)


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
    with torch.no_grad():
        assert_matches(spg(patches), eq6_oracle(spg, patches, 4, "avg", projector=False),
                       "Eq. (6) at init: R = Avg(V0)")


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
def test_eq6_odd_patch_grid_pools_with_ceil():
    """ViT-B/32 has a 7x7 grid: 4x4 prompts, the last row and column pooled over what is there."""
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

def eq7_oracle(pta, x, frames):
    """One token position of one video at a time: a (T, D) sequence through Down, LN + MHA, Up."""
    out = torch.empty(x.shape[0], x.shape[1], pta.up.out_features)
    for b in range(x.shape[0] // frames):
        rows = slice(b * frames, (b + 1) * frames)              # the T frames of video b
        for n in range(x.shape[1]):
            h = linear(x[rows, n], pta.down)                    # (T, d): Down
            h = attention(layer_norm(h, pta.ln), pta.attn)      # (T, d): Attn, over time
            out[rows, n] = linear(h, pta.up)                    # (T, D): Up
    return out


def check_eq7_pta(oc=omniclip, width=512, ratio=0.25, pta=None):
    torch.manual_seed(0)
    pta = randomize(oc.ParallelTemporalAdapter(width, ratio) if pta is None else pta)
    width = pta.up.out_features
    what = f"Eq. (7) PTA = Up(Attn(Down(V))), width {width}, temporal ratio {ratio}"
    check(pta.down.out_features == int(width * ratio), what,
          f"Down: expected {int(width * ratio)} channels (width x ratio), got {pta.down.out_features}")
    x = torch.randn(B * T, 3, width, generator=torch.Generator().manual_seed(9))  # (B·T, N, D)
    with torch.no_grad():
        assert_matches(pta(x, T), eq7_oracle(pta, x, T), what)


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
            assert torch.count_nonzero(block.pta.up.weight) == 0, f"Eq. (7): layer {i}'s Up starts at 0"
            assert torch.count_nonzero(block.pta.up.bias) == 0, f"Eq. (7): layer {i}'s Up starts at 0"
            check_eq7_pta(pta=block.pta)


@pytest.mark.eq7
@pytest.mark.table8
@pytest.mark.parametrize("ratio", [1 / 8, 1 / 2, 1])
def test_eq7_table8_temporal_ratio_sets_the_bottleneck(ratio):
    check_eq7_pta(width=512, ratio=ratio)                       # 64, 256, 512 channels: 1, 4, 8 heads
    for block in tiny_model(temporal_ratio=ratio).blocks.values():
        if isinstance(block.pta, omniclip.ParallelTemporalAdapter):
            assert block.pta.down.out_features == int(D * ratio), "Table 8: the config's ratio"


# ----------------------------------------------------------------------------------------------
# Eq. (5): F_V = Avg(MHA([F_1 .. F_T])) on the class token of each frame after ln_post and proj.
# Our reading adds a residual and a LayerNorm: F_V = mean_t(F + MHA(LN(F))).

def check_eq5_head(oc=omniclip, head=None):
    torch.manual_seed(0)
    head = randomize(oc.FrameAggregation(E) if head is None else head)
    F_ = torch.randn(B, T, E, generator=torch.Generator().manual_seed(4))   # (B, T, E)
    expected = torch.stack([(f + attention(layer_norm(f, head.ln), head.attn)).mean(dim=0)
                            for f in F_])                       # one video at a time, mean over T
    with torch.no_grad():
        assert_matches(head(F_), expected, "Eq. (5) F_V = mean over frames of F + MHA(LN(F))")


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
    assert_matches(model.frame_aggregation.inputs[0], expected, what)


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

def prompts_oracle(vp, c, patches):
    out = []
    for p in patches:                                           # one video at a time: (K, E)
        kv = layer_norm(p, vp.ln)
        x = c.clone()                                           # (C, E): the queries
        for block in vp.blocks:
            x = x + attention(layer_norm(x, block.ln_1), block.attn, context=kv)
            x = x + linear(quick_gelu(linear(layer_norm(x, block.ln_2), block.mlp.c_fc)), block.mlp.c_proj)
        out.append(c + vp.gamma * x)
    return torch.stack(out)                                     # (B, C, E)


def check_prompts_generator(oc=omniclip, vp=None):
    torch.manual_seed(0)
    vp = randomize(oc.VideoSpecificPrompt(E, layers=2) if vp is None else vp)
    c = torch.randn(C, E, generator=torch.Generator().manual_seed(2))
    patches = torch.randn(B, 5, E, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert_matches(vp(c, patches), prompts_oracle(vp, c, patches),
                       "video-specific prompts: c + gamma * c_tilde, c_tilde = blocks of "
                       "x + CrossAttn(LN x, LN patches), x + MLP(LN x)")


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
    assert_matches(patches, tokens.mean(dim=1), what)
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
    patches, visual = torch.randn(B * T, K, D), model.clip.visual
    with torch.no_grad():
        got = model.prompt_generator.project_patches(patches, visual)
    assert_matches(got, layer_norm(patches, visual.ln_post) @ visual.proj,
                   "video-specific prompts: keys/values = ln_post(patch tokens) @ proj")


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
    """v (B, E); c (C, E) shared, or (B, C, E) per video."""
    c = c.expand(v.shape[0], *c.shape[-2:])
    out = torch.empty(v.shape[0], c.shape[1])
    for b in range(v.shape[0]):
        for j in range(c.shape[1]):
            out[b, j] = (v[b] * c[b, j]).sum() / (v[b].norm() * c[b, j].norm())
    return math.exp(scale) * out


def check_eq8_cosine(oc=omniclip):
    g = torch.Generator().manual_seed(8)
    v, c = torch.randn(B, 8, generator=g), torch.randn(C, 8, generator=g)     # (B, E), (C, E)
    per_video = torch.randn(B, C, 8, generator=g)                                # (B, C, E)
    scale = torch.tensor(1.7)
    assert_matches(oc.cosine_logits(v, c, scale), cosine_oracle(v, c, 1.7),
                   "Eq. (8) exp(s) * cos(F_V, F_T), class features (C, E)")
    assert_matches(oc.cosine_logits(v, per_video, scale), cosine_oracle(v, per_video, 1.7),
                   "Eq. (8) exp(s) * cos(F_V, c_hat), class features per video (B, C, E)")


def check_eq8_wiring(oc=omniclip, video_prompts=True):
    model = use_stand_ins(randomize(tiny_model(oc, pta=False, video_prompts=video_prompts)))
    with torch.no_grad():
        model.clip.logit_scale.fill_(2.1)
    c = class_features()
    logits = run(model, c=c)
    check(len(model.frame_aggregation.outputs) == 1, "Eq. (8)", "F_V must come from the Eq. (5) head")
    F_V = model.frame_aggregation.outputs[0]
    c_hat = model.prompt_generator.outputs[0] if video_prompts else c
    assert_matches(logits, cosine_oracle(F_V, c_hat, 2.1),
                   f"Eq. (8) logits = exp(CLIP's logit scale) * cos(F_V of Eq. 5, "
                   f"{'c_hat of the prompts' if video_prompts else 'class features'})")


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
    logits = 3 * torch.randn(4, 7, generator=g)
    labels = torch.tensor([0, 3, 6, 2])
    log_p = torch.stack([row - torch.log(torch.exp(row).sum()) for row in logits])  # log softmax per video
    one_hot = torch.eye(7)[labels]
    assert_matches(oc.video_loss(logits, labels), -(one_hot * log_p).sum(-1).mean(),
                   "Eq. (9) -mean_i log softmax(sim_i)[y_i]")
    soft = torch.softmax(torch.randn(4, 7, generator=g), dim=-1)   # mixup targets: not one-hot
    assert_matches(oc.video_loss(logits, soft), -(soft * log_p).sum(-1).mean(),
                   "Eq. (9) with soft targets: -mean_i sum_c y_ic log softmax(sim_i)_c")
    smooth = 0.9 * one_hot + 0.1 / 7
    assert_matches(oc.video_loss(logits, labels, label_smoothing=0.1), -(smooth * log_p).sum(-1).mean(),
                   "Eq. (9) with label smoothing 0.1: targets 0.9 one-hot + 0.1 / C")
    half = oc.video_loss(logits.bfloat16(), labels)
    check(half.dtype == torch.float32, "Eq. (9)", f"the loss is computed in fp32, got {half.dtype}")
    bf16_log_p = torch.log_softmax(logits.bfloat16().float(), dim=-1)
    assert_matches(half, -(one_hot * bf16_log_p).sum(-1).mean(), "Eq. (9) on bf16 logits, in fp32")


@pytest.mark.eq9
def test_eq9_loss_matches_its_oracle():
    check_eq9_loss()


# ----------------------------------------------------------------------------------------------
# Properties of the whole model. They run every part at once, so they carry the marker of each
# part they run (`model` too): they teach what the parts add up to.

def runs_every_part(test):
    """The markers of a test that runs the whole model: `pytest -m eq6` includes it."""
    for name in ("model", "eq1", "eq4", "eq5", "eq6", "eq7", "eq8", "eq9", "prompts"):
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
    assert trainable == set(model.trainable_state_dict()), "a checkpoint holds the trainable tensors"
    assert {n.split(".")[0] for n in trainable} == {
        "temporal_embedding", "spg", "blocks", "frame_aggregation", "prompt_generator"}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"
        else:
            assert name.startswith("clip.") and p.grad is None, f"{name} should be frozen CLIP"


@runs_every_part
def test_model_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for flag in (False, True):
        model = randomize(tiny_model(gradient_checkpointing=flag).train())
        omniclip.video_loss(model(videos(), class_features()), torch.tensor([0, 1])).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        assert_matches(grads[1][name], grads[0][name], f"gradient checkpointing: {name}", atol=1e-5)


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
    state["temporal_embedding"] = torch.zeros(T + 1, D)
    with pytest.raises(ValueError, match="temporal_embedding"):
        other.load_trainable_state_dict(state)
