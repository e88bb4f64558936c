"""Safetensors files as untrusted input, and saves that never destroy the previous checkpoint.

The hostile files are written byte by byte (8-byte little-endian header length, JSON header, data),
so each one is exactly the malformation it names; the safetensors library is the reference for
what a well-formed file is."""

import json
import re
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import minirank.weights as mw
from minirank.model import ModelConfig, Transformer
from minirank.weights import CheckpointError, load_model, read_header, read_tensor, save_model

TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=32,
            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)


def st_file(path, header, data=b"", raw_header=None):
    """Write a safetensors file by hand: the header as given (a dict, or raw bytes), then data."""
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def f32(*shape_and_offsets):
    *shape, begin, end = shape_and_offsets
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


SIXTEEN = bytes(range(16))

HOSTILE = {  # id -> (header or raw header bytes, data, the error it must raise)
    "negative begin": ({"a": f32(1, -4, 0)}, SIXTEEN, r"tensor 'a'.*need 0 <= begin <= end"),
    "begin after end": ({"a": f32(0, 8, 4)}, SIXTEEN, r"tensor 'a'.*need 0 <= begin <= end"),
    "span vs shape": ({"a": f32(2, 0, 4)}, SIXTEEN, r"tensor 'a'.*span 4 bytes, but F32 \[2\] needs 8"),
    "span vs dtype": ({"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}, SIXTEEN,
                      r"tensor 'a'.*needs 4"),
    "past the data": ({"a": f32(1, 0, 4), "b": f32(4, 4, 20)}, SIXTEEN, r"truncated: tensor 'b'"),
    "overlap": ({"a": f32(2, 0, 8), "b": f32(2, 4, 12)}, SIXTEEN, r"tensor 'b' overlaps tensor 'a'"),
    "same bytes twice": ({"a": f32(2, 0, 8), "b": f32(2, 0, 8)}, SIXTEEN, r"overlaps"),
    "header a list": (None, b"", r"a JSON list, not an object", b"[]"),
    "header a string": (None, b"", r"a JSON str, not an object", b'"x"'),
    "header null": (None, b"", r"a JSON NoneType, not an object", b"null"),
    "not JSON": (None, b"", r"corrupt safetensors header", b"{not json"),
    "not UTF-8": (None, b"", r"corrupt safetensors header", b'{"\xff\xfe": 1}'),
    "duplicate name": (None, SIXTEEN, r"duplicate key 'a'",
                       b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
                       b' "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'),
    "entry a number": ({"a": 5}, SIXTEEN, r"tensor 'a': expected an object"),
    "entry a list": ({"a": [0, 4]}, SIXTEEN, r"tensor 'a': expected an object"),
    "no dtype": ({"a": {"shape": [1], "data_offsets": [0, 4]}}, SIXTEEN, r"tensor 'a'.*dtype None"),
    "unknown dtype": ({"a": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}}, SIXTEEN, r"tensor 'a'.*'F7'"),
    "dtype a number": ({"a": {"dtype": 4, "shape": [1], "data_offsets": [0, 4]}}, SIXTEEN, r"tensor 'a'.*dtype 4"),
    "no shape": ({"a": {"dtype": "F32", "data_offsets": [0, 4]}}, SIXTEEN, r"tensor 'a': shape"),
    "shape a dict": ({"a": {"dtype": "F32", "shape": {"n": 1}, "data_offsets": [0, 4]}}, SIXTEEN, r"'a': shape"),
    "negative dim": ({"a": f32(-1, 0, 4)}, SIXTEEN, r"tensor 'a': shape .*non-negative"),
    "float dim": ({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, SIXTEEN, r"'a': shape"),
    "bool dim": ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, SIXTEEN, r"'a': shape"),
    "no offsets": ({"a": {"dtype": "F32", "shape": [1]}}, SIXTEEN, r"tensor 'a': data_offsets"),
    "three offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, SIXTEEN, r"data_offsets"),
    "string offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, SIXTEEN, r"data_offsets"),
    "metadata a list": ({"__metadata__": ["x"], "a": f32(1, 0, 4)}, SIXTEEN, r"__metadata__"),
    "metadata not strings": ({"__metadata__": {"format": 1}}, b"", r"__metadata__"),
    "huge header length": (None, b"", r"header length \d+ bytes, limit", b"{}"),
    "header past the end": (None, b"", r"truncated or not a safetensors file", b"{}"),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_headers_raise_checkpoint_error_naming_the_file(case, tmp_path):
    header, data, message, *raw = HOSTILE[case]
    path = tmp_path / "evil.safetensors"
    st_file(path, header, data, raw[0] if raw else None)
    if case == "huge header length":  # claims 2**40 header bytes: never allocated nor read
        path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    if case == "header past the end":
        path.write_bytes(struct.pack("<Q", 100) + b"{}")
    with pytest.raises(CheckpointError, match=message) as e:
        read_header(path)
    assert str(path) in str(e.value)


def test_hostile_shard_fails_load_model_before_reading(tmp_path):
    """An overlapping entry in a real checkpoint: load_model refuses it, naming file and tensor,
    instead of silently reading the neighbour's bytes as this tensor."""
    model = Transformer(ModelConfig.from_hf(TINY))
    save_model(model, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    header, start = read_header(f)
    body = f.read_bytes()[start:]
    name = "model.layers.0.input_layernorm.weight"
    other = "model.layers.1.input_layernorm.weight"
    header[name] = dict(header[other])  # same shape, points at the other layer's bytes
    meta = {"__metadata__": {"format": "pt"}, **header}
    st_file(f, meta, body)
    with pytest.raises(CheckpointError, match=rf"{f}: tensor '.*input_layernorm.weight' overlaps"):
        load_model(tmp_path / "m")


def test_hostile_index_is_refused(tmp_path):
    model = Transformer(ModelConfig.from_hf(TINY))
    save_model(model, tmp_path / "m", max_shard_bytes=20_000)
    index = tmp_path / "m" / mw.INDEX
    for weight_map, message in [([], "weight_map must be an object"), ({"a": 3}, "weight_map must be an object"),
                                ({"a": "../m/model-00001-of-00003.safetensors"}, "plain file names"),
                                ({"a": "/etc/passwd"}, "plain file names")]:
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp_path / "m")
    index.write_text("[1]")
    with pytest.raises(CheckpointError, match="invalid index"):
        load_model(tmp_path / "m")


def test_valid_files_read_like_the_safetensors_library(tmp_path):
    """The checks reject nothing the reference writes: every dtype, empty and 0-d tensors, metadata."""
    tensors = {
        "f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(6).reshape(2, 3), "u8": torch.arange(9, dtype=torch.uint8), "bool": torch.rand(4) > 0.5,
        "empty": torch.zeros(0, 4), "scalar": torch.tensor(3.5), "f8": torch.randn(5).to(torch.float8_e4m3fn),
    }
    path = tmp_path / "ok.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    want = load_file(str(path))
    header, start = read_header(path)
    assert set(header) == set(tensors)
    with open(path, "rb") as f:
        for name, ref in want.items():
            got = read_tensor(f, header[name], start)
            assert got.dtype == ref.dtype and got.shape == ref.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8))


