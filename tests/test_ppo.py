"""train_rlhf.py --method ppo: the details that RLHF-with-PPO implementations get wrong (SPEC.md
§9), each pinned against a hand computation or an independent reference: the ratio exactly 1 and
the KL exactly 0 on the first mini-batch, a sequence's log-probs alone = in a padded batch, GAE and
advantage whitening by hand, the no-EOS score, the judge never trained on; the DIRECTION of one
update (log pi of positive-advantage tokens up, of negative ones down; values toward the returns;
both clips), GAE for any gamma and lambda and the per-token KL against float64 references; the
model kept by early stopping (pi_0 unless an iteration beats it beyond 2 paired standard errors);
and a tiny end-to-end run whose --resume gives the weights of an uninterrupted run."""
import copy
import json
import math

import pytest
import torch

import evaluate
import llama2
import train_rlhf
import training
import world
from conftest import chat_model, plain_model, save_model


@pytest.fixture(scope="module")
def ckpts(tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo")
    chat = chat_model(tokenizer)
    return {"sft": save_model(d / "sft", chat, tokenizer, "sft"),
            "rm": save_model(d / "rm", llama2.RewardModel.from_chat(chat, seed=1), tokenizer, "rm"),
            # another chat model for --compare: other weights and no lean toward EOS, so its
            # replies differ from pi_0's (which mostly end at once)
            "other": save_model(d / "other", plain_model(tokenizer, seed=1), tokenizer, "sft")}


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


# -----------------------------------------------------------------------------------------------
# the direction of one update: hand-made advantages and returns, one mini-batch, one step


def _hand_minibatch(policy, critic, rolls, T):
    """One mini-batch of the given rollouts with the old log-probs and values of the current
    weights; advantages and returns are left to the test."""
    mb = train_rlhf.make_batch(rolls, "cpu")
    with torch.no_grad():
        mb["logp_old"] = train_rlhf.response_logprobs(policy, mb, T, RT)
        mb["values_old"] = train_rlhf.response_values(critic, mb, RT)
    return mb


def _one_step(policy, critic, mb, cfg, lr=1e-4):
    """One ppo_update step on one mini-batch, AdamW without weight decay (so a zero gradient
    leaves a weight exactly where it was)."""
    opt_pi = training.make_optimizer(policy, lr=lr, weight_decay=0.0)
    opt_v = training.make_optimizer(critic, lr=lr, weight_decay=0.0)
    return train_rlhf.ppo_update(policy, critic, opt_pi, opt_v, [mb], cfg, RT)


def test_one_step_raises_log_pi_where_the_advantage_is_positive_and_lowers_it_elsewhere(ckpts):
    policy, _, _, critic, tok = _models(ckpts)
    cfg = _cfg(clip_ratio=0.2)
    rolls = _rolls(tok, policy)
    mb = _hand_minibatch(policy, critic, rolls, cfg.temperature)
    m = mb["mask"]
    # rollouts 0, 2, 4: advantage +1 on every token; 1, 3, 5: -1. The returns are the old values,
    # so the value loss has no gradient and only the policy moves
    sign = torch.tensor([1.0, -1.0] * 3)[:, None]
    mb["adv"] = sign * m
    mb["returns"] = mb["values_old"].clone()
    critic_before = {k: v.clone() for k, v in critic.state_dict().items()}
    _one_step(policy, critic, mb, cfg)
    with torch.no_grad():
        change = (train_rlhf.response_logprobs(policy, mb, cfg.temperature, RT)
                  - mb["logp_old"]) * m  # (B, R)
    up, down = change[0::2].sum(), change[1::2].sum()
    assert up > 1e-3 and down < -1e-3, (float(up), float(down))
    # each rollout alone moves the way its advantage says
    assert all(float(change[b].sum()) * float(sign[b]) > 0 for b in range(len(rolls)))
    assert all(torch.equal(critic_before[k], v) for k, v in critic.state_dict().items())


def test_the_ratio_clip_stops_the_gradient_only_where_the_advantage_agrees(ckpts):
    # log pi_old one nat below the current log pi: every ratio is e > 1 + 0.2. With A > 0 the
    # clipped term (1 + 0.2) A is the smaller objective: constant, no gradient, no step; with
    # A < 0 the unclipped ratio * A is the smaller one (the pessimistic bound): the policy moves
    for sign, moves in ((1.0, False), (-1.0, True)):
        policy, _, _, critic, tok = _models(ckpts)
        cfg = _cfg(clip_ratio=0.2)
        rolls = _rolls(tok, policy)
        mb = _hand_minibatch(policy, critic, rolls, cfg.temperature)
        mb["logp_old"] = mb["logp_old"] - 1.0
        mb["adv"] = sign * mb["mask"]
        mb["returns"] = mb["values_old"].clone()
        before = {k: v.clone() for k, v in policy.state_dict().items()}
        st = _one_step(policy, critic, mb, cfg)
        assert st["clipfrac"] == pytest.approx(1.0)  # every token's ratio is outside the clip
        changed = any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
        assert changed == moves, sign


def test_one_step_moves_the_values_toward_the_returns_and_the_value_clip(ckpts):
    policy, _, _, _, tok = _models(ckpts)
    cfg = _cfg(clip_value=0.2)
    rolls = _rolls(tok, policy)
    policy_before = {k: v.clone() for k, v in policy.state_dict().items()}

    def critic_step(values_old, returns, lr):
        critic = llama2.load_reward_model(str(ckpts["rm"]))[0].float()
        mb = _hand_minibatch(policy, critic, rolls, cfg.temperature)
        cur = mb["values_old"]
        mb["values_old"], mb["returns"] = values_old(cur), returns(cur)
        mb["adv"] = torch.zeros_like(mb["mask"])  # the policy gets no gradient
        before = {k: t.clone() for k, t in critic.state_dict().items()}
        st = _one_step(policy, critic, mb, cfg, lr=lr)
        with torch.no_grad():
            v = train_rlhf.response_values(critic, mb, RT)
        moved = any(not torch.equal(before[k], t) for k, t in critic.state_dict().items())
        return mb, v, st, moved
    # the returns 0.1 above (then below) the old values on every token, inside the clip: every
    # rollout's values move toward them, and the squared error falls
    for sign in (1.0, -1.0):
        mb, v, st, _ = critic_step(lambda cur: cur, lambda cur: cur + 0.1 * sign, 1e-5)
        m = mb["mask"]
        move = ((v - mb["values_old"]) * m).sum(1) / m.sum(1)  # (B,)
        assert all(float(x) * sign > 0 for x in move), (sign, move)
        assert ((v - mb["returns"]) ** 2 * m).sum() < ((mb["values_old"] - mb["returns"]) ** 2
                                                       * m).sum()
        # the value loss reported is the formula on the old values: 0.5 * mean (0.1)^2
        assert st["value_loss"] == pytest.approx(0.5 * 0.01, rel=1e-4)
    assert all(torch.equal(policy_before[k], t) for k, t in policy.state_dict().items())

    # value clipping: the old values 0.5 below the current ones (the value has already moved
    # past old + 0.2). Returns 1.0 above the current value: the clipped error (1.3)^2 is the
    # larger, constant in the weights -> no step; returns 1.0 below: the unclipped error is the
    # larger -> the critic moves
    for sign, moves in ((1.0, False), (-1.0, True)):
        _, _, _, moved = critic_step(lambda cur: cur - 0.5, lambda cur: cur + sign, 1e-5)
        assert moved == moves, sign


def test_gae_for_any_gamma_and_lambda_against_the_sum_definition():
    # A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V after the last
    # response token 0; summed term by term in float64 (not the code's backward recursion), on
    # rows of different lengths whose padding holds garbage
    gen = torch.Generator().manual_seed(5)
    lengths = [5, 1, 3, 4]
    B, R = len(lengths), 5
    r = torch.randn(B, R, generator=gen, dtype=torch.float64)
    v = torch.randn(B, R, generator=gen, dtype=torch.float64)
    m = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in lengths], dtype=torch.float64)
    r_pad, v_pad = r + 50 * (1 - m), v - 70 * (1 - m)
    for gamma, lam in ((0.9, 0.8), (1.0, 0.95), (0.5, 1.0), (0.99, 0.0)):
        adv, ret = train_rlhf.gae(r_pad, v_pad, m, gamma, lam)
        for b, n in enumerate(lengths):
            V = [float(v[b, t]) for t in range(n)] + [0.0]
            delta = [float(r[b, t]) + gamma * V[t + 1] - V[t] for t in range(n)]
            want = [sum((gamma * lam) ** k * delta[t + k] for k in range(n - t)) for t in range(n)]
            assert adv[b, :n].tolist() == pytest.approx(want, abs=1e-12), (gamma, lam, b)
            assert ret[b, :n].tolist() == pytest.approx([a + V[t] for t, a in enumerate(want)],
                                                        abs=1e-12)
            assert adv[b, n:].abs().sum() == 0  # nothing in the padding


