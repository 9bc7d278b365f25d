"""A gallery of misreadings: the paper read another way, and the check that catches it.

Each entry rewrites one or two lines of the model (a residual dropped, a softmax over the wrong
axis, pooling that takes the class token, heads cut the wrong way, a LayerNorm on the other side of
an attention, ...), runs the equation's check from tests/test_omniclip.py on the rewritten model,
and asserts that the check fails with a message naming the equation. The first entry of each
equation is the model as written, which must pass: a check that fails on everything proves nothing.

Read it as a list of what each test guards. It also guards the tests: if a later change weakens a
check, the misreading it used to catch goes unnoticed and this file turns red.

The gallery always breaks the repository's own omniclip.py (also under `--impl`, where your file is
tested by tests/test_omniclip.py): what it tests is the checks, not a model.
"""
import inspect
import sys
import textwrap
from dataclasses import dataclass, field

import pytest

import test_omniclip as checks
from conftest import reference_omniclip

one_thread = checks.one_thread                                 # the same autouse fixture: tiny tensors


@dataclass
class Misreading:
    what: str                        # the paper read this way
    where: str = ""                  # "Class.method" or "function" in omniclip.py
    lines: tuple = ()                # (as written, as misread) pairs
    check: str = ""                  # the function of test_omniclip.py that must catch it
    options: dict = field(default_factory=dict)
    names: str = ""                  # the failure message must name this ("Eq. (7)")


def misread(monkeypatch, module, where, lines):
    """Put a rewritten copy of `module.where` in its place for this test: each (old, new) pair
    replaces one exact piece of its source. The original comes back after the test."""
    owner, _, name = where.rpartition(".")
    owner = getattr(module, owner) if owner else module
    source = textwrap.dedent(inspect.getsource(getattr(owner, name)))
    for old, new in lines:
        assert source.count(old) == 1, (
            f"the gallery is out of date: {where} no longer contains {old!r} exactly once")
        source = source.replace(old, new)
    # Compiled inside a function that provides __class__, so a zero-argument super() still works.
    wrapper = "def _rewritten(__class__):\n" + textwrap.indent(source, "    ") + f"\n    return {name}\n"
    namespace = {}
    exec(compile(wrapper, f"<{where}, misread>", "exec"), vars(module), namespace)
    new = namespace["_rewritten"](owner if inspect.isclass(owner) else None)
    monkeypatch.setattr(owner, name, new)


def assert_caught(monkeypatch, m):
    oc = reference_omniclip()
    check = getattr(checks, m.check)
    if not m.lines:                                             # the model as written passes
        check(oc, **m.options)
        return
    misread(monkeypatch, oc, m.where, m.lines)
    with pytest.raises(AssertionError) as caught:
        check(oc, **m.options)
    assert m.names in str(caught.value), (
        f"{m.check} caught '{m.what}' but its message does not name {m.names!r}: {caught.value}")


def gallery(*entries):
    return pytest.mark.parametrize("m", entries, ids=lambda m: m.what.replace(" ", "-"))


AS_WRITTEN = "as written (passes)"
ENCODE = "OmniCLIP.encode_frames"
EMBED = "OmniCLIP.embed_frames"
TE_LINE = "return (x.unflatten(0, (B, T)) + te[None, :, None]).flatten(0, 1)"


