"""OpenAI's released CLIP files -> our modules: download, checksum, load, build, tokenize.

Everything that touches a file or the network lives here, so omniclip.py stays pure torch.nn.
Our CLIP keeps OpenAI's parameter names, so the key mapping is the identity: the only entries we
change are the three integers OpenAI's archives carry (DROPPED_KEYS). The architecture is read
from the tensors' shapes, so any ViT CLIP checkpoint with OpenAI's names loads, fine-tuned ones too.
"""
import gzip
import hashlib
import html
import os
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from functools import lru_cache

import ftfy
import regex
import torch
from tqdm import tqdm

import omniclip

# OpenAI's ViT releases; the second-to-last path part of each URL is the file's SHA256.
# (OpenAI's ResNet CLIPs are not listed: OmniCLIP adapts ViT blocks only.)
MODELS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
                "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/"
                "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/"
                "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/"
                      "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/"
                      "ViT-L-14-336px.pt",
}


# The SHA256 of each released file, the table a checkpoint's recorded name is checked against.
MODEL_SHA256 = {name: url.split("/")[-2] for name, url in MODELS.items()}


class WeightsError(Exception):
    """A CLIP weights name or file that cannot be used: one line naming it and what is wrong."""


def model_name_for_sha256(sha256):
    """The OpenAI model whose released file has this SHA256, else None (a file of one's own)."""
    return next((name for name, digest in MODEL_SHA256.items() if digest == sha256), None)


# Integers stored beside the weights in OpenAI's archives; the shapes already say the same.
DROPPED_KEYS = ("input_resolution", "context_length", "vocab_size")

# ----------------------------------------------------------------------------------------------
# Download, once, verified.

