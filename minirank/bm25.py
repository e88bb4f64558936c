"""BM25 first stage, reproducing BRIGHT's baseline (xlang-ai/BRIGHT retrievers.py, `retrieval_bm25`).

BRIGHT analyses text with pyserini's default Lucene analyzer and scores with gensim:
  analysis  StandardTokenizer -> EnglishPossessiveFilter -> LowerCaseFilter -> StopFilter (Lucene's
            33 English stop words) -> PorterStemFilter                        (Anserini's
            DefaultEnglishAnalyzer, what `pyserini.analysis.get_lucene_analyzer()` returns)
  weights   gensim LuceneBM25Model(dictionary, k1=0.9, b=0.4) applied to every document AND to the
            query bag-of-words:  w(t, x) = idf(t) * tf / (tf + k1 * (1 - b + b * |x| / avgdl))
            idf(t) = ln(N + 1) - ln(df + 0.5),  |x| = number of in-vocabulary tokens of x,
            avgdl = (sum of collection frequencies) / N
  score     sum over shared terms of w(t, query) * w(t, doc)  (SparseMatrixSimilarity, no norms);
            all documents scored, excluded ids dropped, top 1000 kept (ties: corpus order).
Query tokens unknown to the corpus are dropped before |query| is counted, as gensim's doc2bow does.

Deviations, all small and documented here:
- StandardTokenizer (UAX#29 word breaks, a JFlex grammar) is approximated by one regular expression
  built from Python's Unicode tables (Unicode 14 rather than Lucene's 9). Letters, digits,
  connectors (_), mid-word punctuation (' . : between letters; , . ; ' between digits), one token
  per ideograph or hiragana, katakana and South-East-Asian runs, emoji sequences and the cut of
  tokens longer than 255 chars follow the grammar; simplified: Hebrew quote rules, katakana joined
  to letters by '_', and which rare symbols count as emoji.
- Scores are float64; BRIGHT's gensim similarity index rounds them to float32 (so near-ties may
  order differently).
Everything else (stop set, possessives, Java-style per-character lowercasing, the Porter stemmer with
Martin Porter's own departures exactly as Lucene's PorterStemmer, gensim's Dictionary pruning at
2M terms) is reproduced exactly.
"""

import json
import math
import os
import re
import unicodedata
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import atomic_write

# ----------------------------------------------------------------------------------------------
# Porter stemmer: Lucene's PorterStemmer (Porter's C release 3), which differs from the 1980 paper
# in three ways: words of 1-2 letters are left alone, -bli -> -ble replaces -abli -> -able, and
# -logi -> -log is added. Same as nltk's PorterStemmer(mode=MARTIN_EXTENSIONS).


def _form(w):
    # 'c'/'v' per letter; y is a consonant at the start or after a vowel, a vowel after a consonant
    out = []
    for i, ch in enumerate(w):
        if ch in "aeiou":
            out.append("v")
        elif ch == "y":
            out.append("c" if i == 0 or out[i - 1] == "v" else "v")
        else:
            out.append("c")
    return "".join(out)


def _m(form, n):
    # measure of w[:n]: the number of vowel->consonant transitions, i.e. of [C](VC)^m[V]
    return form[:n].count("vc")


def _cvc(w, form, n):
    # w[:n] ends consonant-vowel-consonant and the last consonant is not w, x or y
    return n >= 3 and form[n - 3:n] == "cvc" and w[n - 1] not in "wxy"


def _doublec(w, form, n):
    return n >= 2 and w[n - 1] == w[n - 2] and form[n - 1] == "c"


