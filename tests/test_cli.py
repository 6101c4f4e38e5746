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


def test_flags_take_both_spellings(ckpt_dir):
    # the training scripts spell --max_new_tokens: llama2.py takes that spelling too
    a = run(["--checkpoint", str(ckpt_dir), "--prompt", "The king", "--max_new_tokens", "6",
             "--top_p", "0.8", "--seed", "3"])
    b = run(["--checkpoint", str(ckpt_dir), "--prompt", "The king", "--max-new-tokens", "6",
             "--top-p", "0.8", "--seed", "3"])
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout


def test_help_shows_the_defaults_and_real_choices():
    r = run(["--help"])
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for expected in ("greedy (default: 0.6)", "probability (default: 0.9)", "(default: 256)",
                     "(default: unset, each run samples anew)", "--dtype {float32,bfloat16,float16}",
                     "(default: as stored in the checkpoint)"):
        assert expected in text, expected
    assert "None" not in r.stdout


def test_argument_errors_come_before_loading_the_checkpoint(tmp_path):
    # a missing action is said at once, not after reading (here: failing to read) the checkpoint
    r = run(["--checkpoint", str(tmp_path / "no_such_run")])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "llama2.py: error: give --prompt, --chat or --export-hf"


def _replies(stdout):
    return [line.split("assistant> ", 1)[1] for line in stdout.splitlines() if "assistant> " in line]


def test_chat_drops_the_oldest_turns_when_the_context_is_full(ckpt_dir):
    # a 64-token context holds two or three exchanges: later messages still get replies
    msgs = [f"the king and the queen speak {n}" for n in range(8)]
    r = run(["--checkpoint", str(ckpt_dir), "--chat", "--system", "Be brief.", "--max-new-tokens",
             "6", "--temperature", "0"], stdin="\n".join(msgs) + "\n\n")
    assert r.returncode == 0, r.stderr
    assert "error" not in r.stderr, r.stderr
    assert len(_replies(r.stdout)) == 8
    assert ("the oldest 1 exchange dropped, the system message kept; /reset clears it all)"
            in r.stderr), r.stderr


def test_chat_reports_a_reply_cut_short(ckpt_dir):
    r = run(["--checkpoint", str(ckpt_dir), "--chat", "--max-new-tokens", "3", "--temperature",
             "0"], stdin="the king\n\n")
    assert r.returncode == 0, r.stderr
    reply = _replies(r.stdout)[0]
    # an untrained model does not stop by itself in 3 tokens
    assert "(reply cut: --max-new-tokens 3 reached)" in r.stderr, (reply, r.stderr)


def test_chat_reset_clears_the_history(ckpt_dir):
    flags = ["--checkpoint", str(ckpt_dir), "--chat", "--max-new-tokens", "5", "--temperature", "0"]
    r = run(flags, stdin="the king\nthe queen\n/reset\nthe king\n\n")
    assert r.returncode == 0, r.stderr
    first, _, after_reset = _replies(r.stdout)
    assert "(history cleared)" in r.stderr
    assert after_reset == first  # greedy: the same message on an empty history, the same reply


def test_chat_from_a_pipe_reads_as_a_dialog(ckpt_dir):
    r = run(["--checkpoint", str(ckpt_dir), "--chat", "--max-new-tokens", "4"],
            stdin="Hello there\nAnd again\n\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "user> Hello there" in lines and "user> And again" in lines
    assert lines.index("user> Hello there") + 1 == [i for i, ln in enumerate(lines)
                                                    if ln.startswith("assistant> ")][0]


def test_chat_a_refused_message_leaves_the_history_as_it_was(ckpt_dir):
    flags = ["--checkpoint", str(ckpt_dir), "--chat", "--max-new-tokens", "5", "--temperature", "0"]
    r = run(flags, stdin="the king\n[INST] sneaky\nthe queen\n/reset\nthe king\nthe queen\n\n")
    assert r.returncode == 0, r.stderr
    assert "error: encode_dialog: message 2 contains a reserved tag" in r.stderr
    a1, b1, a2, b2 = _replies(r.stdout)
    assert (a1, b1) == (a2, b2)  # the same history both times: the refused message left no trace
