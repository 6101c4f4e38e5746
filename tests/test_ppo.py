"""train_rlhf.py --method ppo: the details that RLHF-with-PPO implementations get wrong (SPEC.md
§9), each pinned against a hand computation or an independent reference: the ratio exactly 1 and
the KL exactly 0 on the first mini-batch, a sequence's log-probs alone = in a padded batch, GAE and
advantage whitening by hand, the no-EOS score, combine_rewards, the judge never trained on; and a
tiny end-to-end run whose --resume gives the weights of an uninterrupted run."""
import json
import math
from dataclasses import asdict

import pytest
import torch

import llama2
import train_rlhf
import training
import world


def _chat_model(tokenizer, seed=0):
    """A tiny random chat model that ends its replies (EOS's output row reads a constant
    component of every embedding), as in test_rlhf.py."""
    torch.manual_seed(seed)
    args = llama2.ModelArgs.preset("tiny", vocab_size=tokenizer.n_words, max_seq_len=256)
    m = llama2.Transformer(args)
    with torch.no_grad():
        m.tok_embeddings.weight[:, 0] = 1.0
        m.output.weight[tokenizer.eos_id, 0] = 0.5
    return m


def _save(path, model, tokenizer, stage):
    training.save_checkpoint(path / "ckpt.pt", {
        "model_args": asdict(model.args), "model": model.state_dict(), "config": {},
        "tokenizer": torch.frombuffer(bytearray(tokenizer.model_bytes), dtype=torch.uint8),
        "stage": stage})
    return path