# step 2 and 4 rules, keyed by the second-to-last letter as in Lucene; first suffix that matches wins
_STEP2 = {
    "a": (("ational", "ate"), ("tional", "tion")),
    "c": (("enci", "ence"), ("anci", "ance")),
    "e": (("izer", "ize"),),
    "l": (("bli", "ble"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous")),
    "o": (("ization", "ize"), ("ation", "ate"), ("ator", "ate")),
    "s": (("alism", "al"), ("iveness", "ive"), ("fulness", "ful"), ("ousness", "ous")),
    "t": (("aliti", "al"), ("iviti", "ive"), ("biliti", "ble")),
    "g": (("logi", "log"),),
}
_STEP3 = {
    "e": (("icate", "ic"), ("ative", ""), ("alize", "al")),
    "i": (("iciti", "ic"),),
    "l": (("ical", "ic"), ("ful", "")),
    "s": (("ness", ""),),
}
_STEP4 = {
    "a": ("al",), "c": ("ance", "ence"), "e": ("er",), "i": ("ic",), "l": ("able", "ible"),
    "n": ("ant", "ement", "ment", "ent"), "o": ("ion", "ou"), "s": ("ism",), "t": ("ate", "iti"),
    "u": ("ous",), "v": ("ive",), "z": ("ize",),
}


def _replace(w, rules):
    # first rule whose suffix matches decides; it applies only if the remaining stem has m > 0
    for suf, rep in rules:
        if w.endswith(suf):
            stem = w[: len(w) - len(suf)]
            return stem + rep if _m(_form(stem), len(stem)) > 0 else w
    return w


def porter_stem(w):
    """Stem one lowercase word exactly as Lucene's PorterStemFilter does."""
    if len(w) <= 2:
        return w
    # step 1a: plurals
    if w[-1] == "s":
        if w.endswith("sses"):
            w = w[:-2]
        elif w.endswith("ies"):
            w = w[:-2]
        elif w[-2] != "s":
            w = w[:-1]
    # step 1b: -eed, -ed, -ing
    f = _form(w)
    if w.endswith("eed"):
        if _m(f, len(w) - 3) > 0:
            w = w[:-1]
    else:
        suf = 2 if w.endswith("ed") else 3 if w.endswith("ing") else 0
        if suf and "v" in f[: len(w) - suf]:
            w = w[:-suf]
            f = f[: len(w)]
            if w.endswith(("at", "bl", "iz")):
                w += "e"
            elif _doublec(w, f, len(w)):
                if w[-1] not in "lsz":
                    w = w[:-1]
            elif _m(f, len(w)) == 1 and _cvc(w, f, len(w)):
                w += "e"
    # step 1c: y -> i when the stem has a vowel
    if w.endswith("y") and "v" in _form(w)[:-1]:
        w = w[:-1] + "i"
    # step 2: double suffixes
    if len(w) > 1 and w[-2] in _STEP2:
        w = _replace(w, _STEP2[w[-2]])
    # step 3: -ic-, -full, -ness, ...
    if w[-1] in _STEP3:
        w = _replace(w, _STEP3[w[-1]])
    # step 4: -ant, -ence, ... when m > 1
    if len(w) > 1 and w[-2] in _STEP4:
        for suf in _STEP4[w[-2]]:
            if w.endswith(suf):
                stem = w[: len(w) - len(suf)]
                if suf == "ion" and not (stem and stem[-1] in "st"):
                    continue  # -ion only after s or t; then -ou cannot match either
                if _m(_form(stem), len(stem)) > 1:
                    w = stem
                break
    # step 5: final -e, then -ll -> -l
    f = _form(w)
    if w[-1] == "e":
        a = _m(f, len(w))
        if a > 1 or (a == 1 and not _cvc(w, f, len(w) - 1)):
            w = w[:-1]
    if w[-1] == "l" and _doublec(w, f, len(w)) and _m(f, len(w)) > 1:
        w = w[:-1]
    return w


# ----------------------------------------------------------------------------------------------
# Analysis: StandardTokenizer (approximated) -> possessive -> lowercase -> stop words -> Porter.

STOP_WORDS = frozenset(  # Lucene EnglishAnalyzer.ENGLISH_STOP_WORDS_SET
    "a an and are as at be but by for if in into is it no not of on or such that the their then "
    "there these they this to was will with".split()
)
MAX_TOKEN_LENGTH = 255  # StandardTokenizer's default; longer tokens are cut into pieces

# Script ranges the grammar treats specially (Unicode's Scripts.txt / LineBreak.txt, abridged).
_HAN = [(0x2E80, 0x2E99), (0x2E9B, 0x2EF3), (0x2F00, 0x2FD5), (0x3005, 0x3005), (0x3007, 0x3007),
        (0x3021, 0x3029), (0x3038, 0x303B), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),
        (0x20000, 0x2FA1F), (0x30000, 0x3134F)]
_HIRAGANA = [(0x3041, 0x3096), (0x309D, 0x309F), (0x1B001, 0x1B11F)]
_KATAKANA = [(0x3031, 0x3035), (0x309B, 0x309C), (0x30A0, 0x30FA), (0x30FC, 0x30FF), (0x31F0, 0x31FF),
             (0x32D0, 0x32FE), (0x3300, 0x3357), (0xFF66, 0xFF9D), (0x1B000, 0x1B000)]
_SOUTH_EAST_ASIAN = [(0x0E01, 0x0E3A), (0x0E40, 0x0E4E), (0x0E81, 0x0EDF), (0x1000, 0x103F),
                     (0x1050, 0x108F), (0x109A, 0x109F), (0x1780, 0x17D3), (0x17D7, 0x17D7),
                     (0x17DC, 0x17DD), (0x1950, 0x19DF), (0x1A20, 0x1AAF), (0xA9E0, 0xA9EF),
                     (0xA9FA, 0xA9FE), (0xAA60, 0xAADF), (0x11700, 0x1173F)]
# Extended_Pictographic (emoji-data 11.0, Lucene's table): each is an emoji token, with modifiers,
# U+FE0F and ZWJ sequences; regional indicators count only in pairs (flags).
_PICTOGRAPHIC = [(0x00A9, 0x00A9), (0x00AE, 0x00AE), (0x203C, 0x203C), (0x2049, 0x2049), (0x2122, 0x2122),
                 (0x2139, 0x2139), (0x2194, 0x2199), (0x21A9, 0x21AA), (0x231A, 0x231B), (0x2328, 0x2328),
                 (0x2388, 0x2388), (0x23CF, 0x23CF), (0x23E9, 0x23F3), (0x23F8, 0x23FA), (0x24C2, 0x24C2),
                 (0x25AA, 0x25AB), (0x25B6, 0x25B6), (0x25C0, 0x25C0), (0x25FB, 0x25FE), (0x2600, 0x2605),
                 (0x2607, 0x2612), (0x2614, 0x2685), (0x2690, 0x2705), (0x2708, 0x2712), (0x2714, 0x2714),
                 (0x2716, 0x2716), (0x271D, 0x271D), (0x2721, 0x2721), (0x2728, 0x2728), (0x2733, 0x2734),
                 (0x2744, 0x2744), (0x2747, 0x2747), (0x274C, 0x274C), (0x274E, 0x274E), (0x2753, 0x2755),
                 (0x2757, 0x2757), (0x2763, 0x2767), (0x2795, 0x2797), (0x27A1, 0x27A1), (0x27B0, 0x27B0),
                 (0x27BF, 0x27BF), (0x2934, 0x2935), (0x2B05, 0x2B07), (0x2B1B, 0x2B1C), (0x2B50, 0x2B50),
                 (0x2B55, 0x2B55), (0x3030, 0x3030), (0x303D, 0x303D), (0x3297, 0x3297), (0x3299, 0x3299),
                 (0x1F000, 0x1F0FF), (0x1F10D, 0x1F10F), (0x1F12F, 0x1F12F), (0x1F16C, 0x1F171),
                 (0x1F17E, 0x1F17F), (0x1F18E, 0x1F18E), (0x1F191, 0x1F19A), (0x1F1AD, 0x1F1E5),
                 (0x1F201, 0x1F20F), (0x1F21A, 0x1F21A), (0x1F22F, 0x1F22F), (0x1F232, 0x1F23A),
                 (0x1F23C, 0x1F23F), (0x1F249, 0x1F3FA), (0x1F400, 0x1F53D), (0x1F546, 0x1F64F),
                 (0x1F680, 0x1F6FF), (0x1F774, 0x1F77F), (0x1F7D5, 0x1F7FF), (0x1F80C, 0x1F80F),
                 (0x1F848, 0x1F84F), (0x1F85A, 0x1F85F), (0x1F888, 0x1F88F), (0x1F8AE, 0x1F8FF),
                 (0x1F90C, 0x1F93A), (0x1F93C, 0x1F945), (0x1F947, 0x1FFFD)]
_EMOJI_MODIFIERS = [(0x1F3FB, 0x1F3FF)]
_REGIONAL_INDICATORS = [(0x1F1E6, 0x1F1FF)]
_MID_LETTER = ":\u00b7\u0387\u05f4\u2027\ufe13\ufe55\uff1a"
_MID_NUM_LET = ".'\u2018\u2019\u2024\ufe52\uff07\uff0e"  # includes Single_Quote
_MID_NUM = ",;\u037e\u0589\u060c\u060d\u066c\u07f8\u2044\ufe10\ufe14\ufe50\ufe54\uff0c\uff1b"
_EXTRA_LETTERS = [(0x02C2, 0x02C5), (0x02D2, 0x02D7), (0x02DE, 0x02DF), (0x02E5, 0x02EB),
                  (0x02ED, 0x02ED), (0x02EF, 0x02FF), (0x05F3, 0x05F3), (0x24B6, 0x24E9),
                  (0xA720, 0xA721), (0xA789, 0xA78A), (0xAB5B, 0xAB5B)]


_CLASSES = None  # name -> sorted code points, built once from Python's Unicode tables
_ASSIGNED = None  # prefix counts of assigned code points, to merge ranges across unassigned gaps
_REGEXES = {}     # highest code point -> compiled tokenizer for texts below it


def _classes():
    global _CLASSES, _ASSIGNED
    if _CLASSES is not None:
        return _CLASSES
    top = 0xE1000
    cps = list(range(0x32000)) + list(range(0xE0000, top))
    cats = [unicodedata.category(chr(cp)) for cp in cps]

    def mask(ranges):
        m = np.zeros(top + 1, bool)
        for lo, hi in ranges:
            m[lo:hi + 1] = True
        return m

    han, hira, kata, sea, extra = (mask(r) for r in (_HAN, _HIRAGANA, _KATAKANA, _SOUTH_EAST_ASIAN, _EXTRA_LETTERS))
    special = mask(_PICTOGRAPHIC + _EMOJI_MODIFIERS + _REGIONAL_INDICATORS + [(0xD800, 0xDFFF)])
    for ch in _MID_LETTER + _MID_NUM_LET + _MID_NUM:
        special[ord(ch)] = True
    cls = {k: [] for k in ("L", "N", "E", "X", "K", "H", "I", "S")}
    assigned = np.zeros(top + 1, np.int32)
    for cp, cat in zip(cps, cats):
        assigned[cp + 1] = cat != "Cn"
        if special[cp]:
            continue
        if sea[cp] and cat[0] in "LM":
            cls["S"].append(cp)  # South-East-Asian runs stay whole
        elif han[cp]:
            cls["H"].append(cp)  # one token per ideograph
        elif hira[cp]:
            cls["I"].append(cp)  # one token per hiragana
        elif kata[cp]:
            cls["K"].append(cp)
        elif cat in ("Mn", "Me", "Mc") or (cat == "Cf" and cp != 0x200B):
            cls["X"].append(cp)  # WB4: Extend/Format/ZWJ attach to the character before
        elif cat == "Nd" or cp == 0x066B:
            cls["N"].append(cp)
        elif cat == "Pc" or cp == 0x202F:
            cls["E"].append(cp)  # ExtendNumLet: '_' and friends join words
        elif cat[0] == "L" or cat == "Nl" or extra[cp]:
            cls["L"].append(cp)
    cls["P"] = _ranges(_PICTOGRAPHIC)
    cls["M"] = _ranges(_EMOJI_MODIFIERS)
    cls["R"] = _ranges(_REGIONAL_INDICATORS)
    cls["XE"] = [cp for cp in cls["X"] if cp not in (0xFE0E, 0xFE0F, 0x200D)]
    _ASSIGNED = np.cumsum(assigned)
    _CLASSES = cls
    return cls


def _charclass(cps):
    # sorted code points -> regex class body made of ranges. Ranges are merged across gaps of
    # unassigned code points: Python's re tests the astral (> U+FFFF) part of a class range by
    # range, so fewer ranges make every character test faster.
    parts = []
    for cp in cps:
        if parts and (cp == parts[-1][1] + 1 or (
                cp < len(_ASSIGNED) and _ASSIGNED[cp] == _ASSIGNED[parts[-1][1] + 1])):
            parts[-1][1] = cp
        else:
            parts.append([cp, cp])
    esc = lambda cp: "\\U%08x" % cp
    return "".join(esc(a) if a == b else f"{esc(a)}-{esc(b)}" for a, b in parts)


def _token_re(limit=0x10FFFF):
    """The StandardTokenizer grammar as one regex, for texts whose characters are all <= limit.
    Restricting the classes to ASCII or to the BMP gives the same tokens on such texts, faster:
    Python's re tests small classes with a bitmap, but astral ranges one by one."""
    rx = _REGEXES.get(limit)
    if rx is not None:
        return rx
    full = _classes()
    c = {k: _charclass([cp for cp in v if cp <= limit]) for k, v in full.items()}
    X = f"[{c['X']}]*+" if c["X"] else ""
    # A word is matched as runs of [letter digit connector mark] glued by single mid-word
    # punctuation, rather than char by char through nested groups (much faster in Python's re).
    # Letter-digit adjacency (WB9/10) and connectors (WB13a/b) join freely, so they share a run;
    # a mid-letter char (. ' : ...) joins only a letter to a letter, a mid-number char (. , ; ...)
    # a digit to a digit: checked by looking back (past one mark at most) and one char ahead.
    run = f"[{c['L']}{c['N']}{c['E']}][{c['L']}{c['N']}{c['E']}{c['X']}]*+"
    ml = re.escape("".join(ch for ch in _MID_LETTER + _MID_NUM_LET if ord(ch) <= limit))
    mn = re.escape("".join(ch for ch in _MID_NUM + _MID_NUM_LET if ord(ch) <= limit))
    after = lambda k: f"(?:(?<=[{c[k]}])|(?<=[{c[k]}][{c['X']}]))" if c["X"] else f"(?<=[{c[k]}])"
    mid = f"(?:{after('L')}[{ml}]{X}(?=[{c['L']}])|{after('N')}[{mn}]{X}(?=[{c['N']}]))"
    alts = [f"{run}(?:{mid}{run})*"]
    if c["K"]:
        e = f"[{c['E']}]*+"
        alts.append(f"{e}[{c['K']}]{X}(?:{e}[{c['K']}]{X})*{e}")
    for k, rule in (("S", f"(?:[{c['S']}]{X})+"), ("H", f"[{c['H']}]{X}"), ("I", f"[{c['I']}]{X}")):
        if c[k]:
            alts.append(rule)  # South-East-Asian runs whole; one token per ideograph, per hiragana
    if c["P"]:
        # emoji: pictograph (+ marks but not U+FE0F/ZWJ, + U+FE0F, + skin tone), ZWJ-joined; flags
        xe = f"[{c['XE']}]*+" if c["XE"] else ""
        mods = f"(?:[{c['M']}]{xe})" if c["M"] else ""
        one = f"(?:[{c['P']}]{xe}\\ufe0f?{mods + '?' if mods else ''}{'|' + mods if mods else ''})"
        alts.append(f"{one}(?:\\u200d{one})*")
        if c["R"]:
            alts.append(f"[{c['R']}]{X}[{c['R']}]{X}")
    rx = _REGEXES[limit] = re.compile("|".join(alts))
    return rx


def _ranges(ranges):
    return [cp for lo, hi in ranges for cp in range(lo, hi + 1)]


_JUNK_CHARS = None  # connectors and marks: a token made only of these is no token


def tokenize(text):
    """StandardTokenizer-like tokens of `text`, original case."""
    global _JUNK_CHARS
    if not text:
        return []
    regex = _token_re(0x7F if text.isascii() else 0xFFFF if max(text) <= "\uffff" else 0x10FFFF)
    if _JUNK_CHARS is None:
        _JUNK_CHARS = frozenset(chr(cp) for cp in _classes()["E"] + _classes()["X"])
    out = []
    for tok in regex.findall(text):
        if tok[0] in _JUNK_CHARS and all(ch in _JUNK_CHARS for ch in tok):
            continue
        while len(tok) > MAX_TOKEN_LENGTH:
            # Lucene's scanner buffer holds 255 chars: emit them, rescan the rest from scratch
            out.append(tok[:MAX_TOKEN_LENGTH])
            rest = tokenize(tok[MAX_TOKEN_LENGTH:])
            tok = rest.pop() if rest else ""
            out.extend(rest)
        if tok:
            out.append(tok)
    return out


def _lower(tok):
    # Java's Character.toLowerCase, one code point at a time: no final-sigma rule, and
    # U+0130 (capital I with dot) becomes a plain 'i' rather than 'i' + combining dot.
    if tok.isascii():
        return tok.lower()
    return "".join("i" if ch == "\u0130" else ch.lower() for ch in tok)


def _term(tok):
    """One token through the filters; '' when it is a stop word."""
    if len(tok) >= 2 and tok[-2] in "'\u2019\uff07" and tok[-1] in "sS":
        tok = tok[:-2]  # EnglishPossessiveFilter
    tok = _lower(tok)
    if tok in STOP_WORDS:
        return ""
    return porter_stem(tok)


class Analyzer:
    """Lucene-English analysis with a cache of token -> term (tokens repeat a lot)."""

    def __init__(self, cache_size=2_000_000):
        self.cache = {}
        self.cache_size = cache_size

    def __call__(self, text):
        cache = self.cache
        out = []
        for tok in tokenize(text):
            term = cache.get(tok)
            if term is None:
                term = _term(tok)
                if len(cache) >= self.cache_size:
                    cache.clear()
                cache[tok] = term
            if term:
                out.append(term)
        return out


_default_analyzer = Analyzer()


def analyze(text):
    """Terms of `text` as BRIGHT's pyserini analyzer produces them."""
    return _default_analyzer(text)


# ----------------------------------------------------------------------------------------------
# Index: the corpus' BM25 document weights as a term-major scipy CSR matrix (terms x docs), so a
# query is a sparse vector-matrix product over its few terms.

INDEX_VERSION = 1
CHUNK = 10_000  # gensim's Dictionary checks its pruning rule every 10,000 documents


@dataclass
class BM25Index:
    doc_ids: list          # corpus order
    vocab: dict            # term -> row of `weights`
    idf: np.ndarray        # per term
    avgdl: float
    weights: object        # scipy.sparse.csr_matrix, shape (n_terms, n_docs), float64
    k1: float = 0.9
    b: float = 0.4

    def query_vector(self, text_or_terms):
        """(term rows, weights) of a query: gensim's LuceneBM25Model applied to its bag of words."""
        terms = analyze(text_or_terms) if isinstance(text_or_terms, str) else text_or_terms
        counts = {}
        for t in terms:
            row = self.vocab.get(t)
            if row is not None:  # doc2bow drops unknown terms, before the length is counted
                counts[row] = counts.get(row, 0) + 1
        rows = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        tf = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
        qlen = tf.sum()
        w = self.idf[rows] * (tf / (tf + self.k1 * (1 - self.b + self.b * qlen / self.avgdl)))
        return rows, w

    def score(self, text_or_terms):
        """BM25 score of every document for one query (float64, corpus order)."""
        rows, w = self.query_vector(text_or_terms)
        W = self.weights
        scores = np.zeros(W.shape[1])
        for r, wq in zip(rows.tolist(), w.tolist()):
            # one posting list at a time: a term's documents are distinct, so += is a plain add
            lo, hi = W.indptr[r], W.indptr[r + 1]
            scores[W.indices[lo:hi]] += wq * W.data[lo:hi]
        return scores


def build_index(texts, doc_ids, k1=0.9, b=0.4, prune_at=2_000_000, progress=False):
    """Index a corpus (lists of texts and ids) with BRIGHT's BM25 weighting.

    prune_at mirrors gensim's Dictionary(prune_at=2_000_000): when, at a multiple of 10,000
    documents, the vocabulary exceeds prune_at terms, only the prune_at most frequent (by document
    frequency, ties by first appearance) are kept and the others forget their counts. None disables.
    """
    import scipy.sparse as sp

    texts = list(texts)
    doc_ids = [str(d) for d in doc_ids]
    if len(texts) != len(doc_ids):
        raise ValueError(f"{len(texts)} texts but {len(doc_ids)} ids")
    n = len(texts)
    analyzer = Analyzer()
    term2id, terms, first_doc = {}, [], []   # every term ever seen, first-seen order
    df = np.zeros(0, np.int64)               # gensim Dictionary statistics (0 when not active)
    cf = np.zeros(0, np.int64)
    active = np.zeros(0, bool)
    act_doc = np.zeros(0, np.int64)          # document that (re)activated the term: gensim id order
    pruned = False
    chunks = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc="bm25 index", unit="doc")
    for start in range(0, n, CHUNK):
        if prune_at is not None and int(active.sum()) > prune_at:
            keep = _prune_order(np.flatnonzero(active), df, act_doc, terms)[:prune_at]
            drop = np.setdiff1d(np.flatnonzero(active), keep)
            active[drop] = False
            df[drop] = cf[drop] = 0
            pruned = True
        ids, indptr = array("q"), [0]  # raw int64s: a chunk can hold tens of millions of tokens
        for i in range(start, min(start + CHUNK, n)):
            doc = analyzer(texts[i] or "")
            row = [term2id.get(t) for t in doc]
            if None in row:
                for p, t in enumerate(doc):
                    if row[p] is None:
                        j = term2id.get(t)
                        if j is None:
                            j = term2id[t] = len(terms)
                            terms.append(t)
                            first_doc.append(i)
                        row[p] = j
            ids.extend(row)
            indptr.append(len(ids))
        v = len(terms)
        ids = np.frombuffer(ids, dtype=np.int64) if len(ids) else np.zeros(0, np.int64)
        m = sp.csr_matrix((np.ones(len(ids), np.int64), ids, np.asarray(indptr, np.int64)),
                          shape=(len(indptr) - 1, v))
        m.sum_duplicates()  # tf per (doc, term); also sorts the columns of each row
        chunks.append(m)
        grow = v - len(df)
        df, cf = np.concatenate([df, np.zeros(grow, np.int64)]), np.concatenate([cf, np.zeros(grow, np.int64)])
        active = np.concatenate([active, np.zeros(grow, bool)])
        act_doc = np.concatenate([act_doc, np.asarray(first_doc[v - grow:], np.int64)])
        cols = m.indices
        if pruned:  # a term coming back after a prune takes a new place in gensim's id order
            back = np.flatnonzero(~active & (np.bincount(cols, minlength=v) > 0))
            if len(back):
                rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
                uniq, first = np.unique(cols, return_index=True)
                pos = np.searchsorted(uniq, back)
                act_doc[back] = start + rows[first[pos]]
        active[cols] = True
        df += np.bincount(cols, minlength=v)
        cf += np.bincount(cols, weights=m.data, minlength=v).astype(np.int64)
        if bar:
            bar.update(m.shape[0])
    if bar:
        bar.close()
    v = len(terms)
    tf = sp.vstack([sp.csr_matrix((c.data, c.indices, c.indptr), shape=(c.shape[0], v)) for c in chunks],
                   format="csr") if chunks else sp.csr_matrix((0, v), dtype=np.int64)
    keep = np.flatnonzero(active)
    if len(keep) < v:
        tf = tf[:, keep]
    vocab = {terms[j]: r for r, j in enumerate(keep)}
    df, cf = df[keep], cf[keep]
    n_docs = max(n, 1)
    avgdl = float(cf.sum()) / n_docs if n else 0.0
    idf = math.log(n + 1.0) - np.log(df + 0.5)
    dl = np.asarray(tf.sum(axis=1)).ravel().astype(np.float64)
    row_of = np.repeat(np.arange(tf.shape[0]), np.diff(tf.indptr))
    t = tf.data.astype(np.float64)
    denom = k1 * (1 - b + b * dl[row_of] / avgdl) if avgdl > 0 else np.full(len(t), k1 * (1 - b))
    w = idf[tf.indices] * (t / (t + denom))
    weights = sp.csr_matrix((w, tf.indices, tf.indptr), shape=tf.shape).T.tocsr()
    return BM25Index(doc_ids=doc_ids, vocab=vocab, idf=idf, avgdl=avgdl, weights=weights, k1=k1, b=b)


