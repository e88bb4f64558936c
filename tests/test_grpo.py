"""GRPO: the objective against a hand computation, sampler = trainer log-probs (SmolLM2 and a padded-vocab
Qwen2-style model), the LoRA reference without a second model, rewards, DDP (2 gloo ranks = 1 process),
and the train.py grpo CLI."""

import json
import math

import conftest
import pytest
import torch

from minirank import prompts as P
from minirank.generate import generate
from minirank.grpo import (GRPOConfig, Group, Sample, clipped_objective, exact_reward, format_reward,
                           group_advantages, group_logprobs, grpo_update, length_reward, loss_weights,
                           resolve_rewards, score_group)
from minirank.model import ModelConfig, Transformer
from minirank.training import UsageError

# ----------------------------------------------------------------------------------------------
# the objective vs a hand computation (plain Python floats, the clipping cases spelled out)

EL, EH = 0.2, 0.28
# rows: A > 0 with ratios inside / above 1+eh (clipped, no gradient) / below 1-el (not clipped);
#       A < 0 with ratios inside / below 1-el (clipped) / above 1+eh (not clipped);
#       a truncated row (masked) and padding
LOGP = [[-1.0, -2.0, -0.5, -1.5],
        [-0.7, -3.0, -1.1, -0.2],
        [-2.0, -0.4, -0.9, -1.3]]
RATIO = [[1.05, 1.5, 0.625, 0.905],   # A > 0: inside, clipped high, below 1 - el (unclipped); pad
         [0.9, 0.6, 1.4, 1.05],       # A < 0: inside, clipped low, above 1 + eh (unclipped), inside
         [1.1, 0.7, 1.35, 1.0]]       # masked row
OLD = [[lp - math.log(r) for lp, r in zip(a, b)] for a, b in zip(LOGP, RATIO)]
REF = [[-1.2, -1.9, -0.4, -1.6], [-0.6, -2.8, -1.3, -0.1], [-2.2, -0.5, -1.0, -1.1]]
ADV = [0.8, -1.3, 0.5]
MASK = [[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]]  # row 0: 3 tokens + pad; row 2: truncated, masked
MAXLEN = 6


def hand_weights(agg):
    n_tok = sum(map(sum, MASK))
    rows = [r for r in MASK if sum(r)]
    w = []
    for r in MASK:
        if agg == "token":
            w.append([m / n_tok for m in r])
        elif agg == "sequence":
            w.append([m / (max(sum(r), 1) * len(rows)) for m in r])
        else:
            w.append([m / (len(MASK) * MAXLEN) for m in r])
    return w


def hand_loss_and_grad(agg, beta):
    W = hand_weights(agg)
    loss, grad = 0.0, [[0.0] * 4 for _ in range(3)]
    for i in range(3):
        A = ADV[i]
        for t in range(4):
            r = math.exp(LOGP[i][t] - OLD[i][t])
            # which branch the pessimistic min takes, by case (not by calling min)
            if A > 0:
                clipped_branch = r > 1 + EH
                obj = (1 + EH) * A if clipped_branch else r * A
            else:
                clipped_branch = r < 1 - EL
                obj = (1 - EL) * A if clipped_branch else r * A
            l = -obj
            g = 0.0 if clipped_branch else -r * A  # d(-r A)/d logp = -r A
            if beta:
                d = REF[i][t] - LOGP[i][t]
                l += beta * (math.exp(d) - d - 1)
                g += beta * (-math.exp(d) + 1)
            loss += l * W[i][t]
            grad[i][t] = g * W[i][t]
    return loss, grad


def test_ratios_cover_every_clipping_case():
    r = [[math.exp(a - b) for a, b in zip(x, y)] for x, y in zip(LOGP, OLD)]
    assert 1 - EL < r[0][0] < 1 + EH and r[0][1] > 1 + EH and r[0][2] < 1 - EL  # A > 0
    assert 1 - EL < r[1][0] < 1 + EH and r[1][1] < 1 - EL and r[1][2] > 1 + EH  # A < 0


