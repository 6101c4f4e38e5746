"""Damaged files and interrupted writes: a truncated or corrupted checkpoint is a one-line error
(from the command line, llama2.load_model and training.load_checkpoint), and training.atomic_write
leaves the old file intact and no temp file behind when a write fails halfway."""
import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama2
import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unreadable(path) -> str:
    return f"error: {path} is not a readable checkpoint (truncated or corrupted?)"


@pytest.fixture
def ckpt_dir(tmp_path):
    """A real checkpoint of the tiny preset, written as the training scripts write it."""
    torch.manual_seed(0)
    model = llama2.Transformer(llama2.ModelArgs.preset("tiny"))
    d = tmp_path / "run"
    training.save_checkpoint(d / "ckpt.pt", {"model_args": vars(model.args), "model": model.state_dict(),
                                             "stage": "pretrain", "step": 7})
    assert training.load_checkpoint(d)["step"] == 7  # intact before we damage it
    return d


def damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "last_byte_cut":
        path.write_bytes(data[:-1])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage_header":
        path.write_bytes(b"\x00" * 64 + data[64:])


DAMAGE = ["truncated", "last_byte_cut", "empty", "garbage_header"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_checkpoint_from_the_command_line_is_one_line(ckpt_dir, how):
    damage(ckpt_dir / "ckpt.pt", how)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "llama2.py"), "--checkpoint", str(ckpt_dir),
                          "--prompt", "the"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LLAMA2_NO_EXT": "1"})
    assert out.returncode == 1
    assert out.stderr.strip() == unreadable(ckpt_dir / "ckpt.pt")  # one line, no traceback


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_checkpoint_from_the_functions(ckpt_dir, how):
    damage(ckpt_dir / "ckpt.pt", how)
    for load in (llama2.load_model, training.load_checkpoint, lambda p: training.load_resume(p, "pretrain")):
        for target in (ckpt_dir, ckpt_dir / "ckpt.pt"):
            with pytest.raises(SystemExit) as e:
                load(str(target) if load is llama2.load_model else target)
            assert str(e.value.code) == unreadable(ckpt_dir / "ckpt.pt")


def test_damaged_checkpoint_on_resume_of_train_pretrain(ckpt_dir):
    damage(ckpt_dir / "ckpt.pt", "truncated")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train_pretrain.py"), "--resume",
                          "--out_dir", str(ckpt_dir)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LLAMA2_NO_EXT": "1"}, cwd=ckpt_dir)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.strip().splitlines()[-1] == unreadable(ckpt_dir / "ckpt.pt")
    assert "Traceback" not in out.stderr


def test_damaged_hugging_face_and_meta_files(tmp_path):
    torch.manual_seed(0)
    model = llama2.Transformer(llama2.ModelArgs.preset("tiny"))
    hf = tmp_path / "hf"
    llama2.export_hf(model, str(hf))
    assert llama2.load_model(str(hf))[0].args.hidden_dim == model.args.hidden_dim
    damage(hf / "model.safetensors", "truncated")
    with pytest.raises(SystemExit) as e:
        llama2.load_model(str(hf))
    assert str(e.value.code) == unreadable(hf / "model.safetensors")

    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text('{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, '
                                      '"multiple_of": 32, "norm_eps": 1e-05, "vocab_size": 512}')
    torch.save(model.state_dict(), meta / "consolidated.00.pth")
    assert llama2.load_model(str(meta))[0].args.dim == 64
    damage(meta / "consolidated.00.pth", "truncated")
    with pytest.raises(SystemExit) as e:
        llama2.load_model(str(meta))
    assert str(e.value.code) == unreadable(meta / "consolidated.00.pth")


# ------------------------------------------------------------------------------- atomic writes