# ----------------------------------------------------------------------------------------------
@pytest.mark.eq1
@gallery(
    Misreading(AS_WRITTEN, check="check_eq1_temporal_embedding", names="Eq. (1)"),
    Misreading("TE added to the first frame only", EMBED,
               [(TE_LINE, "return (x.unflatten(0, (B, T)) + F.pad(te[:1], (0, 0, 0, T - 1))[None, :, None]).flatten(0, 1)")],
               "check_eq1_temporal_embedding", names="Eq. (1)"),
    Misreading("TE added to the class token only", EMBED,
               [(TE_LINE, "return (x.unflatten(0, (B, T)) + F.pad(te[None, :, None], (0, 0, 0, x.shape[1] - 1))).flatten(0, 1)")],
               "check_eq1_temporal_embedding", names="Eq. (1)"),
    Misreading("frames read as (T, B) not (B, T)", EMBED,
               [(TE_LINE, "return (x.unflatten(0, (T, B)) + te[:, None, None]).flatten(0, 1)")],
               "check_eq1_temporal_embedding", names="Eq. (1)"),
    Misreading("TE added after ln_pre", ENCODE,
               [("x = visual.ln_pre(x)", "x = (visual.ln_pre(x - self.temporal_embedding.repeat(B, 1)[:, None])"
                                         ".unflatten(0, (B, T)) + self.temporal_embedding[None, :, None]).flatten(0, 1)")],
               "check_eq1_temporal_embedding", names="Eq. (1)"),
    Misreading("TE detached: its gradient lost", EMBED,
               [("te = self.temporal_embedding.to(x.dtype)", "te = self.temporal_embedding.detach()")],
               "check_eq1_temporal_embedding", names="Eq. (1)"),
    Misreading("positional embedding left out", "VisionTransformer.embed",
               [("torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)", "torch.cat([cls, x], dim=1)")],
               "check_eq1_temporal_embedding", names="Eq. (1)"),
)
def test_eq1_misreadings_are_caught(m, monkeypatch):
    assert_caught(monkeypatch, m)


# ----------------------------------------------------------------------------------------------
@pytest.mark.eq2
@pytest.mark.clip
@gallery(
    Misreading(AS_WRITTEN, check="check_eq2_clip_layer", names="Eq. (2)"),
    Misreading("attention and MLP side by side (GPT-J style)", "ResidualAttentionBlock.forward",
               [("x = x + self.attention(x)\n    return x + self.feed_forward(x)",
                 "return x + self.attention(x) + self.feed_forward(x)")],
               "check_eq2_clip_layer", names="Eq. (2)"),
    Misreading("QuickGELU read as GELU", "QuickGELU.forward",
               [("return x * torch.sigmoid(1.702 * x)", "return F.gelu(x)")],
               "check_eq2_clip_layer", names="Eq. (2)"),
    Misreading("the text tower without its causal mask", "ResidualAttentionBlock.attention",
               [("is_causal=self.causal", "is_causal=False")],
               "check_eq2_clip_layer", dict(causal=True), names="Eq. (2)"),
)
def test_eq2_misreadings_are_caught(m, monkeypatch):
    assert_caught(monkeypatch, m)


# ----------------------------------------------------------------------------------------------
FUSE = "SpatialTemporalBlock.forward"
FUSE_LINE = "return spatial + self.alpha * temporal"


@pytest.mark.eq2
@pytest.mark.eq3
@pytest.mark.eq4
@gallery(
    Misreading(AS_WRITTEN, check="check_eq4_fusion", names="Eq. (4)"),
    Misreading("alpha scales the ViT branch", FUSE, [(FUSE_LINE, "return self.alpha * spatial + temporal")],
               "check_eq4_fusion", names="Eq. (4)"),
    Misreading("no alpha", FUSE, [(FUSE_LINE, "return spatial + temporal")], "check_eq4_fusion", names="Eq. (4)"),
    Misreading("the adapter fed the ViT's output (serial)", FUSE,
               [("temporal = self.pta(x, frames)", "temporal = self.pta(spatial, frames)")],
               "check_eq4_fusion", names="Eq. (4)"),
    Misreading("the residual added again", FUSE, [(FUSE_LINE, "return x + spatial + self.alpha * temporal")],
               "check_eq4_fusion", names="Eq. (4)"),
    Misreading("the frozen branch run under no_grad (no gradient to earlier layers)", FUSE,
               [("spatial = vit(x)", "with torch.no_grad():\n            spatial = vit(x)")],
               "check_eq4_fusion", names="Eq. (4)"),
    Misreading(AS_WRITTEN + " in sequence", check="check_eq4_layers_in_sequence", names="Eq. (4)"),
    Misreading("layers without an adapter run under no_grad", ENCODE,
               [("x = layer(*args)", "with torch.no_grad():\n                    x = layer(*args)")],
               "check_eq4_layers_in_sequence", dict(pta_layers=[1]), names="Eq. (4)"),
    Misreading("the first layer left without its adapter", ENCODE,
               [("block = self.blocks[str(i)] if str(i) in self.blocks else None",
                 "block = self.blocks[str(i)] if str(i) in self.blocks and i > 0 else None")],
               "check_eq4_layers_in_sequence", names="Eq. (4)"),
    Misreading(AS_WRITTEN + " with gradient checkpointing", check="check_gradient_checkpointing",
               names="gradient checkpointing"),
    Misreading("gradient_checkpointing ignored", ENCODE,
               [("if self.config.gradient_checkpointing and torch.is_grad_enabled():", "if False:")],
               "check_gradient_checkpointing", names="gradient checkpointing"),
    Misreading("checkpointed layers detached", ENCODE,
               [("x = checkpoint(layer, *args, use_reentrant=False)",
                 "x = checkpoint(layer, *args, use_reentrant=False).detach()")],
               "check_gradient_checkpointing", names="gradient checkpointing"),
)
def test_eq4_misreadings_are_caught(m, monkeypatch):
    assert_caught(monkeypatch, m)


