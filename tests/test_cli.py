"""The command line: generate, chat and export, run as a user would."""
import os
import subprocess
import sys

import pytest
import torch

import llama2
from llama2 import ModelArgs, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def ckpt_dir(tmp_path, tokenizer):
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words,
                                  multiple_of=32, max_seq_len=64))
    torch.save({"model_args": vars(model.args), "model": model.state_dict(), "stage": "pretrain",
                "tokenizer": torch.frombuffer(bytearray(tokenizer.model_bytes), dtype=torch.uint8)},
               str(tmp_path / "ckpt.pt"))
    return tmp_path


def run(args, stdin=None):
    env = {**os.environ, "LLAMA2_NO_EXT": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "llama2.py")] + args, input=stdin,
                          capture_output=True, text=True, env=env, timeout=120)


def test_prompt_generates_and_is_reproducible(ckpt_dir):
    a = run(["--checkpoint", str(ckpt_dir), "--prompt", "The king", "--max-new-tokens", "8", "--seed", "3"])
    assert a.returncode == 0, a.stderr
    assert a.stdout.startswith("The king") and len(a.stdout.strip()) > len("The king")
    b = run(["--checkpoint", str(ckpt_dir), "--prompt", "The king", "--max-new-tokens", "8", "--seed", "3"])
    assert a.stdout == b.stdout


def test_chat_keeps_a_multi_turn_history(ckpt_dir):
    r = run(["--checkpoint", str(ckpt_dir), "--chat", "--system", "Be brief.", "--max-new-tokens", "5"],
            stdin="Hello there\nAnd again\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2


def test_prompt_longer_than_context_is_reported(ckpt_dir):
    r = run(["--checkpoint", str(ckpt_dir), "--prompt", "the king " * 80, "--max-new-tokens", "4"])
    assert r.returncode != 0
    assert "does not fit the context" in r.stderr and "Traceback" not in r.stderr


def test_export_hf_round_trips(ckpt_dir, tmp_path):
    out = tmp_path / "hf"
    r = run(["--checkpoint", str(ckpt_dir), "--export-hf", str(out)])
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.model"]
    a, tok_a = llama2.load_model(str(ckpt_dir))
    b, tok_b = llama2.load_model(str(out))
    tokens = torch.tensor([tok_a.encode("Thou art fair")])
    torch.testing.assert_close(a(tokens)[0], b(tokens)[0], rtol=0, atol=1e-6)
    assert tok_b.encode("1234") == tok_a.encode("1234")