def _prune_order(ids, df, act_doc, terms):
    # gensim: sort ids by df descending, stable over id order = (activation document, term text)
    return np.asarray(sorted(ids.tolist(), key=lambda j: (-df[j], act_doc[j], terms[j])), np.int64)


def top_k(scores, k=1000, exclude=()):
    """Indices of the k best scores, best first; ties keep corpus order (BRIGHT's stable sort)."""
    scores = np.asarray(scores, dtype=np.float64)
    s = scores
    if len(exclude):
        s = scores.copy()
        s[np.asarray(list(exclude), dtype=np.int64)] = -np.inf
    k = min(k, len(s) - (len(set(exclude)) if len(exclude) else 0))
    if k <= 0:
        return np.zeros(0, np.int64)
    # the k-th best score; partitioning the negated scores at k-1 rather than the scores at n-k
    # gives the same value, but numpy's introselect is ~30x slower on the latter when most scores
    # are 0 (the usual BM25 case)
    thr = -np.partition(-s, k - 1)[k - 1]
    above = np.flatnonzero(s > thr)
    above = above[np.lexsort((above, -s[above]))]
    # the rest are ties at the threshold, often many (all the zeros): corpus order, no sort
    tied = np.flatnonzero(s == thr)[: k - len(above)]
    return np.concatenate([above, tied])


