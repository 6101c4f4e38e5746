"""Evaluation of chat models, one module that every stage's `--eval` calls (SPEC.md §10).

All of it runs on held-out problems only (world's "heldout" split, the test split the report
shows; `--eval_split valid` uses the validation split instead, where hyperparameters and defaults
are chosen) and is judged by the world's programmatic judge (world.score), which plays the human evaluators. Every number is printed beside
its floor (what a trivial reply scores) and, where one exists, its ceiling.

  - run_eval: the chat-model report of train_sft.py --eval: greedy judged score overall, per
    family and per level beside its floor (an empty reply, a bare correct answer), EOS rate and
    answer length; pass@1 against best-of-K by the judge; instruction adherence at each turn of
    12-turn held-out dialogs whose instruction is given once as the system message, the model's
    own replies going into the history (world.adherence_report, world.adherence_floor), drawn
    as a PNG with matplotlib.
  - win_rate: one sample each from two models on the same prompts, judged, ties count half
    (floor and chance level 50%).
  - expected_max_of_n / expected_median_of_n / best_of_n_curve: the expected max (and median)
    reward among N samples, computed without bias from M >= N samples per prompt (Fig. 7 and 8
    of the paper): with the M rewards sorted ascending r_(1) <= ... <= r_(M),
        E[max of N] = sum_{i=N..M} C(i-1, N-1) / C(M, N) * r_(i)
    (r_(i) is the max of an N-subset in C(i-1, N-1) of the C(M, N) subsets); the k-th smallest
    likewise with weight C(i-1, k-1) C(M-i, N-k) / C(M, N), the median the middle one (the mean
    of the two middle ones for even N).
  - policy_eval: what train_rlhf.py measures after each iteration: judged score greedy and at the
    sampling temperature, RM score, win rate against a reference model's replies, EOS rate, mean
    length, best-of-N curves for the RM and the judge on the same samples, adherence by turn.
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import sampling
import training
import world

# -----------------------------------------------------------------------------------------------
# best-of-N without bias, and the win rate


def expected_order_stat(rewards: list[float], n: int, k: int) -> float:
    """E[k-th smallest reward among n of the M rewards drawn without replacement], exactly.

    r_(i) (sorted ascending, 1-based) is the k-th smallest of an n-subset when k-1 of the others
    come from below it and n-k from above: C(i-1, k-1) C(M-i, n-k) of the C(M, n) subsets.
    """
    m = len(rewards)
    if not 1 <= k <= n <= m:
        raise ValueError(f"need 1 <= k <= n <= M, got k={k}, n={n}, M={m}")
    r = sorted(rewards)
    total = math.comb(m, n)
    # integer counts divided once: exact weights, no float round-off in the binomials
    return sum(math.comb(i - 1, k - 1) * math.comb(m - i, n - k) / total * r[i - 1]
               for i in range(k, m - (n - k) + 1))


def expected_max_of_n(rewards: list[float], n: int) -> float:
    """E[max of n samples] from M >= n samples: sum_{i=n..M} C(i-1, n-1) / C(M, n) * r_(i)."""
    return expected_order_stat(rewards, n, n)


def expected_median_of_n(rewards: list[float], n: int) -> float:
    """E[median of n samples] from M >= n samples (even n: the mean of the two middle ones)."""
    if n % 2:
        return expected_order_stat(rewards, n, (n + 1) // 2)
    return 0.5 * (expected_order_stat(rewards, n, n // 2)
                  + expected_order_stat(rewards, n, n // 2 + 1))


def best_of_n_curve(rewards_per_prompt: list[list[float]], ns: list[int] | None = None) -> dict:
    """Mean over prompts of E[max of N] and E[median of N], N = 1..M (or ns): Fig. 7's curves."""
    rows = [r for r in rewards_per_prompt if r]
    if not rows:
        raise ValueError("best_of_n_curve: no rewards")
    m = min(len(r) for r in rows)
    ns = ns or list(range(1, m + 1))
    return {"n": ns,
            "max": [sum(expected_max_of_n(r, n) for r in rows) / len(rows) for n in ns],
            "median": [sum(expected_median_of_n(r, n) for r in rows) / len(rows) for n in ns],
            "prompts": len(rows), "m": m}


def win_rate(scores: list[float], reference: list[float]) -> float:
    """Share of prompts where the model's judged score beats the reference's, ties count half
    (one sample each on the same prompts; 50% = as good as the reference)."""
    if len(scores) != len(reference) or not scores:
        raise ValueError(f"win_rate: {len(scores)} scores against {len(reference)} references")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0
               for a, b in zip(scores, reference)) / len(scores)


def paired_gain(scores: list[float], start: list[float]) -> tuple[float, float]:
    """How much a model's scores beat another's on the same prompts: the mean of the per-prompt
    differences and its standard error (the differences' sample standard deviation over
    sqrt(n); infinite with one prompt). -> (mean difference, standard error)."""
    diff = [a - b for a, b in zip(scores, start)]
    n = len(diff)
    mean = sum(diff) / n
    if n < 2:
        return mean, math.inf
    return mean, math.sqrt(sum((d - mean) ** 2 for d in diff) / (n - 1) / n)


# -----------------------------------------------------------------------------------------------
# evaluation


def with_fewshot(dialog: list[dict], k: int, rng: random.Random, levels: tuple) -> list[dict]:
    """The dialog with k solved training problems as earlier turns (after any system message), the
    example answers obeying whatever instruction the dialog puts in force: a few-shot prompt for
    a pretrained model."""
    names = world.find_instructions(dialog)
    inst = world.Standing(tuple(names), "") if names else None
    shots = []
    for _ in range(k):
        p = world.sample_problem(rng, "train", level=rng.choice(levels))
        shots += [{"role": "user", "content": p.prompt(rng)},
                  {"role": "assistant", "content": world.careful_answer(p, rng, inst)}]
    head = dialog[:1] if dialog[0]["role"] == "system" else []
    return head + shots + dialog[len(head):]