def test_the_per_token_kl_to_pi_0_against_a_float64_reference(ckpts):
    # a policy that has moved away from pi_0 (noise on its weights): old_pass's per-token KL
    # estimate, log pi_old - log pi_0 at the rollout temperature, against float64 forwards of
    # each unpadded sequence through both models; the penalty in the rewards and the batch's KL
    policy, ref, rm, critic, tok = _models(ckpts)
    cfg = _cfg(beta=0.05)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    rolls = _rolls(tok, policy)
    mbs = train_rlhf.old_pass(policy, ref, critic, rm, rolls, [4, 1, 3, 0, 5, 2], cfg,
                              (0.0, 1.0), RT)
    p64, r64 = copy.deepcopy(policy).double(), copy.deepcopy(ref).double()
    total = []
    for mb in mbs:
        for row, i in enumerate(mb["idx"]):
            roll = rolls[i]
            seq = torch.tensor([roll["prompt"] + roll["response"]])
            P, n = len(roll["prompt"]), len(roll["response"])
            with torch.no_grad():
                lp = [torch.log_softmax(mod(seq)[0][0].double() / cfg.temperature, -1)
                      for mod in (p64, r64)]
            want = [float(lp[0][P + j - 1, t] - lp[1][P + j - 1, t])
                    for j, t in enumerate(roll["response"])]
            assert mb["kl"][row, :n].tolist() == pytest.approx(want, abs=2e-4)
            assert mb["kl"][row, n:].abs().sum() == 0
            assert any(abs(x) > 1e-2 for x in want)  # the two models do differ
            pen = [-cfg.beta * x for x in want]
            pen[-1] += float(mb["score"][row])  # the score at the last token
            assert mb["rewards"][row, :n].tolist() == pytest.approx(pen, abs=2e-5)
            total.append(sum(want))
    assert train_rlhf.batch_stats(mbs, cfg, RT)["kl"] == pytest.approx(
        sum(total) / len(total), abs=1e-3)


