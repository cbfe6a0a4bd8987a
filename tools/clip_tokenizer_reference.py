#!/usr/bin/python3
"""Independent Python reference for OpenAI CLIP's BPE tokenizer (simple_tokenizer.py).

It follows CLIP's algorithm with its ftfy.fix_text step replaced by the identity (ftfy is not
installed here; worker/testdata/clip_tokenizer_reference_vectors.jsonl was produced the same way):

  text -> html.unescape(html.unescape(text)).strip()
       -> every run of regex-\\s characters becomes one ' ', .strip(), .lower()
       -> CLIP's pre-tokenizer regex (IGNORECASE, third-party `regex` module semantics)
       -> UTF-8 bytes mapped to GPT-2's printable byte alphabet -> BPE with '</w>' -> vocab ids

The `regex` module is not needed: its classes are emulated with the standard `re` module and
character classes built from `unicodedata` (Unicode 14 in Python 3.11). `check-regex` compares
the emulation with the real module when it is installed (`apt-get install python3-regex`).

Commands (default paths are relative to the repository root):
  check        reproduce worker/testdata/clip_tokenizer_reference_vectors.jsonl exactly
               (exit 1 otherwise)
  check-regex  compare the pre-tokenizer emulation with the `regex` module
  generate     write worker/testdata/clip_tokenizer_extra_vectors.jsonl from EXTRA_CASES
  encode       read one JSON string per stdin line, write one JSON line per input:
               {"ids": [...]}; used by tests/fuzz/clip_tokenizer_differential.py
  html-table   print worker/html_entities.inc, the HTML5 named character reference table
               (html.entities.html5) as a C++ initializer:
               python3 -m tools.clip_tokenizer_reference html-table > worker/html_entities.inc
"""

import argparse
import html
import json
import os
import random
import re
import sys
import unicodedata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VOCAB_DIR = os.path.join(REPO, "models", "tokenizers", "openai-clip")
DEFAULT_VECTORS = os.path.join(REPO, "worker", "testdata", "clip_tokenizer_reference_vectors.jsonl")
DEFAULT_EXTRA = os.path.join(REPO, "worker", "testdata", "clip_tokenizer_extra_vectors.jsonl")

# CLIP's pattern, as written in simple_tokenizer.py; used only by check-regex.
CLIP_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")

# What the `regex` module's \s matches: the Unicode White_Space property. (str.isspace(), used
# by str.strip(), also accepts U+001C..U+001F.)
REGEX_WHITESPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) +
                    "\u2028\u2029\u202f\u205f\u3000")
# Under IGNORECASE the `regex` module matches U+0345 (whose case partner is the letter iota)
# with neither [\p{L}] nor [^\s\p{L}\p{N}], so it is never part of a token; and LONG S (U+017F)
# matches 's'.
DROPPED = "\u0345"


def _class(pred):
    """A re character-class body with every code point for which pred(chr) holds."""
    parts, start = [], None
    for cp in range(0x110001):
        ok = cp < 0x110000 and not 0xD800 <= cp <= 0xDFFF and pred(chr(cp))
        if ok and start is None:
            start = cp
        elif not ok and start is not None:
            end = cp - 1
            parts.append(re.escape(chr(start)) if start == end else
                         re.escape(chr(start)) + "-" + re.escape(chr(end)))
            start = None
    return "".join(parts)


def _build_pretokenizer():
    letters = _class(lambda c: unicodedata.category(c)[0] == "L")
    numbers = _class(lambda c: unicodedata.category(c)[0] == "N")
    other = _class(lambda c: c not in REGEX_WHITESPACE and c != DROPPED and
                   unicodedata.category(c)[0] not in "LN")
    return re.compile(r"<\|[sſ]tartoftext\|>|<\|endoftext\|>|'[sſ]|'t|'re|'ve|'m|'ll|'d|"
                      f"[{letters}]+|[{numbers}]|[{other}]+")


PRETOKEN = _build_pretokenizer()
WHITESPACE_RUN = re.compile(f"[{re.escape(REGEX_WHITESPACE)}]+")


def clean(text):
    text = html.unescape(html.unescape(text)).strip()
    return WHITESPACE_RUN.sub(" ", text).strip().lower()


