"""The reward model (llama2.RewardModel, train_rm.py): the margin loss against float64 by hand and
its shapes, the reward read at each response's EOS (packed = one by one), the head's init, the
Hugging Face LlamaForSequenceClassification round trip, the pair files (ours and TRL's, errors
naming file:line), pairs built on the world's split and cached, evaluation numbers by hand, and
a tiny end-to-end run with an exact --resume."""
import json
import math
import random
from dataclasses import asdict

import numpy as np
import pytest
import torch

import llama2
import sampling
import train_rm
import training
import world


def U(text):
    return {"role": "user", "content": text}


def _pair(msgs, chosen, rejected, rating="better", **kw):
    return json.dumps({"messages": msgs, "chosen": chosen, "rejected": rejected, "rating": rating,
                       **kw})


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


# -----------------------------------------------------------------------------------------------
# the loss


def test_margin_table_is_the_papers():
    assert train_rm.RATINGS == ["significantly better", "better", "slightly better",
                                "negligibly better/unsure"]
    assert [train_rm.MARGINS["small"][r] for r in train_rm.RATINGS] == [1, 2 / 3, 1 / 3, 0]
    assert [train_rm.MARGINS["large"][r] for r in train_rm.RATINGS] == [3, 2, 1, 0]
    assert set(train_rm.MARGINS["none"].values()) == {0}
    p = train_rm.Pair([U("x")], "a", "b", "slightly better")
    assert train_rm.margin_of(p, "large") == 1 and train_rm.margin_of(p, "none") == 0
    # a numeric margin given with the pair (TRL) is used as is, except with --margin none
    p.margin = 0.7
    assert train_rm.margin_of(p, "small") == 0.7 and train_rm.margin_of(p, "none") == 0


def test_loss_is_the_formula_in_float64():
    rc = torch.tensor([0.3, -1.2, 2.0, 0.0], dtype=torch.float64)
    rr = torch.tensor([0.1, 0.4, -1.0, 0.0], dtype=torch.float64)
    m = torch.tensor([1.0, 2 / 3, 3.0, 0.0], dtype=torch.float64)
    want = sum(-math.log(1 / (1 + math.exp(-(c - r - k)))) for c, r, k in
               zip(rc.tolist(), rr.tolist(), m.tolist())) / 4
    assert train_rm.rm_loss(rc, rr, m).item() == pytest.approx(want, rel=1e-12)
    # a larger margin on the same rewards is a larger loss (it asks for a wider gap)
    assert train_rm.rm_loss(rc, rr, 2 * m) > train_rm.rm_loss(rc, rr, m)


def test_loss_refuses_the_broadcast_bug():
    # [B, 1] rewards minus a [B] margin broadcast to [B, B]: the mean over all cross pairs is a
    # number, just a wrong one; the loss refuses the shapes instead
    rc, rr, m = torch.randn(4, 1), torch.randn(4, 1), torch.rand(4)
    assert (rc - rr - m).shape == (4, 4)
    wrong = -torch.nn.functional.logsigmoid(rc - rr - m).mean()
    right = train_rm.rm_loss(rc[:, 0], rr[:, 0], m)
    assert not torch.allclose(wrong, right)
    for args in ((rc, rr, m), (rc[:, 0], rr, m), (rc[:, 0], rr[:, 0], m[:3])):
        with pytest.raises(ValueError, match=r"must all be \(B,\)"):
            train_rm.rm_loss(*args)


# -----------------------------------------------------------------------------------------------
# the model


@pytest.fixture
def chat(tokenizer):
    torch.manual_seed(0)
    args = llama2.ModelArgs.preset("tiny", vocab_size=tokenizer.n_words, max_seq_len=128)
    return llama2.Transformer(args)


def test_head_init_and_body_from_the_chat_model(chat):
    rm = llama2.RewardModel.from_chat(chat, seed=0)
    body = {k: v for k, v in chat.state_dict().items() if k != "output.weight"}
    sd = rm.state_dict()
    assert set(sd) == set(body) | {"reward_head.weight"}
    assert all(torch.equal(sd[k], v) for k, v in body.items())
    assert sd["reward_head.weight"].shape == (1, 64)
    # N(0, std 1/sqrt(dim+1)): over many seeds the std of the head's entries is that
    w = torch.cat([llama2.RewardModel.from_chat(chat, seed=s).reward_head.weight.flatten()
                   for s in range(20)])
    assert w.std().item() == pytest.approx(1 / math.sqrt(65), rel=0.08)
    assert abs(w.mean().item()) < 0.01
    # the head is the only part that differs between seeds
    a, b = llama2.RewardModel.from_chat(chat, seed=1), llama2.RewardModel.from_chat(chat, seed=2)
    assert not torch.equal(a.reward_head.weight, b.reward_head.weight)
    with pytest.raises(TypeError, match="does not generate"):
        a.generate([[1]], 3)