# -----------------------------------------------------------------------------------------------
# early stopping: the model kept is pi_0 unless an iteration beats it beyond noise


def test_paired_gain_is_the_mean_difference_and_its_standard_error():
    import statistics
    a, b = [0.5, 0.9, 0.75, 0.1], [0.1, 0.5, 0.3, 0.2]
    d = [x - y for x, y in zip(a, b)]
    mean, se = evaluate.paired_gain(a, b)
    assert mean == pytest.approx(statistics.fmean(d))
    assert se == pytest.approx(statistics.stdev(d) / math.sqrt(4))
    assert evaluate.paired_gain([1.0, 2.0], [1.0, 2.0]) == (0.0, 0.0)
    assert evaluate.paired_gain([1.0], [0.0]) == (1.0, math.inf)


def test_the_kept_model_is_pi_0_unless_an_iteration_beats_it_by_two_standard_errors(
        ckpts, tmp_path, monkeypatch, capsys):
    # validation scores scripted per call (pi_0 first, then each iteration), and the policy's
    # weights recorded at each call, so the kept model can be named by hand:
    #   pi_0 [0.1, 0.5, 0.3] (mean 0.3)
    #   it 1 [0.9, 0.0, 0.05]: mean higher, differences +0.8 -0.5 -0.25: +0.017 +- 0.40, noise
    #   it 2 [0.5, 0.9, 0.75]: +0.4 +0.4 +0.45: +0.417 +- 0.017, beyond 2 SE -> kept
    #   it 3 [1.9, 0.2, 0.4]: the highest mean, but +1.8 -0.3 +0.1: +0.53 +- 0.64, noise
    import statistics
    start = [0.1, 0.5, 0.3]
    script = [start, [0.9, 0.0, 0.05], [0.5, 0.9, 0.75], [1.9, 0.2, 0.4]]
    seen = []

    def fake_validate(policy, *a, **k):
        seen.append({k_: v.detach().clone() for k_, v in policy.state_dict().items()})
        return list(script[len(seen) - 1])
    monkeypatch.setattr(train_rlhf, "validate", fake_validate)
    out = tmp_path / "k"
    train_rlhf.main(_flags(ckpts, out, "--ppo_iterations", "3", "--patience", "0", "--eval",
                           "false", "--ppo_judge", "false"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_score" in r]
    assert [r["iteration"] for r in val] == [0, 1, 2, 3]
    for r, sc in zip(val, script):
        d = [x - y for x, y in zip(sc, start)]
        assert r["val_score"] == pytest.approx(statistics.fmean(sc))
        assert r["val_diff"] == pytest.approx(statistics.fmean(d), abs=1e-12)
        assert r["val_se"] == pytest.approx(statistics.stdev(d) / math.sqrt(3), abs=1e-12)
    assert [r["val_kept"] for r in val] == [True, False, True, False]
    ck = training.load_checkpoint(out / "ckpt.pt")
    assert ck["kept"]["iteration"] == 2 and ck["val_start"] == start
    for k, t in ck["model"].items():
        assert torch.equal(t, seen[2][k]), k
    assert "holds iteration 2" in capsys.readouterr().out

    # one noisy iteration: pi_0 is kept (before, the higher mean alone made iteration 1 the model)
    seen.clear()
    out = tmp_path / "k1"
    train_rlhf.main(_flags(ckpts, out, "--ppo_iterations", "1", "--eval", "false",
                           "--ppo_judge", "false"))
    ck = training.load_checkpoint(out / "ckpt.pt")
    sft = training.load_checkpoint(ckpts["sft"] / "ckpt.pt")["model"]
    assert ck["kept"]["iteration"] == 0
    assert not all(torch.equal(t, sft[k]) for k, t in ck["policy_last"].items())  # it trained
    for k, t in ck["model"].items():
        assert torch.equal(t, sft[k]), k
    assert "holds pi_0" in capsys.readouterr().out
    # --keep_se 0: the best mean above pi_0's, whatever the noise
    seen.clear()
    out = tmp_path / "k0"
    train_rlhf.main(_flags(ckpts, out, "--ppo_iterations", "1", "--eval", "false",
                           "--ppo_judge", "false", "--keep_se", "0"))
    ck = training.load_checkpoint(out / "ckpt.pt")
    assert ck["kept"]["iteration"] == 1
    for k, t in ck["model"].items():
        assert torch.equal(t, seen[1][k]), k
    with pytest.raises(SystemExit, match="--keep_se -1"):
        train_rlhf.main(_flags(ckpts, out, "--keep_se", "-1"))


def _flags(ckpts, out, *more):
    # float32 on every CPU: these runs are compared to float32 rounding;
    # test_bf16.py checks bfloat16
    return ["--method", "ppo", "--checkpoint", str(ckpts["sft"]), "--reward_model",
            str(ckpts["rm"]), "--ppo_prompts", "24", "--ppo_batch", "4", "--ppo_minibatch", "2",
            "--whiten_n", "4", "--val_prompts", "3", "--max_new_tokens", "8", "--max_turns", "1",
            "--ppo_lr", "1e-3", "--value_lr", "1e-3", "--device", "cpu", "--out_dir", str(out),
            "--dtype", "float32", *more]


def test_end_to_end_resume_matches_uninterrupted(ckpts, tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()  # an earlier run's evaluations in the folder: a fresh run (no --resume) measures anew
    for name in ("eval_start.json", "eval_final.json"):
        (a / name).write_text(json.dumps({"stale": True}))
    flags_a = _flags(ckpts, a, "--ppo_iterations", "2", "--eval", "true", "--eval_n", "4",
                     "--eval_bestof_n", "1", "--eval_k", "2", "--eval_mt_n", "1",
                     "--eval_turns", "2", "--eval_levels", "1",
                     "--compare", f"other={ckpts['other']}")
    train_rlhf.main(flags_a)
    rows = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    its = [r for r in rows if r.get("iteration", 0) >= 1 and "score" in r]
    assert [r["iteration"] for r in its] == [1, 2]
    for k in ("score", "rm_raw", "judge", "kl", "score_minus_beta_kl", "eos_rate", "length",
              "entropy", "approx_kl", "clipfrac", "value_loss", "ratio_mean", "ratio_max",
              "val_score"):
        assert all(math.isfinite(r[k]) for r in its), k
    assert its[0]["kl"] == 0.0 and its[0]["first_ratio_dev"] == 0.0
    assert rows[0]["iteration"] == 0 and rows[0]["kl"] == 0.0 and rows[0]["beta"] == 0.01
    ev = json.loads((a / "eval_final.json").read_text())
    start = json.loads((a / "eval_start.json").read_text())
    assert "stale" not in start and "stale" not in ev and ev["win_rate_against"] == "pi_0"

    def by_hand(mine, theirs):  # judged, one sample each, ties half
        return sum(1.0 if x > y else 0.5 if x == y else 0.0
                   for x, y in zip(mine, theirs)) / len(mine)
    # --compare other: a different model, evaluated here directly on the run's held-out prompts
    # with the run's seeds and temperature; its replies are not pi_0's, and the stored scores and
    # the win rate (counted by hand from the paired judged scores) are those of this evaluation
    cfg = training.parse_config(train_rlhf.Config, flags_a)
    other, tok = llama2.load_model(str(ckpts["other"]))
    rm, rm_tok = llama2.load_reward_model(str(ckpts["rm"]))
    rm.tokenizer = rm_tok
    direct = evaluate.one_sample_stats(other.float().eval(), tok, rm.float().eval(), cfg,
                                       cfg.temperature, RT, "other")
    vs = ev["compare"]["other"]
    assert vs["checkpoint"] == str(ckpts["other"])
    for dec in ("greedy", "sampled"):
        assert vs[dec]["judge_scores"] == direct[dec]["judge_scores"]
        assert vs[dec]["rm_scores"] == pytest.approx(direct[dec]["rm_scores"], abs=1e-5)
        assert vs[dec]["rm_scores"] != pytest.approx(start[dec]["rm_scores"], abs=1e-3)
        assert vs["win_rate"][dec] == pytest.approx(by_hand(ev[dec]["judge_scores"],
                                                            direct[dec]["judge_scores"]))
        assert ev["win_rate"][dec] == pytest.approx(by_hand(ev[dec]["judge_scores"],
                                                            start[dec]["judge_scores"]))
    assert (a / "ppo_overopt.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "PPO 2/2: score" in out and "clipfrac" in out and "ratio mean" in out
    assert "[PPO vs other] win rate" in out
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


def test_ppo_with_two_reward_models_scores_each_rollout_by_the_rule(ckpts, tokenizer, tmp_path,
                                                                     monkeypatch):
    """--safety_rm under PPO (paper §3.2.2): every rollout's score is the combined reward of its
    exact tokens, the safety RM's on a safety prompt; the pool and the validation prompts carry
    --safety_share safety prompts of their own splits."""
    chat = chat_model(tokenizer)
    srm_path = save_model(tmp_path / "srm", llama2.RewardModel.from_chat(chat, seed=7),
                          tokenizer, "rm")
    cfg = training.parse_config(train_rlhf.Config, _flags(ckpts, tmp_path / "x",
                                                          "--safety_share", "0.5"))
    dialogs, pool, (val_ids, val_safety) = train_rlhf.ppo_prompts(cfg, 256, tokenizer)
    kinds = [world.prompt_kind(d) for d in dialogs]
    assert sum(k != "ordinary" for k in kinds) == 12 and sum(val_safety) in (1, 2)
    for d in dialogs:
        req = world.parse_request(d)
        assert (req.split if req else world.parse_dialog(d)[0].split) == "train"
    # the combined logits of exact token sequences are CombinedReward.score of the same texts
    h, _ = llama2.load_reward_model(str(ckpts["rm"]))
    s, _ = llama2.load_reward_model(str(srm_path))
    h.tokenizer = s.tokenizer = tokenizer
    combined = train_rlhf.CombinedReward(h.float().eval(), s.float().eval())
    texts = ["The answer is 4.", "Sorry, I won't.", "It is 1234."] * 4
    seqs = [llama2.encode_response(tokenizer, d, t) for d, t in zip(dialogs[:12], texts)]
    rt = training.setup_runtime("cpu", "float32", 0)
    got = train_rlhf.rm_logits(combined, seqs, rt, train_rlhf.is_safety(dialogs[:12]))
    assert got.tolist() == pytest.approx(combined.score(dialogs[:12], texts).tolist(), abs=1e-5)
    safety_rows = [i for i, k in enumerate(kinds[:12]) if k != "ordinary"]
    assert safety_rows and got[safety_rows].tolist() == pytest.approx(
        s.score([dialogs[i] for i in safety_rows], [texts[i] for i in safety_rows]).tolist(),
        abs=1e-5)
    # a run: every raw score (rollouts and validation) is the rule applied by hand to the two
    # RMs' logits of the rollout's tokens, IS_SAFETY read from the prompt the tokens encode
    val = train_rlhf.training_prompts(cfg, cfg.val_prompts, "valid", cfg.seed + 1)
    by_ids = {tuple(llama2.encode_dialog(tokenizer, d)[0]): d for d in dialogs + val}
    val_ids_set = {tuple(llama2.encode_dialog(tokenizer, d)[0]) for d in val}
    seen = []
    original = train_rlhf.score_rollouts

    def spy(rm, rolls, stats, no_eos_score, rt):
        score, raw = original(rm, rolls, stats, no_eos_score, rt)
        for r, x in zip(rolls, raw.tolist()):
            if not r["eos"]:
                continue
            seq = [r["prompt"] + r["response"]]
            rh, rs = (float(train_rlhf.rm_logits(m, seq, rt)[0]) for m in (h, s))
            unsafe = world.prompt_kind(by_ids[tuple(r["prompt"])]) != "ordinary"
            want = rs if unsafe or 1 / (1 + math.exp(-rs)) < 0.15 else rh
            assert x == pytest.approx(want, abs=1e-5)
            seen.append((unsafe, tuple(r["prompt"]) in val_ids_set))
        return score, raw
    monkeypatch.setattr(train_rlhf, "score_rollouts", spy)
    train_rlhf.main(_flags(ckpts, tmp_path / "ppo", "--ppo_iterations", "2", "--eval", "false",
                           "--safety_rm", str(srm_path), "--safety_share", "0.5",
                           "--ppo_batch", "8", "--ppo_minibatch", "4"))
    # safety and ordinary prompts among both the rollouts that train and the validation's
    assert {(True, False), (False, False), (True, True), (False, True)} <= set(seen)
