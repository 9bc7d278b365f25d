"""clip_weights.py against OpenAI's own code: the same numbers from the same weights, the same
token ids from the same text, and downloads that are checked before they are trusted.
No network: downloads are file:// URLs or a stand-in fetch."""
import hashlib
import os
import random
import re
import urllib.error
import warnings

import pytest
import torch

import clip_weights as cw
import omniclip as oc

# OpenAI's released ViTs, in the argument names of OpenAI's CLIP class (from their model card and
# the shapes of the released files), written here independently of omniclip.ARCHITECTURES.
_TEXT_B = dict(context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
               transformer_layers=12)
_TEXT_L = dict(_TEXT_B, transformer_width=768, transformer_heads=12)
OPENAI_SHAPES = {
    "ViT-B/32": dict(_TEXT_B, embed_dim=512, image_resolution=224, vision_layers=12,
                     vision_width=768, vision_patch_size=32),
    "ViT-B/16": dict(_TEXT_B, embed_dim=512, image_resolution=224, vision_layers=12,
                     vision_width=768, vision_patch_size=16),
    "ViT-L/14": dict(_TEXT_L, embed_dim=768, image_resolution=224, vision_layers=24,
                     vision_width=1024, vision_patch_size=14),
    "ViT-L/14@336px": dict(_TEXT_L, embed_dim=768, image_resolution=336, vision_layers=24,
                           vision_width=1024, vision_patch_size=14),
}
RESNET50 = dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                vision_patch_size=None, **_TEXT_B)
PROMPTS = ["a video of brush hair action.", "a video of somebody playing the cello in a park"]