@pytest.mark.parametrize("agg", ["token", "sequence", "constant"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_objective_equals_hand_computation(agg, beta):
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    w = loss_weights(torch.tensor(MASK), agg, MAXLEN).double()
    loss, st = clipped_objective(logp, torch.tensor(OLD, dtype=torch.float64), torch.tensor(ADV, dtype=torch.float64),
                                 w, EL, EH, beta, torch.tensor(REF, dtype=torch.float64))
    loss.backward()
    want, want_grad = hand_loss_and_grad(agg, beta)
    assert abs(loss.item() - want) <= 1e-6
    assert (logp.grad - torch.tensor(want_grad, dtype=torch.float64)).abs().max().item() <= 1e-6
    # the masked (truncated) row gets no gradient at all; padding neither
    assert logp.grad[2].abs().max() == 0 and logp.grad[0, 3] == 0
    # clip fractions over the 7 loss tokens: one low-clipped (row 1), one high-clipped (row 0)
    assert st["clip_low"].item() == pytest.approx(1 / 7) and st["clip_high"].item() == pytest.approx(1 / 7)
    assert ("kl" in st) == (beta > 0)


def test_loss_weights_split_into_microbatches_and_ranks():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    mask[4] = 0
    halves = [mask[:3], mask[3:]]
    for agg, total in (("token", 1.0), ("sequence", 1.0), ("constant", mask.sum().item() / 48)):
        w = loss_weights(mask, agg, 8)
        assert w.sum().item() == pytest.approx(total)

        def reduce(x, agg=agg):  # what an all-reduce over two ranks holding 3 rows each returns
            return sum(_count(h, agg) for h in halves)
        parts = torch.cat([loss_weights(h, agg, 8, reduce=reduce) for h in halves])
        assert torch.allclose(parts, w, atol=0, rtol=1e-6)


def _count(m, agg):
    return m.sum() if agg == "token" else (m.sum(1) > 0).float().sum() if agg == "sequence" else torch.tensor(3.0)


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.5, 0.0, 1.0], [0.2, 0.2, 0.2, 0.2]])
    mean0, sd0 = 2.5 / 4, math.sqrt(sum((x - 0.625) ** 2 for x in [1, 0.5, 0, 1]) / 3)
    a = group_advantages(r, "none")
    assert a[0].tolist() == pytest.approx([x - mean0 for x in [1, 0.5, 0, 1]]) and a[1].abs().max() == 0
    a = group_advantages(r, "group")
    assert a[0].tolist() == pytest.approx([(x - mean0) / (sd0 + 1e-4) for x in [1, 0.5, 0, 1]])
    assert a[1].abs().max() == 0  # zero-signal group: no advantage, no NaN
    sd = torch.tensor([1, 0.5, 0, 1, .2, .2, .2, .2]).std().item()
    assert group_advantages(r, "batch")[0].tolist() == pytest.approx([(x - mean0) / (sd + 1e-4) for x in [1, .5, 0, 1]])


# ----------------------------------------------------------------------------------------------
# rewards


def cfg_(**kw):
    return GRPOConfig(**{"model": "m", "data": "x", "out": "y", **kw})


def test_draw_is_an_endless_stream_reshuffled_each_epoch_or_in_file_order():
    from minirank import grpo
    recs = [{"i": i} for i in range(5)]
    assert [r["i"] for r in grpo.draw(recs, 3, 6, seed=0, shuffle=False)] == [3, 4, 0, 1, 2, 3]
    s = [r["i"] for r in grpo.draw(recs, 0, 10, seed=0)]
    assert sorted(s[:5]) == sorted(s[5:]) == list(range(5))  # each epoch a permutation...
    assert s[:5] != s[5:] and s[:5] != list(range(5))  # ...a fresh one, not the file order
    assert [r["i"] for r in grpo.draw(recs, 7, 3, seed=0)] == s[7:10]  # position, not call history (resume)
    assert [[r["i"] for r in grpo.rank_shard(recs, rank, 2, k=2)] for rank in (0, 1)] == [[0, 1, 4], [2, 3]]


