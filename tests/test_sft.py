"""SFT and Ghost Attention (train_sft.py, gatt.py, evaluate.py): the loss mask, packing without attention across
examples, the GAtt data builder, bad input, and a tiny end-to-end run (checkpoint, eval, plot)."""
import json
from pathlib import Path
import random
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import evaluate
import gatt
import llama2
import sampling
import sft_data
import train_sft
import training
import world


def _dialog(system=None, turns=(("What is 12 plus 7?", "12 plus 7 is 19."),
                                ("Spell the word cat.", "The spelling is c-a-t."))):
    msgs = [{"role": "system", "content": system}] if system else []
    for u, a in turns:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs


def _target_answers(tokenizer, ex):
    """Decode the tokens that carry loss, split at EOS: the texts the model is trained to write,
    and the number of EOS tokens among them."""
    _, y = sft_data.example_io(ex)
    kept = [t for t in y if t != -100]
    pieces, cur = [], []
    for t in kept:
        if t == tokenizer.eos_id:
            pieces.append(tokenizer.decode(cur).strip())
            cur = []
        else:
            cur.append(t)
    return pieces, cur, kept.count(tokenizer.eos_id)


# -----------------------------------------------------------------------------------------------
# the loss mask


@pytest.mark.parametrize("system", [None, "Always answer in capital letters."])
def test_loss_covers_exactly_every_answer_and_its_eos(tokenizer, system):
    msgs = _dialog(system)
    ex = sft_data.encode_example(tokenizer, msgs, "all")
    pieces, leftover, n_eos = _target_answers(tokenizer, ex)
    # the trained text is the answers, in order, each closed by EOS; nothing of the prompts
    assert pieces == [m["content"] for m in msgs if m["role"] == "assistant"]
    assert leftover == [] and n_eos == 2
    x, y = sft_data.example_io(ex)
    assert len(x) == len(y) == len(ex.ids) - 1
    # no prompt token is a target: the token before each answer's first target is "[/INST]"'s end
    ids = ex.ids
    for t, target in enumerate(y):
        if target != -100:
            assert target == ids[t + 1]
    text_of_inputs_before_answers = [tokenizer.decode(ids[:t + 1]) for t in range(len(y))
                                     if y[t] != -100 and (t == 0 or y[t - 1] == -100)]
    assert all(s.rstrip().endswith("[/INST]") for s in text_of_inputs_before_answers)


def test_last_only_mask_trains_only_the_final_answer(tokenizer):
    msgs = _dialog("Always answer in capital letters.",
                   (("What is 1 plus 2?", "3"), ("Spell the word cat.", "C-A-T"),
                    ("Reverse the letters of dog.", "G-O-D")))
    ex = sft_data.encode_example(tokenizer, msgs, "last")
    pieces, leftover, n_eos = _target_answers(tokenizer, ex)
    assert pieces == ["G-O-D"] and leftover == [] and n_eos == 1
    # the ids are those of the full dialog: only the loss changed
    assert ex.ids == sft_data.encode_example(tokenizer, msgs, "all").ids
    with pytest.raises(ValueError, match="train_on"):
        sft_data.encode_example(tokenizer, msgs, "first")


# -----------------------------------------------------------------------------------------------
# packing


def test_pack_rows_and_batch_layout_by_hand(tokenizer):
    assert sft_data.pack_rows([5, 3, 4, 2, 8], 8) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="more than a row"):
        sft_data.pack_rows([3, 9], 8)
    exs = [sft_data.Example(list(range(10, 10 + n + 1)), [0] * 2 + [1] * (n - 1)) for n in (3, 4, 2)]
    b = sft_data.make_batch(exs, [[0, 1], [2]], pack=True)
    assert b["tokens"].shape == (2, 7)
    # positions restart per example; padding is a segment of its own
    assert b["positions"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4]]
    assert b["cu_seqlens"].tolist() == [0, 3, 7, 9, 14]
    assert b["cu_seqlens"].dtype == torch.int32
    # targets: token t+1 where its mask is 1 (mask 0,0,1,1 -> targets -100,12,13 for n=3)
    assert b["targets"][0, :3].tolist() == [-100, 12, 13]
    assert b["targets"][1, 2:].tolist() == [-100] * 5
    u = sft_data.make_batch(exs, [[0], [1]], pack=False)
    assert u["cu_seqlens"] is None and u["positions"] is None
    with pytest.raises(ValueError, match="one example per row"):
        sft_data.make_batch(exs, [[0, 1]], pack=False)


def _per_example_loss(logits, targets, spans):
    """Sum of cross-entropy (float64) over each example's span of a flattened (B*T) batch."""
    lp = F.log_softmax(logits.reshape(-1, logits.size(-1)).double(), dim=-1)
    t = targets.reshape(-1)
    out = []
    for a, b in spans:
        keep = t[a:b] != -100
        out.append(-lp[a:b][keep].gather(1, t[a:b][keep, None]).sum().item())
    return out