@pytest.mark.eq4
@pytest.mark.table11
@gallery(
    Misreading(AS_WRITTEN, check="check_eq4_fusion", options=dict(connection="attention-parallel"),
               names="Table 11"),
    Misreading("attention-parallel wired to the MLP", FUSE,
               [("x = x + vit.attention(x) + self.alpha * self.pta(x, frames)\n        return x + vit.feed_forward(x)",
                 "x = x + vit.attention(x)\n        return x + vit.feed_forward(x) + self.alpha * self.pta(x, frames)")],
               "check_eq4_fusion", dict(connection="attention-parallel"), names="Table 11"),
    Misreading("attention-parallel adapter fed the attention's output", FUSE,
               [("x = x + vit.attention(x) + self.alpha * self.pta(x, frames)",
                 "x = x + vit.attention(x)\n        x = x + self.alpha * self.pta(x, frames)")],
               "check_eq4_fusion", dict(connection="attention-parallel"), names="Table 11"),
    Misreading("attention-parallel built as block-parallel", FUSE,
               [("x = x + vit.attention(x) + self.alpha * self.pta(x, frames)\n        return x + vit.feed_forward(x)",
                 "return vit(x) + self.alpha * self.pta(x, frames)")],
               "check_eq4_fusion", dict(connection="attention-parallel"), names="Table 11"),
)
def test_table11_misreadings_are_caught(m, monkeypatch):
    assert_caught(monkeypatch, m)


@pytest.mark.eq4
@pytest.mark.table10
@pytest.mark.table7
@gallery(
    Misreading(AS_WRITTEN, check="check_eq4_layers_in_sequence",
               options=dict(layers_with_adapter=[0, 2], pta_layers=[2, 0]), names="Eq. (4)"),
    Misreading("pta_layers=[0, 2] read as the first two layers", ENCODE,
               [("block = self.blocks[str(i)] if str(i) in self.blocks else None",
                 "block = list(self.blocks.values())[i] if i < len(self.blocks) else None")],
               "check_eq4_layers_in_sequence", dict(layers_with_adapter=[0, 2], pta_layers=[2, 0]),
               names="Eq. (4)"),
    Misreading(AS_WRITTEN + " without SPG", check="check_table7_without_spg", names="Table 7"),
    Misreading("spg=False ignored", "OmniCLIP.__init__",
               [("c.spg_projector) if c.spg else None", "c.spg_projector) if True else None")],
               "check_table7_without_spg", names="Table 7"),
    Misreading("pta=False ignored", "OmniCLIP.__init__",
               [("for i in (layers if c.pta else [])", "for i in layers")],
               "check_eq4_layers_in_sequence", dict(layers_with_adapter=[], pta=False), names="Eq. (4)"),
)
def test_table10_misreadings_are_caught(m, monkeypatch):
    assert_caught(monkeypatch, m)


# ----------------------------------------------------------------------------------------------
SPG = "SelfPromptGenerator.forward"
SPG_CALL = "prompts = self.spg(x[:, 1:])"