def byte_alphabet():
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves,
    the other 68 bytes take the characters 256, 257, ... in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Tokenizer:
    """CLIP's tokenizer. pad_token: the padding token string of the model's tokenizer_config
    (default CLIP's EOS "<|endoftext|>", SD1.5's and SDXL's `tokenizer`). A pad token that is
    not one of CLIP's two specials (SDXL's `tokenizer_2` pads with "!", id 0) is also an added
    token, as in transformers' slow CLIPTokenizer: the text is split on it before anything else
    (HTML unescaping, whitespace cleaning, BPE), each occurrence becomes the pad id on its own,
    and the pieces between are tokenized separately. So "boot!!" is "boot", 0, 0 with
    tokenizer_2 but "boot", "!!" (748) with openai's tokenizer."""
    SPECIALS = ("<|startoftext|>", "<|endoftext|>")

    def __init__(self, vocab_dir, pad_token=None):
        with open(os.path.join(vocab_dir, "vocab.json"), encoding="utf-8") as f:
            self.vocab = json.load(f)
        with open(os.path.join(vocab_dir, "merges.txt"), encoding="utf-8") as f:
            lines = f.read().split("\n")
        if lines[0].startswith("#version"):
            lines = lines[1:]
        merges = [tuple(line.split()) for line in lines if line.strip()]
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.alphabet = byte_alphabet()
        self.bos = self.vocab["<|startoftext|>"]
        self.eos = self.pad = self.vocab["<|endoftext|>"]
        self.added_token = None
        if pad_token is not None:
            if pad_token not in self.vocab:
                raise ValueError(f"pad token {pad_token!r} is not in {vocab_dir}/vocab.json")
            self.pad = self.vocab[pad_token]
            if pad_token not in self.SPECIALS:
                self.added_token = pad_token

    def bpe(self, token):
        """CLIP's merge loop: merge every occurrence of the lowest-ranked adjacent pair, left to
        right, until no adjacent pair has a rank."""
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text):
        if self.added_token is None:
            return self._encode_piece(text)
        ids = []
        for i, piece in enumerate(text.split(self.added_token)):
            if i:
                ids.append(self.pad)
            ids.extend(self._encode_piece(piece))
        return ids

    def _encode_piece(self, text):
        ids = []
        for token in PRETOKEN.findall(clean(text)):
            if token in self.SPECIALS:
                ids.append(self.vocab[token])
                continue
            mapped = "".join(self.alphabet[b] for b in token.encode("utf-8"))
            ids.extend(self.vocab[symbol] for symbol in self.bpe(mapped))
        return ids

    def for_model(self, ids, max_length=77):
        kept = ids[:max_length - 2]
        row = [self.bos] + kept + [self.eos]
        return row + [self.pad] * (max_length - len(row)), len(ids) - len(kept)


def _long_prompt(words):
    base = ("a highly detailed oil painting of a quiet harbor town at dawn with fishing boats "
            "gulls soft golden light mist over the water and old stone houses").split()
    return " ".join(base[i % len(base)] for i in range(words))


# (name, text): cases beyond worker/testdata/clip_tokenizer_reference_vectors.jsonl.
EXTRA_CASES = [
    ("emoji", "a cat 🐱 wearing a top hat 🎩✨"),
    ("emoji_zwj_flag_skin", "👩‍🚀 astronaut, 🇯🇵 flag, 👍🏽 thumbs"),
    ("cjk", "東京タワーの夜景、中文提示词：一只猫"),
    ("hangul_thai_devanagari", "안녕하세요 สวัสดี नमस्ते"),
    ("arabic_hebrew", "مرحبا بالعالم שלום"),
    ("accents", "Crème brûlée, naïve façade, Über straße groß"),
    ("turkish_dotted_i", "İstanbul İZMİR ıi"),
    ("greek_final_sigma", "ΟΔΟΣ ΣΟΦΟΣ Σ ΑΣ. ΑΣ'Β"),
    ("decomposed_accent", "cafe\u0301 e\u0301te\u0301"),
    ("ypogegrammeni_dropped", "α\u0345β \u0345 ᾳ"),
    ("long_s", "it'ſ <|ſtartoftext|>"),
    ("punctuation_runs", "wow!!! ... ??? --- *** (((masterpiece))) [best:1.2] {tag} @#$%^"),
    ("numbers", "1024x768 3.14159 2024-01-01 ½ ² ٣٤ ⅷ"),
    ("contractions", "I'M SURE you'll see they've done it, wouldn't you'd've 'S 'T 'RE"),
    ("apostrophes", "rock'n'roll o'clock ''quoted'' it’s don’t"),
    ("html_entities", "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#39;single&#39; &apos;x&apos;"),
    ("html_double_escape", "&amp;amp; &amp;lt;b&amp;gt; &amp;#39;"),
    ("html_nbsp_numeric", "&nbsp;a&nbsp;&nbsp;b &#128512; &#x1F600; &#x41;&#66;&#X43"),
    ("html_edge", "&copy 2024 &notin; &ampfoo &unknown; &#0; &#128; &#xD800; &#1114112; a&#13;b"),
    ("html_ampersands", "AT&T R&D & co &; &# &#x; &&amp;"),
    ("whitespace_tabs_newlines", "tabs\tand\nnewlines\r\nand\x0bvertical\x0cfeed"),
    ("whitespace_unicode", "nbsp\u00a0between\u2003em\u3000ideographic\u2028line\u0085nel"),
    ("whitespace_separators", "\x1c info \x1dseparators\x1e \x1f middle\x1eend \x1f"),
    ("zero_width", "zero\u200bwidth \ufeffbom"),
    ("only_whitespace", " \t\n\u00a0 "),
    ("special_tokens", "<|startoftext|>a photo<|endoftext|> <|ENDOFTEXT|> x<|endoftext|>"),
    ("special_after_punct", "!<|endoftext|> <|endoftext"),
    ("control_chars", "\x00null\x7fdel\x01"),
    ("long_word", "pneumonoultramicroscopicsilicovolcanoconiosis " + "ab" * 60),
    ("prompt_20_words", "a portrait of a young woman with red hair in a green dress, "
                        "standing in a field of sunflowers, digital art, trending on artstation"),
    ("prompt_75_tokens_exact", _long_prompt(75)),
    ("prompt_300_words", _long_prompt(300)),
]


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def cmd_check(tok, args):
    failures = 0
    records = _read_jsonl(args.vectors)
    for record in records:
        ids = tok.encode(record["text"])
        row, _ = tok.for_model(ids)
        if ids != record["ids"] or row != record["input_ids_77"]:
            failures += 1
            print(f"MISMATCH {record['text']!r}: {ids} != {record['ids']}")
    print(f"{len(records) - failures} passed, {failures} failed")
    return 1 if failures else 0


