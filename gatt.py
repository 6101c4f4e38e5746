"""Ghost Attention data construction and the judged evaluation of chat models (for train_sft.py).

Ghost Attention (Llama 2 paper §3.3 and A.3.5, SPEC.md §6) is a way of building fine-tuning
data, not a change to the model: no extra token, no change to attention.

  1. take user prompts u1..un (world.gatt_dialogs) and a standing instruction `inst` in its full
     wording (GAtt never sees world.GATT_UNSEEN, which evaluation keeps for unseen instructions);
  2. append `inst` to EVERY user message (world.with_instruction_in_every_user_turn) and sample
     the replies a1..an with the current model, turn by turn, the chosen reply going into the
     history. `--gatt_select` says how a reply is chosen: "none" (one sample; the default), "judge"
     (best of K by the world's judge, kept only if it obeys: an ORACLE ablation, because the
     judge is also what evaluates), "rm" (the reward model, as the paper samples "analogous to
     rejection sampling"; not wired yet: it becomes the default once train_rm.py's
     reward model is good enough to pick with);
  3. for training, keep `inst` only once, as the system message (world.with_instruction_as_system;
     shortened half of the time, world.shorten, as the paper), and zero the loss on every token
     except the kept answers: ONE example per dialog, "train_on" a flag per answer. With a causal
     model that is the same loss as cutting the dialog after each kept answer, in 1/6 of the
     tokens at 12 turns. A reply that did not end with EOS never carries loss.

Evaluation (run_eval), on held-out problems only: greedy judged scores on held-out prompts
(overall, per family, per level) beside their floor (an empty reply, a bare correct answer), EOS
rate and answer length; pass@1 against best-of-K by the judge; and instruction adherence at each
turn of 12-turn held-out dialogs whose instruction is given once as the system message, the
model's own replies going into the history (world.adherence_report: obeys, obeys and correct, per
instruction, seen and unseen by GAtt; world.adherence_floor: what a bare correct answer and an
empty reply score), drawn as a PNG with matplotlib.
"""
from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import llama2
import training
import world

# -----------------------------------------------------------------------------------------------
# generation


@dataclass
class Reply:
    text: str      # the reply, EOS removed, cut at a chat tag (a model writing one starts a turn)
    eos: bool      # ended with EOS (rather than hitting max_new_tokens)
    n_tokens: int  # generated tokens, EOS included


_TAGS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")


def clean_reply(text: str, stop_at_newline: bool = False) -> str:
    """Cut a generated text at the first chat tag (and, for a base model, at the first newline),
    so that it can go back into a dialog as an assistant message."""
    cut = len(text)
    for s in _TAGS + (("\n",) if stop_at_newline else ()):
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut].strip()


def generate_replies(model, tokenizer, dialogs: list[list[dict]], *, n: int = 1,
                     temperature: float = 0.0, top_p: float = 0.9, max_new_tokens: int = 48,
                     seed: int = 0, batch: int = 64, stop_at_newline: bool = False,
                     rt: training.Runtime | None = None, desc: str = "sampling"
                     ) -> list[list[Reply] | None]:
    """n replies to each dialog (ending with a user message), batched; temperature 0 is greedy.

    A dialog whose prompt leaves no room in the context gets None. Prompts are sorted by length
    before batching, since a batch costs (longest - shortest prompt + new tokens) decoding steps.
    """
    max_len = model.args.max_seq_len
    prompts = [llama2.encode_dialog(tokenizer, d)[0] for d in dialogs]
    jobs = sorted(((len(p), i, j) for i, p in enumerate(prompts) if len(p) < max_len - 1
                   for j in range(n)))
    out: list[list[Reply] | None] = [None if len(p) >= max_len - 1 else [None] * n
                                     for p in prompts]
    autocast = rt.autocast() if rt is not None else contextlib.nullcontext()
    model.eval()
    bar = training.progress(total=len(jobs), desc=desc, unit="reply", leave=False)
    with autocast, bar:
        for c in range(0, len(jobs), batch):
            chunk = jobs[c:c + batch]
            gens = model.generate([prompts[i] for _, i, _ in chunk], max_new_tokens,
                                  temperature=temperature, top_p=top_p, seed=seed + c,
                                  eos_id=tokenizer.eos_id)
            for (_, i, j), g in zip(chunk, gens):
                eos = bool(g) and g[-1] == tokenizer.eos_id
                text = tokenizer.decode(g[:-1] if eos else g)
                out[i][j] = Reply(clean_reply(text, stop_at_newline), eos, len(g))
            bar.update(len(chunk))
    model.free_cache()
    return out