@pytest.mark.eq6
@pytest.mark.spg
@pytest.mark.table9
@gallery(
    Misreading(AS_WRITTEN, check="check_eq6_model_spg", names="Eq. (6)"),
    Misreading("the projector replaces the pooled tokens (no residual)", SPG,
               [("prompts = prompts + self.projector(prompts)", "prompts = self.projector(prompts)")],
               "check_eq6_model_spg", names="Eq. (6)"),
    Misreading("4 consecutive patches (1x4 strips) pooled, not 2x2 squares", SPG,
               [("prompts = pool(x, 2, ceil_mode=True).flatten(2).transpose(1, 2)",
                 "prompts = pool(x.flatten(2).unflatten(2, (-1, 4)), (1, 4)).flatten(2).transpose(1, 2)")],
               "check_eq6_model_spg", names="Eq. (6)"),
    Misreading("the patch grid read from a flat (K·D) view, mixing channels and patches", SPG,
               [("x = patches.transpose(1, 2).unflatten(2, (g, g))",
                 "x = patches.reshape(patches.shape[0], -1, g, g)")],
               "check_eq6_model_spg", names="Eq. (6)"),
    Misreading("pooling detached patches", SPG,
               [("x = patches.transpose(1, 2).unflatten(2, (g, g))",
                 "x = patches.detach().transpose(1, 2).unflatten(2, (g, g))")],
               "check_eq6_model_spg", names="Eq. (6)"),
    Misreading("avg and max swapped", SPG,
               [('pool = F.avg_pool2d if self.pooling == "avg" else F.max_pool2d',
                 'pool = F.max_pool2d if self.pooling == "avg" else F.avg_pool2d')],
               "check_eq6_model_spg", names="Eq. (6)"),
    Misreading("the pooling option ignored", "OmniCLIP.__init__",
               [("SelfPromptGenerator(D, c.grid, c.spg_pooling, c.spg_projector)",
                 'SelfPromptGenerator(D, c.grid, "avg", c.spg_projector)')],
               "check_table9_options", dict(pooling="max"), names="Eq. (6)"),
    Misreading(AS_WRITTEN + " wiring", check="check_eq6_wiring", names="Eq. (6)"),
    Misreading("pooling takes the class token", ENCODE, [(SPG_CALL, "prompts = self.spg(x[:, :-1])")],
               "check_eq6_wiring", names="Eq. (6)"),
    Misreading("the SPG fed detached patches", ENCODE, [(SPG_CALL, "prompts = self.spg(x[:, 1:].detach())")],
               "check_eq6_wiring", names="Eq. (6)"),
    Misreading("prompts pooled before TE is added", ENCODE,
               [(SPG_CALL, "prompts = self.spg(visual.embed(videos.flatten(0, 1))[:, 1:] + 0 * x[:, 1:])")],
               "check_eq6_wiring", names="Eq. (6)"),
    Misreading("prompts bypass ln_pre", ENCODE,
               [("x = visual.ln_pre(x)", "x = torch.cat([visual.ln_pre(x[:, :1 + K]), x[:, 1 + K:]], dim=1)")],
               "check_eq6_wiring", names="Eq. (6)"),
    Misreading("prompts put before the patches", ENCODE,
               [("x = torch.cat([x, prompts], dim=1)", "x = torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)")],
               "check_eq6_wiring", names="Eq. (6)"),
)
def test_eq6_misreadings_are_caught(m, monkeypatch):
    assert_caught(monkeypatch, m)


# ----------------------------------------------------------------------------------------------
PTA = "ParallelTemporalAdapter.forward"
TO_TIME = "x = x.unflatten(0, (BT // frames, frames)).transpose(1, 2).flatten(0, 1)"
FROM_TIME = "x = x.unflatten(0, (BT // frames, N)).transpose(1, 2).flatten(0, 1)"
SDPA = "x = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)"


