"""bfloat16 on CPUs that have it (issue 25): what --dtype auto picks, and that autocast keeps
checkpoints float32.

- training.auto_dtype, a pure function of what torch reports (torch.cpu.get_capabilities):
  bfloat16 autocast on a CPU with AMX-BF16 or AVX512-BF16, float32 elsewhere; CUDA as before;
- setup_runtime prints the choice and why as its first line, and --dtype float32 forces float32;
- a checkpoint trained under bfloat16 autocast on CPU holds float32 weights and optimizer state,
  and resumes under --dtype float32.
The kernels' bfloat16 accuracy is in test_kernels.py; the model under autocast in
test_model_kernels.py.
Run: pytest tests/test_bf16.py -q
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import training  # noqa: E402

NO_BF16 = {"avx2": True, "avx512_f": True, "amx_bf16": False, "avx512_bf16": False}


@pytest.mark.parametrize("caps,want,reason", [
    ({**NO_BF16, "amx_bf16": True, "amx_tile": True}, "bfloat16", "this CPU has AMX-BF16"),
    ({**NO_BF16, "avx512_bf16": True}, "bfloat16", "this CPU has AVX512-BF16"),
    ({**NO_BF16, "amx_bf16": True, "avx512_bf16": True}, "bfloat16", "AMX-BF16 and AVX512-BF16"),
    (NO_BF16, "float32", "no AMX-BF16/AVX512-BF16; bfloat16 would be emulated"),
    ({}, "float32", "no AMX-BF16/AVX512-BF16"),  # a torch that reports nothing
])
def test_auto_dtype_on_cpu_follows_the_reported_capabilities(caps, want, reason):
    dtype, why = training.auto_dtype("cpu", False, caps)
    assert dtype == want and reason in why


def test_auto_dtype_on_cuda_is_unchanged():
    assert training.auto_dtype("cuda", True, {})[0] == "bfloat16"
    assert training.auto_dtype("cuda", False, {"amx_bf16": True})[0] == "float32"


def test_setup_runtime_says_which_dtype_and_why(monkeypatch, capsys):
    monkeypatch.setattr(training, "cpu_capabilities", lambda: {"amx_bf16": True})
    rt = training.setup_runtime("cpu", "auto")
    assert rt.dtype == torch.bfloat16
    assert capsys.readouterr().out.splitlines()[0] == \
        "dtype: bfloat16 (this CPU has AMX-BF16; weights stay float32)"
    rt = training.setup_runtime("cpu", "float32")  # forces the old path on any CPU
    assert rt.dtype == torch.float32
    assert capsys.readouterr().out.splitlines()[0] == "dtype: float32 (asked for with --dtype)"
    monkeypatch.setattr(training, "cpu_capabilities", lambda: dict(NO_BF16))
    assert training.setup_runtime("cpu", "auto").dtype == torch.float32
    assert "bfloat16 would be emulated" in capsys.readouterr().out.splitlines()[0]


def test_this_machine_reports_what_torch_sees():
    # The real query answers with booleans under the two keys auto_dtype reads.
    caps = training.cpu_capabilities()
    if hasattr(torch.cpu, "get_capabilities"):
        assert isinstance(caps.get("amx_bf16"), bool) and isinstance(caps.get("avx512_bf16"), bool)


def test_bf16_checkpoint_is_float32_and_resumes_under_float32(tmp_path):
    (tmp_path / "texts").mkdir()
    for p in training.shakespeare_files()[:4]:
        (tmp_path / "texts" / p.name).write_text(p.read_text()[:8000])
    flags = [f"--data={tmp_path / 'texts'}", f"--cache_dir={tmp_path / 'cache'}", "--vocab_size=384",
             "--model=tiny", "--seq_len=32", "--batch_size=4", "--warmup_steps=2", "--lr=3e-3",
             "--eval_every=1000", "--eval_batches=1", "--samples=0", "--save_every=4",
             f"--out_dir={tmp_path / 'out'}", "--device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def run(*extra):
        proc = subprocess.run([sys.executable, "train_pretrain.py", *flags, *extra], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    out = run("--max_steps=8", "--dtype=bfloat16")
    assert out.splitlines()[0] == "dtype: bfloat16 (asked for with --dtype)"
    assert "autocast bfloat16" in out
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 8
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())
    moments = [t for s in ckpt["optimizer"]["state"].values() for k, t in s.items() if k != "step"]
    assert moments and all(t.dtype == torch.float32 for t in moments)

    out = run("--max_steps=12", "--dtype=float32", "--resume")
    assert out.splitlines()[0] == "dtype: float32 (asked for with --dtype)"
    assert "resumed from" in out and "at step 8" in out and "step 12/12 | loss " in out
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 12 and all(v.dtype == torch.float32 for v in ckpt["model"].values())


def test_sampling_runs_on_a_bfloat16_copy_and_leaves_the_model_float32(tokenizer, monkeypatch):
    """Under bfloat16 autocast on a CPU the chat sampler decodes with a bfloat16 copy of the
    weights (autocast would cast every weight at every decode step); the model it was given keeps
    its float32 weights, and in float32 the sampler uses the model itself."""
    import llama2
    import sampling
    from conftest import chat_model
    model = chat_model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bf16 = training.Runtime(device=torch.device("cpu"), dtype=torch.bfloat16)
    f32 = training.Runtime(device=torch.device("cpu"), dtype=torch.float32)
    assert sampling.inference_model(model, f32) is model
    assert sampling.inference_model(model, None) is model
    copy = sampling.inference_model(model, bf16)
    assert copy is not model
    assert sampling.inference_model(copy, bf16) is copy  # already bfloat16: no second copy
    for k, v in copy.state_dict().items():  # each weight rounded to bfloat16 once
        assert v.dtype == torch.bfloat16 and torch.equal(v, before[k].to(torch.bfloat16)), k
    dialogs = [[{"role": "user", "content": "What is 2 plus 3?"}]] * 3
    seen, generate = [], llama2.Transformer.generate

    def spy(self, *a, **k):  # what each decode call runs on: weights' dtype, autocast on?
        seen.append((self.output.weight.dtype, torch.is_autocast_enabled("cpu")))
        return generate(self, *a, **k)
    monkeypatch.setattr(llama2.Transformer, "generate", spy)
    replies = sampling.generate_replies(model, tokenizer, dialogs, max_new_tokens=6, rt=bf16)
    monkeypatch.setattr(llama2.Transformer, "generate", generate)
    assert seen and set(seen) == {(torch.bfloat16, False)}
    assert all(r is not None and len(r) == 1 for r in replies)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k]), k
    # the copy's greedy tokens are those of the same weights rounded to bfloat16, decoded by hand
    # step by step without the KV cache (the reference path)
    ids = llama2.encode_dialog(tokenizer, dialogs[0])[0]
    ref = list(ids)
    with torch.no_grad():
        for _ in range(replies[0][0].n_tokens):
            logits, _ = copy(torch.tensor([ref]))
            ref.append(int(logits[0, -1].float().argmax()))
    got = copy.generate([ids], replies[0][0].n_tokens, temperature=0.0, eos_id=None)[0]
    assert got == ref[len(ids):]
    eos = got[-1] == tokenizer.eos_id
    assert replies[0][0].text == sampling.clean_reply(tokenizer.decode(got[:-1] if eos else got))
