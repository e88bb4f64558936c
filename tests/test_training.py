"""training.py's shared pieces, against hand computation: flags from a dataclass, the shared options'
checks, the lr schedule, AdamW's groups and decoupled decay, atomic checkpoints with RNG states, the
run-dir guard (settings, data content, extending a run), provenance merging, metrics and curves."""

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from minirank import files
from minirank import training as T
from minirank.training import UsageError


@dataclass
class Cfg:
    model: str = field(metadata={"help": "the model"})
    lr: float = field(default=2e-4, metadata={"help": "peak lr"})
    steps: int = 10
    packing: bool = False
    val: str | None = None
    val_limit: int = 64
    fmt: str = field(default="explain", metadata={"choices": ("explain", "label")})


def test_parse_config_flags_file_and_errors(tmp_path, capsys):
    c = T.parse_config(Cfg, ["--model", "m", "--lr", "1e-3", "--packing", "--fmt", "label"], "t")
    assert c == Cfg("m", 1e-3, 10, True, None, 64, "label")
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"model": "from-file", "steps": 5, "packing": True, "val": "v.jsonl", "val_limit": 5}))
    c = T.parse_config(Cfg, ["--config", str(f), "--steps", "7", "--no-packing"], "t")
    assert c == Cfg("from-file", 2e-4, 7, False, "v.jsonl", 5, "explain")  # CLI overrides the file
    # an abbreviated flag is a flag given: it beats the file as the full spelling does
    assert T.parse_config(Cfg, ["--config", str(f), "--val-lim", "99"], "t").val_limit == 99
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
                         ({"model": "m", "packing": "yes"}, "expected true or false")]:
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


def test_shared_options_are_checked_when_built():
    """One LoRA interface: conflicting or meaningless flags are a usage error, in Python as on the CLI."""
    ok = dict(model="m", data="d", out="o")
    assert T.TrainConfig(**ok, lora_r=8).lora_config().r == 8
    assert T.TrainConfig(**ok, lora="none").lora_config() is None
    for kw, msg in [(dict(lora="none", lora_r=8), "--lora none .* conflicts with --lora-r"),
                    (dict(lora="none", lora_dropout=0.0, lora_targets="q_proj"), "--lora-dropout, --lora-targets"),
                    (dict(lora_r=0), "--lora-r 0: must be >= 1 .*--lora none"), (dict(dtype="fp32"), "--dtype"),
                    (dict(save_every=-1), "--save-every -1"), (dict(lr=0.0), "--lr")]:
        with pytest.raises(UsageError, match=msg):
            T.TrainConfig(**ok, **kw)


def _records(path, n=3):
    path.write_text("".join(json.dumps(dict(query=f"q{i}", document="d", label=i % 3)) + "\n" for i in range(n)))
    return [json.loads(line) for line in path.read_text().splitlines()]


def _begin(cfg, total, settings=None):
    m = Toy()
    opt = T.make_optimizer(m.named_parameters(), lr=0.1)
    r = T.open_run(cfg)
    records = [json.loads(line) for line in Path(cfg.data).read_text().splitlines()]
    T.begin(r, settings or {"lr": cfg.lr}, total, records, m, opt)
    return r, m, opt


def test_run_dir_guard_settings_data_and_extension(tmp_path, monkeypatch):
    from minirank import bright
    monkeypatch.setattr(bright, "data_overlap", lambda pairs, bright_dir=None: {"checked": False, "source": None, "overlap": {}})
    data = tmp_path / "d.jsonl"
    _records(data)
    cfg = lambda **kw: T.TrainConfig(**{"model": "m", "data": str(data), "out": str(tmp_path / "run"), **kw})  # noqa: E731
    r, m, opt = _begin(cfg(), 4)
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["total_steps"] == 4 and run_json["provenance"]["data"][0]["sha256"] == files.sha256_file(data)
    T.save_checkpoint(r.out, 4, m, opt, {})
    with pytest.raises(UsageError, match=r"other settings: lr differ \(lr: 0.0002 -> 0.001\)"):
        _begin(cfg(lr=1e-3), 4)
    r, _, _ = _begin(cfg(), 6)  # constant schedule: a finished run extends by raising the total
    assert (r.start, r.total) == (4, 6) and json.loads((r.out / "run.json").read_text())["total_steps"] == 6
    with pytest.raises(UsageError, match="checkpoint at step-4, past the 3 steps"):
        _begin(cfg(), 3)
    data.write_text(data.read_text().replace('"q0"', '"q9"'))  # same path and size, other content
    with pytest.raises(UsageError, match="files differ"):
        _begin(cfg(), 6)
    cos = cfg(schedule="cosine", out=str(tmp_path / "cos"))
    _begin(cos, 4, {"schedule": "cosine"})
    with pytest.raises(UsageError, match="cosine schedule, whose lr depends on the total"):
        _begin(cos, 5, {"schedule": "cosine"})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("")
    with pytest.raises(UsageError, match="not a training run"):
        T.open_run(cfg(out=str(tmp_path / "junk")))