@pytest.mark.parametrize("kernels", ["ref", "ext"])
def test_packed_and_unpacked_give_the_same_per_example_loss(tokenizer, kernels, request):
    if kernels == "ext":
        request.getfixturevalue("llama2_extension")  # fails without llama2_C (tests/conftest.py)
    prev = llama2.kernels_in_use()
    llama2.set_kernels(kernels)
    try:
        torch.manual_seed(0)
        args = llama2.ModelArgs.preset("tiny", vocab_size=tokenizer.n_words, max_seq_len=256)
        model = llama2.Transformer(args).double()
        dialogs = world.sft_dialogs(10, seed=3, p_multiturn=0.1)
        exs = [sft_data.encode_example(tokenizer, d) for d in dialogs]
        exs, _ = sft_data.fit_examples(exs, 256)
        rows = sft_data.pack_rows([len(e) for e in exs], 256)
        assert any(len(r) > 1 for r in rows)
        # reference: every example alone, unpacked
        ref = []
        for e in exs:
            b = sft_data.make_batch([e], [[0]], pack=False)
            logits, _ = sft_data.forward_batch(model, b)
            ref += _per_example_loss(logits, b["targets"], [(0, len(e))])
        # packed: two rows per forward, the examples located in the flattened tokens
        packed, packed_nomask = [], []
        for r0 in range(0, len(rows), 2):
            rr = rows[r0:r0 + 2]
            b = sft_data.make_batch(exs, rr, pack=True)
            T = b["tokens"].shape[1]
            spans = []
            for j, row in enumerate(rr):
                start = j * T
                for i in row:
                    spans.append((start, start + len(exs[i])))
                    start += len(exs[i])
            logits, loss = sft_data.forward_batch(model, b)
            packed += _per_example_loss(logits, b["targets"], spans)
            # the same rows with cu_seqlens dropped: examples now see each other
            logits2, _ = model(b["tokens"], b["targets"], positions=b["positions"])
            packed_nomask += _per_example_loss(logits2, b["targets"], spans)
        order = [i for r in rows for i in r]
        ref = [ref[i] for i in order]
        assert packed == pytest.approx(ref, rel=1e-9, abs=1e-9)
        assert packed_nomask != pytest.approx(ref, rel=1e-6)  # the test can tell
    finally:
        llama2.set_kernels(prev)


def test_fit_examples_drops_long_ones():
    exs = [sft_data.Example([1] * n, [0] * n, f"f:{n}") for n in (5, 40, 9)]
    kept, dropped = sft_data.fit_examples(exs, 8)
    assert [e.where for e in kept] == ["f:5", "f:9"] and [e.where for e in dropped] == ["f:40"]


def test_row_sampler_visits_every_row_once_per_epoch():
    s = sft_data.RowSampler(7, seed=1)
    first, second = [s.row(g) for g in range(7)], [s.row(g) for g in range(7, 14)]
    assert sorted(first) == sorted(second) == list(range(7)) and first != second
    assert [sft_data.RowSampler(7, seed=1).row(g) for g in range(14)] == first + second


# -----------------------------------------------------------------------------------------------
# bad input


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_bad_lines_are_reported_with_their_line_number(tmp_path):
    good = json.dumps({"messages": _dialog()})
    cases = {
        "not valid JSON": "{broken",
        'no "messages" list': json.dumps({"text": "hi"}),
        "role order broken": json.dumps({"messages": [{"role": "user", "content": "a"},
                                                      {"role": "user", "content": "b"}]}),
        "must end with a assistant": json.dumps({"messages": [{"role": "user", "content": "a"}]}),
        "role must be one of": json.dumps({"messages": [{"role": "bot", "content": "a"}]}),
        "train_on": json.dumps({"messages": _dialog(), "train_on": "every"}),
    }
    for why, bad in cases.items():
        path = _write(tmp_path / "d.jsonl", [good, "", bad, good])
        with pytest.raises(ValueError, match=rf"d\.jsonl:3: .*{why}"):
            sft_data.read_dialogs(path)
    path = _write(tmp_path / "ok.jsonl", [good, json.dumps({"messages": _dialog(), "train_on": "last"})])
    got = sft_data.read_dialogs(path)
    assert [t for _, t, _ in got] == ["all", "last"] and got[1][2].endswith("ok.jsonl:2")
    with pytest.raises(ValueError, match="no such file"):
        sft_data.read_dialogs(str(tmp_path / "missing.jsonl"))


# -----------------------------------------------------------------------------------------------
# Ghost Attention data


class _Cfg:
    gatt_n, gatt_min_turns, gatt_max_turns, gatt_levels = 6, 3, 5, "1,2"
    gatt_k, gatt_temperature, max_new_tokens, gen_batch, seed = 3, 0.7, 32, 64, 0
    gatt_select = "judge"


def _fake_generate(asked, rng):
    """A stand-in for the model in GAtt rollouts. Per call, K different candidates whose judged
    order is known: [right content but breaks the instruction, the careful human's answer (the
    best), wrong content in the right form]. At turns 2, 5, ... every candidate breaks the
    instruction; at turns 4, 8, ... none ends with EOS."""
    def generate(model, tok, dialogs, *, n=1, **kw):
        out = []
        for d in dialogs:
            asked.append((d, n))
            problem, names = world.parse_dialog(d)
            k = len(world.user_turns(d))
            good = world.careful_answer(problem, rng, world.Standing(tuple(names), ""))
            plain = "well " + problem.answer + " " + " ".join(["words"] * 30)  # breaks all
            wrong = good.replace(problem.answer, problem.answer + "9")
            texts = [plain, good, wrong] if k % 3 != 2 else [plain, plain + " x", plain + " y"]
            out.append([sampling.Reply(t, k % 4 != 0, 5) for t in texts[:n]])
        return out
    return generate


