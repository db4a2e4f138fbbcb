"""Checkpoint files: weights_only loading (a pickled payload never runs), a content checksum
that catches damaged files, atomic saves that clean up after a killed one, the user's umask, and
RNG states stored as tensors."""
import logging
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from gumbel_kernels.engine.checkpoint import (INTEGRITY_KEY, CheckpointError, content_digest,
                                              load_checkpoint, rng_state, save_checkpoint,
                                              set_rng_state, verify_checkpoint)


def sample_state():
    generator = torch.Generator().manual_seed(0)
    return {"model": {"w": torch.randn(128, 128, generator=generator),
                      "b": torch.arange(5, dtype=torch.bfloat16), "mask": torch.tensor([True])},
            "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}},
                          "param_groups": [{"lr": 0.02, "params": [0]}]},
            "iteration": 7, "config": {"solver": {"base_lr": 0.02, "epochs": None},
                                       "min_size": [64, 80], "name": "x"},
            "rng": rng_state()}


def assert_same(a, b):
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_loads_with_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    state = sample_state()
    save_checkpoint(str(path), state)
    assert_same(load_checkpoint(str(path)), state)
    raw = torch.load(path, weights_only=True)  # any torch user can read it safely
    assert raw[INTEGRITY_KEY]["sha256"] == content_digest(state) == verify_checkpoint(str(path))
    assert os.listdir(tmp_path) == ["c.pt"]


def test_digest_sees_every_part_of_the_content():
    state = sample_state()
    base = content_digest(state)
    state["model"]["w"][3, 5] += 1e-6
    assert content_digest(state) != base
    other = sample_state()
    other["config"]["solver"]["epochs"] = 0
    assert content_digest(other) != base
    other = sample_state()
    other["model"]["b"] = other["model"]["b"].float()  # same values, other dtype
    assert content_digest(other) != base


@pytest.mark.parametrize("damage", ["zeroed_4k_middle", "truncated", "empty", "garbage",
                                    "zeroed_head", "zeroed_tail", "one_flipped_byte"])
def test_damaged_files_give_one_clear_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(str(path), sample_state())
    data = path.read_bytes()
    middle = len(data) // 2
    if damage == "zeroed_4k_middle":
        data = data[:middle - 2048] + bytes(4096) + data[middle + 2048:]
    elif damage == "truncated":
        data = data[:middle]
    elif damage == "empty":
        data = b""
    elif damage == "garbage":
        data = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    elif damage == "zeroed_head":
        data = bytes(4096) + data[4096:]
    elif damage == "zeroed_tail":
        data = data[:-4096] + bytes(4096)
    else:
        data = data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:]
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=str(path)) as error:
        load_checkpoint(str(path))
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError):
        verify_checkpoint(str(path))


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(str(tmp_path / "nope.pt"))


class _Payload:
    """Unpickling this runs code: it creates the file named at pickling time."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_payload_is_never_run(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "crafted.pt"
    torch.save({"model": {}, "x": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match=r"crafted.pt holds pickled Python objects.*"
                                              r"--allow-pickle"):
        load_checkpoint(str(path))
    assert not marker.exists()
    old_format = tmp_path / "legacy.pt"  # torch's pre-zip serialization, a bare pickle
    torch.save({"x": _Payload(str(marker))}, old_format, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_checkpoint(str(old_format))
    assert not marker.exists()


def test_legacy_checkpoint_loads_only_when_allowed(tmp_path, caplog):
    # What this harness wrote before: RNG states as NumPy arrays and tuples, no checksum.
    path = tmp_path / "old.pt"
    legacy = {"model": {"w": torch.ones(2)}, "iteration": 3,
              "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                      "torch": torch.get_rng_state()}}
    torch.save(legacy, path)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_checkpoint(str(path))
    with caplog.at_level(logging.WARNING):
        state = load_checkpoint(str(path), allow_pickle=True)
    assert "no checksum" in caplog.text
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(state["rng"])  # the tuple format is still understood
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_rng_state_round_trip_through_a_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in NumPy's state
    save_checkpoint(str(tmp_path / "r.pt"), {"rng": rng_state()})
    expected = (random.random(), float(np.random.standard_normal()), float(torch.rand(1)))
    set_rng_state(load_checkpoint(str(tmp_path / "r.pt"))["rng"])
    assert (random.random(), float(np.random.standard_normal()), float(torch.rand(1))) == expected


def test_save_refuses_what_weights_only_cannot_load(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['config'\]\['lr'\]: a numpy.float64"):
        save_checkpoint(str(tmp_path / "c.pt"), {"config": {"lr": np.float64(0.1)}})
    assert os.listdir(tmp_path) == []


def test_files_honour_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        save_checkpoint(str(tmp_path / "c.pt"), {"x": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o640


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(str(path), {"step": 1})

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(str(path), {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(str(path)) == {"step": 1}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


def test_a_killed_save_leaves_a_temporary_that_the_next_save_removes(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(str(path), {"step": 1})
    script = textwrap.dedent(f"""
        import os, signal, torch
        from gumbel_kernels.engine import checkpoint
        def dying_save(obj, f):
            f.write(b"PK\\x03\\x04 half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        checkpoint.save_checkpoint({str(path)!r}, {{"step": 2}})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    left = sorted(os.listdir(tmp_path))
    assert len(left) == 2 and left[0].startswith(".checkpoint.pt.tmp-"), left
    assert load_checkpoint(str(path)) == {"step": 1}  # the killed save changed nothing
    save_checkpoint(str(path), {"step": 3})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]
    assert load_checkpoint(str(path)) == {"step": 3}