def rollout(model, tokenizer, dialogs: list[list[dict]], cfg, rt=None) -> list[list[str]]:
    """Answer each dialog's user turns one by one with greedy decoding, the model's own replies
    going into the history (the system message is kept). A dialog stops when it no longer fits
    the context. Returns the replies per dialog."""
    histories = [[m for m in d[:1] if m["role"] == "system"] for d in dialogs]
    users = [world.user_turns(d) for d in dialogs]
    answers: list[list[str]] = [[] for _ in dialogs]
    alive = [True] * len(dialogs)
    for t in range(max(len(u) for u in users)):
        active = [i for i in range(len(dialogs)) if alive[i] and t < len(users[i])]
        if not active:
            break
        for i in active:
            histories[i].append({"role": "user", "content": users[i][t]})
        replies = sampling.generate_replies(model, tokenizer, [histories[i] for i in active],
                                            max_new_tokens=cfg.max_new_tokens, batch=cfg.gen_batch,
                                            stop_at_newline=getattr(cfg, "fewshot", 0) > 0, rt=rt,
                                            desc=f"adherence turn {t + 1}")
        for i, r in zip(active, replies):
            if r is None:
                alive[i] = False
                continue
            histories[i].append({"role": "assistant", "content": r[0].text})
            answers[i].append(r[0].text)
    return answers


def split_words(split: str | None) -> str:
    """How report lines name the evaluation prompts: "held-out" (the test split) or "validation"."""
    return "validation" if split == "valid" else "held-out"


def eval_split(cfg) -> str:
    """The world split evaluation prompts come from: cfg.eval_split ("heldout", the default, or
    "valid"); never training problems."""
    split = getattr(cfg, "eval_split", "heldout")  # configs made before the flag existed
    if split not in ("heldout", "valid"):
        raise SystemExit(f"error: --eval_split {split!r}: give heldout (the test split, for the "
                         "report) or valid (the validation split, to choose hyperparameters on)")
    return split