@pytest.fixture(scope="module")
def ckpts(tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo")
    chat = _chat_model(tokenizer)
    return {"sft": _save(d / "sft", chat, tokenizer, "sft"),
            "rm": _save(d / "rm", llama2.RewardModel.from_chat(chat, seed=1), tokenizer, "rm")}


def _cfg(**kw):
    cfg = train_rlhf.Config(method="ppo", max_new_tokens=8, max_turns=1, gen_batch=8,
                            ppo_batch=6, ppo_minibatch=3, ppo_lr=1e-3, value_lr=1e-3,
                            temperature=1.3)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


RT = training.Runtime(device=torch.device("cpu"), dtype=torch.float32)


def _models(ckpts):
    policy, tok = llama2.load_model(str(ckpts["sft"]))
    ref, _ = llama2.load_model(str(ckpts["sft"]))
    rm, _ = llama2.load_reward_model(str(ckpts["rm"]))
    critic, _ = llama2.load_reward_model(str(ckpts["rm"]))
    return policy.float(), ref.float().requires_grad_(False), rm.float(), critic.float(), tok


def _rolls(tokenizer, policy, n=6, seed=3):
    dialogs = world.chat_prompts(n, "train", 0, max_turns=1)
    ids = [llama2.encode_dialog(tokenizer, d)[0] for d in dialogs]
    return train_rlhf.rollout(policy, tokenizer, ids, _cfg(), seed, RT)


def test_first_minibatch_ratio_is_one_and_kl_zero_and_no_judge(ckpts, monkeypatch):
    policy, ref, rm, critic, tok = _models(ckpts)

    def judge(*a, **k):
        raise AssertionError("the judge was called during training")
    monkeypatch.setattr(world, "score", judge)
    cfg = _cfg()
    rolls = _rolls(tok, policy)
    assert {len(r["response"]) for r in rolls} != {cfg.max_new_tokens}  # some ended with EOS
    mbs = train_rlhf.old_pass(policy, ref, critic, rm, rolls, [5, 0, 3, 1, 4, 2], cfg,
                              (0.1, 2.0), RT)
    assert len(mbs) == 2 and all(mb["logp_old"].shape == mb["mask"].shape for mb in mbs)
    for mb in mbs:  # pi_0 is the start policy: the per-token KL is exactly 0, not just small
        assert torch.equal(mb["kl"], torch.zeros_like(mb["kl"]))
        assert torch.equal(mb["logp_old"], mb["logp_0"])
    opt_pi = training.make_optimizer(policy, lr=cfg.ppo_lr)
    opt_v = training.make_optimizer(critic, lr=cfg.value_lr)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    st = train_rlhf.ppo_update(policy, critic, opt_pi, opt_v, mbs, cfg, RT)
    assert st["first_ratio_dev"] == 0.0  # exactly: same weights, rows, padding and temperature
    assert st["approx_kl"] > 0  # the second mini-batch saw the first step
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_logprobs_alone_equal_padded_batch_and_a_reference(ckpts):
    policy, _, _, critic, tok = _models(ckpts)
    rolls = _rolls(tok, policy)
    T = 1.3
    batch = train_rlhf.make_batch(rolls, "cpu")
    with torch.no_grad():
        logp = train_rlhf.response_logprobs(policy, batch, T, RT)
        vals = train_rlhf.response_values(critic, batch, RT)
        for b, r in enumerate(rolls):
            n = len(r["response"])
            alone = train_rlhf.make_batch([r], "cpu")
            assert alone["mask"].sum() == n == batch["mask"][b].sum()
            torch.testing.assert_close(train_rlhf.response_logprobs(policy, alone, T, RT)[0],
                                       logp[b, :n], rtol=0, atol=1e-5)
            torch.testing.assert_close(train_rlhf.response_values(critic, alone, RT)[0],
                                       vals[b, :n], rtol=0, atol=1e-5)
            # independent reference: float64 forward of the unpadded sequence, token by token
            seq = torch.tensor([r["prompt"] + r["response"]])
            logits = policy.double()(seq)[0][0] / T
            policy.float()
            P = len(r["prompt"])
            ref = [float(torch.log_softmax(logits[P + j - 1], -1)[r["response"][j]])
                   for j in range(n)]
            assert logp[b, :n].tolist() == pytest.approx(ref, abs=1e-4)
            v_ref = critic.double()(seq)[0]
            critic.float()
            assert vals[b, :n].tolist() == pytest.approx(v_ref[P - 1:P - 1 + n].tolist(),
                                                         abs=1e-4)


def test_gae_and_advantage_whitening_by_hand():
    r = torch.tensor([[0.0, 0.1, 1.0], [0.2, -0.5, 9.0]])
    v = torch.tensor([[0.5, 0.4, 0.3], [0.1, 0.2, 9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 has 2 response tokens
    adv, ret = train_rlhf.gae(r, v, m, gamma=1.0, lam=0.95)
    # row 1: deltas d2 = 1.0 - 0.3 = 0.7, d1 = 0.1 + 0.3 - 0.4 = 0.0, d0 = 0 + 0.4 - 0.5 = -0.1
    a2 = 0.7
    a1 = 0.0 + 0.95 * a2
    a0 = -0.1 + 0.95 * a1
    # row 2 (padding ignored): d1 = -0.5 - 0.2 = -0.7, d0 = 0.2 + 0.2 - 0.1 = 0.3
    b1 = -0.7
    b0 = 0.3 + 0.95 * b1
    want = [[a0, a1, a2], [b0, b1, 0.0]]
    assert adv.tolist() == [pytest.approx(w, abs=1e-6) for w in want]
    assert ret.tolist() == [pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.3], abs=1e-6),
                            pytest.approx([b0 + 0.1, b1 + 0.2, 0.0], abs=1e-6)]
    # whitening over the batch's 5 response tokens, split in two mini-batches
    flat = [a0, a1, a2, b0, b1]
    mean = sum(flat) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / 5 + 1e-8)
    w1, w2 = train_rlhf.whiten_advantages([adv[:1], adv[1:]], [m[:1], m[1:]])
    assert w1[0].tolist() == pytest.approx([(x - mean) / std for x in (a0, a1, a2)], abs=1e-5)
    assert w2[0].tolist() == pytest.approx([(b0 - mean) / std, (b1 - mean) / std, 0.0],
                                           abs=1e-5)


def test_token_rewards_and_the_no_eos_score(ckpts, tokenizer):
    _, _, rm, _, _ = _models(ckpts)
    p = llama2.encode_dialog(tokenizer, world.chat_prompts(1, "train", 0, max_turns=1)[0])[0]
    rolls = [{"prompt": p, "response": [50, 60, tokenizer.eos_id], "eos": True},
             {"prompt": p, "response": [50, 60, 70, 80], "eos": False}]
    score, raw = train_rlhf.score_rollouts(rm, rolls, (0.25, 2.0), -1.0, RT)
    with torch.no_grad():
        ref = float(rm.double()(torch.tensor([p + rolls[0]["response"]]))[0, -1])
    assert float(raw[0]) == pytest.approx(ref, abs=1e-4) and math.isnan(float(raw[1]))
    assert float(score[0]) == pytest.approx((ref - 0.25) / 2.0, abs=1e-4)
    assert float(score[1]) == -1.0  # no EOS -> the fixed low score, never the RM's
    logp_old = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    logp_0 = torch.tensor([[-1.5, -2.0, -0.25, 0.0], [-1.0, -3.0, -1.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    rewards, kl = train_rlhf.token_rewards(score.clone(), logp_old, logp_0, mask, beta=0.1)
    assert kl.tolist() == [[0.5, 0.0, -0.25, 0.0], [0.0, 2.0, 0.0, 1.0]]
    s0 = (ref - 0.25) / 2.0
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.0, 0.025 + s0, 0.0], abs=1e-5)
    assert rewards[1].tolist() == pytest.approx([0.0, -0.2, 0.0, -0.1 - 1.0], abs=1e-6)
    assert train_rlhf.whitening_stats(torch.tensor([1.0, 3.0, float("nan")])) == \
        pytest.approx((2.0, math.sqrt(2.0)))


def test_combine_rewards():
    r_s = torch.tensor([0.9, 0.10, 0.5, 0.14, 0.8])
    r_h = torch.tensor([0.2, 0.70, 0.6, 0.99, 0.3])
    safe = torch.tensor([True, False, False, False, False])
    # safety-tagged -> R_s; R_s < 0.15 -> R_s; else R_h
    assert train_rlhf.combine_rewards(r_s, r_h, safe).tolist() == pytest.approx(
        [0.9, 0.10, 0.6, 0.14, 0.3])
    assert torch.equal(train_rlhf.combine_rewards(r_h, r_h, torch.zeros(5, dtype=torch.bool)),
                       r_h)  # one RM: the identity
    p = torch.tensor([0.25, 0.5, 0.9])
    assert train_rlhf.logit(p).tolist() == pytest.approx([math.log(1 / 3), 0.0, math.log(9)])


def _flags(ckpts, out, *more):
    return ["--method", "ppo", "--checkpoint", str(ckpts["sft"]), "--reward_model",
            str(ckpts["rm"]), "--ppo_prompts", "24", "--ppo_batch", "4", "--ppo_minibatch", "2",
            "--whiten_n", "4", "--val_prompts", "3", "--max_new_tokens", "8", "--max_turns", "1",
            "--ppo_lr", "1e-3", "--value_lr", "1e-3", "--device", "cpu", "--out_dir", str(out),
            *more]


def test_end_to_end_resume_matches_uninterrupted(ckpts, tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()  # an earlier run's evaluations in the folder: a fresh run (no --resume) measures anew
    for name in ("eval_start.json", "eval_final.json"):
        (a / name).write_text(json.dumps({"stale": True}))
    train_rlhf.main(_flags(ckpts, a, "--ppo_iterations", "2", "--eval", "true", "--eval_n", "4",
                           "--eval_bestof_n", "1", "--eval_k", "2", "--eval_mt_n", "1",
                           "--eval_turns", "2", "--eval_levels", "1",
                           "--compare", f"sft={ckpts['sft']}"))
    rows = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    its = [r for r in rows if r.get("iteration", 0) >= 1 and "score" in r]
    assert [r["iteration"] for r in its] == [1, 2]
    for k in ("score", "rm_raw", "judge", "kl", "score_minus_beta_kl", "eos_rate", "length",
              "entropy", "approx_kl", "clipfrac", "value_loss", "ratio_mean", "ratio_max",
              "val_score"):
        assert all(math.isfinite(r[k]) for r in its), k
    assert its[0]["kl"] == 0.0 and its[0]["first_ratio_dev"] == 0.0
    assert rows[0]["iteration"] == 0 and rows[0]["kl"] == 0.0 and rows[0]["beta"] == 0.01
    assert 0.0 <= rows[0]["judge"] <= 1.0  # pi_0's samples: the curves' first point
    ev = json.loads((a / "eval_final.json").read_text())
    assert 0.0 <= ev["win_rate"]["greedy"] <= 1.0 and ev["win_rate_against"] == "pi_0"
    # --compare sft: pi_0 IS the SFT model, so its replies (same prompts, same seeds) must be
    # eval_start's exactly, and the win rate is counted by hand from the paired judged scores
    start = json.loads((a / "eval_start.json").read_text())
    assert "stale" not in start and "stale" not in ev
    vs = ev["compare"]["sft"]
    for dec in ("greedy", "sampled"):
        assert vs[dec]["judge_scores"] == start[dec]["judge_scores"]
        mine, theirs = ev[dec]["judge_scores"], vs[dec]["judge_scores"]
        hand = sum(1.0 if x > y else 0.5 if x == y else 0.0
                   for x, y in zip(mine, theirs)) / len(mine)
        assert vs["win_rate"][dec] == pytest.approx(hand) == ev["win_rate"][dec]
    assert vs["adherence_by_turn"] == start["adherence_by_turn"]
    assert (a / "ppo_overopt.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "PPO 2/2: score" in out and "clipfrac" in out and "ratio mean" in out
    assert "[PPO vs sft] win rate" in out
    ck = training.load_checkpoint(a / "ckpt.pt")
    assert ck["stage"] == "rlhf" and ck["done"]
    model, _ = llama2.load_model(str(a))  # a chat checkpoint the evaluation and chat can load

    # stopped after iteration 1, then resumed; the judge made to fail (it is only measured)
    train_rlhf.main(_flags(ckpts, b, "--ppo_iterations", "2", "--eval", "false",
                           "--stop_at", "1:0"))
    assert training.load_checkpoint(b / "ckpt.pt")["stage"] == "rlhf_ppo"

    def judge(*a_, **k):
        raise AssertionError("the judge was called during training")
    monkeypatch.setattr(world, "score", judge)
    train_rlhf.main(_flags(ckpts, b, "--ppo_iterations", "2", "--eval", "false", "--resume",
                           "--ppo_judge", "false"))
    ck_b = training.load_checkpoint(b / "ckpt.pt")
    for k in ("policy_last", "critic", "model"):
        for name, t in ck[k].items():
            assert torch.equal(t, ck_b[k][name]), (k, name)
    rows_b = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows_b] == [0, 1, 2]
    assert rows_b[2]["score"] == its[1]["score"] and rows_b[2]["value_loss"] == its[1]["value_loss"]


def test_ppo_flag_errors(ckpts, tmp_path):
    with pytest.raises(SystemExit, match="ppo_minibatch"):
        train_rlhf.main(_flags(ckpts, tmp_path, "--ppo_minibatch", "0"))
    with pytest.raises(SystemExit, match="fewer than"):
        train_rlhf.main(_flags(ckpts, tmp_path, "--ppo_batch", "500"))
    with pytest.raises(SystemExit, match="name=checkpoint pairs"):
        train_rlhf.main(_flags(ckpts, tmp_path, "--compare", f"{ckpts['sft']}"))
    with pytest.raises(SystemExit, match="no such checkpoint"):  # before any training
        train_rlhf.main(_flags(ckpts, tmp_path, "--compare", f"sft={tmp_path / 'nope'}"))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_pipeline_ppo_stage_flags_are_accepted(tmp_path):
    import pipeline
    for size in ("full", "quick", "tiny"):
        st = next(s for s in pipeline.build_stages(pipeline.Config(size=size), tmp_path)
                  if s.name == "ppo")
        assert st.argv[:3] == ["train_rlhf.py", "--method", "ppo"] and st.outputs == ["ckpt.pt"]
        cfg = training.parse_config(train_rlhf.Config, st.argv[1:])
        train_rlhf.check_config(cfg)  # no error: every flag parses and the PPO scale is valid
        assert cfg.ppo_batch % cfg.ppo_minibatch == 0 and cfg.top_p == 1.0


def test_torchrun_two_processes_match_one_process(ckpts, tmp_path):
    # 2 ranks each roll out their chunks of the batch, take half of every mini-batch (DDP, the
    # loss a token mean over both halves) and reduce the whitening and the statistics == 1
    # process: the same rollouts, the statistics and weights after 2 iterations within float error
    import os
    import subprocess
    import sys
    from pathlib import Path
    flags = _flags(ckpts, tmp_path / "one", "--ppo_iterations", "2", "--gen_batch", "2",
                   "--ppo_minibatch", "2", "--eval", "false")  # 2 chunks of 2 rollouts
    torch.set_num_threads(1)
    train_rlhf.main(flags)
    root = Path(__file__).resolve().parents[1]

    def torchrun(out, *more):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node=2", "train_rlhf.py", *flags, "--out_dir",
                               str(tmp_path / out), *more], cwd=root, capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout
    assert "x 2 process(es)" in torchrun("two")
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("one", "two")]
    assert [r["iteration"] for r in rows[1]] == [0, 1, 2]
    for r1, r2 in zip(*rows):
        assert r1["eos_rate"] == r2["eos_rate"]  # the same rollouts
        for k in ("score", "rm_raw", "kl", "length", "entropy", "judge", "pg_loss",
                  "value_loss", "approx_kl", "clipfrac", "ratio_mean", "ratio_max", "val_score"):
            if k in r1:
                assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-5), k
    a = training.load_checkpoint(tmp_path / "one" / "ckpt.pt")
    b = training.load_checkpoint(tmp_path / "two" / "ckpt.pt")
    for k in ("policy_last", "critic"):
        for name in a[k]:  # stated tolerance: 1e-5 absolute on every weight (lr 1e-3, 2 steps)
            torch.testing.assert_close(a[k][name], b[k][name], rtol=0, atol=1e-5)
    assert a["whiten"] == b["whiten"]
    # under torchrun too, stopped after iteration 1 and resumed == uninterrupted, bitwise
    torchrun("two_r", "--stop_at", "1:0")
    assert "resumed after iteration 1" in torchrun("two_r", "--resume")
    c = training.load_checkpoint(tmp_path / "two_r" / "ckpt.pt")
    for k in ("policy_last", "critic", "model"):
        for name in b[k]:
            assert torch.equal(b[k][name], c[k][name]), (k, name)


