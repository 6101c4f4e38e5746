"""SFT and Ghost Attention (train_sft.py, gatt.py): the loss mask, packing without attention across
examples, the GAtt data builder, bad input, and a tiny end-to-end run (checkpoint, eval, plot)."""
import json
import random
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import gatt
import llama2
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
    _, y = train_sft.example_io(ex)
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
    ex = train_sft.encode_example(tokenizer, msgs, "all")
    pieces, leftover, n_eos = _target_answers(tokenizer, ex)
    # the trained text is the answers, in order, each closed by EOS; nothing of the prompts
    assert pieces == [m["content"] for m in msgs if m["role"] == "assistant"]
    assert leftover == [] and n_eos == 2
    x, y = train_sft.example_io(ex)
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
    ex = train_sft.encode_example(tokenizer, msgs, "last")
    pieces, leftover, n_eos = _target_answers(tokenizer, ex)
    assert pieces == ["G-O-D"] and leftover == [] and n_eos == 1
    # the ids are those of the full dialog: only the loss changed
    assert ex.ids == train_sft.encode_example(tokenizer, msgs, "all").ids
    with pytest.raises(ValueError, match="train_on"):
        train_sft.encode_example(tokenizer, msgs, "first")


# -----------------------------------------------------------------------------------------------
# packing


def test_pack_rows_and_batch_layout_by_hand(tokenizer):
    assert train_sft.pack_rows([5, 3, 4, 2, 8], 8) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="more than a row"):
        train_sft.pack_rows([3, 9], 8)
    exs = [train_sft.Example(list(range(10, 10 + n + 1)), [0] * 2 + [1] * (n - 1)) for n in (3, 4, 2)]
    b = train_sft.make_batch(exs, [[0, 1], [2]], pack=True)
    assert b["tokens"].shape == (2, 7)
    # positions restart per example; padding is a segment of its own
    assert b["positions"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4]]
    assert b["cu_seqlens"].tolist() == [0, 3, 7, 9, 14]
    assert b["cu_seqlens"].dtype == torch.int32
    # targets: token t+1 where its mask is 1 (mask 0,0,1,1 -> targets -100,12,13 for n=3)
    assert b["targets"][0, :3].tolist() == [-100, 12, 13]
    assert b["targets"][1, 2:].tolist() == [-100] * 5
    u = train_sft.make_batch(exs, [[0], [1]], pack=False)
    assert u["cu_seqlens"] is None and u["positions"] is None
    with pytest.raises(ValueError, match="one example per row"):
        train_sft.make_batch(exs, [[0, 1]], pack=False)


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
def test_packed_and_unpacked_give_the_same_per_example_loss(tokenizer, kernels):
    prev = llama2.kernels_in_use()
    try:
        llama2.set_kernels(kernels)
    except RuntimeError:
        pytest.skip("the llama2_C extension is not built")
    try:
        torch.manual_seed(0)
        args = llama2.ModelArgs.preset("tiny", vocab_size=tokenizer.n_words, max_seq_len=256)
        model = llama2.Transformer(args).double()
        dialogs = world.sft_dialogs(10, seed=3, p_multiturn=0.1)
        exs = [train_sft.encode_example(tokenizer, d) for d in dialogs]
        exs, _ = train_sft.fit_examples(exs, 256)
        rows = train_sft.pack_rows([len(e) for e in exs], 256)
        assert any(len(r) > 1 for r in rows)
        # reference: every example alone, unpacked
        ref = []
        for e in exs:
            b = train_sft.make_batch([e], [[0]], pack=False)
            logits, _ = train_sft.forward_batch(model, b)
            ref += _per_example_loss(logits, b["targets"], [(0, len(e))])
        # packed: two rows per forward, the examples located in the flattened tokens
        packed, packed_nomask = [], []
        for r0 in range(0, len(rows), 2):
            rr = rows[r0:r0 + 2]
            b = train_sft.make_batch(exs, rr, pack=True)
            T = b["tokens"].shape[1]
            spans = []
            for j, row in enumerate(rr):
                start = j * T
                for i in row:
                    spans.append((start, start + len(exs[i])))
                    start += len(exs[i])
            logits, loss = train_sft.forward_batch(model, b)
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
    exs = [train_sft.Example([1] * n, [0] * n, f"f:{n}") for n in (5, 40, 9)]
    kept, dropped = train_sft.fit_examples(exs, 8)
    assert [e.where for e in kept] == ["f:5", "f:9"] and [e.where for e in dropped] == ["f:40"]


def test_row_sampler_visits_every_row_once_per_epoch():
    s = train_sft.RowSampler(7, seed=1)
    first, second = [s.row(g) for g in range(7)], [s.row(g) for g in range(7, 14)]
    assert sorted(first) == sorted(second) == list(range(7)) and first != second
    assert [train_sft.RowSampler(7, seed=1).row(g) for g in range(14)] == first + second


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
            train_sft.read_dialogs(path)
    path = _write(tmp_path / "ok.jsonl", [good, json.dumps({"messages": _dialog(), "train_on": "last"})])
    got = train_sft.read_dialogs(path)
    assert [t for _, t, _ in got] == ["all", "last"] and got[1][2].endswith("ok.jsonl:2")
    with pytest.raises(ValueError, match="no such file"):
        train_sft.read_dialogs(str(tmp_path / "missing.jsonl"))


# -----------------------------------------------------------------------------------------------
# Ghost Attention data


class _Cfg:
    gatt_n, gatt_min_turns, gatt_max_turns, gatt_levels = 6, 3, 5, "1,2"
    gatt_k, gatt_temperature, max_new_tokens, gen_batch, seed = 3, 0.7, 32, 64, 0