def test_rewards_components_and_swapping():
    cfg = cfg_(max_new_tokens=20, reward_partial=0.25)
    rec = {"query": "q", "document": "d", "label": 2}
    ok = Sample("It helps.\n\nRelevance Label: 2 ##", list(range(10)), "stop", rec)
    off = Sample("Relevance Label: 1 ##", [1] * 5, "stop", rec)
    far = Sample("Relevance Label: 0 ##", [1] * 5, "stop", rec)
    cut = Sample("Relevance Label: 2", [1] * 20, "length", rec)
    junk = Sample("no idea", [1] * 3, "stop", rec)
    assert [exact_reward(s, cfg) for s in (ok, off, far, cut, junk)] == [1.0, 0.25, 0.0, 1.0, 0.0]
    assert [format_reward(s, cfg) for s in (ok, off, cut, junk)] == [0.2, 0.2, 0.0, 0.0]
    assert length_reward(ok, cfg) == pytest.approx(-0.1 * 10 / 20)
    fns = resolve_rewards("exact, format,tests.test_grpo.always_one")
    assert list(fns) == ["exact", "format", "tests.test_grpo.always_one"]
    g = Group(rec, [1], [ok.tokens, cut.tokens], [[0.0] * 10, [0.0] * 20], [ok.text, cut.text], ["stop", "length"])
    score_group(g, fns, cfg_(overlong="penalty", overlong_penalty=0.5))
    assert g.rewards.tolist() == pytest.approx([2.2, 1.5]) and g.components["overlong"].tolist() == [0, -0.5]
    for bad in ("nope", "math.nope", "json"):
        with pytest.raises(UsageError, match="--reward"):
            resolve_rewards(bad)


def always_one(sample, cfg):
    return 1.0


# ----------------------------------------------------------------------------------------------
# sampler = trainer


def tiny_qwen(vocab=64, n_tokens=54, seed=0):
    """A random Qwen2-shaped model whose embedding has more rows than the tokenizer has tokens."""
    hf = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=vocab, hidden_size=64,
              intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(hf))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3 if p.dim() > 1 else 0.02)
    with torch.no_grad():
        model.model.embed_tokens.weight[n_tokens:] *= 40  # padded rows that would win every argmax if seen
    model.n_tokens = n_tokens
    return model.eval()


def full_forward_logprobs(model, prompt, completion):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion]))[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def test_sampler_equals_trainer_padded_vocab_and_shared_prompt_gradient():
    model = tiny_qwen()
    prompts = [[3, 9, 14, 2, 40, 7], [5, 1]]
    out = generate(model, prompts, n=4, temperature=1.0, max_new_tokens=7, stop_ids=[11], seed=3, batch_size=3)
    assert max(max(t) for t in out.tokens) < model.n_tokens
    assert len({len(t) for t in out.tokens}) > 1  # ragged: padding exercised
    for pi, p in enumerate(prompts):
        comps = out.tokens[pi * 4:(pi + 1) * 4]
        lp, valid = group_logprobs(model, p, comps)
        for i, c in enumerate(comps):
            assert valid[i].sum() == len(c)
            assert (lp[i, :len(c)] - torch.tensor(out.logprobs[pi * 4 + i])).abs().max() <= 1e-4
            assert (lp[i, :len(c)] - full_forward_logprobs(model, p, c)).abs().max() <= 1e-4
    # the shared-prompt pass has the gradient of G separate full passes
    comps = out.tokens[:4]
    w = torch.randn(4, max(map(len, comps)))
    model.zero_grad()
    lp, valid = group_logprobs(model, prompts[0], comps)
    (lp * w * valid).sum().backward()
    g_shared = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for i, c in enumerate(comps):
        logits = model(torch.tensor([prompts[0] + c]))[0, len(prompts[0]) - 1:-1].float()
        (torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0] * w[i, :len(c)]).sum().backward()
    for a, p in zip(g_shared, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def smol(smol_dir):
    import minirank
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tok = minirank.load(smol_dir)
    return model.eval(), tok


RECS = [{"query": "How long do roasted coffee beans stay fresh?",
         "document": "Whole beans keep their flavour for two to four weeks after roasting if stored airtight.",
         "label": 2},
        {"query": "Can I brew espresso with a French press?",
         "document": "The Tour de France is a cycling race held every July.", "label": 0}]


def mu1_update(model, groups, cfg):
    """One update with lr 0 (measure, do not move): its stats, and that the weights did not change."""
    for g in groups:  # signal in every group, so the update touches every row
        g.rewards = torch.arange(len(g.completions), dtype=torch.float32) % 3
    params = [p for p in model.parameters()]
    snapshot = [p.detach().clone() for p in params]
    st = grpo_update(model, groups, torch.optim.SGD(params, lr=0.0), params, cfg)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, params))
    assert st["grad_norm"] > 0  # the loss is ~0 at mu = 1, its gradient is not
    return st


