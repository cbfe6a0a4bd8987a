#!/usr/bin/python3
"""Differential test: C++ ClipTokenizer against tools/clip_tokenizer_reference.py.

Random texts are assembled from pieces the tokenizer treats specially (HTML references, Greek
sigma next to case-ignorable characters, dotted capital I, long s, U+0345, every kind of
whitespace, contractions, special-token literals, combining marks, emoji) and from random code
points assigned in Python's Unicode database. Both implementations encode every text; any
difference is printed.

Usage: tests/fuzz/clip_tokenizer_differential.py ENCODER [--count N] [--seed S]
  ENCODER: clip_tokenizer_encode from the tests/fuzz build (see run_fuzz.sh).
"""

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import unicodedata

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "..", "..", "tools", "clip_tokenizer_reference.py")

PIECES = [
    # HTML character references, whole and broken.
    "&", "&amp;", "&amp", "&lt;", "&gt", "&quot;", "&#39;", "&apos;", "&nbsp;", "&copy", "&notin;",
    "&not", "&ampx", "&#", "&#x", "&#X", "&#0;", "&#13;", "&#128;", "&#x9f;", "&#xD800;",
    "&#1114112;", "&#65534;", "&#x1F600;", "&#0000065", "#", ";", "x", "amp", "lt", "nbsp",
    "&AMP;", "&Sigma;", "&sigmaf;", "&ThickSpace;", "&NotNestedGreaterGreater;",
    # Greek sigma and case-ignorable / cased neighbours; other case specials.
    "Σ", "Σ", "ΑΣ", "σ", "ς", "'", ".", ":", "·", "\u0301", "\u00ad", "ʰ", "ª", "Ⅷ", "ⓐ", "🄰",
    "İ", "I", "ı", "ſ", "\u0345", "ß", "ẞ", "ǅ", "K", "Å",
    # Whitespace of every kind, and characters that look like it but are not.
    " ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\x85",
    "\xa0", "\u1680", "\u2003", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000", "\u200b",
    "\ufeff", "\u180e",
    # Contractions and special-token literals.
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "’s", "<|startoftext|>",
    "<|endoftext|>", "<|ENDOFTEXT|>", "<|", "|>", "<|ſtartoftext|>",
    # Words, numbers, punctuation, scripts, emoji.
    "a", "photo", "of", "The", "CAT", "café", "e\u0301", "naïve", "Straße", "東京", "日本語",
    "한국어", "नमस्ते", "مرحبا", "ไทย", "0", "42", "3.14", "½", "²", "٣", "!!!", "...", "---",
    "(((", "))", "[", "]", ":1.2", "🙂", "👩\u200d🚀", "🇯🇵", "👍🏽", "\x00", "\x7f", "\ufffd",
]


def load_reference():
    spec = importlib.util.spec_from_file_location("clip_tokenizer_reference", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assigned_code_points():
    return [cp for cp in range(0x110000)
            if not 0xD800 <= cp <= 0xDFFF and unicodedata.category(chr(cp)) not in ("Cn", "Cs")]


def random_text(rng, code_points):
    parts = []
    for _ in range(rng.randint(0, 16)):
        if rng.random() < 0.75:
            parts.append(rng.choice(PIECES))
        else:
            parts.append(chr(rng.choice(code_points)))
    return "".join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("encoder")
    parser.add_argument("--count", type=int, default=100000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    reference = load_reference()
    tokenizer = reference.Tokenizer(reference.DEFAULT_VOCAB_DIR)
    rng = random.Random(args.seed)
    code_points = assigned_code_points()
    texts = [random_text(rng, code_points) for _ in range(args.count)]
    stdin = "".join(json.dumps(text) + "\n" for text in texts)
    result = subprocess.run([args.encoder], input=stdin, capture_output=True, text=True,
                            check=True)
    outputs = [json.loads(line) for line in result.stdout.splitlines()]
    if len(outputs) != len(texts):
        print(f"encoder wrote {len(outputs)} lines for {len(texts)} texts", file=sys.stderr)
        return 1
    failures = 0
    for text, output in zip(texts, outputs):
        expected = tokenizer.encode(text)
        if output.get("ids") != expected:
            failures += 1
            if failures <= 20:
                print(f"MISMATCH {text!r}\n  reference {expected}\n  c++       {output}")
    print(f"{len(texts) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
