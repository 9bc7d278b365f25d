"""OmniCLIP: Adapting CLIP for Video Recognition with Spatial-Temporal Omni-Scale Feature Learning.

The whole model in one file, top to bottom in reading order: config, CLIP (written from scratch,
OpenAI's parameter names), the Self-Prompt Generator (SPG, Eq. 6), the Parallel Temporal Adapter
(PTA, Eq. 7), the spatial-temporal block (Eqs. 2-4), frame aggregation (Eq. 5), X-CLIP's
video-specific text prompts, OmniCLIP's logits (Eq. 8) and loss (Eq. 9), then model accounting.
Pure torch.nn: no file or network I/O (that is clip_weights.py).

Shape legend: B batch, T frames, N tokens per frame (1 + K, plus K/4 SPG prompts), K patches,
D ViT width, E joint embed dim, C classes, L text length, h heads.
Where the paper is silent or ambiguous, comments say "paper is silent; we ..." and quote it; the
README's "Departures from the paper" table lists every such choice and the flag for the other reading.
"""
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# The CLIP fields of OmniCLIPConfig for OpenAI's released ViTs, so a model can be built with random
# weights (benchmark, tests) without a download. `tiny` runs the same code path in seconds on a CPU.
_OPENAI_TEXT = dict(context_length=77, vocab_size=49408, text_layers=12)  # all four share it
ARCHITECTURES = {
    "ViT-B/32": dict(_OPENAI_TEXT, embed_dim=512, image_resolution=224, vision_layers=12,
                     vision_width=768, vision_patch_size=32, text_width=512, text_heads=8),
    "ViT-B/16": dict(_OPENAI_TEXT, embed_dim=512, image_resolution=224, vision_layers=12,
                     vision_width=768, vision_patch_size=16, text_width=512, text_heads=8),
    "ViT-L/14": dict(_OPENAI_TEXT, embed_dim=768, image_resolution=224, vision_layers=24,
                     vision_width=1024, vision_patch_size=14, text_width=768, text_heads=12),
    "ViT-L/14@336px": dict(_OPENAI_TEXT, embed_dim=768, image_resolution=336, vision_layers=24,
                           vision_width=1024, vision_patch_size=14, text_width=768, text_heads=12),
    "tiny": dict(embed_dim=128, image_resolution=64, vision_layers=4, vision_width=128,
                 vision_patch_size=16, context_length=77, vocab_size=49408, text_width=128,
                 text_heads=2, text_layers=2),
}
CONNECTIONS = ("block-parallel", "attention-parallel", "cascade")  # Table 11: Fig. 5(c), 5(b), 5(a)
PROMPT_GENERATORS = ("ours", "xclip")  # video-specific prompts: see VideoSpecificPrompt, XCLIPPrompt


@dataclass
class OmniCLIPConfig:
    # CLIP architecture: read from the weights' shapes (clip_weights.clip_architecture)
    embed_dim: int = 512            # E
    image_resolution: int = 224     # H = W
    vision_layers: int = 12
    vision_width: int = 768         # D; heads = D / 64, as in OpenAI's ViTs
    vision_patch_size: int = 16     # P
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    # OmniCLIP
    frames: int = 8                 # T; Table 1: 8 supervised, 32 few-shot and zero-shot (Sec. 4)
    pta: bool = True                # Table 7: the Parallel Temporal Adapter on/off
    pta_layers: list | None = None  # Table 10: 0-indexed layers with a PTA; None = all (the paper's best)
    temporal_ratio: float = 0.25    # Table 8: the PTA's Down ratio (Eq. 7), 1/4 best
    # Table 11: block-parallel (ours, Fig. 5(c)) | attention-parallel (5(b)) | cascade (5(a), ST-Adapter)
    connection: str = "block-parallel"
    spg: bool = True                # Table 7: the Self-Prompt Generator on/off
    spg_pooling: str = "avg"        # Table 9: avg | max
    spg_projector: bool = True      # Table 9: learnable projector after pooling
    spg_per_layer: bool = False     # Sec. 3.2-3.3 read as R^i = SPG(V^i) at every layer (see encode_frames)
    video_prompts: bool = True      # X-CLIP's video-specific text prompts (Sec. 3.1 "following [26]")
    prompt_generator: str = "ours"  # ours | xclip (X-CLIP's released code exactly): see XCLIPPrompt
    prompt_layers: int = 2          # X-CLIP's released configuration: 2 prompt blocks
    gradient_checkpointing: bool = False  # recompute blocks in backward: memory for time at large T

    def __post_init__(self):
        if self.connection not in CONNECTIONS:
            raise ValueError(f"connection must be one of {CONNECTIONS}, got {self.connection!r}")
        if self.spg_pooling not in ("avg", "max"):
            raise ValueError(f"spg_pooling must be 'avg' or 'max', got {self.spg_pooling!r}")
        if self.spg_per_layer and not self.spg:
            raise ValueError("spg_per_layer needs the SPG: it regenerates the SPG prompts at every layer")
        if self.prompt_generator not in PROMPT_GENERATORS:
            raise ValueError(f"prompt_generator must be one of {PROMPT_GENERATORS}, "
                             f"got {self.prompt_generator!r}")
        if self.image_resolution % self.vision_patch_size:
            raise ValueError("image_resolution must be a multiple of vision_patch_size")
        if self.pta_layers is not None:
            self.pta_layers = sorted(int(i) for i in self.pta_layers)
            bad = [i for i in self.pta_layers if not 0 <= i < self.vision_layers]
            if bad:
                raise ValueError(f"pta_layers {bad} outside 0..{self.vision_layers - 1}")

    @property
    def grid(self):                 # patches per side: K = grid * grid
        return self.image_resolution // self.vision_patch_size


