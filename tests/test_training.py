"""training.py's shared pieces, against hand computation: flags from a dataclass, the lr schedule,
AdamW's groups and decoupled decay, atomic checkpoints with RNG states, run-dir settings, metrics."""

import json
import math
import random
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn

from minirank import training as T
from minirank.training import UsageError


@dataclass
class Cfg:
    model: str = field(metadata={"help": "the model"})
    lr: float = field(default=2e-4, metadata={"help": "peak lr"})
    steps: int = 10
    packing: bool = False
    val: str | None = None
    fmt: str = field(default="explain", metadata={"choices": ("explain", "label")})


def test_parse_config_flags_file_and_errors(tmp_path, capsys):
    c = T.parse_config(Cfg, ["--model", "m", "--lr", "1e-3", "--packing", "--fmt", "label"], "t")
    assert c == Cfg("m", 1e-3, 10, True, None, "label")
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"model": "from-file", "steps": 5, "packing": True, "val": "v.jsonl"}))
    c = T.parse_config(Cfg, ["--config", str(f), "--steps", "7", "--no-packing"], "t")
    assert c == Cfg("from-file", 2e-4, 7, False, "v.jsonl", "explain")  # CLI overrides the file
    with pytest.raises(SystemExit):
        T.parse_config(Cfg, ["--help"], "t")
    help_text = capsys.readouterr().out
    for part in ("--lr FLOAT", "peak lr (default: 0.0002)", "--packing, --no-packing", "(default: False)",
                 "--fmt {explain,label}", "the model (required)", "--steps INT"):
        assert part in help_text
    bad = [(["--lr", "1e-3"], "--model is required"), (["--model", "m", "--steps", "x"], "invalid int value"),
           (["--model", "m", "--fmt", "x"], "invalid choice"), (["--model", "m", "--nope"], "unrecognized"),
           (["--config", str(tmp_path / "no.json")], "no such file")]
    for argv, msg in bad:
        with pytest.raises(UsageError, match=msg):
            T.parse_config(Cfg, argv, "t")
    for content, msg in [({"model": "m", "bogus": 1}, "unknown option 'bogus'"), ({"model": "m", "steps": 1.5}, "invalid int"),
                         ({"model": "m", "packing": "yes"}, "expected true or false"), ({"model": "m", "fmt": "x"}, "not one of")]:
        f.write_text(json.dumps(content))
        with pytest.raises(UsageError, match=msg):
            T.parse_config(Cfg, ["--config", str(f)], "t")


def test_lr_schedule_by_hand():
    assert [T.lr_at(s, 1.0, 4, 100, "constant") for s in (0, 1, 3, 4, 99)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    # cosine from the end of warmup (step 2) to 0 at the last step (9)
    lrs = [T.lr_at(s, 2.0, 2, 10, "cosine") for s in range(10)]
    assert lrs[:3] == [1.0, 2.0, 2.0] and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert lrs[5] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 3 / 7)))
    assert T.lr_at(9, 1.0, 0, 10, "cosine", min_ratio=0.1) == pytest.approx(0.1)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(5, 3)
        self.proj = nn.Linear(3, 3)
        self.norm = nn.LayerNorm(3)


def test_adamw_groups_and_decoupled_decay():
    torch.manual_seed(0)
    m = Toy()
    opt = T.make_optimizer(m.named_parameters(), lr=0.1, weight_decay=0.5, betas=(0.9, 0.99), eps=1e-8)
    decay, rest = opt.param_groups
    assert [p.shape for p in decay["params"]] == [(3, 3)] and decay["weight_decay"] == 0.5
    assert len(rest["params"]) == 4 and rest["weight_decay"] == 0.0  # embedding, bias, norm weight+bias
    w0 = m.proj.weight.detach().clone()
    e0 = m.embed_tokens.weight.detach().clone()
    g = torch.randn(3, 3)
    m.proj.weight.grad = g
    opt.step()
    # step 1 by hand: w <- w(1 - lr·wd) - lr · m̂/(sqrt(v̂)+eps), with m̂ = g, v̂ = g²
    torch.testing.assert_close(m.proj.weight.detach(), w0 * (1 - 0.1 * 0.5) - 0.1 * g / (g.abs() + 1e-8))
    assert torch.equal(m.embed_tokens.weight, e0)  # no gradient, no decay: untouched