def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_replaces_the_content(tmp_path):
    path = tmp_path / "out" / "notes.txt"  # the folder is created
    with training.atomic_write(path, "w") as f:
        f.write("first\n")
    with training.atomic_write(path, "w") as f:
        f.write("zweite Fassung \u00e9\n")
    assert path.read_text(encoding="utf-8") == "zweite Fassung \u00e9\n"
    with training.atomic_write(path, "wb") as f:
        f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    with training.atomic_write(path, None) as tmp:  # for writers that open the file themselves
        with open(tmp, "wb") as f:
            f.write(b"by name")
    assert path.read_bytes() == b"by name"
    assert listing(path.parent) == ["notes.txt"]
    # the same permissions as a file written with open() (the umask decides)
    with open(tmp_path / "plain", "w") as f:
        f.write("x")
    assert (path.stat().st_mode & 0o777) == ((tmp_path / "plain").stat().st_mode & 0o777)
    with pytest.raises(ValueError, match="mode"):
        with training.atomic_write(path, "a"):
            pass


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
@pytest.mark.parametrize("mode", ["w", "wb", None])
def test_atomic_write_failing_halfway_keeps_the_old_file(tmp_path, mode, error):
    path = tmp_path / "data.bin"
    path.write_bytes(b"old content, intact")
    with pytest.raises(type(error)):
        with training.atomic_write(path, mode) as f:
            if mode is None:
                f = open(f, "wb")
            f.write("new content that never" if mode == "w" else b"new content that never")
            f.flush()
            # half of the new file is on disk, beside the old one, when the failure comes
            assert any(name.endswith(".tmp") for name in listing(tmp_path))
            raise error
    assert path.read_bytes() == b"old content, intact"
    assert listing(tmp_path) == ["data.bin"]


def test_save_checkpoint_failing_mid_write_keeps_the_old_checkpoint(ckpt_dir, monkeypatch):
    path = ckpt_dir / "ckpt.pt"
    before = path.read_bytes()
    real_save = torch.save

    def half_then_disk_full(obj, f):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_disk_full)
    with pytest.raises(SystemExit, match="No space left on device; the previous checkpoint"):
        training.save_checkpoint(path, {"model": {}, "step": 8})
    assert path.read_bytes() == before and training.load_checkpoint(ckpt_dir)["step"] == 7
    assert listing(ckpt_dir) == ["ckpt.pt"]

    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("replace failed")))
    with pytest.raises(OSError, match="replace failed"):
        training.save_checkpoint(path, {"model": {}, "step": 9})
    assert path.read_bytes() == before and listing(ckpt_dir) == ["ckpt.pt"]

    monkeypatch.undo()
    training.save_checkpoint(path, {"model": {}, "step": 10})
    assert training.load_checkpoint(ckpt_dir)["step"] == 10 and listing(ckpt_dir) == ["ckpt.pt"]


def test_export_hf_failing_mid_write_keeps_the_old_export(tmp_path, monkeypatch):
    import safetensors.torch
    torch.manual_seed(0)
    model = llama2.Transformer(llama2.ModelArgs.preset("tiny"))
    llama2.export_hf(model, str(tmp_path))
    before = {name: (tmp_path / name).read_bytes() for name in listing(tmp_path)}
    assert sorted(before) == ["config.json", "model.safetensors"]

    def half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(before["model.safetensors"][:1000])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError):
        llama2.export_hf(model, str(tmp_path))
    assert {name: (tmp_path / name).read_bytes() for name in listing(tmp_path)} == before


def test_trim_metrics_drops_a_line_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 3, "lo')
    training.trim_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n'
    training.trim_metrics(path, 1)
    assert path.read_text() == '{"step": 1, "loss": 3.0}\n'
    training.trim_metrics(path, 0)  # a fresh run starts a new log: the first record writes it
    assert listing(tmp_path) == []


# ------------------------------------------------------------------- a training run that cannot go on
# each is one `error:` line saying what was wrong and what to do; the last checkpoint survives


@pytest.fixture
def sft_run(tmp_path, tokenizer):
    """A tiny parent checkpoint, SFT data and the flags of a short SFT run on it."""
    import json
    import world
    args = llama2.ModelArgs.preset("tiny", vocab_size=tokenizer.n_words, max_seq_len=128)
    parent = tmp_path / "pt"
    training.save_checkpoint(parent / "ckpt.pt", {
        "model_args": vars(args), "model": llama2.Transformer(args).state_dict(), "config": {},
        "tokenizer": torch.frombuffer(bytearray(tokenizer.model_bytes), dtype=torch.uint8),
        "stage": "pretrain"})
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": d}) + "\n" for d in world.sft_dialogs(12, seed=6)))
    flags = ["--checkpoint", str(parent), "--data", str(data), "--batch_size", "2", "--epochs", "1",
             "--seq_len", "128", "--device", "cpu", "--out_dir", str(tmp_path / "sft")]
    return flags, tmp_path / "sft"