def cmd_generate(tok, args):
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for name, text in EXTRA_CASES:
            ids = tok.encode(text)
            row, truncated = tok.for_model(ids)
            f.write(json.dumps({"name": name, "text": text, "ids": ids, "input_ids_77": row,
                                "truncated_tokens": truncated}) + "\n")
    print(f"wrote {len(EXTRA_CASES)} cases to {args.out}")
    return 0


def cmd_encode(tok, args):
    for line in sys.stdin:
        if line.strip():
            print(json.dumps({"ids": tok.encode(json.loads(line))}), flush=False)
    return 0


def cmd_check_regex(tok, args):
    """Compares PRETOKEN with CLIP's pattern compiled by the `regex` module (IGNORECASE), on
    every code point (alone and next to letters, digits, punctuation and an apostrophe), on the
    extra cases and on random strings. Code points unassigned in Python's Unicode 14 database
    are skipped: `regex` classifies them with its own, newer tables."""
    import regex  # pylint: disable=import-outside-toplevel
    real = regex.compile(CLIP_PATTERN, regex.IGNORECASE)
    assigned = [chr(cp) for cp in range(0x110000)
                if not 0xD800 <= cp <= 0xDFFF and unicodedata.category(chr(cp)) != "Cn"]
    texts = []
    for c in assigned:
        c = c.lower()
        texts += [c, "'" + c, "a" + c + "a", "1" + c + "1", "!" + c + "!", "<|" + c]
    texts += [clean(text) for _, text in EXTRA_CASES]
    rng = random.Random(args.seed)
    pool = assigned[:0x3000] + list("'<|>!sStTrReEvVmMlLdD .,&;#") * 50
    for _ in range(args.random):
        texts.append(clean("".join(rng.choice(pool) for _ in range(rng.randint(1, 24)))))
    mismatches = 0
    for text in texts:
        if PRETOKEN.findall(text) != real.findall(text):
            mismatches += 1
            if mismatches <= 20:
                print(f"MISMATCH {text!r}: {PRETOKEN.findall(text)} != {real.findall(text)}")
    print(f"{len(texts) - mismatches} passed, {mismatches} failed")
    return 1 if mismatches else 0


HTML_TABLE_HEADER = """\
// Generated by
//   /usr/bin/python3 -m tools.clip_tokenizer_reference html-table > worker/html_entities.inc
// Do not edit. The initializer of kHtmlEntities in worker/html_entities.cc: the HTML5 named
// character references of Python's html.entities.html5, sorted by name (byte order), as
// {name, first code point[, second code point]}. Names with and without ';' are both listed
// where HTML allows both.
// clang-format off
"""


def cmd_html_table(tok, args):
    """worker/html_entities.inc: a header comment, then one {"name", first[, second]} entry per
    reference, sorted by name (byte order); `second` is left out (0) for single code points."""
    import html.entities  # pylint: disable=import-outside-toplevel
    print(HTML_TABLE_HEADER, end="")
    entries = []
    for name in sorted(html.entities.html5):
        value = [ord(c) for c in html.entities.html5[name]]
        entries.append(f'{{"{name}", ' + ", ".join(f"0x{cp:X}" for cp in value) + "},")
    line = "   "
    for entry in entries:
        if len(line) + 1 + len(entry) > 100:
            print(line)
            line = "   "
        line += " " + entry
    print(line)
    print("// clang-format on")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["check", "check-regex", "generate", "encode", "html-table"])
    parser.add_argument("--vocab-dir", default=DEFAULT_VOCAB_DIR)
    parser.add_argument("--vectors", default=DEFAULT_VECTORS)
    parser.add_argument("--out", default=DEFAULT_EXTRA)
    parser.add_argument("--random", type=int, default=20000, help="check-regex: random strings")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    tok = Tokenizer(args.vocab_dir)
    commands = {"check": cmd_check, "check-regex": cmd_check_regex, "generate": cmd_generate,
                "encode": cmd_encode, "html-table": cmd_html_table}
    return commands[args.command](tok, args)


if __name__ == "__main__":
    sys.exit(main())
