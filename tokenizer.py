"""Text <-> token ids for the three tokenizer files our checkpoints come with.

- SentencePiece `tokenizer.model` (Llama 2, CodeLlama), via the sentencepiece library.
- tiktoken `tokenizer.model` (Meta's original Llama 3 release: "<base64 bytes> <rank>" lines).
- Hugging Face byte-level BPE `tokenizer.json` (SmolLM2, Llama 3 HF repos), translated into a
  tiktoken.Encoding so that the fast Rust BPE does the work.

Every kind matches Hugging Face's tokenizer for the same files: special-token strings in the text
become their ids, and decode renders special tokens as their text.
"""

import base64
import json
import re
from pathlib import Path

import tiktoken

# Llama 3's split pattern (published with its tokenizer); also what HF puts in Llama 3 tokenizer.json.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-2's pattern, which a tokenizer.json ByteLevel(use_regex=True) pre-tokenizer applies.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Digits(individual_digits=True) followed by GPT-2's pattern, as one regex. Digits first cuts the
# text at every \p{N} char and GPT-2's pattern then runs inside each piece, so: a number char is
# always alone (no " ?" before it: that space belongs to the previous piece), and a digit counts as
# the end of the piece for the whitespace lookahead ("x  1" -> "x", "  ", "1", not "x", " ", " ", "1").
DIGITS_GPT2_PATTERN = (
    r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
)


def llama3_special_tokens(n: int = 256) -> list[str]:
    """Names of Llama 3's special tokens in id order (Llama 3.1 names), starting at id len(ranks)."""
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
             6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
             10: "<|python_tag|>"}
    reserved = iter(range(n))
    return [named.get(i) or f"<|reserved_special_token_{next(reserved)}|>" for i in range(n)]


class Tokenizer:
    """What the engine needs from a tokenizer; the subclasses differ only in _encode/decode."""

    vocab_size: int
    bos_id: int | None
    eos_id: int
    stop_ids: set[int]
    add_bos: bool
    chat_format: str | None  # "llama2" | "llama3" | "chatml" | None
    special_tokens: dict[str, int]  # every special/added token string and its id
    default_system: str | None = None  # ChatML system prompt used when a chat has none

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = self._encode(text)
        if self.add_bos if bos is None else bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        return ids

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # Like HF's apply_chat_template: render the template to text, then tokenize it without
        # adding BOS (the templates write it) and with special-token strings parsed.
        return self.encode(render_chat(self, messages, add_generation_prompt), bos=False)

    def token_text(self, token_id: int | None) -> str:
        """The string of a special token, as chat templates write it."""
        for s, i in self.special_tokens.items():
            if i == token_id:
                return s
        raise ValueError(f"token id {token_id} is not a special token")


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path):
        import sentencepiece

        try:
            self.sp = sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError
            raise ValueError(f"{path}: neither a tiktoken BPE file nor a valid SentencePiece model ({e})") from None
        self.vocab_size = sp.get_piece_size()
        # Control and unknown pieces (<s>, </s>, <unk>) are the ones HF treats as special tokens.
        self.special_tokens = {sp.id_to_piece(i): i for i in range(self.vocab_size)
                               if sp.is_control(i) or sp.is_unknown(i)}
        self._split = _special_splitter(self.special_tokens)
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id()
        self.add_bos = self.bos_id is not None
        # Llama 2 and CodeLlama chat share these BOS/EOS pieces; other SentencePiece models get no chat format.
        pieces = (sp.id_to_piece(self.bos_id) if self.bos_id is not None else None, sp.id_to_piece(self.eos_id))
        self.chat_format = "llama2" if pieces == ("<s>", "</s>") else None

    def _encode(self, text):
        # Each chunk between special tokens gets its own dummy-prefix "▁", as in Meta's Llama 2 code
        # (which encodes every turn separately) and HF's Llama 2 tokenizer.json.
        ids = []
        for i, chunk in enumerate(self._split(text)):
            if i % 2:
                ids.append(self.special_tokens[chunk])
            elif chunk:
                ids += self.sp.encode(chunk)
        return ids

    def decode(self, ids):
        # Not sp.decode: HF renders control tokens as text and strips only the one leading space
        # of the whole string, while sentencepiece drops them and strips after each of them.
        sp, parts, pending = self.sp, [], bytearray()
        for i in ids:
            if sp.is_byte(i):  # byte-fallback piece "<0xAB>"
                pending.append(int(sp.id_to_piece(i)[3:5], 16))
                continue
            if pending:
                parts.append(_utf8_or_replacement(pending))
                pending = bytearray()
            piece = sp.id_to_piece(i)
            parts.append(piece if sp.is_control(i) or sp.is_unknown(i) else piece.replace("▁", " "))
        if pending:
            parts.append(_utf8_or_replacement(pending))
        text = "".join(parts)
        return text[1:] if text.startswith(" ") else text