def test_gatt_builder_instruction_once_and_loss_on_last_answer_only(tokenizer, monkeypatch):
    asked = []
    rng = random.Random(0)

    def fake_generate(model, tok, dialogs, *, n=1, **kw):
        # replies from the careful human, except: turns 2, 5, ... break every instruction, and
        # turns 4, 8, ... obey but miss the EOS; neither may give a sample
        out = []
        for d in dialogs:
            asked.append(d)
            problem, names = world.parse_dialog(d)
            k = len(world.user_turns(d))
            text = world.careful_answer(problem, rng, world.Standing(tuple(names), ""))
            if k % 3 == 2:
                text = "Well Mixed words here [x] and [y] more words follow now"
            out.append([gatt.Reply(text, k % 4 != 0, 5)] * n)
        return out

    monkeypatch.setattr(gatt, "generate_replies", fake_generate)
    samples, stats = gatt.build_gatt_data(None, tokenizer, _Cfg())
    seeds = world.gatt_dialogs(6, seed=3, min_turns=3, max_turns=5, levels=(1, 2))
    # the model was asked with the instruction appended to EVERY user message
    for d in asked:
        inst_texts = [s.inst.text for s in seeds]
        assert all(any(m["content"].endswith(" " + t) for t in inst_texts)
                   for m in d if m["role"] == "user")
    n_turns = sum(len(s.prompts) for s in seeds)
    n_bad = sum(1 for s in seeds for k in range(1, len(s.prompts) + 1)
                if k % 3 == 2 or k % 4 == 0)
    assert stats["turns"] == n_turns and stats["samples"] == len(samples) == n_turns - n_bad
    by_start = {(s.inst.text, s.prompts[0]): s for s in seeds}
    for messages, train_on in samples:
        assert train_on == "last"
        world.validate_dialog(messages, ends_with="assistant")
        # the instruction only once: the system message, and in no user message
        inst = messages[0]["content"]
        seed = by_start[(inst, messages[1]["content"])]
        assert messages[0]["role"] == "system"
        assert all(inst not in m["content"] for m in messages[1:])
        k = len(world.user_turns(messages))
        assert k % 3 != 2 and k % 4 != 0  # the bad turns gave no sample
        assert world.user_turns(messages) == seed.prompts[:k]
        # the loss: only the last answer and its EOS
        ex = train_sft.encode_example(tokenizer, messages, train_on)
        pieces, leftover, n_eos = _target_answers(tokenizer, ex)
        assert pieces == [messages[-1]["content"]] and n_eos == 1 and leftover == []
        assert seed.inst.obeys(messages[-1]["content"])


# -----------------------------------------------------------------------------------------------
# evaluation helpers


def test_clean_reply_and_fewshot():
    assert gatt.clean_reply(" The answer is 4. [INST] What") == "The answer is 4."
    assert gatt.clean_reply("4\nnext line", stop_at_newline=True) == "4"
    assert gatt.clean_reply("4\nnext line") == "4\nnext line"
    d = world.eval_multiturn(1, seed=0, turns=1)[0]
    shot = gatt.with_fewshot(d, 3, random.Random(0), (1,))
    assert shot[0] == d[0] and shot[-1] == d[-1] and len(shot) == len(d) + 6
    names = world.find_instructions(d)
    inst = world.Standing(tuple(names), "")
    assert all(inst.obeys(m["content"]) for m in shot if m["role"] == "assistant")


def test_plot_adherence_writes_a_png(tmp_path):
    png = tmp_path / "a.png"
    gatt.plot_adherence({"sft": [1.0, 0.5, 0.25], "gatt": [1.0, 1.0, 0.9]}, png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert int.from_bytes(data[16:20], "big") == 800


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
    s = gatt.read_summary(str(ev / "eval.jsonl"))
    assert s["label"] == "sft" and s["n"] == 6 and len(s["adherence_by_turn"]) == 3
    assert 0.0 <= s["bestof"]["pass1_score"] <= s["bestof"]["bestof_score"] <= 1.0
    assert (ev / "adherence.png").read_bytes()[:4] == b"\x89PNG"


def test_stop_then_resume_matches_an_uninterrupted_run(tiny_ckpt, tmp_path):
    data = _write(tmp_path / "sft.jsonl", [json.dumps({"messages": d}) for d in
                                           world.sft_dialogs(30, seed=6)])
    flags = ["--checkpoint", str(tiny_ckpt), "--data", data, "--batch_size", "2", "--lr", "3e-3",
             "--epochs", "1", "--seq_len", "128", "--device", "cpu"]
    train_sft.main(flags + ["--out_dir", str(tmp_path / "a")])
    train_sft.main(flags + ["--out_dir", str(tmp_path / "b"), "--stop_at_step", "2"])
    mid = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    train_sft.main(flags + ["--out_dir", str(tmp_path / "b"), "--resume"])
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert mid["step"] == 2 and a["step"] == b["step"] > 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


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


def test_world_p_instruction_sets_the_share_of_instructed_dialogs():
    for p in (0.0, 0.5):
        cfg = train_sft.Config(world_n=400, world_p_instruction=p, world_levels="1,2")
        dialogs = [d for d, _, _ in train_sft.load_dialogs(cfg)]
        with_inst = [d for d in dialogs if world.find_instructions(d)]
        # the instruction stays in short dialogs (1-2 user turns), whatever the share
        assert all(sum(m["role"] == "user" for m in d) <= 2 for d in with_inst)
        assert abs(len(with_inst) / len(dialogs) - p) < 0.07, (p, len(with_inst))
