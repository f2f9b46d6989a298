"""tokenizer.py against Hugging Face's tokenizers, on tokenizers trained here and the real SmolLM2 one.

HF (transformers/tokenizers) is the reference for every kind: same ids from encode, same text from
decode, same ids from chat templates. Llama 2's reference is HF's tokenizer built the way the
official Llama 2 tokenizer.json is (see `hf_sentencepiece`).
"""

import base64
import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenizer import DIGITS_GPT2_PATTERN, LLAMA3_PATTERN, llama3_special_tokens, load_tokenizer  # noqa: E402

CORPUS = [
    "",
    "Hello world",
    " Hello world",
    "  leading and trailing spaces   ",
    "trailing space ",
    "def mean(xs):\n    if not xs:\n        return 0.0\n\treturn sum(xs) / len(xs)\n",
    "class A:\n\n\n    pass\n",
    "tabs\tand\t\ttabs \t mixed  \n  ",
    "\n\n\n",
    "   ",
    "line one\nline two\r\nline three\n",
    "naïve café résumé Ångström",
    "中文字符和日本語のテキスト 한국어",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧",
    "combining e\u0301 a\u0308 n\u0303",
    "Arabic digits ٣٤٥ and superscript x² and ½ fraction",
    "pi is 3.14159, date 2024-11-27, big 1,000,000",
    "x  1",
    "x 1",
    "x\t\t7\n\n8",
    "a1b22c333",
    "12345678901234567890",
    "  42  ",
    "I'm can't we'll they've you'd HE'S",
    "nbsp\u00a0here and ideographic\u3000space",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<s>[INST] hello [/INST] answer </s>",
    "a </s>  b<s>c <unk> d",
    "text<|endoftext|>more",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<|reserved_special_token_7|>x<|python_tag|>",
]

# Text full of numbers next to spaces, letters, punctuation and other numbers.
NUMBERS = [
    "0", "7 ", " 7", "x  1", "x   12", "1  x", "1 2 3", "12 345\t6789\n\n0", "v1.2.3-rc4", "0x1F 0b1010",
    "1e-9 +3.5E+10", "$1,234.56 (−7%)", "٣ ٤٥", "x²+y³", "Ⅻ ⑤ ½", "3\u00a04", "9\u30008", "12ab34cd",
]

TRAIN_TEXT = "\n".join(CORPUS + NUMBERS) + """
The quick brown fox jumps over the lazy dog. A tokenizer turns text into numbers and back again;
the model only ever sees the numbers. Spaces matter, and so do newlines, tabs and digits.
In 2024 there were 366 days, and on 2024-11-27 it rained 3.5 mm in the morning and 12 mm later.
She said: "It's not what I'd expect, but we'll see." They've been there; you're welcome.
Café au lait, crème brûlée, jalapeño, smörgåsbord, façade, coöperate, Zürich, São Paulo.
東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다. Ελληνικά και русский текст.

def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    out = [0, 1]
    while len(out) < n:
        out.append(out[-1] + out[-2])
    return out[:n]


for i, value in enumerate(fibonacci(10)):
\tprint(f"{i:>3}: {value}")    # trailing spaces   
if __name__ == "__main__":
    main()
"""

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SMOLLM2_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CHATS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is 2+2?\n"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": " Bonjour ! "}, {"role": "user", "content": "How are you?"}],
    [{"role": "user", "content": "Write code:\n```\nx = 1\n```"}, {"role": "assistant", "content": "ok"}],
]


def fuzz_texts(n=300, seed=0):
    """Random strings over the characters where pre-tokenizers disagree most easily."""
    alphabet = [" ", " ", "  ", "\n", "\t", "\r\n", "1", "23", "٣", "²", "a", "Bc", "é", "'s", "'", "!", "?!",
                "中", "😀", "\u00a0", "\u3000", "-", ".", "_", "<|im_end|>"]
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))) for _ in range(n)]


def assert_parity(ours, hf, texts):
    """Same ids with and without BOS; decode equal on whole texts and on single ids (partial UTF-8)."""
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.encode(text, bos=False) == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False), text
        for i in ids:
            assert ours.decode([i]) == hf.decode([i], skip_special_tokens=False), (text, i)


