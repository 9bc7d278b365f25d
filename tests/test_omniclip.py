"""The model, one equation at a time. Read each test next to its equation in the paper (Sec. 3).

All on CPU with the `tiny` architecture (same code path as ViT-B/16, narrow and shallow), except
the last test, which runs a real-size ViT-B/16 forward with random weights.
"""
import pytest
import torch
import torch.nn.functional as F

import omniclip as oc

T = 4  # frames for the tiny tests


def tiny_config(**options):
    return oc.OmniCLIPConfig(**oc.ARCHITECTURES["tiny"], frames=options.pop("frames", T), **options)


def tiny_model(**options):
    torch.manual_seed(0)
    return oc.OmniCLIP(tiny_config(**options)).eval()


def randomize_adapters(model, seed=1):
    """Move every adapter tensor off its init, so a property cannot hold by zeros alone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def video(B=2, frames=T, size=64, seed=0):
    return torch.randn(B, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def class_features(C=5, E=128, seed=3):
    return torch.randn(C, E, generator=torch.Generator().manual_seed(seed))


def test_eq1_temporal_embedding_is_zero_at_init_and_tells_frames_apart():
    model = tiny_model()
    assert model.temporal_embedding.shape == (T, 128)  # (T, D)
    assert torch.count_nonzero(model.temporal_embedding) == 0
    randomize_adapters(model)
    still = video(B=1)[:, :1].expand(1, T, 3, 64, 64)  # one frame repeated: no motion at all
    with torch.no_grad():
        model.temporal_embedding.zero_()
        frames, _ = model.encode_frames(still)          # (B, T, E)
        assert torch.allclose(frames[0, 0], frames[0, -1], atol=1e-5)
        model.temporal_embedding.normal_()
        frames, _ = model.encode_frames(still)
    assert frames.shape == (1, T, 128)
    assert not torch.allclose(frames[0, 0], frames[0, -1], atol=1e-3)


def test_eq6_spg_yields_k_over_4_prompts_per_frame_and_max_differs_from_avg():
    model = tiny_model()
    K, D = model.config.grid ** 2, model.config.vision_width
    patches = torch.randn(2 * T, K, D)                   # (B·T, K, D)
    avg = model.spg(patches)
    assert avg.shape == (2 * T, K // 4, D)
    # Projector's last layer starts at zero: at init the prompts are Table 9's plain 'Avg.'
    grid = patches.transpose(1, 2).unflatten(2, (4, 4))
    assert torch.allclose(avg, F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2), atol=1e-6)
    model_max = tiny_model(spg_pooling="max")
    assert not torch.allclose(model_max.spg(patches), avg)
    # The prompts reach the ViT: N = 1 + K + K/4 tokens per frame go through every layer.
    seen = []
    hook = model.clip.visual.transformer.resblocks[0].ln_1.register_forward_hook(
        lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        model.encode_frames(video())
    hook.remove()
    assert seen == [torch.Size([2 * T, 1 + K + K // 4, D])]


def test_eq6_odd_patch_grid_pools_with_ceil():
    spg = oc.SelfPromptGenerator(width=8, grid=7)        # ViT-B/32's 7x7 grid
    assert spg(torch.randn(3, 49, 8)).shape == (3, 16, 8)


def test_eq7_pta_attends_only_across_time():
    torch.manual_seed(0)
    D, N = 128, 6
    pta = oc.ParallelTemporalAdapter(D, temporal_ratio=0.25)
    torch.nn.init.normal_(pta.up.weight)                 # off its zero init
    x = torch.randn(2 * T, N, D)                         # (B·T, N, D)
    out = pta(x, frames=T)
    assert out.shape == x.shape
    changed = x.clone()
    changed[1 * T + 2, 3] += 1.0                         # video 1, frame t=2, token j=3
    diff = (pta(changed, frames=T) - out).abs().amax(dim=-1).unflatten(0, (2, T))  # (B, T, N)
    assert (diff[1, :, 3] > 1e-6).all()                  # token j changes in every frame of that video
    diff[1, :, 3] = 0
    assert diff.max() == 0                               # and nothing else changes, in any video


def test_eq7_temporal_ratio_sets_the_bottleneck():
    for ratio, hidden in [(1 / 8, 16), (1 / 4, 32), (1 / 2, 64), (1, 128)]:
        model = tiny_model(temporal_ratio=ratio)
        assert model.blocks["0"].pta.down.out_features == hidden


def test_eq4_fuses_with_a_learnable_alpha_per_layer():
    model = tiny_model()
    randomize_adapters(model)
    alphas = [block.alpha for block in model.blocks.values()]
    assert len(alphas) == 4 and all(a.shape == () and a.requires_grad for a in alphas)
    assert len({id(a) for a in alphas}) == 4             # one scalar per layer, not shared
    block, vit = model.blocks["1"], model.clip.visual.transformer.resblocks[1]
    x = torch.randn(2 * T, 21, 128)
    with torch.no_grad():
        block.alpha.fill_(0.5)
        expected = vit(x) + 0.5 * block.pta(x, T)        # Eq. (4): V_s + alpha * V_t
        assert torch.allclose(block(x, vit, T), expected, atol=1e-6)
        block.alpha.zero_()
        assert torch.allclose(block(x, vit, T), vit(x), atol=1e-6)


def test_eq5_frame_aggregation_is_the_frame_average_at_init():
    model = tiny_model()
    frames = torch.randn(3, T, 128)
    assert torch.allclose(model.frame_aggregation(frames), frames.mean(dim=1), atol=1e-6)
    randomize_adapters(model)                            # trained: attention mixes frames
    assert not torch.allclose(model.frame_aggregation(frames), frames.mean(dim=1), atol=1e-3)


def test_eq8_logits_are_cosines_bounded_by_the_logit_scale():
    model = tiny_model()
    randomize_adapters(model)
    with torch.no_grad():
        logits = model(video(), class_features())
    scale = model.clip.logit_scale.exp()
    assert logits.shape == (2, 5)
    assert (logits.abs() <= scale + 1e-4).all()
    v, c = torch.randn(2, 8), torch.randn(5, 8)
    assert torch.allclose(oc.cosine_logits(v, c, torch.tensor(0.0)),
                          F.cosine_similarity(v[:, None], c[None], dim=-1), atol=1e-6)


def test_eq9_loss_matches_cross_entropy():
    logits, labels = torch.randn(4, 7), torch.tensor([0, 3, 6, 2])
    assert torch.allclose(oc.video_loss(logits, labels), F.cross_entropy(logits, labels))
    soft = F.one_hot(labels, 7).float()
    assert torch.allclose(oc.video_loss(logits, soft), F.cross_entropy(logits, labels))
    by_hand = -(F.log_softmax(logits, -1) * (0.9 * soft + 0.1 / 7)).sum(-1).mean()
    assert torch.allclose(oc.video_loss(logits, labels, label_smoothing=0.1), by_hand, atol=1e-6)


def test_video_specific_prompts_start_as_scaled_class_features():
    model = tiny_model()
    c, patches = class_features(), torch.randn(2, 16, 128)
    assert torch.allclose(model.prompt_generator(c, patches), 1.1 * c.expand(2, 5, 128), atol=1e-6)
    randomize_adapters(model)                            # trained: each video gets its own prompts
    out = model.prompt_generator(c, patches)
    assert out.shape == (2, 5, 128) and not torch.allclose(out[0], out[1], atol=1e-4)


@pytest.mark.parametrize("connection", oc.CONNECTIONS)
def test_identity_at_init_equals_frame_average_clip(connection):
    """With SPG off, an untrained OmniCLIP is CLIP averaging its frames: same probabilities."""
    model = tiny_model(spg=False, connection=connection)
    baseline = oc.FrameAverageCLIP(model.clip)
    x, c = video(), class_features()
    with torch.no_grad():
        ours, theirs = model(x, c).softmax(-1), baseline(x, c).softmax(-1)
    assert torch.allclose(ours, theirs, atol=1e-5)
    randomize_adapters(model)                            # the test can fail: trained adapters differ
    with torch.no_grad():
        assert not torch.allclose(model(x, c).softmax(-1), theirs, atol=1e-3)


def test_trainable_tensors_are_exactly_the_adapters_and_all_get_gradients():
    model = tiny_model()
    randomize_adapters(model)  # a zero-init Up would block no gradient, but keep the test general
    logits = model.train()(video(), class_features())
    oc.video_loss(logits, torch.tensor([1, 4])).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.trainable_state_dict())
    prefixes = {n.split(".")[0] for n in trainable}
    assert prefixes == {"temporal_embedding", "spg", "blocks", "frame_aggregation",
                        "prompt_generator"}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert name.startswith("clip.") and p.grad is None, name
    assert not any(n.startswith("clip.") for n in trainable)


def test_ablation_switches_build_what_the_tables_describe():
    assert list(tiny_model(pta_layers=[0, 2]).blocks) == ["0", "2"]      # Table 10
    assert len(tiny_model(pta=False).blocks) == 0                        # Table 7
    assert tiny_model(spg=False).spg is None                             # Table 7
    assert tiny_model(spg_projector=False).spg.projector is None         # Table 9
    assert tiny_model(video_prompts=False).prompt_generator is None
    with pytest.raises(ValueError, match="connection"):
        tiny_config(connection="serial")                                 # Table 11 names only
    with pytest.raises(ValueError, match="pta_layers"):
        tiny_config(pta_layers=[4])
    for options in [dict(pta=False, spg=False), dict(connection="cascade"),
                    dict(spg_pooling="max", spg_projector=False), dict(video_prompts=False)]:
        with torch.no_grad():
            assert tiny_model(**options)(video(), class_features()).shape == (2, 5)


def test_wrong_number_of_frames_is_a_clear_error():
    with pytest.raises(ValueError, match="6 frames, model was built for 4"):
        tiny_model()(video(frames=6), class_features())


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for flag in (False, True):
        model = tiny_model(gradient_checkpointing=flag).train()
        randomize_adapters(model)
        oc.video_loss(model(video(), class_features()), torch.tensor([0, 1])).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


def test_trainable_state_dict_round_trip_is_strict():
    model, other = tiny_model(), tiny_model()
    randomize_adapters(model)
    other.load_trainable_state_dict(model.trainable_state_dict())
    with torch.no_grad():
        assert torch.equal(model(video(), class_features()), other(video(), class_features()))
    assert not any(k.startswith("clip.") for k in model.trainable_state_dict())
    with pytest.raises(KeyError, match="missing"):
        tiny_model(pta_layers=[0]).load_trainable_state_dict(model.trainable_state_dict())


@pytest.mark.parametrize("options", [{}, dict(spg=False, video_prompts=False),
                                     dict(pta_layers=[1], temporal_ratio=0.5)])
def test_counted_macs_match_the_analytic_count(options):
    model = tiny_model(**options)
    counted = oc.count_macs(model, video(B=1), class_features())
    assert counted == oc.analytic_macs(model.config, num_classes=5)["total"]
    baseline = oc.count_macs(oc.FrameAverageCLIP(model.clip), video(B=1), class_features())
    assert baseline == oc.analytic_baseline_macs(model.config, num_classes=5)


def test_vit_b16_forward_with_8_frames_on_cpu():
    torch.manual_seed(0)
    config = oc.OmniCLIPConfig(**oc.ARCHITECTURES["ViT-B/16"], frames=8)
    model = oc.OmniCLIP(config).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 8, 3, 224, 224), torch.randn(3, 512))
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()
    # 14x14 patches -> 49 SPG prompts; 12 PTAs; CLIP's 150M tensors all frozen.
    assert model.spg(torch.randn(1, 196, 768)).shape == (1, 49, 768) and len(model.blocks) == 12
    counts = oc.count_parameters(model)
    assert counts["frozen"] == sum(p.numel() for p in model.clip.parameters())
