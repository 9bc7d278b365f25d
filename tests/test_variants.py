"""The other readings of the paper, one flag away, each checked against a computation written here.

- SPG once or per layer (Sec. 3.1 vs Sec. 3.2-3.3, `spg_per_layer`), marker `spg`;
- Table 11's cascade as ST-Adapter (Sec. 4.4, `connection="cascade"`), marker `table11`;
- X-CLIP's own prompt generator (Sec. 3.1 "following [26]", `prompt_generator="xclip"`), marker `prompts`;
- multiply-adds (marker `cost`): the cost model `analytic_macs` against torch's flop counter run
  here, for every variant, and for an adapter the file does not know (a fork's), which is counted,
  not assumed.

These tests use only public names and the block's `pta` attribute, so they pass on a forked file too
(`pytest --impl my_omniclip.py`): where a test is about the PTA it builds a model that has one.
Each test carries the marker of every part (Eqs. 1, 4-9, prompts) it runs: tests/test_isolation.py
empties the others while it runs.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import omniclip as oc
from test_omniclip import PARTS, attention_weights, in_prompt_order_of, linears, temporal_embedding

T = 4  # frames
W = 256  # the ViT width: tiny's 128 doubled, so the PTA (W/4) is one 64-channel head, as the
         # paper's head width, however a learner counts heads (`d // 64`)


def runs(*parts):
    """The markers of the parts a test runs: `pytest -m eq7` includes it, and emptying any other
    part cannot turn it red (tests/test_isolation.py checks)."""
    def mark(test):
        for name in parts:
            test = getattr(pytest.mark, name)(test)
        return test
    return mark


def tiny_model(**options):
    torch.manual_seed(0)
    arch = dict(oc.ARCHITECTURES["tiny"], vision_width=W, vocab_size=1000, text_layers=1)  # text never runs
    config = oc.OmniCLIPConfig(**arch, frames=T, **options)
    return oc.OmniCLIP(config).eval()


def move_off_init(module, seed=1, scale=0.1):
    """Every trainable tensor moved off its init (zeros included), so nothing holds by zeros alone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def video(B=2, seed=0):
    return torch.randn(B, T, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def class_features(C=5, E=128, seed=3):
    return torch.randn(C, E, generator=torch.Generator().manual_seed(seed))


def pool_2x2(tokens, grid):
    """Table 9's 'Avg.': mean of each 2x2 patch square, row-major, (B·T, K, D) -> (B·T, K/4, D)."""
    BT, K, D = tokens.shape
    squares = tokens.reshape(BT, grid // 2, 2, grid // 2, 2, D)        # rows, 2, cols, 2
    return squares.mean(dim=(2, 4)).reshape(BT, K // 4, D)


def record_layer_inputs(model):
    """The tokens entering each frozen layer, (B·T, N, D), caught at its first LayerNorm."""
    seen, hooks = [], []
    for vit in model.clip.visual.transformer.resblocks:
        hooks.append(vit.ln_1.register_forward_pre_hook(lambda m, args: seen.append(args[0])))
    return seen, hooks


# ------------------------------------------------------------------------------------------------
# SPG once or per layer

@pytest.mark.spg
@runs("eq1", "eq6")
def test_spg_per_layer_prompts_are_each_layers_pooled_patches():
    """Per layer, R^i = Avg(V^i) (projector off): the prompts entering layer i are the 2x2 averages
    of the patch tokens entering it, so they change from layer to layer. Made once, they are not.
    The prompts carry no position: compared up to one order of the prompt tokens."""
    K, g = 16, 4
    for per_layer in (True, False):
        model = tiny_model(spg_per_layer=per_layer, spg_projector=False, pta=False, video_prompts=False)
        move_off_init(model)                                   # the layers really change the tokens
        seen, hooks = record_layer_inputs(model)
        with torch.no_grad():
            model.encode_frames(video())
        for hook in hooks:
            hook.remove()
        assert len(seen) == 4 and all(x.shape[1] == 1 + K + K // 4 for x in seen)
        for i in range(1, 4):
            pooled = pool_2x2(seen[i][:, 1:1 + K], g)
            prompts = in_prompt_order_of(seen[i][:, 1 + K:], pooled)
            if per_layer:
                torch.testing.assert_close(prompts, pooled, atol=1e-5, rtol=1e-5, msg=lambda m: (
                    f"Eq. (6) per layer: prompts entering layer {i} are not Avg(V^{i}): {m}"))
                assert not torch.allclose(prompts, seen[i - 1][:, 1 + K:], atol=1e-3), (
                    f"Eq. (6) per layer: prompts of layer {i} equal those of layer {i - 1}")
            else:
                assert not torch.allclose(prompts, pooled, atol=1e-3), (
                    "Eq. (6) once: prompts were regenerated at a later layer")


@pytest.mark.spg
@runs("eq1", "eq6")
def test_spg_per_layer_whole_path_matches_an_oracle():
    """The whole per-layer path with the projector on: R^0 = SPG(V^0) before ln_pre (Sec. 3.1), then
    at layers 1..L-1 the prompts are replaced by Projector(Avg(V^i)) with ONE shared projector.
    (No adapters here: how the prompts are made does not depend on them.)"""
    model = tiny_model(spg_per_layer=True, pta=False, video_prompts=False)
    move_off_init(model)
    spg, visual, K, g = model.spg, model.clip.visual, 16, 4
    assert sum(isinstance(m, oc.SelfPromptGenerator) for m in model.modules()) == 1, (
        "Eq. (6) per layer: one projector shared by every layer")
    first, last = [m for m in spg.projector.modules() if isinstance(m, nn.Linear)]
    W1, b1, W2, b2 = first.weight, first.bias, last.weight, last.bias

    def projector(a):                                          # R = A + W2 GELU(W1 A + b1) + b2
        return a + F.gelu(a @ W1.T + b1) @ W2.T + b2

    x_in = video()
    with torch.no_grad():
        got, _ = model.encode_frames(x_in)
        x = visual.embed(x_in.flatten(0, 1))                   # (B·T, 1+K, D)
        x = x + temporal_embedding(model).reshape(T, -1).repeat(2, 1)[:, None]  # Eq. (1): frame t
        x = torch.cat([x, projector(pool_2x2(x[:, 1:], g))], dim=1)
        x = visual.ln_pre(x)
        for i, vit in enumerate(visual.transformer.resblocks):
            if i > 0:
                x = torch.cat([x[:, :1 + K], projector(pool_2x2(x[:, 1:1 + K], g))], dim=1)
            x = vit(x)
        expected = (visual.ln_post(x[:, 0]) @ visual.proj).reshape(2, T, -1)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4,
                               msg=lambda m: f"Eq. (6) per layer, whole path: {m}")


@pytest.mark.spg
def test_spg_per_layer_needs_the_spg():
    with pytest.raises(ValueError, match="spg_per_layer"):
        tiny_model(spg=False, spg_per_layer=True)


# ------------------------------------------------------------------------------------------------
# Table 11's cascade: ST-Adapter

def st_adapter_oracle(adapter, x, frames, grid):
    """Up(DWConv3D(Down(patches))) with the convolution written as a sum over kernel offsets on a
    zero-padded (T, h, w) grid; class and prompt tokens get 0."""
    BT, N, D = x.shape
    K, B = grid * grid, BT // frames
    h = x[:, 1:1 + K] @ adapter.down.weight.T + adapter.down.bias          # (B·T, K, d)
    h = h.reshape(B, frames, grid, grid, -1)                               # (B, T, h, w, d)
    w = adapter.conv.weight[:, 0]                                          # (d, kt, kh, kw)
    kt, kh, kw = w.shape[1:]
    padded = F.pad(h, (0, 0, kw // 2, kw // 2, kh // 2, kh // 2, kt // 2, kt // 2))
    out = adapter.conv.bias.expand_as(h).clone()
    for a in range(kt):
        for b in range(kh):
            for c in range(kw):
                out += w[:, a, b, c] * padded[:, a:a + frames, b:b + grid, c:c + grid]
    out = out.reshape(BT, K, -1) @ adapter.up.weight.T + adapter.up.bias   # (B·T, K, D)
    expected = torch.zeros_like(x)
    expected[:, 1:1 + K] = out
    return expected


@pytest.mark.table11
@pytest.mark.parametrize("kernel", [(3, 1, 1), (3, 3, 3)])
def test_table11_st_adapter_matches_an_oracle(kernel):
    """ST-Adapter: bottleneck D/2, depthwise 3D convolution over (T, h, w) of the patch grid only.
    (3, 1, 1) is the released code's kernel; (3, 3, 3) checks that h and w are the right axes."""
    torch.manual_seed(0)
    D, g = 32, 4
    adapter = oc.STAdapter(D, grid=g, kernel_size=kernel)
    assert adapter.down.out_features == D // 2, "Table 11 cascade: ST-Adapter's bottleneck is D/2"
    assert adapter.conv.groups == D // 2, "Table 11 cascade: the 3D convolution is depthwise"
    move_off_init(adapter)
    x = torch.randn(2 * T, 1 + g * g + 4, D)                               # (B·T, N, D) with prompts
    with torch.no_grad():
        got, expected = adapter(x, T), st_adapter_oracle(adapter, x, T, g)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"Table 11 cascade (ST-Adapter), kernel {kernel}: {m}")


@pytest.mark.table11
@runs("eq1", "eq4", "eq5", "eq6", "eq8", "eq9", "prompts")
def test_table11_cascade_puts_st_adapter_in_series_before_each_frozen_block():
    """Fig. 5(a): V^i = ViT(V + STAdapter(V)), no alpha; ST-Adapter's init makes it add exactly 0
    (its convolution starts at 0) while its Up stays random, so it still learns from step one."""
    model = tiny_model(connection="cascade")
    assert model.adapter_name() == "STAdapter"
    block, vit = model.blocks["2"], model.clip.visual.transformer.resblocks[2]
    assert block.alpha is None, "Table 11 cascade: ST-Adapter has no alpha"
    x = torch.randn(2 * T, 21, W)
    with torch.no_grad():
        assert torch.count_nonzero(block.pta(x, T)) == 0, "Table 11 cascade: ST-Adapter adds 0 at init"
        assert torch.count_nonzero(block.pta.up.weight) > 0, "Table 11 cascade: Up starts random"
    logits = model.train()(video(), class_features())
    oc.video_loss(logits, torch.tensor([0, 3])).backward()
    assert block.pta.conv.weight.grad.abs().sum() > 0, "Table 11 cascade: the conv gets no gradient"
    move_off_init(model)
    with torch.no_grad():
        torch.testing.assert_close(block(x, vit, T), vit(x + block.pta(x, T)), msg=lambda m: (
            f"Table 11 cascade, Fig. 5(a): adapter then the frozen layer: {m}"))


@pytest.mark.table11
@runs("eq1", "eq4", "eq5", "eq8", "prompts")
def test_table11_cascade_starts_as_frame_average_clip():
    model = tiny_model(connection="cascade", spg=False)
    with torch.no_grad():
        ours = model(video(), class_features()).softmax(-1)
        clip = oc.FrameAverageCLIP(model.clip)(video(), class_features()).softmax(-1)
    torch.testing.assert_close(ours, clip, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"Table 11 cascade: identity at init: {m}")


@pytest.mark.model
def test_adapter_name_is_the_blocks_adapter_class():
    assert tiny_model(pta=False).adapter_name() is None
    model = tiny_model()
    assert model.adapter_name() == type(model.blocks["0"].pta).__name__
    assert tiny_model(connection="cascade").adapter_name() == "STAdapter"


# ------------------------------------------------------------------------------------------------
# X-CLIP's prompt generator, exactly

def xclip_prompts_oracle(gen, class_feats, patches):
    """X-CLIP's prompt.py written out: c_hat = c + gamma * decoder(c, LN(patches)), each decoder
    layer x += Proj(softmax(q k^T / sqrt(dh)) v) with q from LN1(x), k and v from the patches
    (biases where the module has them), then x += MLP(LN3(x)) with QuickGELU."""
    kv = F.layer_norm(patches, patches.shape[-1:], gen.ln.weight, gen.ln.bias)   # (B, K, E)
    x = class_feats.expand(patches.shape[0], -1, -1)                          # (B, C, E)
    what = "video-specific prompts (X-CLIP's decoder)"
    for block in gen.blocks:
        E = x.shape[-1]
        h = max(1, E // 64)                                                   # 64-channel heads
        (Wq, bq), (Wk, bk), (Wv, bv), (Wo, bo) = attention_weights(block.attn, E, what)
        c_fc, c_proj = linears(block.mlp, 2, what)
        q = F.layer_norm(x, (E,), block.ln_1.weight, block.ln_1.bias) @ Wq.T + bq
        k, v = kv @ Wk.T + bk, kv @ Wv.T + bv
        q, k, v = (t.reshape(*t.shape[:2], h, E // h) for t in (q, k, v))     # (B, L, h, E/h)
        scores = torch.einsum("bchd,bkhd->bhck", q, k) / math.sqrt(E // h)
        out = torch.einsum("bhck,bkhd->bchd", scores.softmax(dim=-1), v).reshape(x.shape)
        x = x + out @ Wo.T + bo
        y = F.layer_norm(x, (E,), block.ln_2.weight, block.ln_2.bias)
        y = y @ c_fc.weight.T + c_fc.bias
        y = y * torch.sigmoid(1.702 * y)                                      # QuickGELU
        x = x + y @ c_proj.weight.T + c_proj.bias
    return class_feats + gen.gamma * x


@runs("eq1", "prompts")
@pytest.mark.parametrize("generator", oc.PROMPT_GENERATORS)
def test_prompt_generators_match_an_independent_computation(generator):
    """Keys/values: the last layer's patch tokens through CLIP's frozen ln_post and proj ("ours") or
    X-CLIP's own LayerNorm and randn projection ("xclip"), per frame, then averaged over time; then
    the cross-attention decoder. Checked from the modules' own weights, every tensor off its init."""
    model = tiny_model(prompt_generator=generator, pta=False, spg=False)   # no other part runs
    move_off_init(model)
    gen, visual, K = model.prompt_generator, model.clip.visual, 16
    last = []
    visual.transformer.resblocks[3].register_forward_hook(lambda m, args, out: last.append(out))
    x_in, c = video(), class_features()
    with torch.no_grad():
        _, patches = model.encode_frames(x_in)
        raw = last[0][:, 1:1 + K]                                              # (B·T, K, D)
        if generator == "xclip":
            ln, proj = gen.visual_ln, gen.visual_proj
        else:
            ln, proj = visual.ln_post, visual.proj
        keys = F.layer_norm(raw, raw.shape[-1:], ln.weight, ln.bias) @ proj   # (B·T, K, E)
        expected_patches = keys.reshape(2, T, K, -1).mean(dim=1)                # (B, K, E)
        torch.testing.assert_close(patches, expected_patches, atol=1e-4, rtol=1e-4, msg=lambda m: (
            f"video-specific prompts ({generator}): keys and values from the patch tokens: {m}"))
        torch.testing.assert_close(gen(c, patches), xclip_prompts_oracle(gen, c, patches),
                                   atol=1e-4, rtol=1e-4, msg=lambda m: (
                                       f"video-specific prompts ({generator}): c_hat: {m}"))


@runs("prompts")
def test_xclip_prompt_generator_starts_as_xclips_code_does():
    """X-CLIP's init: Linear weights trunc_normal(.02), zero biases, no q/k/v bias, a randn (std 1)
    projection, gamma 0.1, nothing at zero, so no identity at init. Ours starts at c_hat = 1.1 c."""
    assert oc.OmniCLIPConfig().prompt_generator == "ours"
    model = tiny_model(prompt_generator="xclip")
    gen = model.prompt_generator
    weights, what = [], "prompts (xclip)"
    for block in gen.blocks:
        (Wq, bq), (Wk, bk), (Wv, bv), (Wo, bo) = attention_weights(block.attn, 128, what)
        c_fc, c_proj = linears(block.mlp, 2, what)
        assert all(torch.count_nonzero(b) == 0 for b in (bq, bk, bv)), "prompts (xclip): X-CLIP's q/k/v have no bias"
        weights += [Wq, Wk, Wv, Wo, c_fc.weight, c_proj.weight]
        for bias in (bo, c_fc.bias, c_proj.bias):
            assert torch.count_nonzero(bias) == 0, "prompts (xclip): X-CLIP's biases start at 0"
    std = torch.cat([w.flatten() for w in weights]).std().item()
    assert abs(std - 0.02) < 0.002, f"prompts (xclip): weights std {std:.4f}, X-CLIP's is 0.02"
    assert abs(gen.visual_proj.std().item() - 1) < 0.05, "prompts (xclip): projection is torch.randn"
    assert gen.visual_proj.shape == (W, 128) and gen.visual_ln.weight.shape == (W,)
    torch.testing.assert_close(gen.gamma, torch.full((128,), 0.1), msg=lambda m: (
        f"prompts (xclip): gamma is X-CLIP's, one per channel (E,) starting at 0.1: {m}"))
    c, patches = class_features(), torch.randn(2, 16, 128)
    with torch.no_grad():
        assert not torch.allclose(gen(c, patches), 1.1 * c, atol=1e-3)
        ours = tiny_model().prompt_generator
        torch.testing.assert_close(ours(c, patches), 1.1 * c.expand(2, -1, -1))


# ------------------------------------------------------------------------------------------------
# Multiply-adds (marker `cost`): the cost model, not an equation. The count is made here, with
# torch's flop counter on the file's real ops, and compared with the file's `analytic_macs`: equal,
# except that Eq. (8)'s C·E multiply-adds may be written elementwise (F.cosine_similarity, a
# product and a sum), which the counter does not see. That is the stated tolerance: C·E, 640 here.

def first_adapter(model):
    return next((block.pta for block in model.blocks.values()), None)


def counted_macs(model, *inputs):
    """Multiply-adds of one forward by torch's flop counter, in training mode: there
    nn.MultiheadAttention takes the path the counter sees (its inference fast path is one fused op
    the counter counts as 0; nothing in the model behaves differently in training mode). The CPU's
    fused attention kernel has no formula in torch's table: it gets the standard one."""
    from torch.utils import flop_counter
    extra = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None and cpu_sdpa not in flop_counter.flop_registry:
        extra[cpu_sdpa] = lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v)
    was_training = model.training
    with torch.no_grad(), flop_counter.FlopCounterMode(display=False, custom_mapping=extra) as counter:
        model.train()(*inputs)
    model.train(was_training)
    return counter.get_total_flops() // 2


def assert_cost_model_holds(counted, analytic, C, E, what):
    total = analytic["total"]
    assert total - C * E <= counted <= total, (
        f"multiply-adds {what}: counted {counted}, the cost model (analytic_macs) says {total} "
        f"(tolerance: Eq. 8's C·E = {C * E}, invisible when written elementwise); by part: {analytic}")


@pytest.mark.cost
@runs(*PARTS)
@pytest.mark.parametrize("options", [
    pytest.param({}, marks=pytest.mark.model),
    pytest.param(dict(pta=False, spg=False), marks=pytest.mark.table7),
    pytest.param(dict(spg=False, video_prompts=False), marks=pytest.mark.table7),
    pytest.param(dict(pta_layers=[1], temporal_ratio=0.5), marks=pytest.mark.table10),
    pytest.param(dict(spg_per_layer=True), marks=pytest.mark.spg),
    pytest.param(dict(spg_pooling="max", spg_projector=False), marks=pytest.mark.table9),
    pytest.param(dict(connection="attention-parallel"), marks=pytest.mark.table11),
    pytest.param(dict(connection="cascade"), marks=pytest.mark.table11),
    pytest.param(dict(prompt_generator="xclip"), marks=pytest.mark.prompts),
])
def test_counted_macs_match_the_analytic_count(options):
    model = tiny_model(**options)
    analytic = oc.analytic_macs(model.config, num_classes=5, adapter=first_adapter(model))
    counted = counted_macs(model, video(B=1), class_features())
    assert_cost_model_holds(counted, analytic, 5, 128, str(options))
    key = f"adapter:{model.adapter_name()}"
    assert model.adapter_name() is None or key in analytic, f"no {key!r} in {list(analytic)}"
    if not options:                                     # what eval.py --benchmark reports
        assert oc.count_macs(model, video(B=1), class_features()) == counted, (
            "count_macs must count what the flop counter sees (in training mode)")


@pytest.mark.cost
@runs("eq1", "eq8")                                    # CLIP's patch embedding is part of Eq. (1)
def test_frame_average_baseline_macs_match_the_analytic_count():
    model = tiny_model()
    baseline = counted_macs(oc.FrameAverageCLIP(model.clip), video(B=1), class_features())
    assert_cost_model_holds(baseline, dict(total=oc.analytic_baseline_macs(model.config, num_classes=5)),
                            5, 128, "frame-average CLIP")


class LinearTimeMix(nn.Module):
    """An adapter the file does not know: a bottleneck that mixes frames by a learned T x T matrix."""

    def __init__(self, width, frames):
        super().__init__()
        self.down, self.up = nn.Linear(width, 8), nn.Linear(8, width)
        self.mix = nn.Parameter(torch.eye(frames))

    def forward(self, x, frames):                                          # (B·T, N, D)
        h = self.down(x).unflatten(0, (-1, frames))                        # (B, T, N, 8)
        return self.up(torch.einsum("st,btnd->bsnd", self.mix, h).flatten(0, 1))  # (B·T, N, D)


@pytest.mark.cost
@runs("eq1", "eq4", "eq5", "eq6", "eq8", "prompts")
def test_an_unknown_adapter_is_counted_and_named():
    model = tiny_model()
    for block in model.blocks.values():
        block.pta = LinearTimeMix(W, T)
    analytic = oc.analytic_macs(model.config, num_classes=5, adapter=model.blocks["0"].pta)
    assert model.adapter_name() == "LinearTimeMix" and "adapter:LinearTimeMix" in analytic
    N = 1 + 16 + 4
    assert analytic["adapter:LinearTimeMix"] == 4 * (T * N * 2 * W * 8 + N * T * T * 8)
    assert_cost_model_holds(counted_macs(model, video(B=1), class_features()), analytic, 5, 128,
                            "with a fork's adapter")


@pytest.mark.cost
@runs(*PARTS)
def test_vit_b16_counted_macs_match_the_analytic_count():
    """ViT-B/16's image tower at full width and resolution (random weights), 2 of its 12 layers
    (every layer costs the same), 2 frames and a one-layer text tower (not counted: its features
    are cached), to keep it under a second."""
    torch.manual_seed(0)
    b16 = dict(oc.ARCHITECTURES["ViT-B/16"], vision_layers=2, text_layers=1, vocab_size=1000)
    config = oc.OmniCLIPConfig(**b16, frames=2)
    model = oc.OmniCLIP(config).eval()
    analytic = oc.analytic_macs(config, num_classes=10, adapter=first_adapter(model))
    counted = counted_macs(model, torch.randn(1, 2, 3, 224, 224), torch.randn(10, 512))
    assert_cost_model_holds(counted, analytic, 10, 512, "ViT-B/16")