@pytest.mark.eq7
@pytest.mark.table8
@gallery(
    Misreading(AS_WRITTEN, check="check_eq7_pta", names="Eq. (7)"),
    Misreading("LayerNorm after the attention", PTA,
               [("x = self.attn(self.ln(x))", "x = self.ln(self.attn(x))")], "check_eq7_pta", names="Eq. (7)"),
    Misreading("the adapter fed x.detach() (exact values, wrong gradients)", PTA,
               [("x = self.down(x)", "x = self.down(x.detach())")], "check_eq7_pta", names="Eq. (7)"),
    Misreading("the adapter's output detached", PTA,
               [("return self.up(x)", "return self.up(x).detach()")], "check_eq7_pta", names="Eq. (7)"),
    Misreading("no LayerNorm before the attention", PTA,
               [("x = self.attn(self.ln(x))", "x = self.attn(x)")], "check_eq7_pta", names="Eq. (7)"),
    Misreading("attention over the tokens of a frame, not over time", PTA,
               [(TO_TIME, "pass"), (FROM_TIME, "pass")], "check_eq7_pta", names="Eq. (7)"),
    Misreading("frames taken from the wrong axis of (B·T)", PTA,
               [(TO_TIME, "x = x.unflatten(0, (frames, BT // frames)).permute(1, 2, 0, 3).flatten(0, 1)"),
                (FROM_TIME, "x = x.unflatten(0, (BT // frames, N)).permute(2, 0, 1, 3).flatten(0, 1)")],
               "check_eq7_pta", names="Eq. (7)"),
    Misreading("softmax over the queries, not the keys", "Attention.forward",
               [(SDPA, "x = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-2) @ v")],
               "check_eq7_pta", names="Eq. (7)"),
    Misreading("no 1/sqrt(d) scale", "Attention.forward",
               [(SDPA, "x = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=1.0)")],
               "check_eq7_pta", names="Eq. (7)"),
    Misreading("heads cut as interleaved channels", "Attention.forward",
               [("t.unflatten(-1, (h, D // h)).transpose(1, 2)",
                 "t.unflatten(-1, (D // h, h)).transpose(-1, -2).transpose(1, 2)")],
               "check_eq7_pta", names="Eq. (7)"),
    Misreading("one head instead of 64-channel heads", "ParallelTemporalAdapter.__init__",
               [("num_heads=max(1, hidden // 64)", "num_heads=1")], "check_eq7_pta", names="Eq. (7)"),
    Misreading("the temporal ratio ignored", "ParallelTemporalAdapter.__init__",
               [("hidden = int(width * temporal_ratio)", "hidden = width // 4")],
               "check_eq7_pta", dict(ratio=0.5), names="Eq. (7)"),
)
def test_eq7_misreadings_are_caught(m, monkeypatch):
    assert_caught(monkeypatch, m)


# ----------------------------------------------------------------------------------------------
EQ5 = "FrameAggregation.forward"
EQ5_LINE = "return (frame_features + self.attn(self.ln(frame_features))).mean(dim=1)"
FRAMES_LINE = "frames = (visual.ln_post(x[:, 0]) @ visual.proj).unflatten(0, (B, T))"


@pytest.mark.eq5
@gallery(
    Misreading(AS_WRITTEN, check="check_eq5_head", names="Eq. (5)"),
    Misreading("LayerNorm after the attention", EQ5,
               [(EQ5_LINE, "return (frame_features + self.ln(self.attn(frame_features))).mean(dim=1)")],
               "check_eq5_head", names="Eq. (5)"),
    Misreading("no residual (the paper's letter, with our zero init)", EQ5,
               [(EQ5_LINE, "return self.attn(self.ln(frame_features)).mean(dim=1)")],
               "check_eq5_head", names="Eq. (5)"),
    Misreading("the attention's input detached", EQ5,
               [(EQ5_LINE, "return (frame_features + self.attn(self.ln(frame_features.detach()))).mean(dim=1)")],
               "check_eq5_head", names="Eq. (5)"),
    Misreading("max over frames, not the average", EQ5,
               [(EQ5_LINE, "return (frame_features + self.attn(self.ln(frame_features))).amax(dim=1)")],
               "check_eq5_head", names="Eq. (5)"),
    Misreading("attention across the videos of the batch", EQ5,
               [(EQ5_LINE, "return (frame_features + self.attn(self.ln(frame_features).transpose(0, 1))"
                           ".transpose(0, 1)).mean(dim=1)")],
               "check_eq5_head", names="Eq. (5)"),
    Misreading(AS_WRITTEN + " frame features", check="check_eq5_frame_features", names="Eq. (5)"),
    Misreading("mean over tokens instead of the class token", ENCODE,
               [(FRAMES_LINE, "frames = (visual.ln_post(x.mean(dim=1)) @ visual.proj).unflatten(0, (B, T))")],
               "check_eq5_frame_features", names="Eq. (5)"),
    Misreading("frame features detached", ENCODE,
               [(FRAMES_LINE, "frames = (visual.ln_post(x[:, 0]) @ visual.proj).unflatten(0, (B, T)).detach()")],
               "check_eq5_frame_features", names="Eq. (5)"),
    Misreading("no ln_post before the projection", ENCODE,
               [(FRAMES_LINE, "frames = (x[:, 0] @ visual.proj).unflatten(0, (B, T))")],
               "check_eq5_frame_features", names="Eq. (5)"),
)
def test_eq5_misreadings_are_caught(m, monkeypatch):
    assert_caught(monkeypatch, m)