def test_report_overlays_a_beta_sweep_from_hand_made_metrics(tmp_path, capsys):
    # two finished runs' metrics.jsonl (iteration 0 = pi_0's samples, eval rows ignored):
    # beta 0 over-optimizes (judge up then down, RM up), beta 0.1 keeps improving
    def run(name, beta, judge, rm):
        d = tmp_path / "sweep" / name
        d.mkdir(parents=True)
        rows = [{"step": i, "iteration": i, "kl": float(i * i), "rm_raw": r, "judge": j,
                 **({"beta": beta} if i == 0 else {})} for i, (j, r) in enumerate(zip(judge, rm))]
        rows.append({"step": len(judge) - 1, "eval": "final", "judge": 0.0})
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(d)
    a = run("b0", 0.0, [0.40, 0.50, 0.60, 0.50, 0.40, 0.30], [0, 1, 2, 3, 4, 5])
    b = run("b01", 0.1, [0.40, 0.42, 0.44, 0.46], [0, 0.5, 1.0, 1.5])
    train_rlhf.main(["--method", "ppo", "--report", f"{a},{b}"])
    out = capsys.readouterr().out
    assert "beta=0 | 5 | 25.00 | 5.00 | +5.000 | 0.300 | 2 (2.00) | judge score fell after its " \
           "peak while RM rose" in out
    assert "beta=0.1 | 3 | 9.00 | 3.00 | +1.500 | 0.460 | 3 (3.00) | no fall" in out
    rep = json.loads((tmp_path / "sweep" / "ppo_report.json").read_text())
    assert rep["beta=0"]["judge_fell_while_rm_rose"] and rep["beta=0.1"]["run_dir"] == b
    assert (tmp_path / "sweep" / "ppo_overopt.png").stat().st_size > 1000
    assert (tmp_path / "sweep" / "ppo_report.txt").read_text().startswith("run | iterations")
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        train_rlhf.main(["--method", "ppo", "--report", str(tmp_path)])
