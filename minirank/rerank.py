"""The reranker: for each query, judge every first-stage candidate (explanation + label), then sort.

Score = the expected label under the model's distribution over the three label tokens at the
position where it writes the label (the parsed label only when no such position exists). Unlike
the parsed 0/1/2, that is almost never tied; what ties remain are broken by first-stage rank.
Results are appended to a JSONL file query by query, so a long job resumes where it stopped.
"""

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from .generate import generate
from .prompts import LABEL_PREFIX, LABELS, STOP, parse_label, rerank_messages


@dataclass
class Judgement:
    docid: str
    label: int | None  # the label the completion states; None when it states none
    score: float  # expected label in [0, 2]; -1 when the completion has no label at all
    text: str  # explanation + label line, as generated


def label_token_ids(tok) -> list[int]:
    """Ids of the tokens "0", "1", "2" as they follow the label prefix in the model's vocabulary."""
    ids = [tok.encode(f"{LABEL_PREFIX} {label}", add_special_tokens=False)[-1] for label in LABELS]
    if [tok.decode([i]).strip() for i in ids] != [str(label) for label in LABELS]:
        raise ValueError(f"the tokenizer does not write the labels {LABELS} as single tokens: {ids}")
    return ids


def expected_label(tokens: list[int], watched: list[list[float]], tok, label_ids: list[int]) -> float | None:
    """Expected label at the last step that wrote a label token right after the label prefix."""
    for t in range(len(tokens) - 1, -1, -1):
        if tokens[t] in label_ids and tok.decode(tokens[:t]).rstrip().endswith(LABEL_PREFIX):
            p = [math.exp(lp) for lp in watched[t]]
            return sum(label * q for label, q in zip(LABELS, p)) / sum(p)
    return None


def judge(model, tok, query: str, docs: list[tuple[str, str]], max_new_tokens: int = 1024,
          batch_size: int = 16, compile: bool = False) -> list[Judgement]:
    """Greedy explanation + label for each (docid, text), continuous-batched through batch_size slots."""
    label_ids = label_token_ids(tok)
    prompts = [tok.chat(rerank_messages(query, text)) for _, text in docs]
    out = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0, stop_strings=[STOP],
                   tokenizer=tok, batch_size=batch_size, watch_ids=label_ids, compile=compile)
    result = []
    for (docid, _), tokens, watched, text in zip(docs, out.tokens, out.watched, out.texts):
        label = parse_label(text)
        score = expected_label(tokens, watched, tok, label_ids)
        if score is None:
            score = float(label) if label is not None else -1.0
        result.append(Judgement(docid, label, score, text))
    return result


def order(judgements: list[Judgement]) -> dict[str, float]:
    """Sorted by score, ties by first-stage rank (the input order); distinct run scores for trec_eval."""
    ranked = sorted(range(len(judgements)), key=lambda i: (-judgements[i].score, i))
    return {judgements[i].docid: float(len(ranked) - r) for r, i in enumerate(ranked)}


def rerank_run(model, tok, queries: dict[str, str], docs: dict[str, str], run: dict[str, dict[str, float]],
               out_jsonl: str | Path, top_k: int = 100, **judge_kwargs) -> dict[str, dict[str, float]]:
    """Rerank the top_k of every query in `run`; judgements go to out_jsonl (one line per query,
    flushed as each query finishes); queries already there are not judged again."""
    out_jsonl = Path(out_jsonl)
    done, good = {}, []
    if out_jsonl.exists():
        text = out_jsonl.read_text()
        lines = text.splitlines()
        for n, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
                done[rec["qid"]] = [Judgement(**j) for j in rec["judgements"]]
                good.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                # a line cut short by a crash: drop it (so appends start on a clean line), judge again
                print(f"{out_jsonl}:{n}: incomplete record dropped; that query is judged again")
        if len(good) < len(lines) or (text and not text.endswith("\n")):
            tmp = out_jsonl.with_name(out_jsonl.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in good))
            os.replace(tmp, out_jsonl)
    missing_q = [q for q in run if q not in queries]
    if missing_q:
        raise ValueError(f"run has queries with no text: {missing_q[:5]}{' ...' if len(missing_q) > 5 else ''}")
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    with open(out_jsonl, "a") as f:
        for qid in tqdm([q for q in run if q not in done], desc="rerank", unit="query"):
            ranked = sorted(run[qid].items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
            absent = [d for d, _ in ranked if d not in docs]
            if absent:
                raise ValueError(f"query {qid}: documents not in the corpus: {absent[:5]}")
            js = judge(model, tok, queries[qid], [(d, docs[d]) for d, _ in ranked], **judge_kwargs)
            f.write(json.dumps({"qid": qid, "judgements": [asdict(j) for j in js]}) + "\n")
            f.flush()
            os.fsync(f.fileno())
            done[qid] = js
    return {qid: order(js) for qid, js in done.items() if qid in run}