def relative_error(ours, reference):
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@torch.no_grad()
def randomize(model, seed):
    """Distinct random values in every tensor, LayerNorms, embeddings and logit scale included,
    scaled so activations stay near unit size through 12 blocks, and rounded to fp16 so that the
    fp16 files we write hold exactly the values the fp32 reference computes with."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 0:                                   # logit_scale
            p.normal_(3, 1, generator=g)
        elif ".ln_" in f".{name}" and name.endswith("weight"):
            p.normal_(1, 0.2, generator=g)                 # LayerNorm gains
        elif p.dim() == 1:                                 # biases, class embedding
            p.normal_(0, 0.2, generator=g)
        elif "embedding" in name:                          # token and positional embeddings
            p.normal_(0, 0.5, generator=g)
        elif name.endswith(("proj", "projection")):       # used as x @ W: fan-in is the rows
            p.normal_(0, p.shape[0] ** -0.5, generator=g)
        else:                                              # Linear and conv weights (out, in...)
            p.normal_(0, p[0].numel() ** -0.5, generator=g)
        p.copy_(p.half())


def mimic_shipped_archive(reference, name):
    """OpenAI's archives carry three integers beside the weights; the reference keeps two of
    these names as plain attributes, which we turn into buffers as the archives have them."""
    shape = OPENAI_SHAPES[name]
    del reference.context_length, reference.vocab_size
    reference.register_buffer("input_resolution", torch.tensor(shape["image_resolution"]))
    reference.register_buffer("context_length", torch.tensor(shape["context_length"]))
    reference.register_buffer("vocab_size", torch.tensor(shape["vocab_size"]))


# ----------------------------------------------------------------------------------------------
# Parity: our CLIP computes OpenAI's numbers from OpenAI-format files.

def write_openai_files(reference, openai_model, name, folder, tokens):
    """The two ways OpenAI-style weights come: a plain state_dict after convert_weights (fp16 but
    LayerNorms and embeddings) and a TorchScript archive traced from that fp16 model, as OpenAI
    made the files clip.load downloads. The reference is fp16 afterwards."""
    mimic_shipped_archive(reference, name)
    openai_model.convert_weights(reference)     # lossless: the values are fp16 already
    torch.save(reference.state_dict(), folder / "state_dict.pt")
    # Tracing records the graph of one forward; a few tokens through the text tower are enough
    # (the archive's state_dict, all we read from it, holds every tensor of the module anyway).
    with warnings.catch_warnings():  # about Python branches in OpenAI's code, and jit's deprecation
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(reference, {"encode_text": tokens[:1, :4]},
                                        check_trace=False)
        torch.jit.save(traced, folder / "archive.pt")
    return folder / "state_dict.pt", folder / "archive.pt"


@pytest.mark.parametrize("name", ["ViT-B/32", "ViT-B/16"])
def test_encoders_match_openai_clip_from_both_file_formats(openai_model, tmp_path, name):
    reference = openai_model.CLIP(**OPENAI_SHAPES[name]).eval()
    randomize(reference, seed=len(name))
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tokens = cw.tokenize(PROMPTS)
    with torch.no_grad():
        expected_image, expected_text = reference.encode_image(images), reference.encode_text(tokens)
    plain_file, archive_file = write_openai_files(reference, openai_model, name, tmp_path, tokens)

    shipped = reference.state_dict()            # mixed fp16/fp32, with the three integers
    plain, archive = cw.load_state_dict(plain_file), cw.load_state_dict(archive_file)
    assert sorted(plain) == sorted(archive) == sorted(shipped.keys() - set(cw.DROPPED_KEYS))
    for key, tensor in plain.items():
        assert tensor.dtype == archive[key].dtype == torch.float32, key
        assert torch.equal(tensor, shipped[key].float()), key
        assert torch.equal(archive[key], shipped[key].float()), key  # both build the same model

    assert cw.clip_architecture(plain) == oc.ARCHITECTURES[name]
    model = cw.build_clip(archive).eval()
    with torch.no_grad():
        image, text = model.encode_image(images), model.encode_text(tokens)
    assert expected_image.abs().max() > 0.1 and expected_text.abs().max() > 0.1
    assert relative_error(image, expected_image) < 1e-4
    assert relative_error(text, expected_text) < 1e-4


# ----------------------------------------------------------------------------------------------
# Tokenizer: OpenAI's ids, text for text.

def reference_tokenize(tokenizer, texts, context_length=77):
    """OpenAI's clip.tokenize (which lives in clip/clip.py beside the torchvision import) with
    truncate=True, on top of the reference SimpleTokenizer."""
    sot, eot = tokenizer.encoder["<|startoftext|>"], tokenizer.encoder["<|endoftext|>"]
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [sot] + tokenizer.encode(text) + [eot]
        ids = ids[:context_length]
        ids[-1] = eot
        result[row, :len(ids)] = torch.tensor(ids)
    return result


PIECES = [
    "hello", "World", "VIDEO", "brush_hair", "ApplyEyeMakeup", "kick-ball", "o'clock",
    "café", "naïve", "Ångström", "São Paulo", "straße", "e\u0301", "Ⅻ", "ﬁne", "Ｆｕｌｌ",
    "東京タワー", "北京烤鸭", "한국어", "日本語のテキスト", "Ελληνικά", "Привет", "مرحبا", "שלום", "नमस्ते",
    "😀", "👍🏽", "🇫🇷", "👨‍👩‍👧", "🤸‍♀️",
    "&amp;", "&#39;", "&lt;b&gt;", "&amp;amp;", "&quot;quoted&quot;", "&nbsp;", "&#x1F600;",
    "don't", "it's", "we're", "I'VE", "you'll", "he'd", "I'm", "rock'n'roll",
    "...", "!?", "--", "«»", "“quotes”", "(parens)", "[brackets]", "#hashtag", "@user", "$5.99",
    "1234", "3.14", "1,000,000", "٣٤", "2nd", "x2", "½",
    "cafÃ©", "\x00", "\u200b", "<|endoftext|>", "<|startoftext|>", "http://example.com/a?b=c",
]
SEPARATORS = [" ", "  ", "\n", "\t", "\r\n", " \n\t ", "\u00a0", "\u3000", "", "-", ", "]


def random_characters(rng, length):
    """Code points from ASCII up to the supplementary planes (no surrogates: not valid text)."""
    ranges = [(32, 126), (0, 0x2FF), (0x300, 0x2FFF), (0x3000, 0x9FFF), (0xAC00, 0xD7A3),
              (0xE000, 0x10FFFF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(length))


def varied_texts(count=300, seed=0):
    rng = random.Random(seed)
    texts = ["", " ", "\n\t", "A", "a video of brush hair action."]
    texts += [random_characters(rng, rng.randint(1, 30)) for _ in range(50)]
    while len(texts) < count:
        words = rng.choices(PIECES, k=rng.randint(1, 12))
        text = "".join(w + rng.choice(SEPARATORS) for w in words)
        texts.append(" " * rng.randint(0, 2) + text)
    return texts


def test_tokenizer_gives_openai_ids(openai_tokenizer):
    reference = openai_tokenizer.SimpleTokenizer()
    ours = cw._tokenizer()
    texts = varied_texts()
    for text in texts:
        assert ours.encode(text) == reference.encode(text), repr(text)
    assert torch.equal(cw.tokenize(texts, truncate=True), reference_tokenize(reference, texts))


def test_tokenizer_fits_exactly_75_tokens_between_start_and_end(openai_tokenizer):
    """77 positions: START, at most 75 tokens of text, END. The 76th token is refused, or cut."""
    reference = openai_tokenizer.SimpleTokenizer()
    for words, pad in ((["go"] * 75, ""), (["brush", "hair"] * 37 + ["go"], "  ")):
        text = pad + " ".join(words)
        ids = reference.encode(text)
        assert len(ids) == 75
        row = cw.tokenize(text)[0].tolist()
        assert row == [49406] + ids + [49407]                # all 77 used, no padding left
        longer = text + " go"
        with pytest.raises(RuntimeError, match="text of 78 tokens is too long for context length 77"):
            cw.tokenize(longer)
        cut = cw.tokenize(longer, truncate=True)[0].tolist()
        assert cut == [49406] + reference.encode(longer)[:75] + [49407]
    shorter = cw.tokenize(" ".join(["go"] * 74))[0].tolist()
    assert shorter[-1] == 0 and shorter[-2] == 49407


def test_tokenizer_truncates_only_when_asked(openai_tokenizer):
    reference = openai_tokenizer.SimpleTokenizer()
    long_text = " ".join(varied_texts(count=60, seed=1))
    assert len(reference.encode(long_text)) > 200
    with pytest.raises(RuntimeError, match="too long for context length 77"):
        cw.tokenize(long_text)
    ids = cw.tokenize([long_text, "short"], truncate=True)
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, -1] == 49407    # END closes the cut text: CLIP reads its position
    assert torch.equal(ids, reference_tokenize(reference, [long_text, "short"]))
    assert cw.tokenize("short", context_length=5).tolist() == [[49406, 3005, 49407, 0, 0]]
    assert cw._tokenizer().decode(cw._tokenizer().encode(" Café &amp; 東京!")) == "café & 東京 !"


# ----------------------------------------------------------------------------------------------
# Downloads: verified before use, fetched once.

def publish(folder, payload, name="weights.pt", sha=None):
    """Serve `payload` at a file:// URL shaped like OpenAI's: .../<sha256>/<name>."""
    sha = sha or hashlib.sha256(payload).hexdigest()
    (folder / sha).mkdir(parents=True)
    (folder / sha / name).write_bytes(payload)
    return (folder / sha / name).as_uri(), sha


