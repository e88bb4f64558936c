"""The reranking prompt and its label format: the one source of truth for data generation, SFT, GRPO
and inference. Change the wording here and every stage changes with it.

The model reads a question and a document, explains whether the document helps answer the
question, and ends with `Relevance Label: <0|1|2> ##` (0 irrelevant, 1 partially relevant, 2 relevant).
"""

import re

LABELS = (0, 1, 2)
MAX_DOC_CHARS = 8000  # documents are cut to their first 8,000 characters (InteRank)
LABEL_PREFIX = "Relevance Label:"
STOP = " ##"  # generation stops once the label line is closed

INSTRUCTIONS = (
    "You judge whether a document is useful for answering a question.\n"
    "Read the question and the document, then explain in a few sentences which parts of the document "
    "help answer the question and what is missing. Finish with one line of the form\n"
    f"{LABEL_PREFIX} <label> ##\n"
    "where <label> is 0 if the document is irrelevant, 1 if it is partially relevant, "
    "and 2 if it is relevant."
)

_LABEL_RE = re.compile(re.escape(LABEL_PREFIX) + r"\s*([0-2])\b")


def rerank_messages(query: str, document: str) -> list[dict]:
    """Chat messages for one (question, document) pair; render them with `tok.chat(...)`."""
    doc = document[:MAX_DOC_CHARS]
    return [{"role": "user", "content": f"{INSTRUCTIONS}\n\nQuestion:\n{query}\n\nDocument:\n{doc}"}]


def format_target(explanation: str, label: int) -> str:
    """The completion the student learns to write (SFT target, teacher output format)."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    return f"{explanation.strip()}\n\n{LABEL_PREFIX} {label}{STOP}"


def parse_label(text: str) -> int | None:
    """The label a completion states (the last one, if it states several); None if unparseable."""
    found = _LABEL_RE.findall(text)
    return int(found[-1]) if found else None