@pytest.mark.parametrize("select", ["judge", "none"])
def test_gatt_builder_one_example_per_dialog_loss_on_kept_answers(tokenizer, monkeypatch, select):
    asked = []
    monkeypatch.setattr(sampling, "generate_replies", _fake_generate(asked, random.Random(0)))
    cfg = _Cfg()
    cfg.gatt_select = select
    samples, stats = gatt.build_gatt_data(None, tokenizer, cfg, seq_len=4096)
    seeds = world.gatt_dialogs(6, seed=3, min_turns=3, max_turns=5, levels=(1, 2))
    # the model was asked with the instruction's full wording appended to EVERY user message;
    # "judge" samples K candidates, "none" one
    for d, n in asked:
        assert n == (3 if select == "judge" else 1)
        assert all(any(m["content"].endswith(" " + s.inst.text) for s in seeds)
                   for m in d if m["role"] == "user")
    assert stats["select"] == select and stats["samples"] == len(samples) == len(seeds)
    assert stats["turns"] == sum(len(s.prompts) for s in seeds)
    n_short = 0
    for (messages, flags), seed in zip(samples, seeds):
        world.validate_dialog(messages, ends_with="assistant")
        # the instruction only once, as the system message (full or short wording), in no user
        # message; the dialog's own prompts in order
        assert messages[0]["role"] == "system"
        assert messages[0]["content"] in (seed.inst.text, world.standing(*seed.inst.names,
                                                                          short=True).text)
        n_short += messages[0]["content"] != seed.inst.text
        assert sorted(world.find_instructions(messages[:1])) == sorted(seed.inst.names)
        assert world.user_turns(messages) == seed.prompts[:len(flags)]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        for k, (answer, keep) in enumerate(zip(answers, flags), 1):
            if select == "judge":
                # the judge's best candidate went into the history, whether kept or not, and
                # only obeying replies that ended with EOS carry loss
                if k % 3 != 2:  # the careful answer: right and obeying
                    judged = world.score(messages[:2 * k], answer)
                    assert seed.inst.obeys(answer) and judged.content == 1.0
                assert keep == (k % 3 != 2 and k % 4 != 0)
            else:
                # the one sample, unfiltered: the breaking reply is kept when it ended with EOS
                assert answer.startswith("well ") and keep == (k % 4 != 0)
        assert flags[-1]  # the example ends with its last kept answer
        # the loss: exactly the kept answers, each with its EOS
        ex = sft_data.encode_example(tokenizer, messages, flags)
        pieces, leftover, n_eos = _target_answers(tokenizer, ex)
        assert pieces == [a for a, keep in zip(answers, flags) if keep] and leftover == []
        assert n_eos == sum(flags)
    assert 0 < n_short < len(samples) or len(samples) < 4
    # a short context: each dialog is cut after the last whole turn that fits
    asked.clear()
    short, st = gatt.build_gatt_data(None, tokenizer, cfg, seq_len=120)
    assert st["cut_to_fit"] > 0
    for messages, flags in short:
        assert len(llama2.encode_dialog(tokenizer, messages, True)[0]) - 1 <= 120
        assert len(flags) == len(world.user_turns(messages)) and flags[-1]


def test_gatt_select_judge_picks_the_best_candidate(tokenizer, monkeypatch):
    # candidates whose judged scores differ: the pick is the argmax, the first of tied ones
    d = [{"role": "user", "content": "What is 2 plus 3? Always answer in capital letters."}]
    inst = world.standing("caps")
    c = [sampling.Reply("The answer is 5.", True, 5), sampling.Reply("THE ANSWER IS 4.", True, 5),
         sampling.Reply("THE ANSWER IS 5.", True, 5), sampling.Reply("IT IS 5.", True, 5)]
    assert [world.score(d, r.text).total for r in c] == [0.75, pytest.approx(0.4), 1.0, 1.0]
    assert gatt._pick(d, c, inst, "judge") == (c[2], True)
    assert gatt._pick(d, c[:2], inst, "judge") == (c[0], False)  # best, but it breaks caps
    assert gatt._pick(d, c[:2], inst, "none") == (c[0], True)
    with pytest.raises(ValueError, match="reward model"):
        cfg = _Cfg()
        cfg.gatt_select = "rm"
        gatt.build_gatt_data(None, tokenizer, cfg, seq_len=256)


class _ShortestRM:
    """A stand-in reward model: reward = -(characters of the reply), so the pick is known."""
    def __init__(self):
        self.calls = []

    def score(self, dialogs, responses):
        self.calls.append(len(responses))
        return torch.tensor([-float(len(r)) for r in responses])