def assert_chat_parity(ours, hf, template, chats=CHATS):
    for messages in chats:
        for gen in (True, False):
            want = hf.apply_chat_template(messages, chat_template=template, tokenize=True, add_generation_prompt=gen)
            want = want["input_ids"] if hasattr(want, "keys") else want
            assert ours.encode_chat(messages, add_generation_prompt=gen) == list(want), messages


def write_json(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False), "utf-8")


# ---------------------------------------------------------------- SentencePiece (Llama 2 style)

@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    import sentencepiece

    d = tmp_path_factory.mktemp("sp")
    (d / "train.txt").write_text(TRAIN_TEXT * 3, "utf-8")
    # Llama 2's trainer settings, scaled down: BPE, byte fallback, digits split, spaces kept.
    sentencepiece.SentencePieceTrainer.train(
        input=str(d / "train.txt"), model_prefix=str(d / "tokenizer"), model_type="bpe", vocab_size=500,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", character_coverage=0.9995,
        num_threads=1, minloglevel=2)
    (d / "train.txt").unlink()
    (d / "tokenizer.vocab").unlink()
    return d


@pytest.fixture(scope="module")
def hf_sentencepiece(sp_dir):
    """HF's Llama tokenizer for sp_dir/tokenizer.model, as in the official Llama 2 tokenizer.json.

    Built from the vocab and merges directly: transformers' own .model reader needs protobuf, which
    we don't install. The normalizer Prepend("▁") + Replace(" ", "▁") is what Llama 2's tokenizer.json
    (converted with legacy=True) has: every chunk between special tokens gets sentencepiece's dummy
    prefix, as in Meta's code. transformers 5's LlamaTokenizer(legacy=True) instead uses a Metaspace
    pre-tokenizer that adds no "▁" to a chunk already starting with a space (" Hi" -> "▁Hi", where
    sentencepiece gives "▁▁Hi"), and legacy=False also drops the "▁" after special tokens.
    """
    import sentencepiece
    from tokenizers import normalizers
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    hf = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), legacy=True, add_bos_token=True)
    hf.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.backend_tokenizer.pre_tokenizer = None
    return hf


def test_sentencepiece_parity(sp_dir, hf_sentencepiece):
    tok = load_tokenizer(sp_dir)
    assert type(tok).__name__ == "SentencePieceTokenizer"
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_format, tok.stop_ids) == (1, 2, True, "llama2", {2})
    assert tok.vocab_size == 500
    assert_parity(tok, hf_sentencepiece, CORPUS + NUMBERS + fuzz_texts())


def test_sentencepiece_matches_meta_llama2(sp_dir):
    # Meta's Llama 2 code: sp.encode of the whole text, BOS prepended, special strings not parsed.
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tok = load_tokenizer(sp_dir)
    for text in CORPUS + NUMBERS:
        if "<" not in text:
            assert tok.encode(text) == [sp.bos_id()] + sp.encode(text), text
    assert tok.encode("x </s> y", bos=False) == sp.encode("x ") + [2] + sp.encode(" y")


def test_llama2_chat(sp_dir, hf_sentencepiece):
    tok = load_tokenizer(sp_dir)
    assert_chat_parity(tok, hf_sentencepiece, LLAMA2_TEMPLATE)
    with pytest.raises(ValueError, match="alternate"):
        tok.encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


# ---------------------------------------------------------------- tiktoken (Llama 3 original format)

@pytest.fixture(scope="module")
def llama3_dirs(tmp_path_factory):
    """(original-format dir with tokenizer.model, HF-format dir with tokenizer.json) of one tiny BPE."""
    from tiktoken._educational import bpe_train
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    orig, hf_dir = tmp_path_factory.mktemp("llama3_orig"), tmp_path_factory.mktemp("llama3_hf")
    ranks = bpe_train(TRAIN_TEXT, 256 + 200, LLAMA3_PATTERN, visualise=None)
    lines = (f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda x: x[1]))
    (orig / "tokenizer.model").write_text("\n".join(lines) + "\n")

    # How transformers converts Llama 3 (convert_llama_weights_to_hf.py): TikTokenConverter, then a
    # post-processor that adds <|begin_of_text|>.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken would otherwise cache the file by path
        backend = TikTokenConverter(vocab_file=str(orig / "tokenizer.model"),
                                    extra_special_tokens=llama3_special_tokens()).converted()
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, backend.token_to_id(bos))])])
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token="<|eot_id|>").save_pretrained(hf_dir)
    return orig, hf_dir


