"""The reranking prompt and its label format: the one source of truth for data generation, SFT, GRPO
and inference. Change the wording here and every stage changes with it.

The model reads a question and a document, explains whether the document helps answer the
question, and ends with `Relevance Label: <0|1|2> ##` (0 irrelevant, 1 partially relevant, 2 relevant).
`fmt="label"` is InteRank's ablation: the same pipeline, but the model writes the label line only.

Every stage turns a (question, document) pair into token ids with `prompt_ids`, and SFT's target
ids come from `completion_ids`, so training and inference see the same bytes by construction.
"""

import hashlib
import re
from datetime import datetime

LABELS = (0, 1, 2)
FORMATS = ("explain", "label")  # explanation then label (InteRank), or the label line alone (ablation)
MAX_DOC_CHARS = 8000  # documents are cut to their first 8,000 characters (InteRank)
LABEL_PREFIX = "Relevance Label:"
STOP = " ##"  # generation stops once the label line is closed

_LABEL_SCALE = ("where <label> is 0 if the document is irrelevant, 1 if it is partially relevant, "
                "and 2 if it is relevant.")
INSTRUCTIONS = {
    "explain": (
        "You judge whether a document is useful for answering a question.\n"
        "Read the question and the document, then explain in a few sentences which parts of the document "
        "help answer the question and what is missing. Finish with one line of the form\n"
        f"{LABEL_PREFIX} <label> ##\n" + _LABEL_SCALE),
    "label": (
        "You judge whether a document is useful for answering a question.\n"
        "Read the question and the document, then answer with exactly one line of the form\n"
        f"{LABEL_PREFIX} <label> ##\n" + _LABEL_SCALE),
}

# Chat templates may write today's date into the prompt (Llama 3.x: `strftime_now` in the default
# system header). A prompt must not change with the calendar, or a model trained on Monday would be
# served a different prompt on Tuesday: every render goes through these variables, which pin the date
# to Llama 3's own default (26 Jul 2024). Passed to the template, they shadow the environment's globals.
PINNED_DATE = datetime(2024, 7, 26)
# Qwen3's template opens a <think> block unless told otherwise: the judge writes its explanation in the
# answer itself, so the template closes an empty block (other templates ignore the variable).
CHAT_VARS = {"strftime_now": PINNED_DATE.strftime, "date_string": PINNED_DATE.strftime("%d %b %Y"),
             "enable_thinking": False}

_LABEL_RE = re.compile(re.escape(LABEL_PREFIX) + r"\s*([0-2])\b")


def _check_fmt(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {FORMATS}")
    return fmt


def rerank_messages(query: str, document: str, fmt: str = "explain") -> list[dict]:
    """Chat messages for one (question, document) pair (what an OpenAI-compatible teacher is sent)."""
    doc = document[:MAX_DOC_CHARS]
    return [{"role": "user", "content": f"{INSTRUCTIONS[_check_fmt(fmt)]}\n\nQuestion:\n{query}\n\nDocument:\n{doc}"}]


def prompt_ids(tok, query: str, document: str, fmt: str = "explain", max_tokens: int | None = None) -> list[int]:
    """Token ids of the prompt in the model's own chat format, date pinned, ready for generation.
    max_tokens: a longer prompt keeps the longest prefix of its document that fits (binary search on
    characters, re-rendered so the chat template stays intact); ValueError if it does not fit even with
    an empty document. SFT cuts its training prompts this way, so GRPO and the reranker can read what SFT trained on."""
    render = lambda k: tok.chat(rerank_messages(query, document[:k], fmt), **CHAT_VARS)  # noqa: E731
    ids = render(MAX_DOC_CHARS)
    if max_tokens is None or len(ids) <= max_tokens:
        return ids
    best = render(0)
    if len(best) > max_tokens:
        raise ValueError(f"the prompt is {len(best)} tokens with an empty document: no room under {max_tokens}")
    lo, hi = 0, min(len(document), MAX_DOC_CHARS)  # lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ids = render(mid)
        lo, hi, best = (mid, hi, ids) if len(ids) <= max_tokens else (lo, mid, best)
    return best


def format_target(explanation: str, label: int, fmt: str = "explain") -> str:
    """The completion the student learns to write (SFT target, teacher output format)."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    line = f"{LABEL_PREFIX} {label}{STOP}"
    return line if _check_fmt(fmt) == "label" else f"{explanation.strip()}\n\n{line}"


def end_of_turn_id(tok) -> int:
    """The token the chat template writes right after an assistant message (<|eot_id|>, <|im_end|>):
    SFT must teach it, or the model never learns to stop."""
    marker = "\x00MINIRANK\x00"
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
    after = tok.render_chat(chat, add_generation_prompt=False, **CHAT_VARS).split(marker, 1)[-1]
    ids = tok.encode(after, add_special_tokens=False)
    if ids and ids[0] in tok.stop_ids:
        return ids[0]
    if tok.eos_id is None:
        raise ValueError("the chat template writes no end-of-turn token after an assistant message and the "
                         "tokenizer has no eos token: cannot teach the model to stop")
    return tok.eos_id


def completion_ids(tok, explanation: str, label: int, fmt: str = "explain") -> list[int]:
    """SFT target ids: the completion text, then the end-of-turn token (both carry loss)."""
    return tok.encode(format_target(explanation, label, fmt), add_special_tokens=False) + [end_of_turn_id(tok)]


def prompt_hash(fmt: str = "explain") -> str:
    """A short fingerprint of what the model is asked (instructions, label format, document cut, date):
    stored with generated data and run settings so two prompt versions never mix."""
    text = "\x00".join([INSTRUCTIONS[_check_fmt(fmt)], LABEL_PREFIX, STOP, str(MAX_DOC_CHARS), CHAT_VARS["date_string"]])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def parse_label(text: str) -> int | None:
    """The label a completion states (the last one, if it states several); None if unparseable."""
    found = _LABEL_RE.findall(text)
    return int(found[-1]) if found else None