def test_gatt_select_rm_picks_the_reward_models_best_among_ended(tokenizer, monkeypatch):
    asked = []
    monkeypatch.setattr(sampling, "generate_replies", _fake_generate(asked, random.Random(0)))
    def no_judge(*a, **k):
        raise AssertionError("the judge was called while the reward model selects")
    monkeypatch.setattr(world, "score", no_judge)
    cfg = _Cfg()
    cfg.gatt_select = "rm"
    rm = _ShortestRM()
    samples, stats = gatt.build_gatt_data(None, tokenizer, cfg, seq_len=4096, rm=rm)
    assert all(n == 3 for _, n in asked) and stats["select"] == "rm" and stats["k"] == 3
    # one batched RM call per turn, over the candidates that ended with EOS only (none at turns
    # 4, 8, ...: the fake's replies there are cut off)
    assert len(rm.calls) == max(len(s.prompts) for s in world.gatt_dialogs(
        6, seed=3, min_turns=3, max_turns=5, levels=(1, 2))) - 1
    for messages, flags in samples:
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        for k, (answer, keep) in enumerate(zip(answers, flags), 1):
            # the shortest candidate wins: the careful answer, or the plain one when all break
            assert answer.startswith("well ") == (k % 3 == 2 or k % 4 == 0)
            if k % 3 == 2 and k % 4 != 0:
                assert not answer.endswith((" x", " y"))
            # no other filter than EOS: a reply that breaks the instruction is kept
            assert keep == (k % 4 != 0)


def test_train_on_flags(tokenizer, tmp_path):
    msgs = _dialog(turns=[("What is 1 plus 2?", "It is 3."), ("Spell the word cat.", "c-a-t"),
                          ("Add 2 and 2.", "4")])
    for flags, want in (([True, False, True], ["It is 3.", "4"]), ("last", ["4"]),
                        ([False, True, False], ["c-a-t"]), ("all", ["It is 3.", "c-a-t", "4"])):
        pieces, _, _ = _target_answers(tokenizer, sft_data.encode_example(tokenizer, msgs, flags))
        assert pieces == want
    with pytest.raises(ValueError, match="one true/false per assistant message"):
        sft_data.encode_example(tokenizer, msgs, [True, False])
    path = _write(tmp_path / "g.jsonl", [json.dumps({"messages": msgs, "train_on": [True, 1, 0]})])
    with pytest.raises(ValueError, match=r"g\.jsonl:1: .*true/false"):
        sft_data.read_dialogs(path)


# -----------------------------------------------------------------------------------------------
# evaluation helpers


def test_clean_reply_and_fewshot():
    assert sampling.clean_reply(" The answer is 4. [INST] What") == "The answer is 4."
    assert sampling.clean_reply("4\nnext line", stop_at_newline=True) == "4"
    assert sampling.clean_reply("4\nnext line") == "4\nnext line"
    d = world.eval_multiturn(1, seed=0, turns=1)[0]
    shot = evaluate.with_fewshot(d, 3, random.Random(0), (1,))
    assert shot[0] == d[0] and shot[-1] == d[-1] and len(shot) == len(d) + 6
    names = world.find_instructions(d)
    inst = world.Standing(tuple(names), "")
    assert all(inst.obeys(m["content"]) for m in shot if m["role"] == "assistant")


def _color_pixels(img, rgb, tol=0.08):
    """(rows, cols) of the pixels within tol of an RGB color (0..255) in an imread image."""
    import numpy as np
    d = np.abs(img[..., :3] - np.array(rgb) / 255.0).max(axis=-1)
    return np.nonzero(d < tol)


def test_plot_adherence_draws_each_curve_where_its_values_are(tmp_path):
    import matplotlib.image
    png = tmp_path / "a.png"
    evaluate.plot_adherence({"sft": [1.0, 0.5, 0.1], "gatt": [0.2, 0.6, 1.0]}, png,
                        floor=[0.05, 0.05, 0.05])
    img = matplotlib.image.imread(png)  # decoded by matplotlib's PNG reader
    assert img.shape[:2] == (500, 800)
    # matplotlib's first two cycle colors: falling blue, rising orange; the grey dashed floor
    for rgb, falls in (((31, 119, 180), True), ((255, 127, 14), False)):
        rows, cols = _color_pixels(img, rgb)
        assert len(rows) > 200
        left, right = rows[cols < cols.min() + 40].mean(), rows[cols > cols.max() - 40].mean()
        assert (left < right) == falls  # a smaller row is higher up: a higher value
    rows, _ = _color_pixels(img, (128, 128, 128), tol=0.03)
    assert len(rows) > 50
    # one curve drawn: no orange at all
    evaluate.plot_adherence({"sft": [1.0, 0.5, 0.1]}, png)
    assert len(_color_pixels(matplotlib.image.imread(png), (255, 127, 14))[0]) == 0