@pytest.fixture(scope="module")
def hf_llama3(llama3_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama3_dirs[1])


def test_tiktoken_parity(llama3_dirs, hf_llama3):
    tok = load_tokenizer(llama3_dirs[0])
    assert type(tok).__name__ == "TiktokenTokenizer"
    n = 456  # 256 bytes + 200 merges, then the 256 special tokens
    assert tok.vocab_size == n + 256
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_format) == (n, n + 1, True, "llama3")
    assert tok.stop_ids == {n + 1, n + 9}  # <|end_of_text|>, <|eot_id|>
    assert_parity(tok, hf_llama3, CORPUS + NUMBERS + fuzz_texts())


def test_llama3_special_token_layout():
    names = llama3_special_tokens()
    assert len(names) == 256 and len(set(names)) == 256
    assert names[:11] == [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    assert names[11] == "<|reserved_special_token_3|>" and names[255] == "<|reserved_special_token_247|>"


def test_llama3_hf_tokenizer_json_parity(llama3_dirs, hf_llama3):
    # The Llama 3 HF shape: Split(regex) + ByteLevel(use_regex=False), ignore_merges, BOS template.
    tj = json.loads((llama3_dirs[1] / "tokenizer.json").read_text())
    assert [p["type"] for p in tj["pre_tokenizer"]["pretokenizers"]] == ["Split", "ByteLevel"]
    assert tj["model"]["ignore_merges"]
    tok = load_tokenizer(llama3_dirs[1])
    orig = load_tokenizer(llama3_dirs[0])
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_format) == (orig.bos_id, orig.eos_id + 8, True, "llama3")
    assert tok.stop_ids == {orig.eos_id + 8}  # eos_token is <|eot_id|> here
    assert tok.vocab_size == orig.vocab_size
    assert_parity(tok, hf_llama3, CORPUS + NUMBERS + fuzz_texts())


def test_llama3_chat(llama3_dirs, hf_llama3):
    for d in llama3_dirs:
        assert_chat_parity(load_tokenizer(d), hf_llama3, LLAMA3_TEMPLATE)


# ---------------------------------------------------------------- byte-level BPE, SmolLM2 shape