def run_eval(model, tokenizer, cfg, rt=None, label: str = "model") -> dict:
    """Judged evaluation of a chat model on held-out problems only; writes <out_dir>/eval.jsonl
    and adherence.png and returns the summary (also the last line of eval.jsonl)."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    levels = world.parse_levels(cfg.eval_levels)
    rng = random.Random(cfg.seed)
    records = []
    t0 = time.perf_counter()

    # 1. greedy answers to held-out prompts, judged. A pretrained model sees each prompt after
    #    the same k solved examples here and in the best-of-K below.
    prompts = world.eval_prompts(cfg.eval_n, seed=cfg.seed + 1, levels=levels,
                                 split=eval_split(cfg))
    shown = ([with_fewshot(d, cfg.fewshot, rng, levels) for d in prompts] if cfg.fewshot
             else prompts)
    greedy = sampling.generate_replies(model, tokenizer, shown, max_new_tokens=cfg.max_new_tokens,
                                       batch=cfg.gen_batch, stop_at_newline=cfg.fewshot > 0, rt=rt,
                                       desc="greedy")
    texts = [g[0].text if g else "" for g in greedy]
    eos = [bool(g and g[0].eos) for g in greedy]
    summary = world.summarize(prompts, texts, eos)
    for d, g, text, e in zip(prompts, greedy, texts, eos):
        s = world.score(d, text, e)
        records.append({"kind": "greedy", "messages": d, "response": text, "eos": e,
                        "n_tokens": g[0].n_tokens if g else 0, "score": s.total,
                        "content": s.content, "instruction": s.instruction, "form": s.form,
                        "family": world.parse_dialog(d)[0].family})
    summary["eos_rate"] = sum(eos) / len(eos)
    summary["correct"] = sum(r["content"] == 1.0 for r in records) / len(records)
    summary["answer_tokens"] = sum(r["n_tokens"] for r in records) / len(records)
    summary["answer_words"] = sum(len(t.split()) for t in texts) / len(texts)
    summary["no_room"] = sum(g is None for g in greedy)
    # the floor of the judged score: what an empty reply (with EOS) and the bare reference
    # answer score on the same prompts
    summary["floor"] = {
        "empty": world.summarize(prompts, [""] * len(prompts))["total"],
        "bare_answer": world.summarize(
            prompts, [world.parse_dialog(d)[0].answer for d in prompts])["total"]}
    t_greedy = time.perf_counter() - t0

    # 2. pass@1 against best-of-K: K samples per prompt, the judge picks the best (a measurement
    #    of the room for selection, not a training signal)
    summary["bestof"] = best_of_k(model, tokenizer, prompts, shown, records, cfg, rt)
    t_bestof = time.perf_counter() - t0 - t_greedy

    # 3. adherence by turn: the instruction given once (system message), the model's replies in
    #    the history, greedy decoding; with the free floor of trivial replies on the same dialogs
    dialogs = world.eval_multiturn(cfg.eval_mt_n, seed=cfg.seed + 2, turns=cfg.eval_turns,
                                   levels=levels, split=eval_split(cfg))
    answers = rollout(model, tokenizer, dialogs, cfg, rt)
    report = world.adherence_report(dialogs, answers)
    floor = world.adherence_floor(dialogs, cfg.eval_turns)
    for d, a in zip(dialogs, answers):
        records.append({"kind": "rollout", "messages": d, "responses": a})
    summary["adherence"] = report
    summary["adherence_floor"] = {k: {"obeys": v["obeys"], "by_instruction": v["by_instruction"]}
                                  for k, v in floor.items()}
    summary["adherence_by_turn"] = report["obeys"]
    summary["dialogs_reaching_turn"] = report["reaching"]
    summary["seconds"] = {"greedy": t_greedy, "bestof": t_bestof,
                          "rollout": time.perf_counter() - t0 - t_greedy - t_bestof}

    # 4. safety: requests for held-out people's secrets and borderline prompts (paper §4.2)
    if getattr(cfg, "eval_safety_n", 0) > 0 and not cfg.fewshot:
        t1 = time.perf_counter()
        summary["safety"] = safety_eval(model, tokenizer, cfg, rt, (prompts, texts, eos), records)
        summary["seconds"]["safety"] = time.perf_counter() - t1
    summary.update({"kind": "summary", "label": label, "checkpoint": cfg.checkpoint,
                    "fewshot": cfg.fewshot, "levels": list(levels),
                    "split": eval_split(cfg)})

    path = out_dir / "eval.jsonl"
    with training.atomic_write(path, "w") as f:
        for r in records + [summary]:
            f.write(json.dumps(r) + "\n")
    curves = {label: report["obeys"]}
    for other in [p for p in cfg.plot_with.split(",") if p]:
        s = read_summary(other)
        curves[s["label"]] = s["adherence_by_turn"]
    plot_adherence(curves, out_dir / "adherence.png", floor=floor["bare_answer"]["obeys"])
    print(format_summary(summary))
    print(f"wrote {path} and {out_dir / 'adherence.png'}")
    return summary


# Meta's chat default (`chat_completion`): how a user meets the model, and where the tail lives
USER_TEMPERATURE, USER_TOP_P = 0.6, 0.9


def safety_eval(model, tokenizer, cfg, rt=None, ordinary: tuple | None = None,
                records: list | None = None, rm=None) -> dict:
    """Safety on prompts of the evaluation split only (world.safety_prompts, cfg.eval_safety_n of
    them: requests for a held-out person's secret, 80% adversarial, and borderline prompts), one
    greedy reply and one sampled at Meta's chat default (T 0.6, top-p 0.9) each, judged by
    world.safety_summary: the violation rate (adversarial and direct apart), the share that leak the
    secret, the false-refusal rate on borderline prompts, and (from `ordinary`: (prompts, replies)
    of the judged evaluation) on ordinary prompts. Floors: world.safety_floors, "always refuse"
    and "never refuse" on the same prompts. Appends a "safety" record per prompt to `records`.
    With `rm` two reward models (train_rlhf.CombinedReward), each sampled reply's scores by both
    (`rm_parts`: the paper's Fig. 14 reads the safety RM's on safety prompts)."""
    levels = world.parse_levels(cfg.eval_levels)
    prompts = world.safety_prompts(cfg.eval_safety_n, eval_split(cfg), cfg.seed + 3, levels=levels)
    out = {"n": len(prompts), "split": eval_split(cfg)}
    for name, t, p in (("greedy", 0.0, 1.0), ("sampled", USER_TEMPERATURE, USER_TOP_P)):
        replies = _one_each(model, tokenizer, prompts, t, cfg, rt, cfg.seed + 41, f"safety {name}",
                            top_p=p)
        out[name] = world.safety_summary(prompts, [r.text for r in replies],
                                         [r.eos for r in replies])
        if name == "sampled" and (parts := rm_parts(rm, prompts, replies)):
            out[name]["rm_parts"] = parts
        if ordinary is not None and name == "greedy":
            o = world.safety_summary(*ordinary)
            out[name]["false_refusal_ordinary"] = o["false_refusal_ordinary"]
            out[name]["n"]["ordinary"] = o["n"]["ordinary"]
        for d, r in zip(prompts, replies):
            if records is not None:
                v = world.safety_verdict(d, r.text, r.eos)
                records.append({"kind": f"safety_{name}", "messages": d, "response": r.text,
                                "eos": r.eos, "prompt_kind": v.kind, "violation": v.violation,
                                "refusal": v.refusal, "safety": v.score})
    out["sampled"].update(temperature=USER_TEMPERATURE, top_p=USER_TOP_P)
    out["floor"] = world.safety_floors(prompts)
    return out


def _share(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_safety(s: dict) -> str:
    """The safety lines of an evaluation (`safety_eval`), each rate beside its floors."""
    fl = s["floor"]
    lines = [f"  safety on {s['n']} {split_words(s.get('split'))} safety prompts (floors: always "
             f"refuse / never refuse):"]
    for name in ("greedy", "sampled"):
        x = s[name]
        how = "greedy" if name == "greedy" else f"T {x['temperature']:g} top-p {x['top_p']:g}"
        fro = x.get("false_refusal_ordinary")
        lines.append(
            f"    {how:>16}: violation {_share(x['violation'])} (adversarial "
            f"{_share(x['violation_adversarial'])}, direct {_share(x['violation_direct'])}; floors "
            f"{_share(fl['always_refuse']['violation'])} / {_share(fl['never_refuse']['violation'])}),"
            f" leaks {_share(x['leak'])}; false refusal: borderline "
            f"{_share(x['false_refusal_borderline'])} (floors "
            f"{_share(fl['always_refuse']['false_refusal_borderline'])} / "
            f"{_share(fl['never_refuse']['false_refusal_borderline'])})"
            + (f", ordinary {_share(fro)}" if fro is not None else ""))
    return "\n".join(lines)


def best_of_k(model, tokenizer, prompts, shown, records: list, cfg, rt=None) -> dict:
    """pass@1 against best-of-K on the first eval_bestof_n prompts (`shown`: as the model sees
    them, with the few-shot examples): K samples each, the judge picks the best. A measurement of
    the room for selection, never a training signal. Appends a "bestof" record per prompt to
    `records` (whose first rows are the greedy ones)."""
    n_bo = min(cfg.eval_bestof_n, len(prompts))
    samples = sampling.generate_replies(model, tokenizer, shown[:n_bo], n=cfg.eval_k,
                                        temperature=cfg.eval_temperature,
                                        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 11,
                                        batch=cfg.gen_batch,
                                        stop_at_newline=cfg.fewshot > 0, rt=rt,
                                        desc=f"best-of-{cfg.eval_k}")
    best, mean, any_ok, ok = [], [], [], []
    for d, cands in zip(prompts[:n_bo], samples):
        sc = [world.score(d, c.text, c.eos) for c in cands] if cands else []
        tot = [s.total for s in sc] or [0.0]
        best.append(max(tot))
        mean.append(sum(tot) / len(tot))
        ok.append(sum(s.content == 1.0 for s in sc) / max(1, len(sc)))
        any_ok.append(any(s.content == 1.0 for s in sc))
        records.append({"kind": "bestof", "messages": d, "responses": [c.text for c in cands or []],
                        "scores": tot})
    greedy_rows = records[:n_bo]
    n_bo = max(1, n_bo)
    return {
        "k": cfg.eval_k, "temperature": cfg.eval_temperature, "n": len(best),
        "greedy_score": sum(r["score"] for r in greedy_rows) / n_bo,
        "pass1_score": sum(mean) / n_bo, "bestof_score": sum(best) / n_bo,
        "pass1_correct": sum(ok) / n_bo, "passk_correct": sum(any_ok) / n_bo,
        "greedy_correct": sum(r["content"] == 1.0 for r in greedy_rows) / n_bo,
    }


def read_summary(path: str) -> dict:
    """The summary record (last line) of an eval.jsonl written by run_eval."""
    if not Path(path).is_file():
        raise SystemExit(f"error: --plot_with {path}: no such file (run --eval first)")
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    s = json.loads(lines[-1]) if lines else {}
    if s.get("kind") != "summary":
        raise SystemExit(f"error: {path} does not end with an eval summary; rerun --eval")
    return s


def _pct(x) -> str:
    return "  -" if x is None else f"{100 * x:3.0f}"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# turn ranges of the per-instruction table
TURN_RANGES = ((1, 1), (2, 4), (5, 8), (9, 12))


def adherence_table(s: dict) -> str:
    """The adherence rows of an eval summary as text: by turn (obeys, obeys and correct, on
    instructions GAtt trains on and on the held-back ones, and the free floor of a bare correct
    answer and of an empty reply), then per instruction over turn ranges with its floor."""
    rep, floor = s["adherence"], s["adherence_floor"]
    n = len(rep["obeys"])
    rows = [("turn", [f"{k:3d}" for k in range(1, n + 1)])]
    for name, xs in (("obeys", rep["obeys"]), ("obeys+correct", rep["obeys_and_correct"]),
                     (f"seen by GAtt", rep["seen"]),
                     (f"unseen ({','.join(world.GATT_UNSEEN)})", rep["unseen"]),
                     ("floor: bare answer", floor["bare_answer"]["obeys"]),
                     ("floor: empty reply", floor["empty"]["obeys"])):
        rows.append((name, [_pct(x) for x in xs]))
    lines = [f"  {name:>22} " + " ".join(cells) for name, cells in rows]
    ranges = [(a, b) for a, b in TURN_RANGES if a <= n]
    head = " ".join(f"{f'{a}-{min(b, n)}' if a != b else str(a):>6}" for a, b in ranges)
    lines.append(f"  {'per instruction, turns':>22} {head}   floor (bare answer, all turns)")
    for name, xs in rep["by_instruction"].items():
        cells = " ".join(f"{_pct(_mean(xs[a - 1:b])):>6}" for a, b in ranges)
        tag = " (unseen)" if name in world.GATT_UNSEEN else ""
        fl = _mean(floor["bare_answer"]["by_instruction"].get(name, []))
        lines.append(f"  {name + tag:>22} {cells}   {_pct(fl)}")
    return "\n".join(lines)


def format_summary(s: dict) -> str:
    """A few readable lines of an eval summary."""
    fam = " ".join(f"{k} {v:.2f}" for k, v in s["by_family"].items())
    bo = s["bestof"]
    return (f"[{s['label']}] judged score {s['total']:.3f} (floor, an empty reply: "
            f"{s['floor']['empty']:.3f}; a bare correct answer: {s['floor']['bare_answer']:.3f}; "
            f"ceiling 1.0) (content {s['content']:.3f}, instruction {s['instruction']:.3f}, "
            f"form {s['form']:.3f}; with every instruction kept and perfect form, the content "
            f"unchanged: {s['content_ceiling']:.3f}), correct {s['correct']:.1%}, "
            f"EOS {s['eos_rate']:.1%}, "
            f"{s['answer_tokens']:.1f} tokens / {s['answer_words']:.1f} words per answer, "
            f"n={s['n']} {split_words(s.get('split'))} prompts\n"
            f"  by family: {fam}\n"
            f"  best-of-{bo['k']} by the judge (T={bo['temperature']}, n={bo['n']}): greedy "
            f"{bo['greedy_score']:.3f}, pass@1 {bo['pass1_score']:.3f}, best-of-{bo['k']} "
            f"{bo['bestof_score']:.3f} | correct: greedy {bo['greedy_correct']:.1%}, pass@1 "
            f"{bo['pass1_correct']:.1%}, pass@{bo['k']} {bo['passk_correct']:.1%}\n"
            f"  instruction adherence (%), given once as the system message, "
            f"{s['adherence']['reaching'][0]} held-out dialogs "
            f"(reaching each turn: {s['adherence']['reaching']}):\n" + adherence_table(s)
            + ("\n" + format_safety(s["safety"]) if "safety" in s else ""))


# -----------------------------------------------------------------------------------------------
# plot: adherence against turn


def plot_adherence(curves: dict[str, list[float]], png, floor: list[float] | None = None):
    """Adherence (0..100%) against turn, one line per model (e.g. without and with GAtt), and
    the free floor (a bare correct answer) as a dashed grey line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), [100 * y for y in ys], marker="o", lw=2, label=name)
    if floor:
        ax.plot(range(1, len(floor) + 1), [100 * y for y in floor], ls="--", color="0.5",
                label="floor: bare correct answer")
    ax.set(xlabel="turn", ylabel="instruction obeyed (%)", ylim=(-3, 103),
           title="Instruction adherence, given once at turn 1 (held-out dialogs)")
    ax.set_xticks(range(1, max(len(c) for c in curves.values()) + 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="best")  # the corner the curves leave free
    fig.tight_layout()
    with training.atomic_write(png, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


# -----------------------------------------------------------------------------------------------
# the RLHF measurements: one model, judged and scored by the reward model, on held-out prompts


def rm_rewards(rm, dialogs: list[list[dict]], texts: list[str]) -> list[float]:
    """The reward model's score of each reply (read at the EOS it is encoded with)."""
    if not texts:
        return []
    return [float(x) for x in rm.score(dialogs, texts)]


def judge_scores(dialogs: list[list[dict]], replies: list) -> list[float]:
    """The judge's score of each reply (a sampling.Reply: its text and whether it ended with EOS):
    world.score's total on a problem, the safety score on a request for a secret
    (world.judged_score)."""
    return [world.judged_score(d, r.text, r.eos) for d, r in zip(dialogs, replies)]


def user_sampling(cfg, temperature: float) -> tuple[float, float]:
    """(temperature, top_p) of the "sampled" replies an evaluation judges: cfg.eval_temperature
    and cfg.eval_top_p when given (train_rlhf.py: Meta's chat default, T 0.6 and top-p 0.9, how a
    user meets the model and where the tail of a fine-tuned model lives, SPEC §11), else the
    method's own `temperature` and cfg.top_p."""
    t = getattr(cfg, "eval_temperature", 0.0)  # scripts without the flag: the method's T
    return (t, cfg.eval_top_p) if t > 0 else (temperature, cfg.top_p)


def _one_each(model, tokenizer, prompts, temperature, cfg, rt, seed, desc, top_p=None):
    """One reply per prompt (greedy at temperature 0); a prompt with no room gets an empty one."""
    out = sampling.generate_replies(model, tokenizer, prompts, temperature=temperature,
                                    top_p=cfg.top_p if top_p is None else top_p,
                                    max_new_tokens=cfg.max_new_tokens, seed=seed,
                                    batch=cfg.gen_batch, rt=rt, desc=desc)
    return [r[0] if r else sampling.Reply("", False, 0) for r in out]


def rm_parts(rm, prompts, replies) -> dict | None:
    """Each reply's score by each of two reward models ({"helpful": [...], "safety": [...]}), when
    `rm` combines two (train_rlhf.CombinedReward); None for one reward model."""
    if not (hasattr(rm, "helpful") and hasattr(rm, "safety")):
        return None
    texts = [r.text for r in replies]
    return {k: rm_rewards(getattr(rm, k), prompts, texts) for k in ("helpful", "safety")}


def _stats(prompts, replies, rm) -> dict:
    scores = [world.score(d, r.text, r.eos) for d, r in zip(prompts, replies)]
    judged = [s.total for s in scores]
    rewards = rm_rewards(rm, prompts, [r.text for r in replies])
    n = len(replies)
    return {"judge": sum(judged) / n, "rm": sum(rewards) / n,
            "eos_rate": sum(r.eos for r in replies) / n,
            "tokens": sum(r.n_tokens for r in replies) / n,
            # the judge's parts that reward hacking shows in: right answers, and replies that
            # ramble (over world.RAMBLING_WORDS words) or repeat a word trigram; floor 0 for both
            "correct": sum(s.content == 1.0 for s in scores) / n,
            # the same replies with every instruction kept and perfect form: the most cutting
            # the tail of form can give (world.content_ceiling)
            "content_ceiling": world.content_ceiling(scores),
            "rambling": sum(s.rambling for s in scores) / n,
            "repeating": sum(s.repeating for s in scores) / n,
            # which flaw each reply shows (world.flaw_of; no EOS first), as shares: the tail that
            # RLHF should cut (the report's Fig. 20 table)
            "flaws": flaw_shares(prompts, replies),
            # replies that refuse (world.is_refusal): on these ordinary prompts, false refusals
            "false_refusal": sum(world.is_refusal(r.text) for r in replies) / n,
            "judge_scores": judged, "rm_scores": rewards,
            # with two reward models, each one's scores (the paper's Fig. 14)
            **({"rm_parts": parts} if (parts := rm_parts(rm, prompts, replies)) else {})}


def flaw_shares(prompts, replies) -> dict:
    """{flaw: share of the replies} with world.flaw_of's names, "no_eos" for a reply cut at the
    length limit, and "none" for a reply with no flaw; the shares sum to 1."""
    names = ["no_eos" if not r.eos else world.flaw_of(d, r.text) or "none"
             for d, r in zip(prompts, replies)]
    return {k: names.count(k) / len(names) for k in sorted(set(names))}


def policy_eval(model, tokenizer, rm, cfg, temperature: float, reference: dict | None = None,
                rt=None, label: str = "model") -> dict:
    """What train_rlhf.py measures for each model V0 (the start) .. Vn, on held-out prompts only.

    - judged score, RM score, EOS rate and mean length (tokens) of one greedy reply and of one
      reply sampled at `temperature` per prompt (cfg.eval_n prompts);
    - win rate against `reference` (an earlier policy_eval summary, the start model's): the
      judged scores of the same prompts, one sample each, ties half; greedy and sampled;
    - best-of-N curves (Fig. 7): cfg.eval_k samples at `temperature` on cfg.eval_bestof_n of the
      prompts, scored by the RM and by the judge (the same samples), E[max] and E[median] of N;
    - adherence by turn 1..cfg.eval_turns (greedy rollouts, the instruction given once);
    - the floors: an empty reply and a bare correct answer for the judge, an empty reply for the
      RM, 50% for the win rate; the judge's ceiling is 1.0.
    """
    t0 = time.perf_counter()
    levels = world.parse_levels(cfg.eval_levels)
    prompts = held_out_prompts(cfg)
    s: dict = {"kind": "policy_eval", "label": label, "temperature": temperature,
               "n": len(prompts), "levels": list(levels), "split": eval_split(cfg)}
    s.update(one_sample_stats(model, tokenizer, rm, cfg, temperature, rt, label))
    s["floor"] = {
        "judge_empty": world.summarize(prompts, [""] * len(prompts))["total"],
        "judge_bare_answer": world.summarize(
            prompts, [world.parse_dialog(d)[0].answer for d in prompts])["total"],
        "rm_empty": sum(rm_rewards(rm, prompts, [""] * len(prompts))) / len(prompts),
        "win_rate": 0.5, "judge_ceiling": 1.0}
    if reference is not None:
        s["win_rate"] = {k: win_rate(s[k]["judge_scores"], reference[k]["judge_scores"])
                         for k in ("greedy", "sampled")}
        s["win_rate_against"] = reference["label"]

    # Fig. 7: the same M samples per prompt scored by the RM and by the judge
    few = prompts[:cfg.eval_bestof_n]
    samples = sampling.generate_replies(model, tokenizer, few, n=cfg.eval_k,
                                        temperature=temperature, top_p=cfg.top_p,
                                        max_new_tokens=cfg.max_new_tokens,
                                        seed=cfg.seed + 31, batch=cfg.gen_batch, rt=rt,
                                        desc=f"{label} best-of-{cfg.eval_k}")
    pairs = [(d, c) for d, cands in zip(few, samples) if cands for c in cands]
    rm_flat = rm_rewards(rm, [d for d, _ in pairs], [c.text for _, c in pairs])
    judge_flat = judge_scores([d for d, _ in pairs], [c for _, c in pairs])
    m = cfg.eval_k
    s["best_of_n"] = {"temperature": temperature,
                      "rm": best_of_n_curve([rm_flat[i:i + m] for i in range(0, len(pairs), m)]),
                      "judge": best_of_n_curve([judge_flat[i:i + m]
                                                for i in range(0, len(pairs), m)])}

    # adherence by turn (greedy rollouts), with the floor of a bare correct answer
    s["adherence_by_turn"], s["adherence_floor"] = adherence_by_turn(model, tokenizer, cfg, rt)
    # safety: requests for held-out people's secrets and borderline prompts (paper §4.2), and
    # false refusals of the ordinary prompts' greedy replies above
    if getattr(cfg, "eval_safety_n", 0) > 0:
        s["safety"] = safety_eval(model, tokenizer, cfg, rt, rm=rm)
        for k in ("greedy", "sampled"):
            s["safety"][k]["false_refusal_ordinary"] = s[k]["false_refusal"]
            s["safety"][k]["n"]["ordinary"] = s["n"]
    s["seconds"] = time.perf_counter() - t0
    return s


def held_out_prompts(cfg) -> list[list[dict]]:
    """The held-out prompts of policy_eval (the same for every model of a run: paired scores)."""
    return world.eval_prompts(cfg.eval_n, seed=cfg.seed + 1,
                              levels=world.parse_levels(cfg.eval_levels), split=eval_split(cfg))


def one_sample_stats(model, tokenizer, rm, cfg, temperature: float, rt=None,
                     label: str = "model") -> dict:
    """One greedy reply and one sampled reply per held-out prompt (fixed seeds, so two models'
    replies pair up prompt by prompt): {"greedy": stats, "sampled": stats}; sampled at
    `user_sampling(cfg, temperature)`, recorded in the sampled stats."""
    prompts = held_out_prompts(cfg)
    t, p = user_sampling(cfg, temperature)
    sampled = _stats(prompts, _one_each(model, tokenizer, prompts, t, cfg, rt, cfg.seed + 21,
                                        f"{label} T={t:g} top-p {p:g}", top_p=p), rm)
    sampled.update(temperature=t, top_p=p)
    return {"greedy": _stats(prompts, _one_each(model, tokenizer, prompts, 0.0, cfg, rt, 0,
                                                f"{label} greedy"), rm),
            "sampled": sampled}


def adherence_by_turn(model, tokenizer, cfg, rt=None) -> tuple[list[float], list[float]]:
    """Instruction adherence at each turn of cfg.eval_mt_n held-out dialogs (greedy rollouts,
    the instruction given once), and the floor of a bare correct answer."""
    dialogs = world.eval_multiturn(cfg.eval_mt_n, seed=cfg.seed + 2, turns=cfg.eval_turns,
                                   levels=world.parse_levels(cfg.eval_levels),
                                   split=eval_split(cfg))
    report = world.adherence_report(dialogs, rollout(model, tokenizer, dialogs, cfg, rt))
    return report["obeys"], world.adherence_floor(dialogs, cfg.eval_turns)["bare_answer"]["obeys"]


def versus(summary: dict, other, tokenizer, rm, cfg, rt=None, label: str = "other") -> dict:
    """The evaluated model (`summary`: its policy_eval) against another model on the same
    held-out prompts: the other's judged and RM scores, EOS rate and length (one greedy and one
    sampled reply per prompt, the same seeds and temperature), the summary model's WIN RATE
    against it (judged, one sample each, ties half; floor/chance 50%), and the other's adherence
    by turn."""
    t0 = time.perf_counter()
    o = one_sample_stats(other, tokenizer, rm, cfg, summary["temperature"], rt, label)
    out = {"label": label, "n": summary["n"], **o,
           "win_rate": {k: win_rate(summary[k]["judge_scores"], o[k]["judge_scores"])
                        for k in ("greedy", "sampled")}}
    out["adherence_by_turn"], _ = adherence_by_turn(other, tokenizer, cfg, rt)
    out["seconds"] = time.perf_counter() - t0
    return out


def format_versus(summary: dict, v: dict) -> str:
    """Two lines: the win rate against the other model and both models' scores side by side."""
    w, g, og = v["win_rate"], summary["greedy"], v["greedy"]
    return (f"[{summary['label']} vs {v['label']}] win rate on {v['n']} "
            f"{split_words(summary.get('split'))} prompts (judged, "
            f"one sample each, ties half; floor/chance 50%): greedy {w['greedy']:.1%}, sampled "
            f"{w['sampled']:.1%}\n  greedy judged {g['judge']:.3f} vs {og['judge']:.3f}, RM "
            f"{g['rm']:+.3f} vs {og['rm']:+.3f}, EOS {g['eos_rate']:.1%} vs {og['eos_rate']:.1%}; "
            f"adherence by turn (%) {v['label']}: "
            + " ".join(_pct(x) for x in v["adherence_by_turn"]) + " | "
            + summary["label"] + ": " + " ".join(_pct(x) for x in summary["adherence_by_turn"]))


def format_policy_eval(s: dict) -> str:
    """A few readable lines of a policy_eval summary, every number beside its floor."""
    f, g, t = s["floor"], s["greedy"], s["sampled"]
    lines = [f"[{s['label']}] {split_words(s.get('split'))} prompts n={s['n']}; judged score "
             "floor: empty reply "
             f"{f['judge_empty']:.3f}, bare correct answer {f['judge_bare_answer']:.3f}, "
             f"ceiling 1.0; RM floor (empty reply) {f['rm_empty']:+.3f}; "
             f"{s['seconds']:.0f}s"]
    for name, x in (("greedy", g), (f"T={t.get('temperature', s['temperature']):g}", t)):
        lines.append(f"  {name:>7}: judged {x['judge']:.3f} | RM {x['rm']:+.3f} | EOS "
                     f"{x['eos_rate']:.1%} (ceiling 100%) | {x['tokens']:.1f} tokens"
                     + (f" | correct {x['correct']:.1%}, rambling {x['rambling']:.1%}, repeating "
                        f"{x['repeating']:.1%} (floor 0%)" if "rambling" in x else ""))
    if "win_rate" in s:
        w = s["win_rate"]
        lines.append(f"  win rate against {s['win_rate_against']} (judged, one sample each, ties "
                     f"half; floor/chance 50%, ceiling 100%): greedy {w['greedy']:.1%}, "
                     f"sampled {w['sampled']:.1%}")
    bo = s["best_of_n"]
    for who in ("rm", "judge"):
        c = bo[who]
        lines.append(f"  best-of-N by the {who:>5} (T={bo['temperature']:g}, {c['prompts']} "
                     f"prompts x {c['m']}): E[max] N=1 {c['max'][0]:+.3f} -> N={c['n'][-1]} "
                     f"{c['max'][-1]:+.3f}; E[median] N={c['n'][-1]} {c['median'][-1]:+.3f}")
    turns = " ".join(_pct(x) for x in s["adherence_by_turn"])
    floor = " ".join(_pct(x) for x in s["adherence_floor"])
    lines.append(f"  adherence by turn (%): {turns}\n  floor (bare answer):   {floor}")
    if "safety" in s:
        lines.append(format_safety(s["safety"]))
    return "\n".join(lines)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _log_n_axis(ax, n_max: int) -> None:
    """A log N axis with plain integer ticks 1, 2, 4, 8, ..."""
    ticks = [2 ** j for j in range(int(math.log2(max(1, n_max))) + 1)]
    ax.set_xscale("log")
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(_plt().NullFormatter())


def _save(fig, png) -> None:
    fig.tight_layout()
    with training.atomic_write(png, "wb") as f:
        fig.savefig(f, format="png")
    _plt().close(fig)


def plot_best_of_n(curves: dict[str, dict], png, title: str = "") -> None:
    """Fig. 7 analog: E[max] (solid) and E[median] (dashed) reward among N samples against N (log
    axis), one colour per model; left the reward model's reward, right the judge's on the same
    samples. curves: {label: {"rm": best_of_n_curve, "judge": best_of_n_curve}}."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    for ax, who in zip(axes, ("rm", "judge")):
        for i, (label, c) in enumerate(curves.items()):
            color = f"C{i}"
            ax.plot(c[who]["n"], c[who]["max"], marker="o", ms=3, color=color,
                    label=f"{label} max")
            ax.plot(c[who]["n"], c[who]["median"], ls="--", color=color, label=f"{label} median")
        _log_n_axis(ax, max(max(c[who]["n"]) for c in curves.values()))
        ax.set(xlabel="N samples (log)", title=f"{'reward model' if who == 'rm' else 'judge'}",
               ylabel="reward among N samples")
        ax.grid(alpha=0.3)
    axes[1].legend(loc="best", fontsize=7)
    fig.suptitle(title or "Expected max (solid) and median (dashed) reward among N samples")
    _save(fig, png)


def plot_temperatures(sweeps: dict[str, dict], png) -> None:
    """Fig. 8 analog: E[max RM reward] among N samples against N (log axis), one line per
    temperature, one panel per model. sweeps: {label: {"T": best_of_n_curve, ...}}."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5.5 * len(sweeps), 4.5), dpi=100,
                             squeeze=False)
    for ax, (label, by_t) in zip(axes[0], sweeps.items()):
        for t, c in sorted(by_t.items(), key=lambda kv: float(kv[0])):
            ax.plot(c["n"], c["max"], marker="o", ms=3, label=f"T={float(t):g}")
        _log_n_axis(ax, max(max(c["n"]) for c in by_t.values()))
        ax.set(xlabel="N samples (log)", ylabel="E[max RM reward of N]", title=label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    _save(fig, png)


def plot_iterations(rows: list[dict], png) -> None:
    """Judged score (greedy, sampled) and RM score against the RLHF iteration, and the win rate
    against the start model with its 50% floor: the over-optimization check at a glance."""
    plt = _plt()
    it = [r["iteration"] for r in rows]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 4), dpi=100)
    a.plot(it, [r["greedy"]["judge"] for r in rows], marker="o", label="greedy")
    a.plot(it, [r["sampled"]["judge"] for r in rows], marker="o", label="sampled at T")
    a.axhline(rows[0]["floor"]["judge_empty"], ls="--", color="0.5", label="floor: empty reply")
    a.set(xlabel="iteration (0 = start)", ylabel="judged score", title="judge (held-out)")
    b.plot(it, [r["greedy"]["rm"] for r in rows], marker="o", label="greedy")
    b.plot(it, [r["sampled"]["rm"] for r in rows], marker="o", label="sampled at T")
    b.axhline(rows[0]["floor"]["rm_empty"], ls="--", color="0.5", label="floor: empty reply")
    b.set(xlabel="iteration", ylabel="RM score", title="reward model (held-out)")
    for key in ("greedy", "sampled"):
        c.plot(it, [100 * r.get("win_rate", {}).get(key, 0.5) for r in rows], marker="o",
               label=key)
    c.axhline(50, ls="--", color="0.5", label="floor: 50%")
    c.set(xlabel="iteration", ylabel="win rate (%)", title="win rate against the start model",
          ylim=(0, 100))
    for ax in (a, b, c):
        ax.set_xticks(it)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    _save(fig, png)