# -----------------------------------------------------------------------------------------------
# Ghost Attention data


GATT_SELECT = ("judge", "rm", "none")


def _pick(history: list[dict], cands: list[Reply], inst: world.Standing, select: str):
    """The reply that goes into the history, and whether it carries loss.

    "judge" (an oracle ablation: the evaluation's own gold standard picks): the best of the K
    candidates by world.score, kept only if it obeys the instruction and ended with EOS.
    "none": the one sample, kept whatever it says. Either way a reply cut off by max_new_tokens
    carries no loss: training on it would teach an EOS where the model did not stop.
    """
    if select == "judge":
        scores = [world.score(history, c.text, c.eos).total for c in cands]
        best = cands[int(np.argmax(scores))]  # ties: the first sampled
        return best, best.eos and inst.obeys(best.text)
    return cands[0], cands[0].eos


def build_gatt_data(model, tokenizer, cfg, rt=None, seq_len: int | None = None
                    ) -> tuple[list[tuple[list[dict], list[bool]]], dict]:
    """Roll out world.gatt_dialogs with the instruction in every user message, then turn each
    dialog into ONE training example: the instruction once, as the system message (shortened
    half of the time, as the paper did), and loss on every kept answer.

    One example per dialog rather than one per turn: with a causal model, the loss on answer k of
    the whole dialog is the loss of the dialog cut after answer k, so the cut copies only repeat
    the prefix (about 6x the tokens at 12 turns) for the same gradient. A dialog too long for
    seq_len is cut after the last whole turn that fits.
    Returns ([(messages, train_on flags per assistant message), ...], stats).
    """
    select = cfg.gatt_select
    if select not in GATT_SELECT:
        raise ValueError(f"--gatt_select must be one of {GATT_SELECT}, got {select!r}")
    if select == "rm":
        raise ValueError("--gatt_select rm is not wired to train_rm.py's reward model yet (the demo "
                         "RM is near chance); use judge (an oracle ablation) or none")
    k = cfg.gatt_k if select == "judge" else 1
    seq_len = seq_len or model.args.max_seq_len
    levels = world.parse_levels(cfg.gatt_levels)
    seeds = world.gatt_dialogs(cfg.gatt_n, seed=cfg.seed + 3, min_turns=cfg.gatt_min_turns,
                               max_turns=cfg.gatt_max_turns, levels=levels)
    plain: list[list[dict]] = [[] for _ in seeds]  # the dialogs without the instruction
    keep: list[list[bool]] = [[] for _ in seeds]   # per answer: carries loss
    alive = [True] * len(seeds)
    n_eos = n_obey = n_turns = 0
    for t in range(max(len(s.prompts) for s in seeds)):
        active = [i for i, s in enumerate(seeds) if alive[i] and t < len(s.prompts)]
        if not active:
            break
        for i in active:
            plain[i].append({"role": "user", "content": seeds[i].prompts[t]})
        # GAtt step 2: the model answers with the instruction appended to every user message
        asked = [world.with_instruction_in_every_user_turn(plain[i], seeds[i].inst)
                 for i in active]
        replies = generate_replies(model, tokenizer, asked, n=k,
                                   temperature=cfg.gatt_temperature,
                                   max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 7919 + t,
                                   batch=cfg.gen_batch, rt=rt, desc=f"GAtt turn {t + 1}")
        for i, history, cands in zip(active, asked, replies):
            if cands is None:  # the history no longer fits the context: the dialog ends here
                alive[i] = False
                plain[i].pop()
                continue
            reply, kept = _pick(history, cands, seeds[i].inst, select)
            plain[i].append({"role": "assistant", "content": reply.text})
            keep[i].append(kept)
            n_turns += 1
            n_eos += reply.eos
            n_obey += seeds[i].inst.obeys(reply.text)  # measured only, whatever the selection
    # GAtt step 3: the instruction once, as the system message; loss on the kept answers only
    rng = random.Random(f"gatt-shorten-{cfg.seed}")
    samples, n_cut = [], 0
    for s, dialog, kept in zip(seeds, plain, keep):
        train = world.with_instruction_as_system(dialog, world.shorten(s.inst, rng))
        n = max((j + 1 for j, ok in enumerate(kept) if ok), default=0)  # up to the last kept
        while n and len(llama2.encode_dialog(tokenizer, train[:1 + 2 * n], True)[0]) - 1 > seq_len:
            n -= 1
        n_cut += n < len(kept) and any(kept[n:])
        if any(kept[:n]):
            samples.append((train[:1 + 2 * n], kept[:n]))
    stats = {"select": select, "k": k, "temperature": cfg.gatt_temperature,
             "dialogs": len(seeds), "turns": n_turns,
             "kept_turns": sum(sum(f) for _, f in samples), "samples": len(samples),
             "cut_to_fit": n_cut, "eos_rate": n_eos / max(1, n_turns),
             "obey_rate": n_obey / max(1, n_turns)}
    return samples, stats


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
        replies = generate_replies(model, tokenizer, [histories[i] for i in active],
                                   max_new_tokens=cfg.max_new_tokens, batch=cfg.gen_batch,
                                   stop_at_newline=cfg.fewshot > 0, rt=rt,
                                   desc=f"adherence turn {t + 1}")
        for i, r in zip(active, replies):
            if r is None:
                alive[i] = False
                continue
            histories[i].append({"role": "assistant", "content": r[0].text})
            answers[i].append(r[0].text)
    return answers


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
    prompts = world.eval_prompts(cfg.eval_n, seed=cfg.seed + 1, levels=levels)
    shown = ([with_fewshot(d, cfg.fewshot, rng, levels) for d in prompts] if cfg.fewshot
             else prompts)
    greedy = generate_replies(model, tokenizer, shown, max_new_tokens=cfg.max_new_tokens,
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
    n_bo = min(cfg.eval_bestof_n, len(prompts))
    samples = generate_replies(model, tokenizer, shown[:n_bo], n=cfg.eval_k,
                               temperature=cfg.eval_temperature, max_new_tokens=cfg.max_new_tokens,
                               seed=cfg.seed + 11, batch=cfg.gen_batch,
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
    summary["bestof"] = {
        "k": cfg.eval_k, "temperature": cfg.eval_temperature, "n": len(best),
        "greedy_score": sum(r["score"] for r in greedy_rows) / n_bo,
        "pass1_score": sum(mean) / n_bo, "bestof_score": sum(best) / n_bo,
        "pass1_correct": sum(ok) / n_bo, "passk_correct": sum(any_ok) / n_bo,
        "greedy_correct": sum(r["content"] == 1.0 for r in greedy_rows) / n_bo,
    }
    t_bestof = time.perf_counter() - t0 - t_greedy

    # 3. adherence by turn: the instruction given once (system message), the model's replies in
    #    the history, greedy decoding; with the free floor of trivial replies on the same dialogs
    dialogs = world.eval_multiturn(cfg.eval_mt_n, seed=cfg.seed + 2, turns=cfg.eval_turns,
                                   levels=levels)
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
    summary.update({"kind": "summary", "label": label, "checkpoint": cfg.checkpoint,
                    "fewshot": cfg.fewshot, "levels": list(levels)})

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
            f"form {s['form']:.3f}), correct {s['correct']:.1%}, EOS {s['eos_rate']:.1%}, "
            f"{s['answer_tokens']:.1f} tokens / {s['answer_words']:.1f} words per answer, "
            f"n={s['n']} held-out prompts\n"
            f"  by family: {fam}\n"
            f"  best-of-{bo['k']} by the judge (T={bo['temperature']}, n={bo['n']}): greedy "
            f"{bo['greedy_score']:.3f}, pass@1 {bo['pass1_score']:.3f}, best-of-{bo['k']} "
            f"{bo['bestof_score']:.3f} | correct: greedy {bo['greedy_correct']:.1%}, pass@1 "
            f"{bo['pass1_correct']:.1%}, pass@{bo['k']} {bo['passk_correct']:.1%}\n"
            f"  instruction adherence (%), given once as the system message, "
            f"{s['adherence']['reaching'][0]} held-out dialogs "
            f"(reaching each turn: {s['adherence']['reaching']}):\n" + adherence_table(s))


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
