"""An offline SFT set from the coffee StackExchange dump (../shared/stackexchange/coffee/Posts.xml), for
the README's real SFT run when no teacher is at hand. The LABELS come from the site's structure, the
EXPLANATIONS ARE TEMPLATED (one fixed sentence per label, filled with question titles) — this shows
the training loop learning, it is not distilled reasoning:

    2  the question's accepted answer
    1  another answer to the same question (not accepted)
    0  the best BM25 match among the other questions' accepted answers (a likely negative)

    python bench/sft_coffee.py --out data/coffee        # -> train.jsonl, val.jsonl (split by question)
"""

import argparse
import html
import json
import random
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from minirank import bm25

DEFAULT_POSTS = Path(__file__).resolve().parents[2] / "shared" / "stackexchange" / "coffee" / "Posts.xml"


def text(body: str) -> str:
    # Posts.xml bodies are HTML; keep paragraphs, drop tags
    body = re.sub(r"</p>|<br\s*/?>", "\n", html.unescape(body))
    return re.sub(r"[ \t]+", " ", re.sub(r"<[^>]+>", "", body)).strip()


def build(posts: Path, seed: int = 0, val_fraction: float = 0.15, max_doc_chars: int = 1500):
    rows = [r.attrib for r in ET.parse(posts).getroot()]
    by_id = {r["Id"]: r for r in rows}
    answers: dict[str, list] = {}
    for r in rows:
        if r.get("PostTypeId") == "2":
            answers.setdefault(r["ParentId"], []).append(r)
    questions = [r for r in rows if r.get("PostTypeId") == "1" and r.get("AcceptedAnswerId") in by_id]
    accepted = {q["Id"]: text(by_id[q["AcceptedAnswerId"]]["Body"])[:max_doc_chars] for q in questions}
    qids = list(accepted)
    index = bm25.build_index([accepted[q] for q in qids], qids)
    out = []
    for q in questions:
        title, query = q["Title"], f"{q['Title']} {text(q['Body'])}"
        recs = [(accepted[q["Id"]], 2, f'The document is the accepted answer to this question; it addresses "{title}" directly.')]
        others = [a for a in answers.get(q["Id"], []) if a["Id"] != q["AcceptedAnswerId"]]
        if others:
            best = max(others, key=lambda a: int(a.get("Score", 0)))
            recs.append((text(best["Body"])[:max_doc_chars], 1,
                         f'The document answers this question about "{title}", but it is not the accepted answer '
                         f'and covers it only in part.'))
        scores = index.score(query)
        ranked = [qids[i] for i in scores.argsort()[::-1] if qids[i] != q["Id"]]
        neg = ranked[0]
        recs.append((accepted[neg], 0, f'The document answers a different question ("{by_id[neg]["Title"]}"), '
                                       f'so it does not help with "{title}".'))
        out += [dict(query=query, document=d, explanation=e, label=l, question_id=q["Id"]) for d, l, e in recs if d]
    ids = sorted({r["question_id"] for r in out})
    random.Random(seed).shuffle(ids)
    val_ids = set(ids[: max(1, int(len(ids) * val_fraction))])
    return [r for r in out if r["question_id"] not in val_ids], [r for r in out if r["question_id"] in val_ids]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--posts", type=Path, default=DEFAULT_POSTS)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    train, val = build(args.posts, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, recs in (("train", train), ("val", val)):
        (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        counts = {l: sum(r["label"] == l for r in recs) for l in (0, 1, 2)}
        print(f"{args.out / name}.jsonl: {len(recs)} pairs, labels {counts}")


if __name__ == "__main__":
    main()
