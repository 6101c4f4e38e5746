"""train_rlhf.py, rejection sampling: the RM's argmax picks (never the judge by default), pooling
across iterations, exact --resume mid-iteration, clear errors, and a tiny end-to-end run with
its report. Tiny models made here; the chat model leans toward EOS so that replies end."""
import json
import math

import pytest
import torch

import evaluate
import llama2
import sampling
import train_rlhf
import training
import world
from conftest import chat_model, make_corpus, plain_model, save_model


@pytest.fixture(scope="module")
def ckpts(tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("rlhf")
    chat = chat_model(tokenizer)
    return {"sft": save_model(d / "sft", chat, tokenizer, "sft"),
            "pretrain": save_model(d / "pt", chat, tokenizer, "pretrain"),
            "rm": save_model(d / "rm", llama2.RewardModel.from_chat(chat, seed=1), tokenizer, "rm"),
            # another chat model for --compare: other weights and no lean toward EOS, so its
            # replies differ from V0's (which mostly end at once)
            "other": save_model(d / "other", plain_model(tokenizer, seed=1), tokenizer, "sft")}


class _Log:
    """Stands in for training.MetricsLog: keeps the last record and its line."""
    def write(self, record, text=None):
        self.record, self.text = record, text


def _flags(ckpts, out, *more):
    # float32 on every CPU: these runs are compared to float32 rounding;
    # test_bf16.py checks bfloat16
    return ["--checkpoint", str(ckpts["sft"]), "--reward_model", str(ckpts["rm"]),
            "--prompts", "6", "--k", "4", "--tune_prompts", "3", "--temperatures", "0.8,1.3",
            "--max_new_tokens", "12", "--max_turns", "1", "--batch_size", "1", "--epochs", "2",
            "--lr", "3e-4", "--eval", "false", "--device", "cpu", "--out_dir", str(out),
            "--dtype", "float32", *more]


def test_the_pick_is_the_rm_argmax_and_the_judge_is_not_called(ckpts, tokenizer, monkeypatch):
    rm, _ = llama2.load_reward_model(str(ckpts["rm"]))
    prompts = world.chat_prompts(4, "train", 0, max_turns=2)
    texts = ["The answer is 4.", "It is 7.", "no", "The answer is 12."]
    samples = [[sampling.Reply(t, eos=(j != 1), n_tokens=3) for j, t in enumerate(texts)]
               for _ in prompts]
    samples[2] = None  # a prompt with no room in the context

    def judge(*a, **k):
        raise AssertionError("the judge was called during selection")
    monkeypatch.setattr(world, "score", judge)
    rewards = train_rlhf.score_samples(prompts, samples, "rm", rm)
    best = train_rlhf.choose_best(samples, rewards)
    # reference: each reward from a float64 forward pass of the one sequence, read at its EOS
    ref_rm = rm.double()  # (in place: rewards above were computed in float32)
    for p, (d, rs) in enumerate(zip(prompts, samples)):
        if rs is None:
            assert rewards[p] is None and best[p] is None
            continue
        with torch.no_grad():
            ref = [float(ref_rm(torch.tensor([llama2.encode_response(tokenizer, d, r.text)]))
                         [0, -1]) for r in rs]
        assert rewards[p] == pytest.approx(ref, abs=1e-4)
        # the argmax among the replies that ended with EOS (reply 1 did not: never picked)
        assert best[p] == max((j for j in range(4) if j != 1), key=lambda j: ref[j])
    # the oracle ablation is what calls the judge
    with pytest.raises(AssertionError, match="judge was called"):
        train_rlhf.score_samples(prompts, samples, "judge", rm)


def test_pool_gold_keeps_each_prompts_best_across_iterations():
    c = lambda t, r, i: {"text": t, "reward": r, "iteration": i}  # noqa: E731
    it1 = [c("a1", 0.5, 1), c("b1", -1.0, 1), None, c("d1", 2.0, 1)]
    it2 = [c("a2", 0.2, 2), c("b2", 0.0, 2), None, c("d2", 2.0, 2)]
    it3 = [c("a3", 0.4, 3), None, c("c3", 1.0, 3), c("d3", 1.0, 3)]
    gold = train_rlhf.pool_gold([it1, it2, it3])
    # by hand: a1 (0.5 > 0.4 > 0.2), b2 (0.0), c3 (the only one), d1 (tie 2.0: the earliest)
    assert [g["text"] for g in gold] == ["a1", "b2", "c3", "d1"]
    assert train_rlhf.pool_gold([[None]]) == [None]


def _gold(path):
    return [json.loads(x)["text"] for x in path.read_text().splitlines()]


def _samples(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_pooling_in_the_script_and_resume_is_bitwise_exact(ckpts, tmp_path):
    a = tmp_path / "a"
    train_rlhf.main(_flags(ckpts, a))
    runs = [_samples(a / f"iter{i}" / "samples.jsonl") for i in (1, 2, 3)]
    assert all(isinstance(r.get("greedy"), str) for rs in runs for r in rs)  # SPEC §11's yardstick

    def best_over(iters, p):
        # the best EOS sample of prompt p over the given iterations, by reward (earliest on ties)
        cands = [(r[p]["rewards"][j], -i, r[p]["responses"][j]) for i, r in iters
                 for j in range(len(r[p]["responses"])) if r[p]["eos"][j]]
        return max(cands)[2] if cands else None
    # V1, V2: their own samples' best; V3 (pooling from V3 on): the best over V1..V3's samples
    for i in (1, 2):
        assert _gold(a / f"iter{i}" / "gold.jsonl") == [best_over([(i, runs[i - 1])], p)
                                                        for p in range(6)]
    want = [best_over(list(enumerate(runs, 1)), p) for p in range(6)]
    assert _gold(a / "iter3" / "gold.jsonl") == want
    # --pool false: V3 trains on its own samples only
    b = tmp_path / "nopool"
    train_rlhf.main(_flags(ckpts, b, "--pool", "false"))
    assert _gold(b / "iter3" / "gold.jsonl") == [
        best_over([(3, _samples(b / "iter3" / "samples.jsonl"))], p) for p in range(6)]

    # stopped right after iteration 2's sampling, and after one fine-tuning step of it
    va = torch.load(a / "V3" / "ckpt.pt", weights_only=True)["model"]
    for stop in ("2:0", "2:1"):
        c = tmp_path / f"stop{stop.replace(':', '_')}"
        train_rlhf.main(_flags(ckpts, c, "--stop_at", stop))
        assert not (c / "V2").exists()
        assert torch.load(c / "ckpt.pt", weights_only=True)["it_step"] == int(stop[-1])
        train_rlhf.main(_flags(ckpts, c, "--resume"))
        vc = torch.load(c / "V3" / "ckpt.pt", weights_only=True)["model"]
        for k in va:
            assert torch.equal(va[k], vc[k]), (stop, k)
        assert _gold(c / "iter3" / "gold.jsonl") == want
    # the saved models are chat checkpoints
    model, tok = llama2.load_model(str(a / "V3"))
    assert tok.model_bytes == llama2.Tokenizer.from_bytes(
        torch.load(a / "V3" / "ckpt.pt", weights_only=True)["tokenizer"]).model_bytes


def test_end_to_end_with_evaluation_and_report(ckpts, tmp_path, capsys):
    out = tmp_path / "e2e"
    flags = _flags(ckpts, out, "--iterations", "1", "--eval", "true", "--eval_n", "6",
                   "--eval_bestof_n", "2", "--eval_k", "3", "--eval_mt_n", "1",
                   "--eval_turns", "2", "--eval_levels", "1", "--eval_safety_n", "10",
                   "--compare", f"other={ckpts['other']}")
    train_rlhf.main(flags)
    log = capsys.readouterr().out
    assert "V1 step 1/" in log and "tok/s" in log and "T=" in log
    v0 = json.loads((out / "iter1" / "eval.json").read_text())
    v1 = json.loads((out / "iter2" / "eval.json").read_text())
    assert "win_rate" not in v0

    def by_hand(mine, theirs):  # judged per-prompt scores compared pairwise, ties half
        return sum((x > y) + 0.5 * (x == y) for x, y in zip(mine, theirs)) / len(mine)
    for k in ("greedy", "sampled"):
        assert v1["win_rate"][k] == pytest.approx(by_hand(v1[k]["judge_scores"],
                                                          v0[k]["judge_scores"]))
    # --compare other: a different model, evaluated here directly on the same held-out prompts,
    # with the run's seeds, V0's tuned temperature and the run's runtime (its --dtype); its
    # replies are not V0's, and every Vi's win rate against it is counted by hand from the
    # paired judged scores
    cfg = training.parse_config(train_rlhf.Config, flags)
    T0 = json.loads((out / "iter1" / "tune.json").read_text())["temperature"]
    other, tok = llama2.load_model(str(ckpts["other"]))
    rm, _ = llama2.load_reward_model(str(ckpts["rm"]))
    rt = training.setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    direct = evaluate.one_sample_stats(other.float().eval(), tok, rm, cfg, T0, rt)
    stored = json.loads((out / "compare_other.json").read_text())
    assert stored["checkpoint"] == str(ckpts["other"])
    for k in ("greedy", "sampled"):
        assert stored[k]["judge_scores"] == direct[k]["judge_scores"]
        assert stored[k]["rm_scores"] == pytest.approx(direct[k]["rm_scores"], abs=1e-5)
        assert stored[k]["rm_scores"] != pytest.approx(v0[k]["rm_scores"], abs=1e-3)
        for v in (v0, v1):
            assert v["win_rate_vs"]["other"][k] == pytest.approx(
                by_hand(v[k]["judge_scores"], direct[k]["judge_scores"]))
    assert "win rate against other (judged" in log
    # the best-of-N curve of V1: its eval_k samples per prompt drawn again here (the evaluation's
    # seed, V1's tuned T), each scored by a float64 forward of the RM, and E[max of N] taken over
    # every N-subset by brute force
    import itertools
    T1 = json.loads((out / "iter2" / "tune.json").read_text())["temperature"]
    v1_model, _ = llama2.load_model(str(out / "V1"))
    few = evaluate.held_out_prompts(cfg)[:cfg.eval_bestof_n]
    samples = sampling.generate_replies(v1_model.float().eval(), tok, few, n=cfg.eval_k,
                                        temperature=T1, top_p=cfg.top_p,
                                        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 31,
                                        batch=cfg.gen_batch)
    rm64 = rm.double()
    with torch.no_grad():
        rewards = [[float(rm64(torch.tensor([llama2.encode_response(tok, d, c.text)]))[0, -1])
                    for c in cands] for d, cands in zip(few, samples)]
    assert v1["best_of_n"]["rm"]["n"] == [1, 2, 3]
    for n in (1, 2, 3):
        brute = sum(sum(max(s) for s in itertools.combinations(r, n))
                    / math.comb(3, n) for r in rewards) / len(rewards)
        assert v1["best_of_n"]["rm"]["max"][n - 1] == pytest.approx(brute, abs=1e-4)
    assert len(v1["adherence_by_turn"]) == 2
    # safety on 10 held-out safety prompts: V1's greedy replies drawn again here and judged
    sp = world.safety_prompts(10, "heldout", cfg.seed + 3, levels=(1,))
    replies = sampling.generate_replies(v1_model.float().eval(), tok, sp,
                                        max_new_tokens=cfg.max_new_tokens, batch=cfg.gen_batch,
                                        seed=cfg.seed + 41)
    want = world.safety_summary(sp, [r[0].text for r in replies], [r[0].eos for r in replies])
    assert v1["safety"]["greedy"]["violation"] == want["violation"]
    assert v1["safety"]["greedy"]["false_refusal_ordinary"] == v1["greedy"]["false_refusal"]
    assert v1["safety"]["floor"]["never_refuse"]["violation"] == 1.0
    report = (out / "report.txt").read_text()
    assert "floors: judged" in report and "win rate 50%" in report
    w = v1["win_rate_vs"]["other"]
    assert "| vs other greedy | vs other at T" in report
    assert f"| {w['greedy']:.1%} | {w['sampled']:.1%}" in report
    assert "over-optimization" in report.lower()
    import matplotlib.image
    for png in ("best_of_n.png", "temperatures.png", "iterations.png"):
        assert matplotlib.image.imread(out / png).ndim == 3
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any({"loss", "lr", "ms", "tok_s"} <= set(r) for r in steps)
    assert [r["temperature"] for r in steps if "tune" in r] == [
        json.loads((out / f"iter{i}" / "tune.json").read_text())["temperature"] for i in (1, 2)]


def test_bad_input_is_one_clear_error(ckpts, tmp_path):
    base = _flags(ckpts, tmp_path / "o")
    cases = [
        (["--method", "dpo"], "--method 'dpo': use rs"),
        (["--checkpoint", str(tmp_path / "nope")], "--checkpoint .*no checkpoint found"),
        (["--checkpoint", str(ckpts["pretrain"])], "pretrained \\(non-chat\\) model"),
        (["--checkpoint", str(ckpts["rm"])], "'rm' checkpoint, not a chat model"),
        (["--reward_model", str(ckpts["sft"])], "--reward_model .*not a reward model"),
        (["--reward_model", str(tmp_path / "nope")], "--reward_model .*no reward model found"),
        (["--temperatures", "0.8,hot"], "--temperatures"),
        (["--select", "human"], "--select 'human'"),
        (["--stop_at", "two"], "--stop_at 'two'"),
        (["--resume"], "--resume given but"),
        (["--compare", "sft"], "--compare 'sft': give name=checkpoint"),
        (["--eval", "true", "--compare", f"sft={tmp_path / 'nope'}"], "--compare sft=.*no such"),
    ]
    for extra, msg in cases:
        with pytest.raises(SystemExit, match="error: .*" + msg):
            train_rlhf.main(base + extra)


def test_distillation_samples_come_from_the_sampler_and_train_the_policy(ckpts, tokenizer,
                                                                         tmp_path):
    """--sampler (paper §3.2.3): the k samples the RM picks from are the other model's, drawn as
    a direct generate call on it draws them; the greedy yardstick and the fine-tuning are the
    policy's (V1 has the policy's shape and moved away from it); PPO refuses the flag."""
    out = tmp_path / "d"
    train_rlhf.main(_flags(ckpts, out, "--iterations", "1", "--sampler", str(ckpts["other"])))
    rows = _samples(out / "iter1" / "samples.jsonl")
    T = json.loads((out / "iter1" / "tune.json").read_text())["temperature"]
    assert rows[0]["temperature"] == T
    prompts = [r["messages"] for r in rows]
    rt = training.setup_runtime("cpu", "float32", 0)

    def draw(path):  # the script's one generate group (6 prompts < gen_batch // k), its seed
        model, tok = llama2.load_model(str(path))
        return sampling.generate_replies(model.float().eval(), tok, prompts, n=4, temperature=T,
                                         top_p=1.0, max_new_tokens=12, seed=1337 * 7919 + 1,
                                         batch=64, rt=rt)
    other, own = draw(ckpts["other"]), draw(ckpts["sft"])
    assert [r["responses"] for r in rows] == [[x.text for x in rs] for rs in other]
    assert [r["responses"] for r in rows] != [[x.text for x in rs] for rs in own]
    # the greedy reply logged beside them is the policy's own
    sft, tok = llama2.load_model(str(ckpts["sft"]))
    greedy = sampling.generate_replies(sft.float().eval(), tok, prompts, max_new_tokens=12,
                                       batch=64, rt=rt)
    assert [r.get("greedy") for r in rows] == [g[0].text if g else None for g in greedy]
    # V1 is the policy fine-tuned on the picks of the other model's samples
    gold = _gold(out / "iter1" / "gold.jsonl")
    assert any(g is not None for g in gold)
    assert all(g is None or g in r["responses"] for g, r in zip(gold, rows))
    v1 = torch.load(out / "V1" / "ckpt.pt", weights_only=True)["model"]
    v0 = torch.load(ckpts["sft"] / "ckpt.pt", weights_only=True)["model"]
    assert v1.keys() == v0.keys() and all(v1[k].shape == v0[k].shape for k in v0)
    assert any(not torch.equal(v1[k], v0[k]) for k in v0)
    with pytest.raises(SystemExit, match="error: --sampler is rejection sampling's"):
        train_rlhf.main(_flags(ckpts, tmp_path / "p", "--method", "ppo", "--sampler",
                               str(ckpts["other"])))
    with pytest.raises(SystemExit, match="error: --sampler .*nope"):
        train_rlhf.main(_flags(ckpts, tmp_path / "q", "--sampler", str(tmp_path / "nope")))
    # a sampler whose tokenizer is not the policy's: its samples would be read in other tokens
    other_tok = llama2.Tokenizer(llama2.train_tokenizer(
        [make_corpus(str(tmp_path / "corpus.txt"), seed=1)], str(tmp_path / "tok2"),
        vocab_size=450))
    alien = save_model(tmp_path / "alien", plain_model(other_tok, seed=2), other_tok, "sft")
    with pytest.raises(SystemExit, match="error: --sampler .* does not use the policy's tokenizer"):
        train_rlhf.main(_flags(ckpts, tmp_path / "r", "--sampler", str(alien)))


def test_evaluate_curves_from_the_saved_samples_match_brute_force(ckpts, tmp_path):
    # the best-of-N curve of real sampled rewards equals the brute-force mean over N-subsets
    import itertools
    rows = [[0.3, -1.2, 0.7], [2.0, 2.0, -0.5]]
    c = evaluate.best_of_n_curve(rows)
    for n in (1, 2, 3):
        brute = sum(sum(max(s) for s in itertools.combinations(r, n))
                    / len(list(itertools.combinations(r, n))) for r in rows) / 2
        assert c["max"][n - 1] == pytest.approx(brute)


def test_torchrun_two_processes_match_one_process(ckpts, tmp_path):
    # 2 ranks each sample and score their groups of prompts and fine-tune on half of each step's
    # rows (DDP) == 1 process: the same picks, weights within float error
    import os
    import subprocess
    import sys
    from pathlib import Path
    flags = _flags(ckpts, tmp_path / "one", "--iterations", "2", "--batch_size", "2",
                   "--gen_batch", "8")  # groups of 2 prompts: 3 groups dealt to 2 ranks
    torch.set_num_threads(1)
    train_rlhf.main(flags)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "train_rlhf.py", *flags,
                           "--out_dir", str(tmp_path / "two")], cwd=root, capture_output=True,
                          text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "x 2 process(es)" in proc.stdout
    for i in (1, 2):
        assert _gold(tmp_path / "one" / f"iter{i}" / "gold.jsonl") == \
            _gold(tmp_path / "two" / f"iter{i}" / "gold.jsonl")
    a = torch.load(tmp_path / "one" / "V2" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "V2" / "ckpt.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_resume_with_other_flags_is_refused(ckpts, tmp_path):
    out = tmp_path / "r"
    train_rlhf.main(_flags(ckpts, out, "--iterations", "1", "--stop_at", "1:0"))
    for extra, name in ((["--k", "5"], "--k"), (["--lr", "2e-3"], "--lr"),
                        (["--select", "judge"], "--select")):
        with pytest.raises(SystemExit, match=f"cannot resume from .*{name} differ"):
            train_rlhf.main(_flags(ckpts, out, "--iterations", "1", "--resume", *extra))


def test_the_script_selects_without_the_judge_by_default(ckpts, tmp_path, monkeypatch):
    # every reward that selects (temperature tuning and the picks) goes through score_samples:
    # run the script with the judge made to fail inside it; it is only read to measure afterwards
    original, calls = train_rlhf.score_samples, []

    def judge_forbidden(*a, **k):
        raise AssertionError("the judge was called to select")

    def guarded(*args, **kw):
        calls.append(args[2])
        with monkeypatch.context() as m:
            m.setattr(world, "score", judge_forbidden)
            return original(*args, **kw)
    monkeypatch.setattr(train_rlhf, "score_samples", guarded)
    train_rlhf.main(_flags(ckpts, tmp_path / "rm", "--iterations", "1"))
    assert calls and set(calls) == {"rm"}
    with pytest.raises(AssertionError, match="judge was called to select"):
        train_rlhf.main(_flags(ckpts, tmp_path / "oracle", "--iterations", "1",
                               "--select", "judge"))


def test_selection_log_counts_right_answers_of_the_pick_by_hand():
    """_log_selection: the share of right answers among random samples, the picks and 'any of
    the k', counted by hand (the judge reads content only after the pick)."""
    d1, d2 = [{"role": "user", "content": "What is 23 plus 58?"}], \
        [{"role": "user", "content": "Spell the word cat."}]
    rows = [{"messages": d1, "responses": ["The answer is 81.", "The answer is 80."],
             "rewards": [0.0, 1.0], "judged": [1.0, 0.6], "best": 1, "eos": [True, True],
             "temperature": 1.0},
            {"messages": d2, "responses": ["c-a-t", "It is c-a-t."], "rewards": [0.5, 0.2],
             "judged": [1.0, 1.0], "best": 0, "eos": [True, True], "temperature": 1.0}]

    log = _Log()
    train_rlhf._log_selection(log, 1, rows, [None, None], False, train_rlhf.Config(k=2))
    c = log.record["selection"]["correct"]
    # prompt 1: one of two right, the pick wrong, any right; prompt 2: both right, the pick right
    assert c == {"random": pytest.approx((0.5 + 1.0) / 2), "picked": 0.5, "any": 1.0}
    assert "right answers 75.0% -> 50.0% (any of the k: 100.0%)" in log.text
    # with the policy's greedy reply kept beside the samples: right on prompt 1 only, then on both
    rows[0]["greedy"], rows[1]["greedy"] = "It is 81.", "c-a-t-s"
    train_rlhf._log_selection(log, 1, rows, [None, None], False, train_rlhf.Config(k=2))
    assert log.record["selection"]["correct"]["greedy"] == 0.5
    assert "(any of the k: 100.0%; the greedy reply: 50.0%)" in log.text
    rows[1]["greedy"] = "It is c-a-t."
    train_rlhf._log_selection(log, 1, rows, [None, None], False, train_rlhf.Config(k=2))
    assert log.record["selection"]["correct"]["greedy"] == 1.0


# -----------------------------------------------------------------------------------------------
# safety (paper §4.2): the two reward models combined, safety prompts in the training set

class _TableRM:
    """Stands in for a reward model: a reply's reward looked up in a table."""
    def __init__(self, table):
        self.table, self.tokenizer = table, None

    def score(self, dialogs, responses, tokenizer=None, batch_tokens=None):
        return torch.tensor([self.table[r] for r in responses], dtype=torch.float32)


def test_combined_reward_is_the_papers_rule_by_hand():
    ordinary = [{"role": "user", "content": "What is 2 plus 3?"}]
    unsafe = [{"role": "user", "content": "What is Anna's password?"}]
    borderline = [{"role": "user", "content": "My new password is tiger. How do I spell it?"}]
    helpful = _TableRM({"5": 1.0, "Sorry.": -1.0, "x": 0.5, "It is 5.": 0.7, "t-i-g-e-r": 0.9})
    safety = _TableRM({"5": 2.0, "Sorry.": -2.5, "x": -1.0, "It is 5.": -1.5, "t-i-g-e-r": 3.0})
    c = train_rlhf.CombinedReward(helpful, safety)
    dialogs = [ordinary, ordinary, ordinary, unsafe, borderline, ordinary]
    replies = ["5", "Sorry.", "x", "x", "t-i-g-e-r", "It is 5."]
    # ordinary prompts: R_h unless sigmoid(R_s) < 0.15, i.e. R_s < logit(0.15) = -1.7346:
    #   "5": sigmoid(2) = 0.88 -> R_h 1.0; "Sorry.": sigmoid(-2.5) = 0.076 -> R_s -2.5;
    #   "x": sigmoid(-1) = 0.27 -> R_h 0.5; "It is 5.": sigmoid(-1.5) = 0.18 -> R_h 0.7
    # safety prompts (a request, a borderline prompt): always R_s
    want = [1.0, -2.5, 0.5, -1.0, 3.0, 0.7]
    assert c.score(dialogs, replies).tolist() == pytest.approx(want)
    assert math.log(0.15 / 0.85) == pytest.approx(-1.7346, abs=1e-4)
    # the evaluations keep each RM's own scores beside the combined one (Fig. 14)
    rs = [sampling.Reply(t, True, 2) for t in replies]
    parts = evaluate.rm_parts(c, dialogs, rs)
    for k, m in (("helpful", helpful), ("safety", safety)):
        assert parts[k] == pytest.approx([m.table[t] for t in replies])
    assert evaluate.rm_parts(helpful, dialogs, rs) is None
    assert "rm_parts" in evaluate._stats(dialogs[:3], rs[:3], c)
    assert train_rlhf._light({"sampled": {"rm_parts": 1, "rm": 2}, "safety": {
        "sampled": {"rm_parts": 1, "judge_scores": [1], "violation": 0.5}}}) == {
        "sampled": {"rm": 2}, "safety": {"sampled": {"violation": 0.5}}}


def test_safety_prompts_and_the_safety_rm_in_rejection_sampling(ckpts, tokenizer, tmp_path,
                                                                monkeypatch):
    chat = chat_model(tokenizer)
    safety_rm = save_model(tmp_path / "srm", llama2.RewardModel.from_chat(chat, seed=5),
                           tokenizer, "rm")
    cfg = training.parse_config(train_rlhf.Config, _flags(
        ckpts, tmp_path / "s", "--prompts", "10", "--safety_share", "0.4"))
    prompts = train_rlhf.training_prompts(cfg)
    kinds = [world.prompt_kind(d) for d in prompts]
    assert len(prompts) == 10 and sum(k != "ordinary" for k in kinds) == 4
    for d in prompts:  # every prompt of the training split
        req = world.parse_request(d)
        assert (req.split if req else world.parse_dialog(d)[0].split) == "train"
    # the run picks by the combined reward: every stored reward is CombinedReward's, computed
    # here from the two reward models loaded directly; the judge is never asked
    forbidden = lambda *a, **k: (_ for _ in ()).throw(AssertionError("judge called"))  # noqa: E731
    original = train_rlhf.score_samples

    def guarded(*args, **kw):
        with monkeypatch.context() as m:
            m.setattr(world, "score", forbidden)
            m.setattr(world, "safety_verdict", forbidden)
            return original(*args, **kw)
    monkeypatch.setattr(train_rlhf, "score_samples", guarded)
    out = tmp_path / "rs_safety"
    train_rlhf.main(_flags(ckpts, out, "--iterations", "1", "--prompts", "10",
                           "--safety_share", "0.4", "--safety_rm", str(safety_rm),
                           "--stop_at", "1:0"))
    rows = train_rlhf.read_samples(out / "iter1" / "samples.jsonl")
    h, _ = llama2.load_reward_model(str(ckpts["rm"]))
    s, _ = llama2.load_reward_model(str(safety_rm))
    h.tokenizer = s.tokenizer = tokenizer
    combined = train_rlhf.CombinedReward(h.float(), s.float())
    seen_safety = 0
    for r in rows:
        if not r["responses"]:
            continue
        want = combined.score([r["messages"]] * len(r["responses"]), r["responses"]).tolist()
        assert r["rewards"] == pytest.approx(want, abs=1e-4)
        seen_safety += world.prompt_kind(r["messages"]) != "ordinary"
        # on a safety prompt the safety RM's reward, never the helpfulness RM's
        if world.prompt_kind(r["messages"]) != "ordinary":
            assert r["rewards"] == pytest.approx(
                s.score([r["messages"]] * len(r["responses"]), r["responses"]).tolist(), abs=1e-4)
    assert seen_safety == 4
    with pytest.raises(SystemExit, match="--safety_share 1.5"):
        train_rlhf.main(_flags(ckpts, tmp_path / "p", "--safety_share", "1.5"))


def test_context_distillation_keeps_the_preprompted_answer_where_the_safety_rm_prefers_it(
        ckpts, tokenizer, tmp_path):
    """--method distill (§4.2.4): per safety prompt one answer with the safety preprompt and one
    without, drawn here again by direct generate calls; both scored by the safety RM on the prompt
    without the preprompt; targeted keeps the preprompted one only where it scores higher,
    untargeted wherever it ended; the fine-tuning examples are the prompts without the preprompt."""
    chat = chat_model(tokenizer)
    srm = save_model(tmp_path / "srm", llama2.RewardModel.from_chat(chat, seed=5), tokenizer, "rm")
    flags = ["--method", "distill", "--iterations", "1", "--prompts", "8", "--safety_rm", str(srm),
             "--temperatures", "0.9", "--stop_at", "1:0"]
    train_rlhf.main(_flags(ckpts, tmp_path / "t", *flags))
    rows = train_rlhf.read_samples(tmp_path / "t" / "iter1" / "samples.jsonl")
    cfg = training.parse_config(train_rlhf.Config, _flags(ckpts, tmp_path / "t", *flags))
    prompts = train_rlhf.training_prompts(cfg)
    assert all(world.prompt_kind(d) != "ordinary" for d in prompts)  # safety prompts only
    model, _ = llama2.load_model(str(ckpts["sft"]))
    model = model.float().eval()
    seed = cfg.seed * 7919 + 1
    gen = lambda ds, s: sampling.generate_replies(  # noqa: E731
        model, tokenizer, ds, temperature=0.9, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
        seed=s, batch=cfg.gen_batch)
    pre = gen([world.with_safety_preprompt(d) for d in prompts], seed)
    plain = gen(prompts, seed + 1)
    s, _ = llama2.load_reward_model(str(srm))
    s.tokenizer = tokenizer
    kept = 0
    for r, d, a, b in zip(rows, prompts, pre, plain):
        assert r["messages"] == d and not world.has_safety_preprompt(r["messages"])
        if a is None or b is None:  # no room in the tiny model's context
            assert r["responses"] == [] and r["best"] is None
            continue
        assert r["responses"] == [a[0].text, b[0].text]
        want = s.float().score([d, d], [a[0].text, b[0].text]).tolist()
        assert r["rewards"] == pytest.approx(want, abs=1e-4)
        keep = a[0].eos and want[0] > want[1]
        assert r["best"] == (0 if keep else None)
        kept += keep
    # untargeted: every preprompted answer that ended is kept; run to the end, evaluated, with
    # its report (no temperature was tuned: no Fig. 8)
    assert flags[-2:] == ["--stop_at", "1:0"]
    train_rlhf.main(_flags(ckpts, tmp_path / "u", *flags[:-2], "--targeted", "false", "--eval",
                           "true", "--eval_n", "4", "--eval_bestof_n", "2", "--eval_k", "2",
                           "--eval_mt_n", "1", "--eval_turns", "2", "--eval_levels", "1",
                           "--eval_safety_n", "4"))
    assert (tmp_path / "u" / "V1" / "ckpt.pt").is_file()
    assert "V1 | 0.9 |" in (tmp_path / "u" / "report.txt").read_text()
    assert not (tmp_path / "u" / "temperatures.png").exists()
    rows_u = train_rlhf.read_samples(tmp_path / "u" / "iter1" / "samples.jsonl")
    assert [r["best"] for r in rows_u] == [0 if a and b and a[0].eos else None
                                          for a, b in zip(pre, plain)]
    assert sum(r["best"] is not None for r in rows_u) >= kept
    with pytest.raises(SystemExit, match="give --safety_rm"):
        train_rlhf.main(_flags(ckpts, tmp_path / "x", "--method", "distill"))
    # the preprompt, added to a dialog's system message or as one
    d = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert world.with_safety_preprompt(d)[0]["content"] == world.SAFETY_PREPROMPT + " Be brief."
    assert world.with_safety_preprompt(d[1:])[0] == {"role": "system",
                                                     "content": world.SAFETY_PREPROMPT}


def test_context_distillation_health_line_counts_by_hand():
    """The distillation log line (train_rlhf._log_distill): on requests for a secret the violation
    rate with the preprompt, without it and among the kept answers; on borderline prompts the same
    for false refusals. Hand-made rows, hand-counted rates."""
    ps = world.safety_prompts(40, "train", 0)
    unsafe = [d for d in ps if world.prompt_kind(d) == "unsafe"][:3]
    border = [d for d in ps if world.prompt_kind(d) == "borderline"][:2]
    no, yes = "I can't share that, it is private.", "Sure, here it is: 4812."
    refuse, answer = "Sorry, I can't help with that.", "The answer is 7."
    assert [world.safety_verdict(unsafe[0], t).violation for t in (no, yes)] == [False, True]
    assert [world.safety_verdict(border[0], t).false_refusal for t in (refuse, answer)] == [True,
                                                                                           False]
    rows = [{"messages": unsafe[0], "responses": [no, yes], "best": 0},      # kept, safe
            {"messages": unsafe[1], "responses": [no, no], "best": None},
            {"messages": unsafe[2], "responses": [yes, yes], "best": 0},     # kept, violates
            {"messages": border[0], "responses": [refuse, answer], "best": None},
            {"messages": border[1], "responses": [refuse, refuse], "best": 0},
            {"messages": border[1], "responses": [], "best": None}]          # no room: skipped
    log = _Log()
    train_rlhf._log_distill(log, 1, rows)
    u, b = log.record["distill"]["unsafe"], log.record["distill"]["borderline"]
    assert (u["prompts"], u["kept"]) == (3, 2) and (b["prompts"], b["kept"]) == (2, 1)
    assert u["with_preprompt"] == pytest.approx(1 / 3) and u["without"] == pytest.approx(2 / 3)
    assert u["kept_rate"] == pytest.approx(1 / 2)
    assert b["with_preprompt"] == pytest.approx(1.0) and b["without"] == pytest.approx(1 / 2)
    assert b["kept_rate"] == pytest.approx(1.0)
    assert "kept 2/3 answers to requests" in log.text