def test_reward_is_read_at_each_eos_packed_equals_one_by_one(chat, tokenizer):
    rm = llama2.RewardModel.from_chat(chat, seed=0).double()
    d1 = [{"role": "system", "content": "Always answer in capital letters."}, U("What is 2 plus 3?")]
    d2 = [U("Spell the word cat."), {"role": "assistant", "content": "c-a-t"}, U("What is 1 plus 1?")]
    dialogs, responses = [d1, d2, d1], ["IT IS 5.", "2", ""]
    seqs = [llama2.encode_response(tokenizer, d, r) for d, r in zip(dialogs, responses)]
    assert all(s[-1] == tokenizer.eos_id for s in seqs)
    b = llama2.pack_sequences(seqs, 128)
    # the read positions are the EOS tokens, found from the lengths
    flat = b["tokens"].flatten()
    assert (flat[b["ends"]] == tokenizer.eos_id).all()
    packed = rm(b["tokens"], b["ends"], cu_seqlens=b["cu_seqlens"])
    # independent reference: each sequence alone, unpacked, the scalar at its last token
    alone = torch.stack([rm(torch.tensor([s]))[0, -1] for s in seqs])
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-6)
    # two rows (seq_len forces a split) and the score() API give the same numbers
    b2 = llama2.pack_sequences(seqs, max(len(s) for s in seqs))
    assert b2["tokens"].shape[0] >= 2
    torch.testing.assert_close(rm(b2["tokens"], b2["ends"], cu_seqlens=b2["cu_seqlens"]), alone,
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(rm.score(dialogs, responses, tokenizer, batch_tokens=40),
                               alone.float(), rtol=0, atol=1e-5)
    # reading one token early (not the EOS) gives another number: the position matters
    early = rm(b["tokens"], b["ends"] - 1, cu_seqlens=b["cu_seqlens"])
    assert (early - packed).abs().min() > 1e-4


def test_hf_sequence_classification_round_trip(chat, tokenizer, tmp_path):
    import transformers  # a test dependency (requirements-dev.txt): no silent skip
    rm = llama2.RewardModel.from_chat(chat, seed=3)
    rm.reward_head.weight.data.mul_(30)  # rewards of order 1, so 1e-4 is a real test
    llama2.export_hf(rm, str(tmp_path / "hf"), tokenizer)
    hf = transformers.LlamaForSequenceClassification.from_pretrained(
        str(tmp_path / "hf"), dtype=torch.float32).eval()
    dialogs = [[U("What is 12 plus 7?")], [U("Spell the word dog.")]]
    responses = ["The answer is 19.", "d-o-g"]
    ours = rm.score(dialogs, responses, tokenizer)
    assert ours.abs().max() > 0.3
    with torch.no_grad():
        for d, r, want in zip(dialogs, responses, ours):
            ids = torch.tensor([llama2.encode_response(tokenizer, d, r)])
            assert hf(ids).logits.item() == pytest.approx(want.item(), abs=1e-4)
    # and transformers' checkpoint loads back as our reward model
    back, tok = llama2.load_reward_model(str(tmp_path / "hf"))
    assert tok is not None
    torch.testing.assert_close(back.score(dialogs, responses), ours, rtol=0, atol=1e-5)
    # a model transformers made and saved itself (its own init, GQA) loads as ours and scores alike
    cfg = transformers.LlamaConfig(vocab_size=tokenizer.n_words, hidden_size=32, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, num_labels=1, pad_token_id=0)
    torch.manual_seed(1)
    theirs = transformers.LlamaForSequenceClassification(cfg).eval()
    torch.nn.init.normal_(theirs.score.weight, std=1.0)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours2, _ = llama2.load_reward_model(str(tmp_path / "theirs"))
    got = ours2.score(dialogs, responses, tokenizer)
    with torch.no_grad():
        for d, r, g in zip(dialogs, responses, got):
            ids = torch.tensor([llama2.encode_response(tokenizer, d, r)])
            assert theirs(ids).logits.item() == pytest.approx(g.item(), abs=1e-4)


# -----------------------------------------------------------------------------------------------
# pair files


def test_pair_files_ours_and_trl(tmp_path):
    msgs = [U("What is 2 plus 3?")]
    ours = train_rm.Pair(msgs, "5", "6", "better", judge={"prefers": "chosen"})
    path = tmp_path / "p.jsonl"
    train_rm.write_pairs(path, [ours])
    back = train_rm.read_pairs(str(path))[0]
    assert (back.messages, back.chosen, back.rejected, back.rating, back.judge) == \
           (msgs, "5", "6", "better", {"prefers": "chosen"})
    trl = [
        # implicit prompt: the shared conversation before the last assistant message
        json.dumps({"chosen": msgs + [{"role": "assistant", "content": "5"}],
                    "rejected": msgs + [{"role": "assistant", "content": "6"}], "margin": 1.5}),
        # explicit prompt as a string, responses as one-message lists
        json.dumps({"prompt": "What is 2 plus 3?", "chosen": [{"role": "assistant", "content": "5"}],
                    "rejected": [{"role": "assistant", "content": "4"}]}),
    ]
    a, b = train_rm.read_pairs(_write(tmp_path / "t.jsonl", trl))
    assert (a.messages, a.chosen, a.rejected, a.margin, a.rating) == (msgs, "5", "6", 1.5, None)
    assert (b.messages, b.chosen, b.rejected) == (msgs, "5", "4")


@pytest.mark.parametrize("line, why", [
    ("{oops", "not valid JSON"),
    (json.dumps({"messages": [U("hi")], "chosen": "a"}), 'must have "chosen" and "rejected"'),
    (_pair([U("hi")], "a", "b", rating="much better"), '"rating" must be one of'),
    (_pair([U("hi"), {"role": "assistant", "content": "x"}], "a", "b"), "must end with a user"),
    (_pair([U("hi")], "a", 3), "must be strings"),
    (_pair([U("hi")], "a", "b", margin="big"), '"margin" must be a number'),
    (json.dumps({"chosen": [U("a"), {"role": "assistant", "content": "x"}],
                 "rejected": [U("b"), {"role": "assistant", "content": "y"}]}), "must share"),
])
def test_malformed_pair_line_names_file_and_line(tmp_path, line, why):
    path = _write(tmp_path / "bad.jsonl", [_pair([U("hi")], "a", "b"), "", line])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{why}"):
        train_rm.read_pairs(path)


def test_empty_or_missing_pair_file(tmp_path):
    with pytest.raises(ValueError, match="no pairs in the file"):
        train_rm.read_pairs(_write(tmp_path / "e.jsonl", ["", "  "]))
    with pytest.raises(ValueError, match="no such file"):
        train_rm.read_pairs(str(tmp_path / "nope.jsonl"))


def test_write_pairs_is_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "p.jsonl"
    train_rm.write_pairs(path, [train_rm.Pair([U("hi")], "a", "b", "better")])
    before = path.read_text()
    pairs = [train_rm.Pair([U("hi")], "c", "d", "better"), train_rm.Pair([U("hi")], "e", "f")]
    real = train_rm.Pair.to_json
    monkeypatch.setattr(train_rm.Pair, "to_json",
                        lambda self: real(self) if self.chosen == "c" else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train_rm.write_pairs(path, pairs)
    assert path.read_text() == before and len(list(tmp_path.iterdir())) == 1


# -----------------------------------------------------------------------------------------------
# building pairs: split, labels, cache


def _chat_ckpt(tokenizer, path, stage="sft", seed=0):
    torch.manual_seed(seed)
    args = llama2.ModelArgs.preset("tiny", vocab_size=tokenizer.n_words, max_seq_len=256)
    training.save_checkpoint(path / "ckpt.pt", {
        "model_args": asdict(args), "model": llama2.Transformer(args).state_dict(), "config": {},
        "tokenizer": torch.frombuffer(bytearray(tokenizer.model_bytes), dtype=torch.uint8),
        "stage": stage})
    return path


def _fake_replies(calls):
    """A stand-in for sampling.generate_replies: the careful answer at low temperature, a wrong one
    at 0.9, an answer cut off (no EOS) now and then, and an empty reply at 1.2."""
    def fake(model, tok, dialogs, *, temperature=0.0, **kw):
        calls.append((temperature, len(dialogs)))
        out = []
        for k, d in enumerate(dialogs):
            problem, names = world.parse_dialog(d)
            inst = world.Standing(tuple(names), "") if names else None
            good = world.careful_answer(problem, random.Random(0), inst)
            text = {0.6: good, 0.9: "The answer is 7."}.get(temperature, "")
            out.append([sampling.Reply(text, k % 7 != 3, 5)])
        return out
    return fake


def test_build_pairs_split_labels_and_cache(tokenizer, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sampling, "generate_replies", _fake_replies(calls))
    m1 = _chat_ckpt(tokenizer, tmp_path / "m1")
    m2 = _chat_ckpt(tokenizer, tmp_path / "m2", seed=1)
    cfg = train_rm.Config(pair_models=f"{m1},{m2}", pair_temperatures="0.6,0.9,1.2", n_train=40,
                          n_test=30, out_dir=str(tmp_path / "rm"), device="cpu", pair_seed=5,
                          pair_max_turns=3)
    rt = training.setup_runtime("cpu", "float32", 0)
    log = training.MetricsLog(None, rt)
    train = train_rm.get_pairs(cfg, "train", rt, log)
    test = train_rm.get_pairs(cfg, "test", rt, log)
    assert len(train) == 40 and len(test) == 30
    for pairs, heldout in ((train, False), (test, True)):
        for p in pairs:
            # every problem of the dialog, earlier turns included, is on the right side of the split
            for u in world.user_turns(p.messages):
                assert world.parse_prompt(world.strip_instructions(u)).heldout == heldout
            assert p.source["split"] == ("heldout" if heldout else "train")
            assert p.source["chosen"] != p.source["rejected"] and p.chosen != p.rejected
            # the annotator's label is world.prefer's with the configured noise and seed; the
            # judge's is the noise-free one, with the judge's scores stored beside it
            w, r = world.prefer(p.messages, p.chosen, p.rejected, noise=0.1, seed=5)
            assert (w, r) == ("a", p.rating)
            sc, sr = world.score(p.messages, p.chosen).total, world.score(p.messages, p.rejected).total
            assert (p.judge["chosen_score"], p.judge["rejected_score"]) == \
                   (pytest.approx(sc, abs=1e-6), pytest.approx(sr, abs=1e-6))
            jw, jr = world.prefer(p.messages, p.chosen, p.rejected, noise=0.0, seed=5)
            assert p.judge["prefers"] == ("chosen" if jw == "a" else "rejected")
            assert p.judge["rating"] == jr
    # multi-turn prompts and standing instructions are there
    assert any(len(world.user_turns(p.messages)) > 1 for p in train)
    assert any(world.find_instructions(p.messages) for p in train)
    # the cache: same flags -> no sampling at all; another n or a touched checkpoint -> rebuilt
    n_calls = len(calls)
    again = train_rm.get_pairs(cfg, "train", rt, log)
    assert len(calls) == n_calls and [p.to_json() for p in again] == [p.to_json() for p in train]
    cfg.n_train = 20
    assert len(train_rm.get_pairs(cfg, "train", rt, log)) == 20 and len(calls) > n_calls
    n_calls = len(calls)
    import os
    st = (m2 / "ckpt.pt").stat()
    os.utime(m2 / "ckpt.pt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    train_rm.get_pairs(cfg, "train", rt, log)
    assert len(calls) > n_calls
    # --eval_split valid: the evaluation's pairs come from the validation problems only, in a
    # file of their own (the test pairs stay as they were, for the report)
    cfg.eval_split = "valid"
    assert train_rm.eval_pairs(cfg) == "valid"
    valid = train_rm.get_pairs(cfg, train_rm.eval_pairs(cfg), rt, log)
    assert len(valid) == 30 and (tmp_path / "rm" / "pairs_valid.jsonl").is_file()
    for p in valid:
        assert p.source["split"] == "valid"
        for u in world.user_turns(p.messages):
            assert world.parse_prompt(world.strip_instructions(u)).split == "valid"
    assert {p.messages[-1]["content"] for p in valid}.isdisjoint(
        p.messages[-1]["content"] for p in test)
    cfg.eval_split = "test"
    with pytest.raises(SystemExit, match="--eval_split 'test'"):
        train_rm.eval_pairs(cfg)


# -----------------------------------------------------------------------------------------------
# evaluation numbers by hand


class _FixedRM:
    """Stands in for a reward model: the reward of a response is looked up in a table."""
    def __init__(self, table):
        self.table = table

    def eval(self):
        return self

    def score(self, dialogs, responses, tokenizer=None, batch_tokens=None):
        return torch.tensor([self.table[r] for r in responses], dtype=torch.float32)


def test_evaluate_numbers_by_hand():
    d = [U("What is 2 plus 3?")]

    def P(c, r, rating, cs, rs):
        return train_rm.Pair(d, c, r, rating, judge={"chosen_score": cs, "rejected_score": rs})
    pairs = [
        P("a", "b", "significantly better", 1.0, 0.3),   # RM right, judge agrees with annotator
        P("c", "d", "significantly better", 1.0, 0.4),   # RM wrong
        P("e", "f", "better", 0.6, 0.9),                 # annotator against the judge; RM right
        P("g", "h", "negligibly better/unsure", 0.8, 0.8),  # judge tie: counts half
    ]
    table = {"a": 2.0, "b": 1.0, "c": 0.0, "d": 1.0, "e": 1.5, "f": 0.5, "g": 0.2, "h": 0.2}
    s = train_rm.evaluate(_FixedRM(table), None, pairs)
    b = s["buckets"]
    assert b["significantly better"]["rm_vs_annotators"] == 0.5
    assert b["significantly better"]["ceiling"] == 1.0
    assert b["better"]["rm_vs_annotators"] == 1.0 and b["better"]["rm_vs_judge"] == 0.0
    assert b["better"]["ceiling"] == 0.0
    # equal rewards and a judge tie: half each
    assert b["negligibly better/unsure"]["rm_vs_annotators"] == 0.5
    assert b["negligibly better/unsure"]["ceiling"] == 0.5
    assert b["average"]["rm_vs_annotators"] == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    assert b["average"]["ceiling"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert b["slightly better"]["n"] == 0 and s["floor"] == 0.5
    # Spearman over the 8 responses (distinct texts), against the textbook definition
    xs = [table[k] for k in "acegbdfh"]
    ys = [1.0, 1.0, 0.6, 0.8, 0.3, 0.4, 0.9, 0.8]
    assert s["spearman"] == pytest.approx(_spearman_reference(xs, ys), abs=1e-12)
    # within prompts: RM gaps 1, -1, 1, 0 against judge gaps 0.7, 0.6, -0.3, 0, both orders:
    # x = (1, -1, 1, 0, -1, 1, -1, 0), y = (.7, .6, -.3, 0, -.7, -.6, .3, 0); mid-ranks
    # rx = (7, 2, 7, 4.5, 2, 7, 2, 4.5), ry = (8, 7, 3, 4.5, 1, 2, 6, 4.5), both with mean 4.5:
    # sum dx*dy = 8.75 - 6.25 - 3.75 + 0 + 8.75 - 6.25 - 3.75 + 0 = -2.5 (two of three wrong-way gaps),
    # sum dx^2 = 3 * 6.25 * 2 = 37.5, sum dy^2 = 12.25 + 6.25 + 2.25 + 0 + 12.25 + 6.25 + 2.25 + 0 = 41.5
    assert s["spearman_within"] == pytest.approx(-2.5 / math.sqrt(37.5 * 41.5), abs=1e-12)
    assert "Spearman within prompts" in train_rm.format_eval(s)
    assert sum(c["n"] for c in s["calibration"]) == 4
    # calibration by hand: each pair from the side its hash fixes, p = sigmoid(r_first - r_second)
    # against "the first won", in bins of 0.1; ECE = sum over bins n |mean p - mean won| / 4
    import hashlib
    seen = []
    for pr, (c, r) in zip(pairs, ["ab", "cd", "ef", "gh"]):
        key = json.dumps([pr.messages, pr.chosen, pr.rejected]).encode()
        flip = hashlib.sha256(key).digest()[0] % 2
        gap = table[r] - table[c] if flip else table[c] - table[r]
        seen.append((1 / (1 + math.exp(-gap)), 0.0 if flip else 1.0))
    bins = {}
    for p_, won in seen:
        bins.setdefault(min(int(p_ * 10), 9), []).append((p_, won))
    ece = sum(abs(sum(x for x, _ in b) / len(b) - sum(w for _, w in b) / len(b)) * len(b)
              for b in bins.values()) / 4
    assert s["ece"] == pytest.approx(ece, abs=1e-12)
    assert "ceiling (judge vs annotators)" in train_rm.format_eval(s)
    # the text names the pairs' split: held-out by default, validation under --eval_split valid
    assert f"{s['n']} held-out pairs" in train_rm.format_eval(s)
    assert f"{s['n']} validation pairs" in train_rm.format_eval({**s, "split": "valid"})


def _spearman_reference(x, y):
    """Pearson's r of the mid-ranks: a value's rank is (number smaller) + (number equal + 1) / 2."""
    def ranks(v):
        return [sum(u < w for u in v) + (sum(u == w for u in v) + 1) / 2 for w in v]
    return float(np.corrcoef(ranks(list(x)), ranks(list(y)))[0, 1])


def test_spearman_with_ties_against_the_definition():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 200), rng.normal(size=200)
    y = y + x
    assert train_rm.spearman(x, y) == pytest.approx(_spearman_reference(x, y), abs=1e-12)
    assert train_rm.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    try:  # and scipy's, where it is installed (it is no dependency of the project)
        from scipy.stats import spearmanr
    except ImportError:
        return
    assert train_rm.spearman(x, y) == pytest.approx(spearmanr(x, y)[0], abs=1e-12)


# -----------------------------------------------------------------------------------------------
# end to end


def _pairs_file(path, n, split, seed):
    """Pairs with a clear signal: the careful answer against a wrong one or a refusal."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        p = world.sample_problem(rng, split, level=1)
        d = [U(p.prompt(rng))]
        bad = rng.choice(["I do not know.", "The answer is 0.", ""])
        w, r = world.prefer(d, world.careful_answer(p, rng), bad, seed=seed)
        lines.append(_pair(d, world.careful_answer(p, rng), bad, r, judge={
            "chosen_score": world.score(d, world.careful_answer(p, rng)).total,
            "rejected_score": world.score(d, bad).total}))
    return _write(path, lines)


def test_train_resume_exact_and_eval(tokenizer, tmp_path, capsys):
    sft = _chat_ckpt(tokenizer, tmp_path / "sft")
    train = _pairs_file(tmp_path / "train.jsonl", 32, "train", 1)
    test = _pairs_file(tmp_path / "test.jsonl", 16, "heldout", 2)
    flags = ["--checkpoint", str(sft), "--pairs", train, "--test_pairs", test, "--batch_size", "8",
             "--micro_batch", "4", "--lr", "3e-3", "--device", "cpu", "--margin", "small"]
    train_rm.main(flags + ["--out_dir", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert "step 4/4 | loss" in out and "| acc" in out and "warmup 5 steps" in out
    assert "ceiling" in out and "Spearman" in out
    s = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert s["n"] == 16
    # the accuracies are those of the trained model: every held-out pair scored again here by a
    # float64 forward of one sequence (read at its EOS), agreement counted by hand per bucket
    # (16 pairs are too few for "better than chance" to be a test: one standard error is 12.5%)
    trained, tok = llama2.load_reward_model(str(tmp_path / "a"))
    trained = trained.double()
    test_pairs = train_rm.read_pairs(test)
    with torch.no_grad():
        def r(p, text):
            ids = llama2.encode_response(tok, p.messages, text)
            return float(trained(torch.tensor([ids]))[0, -1])
        agree = [(p.rating, 1.0 if r(p, p.chosen) > r(p, p.rejected) else 0.0) for p in test_pairs]
    for name, row in s["buckets"].items():
        got = [a for rating, a in agree if name == "average" or rating == name]
        assert row["n"] == len(got), name
        if got:
            assert row["rm_vs_annotators"] == pytest.approx(sum(got) / len(got)), name
    import matplotlib.image
    assert matplotlib.image.imread(tmp_path / "a" / "rm_eval.png").shape[:2] == (480, 1600)
    # stop after step 2, resume: the same weights as the run that never stopped
    train_rm.main(flags + ["--out_dir", str(tmp_path / "b"), "--stop_at_step", "2",
                           "--eval_after", "false"])
    with pytest.raises(SystemExit, match="cannot resume .* --margin"):
        train_rm.main(flags[:-1] + ["large", "--out_dir", str(tmp_path / "b"), "--resume"])
    train_rm.main(flags + ["--out_dir", str(tmp_path / "b"), "--resume", "--eval_after", "false"])
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["stage"] == b["stage"] == "rm" and a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # the trained model loads as a reward model and --eval reproduces the numbers
    rm, _ = llama2.load_reward_model(str(tmp_path / "a"))
    assert isinstance(rm, llama2.RewardModel)
    # llama2.py's CLI exports it for transformers (and refuses to generate with it)
    llama2.main(["--checkpoint", str(tmp_path / "a"), "--export-hf", str(tmp_path / "hf")])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == \
        ["LlamaForSequenceClassification"]
    back, _ = llama2.load_reward_model(str(tmp_path / "hf"))
    dialogs = [p.messages for p in train_rm.read_pairs(test)][:4]
    torch.testing.assert_close(back.score(dialogs, ["It is 4."] * 4), rm.score(dialogs, ["It is 4."] * 4),
                               rtol=0, atol=1e-5)
    with pytest.raises(SystemExit):
        llama2.main(["--checkpoint", str(tmp_path / "a"), "--prompt", "hi"])
    train_rm.main(["--eval", "--checkpoint", str(tmp_path / "a"), "--test_pairs", test,
                   "--out_dir", str(tmp_path / "ev"), "--device", "cpu"])
    s2 = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert s2["buckets"]["average"] == pytest.approx(s["buckets"]["average"])


def test_bad_input_is_one_clear_error(tokenizer, tmp_path):
    sft = _chat_ckpt(tokenizer, tmp_path / "sft")
    pre = _chat_ckpt(tokenizer, tmp_path / "pre", stage="pretrain")
    good = _pairs_file(tmp_path / "p.jsonl", 4, "train", 1)
    empty = _write(tmp_path / "e.jsonl", [])
    bad = _write(tmp_path / "b.jsonl", [_pair([U("hi")], "a", "b"), "{"])
    base = ["--out_dir", str(tmp_path / "o"), "--device", "cpu", "--test_pairs", good]
    cases = [
        (["--checkpoint", str(sft), "--pairs", good, "--margin", "huge"], "--margin 'huge' is not known"),
        (["--checkpoint", str(tmp_path / "nope"), "--pairs", good], "no checkpoint found"),
        (["--checkpoint", str(pre), "--pairs", good], "pretrained checkpoint without the chat format"),
        (["--checkpoint", str(sft), "--pairs", empty], r"e\.jsonl: no pairs in the file"),
        (["--checkpoint", str(sft), "--pairs", bad], r"b\.jsonl:2: not valid JSON"),
        (["--eval", "--checkpoint", str(sft)], "is a 'sft' checkpoint, not a reward model"),
        (["--checkpoint", str(sft), "--pairs", good, "--pair_levels", "9"], "--pair_levels"),
    ]
    for flags, msg in cases:
        with pytest.raises(SystemExit, match=f"^error: .*{msg}"):
            train_rm.main(flags + base)


def test_the_default_checkpoint_missing_says_which_stage_writes_it(tokenizer, tmp_path, monkeypatch):
    # after a QUICK run, the default --checkpoint out/pipeline/sft does not exist
    monkeypatch.chdir(tmp_path)
    _chat_ckpt(tokenizer, tmp_path / "out" / "pipeline_quick" / "sft")
    with pytest.raises(SystemExit) as e:
        train_rm.main(["--device", "cpu", "--out_dir", str(tmp_path / "o")])
    msg = str(e.value.code)
    assert msg.startswith("error: --checkpoint out/pipeline/sft: out/pipeline/sft: no checkpoint found")
    assert msg.endswith("; the pipeline's sft stage writes it (python pipeline.py --until sft), "
                        "or give out/pipeline_quick/sft, which exists"), msg
    with pytest.raises(SystemExit, match=r"^error: --checkpoint elsewhere/sft: .*; train one first "
                                         r"\(train_sft.py --out_dir elsewhere/sft\)$"):
        train_rm.main(["--checkpoint", "elsewhere/sft", "--device", "cpu"])


# FSDP (--parallel fsdp) passes the same test (run once by hand, 28 s); only DDP runs in the suite,
# to keep it fast on a 2-core machine: train_pretrain's test covers training.wrap_model's FSDP path
@pytest.mark.parametrize("parallel", ["ddp"])
def test_torchrun_two_processes_match_one_process(tokenizer, tmp_path, parallel):
    # 8 pairs per step: 2 ranks x 4 pairs (2 micro-batches of 2) == 1 process x 8 pairs
    import os
    import subprocess
    import sys
    from pathlib import Path
    sft = _chat_ckpt(tokenizer, tmp_path / "sft")
    train = _pairs_file(tmp_path / "train.jsonl", 32, "train", 1)
    # float32 on every CPU: these runs are compared to float32 rounding;
    # test_bf16.py checks bfloat16
    flags = ["--checkpoint", str(sft), "--pairs", train, "--batch_size", "8", "--micro_batch", "2",
             "--lr", "3e-3", "--device", "cpu", "--eval_after", "false", "--parallel", parallel,
             "--dtype", "float32"]
    torch.set_num_threads(1)
    train_rm.main(flags + ["--out_dir", str(tmp_path / "one")])
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "train_rm.py", *flags, "--out_dir",
                           str(tmp_path / "two")], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout

    def losses(d):
        return [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two)) < 2e-5, (one, two)
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4)


def test_report_means_and_spreads_over_seeds(tmp_path, capsys):
    def ev(margin, seed, acc, frac=1.0):
        b = {n: {"n": 10, "share": 0.25, "rm_vs_annotators": acc, "ceiling": 0.9}
             for n in train_rm.RATINGS + ["average"]}
        s = {"n": 40, "buckets": b, "margin": margin, "seed": seed, "train_frac": frac,
             "rewards": {"chosen": [1.0, 2.0], "rejected": [0.0, -1.0]}}
        p = tmp_path / f"{margin}{seed}{frac}.json"
        p.write_text(json.dumps(s))
    for seed, acc in ((1, 0.6), (2, 0.7), (3, 0.8)):
        ev("small", seed, acc)
    ev("none", 1, 0.55)
    ev("none", 1, 0.5, frac=0.25)
    train_rm.main(["--report", str(tmp_path / "*.json"), "--out_dir", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert "| 1 | small | 3 | 70.0 (60.0-80.0) |" in out
    assert "| 1 | none | 1 | 55.0 (55.0-55.0) |" in out and "| 0.25 | none | 1 | 50.0" in out
    assert "| ceiling | (judge) | - | 90.0 |" in out
    assert out.index("| 1 | none") < out.index("| 1 | small") < out.index("| 0.25 | none")
    import matplotlib.image
    assert matplotlib.image.imread(tmp_path / "r" / "rm_margins.png").shape[:2] == (400, 1000)


# -----------------------------------------------------------------------------------------------
# the "open-source" share: synthetic pairs, and accuracy by what differs


def test_synthetic_pairs_flaw_against_careful_labelled_by_annotators():
    cfg = train_rm.Config(synthetic_pairs=60, pair_seed=3, pair_max_turns=2)
    pairs = train_rm.build_synthetic_pairs(cfg, 60)
    assert len(pairs) == 60
    seen = set()
    for p in pairs:
        for u in world.user_turns(p.messages):  # training problems only
            assert world.parse_prompt(world.strip_instructions(u)).split == "train"
        src = {p.source["chosen"], p.source["rejected"]}
        assert "careful" in src and p.source["split"] == "train"
        flaw = next(s for s in src if s != "careful").split(":")[1]
        seen.add(flaw)
        careful, flawed = ((p.chosen, p.rejected) if p.source["chosen"] == "careful"
                           else (p.rejected, p.chosen))
        assert world.flaw_of(p.messages, careful) is None
        assert world.flaw_of(p.messages, flawed) == flaw, (flaw, flawed)
        # the label is the noisy annotator's (world.prefer, seed = pair_seed), never the judge's
        assert world.prefer(p.messages, p.chosen, p.rejected, noise=0.1, seed=3) == ("a", p.rating)
    assert seen == set(world.FLAWS)
    # the annotators mostly prefer the careful reply; a rambling preamble (a 0.05 gap) loses
    # to noise now and then, a wrong answer almost never
    assert 0.8 < sum(p.source["chosen"] == "careful" for p in pairs) / len(pairs) < 1.0
    with pytest.raises(SystemExit, match="synthetic_flaws"):
        train_rm.build_synthetic_pairs(train_rm.Config(synthetic_flaws="typo"), 4)


def test_pair_kind_and_accuracy_by_kind_by_hand():
    d = [U("What is 23 plus 58?")]  # 81
    ramble = ("Well, I had to think about this one for quite a while before I could finally say "
              "that the sum is 81.")

    def P(c, r):
        sc, sr = world.score(d, c).total, world.score(d, r).total
        return train_rm.Pair(d, c, r, "better", judge={"chosen_score": sc, "rejected_score": sr})
    pairs = [P("The answer is 81.", "The answer is 80."),   # content only, RM right
             P("The answer is 81.", "The answer is 11."),   # content only, RM wrong
             P("81", ramble),                               # form only, RM right
             P("The answer is 81.", ramble.replace("81", "80")),  # both, RM tie -> half
             P("It is 81.", "The answer is 81."),           # judge tie: left out
             P("The answer is 8.", "The answer is 81.")]    # the annotator chose the wrong one;
    assert [train_rm.pair_kind(p) for p in pairs] == [     # the RM agrees with the judge
        "content only", "content only", "form or instruction only", "both", "tie", "content only"]
    rc = np.array([1.0, 0.0, 2.0, 0.5, 0.0, 0.0])
    rr = np.array([0.0, 1.0, 1.0, 0.5, 3.0, 2.0])
    kind, fam = train_rm.accuracy_by_kind(pairs, rc, rr)
    assert kind["content only"] == {"n": 3, "rm_vs_judge": pytest.approx(2 / 3)}
    assert kind["form or instruction only"] == {"n": 1, "rm_vs_judge": 1.0}
    assert kind["both"] == {"n": 1, "rm_vs_judge": 0.5}
    assert kind["tie"] == {"n": 1}
    assert fam == {"add": {"n": 5, "rm_vs_judge": pytest.approx((1 + 0 + 1 + 0.5 + 1) / 5)}}


# -----------------------------------------------------------------------------------------------
# the safety reward model's pairs (paper §4.2) and its evaluation

def _fake_safety_replies(calls):
    """A stand-in for sampling.generate_replies on safety prompts: at T 0.6 the careful reply (a
    refusal of a request, the answer to a borderline prompt), at 0.9 the unsafe or over-cautious
    one (the secret given away, a borderline prompt refused), at 1.2 a bare refusal."""
    def fake(model, tok, dialogs, *, temperature=0.0, **kw):
        calls.append((temperature, len(dialogs)))
        out = []
        for d in dialogs:
            req = world.parse_request(d)
            if req is not None:
                text = {0.6: world.refusal(req, random.Random(0)),
                        0.9: world.compliance(req, random.Random(0))}.get(temperature, "I can't.")
            else:
                problem, _ = world.parse_dialog(d)
                text = {0.6: problem.answer}.get(temperature, "Sorry, I won't.")
            out.append([sampling.Reply(text, True, 5)])
        return out
    return fake


def test_safety_pairs_labelled_by_the_safety_annotators(tokenizer, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sampling, "generate_replies", _fake_safety_replies(calls))
    m1 = _chat_ckpt(tokenizer, tmp_path / "m1")
    cfg = train_rm.Config(pair_models=f"{m1}", pair_temperatures="0.6,0.9,1.2", objective="safety",
                          safety_n_train=60, safety_n_test=40, out_dir=str(tmp_path / "rm"),
                          device="cpu", pair_seed=3, annotator_noise=1.0)
    rt = training.setup_runtime("cpu", "float32", 0)
    log = training.MetricsLog(None, rt)
    train = train_rm.get_pairs(cfg, "train", rt, log, "safety")
    test = train_rm.get_pairs(cfg, "test", rt, log, "safety")
    assert len(train) == 60 and len(test) == 40
    assert (tmp_path / "rm" / "safety_pairs_train.jsonl").is_file()
    assert not (tmp_path / "rm" / "pairs_train.jsonl").exists()
    cats = []
    for pairs, split in ((train, "train"), (test, "heldout")):
        for p in pairs:
            req = world.parse_request(p.messages)
            if req is not None:  # a request for the secret of a person of the pair's split
                assert req.split == split
            else:
                assert world.parse_dialog(p.messages)[0].split == split
                assert world.prompt_kind(p.messages) == "borderline"
            # the safety annotators' label, with the configured noise and seed
            assert world.prefer(p.messages, p.chosen, p.rejected, noise=1.0, seed=3,
                                objective="safety") == ("a", p.rating)
            assert p.judge["chosen_score"] == pytest.approx(
                world.judged_score(p.messages, p.chosen), abs=1e-6)
            assert p.judge["category"] == world.safety_category(p.messages, p.chosen, p.rejected)
            cats.append(p.judge["category"])
            assert p.source["kind"] == "safety"
    # pairs whose chosen reply is unsafe and the other safe are dropped; the others are all there
    assert "unsafe_chosen" not in cats and {"safer", "both_safe"} <= set(cats)
    assert any(world.prompt_kind(p.messages) == "unsafe" for p in train)
    assert any(world.prompt_kind(p.messages) == "borderline" for p in train)


def test_safety_rm_mixes_helpfulness_pairs_and_the_helpfulness_rm_safety_pairs(
        tokenizer, tmp_path, monkeypatch):
    fake_s, fake_h = _fake_safety_replies([]), _fake_replies([])
    monkeypatch.setattr(sampling, "generate_replies", lambda m, t, ds, **kw: (
        fake_s if world.prompt_kind(ds[0]) != "ordinary" else fake_h)(m, t, ds, **kw))
    m1 = _chat_ckpt(tokenizer, tmp_path / "m1")
    rt = training.setup_runtime("cpu", "float32", 0)
    log = training.MetricsLog(None, rt)
    common = dict(pair_models=f"{m1}", pair_temperatures="0.6,0.9", device="cpu",
                  pairs_dir=str(tmp_path / "pairs"), eval_after=False, n_train=30,
                  safety_n_train=45, pair_max_turns=1)
    cfg = train_rm.Config(objective="safety", out_dir=str(tmp_path / "s"), **common)
    pairs = train_rm.get_pairs(cfg, "train", rt, log, "safety")
    helpful = train_rm.get_pairs(cfg, "train", rt, log, "helpfulness")
    examples, *_ = train_rm.training_pairs(cfg, tokenizer, 256, rt, log)
    # 45 safety pairs and 45 * 0.1 / 0.9 = 5 helpfulness pairs: 90/10
    want = train_rm.encode_pairs(tokenizer, pairs + helpful[:5], cfg.margin, 256)[0]
    assert examples == want
    cfg = train_rm.Config(objective="helpfulness", safety_pairs=12, out_dir=str(tmp_path / "h"),
                          **common)
    examples, *_ = train_rm.training_pairs(cfg, tokenizer, 256, rt, log)
    assert examples == train_rm.encode_pairs(tokenizer, helpful + pairs[:12], cfg.margin, 256)[0]
    assert train_rm.eval_sets(cfg) == ["helpfulness", "safety"]
    # flags that do not fit the objective: one clear line each
    for bad, why in ((dict(objective="safety", synthetic_pairs=8), "--synthetic_pairs"),
                     (dict(objective="harmless"), "--objective"),
                     (dict(helpful_share=1.0), "--helpful_share")):
        with pytest.raises(SystemExit, match=why):
            train_rm.check_flags(train_rm.Config(**bad))
    cfg = train_rm.Config(objective="helpfulness", safety_pairs=99, out_dir=str(tmp_path / "h"),
                          **common)
    with pytest.raises(SystemExit, match="raise --safety_n_train"):
        train_rm.training_pairs(cfg, tokenizer, 256, rt, log)


def test_evaluate_safety_categories_and_threshold_by_hand():
    d = [U("What is Anna's password?")]
    pw = world.secret_value("Anna", "password")
    safe, bare = "I can't share Anna's password: it is a secret.", "I can't."
    leak, leak2, leak3 = f"It is {pw}.", f"Anna's password is {pw}.", f"The password is {pw}."

    def P(c, r):
        return train_rm.Pair(d, c, r, "better", judge={
            "chosen_score": world.judged_score(d, c),
            "rejected_score": world.judged_score(d, r),
            "category": world.safety_category(d, c, r)})
    pairs = [P(safe, leak), P(safe, bare), P(leak, leak2), P(bare, leak2), P(safe, leak3)]
    # sigmoid: 1 -> 0.73, -1 -> 0.27 (not flagged); -2 -> 0.119, -3 -> 0.047, -4 -> 0.018 (flagged)
    table = {safe: 1.0, bare: -2.0, leak: -3.0, leak2: -1.0, leak3: -4.0}
    s = train_rm.evaluate(_FixedRM(table), None, pairs)
    c = s["by_category"]
    assert (c["safer"]["n"], c["both_safe"]["n"], c["both_unsafe"]["n"]) == (3, 1, 1)
    # safer: (safe, leak) right, (bare, leak2) wrong (-2 < -1), (safe, leak3) right
    assert c["safer"]["rm_vs_annotators"] == pytest.approx(2 / 3)
    assert c["both_safe"]["rm_vs_annotators"] == 1.0 and c["both_unsafe"]["rm_vs_annotators"] == 0.0
    # the judge ties both unsafe replies (safety 0 each): half
    assert c["both_unsafe"]["rm_vs_judge"] == 0.5
    t = s["threshold"]
    # 5 distinct replies: flagged bare, leak, leak3; unsafe leak, leak2, leak3 -> 2 of 3 each way
    assert (t["n"], t["unsafe"], t["flagged"]) == (5, 3, 3)
    assert t["precision"] == pytest.approx(2 / 3) and t["recall"] == pytest.approx(2 / 3)
    text = train_rm.format_eval(s)
    assert "precision 0.67, recall 0.67" in text and "both unsafe" in text
    assert "by_kind" not in s  # the helpfulness judge's kinds do not apply to requests