# ----------------------------------------------------------------------------------------------
# CLIP, written from scratch with OpenAI's parameter names, so its checkpoints load with no mapping.

class QuickGELU(nn.Module):
    """CLIP's activation, x * sigmoid(1.702 x): OpenAI trained with it, so we must use it too."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter names, computed by
    scaled_dot_product_attention. Self-attention by default; `context` gives cross-attention."""

    def __init__(self, width, num_heads, qkv_bias=True):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width)) if qkv_bias else None
        self.out_proj = nn.Linear(width, width)
        nn.init.normal_(self.in_proj_weight, std=width ** -0.5)

    def forward(self, x, context=None, is_causal=False):
        B, L, D = x.shape  # B here is any batch: frames, token positions or videos
        if context is None:
            q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            w_q, w_kv = self.in_proj_weight.split([D, 2 * D])
            b_q, b_kv = (None, None) if self.in_proj_bias is None else self.in_proj_bias.split([D, 2 * D])
            q = F.linear(x, w_q, b_q)
            k, v = F.linear(context, w_kv, b_kv).chunk(2, dim=-1)
        h = self.num_heads
        q, k, v = (t.unflatten(-1, (h, D // h)).transpose(1, 2) for t in (q, k, v))  # (B, h, L, D/h)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)              # (B, h, L, D/h)
        return self.out_proj(x.transpose(1, 2).flatten(2))                            # (B, L, D)


class ResidualAttentionBlock(nn.Module):
    """CLIP's pre-LN transformer block. `attention` and `feed_forward` are the two residual
    branches, exposed so the Table 11 connections can put an adapter beside either."""

    def __init__(self, width, heads, causal=False):
        super().__init__()
        self.causal = causal
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width)))

    def attention(self, x):
        return self.attn(self.ln_1(x), is_causal=self.causal)

    def feed_forward(self, x):
        return self.mlp(self.ln_2(x))

    def forward(self, x):
        x = x + self.attention(x)
        return x + self.feed_forward(x)


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, causal=False):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, causal) for _ in range(layers)])

    def forward(self, x):
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, resolution, patch_size, width, layers, embed_dim):
        super().__init__()
        grid = resolution // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(width ** -0.5 * torch.randn(width))
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(1 + grid * grid, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads=width // 64)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(width ** -0.5 * torch.randn(width, embed_dim))

    def embed(self, images):
        """Patch embedding + class token + positional embedding: X^0 + PE of Eq. (1)."""
        x = self.conv1(images).flatten(2).transpose(1, 2)               # (B, K, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1+K, D)

    def forward(self, images):
        x = self.transformer(self.ln_pre(self.embed(images)))
        return self.ln_post(x[:, 0]) @ self.proj                        # (B, E)


class CLIP(nn.Module):
    """OpenAI's CLIP (ViT image tower + causal text transformer). LayerNorm runs in the input's
    dtype; under autocast PyTorch computes it in fp32, which is what OpenAI's fp32 cast achieves."""

    def __init__(self, config: OmniCLIPConfig):
        super().__init__()
        c = config
        self.context_length = c.context_length
        self.visual = VisionTransformer(c.image_resolution, c.vision_patch_size, c.vision_width,
                                        c.vision_layers, c.embed_dim)
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.text_width))
        self.transformer = Transformer(c.text_width, c.text_layers, c.text_heads, causal=True)
        self.ln_final = nn.LayerNorm(c.text_width)
        self.text_projection = nn.Parameter(torch.empty(c.text_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=c.text_width ** -0.5)

    def encode_image(self, images):                                     # (B, 3, H, W) -> (B, E)
        return self.visual(images)

    def encode_text(self, tokens):                                      # (C, L) -> (C, E)
        x = self.token_embedding(tokens) + self.positional_embedding    # (C, L, W)
        x = self.ln_final(self.transformer(x))
        eot = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]        # EOT has the largest id
        return eot @ self.text_projection