def default_cache_dir():
    return os.environ.get("OMNICLIP_CACHE") or os.path.expanduser("~/.cache/omniclip")


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url, out):
    """Copy `url` into the open file `out`; returns the SHA256 of the bytes. The progress bar
    shows only on a terminal (a redirected log gets no carriage returns)."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=os.path.basename(url), disable=not sys.stderr.isatty()) as bar:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()


def download(name_or_url, cache_dir=None):
    """Path of the verified file in the cache, downloading it only if it is not there yet."""
    url = MODELS.get(name_or_url, name_or_url)
    expected = url.rstrip("/").split("/")[-2] if url.count("/") >= 2 else ""
    if not regex.fullmatch(r"[0-9a-f]{64}", expected):
        raise WeightsError(f"{name_or_url!r} is neither a name in {list(MODELS)} nor a URL "
                           f"whose second-to-last path part is the file's SHA256")
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, os.path.basename(url))
    if os.path.isfile(target):
        actual = sha256_of(target)
        if actual == expected:
            return target
        # A file with a wrong hash cannot be half a download of ours (we rename only verified
        # files into place): it is another release with the same name, or it was damaged.
        # The hash of the new download guards us either way, so we fetch it again.
        print(f"{target} has SHA256 {actual}, expected {expected}: downloading it again")
    # Write to a temporary file in the same folder and rename only once verified: an interrupted
    # run leaves no file that looks finished, and ranks downloading at once cannot clash.
    fd, part = tempfile.mkstemp(dir=cache_dir, prefix=os.path.basename(url) + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                actual = _fetch(url, out)
            except (urllib.error.URLError, OSError) as error:   # offline, proxy, HTTP error
                raise WeightsError(
                    f"cannot download {url} ({type(error).__name__}: {error}); offline? put the "
                    f"file (SHA256 {expected}) at {target}, or pass --clip-weights FILE") from None
        if actual != expected:
            raise WeightsError(f"SHA256 mismatch for {url}: expected {expected}, got {actual}; "
                               f"the download was deleted, nothing was cached")
        os.replace(part, target)
    finally:
        if os.path.exists(part):
            os.remove(part)
    return target


def resolve_weights(name_or_path, cache_dir=None):
    """An existing file is used as it is (offline machines); a MODELS name or URL is downloaded."""
    name_or_path = os.fspath(name_or_path)
    if os.path.isfile(name_or_path):
        return name_or_path
    if name_or_path in MODELS or "://" in name_or_path:
        return download(name_or_path, cache_dir)
    what = "a directory" if os.path.isdir(name_or_path) else "not a file"
    raise WeightsError(f"{name_or_path!r} is {what}, nor one of {list(MODELS)}")

# ----------------------------------------------------------------------------------------------
# Load either file format OpenAI-style weights come in.

def _is_torchscript(path):
    # torch.save and torch.jit.save both write zip archives; only TorchScript's holds constants.pkl
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def load_state_dict(name_or_path, cache_dir=None):
    """OpenAI-named fp32 tensors from a TorchScript archive (as OpenAI ships them) or a plain
    state_dict file (torch.save). Plain files are read with weights_only=True: no code runs."""
    path = resolve_weights(name_or_path, cache_dir)
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():  # torch deprecates TorchScript; OpenAI ships it
                warnings.filterwarnings("ignore", message="`torch.jit.load` is deprecated")
                state = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a foreign file; all mean the same here
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
        raise WeightsError(f"{path} is neither a TorchScript archive nor a state_dict saved with "
                           f"torch.save ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state_dict (a dict of name -> tensor)")
    # OpenAI ships fp16; the frozen model is kept in fp32 and autocast picks the compute precision.
    return {name: tensor.float() if tensor.is_floating_point() else tensor
            for name, tensor in state.items() if name not in DROPPED_KEYS}

# ----------------------------------------------------------------------------------------------
# The architecture, from the shapes alone (what OpenAI's build_model does).

def _count_blocks(state_dict, prefix):
    return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})


def clip_architecture(state_dict):
    """The CLIP fields of OmniCLIPConfig. Head counts are not stored in the weights: every
    OpenAI CLIP uses heads of width 64, and so does omniclip.CLIP."""
    sd = state_dict
    if "visual.proj" not in sd and any(k.startswith(("visual.layer1.", "visual.attnpool."))
                                       for k in sd):
        raise WeightsError("these are ResNet CLIP weights; OmniCLIP adapts ViT blocks, so only the "
                         f"ViT models load: {list(MODELS)}")
    needed = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj",
              "token_embedding.weight", "positional_embedding", "ln_final.weight",
              "text_projection"]
    absent = [k for k in needed if k not in sd]
    if absent:
        raise WeightsError(f"not CLIP ViT weights with OpenAI's names: missing {absent}")
    width, _, patch, _ = sd["visual.conv1.weight"].shape             # (D, 3, P, P)
    tokens = sd["visual.positional_embedding"].shape[0]              # 1 + K
    grid = round((tokens - 1) ** 0.5)
    if grid * grid + 1 != tokens:
        raise WeightsError(f"visual.positional_embedding has {tokens} rows, not 1 + a square grid")
    text_width = sd["ln_final.weight"].shape[0]
    return dict(
        embed_dim=sd["text_projection"].shape[1],
        image_resolution=grid * patch,
        vision_layers=_count_blocks(sd, "visual.transformer.resblocks."),
        vision_width=width,
        vision_patch_size=patch,
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        text_width=text_width,
        text_heads=text_width // 64,
        text_layers=_count_blocks(sd, "transformer.resblocks."),
    )

# ----------------------------------------------------------------------------------------------
# Build our modules, loading every CLIP tensor strictly.

def _load_strictly(module, state_dict):
    """load_state_dict(strict=True), with every missing, unexpected or misshapen name listed."""
    own = module.state_dict()
    missing = sorted(own.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - own.keys())
    misshapen = [f"{k}: weights {tuple(state_dict[k].shape)}, model {tuple(v.shape)}"
                 for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or misshapen:
        raise WeightsError(f"the weights do not match omniclip.CLIP: missing ({len(missing)}): "
                           f"{missing}; unexpected ({len(unexpected)}): {unexpected}; "
                           f"misshapen ({len(misshapen)}): {misshapen}")
    module.load_state_dict(state_dict, strict=True)


def build_clip(state_dict):
    """omniclip.CLIP with the architecture read from, and every tensor loaded from, the weights."""
    model = omniclip.CLIP(omniclip.OmniCLIPConfig(**clip_architecture(state_dict)))
    _load_strictly(model, state_dict)
    return model


def build_omniclip(state_dict, **options):
    """OmniCLIP on these CLIP weights; `options` are the OmniCLIP fields of OmniCLIPConfig.
    Prints the name of every new tensor, which starts from its initialisation (omniclip.py)."""
    architecture = clip_architecture(state_dict)
    clash = sorted(architecture.keys() & options.keys())
    if clash:
        raise ValueError(f"{clash} are set by the weights' shapes, not by options")
    model = omniclip.OmniCLIP(omniclip.OmniCLIPConfig(**architecture, **options))
    _load_strictly(model.clip, state_dict)
    new = model.trainable_state_dict()
    print(f"loaded all {len(state_dict)} CLIP tensors (frozen); "
          f"{len(new)} new OmniCLIP tensors start from their initialisation:")
    for name, tensor in new.items():
        print(f"  {name} {tuple(tensor.shape)}")
    return model

# ----------------------------------------------------------------------------------------------
# OpenAI's byte-level BPE tokenizer. Its merge list ships beside this file: it is OpenAI's data
# (github.com/openai/CLIP, MIT licence), copied unchanged from their package.

VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
START, END = "<|startoftext|>", "<|endoftext|>"
# Words: the special tokens, common English contractions, runs of letters, single digits, runs of
# other non-space characters. Text is lower-cased first; IGNORECASE only matters for the specials.
WORD = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                     r"|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+", regex.IGNORECASE)


class BPETokenizer:
    def __init__(self, vocab_path=VOCAB_PATH, vocab_size=49408):
        # BPE merges strings, so each byte gets a visible character: bytes that already are
        # visible Latin-1 characters stand for themselves, the others (space, control bytes...)
        # borrow characters from 256 up. This order of the 256 bytes gives their token ids.
        visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                   *range(ord("®"), ord("ÿ") + 1)]
        hidden = [b for b in range(256) if b not in visible]
        self.byte_char = {b: chr(b) for b in visible}
        self.byte_char.update({b: chr(256 + n) for n, b in enumerate(hidden)})
        # ids: 256 bytes, the same 256 ending a word ("</w>"), one per merge, then START and END.
        # Line 0 of the file is a version header; the merges that fit the vocabulary follow.
        n_merges = vocab_size - 2 * 256 - 2
        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")[1:1 + n_merges]]
        symbols = list(self.byte_char.values())
        symbols += [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
        self.ids = {s: i for i, s in enumerate(symbols)}
        self.symbols = symbols
        self.rank = {pair: i for i, pair in enumerate(merges)}  # lower rank merges first
        self.start_id, self.end_id = self.ids[START], self.ids[END]
        # words seen before are not merged again; the specials (written in a text) stay whole
        self.cache = {START: (START,), END: (END,)}

    def bpe(self, word):
        """Split one word (byte characters) into vocabulary symbols: start from single characters,
        the last marked as the word's end, and apply the best-ranked merge until none applies."""
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda p: self.rank.get(p, float("inf")))
            if best not in self.rank:
                break
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = tuple(parts)
        return self.cache[word]

    def encode(self, text):
        # Clean text as OpenAI did for training: repair mojibake, unescape HTML twice (web text
        # is often escaped twice over), collapse whitespace, lower-case.
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for word in WORD.findall(text):
            word = "".join(self.byte_char[b] for b in word.encode("utf-8"))
            ids += [self.ids[symbol] for symbol in self.bpe(word)]
        return ids

    def decode(self, ids):
        """Token ids (no padding) -> the cleaned, lower-cased text, one space between words."""
        char_byte = {c: b for b, c in self.byte_char.items()}
        text = "".join(self.symbols[i] for i in ids if i not in (self.start_id, self.end_id))
        return " ".join(bytes(char_byte[c] for c in word).decode("utf-8", errors="replace")
                        for word in text.split("</w>")).strip()


@lru_cache(maxsize=1)
def _tokenizer():
    return BPETokenizer()


def tokenize(texts, context_length=77, truncate=False):
    """(N, context_length) token ids: START, the text's tokens, END, zeros. Text that does not fit
    is an error, or with truncate=True is cut so that END still closes it (CLIP reads the END
    position). Same ids as OpenAI's clip.tokenize."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    tok = _tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [tok.start_id] + tok.encode(text) + [tok.end_id]
        if len(ids) > context_length:
            if not truncate:
                raise RuntimeError(f"text of {len(ids)} tokens is too long for context length "
                                   f"{context_length} (pass truncate=True to cut it): {text!r}")
            ids = ids[:context_length - 1] + [tok.end_id]
        result[row, :len(ids)] = torch.tensor(ids)
    return result
