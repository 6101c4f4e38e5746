"""evaluate.py: the unbiased best-of-N estimators against brute-force enumeration of every
N-subset, and the win rate against values computed by hand."""
import itertools
import random
import statistics

import pytest

import evaluate


def _brute(rewards, n, stat):
    """The mean of stat over every n-subset of the M rewards (what the estimator must equal)."""
    subsets = list(itertools.combinations(rewards, n))
    return sum(stat(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_expected_max_and_median_match_every_subset(m, seed):
    rng = random.Random(seed * 100 + m)
    rewards = [rng.gauss(0, 1) for _ in range(m)]
    if m >= 3:
        rewards[1] = rewards[2]  # a tie
    for n in range(1, m + 1):
        assert evaluate.expected_max_of_n(rewards, n) == pytest.approx(_brute(rewards, n, max),
                                                                       rel=1e-12, abs=1e-12)
        assert evaluate.expected_median_of_n(rewards, n) == pytest.approx(
            _brute(rewards, n, statistics.median), rel=1e-12, abs=1e-12)
        for k in range(1, n + 1):
            assert evaluate.expected_order_stat(rewards, n, k) == pytest.approx(
                _brute(rewards, n, lambda s: sorted(s)[k - 1]), rel=1e-12, abs=1e-12)


def test_estimator_by_hand_and_edges():
    r = [3.0, 1.0, 2.0]
    # N=1: the mean; N=M: the max; N=2 of {1,2,3}: subsets {1,2},{1,3},{2,3} -> (2+3+3)/3
    assert evaluate.expected_max_of_n(r, 1) == pytest.approx(2.0)
    assert evaluate.expected_max_of_n(r, 3) == 3.0
    assert evaluate.expected_max_of_n(r, 2) == pytest.approx(8 / 3)
    assert evaluate.expected_median_of_n(r, 2) == pytest.approx((1.5 + 2 + 2.5) / 3)
    with pytest.raises(ValueError, match="n <= M"):
        evaluate.expected_max_of_n(r, 4)
    c = evaluate.best_of_n_curve([[0.0, 1.0], [2.0, 2.0, 5.0]])
    # M = the fewest samples of a prompt (2); prompt 2 from 3 samples: N=1 -> 3, N=2 -> (2+5+5)/3
    assert c["n"] == [1, 2] and c["m"] == 2
    assert c["max"] == pytest.approx([(0.5 + 3.0) / 2, (1.0 + 4.0) / 2])
    assert c["median"][0] == pytest.approx(c["max"][0])  # one sample: median = max = mean


def test_win_rate_by_hand():
    # win, loss, tie, win -> (1 + 0 + 0.5 + 1) / 4
    assert evaluate.win_rate([0.9, 0.1, 0.5, 0.6], [0.2, 0.3, 0.5, 0.5]) == pytest.approx(0.625)
    assert evaluate.win_rate([0.4, 0.7], [0.4, 0.7]) == 0.5  # against itself: the 50% floor
    assert evaluate.win_rate([1.0], [0.0]) == 1.0
    with pytest.raises(ValueError, match="2 scores against 1"):
        evaluate.win_rate([1.0, 0.0], [0.0])


def _rows(judge, rm, kl):
    return [{"iteration": i, "judge": j, "rm_raw": r, "kl": k}
            for i, (j, r, k) in enumerate(zip(judge, rm, kl))]


def test_overopt_summary_finds_a_peak_then_a_fall_by_hand():
    # judged score up then down while the RM keeps rising: the over-optimization signature
    rows = _rows(judge=[0.40, 0.50, 0.60, 0.50, 0.40, 0.30], rm=[0, 1, 2, 3, 4, 5],
                 kl=[0, 1, 4, 9, 16, 25])
    s = evaluate.overopt_summary(rows, window=3, margin=0.03)
    # centred means of 3: judge [.45, .5, .533, .5, .4, .35] -> peak at iteration 2, sqrt KL 2
    assert s["peak"]["iteration"] == 2 and s["peak"]["sqrt_kl"] == 2.0
    assert s["peak"]["judge_smoothed"] == pytest.approx(1.6 / 3)
    assert s["final"]["judge_smoothed"] == pytest.approx(0.35) and s["final"]["sqrt_kl"] == 5.0
    assert s["final"]["rm"] == 5 and s["final"]["kl"] == 25
    assert s["judge_fell_while_rm_rose"]
    assert s["verdict"].startswith("judge score fell after its peak while RM rose")
    table = evaluate.overopt_table({"beta=0": s})
    assert "beta=0 | 5 | 25.00 | 5.00 | +5.000 | 0.300 | 2 (2.00) | judge score fell" in table


def test_overopt_summary_no_fall():
    # the judge rises to the end: no peak before the last iteration
    s = evaluate.overopt_summary(_rows([0.4, 0.45, 0.5, 0.55], [0, 1, 2, 3], [0, 1, 2, 3]))
    assert s["peak"]["iteration"] == 3 and not s["judge_fell_while_rm_rose"]
    assert s["verdict"].startswith("no fall: the judged score is highest at the last")
    # the judge falls, but the RM falls too: not the over-optimization signature
    s = evaluate.overopt_summary(_rows([0.4, 0.6, 0.6, 0.3, 0.3], [3, 2, 2, 1, 0],
                                       [0, 1, 2, 3, 4]))
    assert s["peak"]["iteration"] == 1 and not s["judge_fell_while_rm_rose"]
    assert s["verdict"].startswith("no fall beyond")
    # a dip smaller than the margin is noise, not a fall
    s = evaluate.overopt_summary(_rows([0.5, 0.52, 0.51, 0.50], [0, 1, 2, 3], [0, 1, 2, 3]),
                                 window=1, margin=0.03)
    assert s["peak"]["iteration"] == 1 and not s["judge_fell_while_rm_rose"]
    with pytest.raises(ValueError, match="no iteration"):
        evaluate.overopt_summary([{"iteration": 0, "kl": 0.0, "rm_raw": None, "judge": 0.5}])


def test_policy_stats_count_correct_rambling_and_repeating_by_hand():
    """evaluate._stats: the rates of right answers, rambling replies (over world.RAMBLING_WORDS
    words) and repeating ones (a word trigram twice), counted by hand on four replies."""
    import sampling
    import world

    class NoRM:  # the RM's scores are not what this test checks
        def score(self, dialogs, texts):
            return [0.0] * len(texts)

    prompts = world.eval_prompts(4, seed=3, p_instruction=0.0, levels=(1,))
    answer = world.parse_dialog(prompts[0])[0].answer
    long = " ".join(f"w{i}" for i in range(world.RAMBLING_WORDS + 1))  # 21 distinct words
    replies = [sampling.Reply(f"The answer is {answer}.", True, 5),
               sampling.Reply(long, True, 30),
               sampling.Reply("one two three and one two three", True, 8),
               sampling.Reply("", False, 0)]
    s = evaluate._stats(prompts, replies, NoRM())
    assert s["correct"] == 0.25 and s["rambling"] == 0.25 and s["repeating"] == 0.25
    assert s["eos_rate"] == 0.75 and s["tokens"] == pytest.approx(43 / 4)
    # the flaw of each reply (world.flaw_of, no EOS first): both wordy replies have the answer
    # wrong, which world.flaw_of names first
    assert s["flaws"] == {"none": 0.25, "wrong": 0.5, "no_eos": 0.25}
    # one right answer of four (no partial credit for the others), so with every instruction
    # kept and perfect form: (1.0 + 0.4 + 0.4 + 0.4) / 4
    assert s["content_ceiling"] == pytest.approx(2.2 / 4)


def test_sampled_replies_are_drawn_as_a_user_meets_the_model(monkeypatch):
    """one_sample_stats: greedy at T 0; the sampled replies at train_rlhf's eval_temperature and
    eval_top_p (Meta's chat default 0.6 / 0.9) whatever the method's T, recorded in the stats;
    eval_temperature 0 samples at the method's T and top_p."""
    import sampling
    import train_rlhf

    calls = []

    def fake(model, tok, prompts, temperature=0.0, top_p=1.0, **kw):
        calls.append((temperature, top_p))
        return [[sampling.Reply("The answer is 1.", True, 4)] for _ in prompts]

    class NoRM:
        def score(self, dialogs, texts):
            return [0.0] * len(texts)
    monkeypatch.setattr(sampling, "generate_replies", fake)
    cfg = train_rlhf.Config(eval_n=3, eval_levels="1")
    s = evaluate.one_sample_stats(None, None, NoRM(), cfg, 1.3)
    assert sorted(calls) == [(0.0, 1.0), (0.6, 0.9)]
    assert (s["sampled"]["temperature"], s["sampled"]["top_p"]) == (0.6, 0.9)
    calls.clear()
    cfg = train_rlhf.Config(eval_n=3, eval_levels="1", eval_temperature=0.0, top_p=0.95)
    s = evaluate.one_sample_stats(None, None, NoRM(), cfg, 1.3)
    assert sorted(calls) == [(0.0, 0.95), (1.3, 0.95)]
    assert (s["sampled"]["temperature"], s["sampled"]["top_p"]) == (1.3, 0.95)


def test_ppo_validates_on_the_validation_split(tokenizer):
    """PPO's early stopping reads the world's validation split; its rollouts train-split problems;
    neither touches the held-out test problems the report shows."""
    import llama2
    import train_rlhf
    import world
    cfg = train_rlhf.Config(ppo_prompts=40, val_prompts=12, ppo_batch=4, max_new_tokens=8)
    pool, pool_ids, (val_ids, val_safety) = train_rlhf.ppo_prompts(cfg, 512, tokenizer)
    assert len(pool) == len(pool_ids) > 30 and len(val_ids) == 12 and not any(val_safety)
    split = lambda d: {world.parse_prompt(world.strip_instructions(u)).split  # noqa: E731
                       for u in world.user_turns(d)}
    assert all(split(d) == {"train"} for d in pool)
    val = world.chat_prompts(12, "valid", cfg.seed + 1, (1, 2), cfg.p_instruction, cfg.max_turns)
    assert [llama2.encode_dialog(tokenizer, d)[0] for d in val] == val_ids
    assert all(split(d) == {"valid"} for d in val)