def _flag(flags, name, value):
    i = flags.index(name)
    return flags[:i + 1] + [value] + flags[i + 2:]


def test_empty_sft_data_is_one_error_line_and_leaves_no_log(sft_run, tmp_path):
    import train_sft
    flags, out = sft_run
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit) as e:
        train_sft.main(_flag(flags, "--data", str(empty)))
    assert str(e.value.code).startswith(f"error: {empty}: the file holds no rows (it is empty); "
                                        "each line must be {\"messages\"")
    assert "\n" not in str(e.value.code)
    assert not (out / "metrics.jsonl").exists()  # a failed run leaves no empty log behind


def test_every_example_too_long_is_one_error_line(sft_run):
    import train_sft
    flags, out = sft_run
    with pytest.raises(SystemExit) as e:
        train_sft.main(_flag(flags, "--seq_len", "4"))
    msg = str(e.value.code)
    assert msg.startswith("error: no training examples left: all 12 are longer than --seq_len 4 "
                          "tokens (e.g. ") and msg.endswith("raise --seq_len (up to the model's "
                                                             "context) or give shorter dialogs")
    assert "\n" not in msg


class _DiskFull:
    """A file whose disk fills up after a few writes (torch.save then raises RuntimeError
    "[enforce fail at inline_container.cc...]" with the OSError only as its context)."""

    def __init__(self, f):
        self.f, self.writes = f, 0

    def write(self, b):
        self.writes += 1
        if self.writes > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_at_save_is_one_error_line_and_keeps_the_checkpoint(sft_run, monkeypatch):
    import train_sft
    flags, out = sft_run
    train_sft.main(flags + ["--stop_at_step", "1"])
    before = (out / "ckpt.pt").read_bytes()

    def open_on_a_full_disk(path, mode="r", *a, **kw):
        f = open(path, mode, *a, **kw)
        return _DiskFull(f) if mode == "xb" else f  # the checkpoint's temp file

    monkeypatch.setattr(llama2, "open", open_on_a_full_disk, raising=False)  # atomic_write's module
    with pytest.raises(SystemExit) as e:
        train_sft.main(flags + ["--resume"])
    msg = str(e.value.code)
    assert msg == (f"error: cannot write {out / 'ckpt.pt'}: No space left on device; the previous "
                   f"checkpoint there is intact; free some space on the disk of {out}, or point "
                   "--out_dir at another disk"), msg
    assert (out / "ckpt.pt").read_bytes() == before
    assert training.load_checkpoint(out)["step"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_read_only_out_dir_is_one_error_line_before_any_step(sft_run, monkeypatch, capsys):
    import train_sft
    flags, out = sft_run
    out.mkdir()

    def open_read_only(path, mode="r", *a, **kw):
        # tests run as root, whom chmod does not stop: refuse as a read-only folder would
        if mode[0] in "wxa" and Path(path).parent == out:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, mode, *a, **kw)

    monkeypatch.setattr(training, "open", open_read_only, raising=False)
    monkeypatch.setattr(llama2, "open", open_read_only, raising=False)  # atomic_write's module
    with pytest.raises(SystemExit) as e:
        train_sft.main(flags)
    assert str(e.value.code) == (f"error: cannot write {out / 'metrics.jsonl'}: Permission denied; "
                                 f"make {out} writable, or point --out_dir at a folder you can write")
    assert "step 1/" not in capsys.readouterr().out  # before any work


def test_fresh_run_over_a_checkpoint_says_it_replaces_it(sft_run, capsys):
    import train_sft
    flags, out = sft_run
    train_sft.main(flags + ["--stop_at_step", "1"])
    assert "warning" not in capsys.readouterr().out
    train_sft.main(flags + ["--stop_at_step", "1"])
    assert (f"warning: {out / 'ckpt.pt'} holds an earlier run; this new run starts from scratch and "
            "replaces it at its first save (stop now and add --resume to continue that run"
            in capsys.readouterr().out)