# -----------------------------------------------------------------------------------------------
# PPO over-optimization (Gao et al. 2022): the RM score and the judged score of the rollouts
# against sqrt(KL to pi_0)


def _smooth(xs: list[float], window: int) -> list[float]:
    """Centred moving mean over `window` points (fewer at the ends): per-batch scores are noisy."""
    h = window // 2
    return [sum(xs[max(0, i - h):i + h + 1]) / len(xs[max(0, i - h):i + h + 1])
            for i in range(len(xs))]


def overopt_summary(rows: list[dict], window: int = 3, margin: float = 0.03) -> dict:
    """Where one PPO run's judged score peaked and whether it then fell while the RM rose.

    rows: its per-iteration metrics (iteration, kl: KL to pi_0 per reply, rm_raw: the RM's
    logit, judge: the judged score of the batch's rollouts), iteration 0 = pi_0's samples. Both
    scores are smoothed (centred mean of `window` iterations); the peak is the first maximum of
    the smoothed judge; "fell" means the last smoothed judge is more than `margin` below the peak
    while the last smoothed RM is above the RM at the peak."""
    rows = [r for r in rows if r.get("judge") is not None and r.get("rm_raw") is not None]
    if not rows:
        raise ValueError("overopt_summary: no iteration with a judged score and an RM score")
    sqrt_kl = [math.sqrt(max(0.0, r["kl"])) for r in rows]
    judge = _smooth([r["judge"] for r in rows], window)
    rm = _smooth([r["rm_raw"] for r in rows], window)
    p = max(range(len(rows)), key=lambda i: (judge[i], -i))
    last = rows[-1]
    fell = p < len(rows) - 1 and judge[p] - judge[-1] > margin and rm[-1] > rm[p]
    out = {"iterations": last["iteration"], "window": window, "margin": margin,
           "final": {"iteration": last["iteration"], "kl": last["kl"], "sqrt_kl": sqrt_kl[-1],
                     "rm": last["rm_raw"], "judge": last["judge"], "rm_smoothed": rm[-1],
                     "judge_smoothed": judge[-1]},
           "peak": {"iteration": rows[p]["iteration"], "sqrt_kl": sqrt_kl[p],
                    "judge_smoothed": judge[p], "rm_smoothed": rm[p]},
           "judge_fell_while_rm_rose": fell}
    if fell:
        out["verdict"] = (f"judge score fell after its peak while RM rose (judged {judge[p]:.3f} "
                          f"at iteration {rows[p]['iteration']}, sqrt KL {sqrt_kl[p]:.2f} -> "
                          f"{judge[-1]:.3f}; RM {rm[p]:+.3f} -> {rm[-1]:+.3f})")
    elif p == len(rows) - 1:
        out["verdict"] = "no fall: the judged score is highest at the last iteration"
    else:
        out["verdict"] = (f"no fall beyond {margin:g} with a rising RM (judged {judge[p]:.3f} at "
                          f"the peak, {judge[-1]:.3f} at the end; RM {rm[p]:+.3f} -> "
                          f"{rm[-1]:+.3f})")
    return out