# ----------------------------------------------------------------------------------------------
# OmniCLIP's new modules.

class SelfPromptGenerator(nn.Module):
    """Eq. (6): R = Projector(Avg(V)), K/4 prompt tokens per frame from 2x2 pooling of the patches.

    Paper is silent on the projector's widths and init; we use D -> D/4 -> D with GELU, applied
    residually (R = A + MLP(A)) with its last layer at zero, so at init the prompts are Table 9's
    'Avg.' variant. For an odd patch grid (ViT-B/32: 7x7) we pool with ceil_mode: 4x4 prompts.
    Once (default) or at every layer (spg_per_layer): OmniCLIP.encode_frames quotes both readings.
    Per layer, one projector serves every layer: Eq. (6) writes R^i and V^i with a layer index but
    Projector without one. One per layer would cost L times D^2/2 + 5D/4 parameters: 3.55 M for
    ViT-B/16 where the shared one costs 0.30 M (of 13.0 M trained in all: +25% for no stated gain)."""

    def __init__(self, width, grid, pooling="avg", projector=True):
        super().__init__()
        self.grid, self.pooling = grid, pooling
        self.projector = None
        if projector:
            self.projector = nn.Sequential(nn.Linear(width, width // 4), nn.GELU(),
                                           nn.Linear(width // 4, width))

    def forward(self, patches):                                         # (B·T, K, D)
        g = self.grid
        x = patches.transpose(1, 2).unflatten(2, (g, g))                # (B·T, D, g, g)
        pool = F.avg_pool2d if self.pooling == "avg" else F.max_pool2d
        prompts = pool(x, 2, ceil_mode=True).flatten(2).transpose(1, 2)  # (B·T, K/4, D)
        if self.projector is not None:
            prompts = prompts + self.projector(prompts)
        return prompts


class ParallelTemporalAdapter(nn.Module):
    """Eq. (7): V_t = Up(Attn(Down(V))), every token position attending over the T frames.

    Attn is the ViT attention block (LayerNorm + multi-head self-attention, head width 64) with
    fresh weights. Class and SPG prompt tokens attend over time too (paper Sec. 3.3: "the input of
    PTA contains self-prompts"). Up starts at zero, so a new PTA adds nothing."""

    def __init__(self, width, temporal_ratio=0.25):
        super().__init__()
        hidden = int(width * temporal_ratio)
        self.down = nn.Linear(width, hidden)
        self.ln = nn.LayerNorm(hidden)
        self.attn = Attention(hidden, num_heads=max(1, hidden // 64))
        self.up = nn.Linear(hidden, width)

    def forward(self, x, frames):                                       # (B·T, N, D)
        BT, N, _ = x.shape
        x = self.down(x)                                                # Eq. (7) Down: (B·T, N, d)
        x = x.unflatten(0, (BT // frames, frames)).transpose(1, 2).flatten(0, 1)  # (B·N, T, d)
        x = self.attn(self.ln(x))                                       # Eq. (7) Attn: (B·N, T, d)
        x = x.unflatten(0, (BT // frames, N)).transpose(1, 2).flatten(0, 1)       # (B·T, N, d)
        return self.up(x)                                               # Eq. (7) Up: (B·T, N, D)


class STAdapter(nn.Module):
    """Table 11's cascade adapter: ST-Adapter (Pan et al., NeurIPS 2022, the paper's [27]). Sec. 4.4:
    "the cascade variant of the temporal adapter can be viewed as a specialized form of the
    ST-Adapter, leveraging 3D convolution", at "relatively higher computational cost".

    Up(DWConv3D(Down(V))) over the (T, h, w) grid of the patch tokens. Read from ST-Adapter's
    released code (linziyi96/st-adapter, models_adapter.py and its ViT-B/16 scripts "12x384",
    "24x384"): bottleneck D/2 (384 for ViT-B/16), depthwise kernel (3, 1, 1) in both scripts, no
    activation; the convolution and both biases start at zero (OmniCLIP._init_adapters), Down and
    Up keep PyTorch's random init, so it adds 0 at init (identity holds) and still gets gradients.
    Placed before each block, its pre-attention position (its K400 script adapts before the MLP,
    its SSv2 script at both): the paper's cascade connection (Fig. 5(a)), in series with the layer.
    Only the K patch tokens are adapted (that code takes x[:, 1:]); the class token and the SPG
    prompts, which are not on the patch grid, get 0 and pass unchanged."""

    def __init__(self, width, grid, kernel_size=(3, 1, 1)):
        super().__init__()
        hidden, self.grid = width // 2, grid
        self.down = nn.Linear(width, hidden)
        self.conv = nn.Conv3d(hidden, hidden, kernel_size, padding=[k // 2 for k in kernel_size],
                              groups=hidden)                            # depthwise: one filter per channel
        self.up = nn.Linear(hidden, width)

    def forward(self, x, frames):                                       # (B·T, N, D)
        BT, N, _ = x.shape
        g, K = self.grid, self.grid ** 2
        h = self.down(x[:, 1:1 + K]).unflatten(0, (BT // frames, frames))     # (B, T, K, d)
        h = self.conv(h.unflatten(2, (g, g)).permute(0, 4, 1, 2, 3))         # (B, d, T, h, w)
        h = self.up(h.permute(0, 2, 3, 4, 1).flatten(2, 3).flatten(0, 1))    # (B·T, K, D)
        return F.pad(h, (0, 0, 1, N - 1 - K))                           # (B·T, N, D): 0 off the grid


class SpatialTemporalBlock(nn.Module):
    """Eqs. (2)-(4): a frozen CLIP ViT layer with a trainable temporal adapter beside it, fused by alpha.

    The frozen layer is passed in rather than held, so its weights live once, under `clip.`.
    `self.pta` is the block's temporal adapter (ST-Adapter for the cascade), built here from the
    whole config (width, frames, grid, temporal ratio). To try another adapter, change the one line
    marked "fork" (README, "Fork it"): any nn.Module whose forward(x, frames) maps the (B·T, N, D)
    tokens to the update it adds, same shape. If it has an `up` layer, the model zeroes it at init;
    otherwise it must add 0 at init by itself (test_model_every_adapter_starts_at_zero says which)."""

    def __init__(self, config: OmniCLIPConfig):
        super().__init__()
        c = config
        self.connection = c.connection
        if c.connection != "cascade":
            self.pta = ParallelTemporalAdapter(c.vision_width, c.temporal_ratio)  # fork: your adapter here
            self.alpha = nn.Parameter(torch.ones(()))  # Eq. (4): one learnable scalar per layer, init 1
        else:                                           # ST-Adapter has no alpha: its own residual only
            self.pta, self.alpha = STAdapter(c.vision_width, c.grid), None

    def forward(self, x, vit, frames):
        if self.connection == "block-parallel":      # Fig. 5(c), ours
            spatial = vit(x)                          # Eq. (2): V_s = ViT(V^{i-1})
            temporal = self.pta(x, frames)            # Eq. (3): V_t = PTA(V^{i-1})
            return spatial + self.alpha * temporal    # Eq. (4): V^i = V_s + alpha * V_t
        if self.connection == "attention-parallel":  # Fig. 5(b): PTA beside the attention only
            x = x + vit.attention(x) + self.alpha * self.pta(x, frames)
            return x + vit.feed_forward(x)
        return vit(x + self.pta(x, frames))           # Fig. 5(a) cascade: ST-Adapter, then the layer


class FrameAggregation(nn.Module):
    """Eq. (5): F_V = Avg(MHA([F_1 .. F_T])). The paper writes no residual and no LayerNorm; we use
    Avg(F + MHA(LN(F))) with the MHA output at zero, so at init F_V is CLIP's frame average (its
    zero-shot classifier) and the identity test holds. X-CLIP's MIT, the head of [26], goes further:
    a learned positional embedding over frames and a full transformer block (attention and MLP)."""

    def __init__(self, embed_dim):
        super().__init__()
        self.ln = nn.LayerNorm(embed_dim)
        self.attn = Attention(embed_dim, num_heads=max(1, embed_dim // 64))

    def forward(self, frame_features):                                  # (B, T, E)
        # Eq. (5): F_V = Avg(F + MHA(LN(F))), (B, T, E) -> (B, E)
        return (frame_features + self.attn(self.ln(frame_features))).mean(dim=1)


class PromptBlock(nn.Module):
    """One block of X-CLIP's prompt generator: class features attend to the video's patches."""

    def __init__(self, embed_dim, qkv_bias=True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(embed_dim)
        self.attn = Attention(embed_dim, num_heads=max(1, embed_dim // 64), qkv_bias=qkv_bias)
        self.ln_2 = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(embed_dim, 4 * embed_dim),
                                             gelu=QuickGELU(),
                                             c_proj=nn.Linear(4 * embed_dim, embed_dim)))

    def forward(self, x, patches):                  # (B, C, E), (B, K, E)
        x = x + self.attn(self.ln_1(x), context=patches)
        return x + self.mlp(self.ln_2(x))


class VideoSpecificPrompt(nn.Module):
    """X-CLIP Sec. 3.3: c_hat = c + gamma * c_tilde, c_tilde from the class features attending to
    the video's patch tokens (Sec. 3.1: "Following the approach in [26], we further enrich the text
    feature with video-specific prompts"; the class text is the template "A video of [CLS] action").

    The default (prompt_generator="ours") departs from X-CLIP's code in four ways: keys/values are
    the patches through CLIP's frozen ln_post and proj, already in the joint space (X-CLIP learns its
    own LayerNorm and a random projection), the output projections start at zero (X-CLIP: random)
    so that at init c_hat = 1.1 c, whose cosine with any video equals that of c, q/k/v carry
    biases (nn.MultiheadAttention's layout; X-CLIP's have none), and the other weights keep their
    modules' init: q/k/v normal with std E^-0.5 (Attention), c_fc PyTorch's default (X-CLIP:
    trunc_normal std 0.02 for every Linear). It is the default because the
    paper names only the approach ("following [26]"), not X-CLIP's initialisation, and these choices
    make an untrained OmniCLIP exactly CLIP's zero-shot classifier (the identity test).
    XCLIPPrompt computes what X-CLIP's code computes."""

    def __init__(self, embed_dim, layers=2, qkv_bias=True):
        super().__init__()
        self.ln = nn.LayerNorm(embed_dim)
        self.blocks = nn.ModuleList([PromptBlock(embed_dim, qkv_bias) for _ in range(layers)])
        self.gamma = nn.Parameter(torch.full((embed_dim,), 0.1))  # X-CLIP: learnable, init 0.1

    def project_patches(self, patches, visual):    # (B·T, K, D) -> (B·T, K, E), CLIP's frozen ones
        return visual.ln_post(patches) @ visual.proj

    def forward(self, class_features, patches):    # (C, E), (B, K, E)
        patches = self.ln(patches)
        x = class_features.expand(patches.shape[0], -1, -1)            # (B, C, E)
        for block in self.blocks:
            x = block(x, patches)
        return class_features + self.gamma * x                          # (B, C, E)


class XCLIPPrompt(VideoSpecificPrompt):
    """prompt_generator="xclip": what X-CLIP's released code computes (microsoft/VideoX, X-CLIP/
    models/prompt.py and xclip.py): the last layer's patch tokens go through its own LayerNorm (D)
    and a projection (D x E, torch.randn: std 1) per frame, then are averaged over time; q/k/v have
    no bias; every Linear starts trunc_normal(std .02) with zero bias (OmniCLIP._init_adapters).
    Nothing starts at zero, so the prompts move the class features from the first step."""

    def __init__(self, embed_dim, width, layers=2):
        super().__init__(embed_dim, layers, qkv_bias=False)
        self.visual_ln = nn.LayerNorm(width)
        self.visual_proj = nn.Parameter(torch.randn(width, embed_dim))

    def project_patches(self, patches, visual):    # (B·T, K, D) -> (B·T, K, E), its own
        return self.visual_ln(patches) @ self.visual_proj


def cosine_logits(video_features, class_features, logit_scale):
    """Eq. (8): exp(logit_scale) * cos(F_V, F_T); class features (C, E) or per video (B, C, E)."""
    v = F.normalize(video_features, dim=-1)                             # (B, E)
    c = F.normalize(class_features, dim=-1)
    if c.dim() == 2:
        return logit_scale.exp() * v @ c.t()                            # (B, C)
    return logit_scale.exp() * torch.einsum("be,bce->bc", v, c)         # (B, C)


def video_loss(logits, targets, label_smoothing=0.0):
    """Eq. (9): cross-entropy of softmax(sim). Targets are labels (B,) or soft targets (B, C)
    (mixup/cutmix); computed in fp32 whatever the autocast dtype."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def last_linear(module):
    """The last nn.Linear registered inside `module` (its output projection), or None."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


class OmniCLIP(nn.Module):
    def __init__(self, config: OmniCLIPConfig):
        super().__init__()
        c = self.config = config
        self.clip = CLIP(config)
        self.clip.requires_grad_(False)             # every CLIP weight is frozen, logit scale too
        D, E = c.vision_width, c.embed_dim
        self.temporal_embedding = nn.Parameter(torch.zeros(c.frames, D))   # Eq. (1): TE, (T, D)
        self.spg = SelfPromptGenerator(D, c.grid, c.spg_pooling, c.spg_projector) if c.spg else None
        layers = range(c.vision_layers) if c.pta_layers is None else c.pta_layers
        self.blocks = nn.ModuleDict({str(i): SpatialTemporalBlock(c) for i in (layers if c.pta else [])})
        self.frame_aggregation = FrameAggregation(E)
        self.prompt_generator = None
        if c.video_prompts:
            self.prompt_generator = (VideoSpecificPrompt(E, c.prompt_layers) if c.prompt_generator == "ours"
                                     else XCLIPPrompt(E, D, c.prompt_layers))
        self._init_adapters()

    def adapter_name(self):
        """Class name of the blocks' temporal adapter ("ParallelTemporalAdapter", "STAdapter", a
        fork's), recorded in checkpoints; None when there are no blocks."""
        return next((type(block.pta).__name__ for block in self.blocks.values()), None)

    @torch.no_grad()
    def _init_adapters(self):
        """What is new, how it starts, and why. Everything here trains; nothing under `clip.` does.

        | tensor                          | starts at          | so that at init                |
        | temporal_embedding (Eq. 1)      | 0                  | frames are CLIP's frames       |
        | spg.projector (Eq. 6)           | last layer 0       | prompts are the 2x2 averages   |
        | blocks.i.pta.down / attn        | random             | the adapter can learn          |
        | blocks.i.pta.up (Eq. 7; forks)  | 0                  | V_t = 0: the ViT is unchanged  |
        | a fork's adapter with no up     | its own init       | it must add 0 by itself        |
        | blocks.i.alpha (Eq. 4)          | 1                  |                                |
        | cascade: pta.conv, all biases   | 0 (ST-Adapter's)   | it adds 0; its Up stays random |
        | frame_aggregation.attn.out_proj | 0                  | F_V = mean_t F_t (Eq. 5)       |
        | prompt_generator out projs      | 0, gamma 0.1       | c_hat = 1.1 c: same cosine     |
        | xclip: every Linear, q/k/v      | trunc_normal .02   | X-CLIP's init: no identity     |
        """
        zero = []
        for block in self.blocks.values():
            if isinstance(block.pta, STAdapter):  # ST-Adapter's init: conv 0, Down and Up random with
                zero.append(block.pta.conv)       # 0 biases (zeroing Up too would stop every gradient)
                nn.init.zeros_(block.pta.down.bias)
                nn.init.zeros_(block.pta.up.bias)
            elif isinstance(getattr(block.pta, "up", None), nn.Module):
                zero.append(block.pta.up)         # the PTA's Up, or a fork's: V_t = 0 at init
            # an adapter with no `up` must add 0 at init by itself (a fork's: README, "Fork it")
        # the output Linears below are found by type, not by name: the last Linear of a part is
        # its output projection however a learner's file writes it (nn.MultiheadAttention's
        # out_proj, or q, k, v, o Linears of its own)
        zero.append(last_linear(self.frame_aggregation))
        if self.spg is not None and self.spg.projector is not None:
            zero.append(last_linear(self.spg.projector))
        if isinstance(self.prompt_generator, XCLIPPrompt):   # X-CLIP's prompt.py _init_weights
            for module in self.prompt_generator.modules():
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif getattr(module, "in_proj_weight", None) is not None:  # q, k, v: Linears too
                    nn.init.trunc_normal_(module.in_proj_weight, std=0.02)
        elif self.prompt_generator is not None:
            for block in self.prompt_generator.blocks:   # attention's and MLP's output Linears
                zero += [last_linear(part) for part in block.children()
                         if not isinstance(part, nn.Linear) and last_linear(part) is not None]
        for layer in filter(None, zero):
            for p in layer.parameters():      # weight and bias, where there is one
                nn.init.zeros_(p)

    @torch.no_grad()
    def encode_classes(self, tokens):
        """Class text features (C, E) from the frozen text tower. The tower is frozen, so callers
        compute this once per class list and pass it to forward: a training step runs no text."""
        return self.clip.encode_text(tokens)

    def embed_frames(self, videos):
        """Eq. (1): V^0 = X^0 + PE + TE, the tokens of every frame, (B, T, 3, H, W) -> (B·T, 1+K, D)."""
        B, T = videos.shape[:2]
        x = self.clip.visual.embed(videos.flatten(0, 1))                # (B·T, 1+K, D): X^0 + PE
        te = self.temporal_embedding.to(x.dtype)
        return (x.unflatten(0, (B, T)) + te[None, :, None]).flatten(0, 1)  # + TE: (B·T, 1+K, D)

    def encode_frames(self, videos):
        """The video encoder up to the per-frame features: Eqs. (1)-(4), (6), (7). Each part is a
        function of its own (embed_frames, the SPG, the blocks, ...): encode_frames only wires them.
        Returns F_{V,t} (B, T, E) and the patch tokens averaged over time (B, K, E), or None
        when there is no prompt generator to use them."""
        B, T = videos.shape[:2]
        if T != self.config.frames:
            raise ValueError(f"video has {T} frames, model was built for {self.config.frames}")
        visual, K = self.clip.visual, self.config.grid ** 2
        x = self.embed_frames(videos)                                   # Eq. (1): (B·T, 1+K, D)
        # Sec. 3.1: "commencing with self-resolution prompts R^0 = SPG(V^0). The initial video input
        # is subsequently augmented by concatenating it with these prompts, resulting in
        # V^0 = Concat(V^0, R^0)": the prompts are made once and flow through every layer (default).
        if self.spg is not None:
            prompts = self.spg(x[:, 1:])                                # Eq. (6): (B·T, K/4, D)
            x = torch.cat([x, prompts], dim=1)                          # (B·T, N, D), N = 1+K+K/4
        x = visual.ln_pre(x)
        for i, vit in enumerate(visual.transformer.resblocks):
            if i > 0 and self.config.spg_per_layer:
                # The other reading (spg_per_layer): Sec. 3.2 writes Eq. (6) for any layer, "video
                # input V^i ... R^i = Projector(Avg(V^i))", and Sec. 3.3 "the input of PTA contains
                # self-prompts R^i ... progressively integrate spatial-temporal information". So at
                # the input of layer i > 0 the prompts are pooled anew from V^i's patches and replace
                # R^{i-1} (R^0 is the same in both readings); N stays 1+K+K/4. We default to once:
                # Sec. 3.1 is the only place that says when SPG runs, and its Concat happens once,
                # before Eqs. (2)-(4).
                x = torch.cat([x[:, :1 + K], self.spg(x[:, 1:1 + K])], dim=1)  # Eq. (6), R^i: (B·T, N, D)
            block = self.blocks[str(i)] if str(i) in self.blocks else None
            args = (x, vit, T) if block is not None else (x,)
            layer = block if block is not None else vit
            if self.config.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        frames = (visual.ln_post(x[:, 0]) @ visual.proj).unflatten(0, (B, T))  # F_{V,t}: (B, T, E)
        if self.prompt_generator is None:
            return frames, None
        # the patch tokens are only needed as the prompt generator's keys and values
        patches = self.prompt_generator.project_patches(x[:, 1:1 + K], visual)  # (B·T, K, E)
        return frames, patches.unflatten(0, (B, T)).mean(dim=1)         # (B, T, E), (B, K, E)

    def encode_video(self, videos):
        """Video features F_V (B, E) (Eq. 5) and time-averaged patch tokens (B, K, E)."""
        frame_features, patches = self.encode_frames(videos)
        return self.frame_aggregation(frame_features), patches         # Eq. (5)

    def forward(self, videos, class_features):
        """(B, T, 3, H, W) videos and cached (C, E) class features -> (B, C) logits (Eq. 8)."""
        video_features, patches = self.encode_video(videos)
        if self.prompt_generator is not None:
            # X-CLIP: c_hat = c + gamma * c_tilde, one set of class features per video (B, C, E)
            class_features = self.prompt_generator(class_features.to(patches.dtype), patches)
        return cosine_logits(video_features, class_features, self.clip.logit_scale)  # Eq. (8)

    def trainable_state_dict(self):
        """The adapters only: what a checkpoint holds. CLIP's weights come from OpenAI's file."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    @torch.no_grad()
    def load_trainable_state_dict(self, state):
        own = self.trainable_state_dict()
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        if missing or unexpected:
            raise KeyError(f"adapter tensors do not match this model's config: "
                           f"missing {missing}, unexpected {unexpected}")
        for name, tensor in own.items():
            if tensor.shape != state[name].shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(state[name].shape)}, "
                                 f"model shape {tuple(tensor.shape)}")
            tensor.copy_(state[name])


class FrameAverageCLIP(nn.Module):
    """The baseline: CLIP's image tower on every frame, features averaged (ViFi-CLIP's model;
    X-CLIP's "CLIP-Mean"). OmniCLIP at initialisation with SPG off computes exactly this."""

    def __init__(self, clip: CLIP):
        super().__init__()
        self.clip = clip

    def forward(self, videos, class_features):
        B, T = videos.shape[:2]
        frames = self.clip.encode_image(videos.flatten(0, 1)).unflatten(0, (B, T))  # (B, T, E)
        return cosine_logits(frames.mean(dim=1), class_features, self.clip.logit_scale)


# ----------------------------------------------------------------------------------------------
# Model accounting, for the benchmark and the README. MACs = multiply-adds, the convention of the
# paper's "GFLOPs" column (fvcore's); torch's flop counter counts 2 FLOPs per multiply-add.

def count_parameters(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(total=total, trainable=trainable, frozen=total - trainable)


def count_macs(model, *inputs):
    """Multiply-adds of one forward, counted by torch.utils.flop_counter on the real ops.
    The CPU's fused attention kernel has no formula in torch's table, so we give it the standard one.
    Counted in training mode: nn.MultiheadAttention's inference fast path is one fused op the counter
    does not see (it would count 0); no module here behaves differently in training mode."""
    from torch.utils import flop_counter
    extra = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None and cpu_sdpa not in flop_counter.flop_registry:
        extra[cpu_sdpa] = lambda q, k, v, *args, out_shape=None, **kwargs: (
            flop_counter.sdpa_flop_count(q, k, v))
    was_training = model.training
    try:
        with torch.no_grad(), flop_counter.FlopCounterMode(display=False, custom_mapping=extra) as fc:
            model.train()(*inputs)
    finally:
        model.train(was_training)
    return fc.get_total_flops() // 2


def _block_macs(tokens, width):
    """One pre-LN transformer block on `tokens` tokens: qkv + out (4 N D^2), scores and values
    (2 N^2 D), MLP (8 N D^2). LayerNorms, softmax and GELU are not multiply-adds."""
    return 12 * tokens * width ** 2 + 2 * tokens ** 2 * width


def analytic_macs(config: OmniCLIPConfig, num_classes, adapter=None):
    """Multiply-adds per view (one clip of T frames), by part, from the shapes alone.
    The text tower is excluded: class features are computed once and cached. The temporal adapter's
    part is keyed by its class, "adapter:ParallelTemporalAdapter" or "adapter:STAdapter"; pass a
    block's adapter module (`model.blocks["0"].pta`) and an adapter of any other class (a fork's) is
    counted by torch's flop counter on one view's (T, N, D) tokens, times the number of blocks."""
    c, C = config, num_classes
    T, D, E, P, K = c.frames, c.vision_width, c.embed_dim, c.vision_patch_size, c.grid ** 2
    g4 = math.ceil(c.grid / 2)
    prompts = g4 * g4 if c.spg else 0
    N0, N = 1 + K, 1 + K + prompts
    layers = (c.vision_layers if c.pta_layers is None else len(c.pta_layers)) if c.pta else 0
    if adapter is None:
        adapter_class = STAdapter if c.connection == "cascade" else ParallelTemporalAdapter
    else:
        adapter_class = type(adapter)
    if adapter_class is ParallelTemporalAdapter:
        d = int(D * c.temporal_ratio)
        # per frame and token: Down + Up (2 D d), qkv + out (4 d^2); per token position: T^2 d twice
        per_block = T * N * (2 * D * d + 4 * d * d) + N * 2 * T * T * d
    elif adapter_class is STAdapter:
        d, kernel = D // 2, (adapter.conv.kernel_size if adapter is not None else (3, 1, 1))
        # per frame and patch (not the class or prompt tokens): Down + Up (2 D d), depthwise conv
        per_block = T * K * (2 * D * d + d * math.prod(kernel))
    else:
        p = next(adapter.parameters(), torch.zeros(()))                 # its device and dtype
        per_block = count_macs(adapter, p.new_zeros(T, N, D), T) if layers else 0
    parts = {
        "patch_embedding": T * K * 3 * P * P * D,
        "clip_blocks": T * c.vision_layers * _block_macs(N0, D),
        "extra_prompt_tokens": T * c.vision_layers * (_block_macs(N, D) - _block_macs(N0, D)),
        f"adapter:{adapter_class.__name__}": per_block * layers,
        # pooling is not a multiply-add; the projector runs once, or at each layer's input
        "spg": (T * prompts * 2 * D * (D // 4) * (c.vision_layers if c.spg_per_layer else 1)
                if (c.spg and c.spg_projector) else 0),
        # the class token through ln_post/proj, and the patch tokens when they are the prompts' keys
        "ln_post_proj": T * ((1 + K) if c.video_prompts else 1) * D * E,
        "eq5_head": T * 4 * E * E + 2 * T * T * E,
        # per block: keys/values of K patches (2 K E^2), per class: q, out, MLP (10 E^2), attention 2 K E
        "text_prompts": c.prompt_layers * (2 * K * E * E + C * (10 * E * E + 2 * K * E))
        if c.video_prompts else 0,
        "logits": C * E,
    }
    parts["total"] = sum(parts.values())
    return parts


def analytic_baseline_macs(config: OmniCLIPConfig, num_classes):
    """The frame-average CLIP baseline's multiply-adds per view, same counting."""
    c = config
    K = c.grid ** 2
    return (c.frames * (K * 3 * c.vision_patch_size ** 2 * c.vision_width
                        + c.vision_layers * _block_macs(1 + K, c.vision_width)
                        + c.vision_width * c.embed_dim) + num_classes * c.embed_dim)
