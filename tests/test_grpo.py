"""GRPO: the objective against a hand computation, sampler = trainer log-probs (SmolLM2 and a padded-vocab
Qwen2-style model), the LoRA reference without a second model, rewards, and the train.py grpo CLI."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from minirank import prompts as P
from minirank.generate import generate
from minirank.grpo import (GRPOConfig, Group, Sample, clipped_objective, exact_reward, format_reward,
                           group_advantages, group_logprobs, grpo_update, length_reward, loss_weights,
                           resolve_rewards, score_group)
from minirank.model import ModelConfig, Transformer

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


def hand_loss_and_grad(agg, beta, isw):
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
            w_is = isw[i] if isw else 1.0
            l = -obj * w_is
            g = 0.0 if clipped_branch else -r * A * w_is  # d(-r A)/d logp = -r A
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
@pytest.mark.parametrize("isw", [None, [1.7, 0.6, 3.0]])
def test_objective_equals_hand_computation(agg, beta, isw):
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    w = loss_weights(torch.tensor(MASK), agg, MAXLEN).double()
    loss, st = clipped_objective(logp, torch.tensor(OLD, dtype=torch.float64), torch.tensor(ADV, dtype=torch.float64),
                                 w, EL, EH, beta, torch.tensor(REF, dtype=torch.float64),
                                 None if isw is None else torch.tensor(isw, dtype=torch.float64))
    loss.backward()
    want, want_grad = hand_loss_and_grad(agg, beta, isw)
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
    return GRPOConfig(**{"data": "x", "out": "y", **kw})


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
        with pytest.raises(ValueError, match="--reward"):
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


def test_smollm2_sampler_equals_trainer_and_mu1_ratios_are_one(smol):
    model, tok = smol
    cfg = cfg_(format="label", group_size=4, max_new_tokens=10, prompts_per_step=2, rollout_batch=8)
    from minirank.grpo import rollout
    groups = rollout(model, tok, RECS, cfg, resolve_rewards("exact,format"), seed=5)
    for g in groups:
        lp, valid = group_logprobs(model, g.prompt, g.completions)
        for i, c in enumerate(g.completions):
            assert (lp[i, :len(c)] - torch.tensor(g.sampler_logprobs[i])).abs().max() <= 1e-4
    # force signal into every group so the update touches every row
    for g in groups:
        g.rewards = torch.tensor([1.0, 0.0, 0.5, 0.0])
    params = [p for p in model.parameters()]
    snapshot = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.0)  # lr 0: measure, do not move the model
    for recompute in (False, True):
        cfg.recompute_old_logprobs = recompute
        st = grpo_update(model, groups, opt, params, cfg)
        assert st["clip_low"] == 0 and st["clip_high"] == 0
        assert st["logprob_gap"] <= 1e-4
        assert abs(st["ratio_mean"] - 1) <= (0 if recompute else 1e-4)  # trainer vs itself: exactly 1
        assert st["grad_norm"] > 0  # loss ~0, gradient not
    assert all(torch.equal(a, b) for a, b in zip(snapshot, params))