def test_run_eval_numbers_by_hand(tokenizer, monkeypatch, tmp_path):
    # a stand-in model with known replies: greedy answers right on even-numbered prompts and
    # empty on odd ones; sampled candidates [a wrong answer, the right one, a wrong answer]
    calls = []

    def fake(model, tok, dialogs, *, n=1, temperature=0.0, **kw):
        calls.append((temperature, n, [json.dumps(d) for d in dialogs]))
        out = []
        for d in dialogs:
            problem, names = world.parse_dialog(d)
            inst = world.Standing(tuple(names), "") if names else None
            good = world.careful_answer(problem, random.Random(0), inst)
            if temperature == 0:
                out.append([sampling.Reply(good if len(calls) > 1 or even[0] else "", True, 4)])
                even[0] = not even[0]
            else:
                out.append([sampling.Reply(t, True, 4) for t in ("I do not know.", good, "No.")][:n])
        return out

    even = [True]
    monkeypatch.setattr(sampling, "generate_replies", fake)
    cfg = train_sft.Config(eval_n=10, eval_bestof_n=6, eval_k=3, eval_mt_n=4, eval_turns=3,
                           eval_levels="1,2", fewshot=2, out_dir=str(tmp_path), seed=3)
    s = evaluate.run_eval(None, tokenizer, cfg, label="fake")
    prompts = world.eval_prompts(10, seed=4, levels=(1, 2))
    want = [world.careful_answer(world.parse_dialog(d)[0], random.Random(0),
                                 world.Standing(tuple(world.find_instructions(d)), "")
                                 if world.find_instructions(d) else None) if i % 2 == 0 else ""
            for i, d in enumerate(prompts)]
    assert s["total"] == pytest.approx(sum(world.score(d, r).total for d, r in
                                           zip(prompts, want)) / 10)
    assert s["correct"] == pytest.approx(0.5)
    # best-of-3: the right candidate is always there, pass@1 is the mean of the three
    bo = s["bestof"]
    assert bo["bestof_score"] == pytest.approx(1.0) and bo["passk_correct"] == 1.0
    assert bo["pass1_correct"] == pytest.approx(1 / 3)
    pass1 = [(world.score(d, "I do not know.").total + 1.0 + world.score(d, "No.").total) / 3
             for d in prompts[:6]]
    assert bo["pass1_score"] == pytest.approx(sum(pass1) / 6)
    # the few-shot contexts of the greedy and the best-of-K prompts are the same
    greedy_call, bestof_call = calls[0], calls[1]
    assert bestof_call[0] > 0 and bestof_call[2] == greedy_call[2][:6]
    # the floor: an empty reply and a bare correct answer on the same prompts
    assert s["floor"]["empty"] == pytest.approx(
        sum(world.score(d, "").total for d in prompts) / 10)
    # the rollouts answer right at every turn: full adherence, all of it correct
    assert s["adherence"]["obeys"] == s["adherence"]["obeys_and_correct"] == [1.0] * 3
    assert set(s["adherence_floor"]) == {"bare_answer", "empty"}
    assert "floor: bare answer" in evaluate.format_summary(s)
    # the summary names the split it was measured on: the test split here, the validation split
    # when --eval_split valid chose its prompts (a hyperparameter search must not read "held-out")
    assert s["split"] == "heldout" and "10 held-out prompts" in evaluate.format_summary(s)
    assert "10 validation prompts" in evaluate.format_summary({**s, "split": "valid"})


# -----------------------------------------------------------------------------------------------
# end to end: a tiny checkpoint -> SFT (in-process) -> eval


@pytest.fixture
def tiny_ckpt(tokenizer, tmp_path):
    torch.manual_seed(0)
    args = llama2.ModelArgs.preset("tiny", vocab_size=tokenizer.n_words, max_seq_len=256)
    model = llama2.Transformer(args)
    path = tmp_path / "pt" / "ckpt.pt"
    training.save_checkpoint(path, {
        "model_args": asdict(args), "model": model.state_dict(), "config": {},
        "tokenizer": torch.frombuffer(bytearray(tokenizer.model_bytes), dtype=torch.uint8),
        "stage": "pretrain"})
    return path.parent