def _utf8_or_replacement(b: bytes) -> str:
    # HF's ByteFallback decoder: a run of byte tokens that isn't valid UTF-8 gives one U+FFFD per byte.
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(b)


def _special_splitter(specials):
    """Returns f(text) -> [text, special, text, special, ..., text]; longest special wins."""
    if not specials:
        return lambda text: [text]
    alternatives = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
    return re.compile(f"({alternatives})").split


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE on tiktoken: Meta's Llama 3 file or a translated HF tokenizer.json."""

    def __init__(self, enc: tiktoken.Encoding, bos: str | None, eos: str | None, add_bos: bool,
                 dropped: frozenset[int] = frozenset()):
        self.enc = enc
        self.dropped = dropped  # placeholder ids of bytes the vocab lacks, see load_hf_tokenizer_json
        self.special_tokens = dict(enc._special_tokens)
        self.vocab_size = enc.n_vocab - len(dropped)
        self.bos_id = self.special_tokens.get(bos)
        self.eos_id = self.special_tokens.get(eos)
        self.add_bos = add_bos
        if "<|start_header_id|>" in self.special_tokens:
            self.chat_format = "llama3"
        elif "<|im_start|>" in self.special_tokens:
            self.chat_format = "chatml"
        else:
            self.chat_format = None

    def _encode(self, text):
        ids = self.enc.encode(text, allowed_special="all")
        return [i for i in ids if i not in self.dropped] if self.dropped else ids

    def decode(self, ids):
        return self.enc.decode(ids)  # invalid UTF-8 -> U+FFFD, like HF's ByteLevel decoder