def search(index, queries, k=1000, excluded=None, progress=False):
    """Run queries {qid: text} -> {qid: {docid: score}} (top k, excluded ids removed first)."""
    excluded = excluded or {}
    pos = None
    run = {}
    items = list(queries.items())
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc="bm25 search", unit="query")
    for qid, text in items:
        drop = [d for d in excluded.get(qid, ()) if d != "N/A"]
        idx = ()
        if drop:
            if pos is None:
                pos = {d: i for i, d in enumerate(index.doc_ids)}
            idx = [pos[d] for d in drop if d in pos]
        scores = index.score(text)
        best = top_k(scores, k, idx)
        run[qid] = {index.doc_ids[i]: float(scores[i]) for i in best}
    return run


# ----------------------------------------------------------------------------------------------
# On-disk cache of an index: a directory with arrays (.npz), the vocabulary and the doc ids (json).


def save_index(index, path, source=None):
    """Write the index to directory `path`. `source` (any JSON value, e.g. the stamps of the files it
    was built from) is recorded so that load_index can refuse an index of other data.

    meta.json marks a complete index, so a rebuild removes it first and writes it last: a crash
    midway leaves no meta (load_index -> None, rebuild), never new arrays beside old metadata."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "meta.json").unlink(missing_ok=True)
    terms = [None] * len(index.vocab)
    for t, r in index.vocab.items():
        terms[r] = t
    w = index.weights
    tmp = path / "arrays.tmp.npz"
    np.savez(tmp, data=w.data, indices=w.indices, indptr=w.indptr, shape=np.asarray(w.shape), idf=index.idf)
    os.replace(tmp, path / "arrays.npz")
    for name, obj in (("vocab.json", terms), ("doc_ids.json", index.doc_ids)):
        atomic_write(path / name, json.dumps(obj, ensure_ascii=False))
    meta = {"version": INDEX_VERSION, "k1": index.k1, "b": index.b, "avgdl": index.avgdl,
            "n_docs": len(index.doc_ids), "n_terms": len(terms), "nnz": int(w.nnz), "source": source}
    atomic_write(path / "meta.json", json.dumps(meta))  # written last: marks a complete index


def load_index(path, source=None):
    """The index saved at `path`, or None if there is no complete, current one (with `source`: one
    built from that source)."""
    import scipy.sparse as sp

    path = Path(path)
    try:
        with open(path / "meta.json") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("version") != INDEX_VERSION:
        return None
    if source is not None and meta.get("source") != json.loads(json.dumps(source)):
        return None
    try:
        a = np.load(path / "arrays.npz")
        weights = sp.csr_matrix((a["data"], a["indices"], a["indptr"]), shape=tuple(a["shape"]))
        with open(path / "vocab.json", encoding="utf-8") as f:
            terms = json.load(f)
        with open(path / "doc_ids.json", encoding="utf-8") as f:
            doc_ids = json.load(f)
    except (OSError, ValueError, KeyError):  # a file missing or cut short: not a complete index
        return None
    if (len(doc_ids), len(terms), weights.nnz) != (meta.get("n_docs"), meta.get("n_terms"), meta.get("nnz")):
        return None  # files of two different builds: rebuild rather than search a chimera
    return BM25Index(doc_ids=doc_ids, vocab={t: i for i, t in enumerate(terms)}, idf=a["idf"],
                     avgdl=meta["avgdl"], weights=weights, k1=meta["k1"], b=meta["b"])


# ----------------------------------------------------------------------------------------------
# CLI: a first-stage run for any corpus (BRIGHT's domains: `python -m minirank.bright bm25`).


def main(argv=None) -> int:
    """python -m minirank.bm25 --docs docs.jsonl --queries queries.jsonl --out run.trec [--k 100]"""
    import argparse
    import sys

    from .files import DataError, read_texts, write_run

    ap = argparse.ArgumentParser(prog="python -m minirank.bm25",
                                 description="BM25 first stage (BRIGHT's analysis and weights) for your own corpus: "
                                             "a TREC run that rerank.py --run takes.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--docs", required=True, help="JSONL(.gz)/parquet rows with 'id' and 'text' (or 'content') (required)")
    ap.add_argument("--queries", required=True, help="JSONL(.gz)/parquet rows with 'id' and 'text' (or 'query') (required)")
    ap.add_argument("--out", required=True, help="the TREC run to write (required)")
    ap.add_argument("--k", type=int, default=100, help="documents kept per query")
    args = ap.parse_args(argv)
    try:
        if args.k < 1:
            raise DataError("--k must be >= 1")
        docs = read_texts(args.docs, ("text", "content"))
        queries = read_texts(args.queries, ("text", "query"))
        if not docs:
            raise DataError(f"{args.docs}: no documents")
        index = build_index(list(docs.values()), list(docs), progress=len(docs) > 50_000)
        write_run(search(index, queries, k=args.k), args.out, tag="bm25")
    except DataError as e:
        print(f"python -m minirank.bm25: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(queries)} queries x top {min(args.k, len(docs))} of {len(docs)} documents")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