def test_smollm2_sampler_equals_trainer_and_mu1_ratios_are_one(smol):
    from minirank.grpo import rollout
    model, tok = smol
    cfg = cfg_(format="label", group_size=4, max_new_tokens=8, rollout_batch=4)
    groups = rollout(model, tok, RECS[:1], cfg, resolve_rewards("exact,format"), seed=5)
    g = groups[0]
    with torch.no_grad():
        lp, valid = group_logprobs(model, g.prompt, g.completions)
    for i, c in enumerate(g.completions):
        assert (lp[i, :len(c)] - torch.tensor(g.sampler_logprobs[i])).abs().max() <= 1e-4
    st = mu1_update(model, groups, cfg)  # pi_old = the sampler's out.logprobs
    assert st["clip_low"] == 0 and st["clip_high"] == 0
    assert st["logprob_gap"] <= 1e-4 and abs(st["ratio_mean"] - 1) <= 1e-4


def test_temperature_scores_with_the_tempered_distribution_on_both_sides():
    """T != 1: the sampler draws from softmax(logits / T); pi_old (the sampler's log-probs) and the trainer's
    pi_theta must both be that distribution (TRL's choice), so at mu = 1 the ratio is 1 again."""
    model = tiny_qwen()
    cfg = cfg_(group_size=4, max_new_tokens=6, temperature=0.6, overlong="keep")
    prompt = [3, 9, 14, 2]
    out = generate(model, [prompt], n=4, temperature=0.6, max_new_tokens=6, stop_ids=[11], seed=2)
    g = Group({"label": 0}, prompt, out.tokens, out.sample_logprobs, [""] * 4, out.finish_reasons)
    lp, valid = group_logprobs(model, prompt, g.completions, temperature=0.6)
    for i, c in enumerate(g.completions):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + c]))[0, len(prompt) - 1:-1].float() / 0.6
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
        assert (lp[i, :len(c)] - want).abs().max() <= 1e-4
        assert (torch.tensor(g.sampler_logprobs[i]) - want).abs().max() <= 1e-4
    st = mu1_update(model, [g], cfg)
    assert abs(st["ratio_mean"] - 1) <= 1e-4 and st["logprob_gap"] <= 1e-4


# ----------------------------------------------------------------------------------------------
# LoRA: the reference policy without a second model


def test_adapter_off_is_the_base_model_bit_for_bit():
    import copy
    from minirank import lora
    model = tiny_qwen()
    base = copy.deepcopy(model)
    lora.add_lora(model, lora.LoRAConfig(4, 8.0, 0.0, ("q_proj", "v_proj", "gate_proj", "down_proj")), seed=0)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.normal_(std=0.5)  # a trained-looking adapter that changes the policy
    prompt, comps = [3, 9, 14, 2, 40, 7], [[5, 6, 7], [8], [1, 2, 3, 4, 9]]
    want, _ = group_logprobs(base, prompt, comps)
    with lora.lora_disabled(model):
        off, _ = group_logprobs(model, prompt, comps)
    on, _ = group_logprobs(model, prompt, comps)
    assert torch.equal(off, want)  # bit-identical
    assert (on - want).abs().max() > 1e-3  # and the adapter does change the policy


def tiny_dir(out, smol_dir, hidden=64, layers=2):
    return conftest.tiny_dir(out, smol_dir, hidden, layers, std=0.05)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_dir):
    return tiny_dir(tmp_path_factory.mktemp("tiny"), smol_dir)