def test_provenance_merges_stages_and_reads_the_data_settings(tmp_path):
    a = {"data": [{"path": "/a", "size": 1, "sha256": "x"}], "bright": {"checked": True, "source": "/b", "overlap": {"biology": 2}},
         "exclude_bright": True}
    b = {"data": [{"path": "/c", "size": 2, "sha256": "y"}, a["data"][0]],
         "bright": {"checked": False, "source": None, "overlap": {"biology": 1, "leetcode": 4}}, "exclude_bright": False}
    m = T.merge_provenance(a, b)
    assert m == {"data": [a["data"][0], b["data"][0]], "bright": {"checked": False, "source": "/b",
                 "overlap": {"biology": 3, "leetcode": 4}}, "exclude_bright": False}
    assert T.merge_provenance(a, {**b, "exclude_bright": None})["exclude_bright"] is None
    assert T._excluded_bright(tmp_path) is None
    (tmp_path / "settings.json").write_text(json.dumps({"exclude_bright": "/shared/bright"}))
    assert T._excluded_bright(tmp_path) is True
    (tmp_path / "settings.json").write_text(json.dumps({"exclude_bright": None}))
    assert T._excluded_bright(tmp_path) is False


def test_metrics_log_truncates_on_resume(tmp_path):
    log = T.MetricsLog(tmp_path)
    for s in (1, 2, 3, 4):
        log.log(s, loss=1.0 / s)
    log.log(4, val_loss=0.5)
    log.truncate_after(2)
    assert [r["step"] for r in log.read()] == [1, 2]
    log.truncate_after(0)  # killed before its first checkpoint: the rerun starts afresh
    assert log.read() == []
    for s in (1, 2):
        log.log(s, loss=1.0 / s)
    T.MetricsLog(tmp_path, enabled=False).log(9, loss=0)
    assert len(log.read()) == 2
    pytest.importorskip("matplotlib")
    log.log(2, val_accuracy=0.5)
    assert T.plot_curves(tmp_path, [("loss", ("loss", "val_loss")), ("validation", T.VALIDATION)]).is_file()


def test_curves_without_matplotlib_say_so_in_one_line(tmp_path, monkeypatch, capsys):
    import builtins
    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("matplotlib") else real(name, *a, **k))
    assert T.plot_curves(tmp_path, [("loss", ("loss",))]) is None
    out = capsys.readouterr().out.strip()
    assert "curves.png not drawn" in out and "minirank[plot]" in out and "\n" not in out


def test_json_files_of_the_wrong_shape_are_one_line_errors(tmp_path):
    # valid JSON, wrong shape: a list where an object belongs must be named, not an AttributeError
    from minirank import lora

    (tmp_path / "run.json").write_text("[1, 2]")
    (tmp_path / "d.jsonl").write_text(json.dumps(dict(query="q", document="d", label=1)) + "\n")
    with pytest.raises(UsageError, match=r"run\.json: expected .*got list"):
        _begin(T.TrainConfig(model="m", data=str(tmp_path / "d.jsonl"), out=str(tmp_path)), 1)
    (tmp_path / "adapter_config.json").write_text('"r=8"')
    with pytest.raises(ValueError, match=r"adapter_config\.json: expected .*got str"):
        lora.read_adapter_config(tmp_path)
    (tmp_path / "c.json").write_text("[]")
    with pytest.raises(UsageError, match=r"--config: .*c\.json: expected .*got list"):
        T.parse_config(Cfg, ["--config", str(tmp_path / "c.json")], prog="t")