# ----------------------------------------------------------------------------------------------
KEYS_LINE = "patches = self.prompt_generator.project_patches(x[:, 1:1 + K], visual)"
PROMPT_OUT = "return class_features + self.gamma * x"


@pytest.mark.prompts
@gallery(
    Misreading(AS_WRITTEN, check="check_prompts_generator", names="video-specific prompts"),
    Misreading("keys and values swapped", "Attention.forward",
               [("k, v = F.linear(context, w_kv, b_kv).chunk(2, dim=-1)",
                 "v, k = F.linear(context, w_kv, b_kv).chunk(2, dim=-1)")],
               "check_prompts_generator", names="video-specific prompts"),
    Misreading("gamma scales the class features", "VideoSpecificPrompt.forward",
               [(PROMPT_OUT, "return self.gamma * class_features + x")],
               "check_prompts_generator", names="video-specific prompts"),
    Misreading("keys and values from detached patches", "VideoSpecificPrompt.forward",
               [("patches = self.ln(patches)", "patches = self.ln(patches.detach())")],
               "check_prompts_generator", names="video-specific prompts"),
    Misreading("no LayerNorm on the keys", "VideoSpecificPrompt.forward",
               [("patches = self.ln(patches)", "pass")],
               "check_prompts_generator", names="video-specific prompts"),
    Misreading("MLP without its residual", "PromptBlock.forward",
               [("return x + self.mlp(self.ln_2(x))", "return self.mlp(self.ln_2(x))")],
               "check_prompts_generator", names="video-specific prompts"),
    Misreading(AS_WRITTEN + " wiring", check="check_prompts_wiring", names="video-specific prompts"),
    Misreading("keys and values from the first frame only", ENCODE,
               [("return frames, patches.unflatten(0, (B, T)).mean(dim=1)",
                 "return frames, patches.unflatten(0, (B, T))[:, 0]")],
               "check_prompts_wiring", names="video-specific prompts"),
    Misreading("the class token among the keys", ENCODE,
               [(KEYS_LINE, "patches = self.prompt_generator.project_patches(x[:, :K], visual)")],
               "check_prompts_wiring", names="video-specific prompts"),
    Misreading("the SPG prompts among the keys", ENCODE,
               [(KEYS_LINE, "patches = self.prompt_generator.project_patches(x[:, 1:], visual)")],
               "check_prompts_wiring", names="video-specific prompts"),
    Misreading(AS_WRITTEN + " keys", check="check_prompts_keys", names="video-specific prompts"),
    Misreading("keys without ln_post", "VideoSpecificPrompt.project_patches",
               [("return visual.ln_post(patches) @ visual.proj", "return patches @ visual.proj")],
               "check_prompts_keys", names="video-specific prompts"),
)
def test_prompts_misreadings_are_caught(m, monkeypatch):
    assert_caught(monkeypatch, m)


# ----------------------------------------------------------------------------------------------
COS = "cosine_logits"