def test_from_sft_adapter_the_reference_is_that_adapter(tiny, tmp_path):
    import minirank
    from minirank import lora, training
    # an "SFT adapter": random B, saved in peft's layout
    sft_model, tok = minirank.load(tiny)
    lora.add_lora(sft_model, lora.PRESETS["interank"], seed=1)
    with torch.no_grad():
        for m in lora.lora_modules(sft_model).values():
            m.lora_B.normal_(std=0.3)
    lora.save_adapter(sft_model, tmp_path / "sft" / "adapter", str(tiny))
    base, _ = minirank.load(tiny)
    prompt = P.prompt_ids(tok, "espresso grind?", "fine, like table salt", "label")
    comps = [[100, 200, 300], [7, 8], [4000]]
    sft_lp, _ = group_logprobs(sft_model, prompt, comps)
    base_lp, _ = group_logprobs(base, prompt, comps)
    assert (sft_lp - base_lp).abs().max() > 1e-2  # the SFT adapter matters

    cfg = cfg_(model=str(tiny), adapter=str(tmp_path / "sft" / "adapter"), lora_r=4, beta=0.1, format="label",
               group_size=3)
    model, _, _, _ = training.load_model(cfg, torch.device("cpu"), cfg.adapter)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(lora.lora_modules(model)) == 2 * 7  # only the fresh adapter (all linear layers of 2 blocks)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.normal_(std=0.3)  # as if GRPO had trained it
    with lora.lora_disabled(model):
        ref, _ = group_logprobs(model, prompt, comps)
    pol, _ = group_logprobs(model, prompt, comps)
    assert (ref - sft_lp).abs().max() <= 1e-5  # adapter off = the SFT policy (merged weights: fp32 rounding only)
    assert (pol - sft_lp).abs().max() > 1e-2
    # and the update's KL is measured against it: > 0 now, exactly 0 with the fresh adapter still at B = 0
    g = Group({"label": 2}, prompt, comps, [[0.0] * len(c) for c in comps], ["", "", ""], ["stop"] * 3,
              rewards=torch.tensor([1.0, 0.0, 0.5]))
    opt = torch.optim.SGD(params, lr=0.0)
    assert grpo_update(model, [g], opt, params, cfg)["kl"] > 1e-4
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.zero_()
    assert grpo_update(model, [g], opt, params, cfg)["kl"] == 0