def load_tiktoken_model(path: Path) -> TiktokenTokenizer:
    ranks = {}
    try:
        for line in path.read_text("ascii").splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError as e:  # includes UnicodeDecodeError and binascii.Error
        raise ValueError(f"{path}: bad line in tiktoken BPE file ({e})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):  # the special tokens follow the last rank
        raise ValueError(f"{path}: tiktoken BPE ranks are not 0..{len(ranks) - 1} without gaps or repeats")
    specials = {s: len(ranks) + i for i, s in enumerate(llama3_special_tokens())}
    enc = tiktoken.Encoding(path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    return TiktokenTokenizer(enc, "<|begin_of_text|>", "<|end_of_text|>", add_bos=True)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's vocab alphabet: each byte is written as one printable char so vocab files are text.
    Printable Latin-1 bytes stand for themselves; the others get chr(256), chr(257), ... in order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _pattern_from_pre_tokenizer(pre: dict | None, path: Path) -> str:
    if pre is None:
        raise NotImplementedError(f"{path}: a tokenizer.json without pre_tokenizer is not supported")
    steps = pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]
    kinds = [s["type"] for s in steps]
    for s in steps:
        if s["type"] == "ByteLevel" and s.get("add_prefix_space"):
            raise NotImplementedError(f"{path}: ByteLevel(add_prefix_space=True) pre_tokenizer is not supported")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return DIGITS_GPT2_PATTERN
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split = steps[0]
        if "Regex" not in split["pattern"] or split["behavior"] != "Isolated" or split.get("invert"):
            raise NotImplementedError(f"{path}: only Split(Regex, behavior=Isolated) is supported, got {split}")
        p = split["pattern"]["Regex"]
        # HF keeps the text between matches as pieces too, tiktoken would drop it: a last
        # alternative matches such gaps (never taken by patterns that match every char, like Llama 3's).
        return f"(?:{p})|(?:(?!(?:{p}))[\\s\\S])+"
    raise NotImplementedError(f"{path}: pre_tokenizer {_describe(pre)} is not supported "
                              "(supported: ByteLevel, Sequence[Digits, ByteLevel], Sequence[Split, ByteLevel])")


def _describe(component: dict) -> str:
    if component.get("type") == "Sequence":
        inner = component.get("pretokenizers") or component.get("processors") or []
        return "Sequence[" + ", ".join(_describe(c) for c in inner) + "]"
    return str(component.get("type"))


def _template_bos(post: dict | None, path: Path) -> str | None:
    """The BOS token that the post_processor prepends, or None; refuses anything it can't mimic."""
    if post is None:
        return None
    if post["type"] == "Sequence":
        found = [_template_bos(p, path) for p in post["processors"]]
        return next((b for b in found if b), None)
    if post["type"] == "ByteLevel":  # only fixes offsets
        return None
    if post["type"] == "TemplateProcessing":
        single = post["single"]
        if single and "SpecialToken" in single[0] and len(single) == 2 and "Sequence" in single[1]:
            return single[0]["SpecialToken"]["id"]
        if len(single) == 1 and "Sequence" in single[0]:
            return None
        raise NotImplementedError(f"{path}: post_processor template {single} is not supported "
                                  "(only '[BOS] $A' or '$A')")
    raise NotImplementedError(f"{path}: post_processor {_describe(post)} is not supported")


def load_hf_tokenizer_json(path: Path) -> TiktokenTokenizer:
    """tokenizer.json (byte-level BPE) -> tokenizer; its bos is the one the post_processor adds."""
    try:
        tj = json.loads(path.read_text("utf-8"))
        model = tj["model"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid tokenizer.json ({e!r})") from None
    if model.get("type") != "BPE":
        raise NotImplementedError(f"{path}: model type {model.get('type')} is not supported (only BPE)")
    if model.get("byte_fallback") or model.get("dropout") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise NotImplementedError(f"{path}: BPE with byte_fallback/dropout/subword prefix or suffix is not supported")
    if tj.get("normalizer") is not None:
        raise NotImplementedError(f"{path}: normalizer {_describe(tj['normalizer'])} is not supported")
    if (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise NotImplementedError(f"{path}: decoder {_describe(tj.get('decoder') or {})} is not supported "
                                  "(only ByteLevel)")
    pattern = _pattern_from_pre_tokenizer(tj.get("pre_tokenizer"), path)
    bos = _template_bos(tj.get("post_processor"), path)

    added = {}
    for t in tj.get("added_tokens", []):
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            raise NotImplementedError(f"{path}: added token {t['content']!r} with lstrip/rstrip/single_word "
                                      "is not supported")
        added[t["content"]] = t["id"]
    byte_of = _byte_decoder()
    ranks, added_ids = {}, set(added.values())
    for token, i in model["vocab"].items():
        if i in added_ids:
            continue
        try:
            ranks[bytes(byte_of[c] for c in token)] = i
        except KeyError:
            raise ValueError(f"{path}: vocab entry {token!r} is not in the byte-level alphabet") from None
    _check_merge_order(model["vocab"], model.get("merges", []), path)
    # tiktoken needs every single byte in the vocab, but trained vocabs may lack some (SmolLM2 lacks
    # 21: a few ASCII control chars and bytes that UTF-8 never or hardly uses). HF silently drops
    # such bytes; we give them placeholder ids past the vocab, which encode then removes.
    first_free = max([*model["vocab"].values(), *added.values()]) + 1
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    ranks.update({b: first_free + k for k, b in enumerate(missing)})
    enc = tiktoken.Encoding(path.name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=added)
    return TiktokenTokenizer(enc, bos, None, add_bos=bos is not None,
                             dropped=frozenset(range(first_free, first_free + len(missing))))


def _check_merge_order(vocab: dict[str, int], merges: list, path: Path) -> None:
    # tiktoken merges the adjacent pair whose concatenation has the lowest id; HF merges the pair
    # listed earliest in `merges`. The two orders agree when the merged token's id never decreases
    # along the list, which holds for vocabularies built by BPE training and by HF's tiktoken converter.
    last = -1
    for n, m in enumerate(merges):
        left, right = m.split(" ") if isinstance(m, str) else m
        i = vocab.get(left + right)
        if i is None or i < last:
            what = "is not in the vocab" if i is None else f"has id {i} < {last}, the id merged before it"
            raise ValueError(f"{path}: merge #{n} {left!r} + {right!r}: the merged token {what}; "
                             "tiktoken's rank-ordered BPE would not reproduce this tokenizer")
        last = i


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text("utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def _token_content(t) -> str | None:
    return t.get("content") if isinstance(t, dict) else t


def _as_list(x) -> list:
    return [] if x is None else x if isinstance(x, list) else [x]


def _chat_template(cfg: dict, d: Path) -> str:
    t = cfg.get("chat_template") or ""
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        t = next((x["template"] for x in t if x.get("name") == "default"), "")
    jinja = d / "chat_template.jinja"  # where transformers >= 4.50 saves it
    return t or (jinja.read_text("utf-8") if jinja.is_file() else "")


def load_tokenizer(checkpoint_dir) -> Tokenizer:
    d = Path(checkpoint_dir)
    model_file, json_file = d / "tokenizer.model", d / "tokenizer.json"
    cfg = _read_json(d / "tokenizer_config.json")
    if model_file.is_file():
        # Both formats use this name; the content tells them apart.
        with open(model_file, "rb") as f:
            head = f.read(256).split(b"\n", 1)[0]
        if re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+", head):
            tok = load_tiktoken_model(model_file)
        else:
            tok = SentencePieceTokenizer(model_file)
    elif json_file.is_file():
        tok = load_hf_tokenizer_json(json_file)
    else:
        raise FileNotFoundError(f"no tokenizer in {d}: looked for tokenizer.model (SentencePiece or tiktoken) "
                                "and tokenizer.json (Hugging Face byte-level BPE)")

    def token_id(name, key):
        if name not in tok.special_tokens:
            raise ValueError(f"{d / 'tokenizer_config.json'}: {key} {name!r} is not a special token of the tokenizer")
        return tok.special_tokens[name]

    # tokenizer_config.json, when present, overrides what the tokenizer file itself implies.
    if isinstance(cfg.get("add_bos_token"), bool):
        tok.add_bos = cfg["add_bos_token"]
    if _token_content(cfg.get("bos_token")):
        tok.bos_id = token_id(_token_content(cfg["bos_token"]), "bos_token")
    if _token_content(cfg.get("eos_token")):
        tok.eos_id = token_id(_token_content(cfg["eos_token"]), "eos_token")
    gen_eos = _as_list(_read_json(d / "generation_config.json").get("eos_token_id"))
    if tok.eos_id is None:
        fallback = gen_eos or _as_list(_read_json(d / "config.json").get("eos_token_id"))
        if not fallback:
            raise ValueError(f"{d}: no eos token: tokenizer_config.json has no eos_token and neither "
                             "generation_config.json nor config.json has eos_token_id")
        tok.eos_id = fallback[0]
    if tok.add_bos and tok.bos_id is None:
        raise ValueError(f"{d}: the tokenizer should add a BOS token but none is known")

    end_of_turn = tok.special_tokens.get({"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}.get(tok.chat_format))
    tok.stop_ids = {tok.eos_id, *gen_eos} | ({end_of_turn} if end_of_turn is not None else set())
    if tok.chat_format == "chatml":
        # The default system prompt, when the model's template writes a literal one (SmolLM2 does).
        m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>", _chat_template(cfg, d))
        tok.default_system = m.group(1) if m else None
    return tok


def render_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The text that the model family's standard HF chat template renders for `messages`."""
    fmt = tok.chat_format
    if fmt == "llama3":
        # Llama 3 Instruct: contents are stripped; BOS opens the conversation.
        out = tok.token_text(tok.bos_id) if messages else ""
        for m in messages:
            out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
        return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")
    if fmt == "chatml":
        out = ""
        if messages and messages[0]["role"] != "system" and tok.default_system is not None:
            out += f"<|im_start|>system\n{tok.default_system}<|im_end|>\n"
        for m in messages:
            out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")
    if fmt == "llama2":
        # Llama 2 chat: the system prompt goes inside the first [INST]; each user turn opens with
        # BOS, each answer closes with EOS; the model's answer follows "[/INST]" (no extra prompt).
        system = None
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        bos, eos, out = tok.token_text(tok.bos_id), tok.token_text(tok.eos_id), ""
        for i, m in enumerate(messages):
            if m["role"] != ("user" if i % 2 == 0 else "assistant"):
                raise ValueError("llama2 chat: after an optional system message, roles must alternate user/assistant")
            content = m["content"]
            if i == 0 and system is not None:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            out += f"{bos}[INST] {content.strip()} [/INST]" if m["role"] == "user" else f" {content.strip()} {eos}"
        return out
    raise ValueError("this tokenizer has no known chat format; --chat and --interactive need an instruct "
                     "model's tokenizer (Llama 2/3 chat or ChatML)")