@pytest.fixture
def fetches(monkeypatch):
    urls, real_fetch = [], cw._fetch

    def counting_fetch(url, out):
        urls.append(url)
        return real_fetch(url, out)
    monkeypatch.setattr(cw, "_fetch", counting_fetch)
    return urls


def test_good_download_is_fetched_once_and_reused(tmp_path, fetches):
    payload = os.urandom(3000)
    url, sha = publish(tmp_path / "server", payload)
    cache = tmp_path / "cache"
    path = cw.download(url, cache_dir=str(cache))
    assert path == str(cache / "weights.pt") and open(path, "rb").read() == payload
    assert cw.sha256_of(path) == sha
    assert cw.download(url, cache_dir=str(cache)) == path
    assert cw.resolve_weights(url, cache_dir=str(cache)) == path
    assert fetches == [url]
    assert os.listdir(cache) == ["weights.pt"]


def test_corrupt_download_is_refused_and_deleted(tmp_path, fetches):
    wrong = hashlib.sha256(b"what the publisher meant").hexdigest()
    url, _ = publish(tmp_path / "server", b"what arrived", sha=wrong)
    actual = hashlib.sha256(b"what arrived").hexdigest()
    cache = tmp_path / "cache"
    with pytest.raises(cw.WeightsError) as error:
        cw.download(url, cache_dir=str(cache))
    assert url in str(error.value) and wrong in str(error.value) and actual in str(error.value)
    assert os.listdir(cache) == []          # neither the file nor a temporary part is left


def test_cached_file_with_wrong_hash_is_downloaded_again(tmp_path, fetches):
    url, _ = publish(tmp_path / "server", b"the real weights")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "weights.pt").write_bytes(b"damaged")
    path = cw.download(url, cache_dir=str(cache))
    assert open(path, "rb").read() == b"the real weights" and len(fetches) == 1


def test_model_names_download_openai_urls(tmp_path, monkeypatch):
    assert list(cw.MODELS) == list(OPENAI_SHAPES)
    asked = []

    def fake_fetch(url, out):
        asked.append(url)
        out.write(b"not the weights")
        return hashlib.sha256(b"not the weights").hexdigest()
    monkeypatch.setattr(cw, "_fetch", fake_fetch)
    monkeypatch.setenv("OMNICLIP_CACHE", str(tmp_path / "env-cache"))
    assert cw.default_cache_dir() == str(tmp_path / "env-cache")
    with pytest.raises(cw.WeightsError, match="SHA256 mismatch"):
        cw.load_state_dict("ViT-B/32")
    assert asked == [cw.MODELS["ViT-B/32"]]
    assert asked[0].startswith("https://openaipublic.azureedge.net/clip/models/")
    with pytest.raises(cw.WeightsError, match="'ViT-B/64' is not a file, nor one of"):
        cw.resolve_weights("ViT-B/64")