@pytest.mark.eq8
@gallery(
    Misreading(AS_WRITTEN, check="check_eq8_cosine", names="Eq. (8)"),
    Misreading("class features not normalised", COS,
               [("c = F.normalize(class_features, dim=-1)", "c = class_features")], "check_eq8_cosine", names="Eq. (8)"),
    Misreading("video features normalised over the batch", COS,
               [("v = F.normalize(video_features, dim=-1)", "v = F.normalize(video_features, dim=0)")],
               "check_eq8_cosine", names="Eq. (8)"),
    Misreading("the logit scale without exp (per-video prompts)", COS,
               [('return logit_scale.exp() * torch.einsum("be,bce->bc", v, c)',
                 'return logit_scale * torch.einsum("be,bce->bc", v, c)')], "check_eq8_cosine", names="Eq. (8)"),
    Misreading("video features detached", COS,
               [("v = F.normalize(video_features, dim=-1)", "v = F.normalize(video_features.detach(), dim=-1)")],
               "check_eq8_cosine", names="Eq. (8)"),
    Misreading("a fixed temperature of 100", COS,
               [("return logit_scale.exp() * v @ c.t()", "return 100 * v @ c.t()")], "check_eq8_cosine", names="Eq. (8)"),
    Misreading(AS_WRITTEN + " wiring", check="check_eq8_wiring", names="Eq. (8)"),
    Misreading("the class features before the prompts", "OmniCLIP.forward",
               [("class_features = self.prompt_generator(", "_ = self.prompt_generator(")],
               "check_eq8_wiring", names="Eq. (8)"),
    Misreading("the frame average instead of Eq. (5)'s output", "OmniCLIP.encode_video",
               [("return self.frame_aggregation(frame_features), patches",
                 "return frame_features.mean(dim=1), patches")], "check_eq8_wiring", names="Eq. (8)"),
)
def test_eq8_misreadings_are_caught(m, monkeypatch):
    assert_caught(monkeypatch, m)


# ----------------------------------------------------------------------------------------------
LOSS = "video_loss"
CE = "F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)"


@pytest.mark.eq9
@gallery(
    Misreading(AS_WRITTEN, check="check_eq9_loss", names="Eq. (9)"),
    Misreading("label smoothing ignored", LOSS,
               [(CE, "F.cross_entropy(logits.float(), targets)")], "check_eq9_loss", names="Eq. (9)"),
    Misreading("summed over the batch, as the paper's Σ_i", LOSS,
               [(CE, 'F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing, reduction="sum")')],
               "check_eq9_loss", names="Eq. (9)"),
    Misreading("softmax over the batch, not the classes", LOSS,
               [(CE, "F.cross_entropy(logits.float().log_softmax(dim=0), targets, label_smoothing=label_smoothing)")],
               "check_eq9_loss", names="Eq. (9)"),
    Misreading("the loss of detached logits", LOSS,
               [(CE, "F.cross_entropy(logits.float().detach(), targets, label_smoothing=label_smoothing)")],
               "check_eq9_loss", names="Eq. (9)"),
    Misreading("half precision kept", LOSS,
               [(CE, "F.cross_entropy(logits, targets, label_smoothing=label_smoothing)")],
               "check_eq9_loss", names="Eq. (9)"),
)
def test_eq9_misreadings_are_caught(m, monkeypatch):
    assert_caught(monkeypatch, m)


@pytest.mark.model
def test_the_gallery_has_a_misreading_for_every_check():
    """Every check function of test_omniclip.py is exercised here, and every equation's gallery
    holds at least three ways to get it wrong."""
    module = sys.modules[__name__]
    entries = [m for name, test in vars(module).items() if name.endswith("_are_caught")
               for mark in test.pytestmark if mark.name == "parametrize" for m in mark.args[1]]
    used = {m.check for m in entries}
    defined = {name for name in vars(checks) if name.startswith("check_") and name != "check_eq6_spg"}
    assert defined <= used, f"checks with no misreading in the gallery: {sorted(defined - used)}"
    for name, test in vars(module).items():
        if name.endswith("_are_caught"):
            [mark] = [m for m in test.pytestmark if m.name == "parametrize"]
            assert sum(1 for m in mark.args[1] if m.lines) >= 3, f"{name}: fewer than 3 misreadings"