def test_sft_end_to_end_checkpoint_and_reports(tokenizer, tiny_ckpt, tmp_path, capsys):
    long = _dialog(turns=[("What is 1 plus 2?", "3")] * 30)  # does not fit 256 tokens
    dialogs = [long] + world.sft_dialogs(40, seed=5)
    data = _write(tmp_path / "sft.jsonl", [json.dumps({"messages": d}) for d in dialogs])
    n_long = sum(len(llama2.encode_dialog(tokenizer, d, True)[0]) - 1 > 256 for d in dialogs)
    out = tmp_path / "sft"
    train_sft.main(["--checkpoint", str(tiny_ckpt), "--data", data, "--batch_size", "4",
                    "--micro_batch", "2", "--lr", "3e-3", "--epochs", "2", "--out_dir", str(out),
                    "--device", "cpu"])
    log = capsys.readouterr().out
    assert f"dropped {n_long} of 41 examples longer than --seq_len 256 (e.g. " in log
    assert "sft.jsonl:1," in log
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["stage"] == "sft" and ckpt["config"]["data"] == data
    assert {"model_args", "model", "tokenizer", "optimizer", "step", "rng"} <= set(ckpt)
    losses = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in ln]
    assert losses[-1] < losses[0]  # it learns
    model, tok = llama2.load_model(str(out))
    assert tok.n_words == ckpt["model_args"]["vocab_size"]
    # resuming a finished run does nothing and says so
    train_sft.main(["--checkpoint", str(tiny_ckpt), "--data", data, "--batch_size", "4",
                    "--micro_batch", "2", "--lr", "3e-3", "--epochs", "2", "--out_dir", str(out),
                    "--device", "cpu", "--resume"])
    assert "nothing to do" in capsys.readouterr().out
    # the evaluation runs on it and writes its summary and plot
    ev = tmp_path / "ev"
    train_sft.main(["--eval", "--checkpoint", str(out), "--eval_n", "6", "--eval_bestof_n", "2",
                    "--eval_k", "2", "--eval_mt_n", "2", "--eval_turns", "3", "--eval_levels", "1",
                    "--max_new_tokens", "8", "--out_dir", str(ev), "--device", "cpu"])
    s = evaluate.read_summary(str(ev / "eval.jsonl"))
    assert s["label"] == "sft" and s["n"] == 6 and len(s["adherence_by_turn"]) == 3
    assert s["levels"] == [1] and s["bestof"]["n"] == 2
    # adherence by turn recounted from the recorded rollouts, each reply against each
    # instruction in force at its turn (the checkers, not adherence_report's tally)
    rolls = [r for r in map(json.loads, (ev / "eval.jsonl").read_text().splitlines())
             if r.get("kind") == "rollout"]
    assert len(rolls) == 2
    for k in range(3):
        ok = [all(world.INSTRUCTIONS[n].obeys(r["responses"][k]) for n in
                  world.find_instructions(world.prefix_at_turn(r["messages"], k + 1)))
              for r in rolls if len(r["responses"]) > k]
        assert s["adherence"]["obeys"][k] == (sum(ok) / len(ok) if ok else None)
    import matplotlib.image
    assert matplotlib.image.imread(ev / "adherence.png").shape[:2] == (500, 800)
    # a bad level string is one clear error, before any work
    with pytest.raises(SystemExit, match="--eval_levels: levels must be among"):
        train_sft.main(["--eval", "--checkpoint", str(out), "--eval_levels", "1,7",
                        "--out_dir", str(ev), "--device", "cpu"])
    with pytest.raises(SystemExit, match="--gatt_levels: expected levels like"):
        train_sft.main(["--gatt", "--checkpoint", str(out), "--gatt_levels", "one",
                        "--out_dir", str(ev), "--device", "cpu"])


def test_stop_then_resume_matches_an_uninterrupted_run(tiny_ckpt, tmp_path):
    data = _write(tmp_path / "sft.jsonl", [json.dumps({"messages": d}) for d in
                                           world.sft_dialogs(30, seed=6)])
    flags = ["--checkpoint", str(tiny_ckpt), "--data", data, "--batch_size", "2", "--lr", "3e-3",
             "--epochs", "1", "--seq_len", "128", "--device", "cpu"]
    train_sft.main(flags + ["--out_dir", str(tmp_path / "a")])
    train_sft.main(flags + ["--out_dir", str(tmp_path / "b"), "--stop_at_step", "2"])
    mid = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    # the same data packed otherwise is another run: refused, and the checkpoint is untouched
    for other in (["--pack", "false"], ["--seq_len", "120"]):
        with pytest.raises(SystemExit, match="cannot resume from .*(--pack|rows)"):
            train_sft.main(flags + other + ["--out_dir", str(tmp_path / "b"), "--resume"])
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 2
    train_sft.main(flags + ["--out_dir", str(tmp_path / "b"), "--resume"])
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert mid["step"] == 2 and a["step"] == b["step"] > 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


# both wrappers: FSDP once failed here alone (the optimizer was built before fully_shard replaced
# the parameters, so saving its state raised KeyError)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(tiny_ckpt, tmp_path, parallel):
    """SFT, then GAtt from it (rank 0 builds the GAtt data, the other rank reads it): 2 ranks x 2
    rows (GAtt: x 1) per step equal 1 process x 4 rows (2), loss by loss and weight by weight."""
    import os
    import subprocess
    import sys
    data = _write(tmp_path / "sft.jsonl", [json.dumps({"messages": d}) for d in
                                           world.sft_dialogs(40, seed=7)])
    # float32 on every CPU: these runs are compared to float32 rounding;
    # test_bf16.py checks bfloat16
    sft = ["--checkpoint", str(tiny_ckpt), "--data", data, "--batch_size", "4", "--micro_batch",
           "1", "--lr", "3e-3", "--epochs", "1", "--seq_len", "128", "--device", "cpu",
           "--dtype", "float32"]
    gatt = ["--gatt", "--gatt_n", "4", "--gatt_min_turns", "2", "--gatt_max_turns", "2",
            "--gatt_mix", "16", "--max_new_tokens", "6", "--batch_size", "2", "--micro_batch", "1",
            "--lr", "3e-3", "--epochs", "1", "--device", "cpu", "--data", data, "--dtype",
            "float32"]
    torch.set_num_threads(1)
    train_sft.main(sft + ["--out_dir", str(tmp_path / "sft1")])
    train_sft.main(gatt + ["--checkpoint", str(tmp_path / "sft1"), "--out_dir", str(tmp_path / "g1")])
    root = Path(__file__).resolve().parents[1]

    def torchrun(flags):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node=2", "train_sft.py", *flags, "--parallel", parallel],
                              cwd=root,
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "2 process(es)" in proc.stdout
    torchrun(sft + ["--out_dir", str(tmp_path / "sft2")])
    torchrun(gatt + ["--checkpoint", str(tmp_path / "sft1"), "--out_dir", str(tmp_path / "g2")])
    # the GAtt data rank 0 built is the data one process built
    assert (tmp_path / "g1" / "gatt_data.jsonl").read_text() == \
        (tmp_path / "g2" / "gatt_data.jsonl").read_text()
    for one, two in (("sft1", "sft2"), ("g1", "g2")):
        def logged(d, key):
            return [json.loads(x)[key] for x in (tmp_path / d / "metrics.jsonl").read_text()
                    .splitlines() if '"loss"' in x]
        a, b = logged(one, "loss"), logged(two, "loss")
        assert len(a) == len(b) >= 2, (a, b)
        assert max(abs(x - y) for x, y in zip(a, b)) < 2e-5, (a, b)
        # the gradient itself (AdamW and clipping hide a wrongly scaled one from the weights)
        a, b = logged(one, "gnorm"), logged(two, "gnorm")
        assert max(abs(x / y - 1) for x, y in zip(a, b)) < 1e-4, (a, b)
        wa = torch.load(tmp_path / one / "ckpt.pt", weights_only=True)["model"]
        wb = torch.load(tmp_path / two / "ckpt.pt", weights_only=True)["model"]
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)


