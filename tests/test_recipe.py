"""train.py recipe: presets, --set, dry run, and a whole tiny run (three made-up sites, a tiny random
Llama) that is SIGKILLed inside each stage and rerun, giving the report of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_dir
from minirank import recipe
from minirank.stackexchange import eval_task
from test_datagen import answer, question, write_posts

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("espresso grinder burr kettle roast crema filter brew bean milk steam water pressure acid bitter sweet "
         "printer nozzle filament bed level layer heat warp model slice prompt token image").split()


def make_sites(root: Path, n_sites=3, n_q=6) -> Path:
    """Small dumps: every question has an accepted answer and one other; texts share words across questions."""
    for s in range(n_sites):
        rows, pid = [], 1
        for q in range(n_q):
            w = [WORDS[(s * 7 + q * 3 + i) % len(WORDS)] for i in range(6)]
            qid, acc, other = pid, pid + 1, pid + 2
            rows += [question(qid, f"How do I {w[0]} the {w[1]}?", f"<p>My {w[2]} and {w[3]} keep failing.</p>",
                              accepted=acc),
                     answer(acc, qid, f"<p>Use the {w[1]} with less {w[2]}, then {w[4]}.</p>", score=3),
                     answer(other, qid, f"<p>Maybe {w[3]} or {w[5]} helps.</p>")]
            pid += 3
        (root / f"site{s}").mkdir(parents=True)
        write_posts(root / f"site{s}" / "Posts.xml", rows)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_dir):
    d = tmp_path_factory.mktemp("recipe")
    return tiny_dir(d / "model", smol_dir), make_sites(d / "sites")


def tiny_sets(model: Path, sites: Path, grpo_steps=2) -> list[str]:
    sets = {"model": str(model), "sites_dir": str(sites), "eval_sites": ["site2"],
            "data.max_docs": 2, "data.negatives": 1, "data.val_fraction": 0.3,
            "sft.max_steps": 3, "sft.batch_size": 4, "sft.save_every": 1, "sft.val_limit": 4,
            "sft.val_max_new_tokens": 4,
            "grpo.max_steps": grpo_steps, "grpo.prompts_per_step": 2, "grpo.group_size": 2, "grpo.max_new_tokens": 8,
            "grpo.save_every": 1, "grpo.val_limit": 4, "grpo.lora_r": 4,
            "eval.k": [3, 5], "eval.fuse": "linear:0.5", "eval.batch_size": 4}
    out = []
    for k, v in sets.items():
        out += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return out


def test_eval_task_from_a_dump(tmp_path):
    root = make_sites(tmp_path, n_sites=1, n_q=3)
    queries, docs, qrels = eval_task(root / "site0" / "Posts.xml")
    assert list(queries) == ["1", "4", "7"] and len(docs) == 6
    assert qrels["4"] == {"answer:5": 2, "answer:6": 1}
    assert queries["1"].startswith("How do I")
    # the recipe's validation task: only the questions `train.py data` put in val.jsonl, first stage over all answers
    from minirank.datagen import is_val
    s = recipe.resolve("cpu-small", [f"sites_dir={root}", "eval_sites=[]", "data.val_fraction=0.5", "eval.k=[2]"])
    q, d, r, run, _ = recipe.site_task(s, "site0", tmp_path / "t", val=True)
    assert set(q) == {x for x in queries if is_val(x, 0.5)} and d == docs and all(len(run[x]) == 2 for x in q)
    assert (tmp_path / "t" / "bm25.trec").is_file() and (tmp_path / "t" / "qrels.txt").is_file()


def test_presets_resolve_and_list(capsys):
    assert recipe.main(["--preset", "list"]) == 0
    shown = capsys.readouterr().out
    assert "cpu-small" in shown and "interank-3b" in shown
    s = recipe.resolve("cpu-small", ["sft.lr=3e-4", "eval.fuse=rrf", "eval.k=[10,30]"])
    assert s["sft"]["lr"] == 3e-4 and s["eval"]["fuse"] == "rrf" and s["eval"]["k"] == [10, 30]
    assert recipe.PRESETS["cpu-small"]["sft"]["lr"] != 3e-4  # the preset itself is untouched
    for bad, msg in ((["sft"], "KEY=VALUE"), (["nope=1"], "no such setting"), (["lr.x=1"], "not a section")):
        with pytest.raises(recipe.UsageError, match=msg):
            recipe.resolve("cpu-small", bad)
    with pytest.raises(recipe.UsageError, match="unknown preset"):
        recipe.resolve("gpu-huge", [])


def test_interank_3b_dry_run_prints_every_stage(tmp_path, capsys):
    assert recipe.main(["--preset", "interank-3b", "--out", str(tmp_path / "r")]) == 2
    assert "needs --set data.teacher_url" in capsys.readouterr().err
    argv = ["--preset", "interank-3b", "--out", str(tmp_path / "r"), "--dry-run",
            "--set", "data.teacher_url=http://127.0.0.1:9/v1", "--set", "data.teacher_model=teacher"]
    assert recipe.main(argv) == 0
    cmds = capsys.readouterr().out.splitlines()
    data = [c for c in cmds if c.startswith("python train.py data")]
    assert len(data) == 5 and all("--documents web" in c and "--teacher-url http://127.0.0.1:9/v1" in c for c in data)
    sft = next(c for c in cmds if c.startswith("python train.py sft"))
    assert "--lora interank --lora-r 64 --lora-alpha 16 --lr 0.0002" in sft and "--format explain" in sft
    assert any(c.startswith("python train.py grpo") and "--adapter" in c for c in cmds)
    assert any(c.startswith("python train.py sft") and "--format label" in c and "/sft-label" in c for c in cmds)
    rr = [c for c in cmds if c.startswith("python rerank.py")]
    # (2 held-out sites + 7 BRIGHT StackExchange domains) x (base, sft, sft-label, grpo)
    assert len(rr) == (2 + 7) * 4 and sum("--bright biology" in c for c in rr) == 4
    assert not (tmp_path / "r").exists()  # a dry run writes nothing
    # cpu-small cuts GRPO's and the evaluation's prompts as SFT cut its own (max_len 384 less the label line)
    assert recipe.main(["--preset", "cpu-small", "--out", str(tmp_path / "c"), "--dry-run"]) == 0
    cmds = capsys.readouterr().out.splitlines()
    assert "--max-len 384" in next(c for c in cmds if c.startswith("python train.py sft"))
    assert "--max-prompt-len 376" in next(c for c in cmds if c.startswith("python train.py grpo"))
    rr = [c for c in cmds if c.startswith("python rerank.py")]
    assert len(rr) == 2 * 3 and all("--max-prompt-len 376" in c for c in rr)


def test_pairs_file_errors_name_the_row(tmp_path, tiny, capsys):
    model, sites = tiny
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"query": "q", "document": "d", "label": 2}\n{"query": "q", "document": "d", "label": 7}\n')
    code = recipe.main(["--preset", "cpu-small", "--out", str(tmp_path / "r"), "--pairs", str(bad),
                        *tiny_sets(model, sites)])
    assert code == 2 and "pairs.jsonl: row 2: field 'label' must be one of (0, 1, 2), got 7" in capsys.readouterr().err


def _recipe(out: Path, sets: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "recipe", "--preset", "cpu-small",
                             "--out", str(out), *sets], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _kill_when(p: subprocess.Popen, ready, timeout=300):
    t = time.time()
    while p.poll() is None and not ready() and time.time() - t < timeout:
        time.sleep(0.02)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    return p.wait()


def test_tiny_recipe_killed_in_each_stage_reruns_to_the_same_report(tmp_path, tiny):
    model, sites = tiny
    sets = tiny_sets(model, sites)
    whole = _recipe(tmp_path / "whole", sets)
    log = whole.communicate()[0]
    assert whole.returncode == 0, log
    for stage in ("[data]", "[sft]", "[grpo]", "[eval]"):
        assert sum(line.startswith(stage) for line in log.splitlines()) == 1, log
    rep = json.loads((tmp_path / "whole" / "report.json").read_text())
    res = rep["results"]["site2"]
    assert set(res) == {"top3", "top5"}
    assert [n for n in res["top5"] if n != "unparsed"][:4] == ["first stage", "base", "base + fusion", "sft"]
    assert {"grpo", "grpo + fusion"} <= set(res["top5"]) and set(res["top5"]["unparsed"]) == {"base", "sft", "grpo"}
    assert (tmp_path / "whole" / "final" / "config.json").is_file() and (tmp_path / "whole" / "report.png").is_file()
    assert (tmp_path / "whole" / "report.md").read_text().count("| first stage |") == 3  # top3, top5, the mean
    assert json.loads((tmp_path / "whole" / "recipe.json").read_text())["format"] == "label"

    # SIGKILL inside each stage in turn, then rerun to the end
    out = tmp_path / "killed"
    markers = [lambda: any((out / "data").glob("*/pairs.jsonl")),
               lambda: (out / "sft" / "checkpoints" / "step-1").is_dir(),
               lambda: (out / "grpo" / "checkpoints" / "step-1").is_dir(),
               lambda: any(p.stat().st_size for p in (out / "eval").glob("*/*/judgements.jsonl"))]
    for ready in markers:
        assert _kill_when(_recipe(out, sets), ready) == -signal.SIGKILL  # killed inside that stage
    rerun = _recipe(out, sets)
    log = rerun.communicate()[0]
    assert rerun.returncode == 0, log
    assert json.loads((out / "report.json").read_text())["results"] == rep["results"]

    # a finished recipe reruns in seconds: every stage is skipped
    again = _recipe(out, sets)
    log = again.communicate()[0]
    assert again.returncode == 0 and "[sft] done before" in log and "[grpo] done before" in log

    # another setting for a finished recipe's directory is refused, naming it
    other = _recipe(out, sets + ["--set", "sft.lr=1e-3"])
    log = other.communicate()[0]
    assert other.returncode == 2 and "sft" in log and "lr" in log