# ----------------------------------------------------------------------------------------------
# train.py grpo: bad input, and a SIGKILL mid-run resumes to the same curve

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_bad_input_is_one_line_exit_2(tiny, tmp_path, capsys):
    from minirank import grpo
    good = write_jsonl(tmp_path / "ok.jsonl", RECS)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECS[0]) + "\n" + json.dumps({**RECS[1], "label": 3}) + "\n")
    for args, msg in ((["--data", tmp_path / "nope.jsonl"], "data file not found: " + str(tmp_path / "nope.jsonl")),
                      (["--data", bad], "bad.jsonl:2: field 'label' must be one of [0, 1, 2], got 3"),
                      (["--data", good, "--reward", "exact,nonsense"], "--reward 'nonsense'"),
                      (["--data", good, "--lora", "none", "--beta", "0.1"], "--beta > 0 needs LoRA"),
                      (["--data", good, "--lora", "none", "--lora-r", "4"], "conflicts with --lora-r"),
                      (["--data", good, "--temperature", "0"], "--temperature 0.0: must be > 0"),
                      (["--data", good, "--loss-agg", "mean"], "invalid choice: 'mean'"),
                      (["--data", good, "--group-size", "1"], "--group-size must be >= 2")):
        assert grpo.main(["--model", tiny, "--out", tmp_path / "o", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("train.py grpo: ") and msg in err and "\n" not in err, err
        assert not (tmp_path / "o").exists()


def parity_reward_module(tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "def even(sample, cfg):\n    return sum(t % 2 == 0 for t in sample.tokens) / max(len(sample.tokens), 1)\n")
    return "my_rewards.even"


def test_sigkill_then_resume_gives_the_same_run(tiny, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from safetensors.torch import load_file
    data = write_jsonl(tmp_path / "d.jsonl", RECS * 3)
    args = ["--model", tiny, "--data", data, "--format", "label", "--group-size", "4", "--prompts-per-step", "2",
            "--max-new-tokens", "6", "--max-steps", "6", "--save-every", "2", "--lr", "1e-2", "--lora-r", "4",
            "--reward", f"{parity_reward_module(tmp_path)},format", "--overlong", "keep", "--seed", "3"]
    cmd = lambda out: [sys.executable, str(ROOT / "train.py"), "grpo", *map(str, args), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(cmd(tmp_path / "ref"), env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = subprocess.Popen(cmd(tmp_path / "cut"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "final").exists()
    again = subprocess.run(cmd(tmp_path / "cut"), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout

    def curve(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["reward_mean"], r["grad_norm"], r["loss"]) for r in rows if "reward_mean" in r]
    assert curve("cut") == curve("ref") and len(curve("ref")) == 6
    assert any(c[2] > 0 for c in curve("ref"))  # it really trained
    a = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "ref" / "final" / "model.safetensors").is_file()


def test_bf16_full_fine_tuning_keeps_fp32_master_weights(tiny):
    """--lora none --dtype bfloat16: the weights the optimizer updates are fp32 (the trainer computes under
    bf16 autocast); in bf16 weights most small updates round away (measured: 29% of entries moved)."""
    import minirank
    from minirank import grpo, training
    cfg = cfg_(model=str(tiny), lora="none", dtype="bfloat16", format="label", group_size=4, max_new_tokens=4,
               lr=1e-5)
    model, tok, amp, _ = training.load_model(cfg, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    groups = grpo.rollout(model, tok, RECS, cfg, {"parity": lambda s, c: float(sum(s.tokens) % 2)}, seed=1)
    for g in groups:
        g.rewards = torch.arange(4.0)
    before = [p.detach().clone() for p in params]
    opt = training.make_optimizer(model.named_parameters(), cfg.lr)
    grpo.grpo_update(model, groups, opt, params, cfg, amp=amp)
    moved = [(p != b) for p, b in zip(params, before) if p.grad is not None and p.grad.abs().sum() > 0 and p.ndim > 1]
    assert sum(int(m.sum()) for m in moved) / sum(m.numel() for m in moved) > 0.9
    base, _ = minirank.load(tiny)
    assert all(p.dtype == torch.float32 for p in base.parameters())


def test_throughput_counts_each_update_once(tiny, tmp_path, monkeypatch):
    """mu = 2: the trainer sees each completion token twice, and train_tok_s says exactly that (it once
    multiplied an already mu-fold count by mu again)."""
    from minirank import grpo
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_jsonl(tmp_path / "d.jsonl", RECS * 2)
    assert grpo.main(["--model", tiny, "--data", data, "--out", tmp_path / "o", "--format", "label", "--group-size", 4,
                      "--prompts-per-step", 2, "--max-new-tokens", 4, "--max-steps", 2, "--updates-per-rollout", 2,
                      "--reward", f"{parity_reward_module(tmp_path)}", "--no-eval-first", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        sampled = r["sample_tok_s"] * r["sample_s"]
        assert r["trained_tokens"] <= 2 * sampled + 1e-6
        assert r["train_tok_s"] * r["train_s"] == pytest.approx(r["trained_tokens"])
    assert any(r["trained_tokens"] > 0 for r in rows)


def test_eval_rerank_scores_the_demo_set_with_the_trained_format(tiny, tmp_path):
    """--eval-rerank: rerank.py's inputs, reranked with the current policy, scored by minirank.metrics."""
    import minirank
    from minirank import grpo, metrics
    model, tok = minirank.load(tiny)
    rr = grpo.load_rerank_set("demo")
    assert set(rr) == {"queries", "docs", "run", "qrels"} and rr["qrels"]
    cfg = cfg_(format="label", max_new_tokens=3, eval_rerank_top_k=2, rollout_batch=4)
    m = grpo.evaluate_rerank(model, tok, rr, cfg, tmp_path / "j.jsonl")
    assert m["first_stage_ndcg10"] == metrics.evaluate(rr["run"], rr["qrels"], ["ndcg@10"])["ndcg@10"]
    assert 0 <= m["val_ndcg10"] <= 1
    judged = [json.loads(line) for line in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert len(judged) == len(rr["run"]) and all(len(j["judgements"]) == 2 for j in judged)
    with pytest.raises(UsageError, match="missing"):
        grpo.load_rerank_set(str(tmp_path))


def test_filter_groups_resamples_zero_signal_groups_with_bounded_retries(tiny):
    import minirank
    from minirank import grpo
    model, tok = minirank.load(tiny)
    dead = [{"query": f"q{i}", "document": "d", "label": 0} for i in range(3)]
    live = [{"query": f"q{i}", "document": "d", "label": 2} for i in range(3)]

    def rew(s, cfg):  # constant on "dead" records (no signal), token parity on "live" ones
        return 0.5 if s.record["label"] == 0 else sum(t % 2 for t in s.tokens) / len(s.tokens)
    fns = {"r": rew}
    cfg = cfg_(format="label", group_size=4, prompts_per_step=2, max_new_tokens=5, filter_groups=True,
               filter_max_tries=4)
    groups, pos, extra = grpo.sample_step(model, tok, dead + live, cfg, fns, step=0, pos=0, rank=0)
    assert len(groups) == 2 and all(g.informative for g in groups) and all(g.record["label"] == 2 for g in groups)
    assert extra["sampled_groups"] == pos > 2 and extra["zero_std_sampled"] > 0
    cfg.filter_max_tries = 0  # no retries: the informative part of one round (or the round itself if none)
    groups, pos, extra = grpo.sample_step(model, tok, dead * 2, cfg, fns, step=0, pos=0, rank=0)
    assert extra["sampling_rounds"] == 1 and pos == 2 and len(groups) == 2 and not any(g.informative for g in groups)


# ----------------------------------------------------------------------------------------------
# DDP: each rank updates on its own whole groups; the step equals one process holding every group

DDP_CASES = [dict(loss_agg=a, scale_rewards=s, mu=m) for a, s, m in
             (("token", "group", 1), ("sequence", "batch", 1), ("constant", "none", 1), ("token", "batch", 2))]


def _ddp_groups():
    """6 groups from a tiny model's real rollouts; every second group has equal rewards (no signal), so in
    the 2-rank split rank 1 holds groups 1, 3, 5 and only group 5 carries signal."""
    model = tiny_qwen(seed=3)
    prompts = [[3, 9, 14, 2], [5, 1, 7], [8, 8, 2, 4, 6], [2, 13], [4, 4, 4], [9, 3, 1, 12]]
    out = generate(model, prompts, n=4, temperature=1.0, max_new_tokens=6, stop_ids=[11], seed=5, batch_size=8)
    groups = []
    for i, p in enumerate(prompts):
        rows = slice(4 * i, 4 * i + 4)
        g = Group({"label": 2}, p, out.tokens[rows], out.logprobs[rows], [""] * 4, out.finish_reasons[rows])
        flat = i % 2 == 1 and i != 5
        g.rewards = torch.ones(4) if flat else torch.tensor([0.0, 1.0, 0.5, 1.0]) * (1 + i)
        groups.append(g)
    return model, groups


def _ddp_step(case, groups, rank=0, world=1):
    """One GRPO step (mu updates) on this rank's groups; the trained weights afterwards."""
    from minirank import training
    model = tiny_qwen(seed=3)
    model.train()
    cfg = cfg_(loss_agg=case["loss_agg"], scale_rewards=case["scale_rewards"], updates_per_rollout=case["mu"],
               max_new_tokens=6, group_size=4, overlong="mask")
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, eps=1.0)  # eps 1: the update carries the gradient's value
    hooks = {}
    if world > 1:
        def reduce(x):
            x = x.clone()
            torch.distributed.all_reduce(x)
            return x
        hooks = dict(reduce=reduce, all_reduce_grads=lambda: training.all_reduce_grads(params))
    grpo_update(model, groups[rank::world], opt, params, cfg, **hooks)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp_worker(rank, world, port, groups, out):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    results = [_ddp_step(case, groups, rank, world) for case in DDP_CASES]
    if rank == 0:
        torch.save(results, out)
    torch.distributed.barrier()  # no rank tears gloo down while the other still talks to it (SIGABRT seen)
    torch.distributed.destroy_process_group()


def test_ddp_two_ranks_equal_one_process_with_every_group(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the rollouts are made once, here, and handed to the ranks: sampled in each process, a different thread
    # count could round a logit differently and flip a sampled token, and the test would compare two batches
    model, groups = _ddp_groups()
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, groups, tmp_path / "ddp.pt"), nprocs=2)
    ddp = torch.load(tmp_path / "ddp.pt")
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for case, got in zip(DDP_CASES, ddp):
        want = _ddp_step(case, groups)
        moved = max((want[k] - start[k]).abs().max().item() for k in want)
        assert moved > 1e-4, case  # a real update
        assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6, case


def test_max_prompt_len_drops_records_whose_question_alone_is_longer(smol_dir):
    from minirank.grpo import fitting
    from minirank.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(smol_dir)
    short = {"query": "Why sour?", "document": "Grind finer. " * 200, "label": 2}
    long = {"query": "Why is my espresso sour? " * 40, "document": "Grind finer.", "label": 0}
    cap = len(P.prompt_ids(tok, short["query"], "", "label")) + 20
    cfg = cfg_(format="label", max_prompt_len=cap)
    said = []
    assert fitting([short, long], tok, cfg, "x.jsonl", said.append) == [short]
    assert said == [f"x.jsonl: 1 of 2 records dropped: their question alone is longer than --max-prompt-len {cap}"]
    assert fitting([short, long], tok, cfg_(format="label"), "x", said.append) == [short, long]