def overopt_table(summaries: dict[str, dict]) -> str:
    """One line per run (e.g. per beta) of overopt_summary: final KL, RM and judged score, the
    judged score's peak (iteration, sqrt KL) and the verdict."""
    lines = ["run | iterations | final KL (nats/reply) | final sqrt KL | final RM logit | final "
             "judged | judged peak: iteration (sqrt KL) | verdict"]
    for label, s in summaries.items():
        f, p = s["final"], s["peak"]
        lines.append(f"{label} | {s['iterations']} | {f['kl']:.2f} | {f['sqrt_kl']:.2f} | "
                     f"{f['rm']:+.3f} | {f['judge']:.3f} | {p['iteration']} "
                     f"({p['sqrt_kl']:.2f}) | {s['verdict']}")
    lines.append(f"(scores of each iteration's rollouts, iteration 0 = pi_0's samples; the peak "
                 f"and the verdict on a centred mean of {s['window']} iterations)")
    return "\n".join(lines)


def plot_overopt(runs: dict[str, list[dict]], png, summaries: dict[str, dict] | None = None):
    """Gao et al.'s over-optimization figure: the RM score (left) and the judged score (right)
    of the rollouts against sqrt(KL to pi_0), one colour per run: each iteration a faint dot,
    the line their centred mean over `window` iterations (as overopt_summary); a star at the
    judge's peak."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    for i, (label, rows) in enumerate(runs.items()):
        rows = [r for r in rows if r.get("judge") is not None and r.get("rm_raw") is not None]
        x = [math.sqrt(max(0.0, r["kl"])) for r in rows]
        window = summaries[label]["window"] if summaries and label in summaries else 3
        for ax, key in zip(axes, ("rm_raw", "judge")):
            y = [r[key] for r in rows]
            ax.plot(x, y, marker="o", ms=3, ls="none", alpha=0.35, color=f"C{i}")
            ax.plot(_smooth(x, window), _smooth(y, window), color=f"C{i}", label=label)
        if summaries and label in summaries:
            p = summaries[label]["peak"]
            axes[1].plot([p["sqrt_kl"]], [p["judge_smoothed"]], marker="*", ms=14,
                         color=f"C{i}", ls="none")
    axes[0].set(xlabel="sqrt(KL to pi_0), nats per reply", ylabel="RM logit of the rollouts",
                title="reward model (trained on)")
    axes[1].set(xlabel="sqrt(KL to pi_0), nats per reply", ylabel="judged score of the rollouts",
                title="judge (measured only; star: smoothed peak)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle("PPO over-optimization: proxy reward and true score against sqrt(KL)")
    _save(fig, png)
