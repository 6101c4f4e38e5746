"""End-to-end tests of train_pretrain.py, run as a user runs it (subprocesses, tiny model, CPU).

- a short run's loss falls and its checkpoint loads with llama2.load_model, tokenizer included;
- a run killed with SIGKILL after a checkpoint and resumed with --resume ends bitwise equal to an
  uninterrupted run (same losses at every step, same final weights): the data order is a pure
  function of (seed, step), and nothing else random is drawn during training;
- `torchrun --nproc_per_node=2` (gloo, CPU), with DDP and with FSDP2, follows the loss trajectory
  of one process that accumulates the same global batch, within 2e-5 (the same float32 gradients
  summed in another order: all-reduce vs accumulation), and writes the same full checkpoint;
- bad input ends in a one-line error, not a traceback.
Run: pytest tests/test_pretrain.py -q
"""
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import llama2  # noqa: E402
import training  # noqa: E402

# one thread per process: the test machine is small and shared
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SEQ = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Eight Shakespeare excerpts as .txt files, plus a token cache shared by every run here."""
    root = tmp_path_factory.mktemp("pretrain")
    (root / "texts").mkdir()
    for p in training.shakespeare_files()[:8]:
        (root / "texts" / p.name).write_text(p.read_text()[:12000])
    return root


def flags(corpus, out_dir, **over):
    # float32 on every CPU: these runs are compared to float32 rounding;
    # test_bf16.py checks bfloat16
    args = dict(data=corpus / "texts", cache_dir=corpus / "cache", vocab_size=384, model="tiny",
                seq_len=SEQ, batch_size=4, max_steps=30, warmup_steps=3, lr=3e-3,
                eval_every=1000, eval_batches=2, samples=0, save_every=6, out_dir=out_dir,
                device="cpu", dtype="float32")
    args.update(over)
    return [f"--{k}={v}" for k, v in args.items()]


def run(argv, check=True, launcher=(sys.executable,)):
    proc = subprocess.run([*launcher, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_here(argv):
    """Run the script in this process (no interpreter start-up: errors and short runs)."""
    old = sys.argv
    sys.argv = ["train_pretrain.py", *argv]
    try:
        runpy.run_path(str(ROOT / "train_pretrain.py"), run_name="__main__")
    finally:
        sys.argv = old


def train_losses(out_dir):
    """Step -> train loss from the run's metrics.jsonl."""
    recs = [json.loads(l) for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.fixture(scope="module")
def baseline(corpus):
    """An uninterrupted 30-step run."""
    out = corpus / "baseline"
    proc = run(["train_pretrain.py", *flags(corpus, out, samples=1, sample_tokens=8)])
    return out, proc.stdout


def test_loss_falls_and_checkpoint_is_complete(baseline):
    out, stdout = baseline
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 31))
    first = sum(losses[s] for s in range(1, 4)) / 3
    last = sum(losses[s] for s in range(28, 31)) / 3
    assert first > 5.5  # about log(384) = 5.95 at the start
    assert last < first - 1.0, (first, last)
    # the log line format, an evaluation with perplexity, a sample
    assert "step 30/30 | loss " in stdout and " tok/s" in stdout
    assert "eval step 30 | val loss" in stdout and "--- sample 1 (step 30) ---" in stdout
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in recs if "val_loss" in r]
    assert len(val) == 1 and val[0]["val_ppl"] == pytest.approx(torch.tensor(val[0]["val_loss"]).exp().item())
    # the checkpoint holds everything the later stages need, readable with weights_only=True
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["stage"] == "pretrain" and ckpt["step"] == 30
    assert {"model_args", "model", "tokenizer", "config", "optimizer", "rng", "data"} <= set(ckpt)
    model, tok = llama2.load_model(str(out))
    assert tok is not None and tok.n_words == 384 == model.args.vocab_size
    assert tok.decode(tok.encode("Good my lord,")[1:]) == "Good my lord,"
    for k, v in ckpt["model"].items():
        assert torch.equal(model.state_dict()[k], v)