# ---------------------------------------------------------------------------------------------
# saving over an earlier checkpoint

def _model(seed):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def _same_weights(path, model):
    back = load_model(path)
    return all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("shard_bytes", [20_000, 10**9], ids=["sharded", "single"])
@pytest.mark.parametrize("crash_at", ["last shard", "config.json"])
def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, shard_bytes, crash_at):
    old, new = _model(0), _model(1)
    out = tmp_path / "ckpt"
    save_model(old, out, max_shard_bytes=20_000)  # several shards + index
    (out / "tokenizer.json").write_text("{}")       # written beside it by minirank.save
    before = sorted(p.name for p in out.iterdir())

    write_shard, write_json = mw._write_shard, mw.write_json

    def shard_then_crash(tensors, file):
        if crash_at == "last shard" and re.fullmatch(r"model(-(\d+)-of-\2)?\.safetensors", file.name):
            file.write_bytes(b"half a shard")
            raise Crash("killed while writing")
        write_shard(tensors, file)

    def json_then_crash(path, obj, **kw):
        if crash_at == "config.json" and path.name == "config.json":
            raise Crash("killed while writing")
        write_json(path, obj, **kw)

    monkeypatch.setattr(mw, "_write_shard", shard_then_crash)
    monkeypatch.setattr(mw, "write_json", json_then_crash)
    with pytest.raises(Crash):
        save_model(new, out, max_shard_bytes=shard_bytes)
    assert sorted(p.name for p in out.iterdir()) == before
    assert _same_weights(out, old)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging dir left behind


def test_save_replaces_weights_and_keeps_other_files(tmp_path):
    old, new = _model(0), _model(1)
    out = tmp_path / "ckpt"
    save_model(old, out, max_shard_bytes=20_000)
    (out / "tokenizer.json").write_text('{"keep": 1}')
    (out / "notes").mkdir()
    (out / "notes" / "run.txt").write_text("mine")
    save_model(new, out)  # now one file: the three old shards and their index must go
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "notes", "tokenizer.json"]
    assert (out / "tokenizer.json").read_text() == '{"keep": 1}' and (out / "notes" / "run.txt").read_text() == "mine"
    assert _same_weights(out, new)
    assert (out / "model.safetensors").stat().st_mode & 0o044 == 0o044  # not owner-only like a temp file
    with pytest.raises(CheckpointError, match="is a file"):
        save_model(new, out / "config.json")


def test_write_json_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    mw.write_json(path, {"a": 1})

    def crash(*a, **k):
        raise Crash("disk full")

    monkeypatch.setattr(mw.os, "replace", crash)
    with pytest.raises(Crash):
        mw.write_json(path, {"a": 2, "long": "x" * 10_000})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_config_json_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(mw.CheckpointError, match=r"config.json: expected a JSON object, got a list"):
        mw.load_config(tmp_path)