def train_byte_level(texts, vocab_size, alphabet=None):
    """A SmolLM2-shaped tokenizer: byte-level BPE, used with one-token-per-digit pre-tokenization.
    It is trained without the digit split, so its vocabulary holds multi-digit tokens ("20", "2024"):
    only the pre-tokenizer keeps them out of the encoding, and a test of that can fail."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if alphabet is None else alphabet)
    backend.train_from_iterator(texts, trainer)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return backend


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("smol_like")
    train_byte_level([TRAIN_TEXT] * 3, 700).save(str(d / "tokenizer.json"))
    write_json(d / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "chat_template": SMOLLM2_TEMPLATE})
    return d


def test_byte_level_parity(smol_dir):
    from transformers import AutoTokenizer

    tok, hf = load_tokenizer(smol_dir), AutoTokenizer.from_pretrained(smol_dir)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_format, tok.stop_ids) == (1, 2, False, "chatml", {2})
    assert tok.vocab_size == 700 and tok.default_system == SMOLLM2_SYSTEM
    assert_parity(tok, hf, CORPUS + NUMBERS + fuzz_texts() + fuzz_texts(seed=1))


def test_byte_level_digits_are_single_tokens(smol_dir):
    vocab = json.loads((smol_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert {"12", "Ġ2024", "000", "1234567890"} <= set(vocab)  # tokens that a missing digit split would produce
    tok = load_tokenizer(smol_dir)
    pieces = [tok.decode([i]) for i in tok.encode("x  1 a1b22c333 2024-11-27 1,000,000 ٣٤٥ x²")]
    assert pieces[:3] == ["x", "  ", "1"]
    assert [p for p in pieces if any(c.isnumeric() for c in p) and len(p) > 1] == []


def test_digits_pattern_matches_hf_pre_tokenizer():
    # The one-regex form of Sequence[Digits(individual_digits), ByteLevel] must cut text into the same
    # pieces as HF; `regex` (test-only) stands in for tiktoken's regex engine here.
    import regex
    from tokenizers import pre_tokenizers

    from tokenizer import _byte_decoder

    to_bytes = _byte_decoder()
    hf = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                  pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in CORPUS + NUMBERS + fuzz_texts() + fuzz_texts(seed=2):
        want = [bytes(to_bytes[c] for c in piece).decode() for piece, _ in hf.pre_tokenize_str(text)]
        assert regex.findall(DIGITS_GPT2_PATTERN, text) == want, text


def test_split_regex_gaps_are_pieces(smol_dir, tmp_path):
    # HF's Split(behavior=Isolated) keeps the text between matches; tiktoken would drop it.
    from transformers import AutoTokenizer

    tj = json.loads((smol_dir / "tokenizer.json").read_text("utf-8"))
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{L}+| ?\\d"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    write_json(tmp_path / "tokenizer.json", tj)
    write_json(tmp_path / "tokenizer_config.json", {"eos_token": "<|im_end|>"})
    assert_parity(load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path), CORPUS + NUMBERS + fuzz_texts())


def test_byte_level_missing_bytes(tmp_path):
    # Like SmolLM2's, this vocab lacks a few control bytes: HF drops them, so must we.
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    from tokenizer import _byte_decoder

    missing = {c for c, b in _byte_decoder().items() if b in (0x04, 0x06, 0x13)}
    alphabet = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in missing]
    train_byte_level([TRAIN_TEXT], 400, alphabet).save(str(tmp_path / "tokenizer.json"))
    write_json(tmp_path / "tokenizer_config.json", {"eos_token": "<|endoftext|>"})
    tok, hf = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert tok.vocab_size == 400
    # Known difference, not tested: HF drops the byte before merging, so in one pre-token like
    # "!\x04!" HF may merge the two "!" across it, where we keep them apart.
    for text in ["a\x04b", " \x04x", "\x04", "x \x06\x13 y\x04\n", "1\x042", "é\x04"] + CORPUS:
        assert tok.encode(text) == hf.encode(text), text
        assert all(i < 400 for i in tok.encode(text))


def test_chatml_chat(smol_dir, tmp_path):
    from transformers import AutoTokenizer

    tok, hf = load_tokenizer(smol_dir), AutoTokenizer.from_pretrained(smol_dir)
    with_system = [c for c in CHATS if c[0]["role"] == "system"]
    assert_chat_parity(tok, hf, CHATML_TEMPLATE, with_system)
    assert_chat_parity(tok, hf, SMOLLM2_TEMPLATE)  # first message not system: SmolLM2's default system
    # A template without a literal default system prompt: none is inserted.
    (tmp_path / "tokenizer.json").write_text((smol_dir / "tokenizer.json").read_text("utf-8"), "utf-8")
    write_json(tmp_path / "tokenizer_config.json", {"eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE})
    plain = load_tokenizer(tmp_path)
    assert plain.default_system is None
    assert_chat_parity(plain, hf, CHATML_TEMPLATE)


# ---------------------------------------------------------------- metadata: BOS, EOS, stop ids

def test_config_overrides_and_stop_ids(smol_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text((smol_dir / "tokenizer.json").read_text("utf-8"), "utf-8")
    # No tokenizer_config.json: EOS falls back to config.json.
    write_json(tmp_path / "config.json", {"eos_token_id": 0})
    tok = load_tokenizer(tmp_path)
    assert (tok.eos_id, tok.bos_id, tok.add_bos, tok.stop_ids) == (0, None, False, {0, 2})
    with pytest.raises(ValueError, match="no BOS"):
        tok.encode("hi", bos=True)
    write_json(tmp_path / "tokenizer_config.json", {
        "add_bos_token": True, "bos_token": {"content": "<|endoftext|>"}, "eos_token": "<|im_end|>"})
    write_json(tmp_path / "generation_config.json", {"eos_token_id": [2, 1]})
    tok = load_tokenizer(tmp_path)
    assert (tok.eos_id, tok.bos_id, tok.add_bos, tok.stop_ids) == (2, 0, True, {1, 2})
    assert tok.encode("hi")[0] == 0 and tok.encode("hi", bos=False)[0] != 0


# ---------------------------------------------------------------- errors

def test_no_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model.*tokenizer.json"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="tokenizer.model: neither a tiktoken BPE file nor a valid SentencePiece"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nnot base64! 1\n")
    with pytest.raises(ValueError, match="tokenizer.model: bad line in tiktoken"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 2\n")
    with pytest.raises(ValueError, match="tokenizer.model: tiktoken BPE ranks are not 0..1"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer.json"):
        load_tokenizer(tmp_path)


def test_unsupported_tokenizer_json(smol_dir, tmp_path):
    base = json.loads((smol_dir / "tokenizer.json").read_text("utf-8"))
    cases = [
        ("pre_tokenizer", {"type": "Whitespace"}, "pre_tokenizer Whitespace is not supported"),
        ("pre_tokenizer", {"type": "Sequence", "pretokenizers": [{"type": "Punctuation"}, {"type": "ByteLevel"}]},
         r"pre_tokenizer Sequence\[Punctuation, ByteLevel\] is not supported"),
        ("normalizer", {"type": "NFC"}, "normalizer NFC is not supported"),
        ("decoder", {"type": "Metaspace"}, "decoder Metaspace is not supported"),
    ]
    for key, value, message in cases:
        write_json(tmp_path / "tokenizer.json", {**base, key: value})
        with pytest.raises(NotImplementedError, match=message):
            load_tokenizer(tmp_path)
    # Merges out of id order: tiktoken's ranking can't reproduce them.
    merges = base["model"]["merges"]
    write_json(tmp_path / "tokenizer.json", {**base, "model": {**base["model"], "merges": merges[1:] + merges[:1]}})
    with pytest.raises(ValueError, match="merge #.*tiktoken"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- the real SmolLM2 tokenizer

def test_real_smollm2(smollm2_dir):
    # Reference: HF's tokenizer as tokenizer.json describes it. (transformers 5's AutoTokenizer picks
    # GPT2Tokenizer for this tokenizer_config.json, and that class swaps the file's pre-tokenizer for
    # plain ByteLevel, dropping SmolLM2's Digits step; it then differs from the file on numbers only.)
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok, hf = load_tokenizer(smollm2_dir), PreTrainedTokenizerFast.from_pretrained(smollm2_dir)
    assert (tok.vocab_size, tok.eos_id, tok.add_bos, tok.chat_format) == (49152, 2, False, "chatml")
    assert 2 in tok.stop_ids
    texts = CORPUS + NUMBERS + fuzz_texts() + [TRAIN_TEXT]
    assert_parity(tok, hf, texts)
    auto = AutoTokenizer.from_pretrained(smollm2_dir)
    for text in texts:
        if not any(c.isnumeric() for c in text):
            assert tok.encode(text) == auto.encode(text), text
    # SmolLM2 splits every number char into its own token (Digits pre-tokenizer).
    digits = "0123456789 3.14159 2024-11-27 ٣٤٥ x²"
    pieces = [tok.decode([i]) for i in tok.encode(digits)]
    assert pieces[:11] == list("0123456789") + [" "]
    assert [p for p in pieces if len(p) > 1 and any(c.isnumeric() for c in p)] == []
    assert_chat_parity(tok, hf, SMOLLM2_TEMPLATE, [c for c in CHATS if c[0]["role"] == "system"])
    if hf.chat_template:  # the checkpoint's own template: its default system prompt is ours too
        assert tok.default_system == SMOLLM2_SYSTEM
        assert_chat_parity(tok, hf, SMOLLM2_TEMPLATE)
        assert_chat_parity(tok, hf, None)