def test_sigkill_then_resume_matches_uninterrupted_run(corpus, baseline):
    base_out, _ = baseline
    out = corpus / "killed"
    proc = subprocess.Popen([sys.executable, "train_pretrain.py", *flags(corpus, out)], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("saved") and "at step 6" in line:
            os.kill(proc.pid, signal.SIGKILL)  # in the middle of the run, no chance to clean up
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    killed_at = training.load_checkpoint(out)["step"]
    assert 6 <= killed_at < 30

    run(["train_pretrain.py", *flags(corpus, out), "--resume"])
    base, resumed = train_losses(base_out), train_losses(out)
    assert sorted(resumed) == list(range(1, 31))  # the log was cut back to the checkpoint
    # bitwise: same float at every step, and the same final weights and optimizer moments
    assert resumed == base
    a = torch.load(base_out / "ckpt.pt", weights_only=True)
    b = torch.load(out / "ckpt.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][k]["exp_avg_sq"],
                           b["optimizer"]["state"][k]["exp_avg_sq"]), k


def val_losses(out_dir):
    recs = [json.loads(l) for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(corpus, parallel):
    # global batch: 2 ranks x 2 sequences x 1 micro-step == 1 process x 2 sequences x 2 micro-steps
    common = dict(batch_size=2, batch_tokens=4 * SEQ, max_steps=8, save_every=0, eval_every=4)
    single = corpus / "single"
    if not (single / "ckpt.pt").exists():
        torch.set_num_threads(1)
        run_here(flags(corpus, single, **common))
    multi = corpus / parallel
    proc = run(["--standalone", "--nproc_per_node=2", "train_pretrain.py",
                *flags(corpus, multi, parallel=parallel, samples=1, sample_tokens=4, **common)],
               launcher=(sys.executable, "-m", "torch.distributed.run"))
    assert "1 accumulation x 2 processes" in proc.stdout
    assert "--- sample 1 (step 8) ---" in proc.stdout  # sampling works on sharded (FSDP) weights too
    one, two = train_losses(single), train_losses(multi)
    assert sorted(one) == sorted(two) == list(range(1, 9))
    for s in one:
        assert abs(one[s] - two[s]) < 2e-5, (s, one[s], two[s])
    assert one[8] < one[1] - 0.3  # and it learned something
    # the validation set is the same whatever the number of processes
    v1, v2 = val_losses(single), val_losses(multi)
    assert sorted(v1) == sorted(v2) == [4, 8]
    assert all(abs(v1[s] - v2[s]) < 2e-5 for s in v1), (v1, v2)
    # rank 0 wrote one ordinary full checkpoint, also under FSDP
    model, _ = llama2.load_model(str(multi))
    ref = torch.load(single / "ckpt.pt", weights_only=True)["model"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-4)


def test_bad_input_is_a_clear_error(corpus, baseline, tmp_path):
    # a sequence longer than the model's context
    with pytest.raises(SystemExit, match="does not fit the model's context"):
        run_here(flags(corpus, tmp_path / "a", seq_len=4096))
    # a global batch that is not a whole number of micro-batches
    with pytest.raises(SystemExit, match="--batch_tokens 100 is not a multiple"):
        run_here(flags(corpus, tmp_path / "a", batch_tokens=100))
    # resuming a checkpoint with a different model shape
    shutil.copytree(baseline[0], tmp_path / "b")
    with pytest.raises(SystemExit, match="the model shape differs") as e:
        run_here([*flags(corpus, tmp_path / "b", dim=128), "--resume"])
    assert "dim: checkpoint has 64, this run asks for 128" in str(e.value)
    # --resume with nothing to resume
    with pytest.raises(SystemExit, match="does not exist; drop --resume"):
        run_here([*flags(corpus, tmp_path / "c"), "--resume"])
    # missing data, a value that is not a number
    with pytest.raises(SystemExit, match="no such file or folder"):
        run_here(flags(corpus, tmp_path / "c", data=tmp_path / "nope.txt"))
    # and as a user sees it: one line on stderr, no traceback
    p = run(["train_pretrain.py", *flags(corpus, tmp_path / "a", seq_len=4096)], check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: --seq_len 4096 does not fit")


def test_bench_train_measures_both_paths_on_the_same_model(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_train
    import llama2_kernels
    torch.set_num_threads(1)
    before = llama2.kernels_in_use()
    out = bench_train.main(["--preset", "tiny", "--batch_size", "2", "--seq_len", "16",
                            "--steps", "1", "--warmup", "0", "--device", "cpu", "--dtype",
                            "float32",  # the two paths' losses are compared to float32 rounding
                            "--json", str(tmp_path / "b.json")])
    by = {r["path"]: r for r in out["results"]}
    assert json.loads((tmp_path / "b.json").read_text())["results"] == out["results"]
    assert by["ref"]["tokens_per_s"] > 0 and 0 < by["ref"]["mfu"]
    assert out["flops_per_token"] == 6 * out["n_params"] + 12 * 2 * 64 * 16
    if llama2_kernels.AVAILABLE:
        # same seed, same batch: the first step's loss agrees across the two kernel paths
        assert abs(by["ext"]["loss"] - by["ref"]["loss"]) < 1e-5
        assert out["ext_over_ref"] == pytest.approx(by["ext"]["tokens_per_s"]
                                                    / by["ref"]["tokens_per_s"])
    else:
        assert "ext" not in by
    llama2.set_kernels(before)