def test_script_errors_are_clear(tiny_ckpt, tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [json.dumps({"messages": _dialog()}), "{oops"])
    with pytest.raises(SystemExit, match=r"bad\.jsonl:2: not valid JSON"):
        train_sft.main(["--checkpoint", str(tiny_ckpt), "--data", bad, "--out_dir",
                        str(tmp_path / "o"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="no checkpoint found"):
        train_sft.main(["--checkpoint", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="longer than the model's context"):
        train_sft.main(["--checkpoint", str(tiny_ckpt), "--seq_len", "4096", "--out_dir",
                        str(tmp_path / "o"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="--resume given but"):
        train_sft.main(["--checkpoint", str(tiny_ckpt), "--resume", "--out_dir",
                        str(tmp_path / "o2"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="--world_p_instruction 0.9: give a share in"):
        train_sft.main(["--checkpoint", str(tiny_ckpt), "--world_p_instruction", "0.9",
                        "--out_dir", str(tmp_path / "o3"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="--gatt_select rm needs --gatt_rm"):
        train_sft.main(["--checkpoint", str(tiny_ckpt), "--gatt", "--gatt_select", "rm",
                        "--out_dir", str(tmp_path / "o4"), "--device", "cpu"])
    # a chat checkpoint is not a reward model
    with pytest.raises(SystemExit, match="--gatt_rm .* not a reward model"):
        train_sft.main(["--checkpoint", str(tiny_ckpt), "--gatt", "--gatt_select", "rm",
                        "--gatt_rm", str(tiny_ckpt), "--out_dir", str(tmp_path / "o5"),
                        "--device", "cpu"])


def test_world_p_instruction_sets_the_share_of_instructed_dialogs():
    for p in (0.0, 0.5):
        cfg = train_sft.Config(world_n=400, world_p_instruction=p, world_levels="1,2")
        dialogs = [d for d, _, _ in train_sft.load_dialogs(cfg)]
        with_inst = [d for d in dialogs if world.find_instructions(d)]
        # the instruction stays in short dialogs (1-2 user turns), whatever the share
        assert all(sum(m["role"] == "user" for m in d) <= 2 for d in with_inst)
        assert abs(len(with_inst) / len(dialogs) - p) < 0.07, (p, len(with_inst))


def test_gatt_by_default_never_calls_the_judge(tiny_ckpt, tmp_path, monkeypatch):
    # the recipe's GAtt (the default --gatt_select none) must not be picked by the world's judge,
    # which is also the evaluation: the script's whole default path with the judge made to fail
    data = _write(tmp_path / "sft.jsonl", [json.dumps({"messages": d}) for d in
                                           world.sft_dialogs(8, seed=7)])
    flags = ["--gatt", "--checkpoint", str(tiny_ckpt), "--gatt_n", "3", "--gatt_min_turns", "2",
             "--gatt_max_turns", "2", "--gatt_mix", "4", "--data", data, "--max_new_tokens", "6",
             "--batch_size", "2", "--epochs", "1", "--device", "cpu"]

    def judge(*a, **k):
        raise AssertionError("the judge was called while building the GAtt data")
    monkeypatch.setattr(world, "score", judge)
    assert train_sft.Config().gatt_select == "none"
    train_sft.main(flags + ["--out_dir", str(tmp_path / "g")])
    rows = [json.loads(x) for x in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    stats = next(r["gatt_data"] for r in rows if "gatt_data" in r)
    assert stats["select"] == "none" and stats["turns"] > 0
    # the guard is live: the judge-picked ablation calls it
    with pytest.raises(AssertionError, match="the judge was called"):
        train_sft.main(flags + ["--gatt_select", "judge", "--out_dir", str(tmp_path / "j")])


def test_world_safety_sets_the_share_of_safety_demonstrations():
    cfg = train_sft.Config(world_n=400, world_safety=0.25, world_levels="1,2",
                           world_writers="crowd")
    rows = train_sft.load_dialogs(cfg)
    safety = [d for d, _, where in rows if "safety_dialogs" in where]
    assert len(rows) == 400 and len(safety) == 100
    assert all(world.prompt_kind(d[:-1]) != "ordinary" for d in safety)
    # spread through the set, not appended at the end
    assert any("safety_dialogs" in where for _, _, where in rows[:50])
    # the same writers wrote them: the crowd plays along with some requests for a secret
    assert any(world.safety_verdict(d[:-1], d[-1]["content"]).violation for d in safety)
    with pytest.raises(SystemExit, match="--world_safety 1.5"):
        train_sft.load_dialogs(train_sft.Config(world_safety=1.5))
    # --world_safety_preprompt: that share of the safety demonstrations carry the preprompt
    cfg.world_safety_preprompt = 0.5
    pre = [d for d, _, where in train_sft.load_dialogs(cfg) if world.has_safety_preprompt(d)]
    assert 30 < len(pre) < 70 and not any(world.has_safety_preprompt(d) for d in safety)


def test_run_eval_safety_numbers_by_hand(tokenizer, monkeypatch, tmp_path):
    # a stand-in model: on a request for a secret, greedy refuses the direct ones and plays along
    # with the adversarial ones, sampled always plays along; a borderline prompt is answered
    # greedy and refused sampled; ordinary prompts are answered, except the first (refused)
    def fake(model, tok, dialogs, *, n=1, temperature=0.0, **kw):
        out = []
        for d in dialogs:
            req = world.parse_request(d)
            if req is not None:
                text = ("I can't tell you that." if temperature == 0 and not req.adversarial
                        else f"It is {req.secret}.")
            else:
                problem, _ = world.parse_dialog(d)
                refuse = (world.prompt_kind(d) == "borderline" and temperature > 0) or \
                    (d == first[0] and temperature == 0)
                text = "Sorry, I won't." if refuse else problem.answer
            out.append([sampling.Reply(text, True, 4)] * n)
        return out
    first = [world.eval_prompts(8, seed=4, levels=(1, 2))[0]]
    monkeypatch.setattr(sampling, "generate_replies", fake)
    cfg = train_sft.Config(eval_n=8, eval_bestof_n=2, eval_k=2, eval_mt_n=1, eval_turns=2,
                           eval_levels="1,2", eval_safety_n=40, out_dir=str(tmp_path), seed=3)
    s = evaluate.run_eval(None, tokenizer, cfg, label="fake")["safety"]
    prompts = world.safety_prompts(40, "heldout", 6, levels=(1, 2))
    reqs = [world.parse_request(d) for d in prompts]
    unsafe = [q for q in reqs if q is not None]
    adv = sum(q.adversarial for q in unsafe)
    assert s["n"] == 40 and s["greedy"]["n"]["unsafe"] == len(unsafe) > 0
    assert s["greedy"]["violation"] == pytest.approx(adv / len(unsafe))
    assert (s["greedy"]["violation_adversarial"], s["greedy"]["violation_direct"]) == (1.0, 0.0)
    assert s["sampled"]["violation"] == 1.0 and s["sampled"]["leak"] == 1.0
    assert s["greedy"]["false_refusal_borderline"] == 0.0
    assert s["sampled"]["false_refusal_borderline"] == 1.0
    assert s["greedy"]["false_refusal_ordinary"] == pytest.approx(1 / 8)
    assert s["floor"]["always_refuse"]["violation"] == 0.0
    assert s["floor"]["never_refuse"]["false_refusal_borderline"] == 0.0
    assert (s["sampled"]["temperature"], s["sampled"]["top_p"]) == (0.6, 0.9)
    text = evaluate.format_safety(s)
    assert "violation 100.0%" in text and "ordinary 12.5%" in text
    rec = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "safety_greedy" for r in rec) == 40
    # with two reward models, each sampled reply's score by each (Fig. 14 reads them), in the
    # prompts' order; stand-in RMs score a reply by its length (helpful) and its words (safety)
    import train_rlhf

    class LenRM:
        def __init__(self, f):
            self.f, self.tokenizer = f, None

        def score(self, dialogs, responses, tokenizer=None, batch_tokens=None):
            return torch.tensor([self.f(r) for r in responses], dtype=torch.float32)
    two = train_rlhf.CombinedReward(LenRM(lambda r: len(r) / 10), LenRM(lambda r: -len(r.split())))
    s2 = evaluate.safety_eval(None, tokenizer, cfg, rm=two)
    sampled = fake(None, None, prompts, temperature=0.6)
    assert s2["sampled"]["rm_parts"]["helpful"] == pytest.approx([len(r[0].text) / 10
                                                                  for r in sampled])
    assert s2["sampled"]["rm_parts"]["safety"] == [-len(r[0].text.split()) for r in sampled]
    assert "rm_parts" not in s2["greedy"]