def test_offline_the_failed_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(url, out):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(cw, "_fetch", offline)
    monkeypatch.setenv("OMNICLIP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(cw.WeightsError) as error:
        cw.load_state_dict("ViT-B/16")
    message = str(error.value)
    sha = "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"
    for words in (cw.MODELS["ViT-B/16"], f"SHA256 {sha}", str(tmp_path / "cache" / "ViT-B-16.pt"),
                  "--clip-weights FILE", "name resolution"):
        assert words in message, words
    assert "\n" not in message and os.listdir(tmp_path / "cache") == []


def test_each_model_name_is_found_from_its_sha256():
    for name, url in cw.MODELS.items():
        digest = re.fullmatch(r"https://openaipublic\.azureedge\.net/clip/models/([0-9a-f]{64})/[^/]+\.pt",
                              url).group(1)
        assert cw.MODEL_SHA256[name] == digest
        assert cw.model_name_for_sha256(digest) == name
    assert len(set(cw.MODEL_SHA256.values())) == len(cw.MODELS)
    assert cw.model_name_for_sha256("0" * 64) is None and cw.model_name_for_sha256(None) is None


# ----------------------------------------------------------------------------------------------
# Architecture from shapes, and loud, strict loading.

def meta_state_dict(openai_model, shape):
    """A reference state_dict with the right shapes and no memory (meta tensors)."""
    with torch.device("meta"):
        state = openai_model.CLIP(**shape).state_dict()
    return dict(state, input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                vocab_size=torch.tensor(49408))


@pytest.mark.parametrize("name", list(OPENAI_SHAPES))
def test_architecture_is_read_from_the_shapes(openai_model, name):
    shape = OPENAI_SHAPES[name]
    expected = {k.replace("transformer_", "text_"): v for k, v in shape.items()}
    found = cw.clip_architecture(meta_state_dict(openai_model, shape))
    assert found == expected == oc.ARCHITECTURES[name]


def test_resnet_and_foreign_weights_are_refused(openai_model):
    with pytest.raises(cw.WeightsError, match="ResNet"):
        cw.clip_architecture(meta_state_dict(openai_model, RESNET50))
    with pytest.raises(cw.WeightsError, match="missing.*visual.conv1.weight"):
        cw.clip_architecture({"fc.weight": torch.zeros(2, 2)})


def tiny_weights():
    torch.manual_seed(0)
    return oc.CLIP(oc.OmniCLIPConfig(**oc.ARCHITECTURES["tiny"])).state_dict()


def test_strict_load_lists_missing_and_unexpected_names():
    state = tiny_weights()
    del state["visual.transformer.resblocks.1.ln_2.bias"]
    state["visual.transformer.resblocks.1.adapter.weight"] = torch.zeros(3)
    with pytest.raises(cw.WeightsError) as error:
        cw.build_clip(state)
    message = str(error.value)
    assert "\n" not in message
    assert "missing (1): ['visual.transformer.resblocks.1.ln_2.bias']" in message
    assert "unexpected (1): ['visual.transformer.resblocks.1.adapter.weight']" in message


def test_build_omniclip_loads_clip_and_names_every_new_tensor(capsys):
    state = tiny_weights()
    model = cw.build_omniclip(state, frames=4, spg_pooling="max")
    printed = capsys.readouterr().out
    new = model.trainable_state_dict()
    assert new and all(f"  {name} " in printed for name in new)
    assert not any("  clip." in line for line in printed.splitlines())
    assert model.config.frames == 4 and model.config.spg_pooling == "max"
    for key, tensor in model.clip.state_dict().items():
        assert torch.equal(tensor, state[key]), key
    assert not any(p.requires_grad for p in model.clip.parameters())
    with pytest.raises(ValueError, match="embed_dim"):
        cw.build_omniclip(state, embed_dim=256)


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"just some text\n"],
                         ids=["random-bytes", "empty", "text"])
def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, content):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(cw.WeightsError, match="weights.pt is neither a TorchScript archive"):
        cw.load_state_dict(str(path))


def test_a_checkpoint_without_a_state_dict_is_named(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(cw.WeightsError, match="list.pt does not hold a state_dict"):
        cw.load_state_dict(str(path))