def test_checkpoint_roundtrip_is_exact_and_atomic(tmp_path):
    torch.manual_seed(0)
    m = Toy()
    opt = T.make_optimizer(m.named_parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(2):
        m.proj(m.embed_tokens(torch.tensor([1, 2]))).sum().backward()
        opt.step()
        opt.zero_grad()
    random.seed(3)
    torch.manual_seed(4)
    T.save_checkpoint(tmp_path, 2, m, opt, {"examples_seen": 32})
    expect_w = {k: v.clone() for k, v in m.state_dict().items()}
    expect_draws = (torch.rand(3), random.random())
    # a kill mid-write leaves a temp dir (and maybe a dir without state.json): never picked
    (tmp_path / "checkpoints" / ".tmp-step-3-999").mkdir()
    (tmp_path / "checkpoints" / "step-4").mkdir()
    assert T.latest_checkpoint(tmp_path).name == "step-2"

    m2 = Toy()
    opt2 = T.make_optimizer(m2.named_parameters(), lr=0.1, weight_decay=0.1)
    torch.manual_seed(99)
    state = T.load_checkpoint(T.latest_checkpoint(tmp_path), m2, opt2)
    assert state == {"step": 2, "examples_seen": 32}
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in expect_w.items())
    draws = (torch.rand(3), random.random())
    assert torch.equal(draws[0], expect_draws[0]) and draws[1] == expect_draws[1]
    # the next optimizer step is identical too (moments and step count restored)
    for mm, oo in ((m, opt), (m2, opt2)):
        mm.proj(mm.embed_tokens(torch.tensor([3]))).sum().backward()
        oo.step()
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m.state_dict().items())
    for s in (4, 6, 8):
        T.save_checkpoint(tmp_path, s, m, opt, {}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*") if (p / "state.json").exists()) == ["step-6", "step-8"]


def test_run_dir_settings(tmp_path):
    out = tmp_path / "run"
    T.prepare_out_dir(out, {"lr": 1e-4, "targets": ("q", "v")}, resume=False)
    T.prepare_out_dir(out, {"lr": 1e-4, "targets": ("q", "v")}, resume=True)  # same settings: resumable
    with pytest.raises(UsageError, match=r"other settings: lr differ \(lr: 0.0001 -> 0.001\)"):
        T.prepare_out_dir(out, {"lr": 1e-3, "targets": ("q", "v")}, resume=True)
    with pytest.raises(UsageError, match="holds no run"):
        T.prepare_out_dir(tmp_path / "new", {}, resume=True)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("")
    with pytest.raises(UsageError, match="not a training run"):
        T.prepare_out_dir(tmp_path / "junk", {}, resume=False)


def test_metrics_log_truncates_on_resume(tmp_path):
    log = T.MetricsLog(tmp_path)
    for s in (1, 2, 3, 4):
        log.log(s, loss=1.0 / s)
    log.log(4, val_loss=0.5)
    log.truncate_after(2)
    assert [r["step"] for r in log.read()] == [1, 2]
    T.MetricsLog(tmp_path, enabled=False).log(9, loss=0)
    assert len(log.read()) == 2
    pytest.importorskip("matplotlib")
    assert T.plot_curves(tmp_path).is_file()


def test_json_files_of_the_wrong_shape_are_one_line_errors(tmp_path):
    # valid JSON, wrong shape: a list where an object belongs must be named, not an AttributeError
    from minirank import lora

    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match=r"run\.json: expected .*got list"):
        T.prepare_out_dir(tmp_path, {"lr": 1e-3}, resume=False)
    (tmp_path / "adapter_config.json").write_text('"r=8"')
    with pytest.raises(ValueError, match=r"adapter_config\.json: expected .*got str"):
        lora.read_adapter_config(tmp_path)
    (tmp_path / "c.json").write_text("[]")
    with pytest.raises(UsageError, match=r"--config: .*c\.json: expected .*got list"):
        T.parse_config(Cfg, ["--config", str(tmp_path / "c.json")], prog="t")
