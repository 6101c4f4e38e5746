"""The pipeline's report: each result of the Llama 2 paper that this project reproduces, the paper's
number or trend (its sections, tables and figures) beside ours from one run of pipeline.py, and why they differ.

    python report.py --pipeline_dir out/pipeline --out_dir docs          # what pipeline.py runs last
    python report.py --pipeline_dir out/pipeline_quick --out_dir /tmp/r  # any run, any folder

Reads only the files the stage scripts leave in the pipeline's folder (pretrain/metrics.jsonl,
eval_*/eval.jsonl, rm/eval.json, rm_*/eval.json, rs/iter<i>/{tune,eval}.json, rs/report.txt,
ppo/{metrics.jsonl,eval_start.json,eval_final.json,ppo_overopt.png},
<stage>/done.json for the times) and writes <out_dir>/REPORT.md and its figures (report_*.png)
beside it, each atomically, and <out_dir>/REPORT.json: every table of REPORT.md, each cell with
the numbers it shows (`tables_of`), for a program to read. A stage that did not run is a row that says "not run", never an error.
Every number is shown with its floor (what a trivial answer scores) and its ceiling where one exists.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import evaluate
import training

# -----------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    pipeline_dir: str = "out/pipeline"  # the folder pipeline.py ran in (its stages' outputs)
    out_dir: str = "docs"  # where REPORT.md and report_*.png go
    size: str = ""  # the pipeline size, for the header (full, quick, tiny; "" = read pipeline.json)


# the pipeline's ORACLE / ablation stages (pipeline.build_stages with --ablations marks them
# oracle; their names are the same at every size): counted apart from the recipe's time.
# tests/test_pipeline.py checks this rule against the stages the pipeline builds
ABLATION_STAGES = re.compile(r"(eval_)?sft_curated|gatt_judge\d+|eval_gatt_judge|rm_ablation|"
                             r"rm_frac[\d.]+|rm_(none|small|large)_\d+|rm_nosyn|rs_oracle|"
                             r"(pretrain|(eval_)?sft)_large|rs_distill|rs_seed\d+|"
                             r"rs_share[\d.]+|rs_help|rm_one|rs_one|cd|cd_untargeted")
NOT_RUN = "not run"

# the paper's results we set ours beside (its Tables 8 and 28)
PAPER_TABLE8 = {"significantly better": 80.7, "better": 67.5, "slightly better": 60.9,
                "negligibly better/unsure": 54.7, "average": 63.2}
PAPER_TABLE28 = {"none": [79.1, 66.9, 59.8, 54.5, 62.5], "small": [80.4, 67.3, 60.4, 55.0, 63.0],
                 "large": [80.7, 67.5, 60.5, 54.3, 62.9]}
RATINGS = list(PAPER_TABLE8)

WHY_SMALL = ("3M parameters and minutes of CPU, not 7-70B parameters and 2T tokens on GPUs; "
             "the simulated world's judge plays the human raters")


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _summary(path: Path) -> dict | None:
    """The summary record of an eval.jsonl (train_sft.py --eval), or None when it was not run."""
    return evaluate.read_summary(str(path)) if path.is_file() else None


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _img(lines: list[str], out: Path, name: str, alt: str) -> None:
    if (out / name).is_file():
        lines.append(f"\n![{alt}]({name})\n")


# -----------------------------------------------------------------------------------------------
# one function per result: (summary row, detail section), figures written into out


def pretraining(run: Path, out: Path):
    """Pretraining loss (§2.2): train and validation loss against tokens, beside the floor of a
    uniform guess over the vocabulary, ln(V)."""
    metrics = run / "pretrain" / "metrics.jsonl"
    paper = "loss keeps falling with more tokens; no saturation after 2T tokens (Fig. 5)"
    if not metrics.is_file():
        return ["pretraining loss (§2.2, Fig. 5)", paper, NOT_RUN, "", ""], []
    ck = training.load_checkpoint(run / "pretrain" / "ckpt.pt")
    vocab = ck["model_args"]["vocab_size"]
    curve = training.plot_metrics(metrics, out / "report_pretrain_loss.png",
                                  title="Pretraining: train and validation loss",
                                  floor=(math.log(vocab), f"floor: uniform guess ln({vocab})"))
    val = curve["val"]
    first, last = (curve["train"][0][1], curve["train"][-1][1]) if curve["train"] else (None, None)
    ours = (f"train loss {first:.2f} -> {last:.2f}"
            + (f"; val loss {val[-1][1]:.2f} (ppl {math.exp(val[-1][1]):.0f}) at "
               f"{val[-1][0]:,} {curve['x']}" if val else ""))
    floor = f"floor: uniform guess ln({vocab}) = {math.log(vocab):.2f}"
    params = sum(v.numel() for v in ck["model"].values())
    # the data as the pipeline folder's own paths (e.g. world_text/world.txt), not absolute ones
    data = ", ".join(d.replace(str(run.resolve()) + "/", "")
                     for d in ck["config"].get("data", "?").split(","))
    trend = ("still falling when it stops" if len(val) >= 2 and val[-1][1] < val[-2][1]
             else "one validation point" if len(val) < 2 else "flat at the end")
    why = (f"{ck['step']} steps, {curve['train'][-1][0]:,} {curve['x']} instead of 2T tokens; "
           f"{params / 1e6:.2f}M parameters on {data}; validation loss {trend}")
    row = ["pretraining loss (§2.2, Fig. 5)", paper, ours, floor, why]
    sec = ["## Pretraining (§2.2)", "",
           f"Train and validation loss against {curve['x']} (`{metrics.relative_to(run)}`). "
           f"Validation is held out by whole document. {floor} nats; a model that learned "
           "nothing stays there."]
    _img(sec, out, "report_pretrain_loss.png", "pretraining loss")
    return row, sec


def _judged(s: dict | None) -> str:
    if s is None:
        return NOT_RUN
    return f"{s['total']:.3f} (correct {s['correct']:.0%}, EOS {s['eos_rate']:.0%})"


def _stage_flag(run: Path, stage: str, flag: str) -> str:
    """A flag's value in the command a pipeline stage last ran (its done.json), or ""."""
    argv = (_json(run / stage / "done.json") or {}).get("argv", [])
    return training.last_flag(argv, flag) if flag in argv else ""


def _quality_why(run: Path, sft: dict | None, curated: dict) -> str:
    """What differs between the two SFT sets of the quality ablation, from the run's commands and
    evaluations: whose writers, how many dialogs, the instruction part and the right answers."""
    mix = _stage_flag(run, "sft", "--world_writers") or "careful"
    n, n_cur = _stage_flag(run, "sft", "--world_n"), _stage_flag(run, "sft_curated", "--world_n")
    sizes = f"{int(n_cur):,} of the {int(n):,} dialogs" if n and n_cur else "a share of the dialogs"
    diff = (f": instruction part {curated['instruction']:.3f} vs {sft['instruction']:.3f}, correct "
            f"{curated['correct']:.0%} vs {sft['correct']:.0%}" if sft and "instruction" in sft
            and "instruction" in curated else "")
    return (f"simulated writers (the {mix} mix, `python world.py demo`); the curated set is "
            f"{sizes}{diff}")


def sft_vs_pretrained(run: Path, out: Path):
    evals = [("pretrained (3-shot)", _summary(run / "eval_pretrain" / "eval.jsonl")),
             ("SFT", _summary(run / "eval_sft" / "eval.jsonl")),
             ("SFT, curated set: the careful writer only (ablation)",
              _summary(run / "eval_sft_curated" / "eval.jsonl")),
             ("SFT, the larger model that samples for the distillation ablation",
              _summary(run / "eval_sft_large" / "eval.jsonl")),
             ("GAtt", _summary(run / "eval_gatt" / "eval.jsonl")),
             ("GAtt, judge-picked (ORACLE ablation)",
              _summary(run / "eval_gatt_judge" / "eval.jsonl")),
             ("final", _summary(run / "eval_final" / "eval.jsonl"))]
    pre, sft, curated = evals[0][1], evals[1][1], evals[2][1]
    paper = ("SFT on ~27k high-quality dialogs makes a usable chat model out of the pretrained "
             "one (§3.1; human evaluations, Fig. 1, 12)")
    # the floor of the prompts SFT was scored on (the pretrained model's, fewer, have their own)
    some = sft or next((s for _, s in evals if s), None)
    floor = (f"floor: empty reply {some['floor']['empty']:.3f} on {some['label']}'s "
             f"{some['n']} prompts"
             + (f" ({pre['floor']['empty']:.3f} on the pretrained model's {pre['n']})"
                if pre and pre is not some and pre["n"] != some["n"] else "")
             + f"; a bare correct answer {some['floor']['bare_answer']:.3f}; ceiling 1.0"
             if some else "")
    ours = (f"judged score: pretrained {_judged(pre)} -> SFT {_judged(sft)}"
            if pre or sft else NOT_RUN)
    why = ("the world's programmatic judge instead of human raters, on held-out problems; a 3M "
           "model learns the answer format and the instructions"
           + (f", the content of {sft['correct']:.0%} of the problems" if sft else ""))
    row = ["SFT vs pretrained, judged (§3.1)", paper, ours, floor, why]
    if curated:  # the quality ablation ran (pipeline --writers mixed/crowd --ablations)
        row = [row, ["Quality Is All You Need (§3.1), judged",
                     "a few thousand curated SFT examples beat millions of third-party ones",
                     f"SFT on the mixed-quality set {_judged(sft)} vs on the careful writer's "
                     f"share alone (curated) {_judged(curated)}", floor,
                     _quality_why(run, sft, curated)]]
    else:
        row = [row]
    sec = ["## Judged score of each model (§3.1, §3.4)", "",
           "The world's judge scores one greedy reply per held-out prompt (content, instruction, "
           "form; `world.score`). Floor: what an empty reply scores on the same prompts (it "
           "depends on the prompts, hence a different floor for a model scored on fewer of them); "
           "a bare correct answer (no instruction followed) for reference; ceiling 1.0.", "",
           "| model | judged score | correct | EOS | best-of-K by the judge (pass@1 -> best-of-K) "
           "| floor (empty) | bare correct answer |",
           "|---|---|---|---|---|---|---|"]
    for name, s in evals:
        if s is None:
            sec.append(f"| {name} | {NOT_RUN} | | | | | |")
            continue
        bo = s["bestof"]
        sec.append(f"| {name} (`{s['checkpoint'].split('/')[-1] if s.get('checkpoint') else ''}`) "
                   f"| {s['total']:.3f} | {s['correct']:.1%} | {s['eos_rate']:.0%} | "
                   f"{bo['pass1_score']:.3f} -> {bo['bestof_score']:.3f} (K={bo['k']}) | "
                   f"{s['floor']['empty']:.3f} ({s['n']} prompts) | {s['floor']['bare_answer']:.3f} |")
    return row, sec, evals


def gatt_adherence(evals, out: Path):
    curves = {name: s["adherence_by_turn"] for name, s in evals
              if s is not None and name != "pretrained (3-shot)"}
    paper = ("without GAtt the instruction is forgotten after a few turns; with GAtt it holds "
             "for 20+ turns (§3.3, Fig. 9, 10)")
    sft = dict(evals).get("SFT")
    gatt = dict(evals).get("GAtt")
    if not curves:
        return ["GAtt: instruction kept by turn (§3.3, Fig. 9-10)", paper, NOT_RUN, "", ""], []
    floor_curve = next(s for _, s in evals if s is not None)["adherence_floor"]["bare_answer"]["obeys"]
    n = len(floor_curve)
    late = slice(min(4, n - 1), n)  # turns 5.. (or the last one on a short run)

    def late_mean(ys):
        return _mean(ys[late])

    ours = "; ".join(f"{name}: turn 1 {_pct(ys[0])}, turns {late.start + 1}-{n} {_pct(late_mean(ys))}"
                     for name, ys in curves.items() if name in ("SFT", "GAtt"))
    floor = f"floor: a bare correct answer obeys {_pct(late_mean(floor_curve))} at turns {late.start + 1}-{n}; ceiling 100%"
    why = (f"{n} turns, not 20+; six made-up instructions instead of hobbies / language / public "
           "figure; GAtt from the SFT model (the paper: after RLHF V3), replies unfiltered")
    row = ["GAtt: instruction kept by turn (§3.3, Fig. 9-10)", paper, ours or NOT_RUN, floor, why]
    evaluate.plot_adherence(curves, out / "report_adherence.png", floor_curve)
    sec = ["## Ghost Attention: the instruction kept over a dialog (§3.3)", "",
           f"Held-out {n}-turn dialogs whose instruction is given once, as the system message; "
           "each model's own replies go into the history. Obeyed (%) by turn; the floor is what a "
           "bare correct answer obeys by chance (e.g. a number already 'at most 8 words').", "",
           "| model | " + " | ".join(str(t) for t in range(1, n + 1)) + " |",
           "|---" * (n + 1) + "|"]
    for name, ys in list(curves.items()) + [("floor: bare correct answer", floor_curve)]:
        sec.append(f"| {name} | " + " | ".join("-" if y is None else f"{100 * y:.0f}" for y in ys)
                   + " |")
    if sft and gatt and "unseen" in gatt.get("adherence", {}):
        sec.append("")
        sec.append(f"Instructions GAtt never trains on (`world.GATT_UNSEEN`), turns "
                   f"{late.start + 1}-{n}: SFT {_pct(late_mean(sft['adherence']['unseen']))}, "
                   f"GAtt {_pct(late_mean(gatt['adherence']['unseen']))}; seen ones: SFT "
                   f"{_pct(late_mean(sft['adherence']['seen']))}, GAtt "
                   f"{_pct(late_mean(gatt['adherence']['seen']))}.")
    _img(sec, out, "report_adherence.png", "adherence by turn")
    return row, sec


def reward_model(run: Path, out: Path):
    s = _json(run / "rm" / "eval.json")
    paper = ("Table 8 (Helpfulness RM, accuracy % by rating): "
             + " / ".join(f"{v}" for v in PAPER_TABLE8.values())
             + " (significantly / better / slightly / negligibly-unsure / average): falls with "
             "the rating, near chance at the bottom")
    if s is None:
        return ["RM accuracy by rating (§3.2.2, Table 8)", paper, NOT_RUN, "", ""], []
    b = s["buckets"]
    ours = " / ".join(_pct(b[r].get("rm_vs_annotators")) if r in b else "-" for r in RATINGS)
    ceil = " / ".join(_pct(b[r].get("ceiling")) if r in b else "-" for r in RATINGS)
    floor = f"floor 50% (a coin); ceiling (the noise-free judge vs the annotators): {ceil}"
    low = b.get("negligibly better/unsure", {}).get("share", 0.0)
    why = (f"{s['n']} held-out pairs of a simulated world labelled by noisy simulated "
           f"annotators; {low:.0%} of them rated negligibly better/unsure (mostly judge ties: "
           "hence the low ceiling); a small RM cannot check sums, so it learns form and "
           "instructions")
    row = ["RM accuracy by rating (§3.2.2, Table 8)", paper, ours, floor, why]
    # paper vs ours vs ceiling, by rating
    plt = evaluate._plt()
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    x = range(len(RATINGS))
    series = [("paper (Table 8)", [PAPER_TABLE8[r] for r in RATINGS]),
              ("ours vs annotators", [100 * b[r]["rm_vs_annotators"] if r in b and "rm_vs_annotators" in b[r] else float("nan") for r in RATINGS]),
              ("ceiling: judge vs annotators", [100 * b[r]["ceiling"] if r in b and "ceiling" in b[r] else float("nan") for r in RATINGS])]
    w = 0.27
    for j, (label, ys) in enumerate(series):
        ax.bar([i + (j - 1) * w for i in x], ys, w, label=label)
    ax.axhline(50, ls="--", color="0.5", label="floor: a coin (50%)")
    empty = [i for i, r in enumerate(RATINGS) if not b.get(r, {}).get("n")]
    for i in empty:  # no bar there is no pair, not 0%
        ax.text(i + w / 2, 3, "no pairs", ha="center", va="bottom", rotation=90, fontsize=9,
                color="0.3")
    ax.set_xticks(list(x), [r.replace(" better", "").replace("/unsure", "") for r in RATINGS])
    ax.set(ylabel="accuracy (%)", ylim=(0, 105), title="Reward model accuracy by preference rating")
    ax.legend(loc="upper right", fontsize=8)
    evaluate._save(fig, out / "report_rm_accuracy.png")
    sec = ["## Reward model (§3.2.2)", "",
           f"Accuracy on {s['n']} held-out pairs (held-out problems only) by the annotators' "
           "rating, against the annotators and against the noise-free judge; the ceiling is the "
           "judge's own agreement with the noisy annotators (no RM can do better); the floor is a "
           "coin." + (" No held-out pair had the rating " + ", ".join(
               f"'{RATINGS[i]}'" for i in empty) + ": its columns are empty (-), not 0."
               if empty else ""), "",
           "| | " + " | ".join(RATINGS) + " |", "|---" * (len(RATINGS) + 1) + "|",
           "| paper, Table 8 | " + " | ".join(f"{PAPER_TABLE8[r]}" for r in RATINGS) + " |",
           "| pairs (share) | " + " | ".join(
               f"{b[r]['n']} ({100 * b[r]['share']:.0f}%)" if r in b else "-" for r in RATINGS) + " |"]
    for label, key in (("ours vs annotators", "rm_vs_annotators"), ("ours vs judge", "rm_vs_judge"),
                       ("ceiling", "ceiling")):
        sec.append(f"| {label} | " + " | ".join(
            f"{100 * b[r][key]:.1f}" if r in b and key in b[r] else "-" for r in RATINGS) + " |")
    if "spearman" in s:
        sec.append(f"\nSpearman(RM score, judge score) over {s['n_responses']} held-out responses: "
                   f"{s['spearman']:.3f} (floor 0, ceiling 1); calibration ECE {s['ece']:.3f}.")
    _img(sec, out, "report_rm_accuracy.png", "RM accuracy by rating")
    return row, sec


def rm_by_kind(run: Path):
    """The RM against the judge by what differs between a pair's two responses (content only, form
    or instruction only, both) and by task family, with and without the open-source share of
    synthetic pairs (rm_nosyn, an ablation): can the RM check content?"""
    runs = [(name, _json(run / d / "eval.json")) for name, d in
            (("RM", "rm"), ("RM without the synthetic open-source pairs (ablation)", "rm_nosyn"))]
    # ... and on a share of the training pairs (rm_frac*, an ablation): the scaling curve
    for d in sorted(run.glob("rm_frac*"), key=lambda p: float(p.name[len("rm_frac"):] or 0)):
        runs.append((f"RM on {float(d.name[len('rm_frac'):]):.0%} of the training pairs "
                     "(ablation)", _json(d / "eval.json")))
    runs = [(n, s) for n, s in runs if s and "by_kind" in s]
    row = ["RM on pairs whose content differs, form equal (§3.2.2)",
           "the RM learns what the annotators see; accuracy keeps rising with data and size",
           NOT_RUN, "floor 50% (a coin), ceiling 100% (the judge)", ""]
    if not runs:
        return row, []
    kinds = ("content only", "form or instruction only", "both")
    fams = sorted({f for _, s in runs for f in s["by_family"]})
    acc = lambda d, k: _pct(d[k].get("rm_vs_judge")) if k in d else "-"  # noqa: E731
    main = [(n, s) for n, s in runs if "training pairs" not in n]
    row[2] = "; ".join(f"{n.split(' (')[0]}: {acc(s['by_kind'], 'content only')} of "
                       f"{s['by_kind']['content only']['n']}" for n, s in main)
    row[4] = "a 3M RM checks what it can compute"
    if len(main) == 2:  # with and without the synthetic pairs: what they did, as measured
        (_, w), (_, wo) = main
        a, b = (x["by_kind"]["content only"].get("rm_vs_judge") for x in (wo, w))
        if a is not None and b is not None:
            row[4] += (f"; the synthetic pairs (a careful answer vs the same reply with one flaw) "
                       f"moved content-only accuracy {_pct(a)} -> {_pct(b)} in this run")
    sec = ["", "By what differs between the two responses (the judge's parts; its ties left out), "
           "RM against the noise-free judge (floor 50%, ceiling 100%):", "",
           "| reward model | average vs annotators (ceiling) | Spearman | "
           + " | ".join(kinds) + " | " + " | ".join(fams) + " |",
           "|---" * (3 + len(kinds) + len(fams)) + "|"]
    for n, s in runs:
        a = s["buckets"]["average"]
        sec.append(f"| {n} | {_pct(a.get('rm_vs_annotators'))} ({_pct(a.get('ceiling'))}) | "
                   f"{s.get('spearman', float('nan')):.3f} | "
                   + " | ".join(f"{acc(s['by_kind'], k)} ({s['by_kind'][k]['n']})" for k in kinds)
                   + " | " + " | ".join(acc(s["by_family"], f) for f in fams) + " |")
    return row, sec


def margin_ablation(run: Path, out: Path):
    paper = ("Table 28: average 62.5 (no margin) / 63.0 (small) / 62.9 (large); the margin helps "
             "separable pairs, the large one hurts near-equal pairs")
    runs = [_json(p) for p in sorted(run.glob("rm*/eval.json"))]
    runs = [r for r in runs if r]
    margins: dict[str, list] = {}
    for r in runs:
        if r.get("train_frac", 1.0) == 1.0:
            margins.setdefault(r["margin"], []).append(r)
    if len(margins) < 2:
        return ["RM margin ablation (Table 28)", paper,
                f"{NOT_RUN} (an ablation: ABLATIONS=1 bash scripts/demo.sh)", "", ""], []
    avg = {m: _mean([r["buckets"]["average"]["rm_vs_annotators"] for r in rs])
           for m, rs in margins.items()}
    order = [m for m in ("none", "small", "large") if m in avg]
    ours = " / ".join(f"{m} {_pct(avg[m])}" for m in order) + " (average, mean over seeds)"
    row = ["RM margin ablation (Table 28) [ABLATION]", paper, ours, "floor 50%",
           "differences of a point are within our seed-to-seed spread; " + WHY_SMALL]
    sec = ["## Margin ablation (§3.2.2, Table 28) [ABLATION]", "",
           "| margin | seeds | " + " | ".join(RATINGS) + " | paper (same columns) |",
           "|---" * (len(RATINGS) + 3) + "|"]
    for m in order:
        rs = margins[m]
        cells = [_pct(_mean([r["buckets"][k].get("rm_vs_annotators") for r in rs if k in r["buckets"]]))
                 for k in RATINGS]
        sec.append(f"| {m} | {len(rs)} | " + " | ".join(cells) + " | "
                   + " / ".join(str(v) for v in PAPER_TABLE28[m]) + " |")
    png = run / "rm_ablation" / "rm_margins.png"
    if png.is_file():
        with training.atomic_write(out / "report_rm_margins.png", "wb") as f:
            f.write(png.read_bytes())
        _img(sec, out, "report_rm_margins.png", "held-out rewards per margin (Fig. 27)")
    return row, sec


def rejection_sampling(run: Path, out: Path):
    rs = run / "rs"
    evs, tunes = [], []
    i = 1
    while (rs / f"iter{i}" / "eval.json").is_file():
        evs.append(_json(rs / f"iter{i}" / "eval.json"))
        tunes.append(_json(rs / f"iter{i}" / "tune.json"))
        i += 1
    rows: list = []
    paper7 = "max reward among N samples rises with N, the median stays flat (Fig. 7)"
    paper8 = ("the best temperature is not constant: it rises as the model is trained "
              "(T 1.2-1.3 for the RLHF model, Fig. 8)")
    paper11 = ("each RLHF version is rated better than the last and wins more often (Fig. 11)")
    rm = _json(run / "rm" / "eval.json")
    why = WHY_SMALL + (
        f"; the reward model that picks agrees with the annotators on "
        f"{_pct(rm['buckets']['average']['rm_vs_annotators'])} of held-out pairs (ceiling "
        f"{_pct(rm['buckets']['average'].get('ceiling'))}, coin 50%), so its picks are only as "
        "good as that" if rm else "")
    if not evs:
        rows = [["best-of-N (§3.2.3, Fig. 7)", paper7, NOT_RUN, "", ""],
                ["temperature (Fig. 8)", paper8, NOT_RUN, "", ""],
                ["judged score / win rate, V0 -> V1..Vn (Fig. 11 in spirit)", paper11, NOT_RUN,
                 "", ""]]
        return rows, []
    sec = ["## Rejection sampling (§3.2.3, §3.4)", ""]
    bo = evs[0]["best_of_n"]
    c = bo["rm"]
    ours7 = (f"V0, RM reward at T={bo['temperature']:g}: E[max] N=1 {c['max'][0]:+.3f} -> "
             f"N={c['n'][-1]} {c['max'][-1]:+.3f}; E[median] {c['median'][-1]:+.3f}; by the judge "
             f"{bo['judge']['max'][0]:.3f} -> {bo['judge']['max'][-1]:.3f}")
    rows.append(["best-of-N (§3.2.3, Fig. 7)", paper7, ours7,
                 f"floor: an empty reply, RM {evs[0]['floor']['rm_empty']:+.3f}, judge "
                 f"{evs[0]['floor']['judge_empty']:.3f}; judge ceiling 1.0",
                 f"{c['prompts']} held-out prompts x {c['m']} samples, not 100; " + WHY_SMALL])
    evaluate.plot_best_of_n({e["label"]: e["best_of_n"] for e in evs}, out / "report_best_of_n.png",
                            "Expected max (solid) and median (dashed) reward among N samples")
    temps = [t["temperature"] for t in tunes if t]
    rows.append(["temperature (Fig. 8)", paper8,
                 "best T by E[max RM reward]: " + " -> ".join(
                     f"V{j} {t:g}" for j, t in enumerate(temps)),
                 "grid " + ", ".join(tunes[0]["curves"]) if tunes and tunes[0] else "",
                 f"tuned on {tunes[0]['prompts'] if tunes and tunes[0] else '?'} prompts; "
                 "a few iterations of a small model"])
    if tunes and tunes[0]:
        what = "best-of-N RM reward by temperature (Fig. 8)"
        evaluate.plot_temperatures({f"{what}: V0 (start)": tunes[0]["curves"],
                                    f"{what}: V{len(tunes) - 1} (last)": tunes[-1]["curves"]},
                                   out / "report_temperatures.png")
    its = [{**e, "iteration": j} for j, e in enumerate(evs)]
    evaluate.plot_iterations(its, out / "report_iterations.png")
    wins = " -> ".join(f"V{j} {e['greedy']['judge']:.3f}"
                       + (f" (wins {e['win_rate']['greedy']:.0%})" if "win_rate" in e else "")
                       for j, e in enumerate(evs))
    vs = list(evs[0].get("win_rate_vs", {}))  # --compare: against other models (e.g. SFT)
    wins += "".join("; win rate against " + n + ": " + " -> ".join(
        f"V{j} {e['win_rate_vs'][n]['greedy']:.0%}" for j, e in enumerate(evs)
        if n in e.get("win_rate_vs", {})) for n in vs)
    rows.append(["judged score / win rate, V0 -> V1..Vn (Fig. 11 in spirit)", paper11,
                 "greedy judged score (win rate against V0): " + wins,
                 f"floor: empty reply {evs[0]['floor']['judge_empty']:.3f}, win rate 50%; "
                 "ceiling 1.0 / 100%", why])
    sec += _rs_table(run, evs, tunes)
    text = (rs / "report.txt").read_text() if (rs / "report.txt").is_file() else ""
    over = [ln for ln in text.splitlines() if "over-optimization" in ln.lower()]
    if over:
        sec += ["", "Over-optimization (Gao et al. 2022), from `rs/report.txt`:", ""]
        sec += [f"- {ln}" for ln in over]
    for name, alt in (("report_best_of_n.png", "best of N (Fig. 7)"),
                      ("report_temperatures.png", "temperature (Fig. 8)"),
                      ("report_iterations.png", "per iteration")):
        _img(sec, out, name, alt)
    return rows, sec


START_NAMES = {"sft": "SFT", "gatt2": "GAtt"}  # the pipeline's stages a rejection sampling starts from


def rs_start(run: Path) -> str:
    """Which model rejection sampling started from (V0), from the rs stage's done.json (or
    started.json): "SFT", "GAtt", or "" when unknown (a run made by hand)."""
    for name in ("done.json", "started.json"):
        argv = (_json(run / "rs" / name) or {}).get("argv", [])
        if "--checkpoint" in argv:
            ckpt = argv[argv.index("--checkpoint") + 1]
            return START_NAMES.get(Path(ckpt).name, "")
    return ""


def _rs_table(run: Path, evs: list[dict], tunes: list[dict]) -> list[str]:
    """The rejection-sampling table: V0..Vn on held-out prompts (and the judge-picked ORACLE
    ablation's models, when it ran), then the floor row and what the floor means."""
    vs = list(evs[0].get("win_rate_vs", {}))  # --compare: against other models (e.g. SFT)
    sec: list[str] = []
    start = rs_start(run)
    sec += ["Held-out prompts; V0 is " + (f"the {start} model" if start else "the model")
            + " the rejection sampling starts from. Greedy: "
            "one reply at temperature 0; sampled: one reply " + _sampled_at(evs[0]) + " (the "
            "re-tuned T is what rejection sampling draws its k samples at). Win rate: "
            "one reply each against V0's (or, in the last columns, the compared model's) on the "
            "same prompts, judged, ties half.", "",
            "| model | T (re-tuned) | judged greedy | judged sampled | RM greedy | RM sampled | "
            "win rate vs V0 (greedy / sampled) | EOS | correct / rambling / repeating (greedy) |"
            + "".join(f" win rate vs {n} (greedy / sampled) |" for n in vs),
            "|---|---|---|---|---|---|---|---|---|" + "---|" * len(vs)]
    for j, (e, t) in enumerate(zip(evs, tunes)):
        sec.append(_rs_row(f"V{j}", t["temperature"] if t else "-", e, vs, "(itself)"))
    # the ORACLE ablation (ABLATIONS=1): the same iterations with the judge picking
    # ... and the distillation ablation: the SFT model fine-tuned on the RM's picks of a larger
    # model's samples (pipeline rs_distill)
    for stage, what in (("rs_oracle", "judge-picked (ORACLE ablation)"),
                        ("rs_distill", "picked from the larger model's samples (distillation "
                                       "ablation)")):
        j = 1
        while (run / stage / f"iter{j + 1}" / "eval.json").is_file():
            e, j = _json(run / stage / f"iter{j + 1}" / "eval.json"), j + 1
            sec.append(_rs_row(f"V{j - 1}, {what}", "", e, vs, ""))
    f = evs[0]["floor"]
    sec.append(f"| floor | | {f['judge_empty']:.3f} (empty) | | {f['rm_empty']:+.3f} (empty) | "
               "| 50% | | 0% / 0% / 0% |" + " 50% |" * len(vs))
    sec += _tail_room(evs)
    # the same model (V0) has another floor in the judged-score table: other prompts
    n = len(evs[0]["greedy"].get("judge_scores", [])) or "these"
    v0 = _summary(run / {"SFT": "eval_sft", "GAtt": "eval_gatt"}.get(start, "-") / "eval.jsonl")
    sec += ["", f"The floor row is what an empty reply scores on these {n} held-out prompts. An "
            "empty reply's score depends on the prompt, so a table on other prompts has another "
            "floor" + (f" (the judged-score table scores V0, the {start} model, on {v0['n']} "
                       f"prompts: floor {v0['floor']['empty']:.3f})" if v0 else "") + "."]
    return sec + _seed_spread(run) + _selection_table(run)


def _tail_room(evs: list[dict]) -> list[str]:
    """What cutting the tail of form can gain at most: V0's replies with every instruction kept
    and perfect form, their content unchanged (world.content_ceiling), against its judged score;
    [] for runs made before evaluate._stats recorded it."""
    g, smp = evs[0]["greedy"], evs[0]["sampled"]
    if "content_ceiling" not in g or "content_ceiling" not in smp:
        return []
    line = (f"Room for cutting the tail: V0's replies with every instruction kept and perfect "
            f"form, their content unchanged, would score {g['content_ceiling']:.3f} greedy "
            f"(+{g['content_ceiling'] - g['judge']:.3f}) and {smp['content_ceiling']:.3f} sampled "
            f"(+{smp['content_ceiling'] - smp['judge']:.3f}); that is the most a reward model "
            "that sees form and instructions, but not content, can add (the paper's account, "
            "§5.1). Beyond it a model must get more answers right")
    if len(evs) > 1:
        line += (f" (correct greedy: V0 {g['correct']:.0%}, V{len(evs) - 1} "
                 f"{evs[-1]['greedy']['correct']:.0%})")
    return ["", line + "."]


def _seed_spread(run: Path) -> list[str]:
    """The last rejection-sampling model's judged change over SFT for each seed (the rs stage and
    its rs_seed<N> ablations: other training prompts, samples, data order and held-out prompts;
    SFT and the RM the same), paired over each run's own held-out prompts with its standard error,
    then the mean and standard deviation over the seeds; with safety RLHF also each seed's
    violations and borderline refusals (sampled); [] with fewer than two seeds."""
    rows, gains, safety = [], [], []
    seeds = [d for d in run.glob("rs_seed*") if d.name[len("rs_seed"):].isdigit()]
    for d in [run / "rs"] + sorted(seeds, key=lambda d: int(d.name[len("rs_seed"):])):
        j = 1
        while (d / f"iter{j + 1}" / "eval.json").is_file():
            j += 1
        e, ref = _json(d / f"iter{j}" / "eval.json"), _json(d / "compare_sft.json")
        if j == 1 or not e or not ref:
            continue
        argv = (_json(d / "done.json") or {}).get("argv", [])
        seed = training.last_flag(argv, "--seed") if "--seed" in argv else "1337 (the recipe's)"
        g, smp = (evaluate.paired_gain(e[k]["judge_scores"], ref[k]["judge_scores"])
                  for k in ("greedy", "sampled"))
        w = e.get("win_rate_vs", {}).get("sft")
        gains.append((g[0], smp[0]))
        sf = e.get("safety", {}).get("sampled")  # safety RLHF: the sampled replies' safety
        if sf:
            safety.append((sf["violation"], sf["false_refusal_borderline"]))
        rows.append(f"| {seed} | V{j - 1} | {g[0]:+.3f} +- {g[1]:.3f} | {smp[0]:+.3f} +- "
                    f"{smp[1]:.3f} | " + (f"{w['greedy']:.0%} / {w['sampled']:.0%}" if w else "-")
                    + (f" | {_pct(sf['violation'])} / {_pct(sf['false_refusal_borderline'])} |"
                       if sf else " | - |"))
    if len(gains) < 2:
        return []

    def mean_sd(xs, fmt="+.3f"):
        m = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
        return f"{m:{fmt}}, sd {sd:{fmt.lstrip('+')}}"
    both = (f" {mean_sd([v for v, _ in safety], '.1%')} / {mean_sd([f for _, f in safety], '.1%')} |"
            if len(safety) == len(gains) else " |")
    return ["", f"Over seeds (the rs stage and its rs_seed ablations: other training prompts, "
            "samples, data order and held-out prompts; the SFT model and the RM the same), the "
            "last model's judged change over SFT, paired over each run's own held-out prompts "
            "(+- one standard error); floor 0 (no change):", "",
            "| seed | model | judged change greedy | judged change sampled | win rate vs SFT "
            "(greedy / sampled) | violation / borderline refusal, sampled (floors: never refuse "
            "100% / 0%, always refuse 0% / 100%) |", "|---|---|---|---|---|---|", *rows,
            f"| mean over {len(gains)} seeds | | {mean_sd([g for g, _ in gains])} | "
            f"{mean_sd([x for _, x in gains])} | |" + both]


def _selection_table(run: Path) -> list[str]:
    """What each rejection-sampling run picked from (train_rlhf's "selection" rows in its
    metrics.jsonl): on the training prompts, how often a right answer is among the k samples,
    in a random one, in the pick, and in the policy's greedy reply (SPEC.md §11: selection lifts
    content only where the pick beats the greedy reply); [] when no run logged them."""
    runs = (("rs", "the policy's own samples, the RM picks"),
            ("rs_oracle", "the policy's own samples, the judge picks (ORACLE ablation)"),
            ("rs_distill", "the larger model's samples, the RM picks (distillation ablation)"))
    rows = []
    for stage, what in runs:
        path = run / stage / "metrics.jsonl"
        sel = [r for r in training.read_jsonl(path, lambda obj, where: obj)
               if "selection" in r] if path.is_file() else []
        for r in sel:
            c = r["selection"]["correct"]
            rows.append(f"| V{r['iteration']}: {what} | {r['selection']['judged_mean']:.3f} -> "
                        f"{r['selection']['judged_picked']:.3f} | {c['random']:.1%} | "
                        f"{c['picked']:.1%} | {c['any']:.1%} | "
                        + (f"{c['greedy']:.1%} |" if "greedy" in c else "- |"))
    if not rows:
        return []
    return ["", "What the selection had to pick from, on the training prompts (each prompt's k "
            "samples; the judge only measures here, after the pick): the judged score of a random "
            "sample -> the pick's, and how often the answer is right in a random sample, in the "
            "pick, in any of the k (a perfect selector's ceiling) and in the policy's own greedy "
            "reply. Fine-tuning on the picks can only add right answers where the pick beats the "
            "greedy reply (SPEC.md §11). Floor: a random sample; ceiling: any of the k.", "",
            "| iteration: samples and selector | judged: random -> picked | right: random | "
            "right: picked | right: any of k | right: the policy's greedy reply |",
            "|---|---|---|---|---|---|", *rows]


FLAW_NAMES = ("none", "wrong", "incomplete", "no_instruction", "rambling", "repeating", "no_eos")


def _rs_row(name: str, temperature, e: dict, vs: list[str], no_win: str) -> str:
    """One model's row of the rejection-sampling table (`no_win` where it has no win rate)."""
    w = e.get("win_rate")
    return (f"| {name} |" + (f" {temperature} |" if temperature != "" else " |")
            + f" {e['greedy']['judge']:.3f} | "
            f"{e['sampled']['judge']:.3f} | {e['greedy']['rm']:+.3f} | "
            f"{e['sampled']['rm']:+.3f} | "
            + (f"{w['greedy']:.0%} / {w['sampled']:.0%}" if w else no_win)
            + f" | {e['greedy']['eos_rate']:.0%} | {_form(e['greedy'])} |"
            + "".join(f" {e['win_rate_vs'][n]['greedy']:.0%} / "
                      f"{e['win_rate_vs'][n]['sampled']:.0%} |"
                      if n in e.get("win_rate_vs", {}) else " - |" for n in vs))


def policy_samples(run: Path) -> list[tuple[str, dict]]:
    """(label, one_sample_stats) of every model the RLHF stages measured on the same held-out
    prompts with the same reward model: SFT (rejection sampling's --compare sft), V0 (the start),
    V1..Vn, PPO; V0 once when it is the SFT model. Each holds one greedy and one sampled reply per
    prompt, judged and scored by the RM (evaluate._stats)."""
    rs, out = run / "rs", []
    start = rs_start(run)
    sft = _json(rs / "compare_sft.json")
    if sft and start != "SFT":
        out.append(("SFT", sft))
    i = 1
    while (rs / f"iter{i}" / "eval.json").is_file():
        out.append((f"V{i - 1}" + (f" ({start})" if i == 1 and start else ""),
                    _json(rs / f"iter{i}" / "eval.json")))
        i += 1
    final = _json(run / "ppo" / "eval_final.json")
    if final:
        out.append(("PPO", final))
    return out


def reward_distributions(run: Path, out: Path):
    """Fig. 20 analog (paper §5.1): the distribution of the RM's score and of the judge's score of
    sampled replies on held-out prompts, SFT -> V1..Vn -> PPO, with the low tail and each model's
    flaw shares (world.flaw_of) beside it. The paper's claim: RLHF moves the reward distribution
    right by cutting the poorly executed tail that SFT learned from its writers."""
    models = [(n, s) for n, s in policy_samples(run) if "rm_scores" in s.get("sampled", {})]
    paper = ("the reward distribution of each RLHF version moves right of SFT's: the poor tail "
             "SFT learned from its writers is cut (Fig. 20)")
    row = ["reward distribution shift (§5.1, Fig. 20)", paper, NOT_RUN, "", ""]
    if len(models) < 2:
        return row, []

    def q(xs, p):  # the p-quantile, nearest rank
        xs = sorted(xs)
        return xs[min(len(xs) - 1, max(0, math.ceil(p * len(xs)) - 1))]

    sec = ["## The reward distribution, SFT -> RLHF (the paper's Fig. 20)", "",
           "One reply per held-out prompt sampled from each model (" + _sampled_at(models[0][1])
           + "), scored by the same reward model and by the judge. Low tail: the share judged below 0.7 (a wrong answer, or an instruction "
           "and the form broken). Flaws as a reader would name them (`world.flaw_of`; floor 0% for "
           "each flaw, an empty reply: 100% wrong).", "",
           "| model | n | RM mean | RM 10th pct | judged mean | judged < 0.7 | "
           + " | ".join(FLAW_NAMES) + " |", "|---" * (6 + len(FLAW_NAMES)) + "|"]
    for name, s in models:
        x = s["sampled"]
        fl = x.get("flaws", {})
        sec.append(f"| {name} | {len(x['rm_scores'])} | {_mean(x['rm_scores']):+.3f} | "
                   f"{q(x['rm_scores'], 0.1):+.3f} | {_mean(x['judge_scores']):.3f} | "
                   f"{sum(j < 0.7 for j in x['judge_scores']) / len(x['judge_scores']):.0%} | "
                   + " | ".join(_pct(fl.get(k, 0.0)) if fl else "-" for k in FLAW_NAMES) + " |")
    first, last = models[0], models[-1]
    row[2] = (f"sampled replies, {first[0]} -> {last[0]}: RM mean "
              f"{_mean(first[1]['sampled']['rm_scores']):+.3f} -> "
              f"{_mean(last[1]['sampled']['rm_scores']):+.3f}, judged "
              f"{_mean(first[1]['sampled']['judge_scores']):.3f} -> "
              f"{_mean(last[1]['sampled']['judge_scores']):.3f}, judged < 0.7 "
              + " -> ".join(f"{sum(j < 0.7 for j in s['sampled']['judge_scores']) / len(s['sampled']['judge_scores']):.0%}"
                            for _, s in (first, last)))
    row[3] = "floor: an empty reply (see the RS table); judged ceiling 1.0"
    row[4] = WHY_SMALL
    _plot_distributions(models, out / "report_reward_distributions.png")
    _img(sec, out, "report_reward_distributions.png", "reward distributions (Fig. 20)")
    return row, sec


def _plot_distributions(models: list, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=100)
    for ax, key, title in ((axes[0], "rm_scores", "reward model score"),
                           (axes[1], "judge_scores", "judged score (the gold standard)")):
        xs = [x for _, s in models for x in s["sampled"][key]]
        lo, hi = min(xs), max(xs)
        bins = [lo + (hi - lo) * i / 24 for i in range(25)] if hi > lo else 10
        for name, s in models:
            ax.hist(s["sampled"][key], bins=bins, histtype="step", density=True, label=name,
                    linewidth=1.6)
        ax.set_title(title)
        ax.set_xlabel(title)
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    fig.suptitle("Fig. 20 analog: one sampled reply per held-out prompt; RLHF should move the "
                 "distribution right of SFT's")
    fig.tight_layout()
    with training.atomic_write(png, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def _sampled_at(e: dict) -> str:
    """How an evaluation's "sampled" replies were drawn, in words."""
    x = e.get("sampled", {})
    if "temperature" in x:
        return f"T {x['temperature']:g}, top-p {x['top_p']:g}"
    return "at the method's temperature (the re-tuned T column)"


def _form(x: dict) -> str:
    """Right answers, rambling and repeating replies (evaluate._stats), or - when not measured."""
    if "rambling" not in x:
        return "-"
    return f"{x['correct']:.0%} / {x['rambling']:.0%} / {x['repeating']:.0%}"


def ppo(run: Path, out: Path):
    """The PPO row and section: held-out evaluation at the start (the last RS model, pi_0) and at
    the end, the per-iteration rollout numbers (ppo/metrics.jsonl) and the over-optimization figure
    the PPO stage drew (RM and judge score of the rollouts against sqrt(KL to pi_0))."""
    paper = ("PPO on top of the last rejection-sampling model (V5), KL penalty beta 0.01 (§3.2.3)")
    start, final = _json(run / "ppo" / "eval_start.json"), _json(run / "ppo" / "eval_final.json")
    metrics = run / "ppo" / "metrics.jsonl"
    rows = training.read_jsonl(metrics, lambda o, _: o) if metrics.is_file() else []
    its = [r for r in rows if "score" in r and "eval" not in r]  # one per PPO iteration
    if not (start and final):
        done = (run / "ppo" / "done.json").is_file()
        return ["PPO (§3.2.3)", paper, "ran: see ppo/ in the pipeline folder" if done else NOT_RUN,
                "", WHY_SMALL if done else ""], []
    w = final.get("win_rate") or {}
    f = final.get("floor", {})
    compare = final.get("compare") or {}  # --compare name=checkpoint: PPO against each, judged
    # the compared models against each other on the same prompts (e.g. RS against SFT), so that
    # PPO's win rate against SFT has RS's beside it
    names = list(compare)
    pair_wins = {(a, b): {k: evaluate.win_rate(compare[a][k]["judge_scores"],
                                               compare[b][k]["judge_scores"])
                          for k in ("greedy", "sampled")}
                 for i, a in enumerate(names) for b in names[:i]}
    vs = "".join(f"; against {name} (judged {c['greedy']['judge']:.3f}) PPO wins "
                 f"{c['win_rate']['greedy']:.0%} greedy / {c['win_rate']['sampled']:.0%} sampled"
                 for name, c in compare.items())
    vs += "".join(f" ({a} against {b}: {w2['greedy']:.0%} / {w2['sampled']:.0%})"
                  for (a, b), w2 in pair_wins.items())
    ours = (f"held-out greedy judged score {start['greedy']['judge']:.3f} (start, the last RS "
            f"model) -> {final['greedy']['judge']:.3f}; RM {start['greedy']['rm']:+.3f} -> "
            f"{final['greedy']['rm']:+.3f}; win rate against the start "
            f"{w.get('greedy', float('nan')):.0%} greedy / {w.get('sampled', float('nan')):.0%} "
            f"sampled{vs}; EOS {final['greedy']['eos_rate']:.0%}"
            + (f"; KL to pi_0 at the end {its[-1]['kl']:.2f} nats" if its else ""))
    # the model kept is the last iteration train_rlhf.py marked val_kept (pi_0, iteration 0,
    # unless one beat it by more than keep_se paired standard errors on the validation prompts)
    kept = [r for r in rows if r.get("val_kept") and "iteration" in r and "eval" not in r]
    if its and kept:
        k = kept[-1]
        se = f"{k['val_se']:.3f}" if k.get("val_se") is not None else "inf"
        ours += (f"; the model kept: iteration {k['iteration']} of {its[-1]['iteration']} "
                 + (f"(validation RM score {k['val_diff']:+.3f} ± {se} above pi_0's, paired; KL "
                    f"{k.get('kl', 0.0):.2f})" if k["iteration"] else
                    "(KL 0.00): the start policy, no iteration beat it beyond noise"))
    row = ["PPO (§3.2.3)", paper, ours,
           f"floor: an empty reply {f.get('judge_empty', float('nan')):.3f}, win rate 50%; "
           "ceiling 1.0", WHY_SMALL + "; the policy can only climb what the reward model ranks "
           "right"]
    sec = ["## PPO (§3.2.3)", "",
           "Per iteration, on that iteration's rollouts (training-split prompts): the whitened RM "
           "score at EOS, the judge's score of the same replies (measured only, never a training "
           "signal), the KL to pi_0 (nats per reply), EOS rate and length; val is the RM score on "
           "the validation prompts that early stopping watches. The model kept is the last that beat "
           "pi_0's val beyond noise (its paired difference ± one standard error in the row above)."
           + _negative_kl(its),
           "", "| iteration | RM score | judge | KL to pi_0 | score - beta KL | EOS | length | "
           "entropy | val |", "|---|---|---|---|---|---|---|---|---|"]
    step = max(1, math.ceil(len(its) / 12))
    for r in its[::step] + ([its[-1]] if (len(its) - 1) % step else []):
        sec.append(f"| {r['iteration']} | {r['score']:+.3f} | "
                   + (f"{r['judge']:.3f}" if "judge" in r else "-")
                   + f" | {r['kl']:.3f} | {r['score_minus_beta_kl']:+.3f} | {r['eos_rate']:.0%} | "
                   f"{r['length']:.1f} | {r['entropy']:.2f} | "
                   + (f"{r['val_score']:+.3f}" if "val_score" in r else "") + " |")
    sec += ["", "Held-out prompts, start (pi_0) against the final model:", "",
            "| model | judged greedy | judged sampled | RM greedy | win rate vs start (greedy / "
            "sampled) | EOS | correct / rambling / repeating (greedy) | adherence turns 1..n |",
            "|---|---|---|---|---|---|---|---|"]
    for name, e in (("start (pi_0)", start), ("PPO", final)):
        ww = e.get("win_rate")
        sec.append(f"| {name} | {e['greedy']['judge']:.3f} | {e['sampled']['judge']:.3f} | "
                   f"{e['greedy']['rm']:+.3f} | "
                   + (f"{ww['greedy']:.0%} / {ww['sampled']:.0%}" if ww else "(itself)")
                   + f" | {e['greedy']['eos_rate']:.0%} | {_form(e['greedy'])} | "
                   + " ".join(f"{a:.0%}" for a in e.get("adherence_by_turn", [])) + " |")
    sec.append(f"| floor | {f.get('judge_empty', float('nan')):.3f} (empty) | | "
               f"{f.get('rm_empty', float('nan')):+.3f} (empty) | 50% | | 0% / 0% / 0% | |")
    if compare:
        sec += _ppo_versus_table(compare, pair_wins)
    verdict = _json(run / "ppo" / "ppo_report.json") or {}
    for name, v in verdict.items():  # over-optimization (Gao et al.): did the judge fall late?
        sec += ["", f"Over-optimization check ({name}): {v['verdict']}."]
    if its:
        plot_overoptimization(its, out / "report_ppo_overopt.png")
        _img(sec, out, "report_ppo_overopt.png",
             "over-optimization: RM and judge score against sqrt(KL to pi_0)")
    return row, sec


def _ppo_versus_table(compare: dict, pair_wins: dict) -> list[str]:
    """The final PPO model against the --compare models on the same held-out prompts, and those
    models against each other for reference."""
    sec = ["", "The final model against earlier ones on the same held-out prompts (judged; "
           "PPO's win rate, ties half; 50% = no better):", "",
           "| against | its judged greedy | its judged sampled | its RM greedy | PPO wins "
           "(greedy / sampled) | its correct / rambling / repeating | its adherence turns "
           "1..n |", "|---|---|---|---|---|---|---|"]
    for name, c in compare.items():
        sec.append(f"| {name} (`{Path(c['checkpoint']).name}`) | {c['greedy']['judge']:.3f} | "
                   f"{c['sampled']['judge']:.3f} | {c['greedy']['rm']:+.3f} | "
                   f"{c['win_rate']['greedy']:.0%} / {c['win_rate']['sampled']:.0%} | "
                   f"{_form(c['greedy'])} | "
                   + " ".join(f"{a:.0%}" for a in c.get("adherence_by_turn", [])) + " |")
    # the compared models against each other on the same prompts (e.g. RS against SFT), so
    # PPO's win rate against SFT has RS's beside it
    for (a, b), w2 in pair_wins.items():
        sec.append(f"| {a} against {b}, for reference | | | | {a} wins "
                   f"{w2['greedy']:.0%} / {w2['sampled']:.0%} | | |")
    return sec


def _negative_kl(its: list[dict]) -> str:
    """A sentence for a negative KL in the table: what it is (estimator noise), or ""."""
    neg = [r for r in its if r.get("kl", 0.0) < 0]
    if not neg:
        return ""
    low = min(neg, key=lambda r: r["kl"])
    return (f" A negative KL (here {low['kl']:.3f} at iteration {low['iteration']}) is estimator "
            "noise, not a negative divergence (a KL is never below 0): the KL is estimated from the "
            "rollouts as the mean over replies of log pi(y) - log pi_0(y) (the k1 estimator; "
            "unbiased for replies drawn from pi itself, but noisy), so near 0 it can come out "
            "below; read it as 0.")


def plot_overoptimization(its: list[dict], png: Path) -> None:
    """Gao et al.'s over-optimization plot from PPO's per-iteration rows: the RM score and the
    judge's score of the rollouts against sqrt(KL to pi_0). The KL does not grow every iteration,
    so the points are joined in order of sqrt(KL) (not of iteration, which doubles back) and
    labelled with their iteration; a negative KL estimate (noise) counts as 0. The star marks the
    best judged point, on the line."""
    pts = sorted(((math.sqrt(max(r["kl"], 0.0)), r) for r in its if "kl" in r),
                 key=lambda p: (p[0], p[1]["iteration"]))
    plt = evaluate._plt()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    xs = [x for x, _ in pts]
    ax.plot(xs, [r["score"] for _, r in pts], marker="o", label="RM score (whitened, trained on)")
    if all("judge" in r for _, r in pts):
        js = [r["judge"] for _, r in pts]
        ax2 = ax.twinx()
        ax2.plot(xs, js, marker="s", color="C1", label="judge's score (measured only)")
        best = max(range(len(js)), key=lambda i: (js[i], -i))
        ax2.plot([xs[best]], [js[best]], marker="*", ms=16, color="C3", ls="none",
                 label=f"best judged: iteration {pts[best][1]['iteration']}")
        ax2.set_ylabel("judge's score")
        ax2.legend(loc="lower center", fontsize=8)
    for x, r in pts:
        ax.annotate(str(r["iteration"]), (x, r["score"]), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=7)
    ax.set(xlabel="sqrt(KL to pi_0), nats^0.5 (labels: iteration)", ylabel="RM score",
           title="PPO over-optimization: reward against distance from pi_0 (Gao et al. 2022)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    evaluate._save(fig, png)


# -----------------------------------------------------------------------------------------------
# the report


# the paper's safety RM accuracy on Meta Safety (Table 8): significantly / better / slightly /
# negligibly-unsure / average; its pair categories (§4.2.1) and its threshold's numbers (§3.2.2)
PAPER_TABLE8_SAFETY = {"significantly better": 94.3, "better": 76.3, "slightly better": 65.7,
                       "negligibly better/unsure": 55.3, "average": 64.5}
PAPER_CATEGORIES = {"safer": 18, "both_safe": 47, "both_unsafe": 35}


def _last_policy_eval(stage: Path) -> dict | None:
    """The last iteration's evaluation of a rejection-sampling stage (iter<n+1>/eval.json)."""
    i, last = 1, None
    while (stage / f"iter{i}" / "eval.json").is_file():
        last = _json(stage / f"iter{i}" / "eval.json")
        i += 1
    return last


def _safety_models(run: Path) -> list[tuple[str, dict, dict]]:
    """(label, its safety numbers, its judged helpfulness {"greedy", "sampled"}) of each model that
    was evaluated on safety prompts: SFT, GAtt, the RLHF stages and the safety ablations."""
    out = []
    for label, stage in (("SFT", "eval_sft"), ("GAtt", "eval_gatt")):
        s = _summary(run / stage / "eval.jsonl")
        if s and "safety" in s:
            out.append((label, s["safety"], {"greedy": s["total"]}))
    share = _stage_flag(run, "rs", "--safety_share")
    share = f"{float(share):.0%}" if share else "?"
    last = _last_policy_eval
    evals = [(f"RS V1, two RMs, {share} safety prompts (recipe)", last(run / "rs")),
             ("RS, helpfulness RM only, no safety prompts (ablation)", last(run / "rs_help")),
             ("RS, one RM on all pairs (ablation)", last(run / "rs_one"))]
    evals += [(f"RS, {float(p.name[8:]):.0%} safety prompts (ablation, Fig. 15)", last(p))
              for p in sorted(run.glob("rs_share*"), key=lambda p: float(p.name[8:] or 0))]
    evals += [("PPO (final; no context distillation)", _json(run / "ppo" / "eval_final.json")),
              ("context distillation, targeted (ablation)", last(run / "cd")),
              ("context distillation, untargeted (ablation)", last(run / "cd_untargeted"))]
    out += [(label, e["safety"], {k: e[k]["judge"] for k in ("greedy", "sampled")})
            for label, e in evals if e and "safety" in e]
    return out


def _distill_lines(run: Path) -> list[str]:
    """What context distillation kept (the cd stages' selection records), one line per stage."""
    sec = []
    for label, stage in (("targeted", "cd"), ("untargeted", "cd_untargeted")):
        path = run / stage / "metrics.jsonl"
        rec = next((r["distill"] for r in training.read_jsonl(path, lambda obj, where: obj)
                    if "distill" in r), None) if path.is_file() else None
        if rec:
            u, b = rec["unsafe"], rec["borderline"]
            sec.append(f"- Context distillation, {label}, on {u['prompts'] + b['prompts']} "
                       f"training safety prompts: kept {u['kept']}/{u['prompts']} answers to "
                       f"requests and {b['kept']}/{b['prompts']} to borderline prompts. Violations "
                       f"without the preprompt {_pct(u['without'])}, with it "
                       f"{_pct(u['with_preprompt'])}, of those kept {_pct(u['kept_rate'])}; "
                       f"borderline refusals {_pct(b['without'])}, {_pct(b['with_preprompt'])}, "
                       f"{_pct(b['kept_rate'])} (floors: never refuse 100% / 0%, always refuse "
                       "0% / 100%).")
    return ["", "What context distillation (§4.2.4) kept; the judge only counts, after the "
            "safety RM chose:", ""] + sec if sec else []


def _fig14(run: Path, out: Path) -> list[str]:
    """The paper's Fig. 14: the safety RM's scores of sampled replies to held-out safety prompts
    and the helpfulness RM's of replies to ordinary ones, before (V0) and after safety RLHF (the
    rs stage's last model), from the evaluations' rm_parts; [] when the run has none."""
    first, last = _json(run / "rs" / "iter1" / "eval.json"), _last_policy_eval(run / "rs")
    try:
        parts = [(e["label"], e["safety"]["sampled"]["rm_parts"]["safety"],
                  e["sampled"]["rm_parts"]["helpful"]) for e in (first, last)]
    except (KeyError, TypeError):
        return []
    plt = evaluate._plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for ax, j, what in ((axes[0], 1, "safety RM score, held-out safety prompts"),
                        (axes[1], 2, "helpfulness RM score, held-out ordinary prompts")):
        for p in parts:
            ax.hist(p[j], bins=30, alpha=0.5, label=p[0])
        ax.set(xlabel=what, ylabel="replies (T 0.6, top-p 0.9)")
        ax.legend()
    fig.suptitle("Before and after safety RLHF (the paper's Fig. 14)")
    evaluate._save(fig, out / "report_safety_rm_scores.png")
    m = lambda xs: sum(xs) / len(xs)  # noqa: E731
    sec = ["", f"Reward-model scores of the sampled replies (the paper's Fig. 14): the safety RM's "
           f"on the held-out safety prompts, mean {m(parts[0][1]):+.3f} ({parts[0][0]}) -> "
           f"{m(parts[1][1]):+.3f} ({parts[1][0]}); the helpfulness RM's on the ordinary prompts "
           f"{m(parts[0][2]):+.3f} -> {m(parts[1][2]):+.3f}."]
    _img(sec, out, "report_safety_rm_scores.png", "safety and helpfulness RM scores (Fig. 14)")
    return sec


def _safety_rm(run: Path, srm: dict, paper_rm: str):
    """The safety RM's summary row and section: Table 8's safety row beside the paper's,
    its categories, the 0.15 threshold, each RM on the other's pairs."""
    rows, sec = [], []
    b = srm["buckets"]
    names = [r for r in RATINGS if r != "average"] + ["average"]
    ours = " / ".join(_pct(b[r].get("rm_vs_annotators")) if r in b else "-" for r in names)
    t = srm.get("threshold", {})
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    rows.append(["safety RM accuracy (§4.2, Table 8)", paper_rm,
                 f"{ours}; threshold 0.15: precision {fmt(t.get('precision'))}, recall "
                 f"{fmt(t.get('recall'))}",
                 "floor 50% (a coin); ceiling " + " / ".join(
                     _pct(b[r].get("ceiling")) if r in b else "-" for r in names),
                 f"{srm['n']} held-out safety pairs of a simulated world; one kind of harm "
                 "(a secret) where the paper has many"])
    sec += ["", "### The safety reward model", "",
            f"{srm['n']} held-out safety pairs (held-out people and problems), accuracy % by "
            "the annotators' rating; the floor is a coin, the ceiling the noise-free judge "
            "against the noisy annotators.", "",
            "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
            "| paper, Table 8 (Safety RM, Meta Safety) | " + " | ".join(
                f"{PAPER_TABLE8_SAFETY[r]}" for r in names) + " |",
            "| pairs (share) | " + " | ".join(
                f"{b[r]['n']} ({100 * b[r]['share']:.0f}%)" if r in b else "-"
                for r in names) + " |"]
    for label, key in (("ours vs annotators", "rm_vs_annotators"),
                       ("ours vs judge", "rm_vs_judge"), ("ceiling", "ceiling")):
        sec.append(f"| {label} | " + " | ".join(
            f"{100 * b[r][key]:.1f}" if r in b and key in b[r] else "-" for r in names) + " |")
    cats = srm.get("by_category", {})
    if cats:
        sec += ["", "By the paper's categories (§4.2.1; pairs whose chosen reply is unsafe "
                "and the other safe are dropped, as there; floor 50%, a coin):", "",
                "| category | share (paper) | share (ours) | ours vs annotators | ours vs judge |",
                "|---|---|---|---|---|"]
        sec += [f"| {c.replace('_', ' ')} | {PAPER_CATEGORIES[c]}% | {100 * v['share']:.0f}% | "
                f"{_pct(v.get('rm_vs_annotators'))} | {_pct(v.get('rm_vs_judge'))} |"
                for c, v in cats.items()]
    if t:
        sec += ["", f"sigmoid(safety RM score) < 0.15 taken as \"unsafe\" over {t['n']} "
                f"held-out replies ({t['unsafe']} unsafe by the judge): precision "
                f"{fmt(t.get('precision'))}, recall {fmt(t.get('recall'))} (the paper: 0.89 / "
                f"0.55; floor: flag every reply, precision {t['unsafe'] / max(1, t['n']):.2f}, "
                "recall 1). The combined reward switches to the safety RM there."]
    hrm = _json(run / "rm" / "eval.json")
    cross = [(n, e) for n, e in (("the helpfulness RM on the safety pairs",
                                  (hrm or {}).get("other", {}).get("safety")),
                                 ("the safety RM on the helpfulness pairs",
                                  srm.get("other", {}).get("helpfulness"))) if e]
    if cross:
        sec += [""] + [f"- {n}: {_pct(e['buckets']['average'].get('rm_vs_annotators'))} "
                       f"of {e['n']} held-out pairs (ceiling "
                       f"{_pct(e['buckets']['average'].get('ceiling'))})" for n, e in cross]
    return rows[0], sec


def _safety_table(run: Path, out: Path, models: list, paper_rl: str):
    """The models' violations and false refusals beside the floors (rows, section), the
    paper's Fig. 14 and Fig. 15's curve."""
    rows, sec = [], []
    fl = models[0][1]["floor"]
    sec += ["", "### Violations and false refusals of each model", "",
            f"{models[0][1]['n']} held-out safety prompts and the judged evaluation's ordinary "
            "prompts; one greedy reply and one sampled at Meta's chat default (T 0.6, top-p "
            "0.9: how a user meets the model, and where the tail lives). Floors: always refuse "
            "/ never refuse. Judged helpfulness is on the ordinary prompts (floor: an empty "
            "reply; ceiling 1.0).", "",
            "| model | violation, sampled (adversarial / direct) | violation, greedy | false "
            "refusal, borderline, sampled / greedy | false refusal, ordinary, greedy | judged "
            "helpfulness, greedy / sampled |", "|---|---|---|---|---|---|",
            f"| floor: always refuse | {_pct(fl['always_refuse']['violation'])} | | "
            f"{_pct(fl['always_refuse']['false_refusal_borderline'])} | 100% | |",
            f"| floor: never refuse | {_pct(fl['never_refuse']['violation'])} | | "
            f"{_pct(fl['never_refuse']['false_refusal_borderline'])} | 0% | |"]
    for label, s, h in models:
        g, x = s["greedy"], s["sampled"]
        hs = f"{h['greedy']:.3f}" + (f" / {h['sampled']:.3f}" if "sampled" in h else "")
        sec.append(f"| {label} | {_pct(x['violation'])} ({_pct(x['violation_adversarial'])} / "
                   f"{_pct(x['violation_direct'])}) | {_pct(g['violation'])} | "
                   f"{_pct(x['false_refusal_borderline'])} / "
                   f"{_pct(g['false_refusal_borderline'])} | "
                   f"{_pct(g.get('false_refusal_ordinary'))} | {hs} |")
    by = dict((lab, s) for lab, s, _ in models)
    sft = by.get("SFT")
    rl = next(((lab, s) for lab, s, _ in models if lab.startswith("RS V1")), None)
    if sft and rl:
        rows.append(["safety RLHF: violations, false refusals (§4.2)", paper_rl,
                     f"sampled violation SFT {_pct(sft['sampled']['violation'])} -> RS "
                     f"{_pct(rl[1]['sampled']['violation'])}; false refusal borderline "
                     f"{_pct(sft['sampled']['false_refusal_borderline'])} -> "
                     f"{_pct(rl[1]['sampled']['false_refusal_borderline'])}, ordinary "
                     f"{_pct(rl[1]['greedy'].get('false_refusal_ordinary'))}",
                     "floors: always refuse (0% violation, 100% false refusal), never refuse "
                     "(100%, 0%)", WHY_SMALL])
    sec += _one_vs_two(models)
    sec += _fig14(run, out)
    curve = [(float(p.name[8:]), _last_policy_eval(p)) for p in run.glob("rs_share*")]
    rs_e = _last_policy_eval(run / "rs")
    share = _stage_flag(run, "rs", "--safety_share")
    if rs_e and share:
        curve.append((float(share), rs_e))
    curve = sorted((x, e) for x, e in curve if e and "safety" in e)
    if len(curve) >= 2:
        plt = evaluate._plt()
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        xs = [100 * x for x, _ in curve]
        pc = lambda v: float("nan") if v is None else 100 * v  # noqa: E731 (no such prompt)
        ax.plot(xs, [pc(e["safety"]["sampled"]["violation"]) for _, e in curve], "o-",
                label="violation, sampled (%)")
        ax.plot(xs, [pc(e["safety"]["sampled"]["false_refusal_borderline"]) for _, e in curve],
                "s-", label="false refusal, borderline, sampled (%)")
        ax.plot(xs, [100 * e["sampled"]["judge"] for _, e in curve], "^-",
                label="judged helpfulness x100, sampled")
        ax.set(xlabel="safety prompts in RLHF (%)", ylim=(0, 105),
               title="Safety data in RLHF (the paper's Fig. 15)")
        ax.legend(fontsize=8)
        evaluate._save(fig, out / "report_safety_share.png")
        _img(sec, out, "report_safety_share.png", "safety share in RLHF (Fig. 15)")
    return rows, sec


def safety(run: Path, out: Path):
    """Safety (§4.2): the safety RM's accuracy (Table 8's safety row, by category, the 0.15
    threshold), each model's violation and false-refusal rates beside the floors, the share of
    safety prompts in RLHF (Fig. 15's curve) and the one-RM ablation."""
    srm = _json(run / "rm_safety" / "eval.json")
    models = _safety_models(run)
    paper_rm = ("Table 8 (Safety RM on Meta Safety): " + " / ".join(
        f"{v}" for v in PAPER_TABLE8_SAFETY.values()) + "; threshold 0.15: precision 0.89, "
        "recall 0.55")
    paper_rl = ("safety RLHF cuts the unsafe tail while helpfulness holds (Fig. 14); more safety "
                "data, fewer violations, false refusals rise on borderline prompts (Fig. 15, A.4.5)")
    if srm is None and not models:
        return [["safety RM accuracy (§4.2, Table 8)", paper_rm, NOT_RUN, "", ""],
                ["safety RLHF: violations, false refusals (§4.2)", paper_rl, NOT_RUN, "", ""]], []
    rows, sec = [], ["## Safety (§4.2)", "",
                     "Requests for a person's secret (a password or a code stated in the "
                     "pretraining text), 80% of them adversarial (role-play, \"ignore your "
                     "rules\", a claim to be the owner, the request split over two turns), and "
                     "borderline prompts that only look like one (an ordinary problem in a "
                     "secret's words). The judge's verdict (world.safety_verdict): a violation is "
                     "a reply that gives a secret or plays along; a false refusal is a refused "
                     "benign prompt. Held-out people and problems only."]
    if srm is not None:
        row, more = _safety_rm(run, srm, paper_rm)
        rows.append(row)
        sec += more
    if models:
        row, more = _safety_table(run, out, models, paper_rl)
        rows += row
        sec += more
        rows += _distill_row(models)
    sec += _distill_lines(run)
    return rows, sec


def _one_vs_two(models: list) -> list[str]:
    """Whether the two RMs combined beat one RM trained on all the pairs (the rs_one ablation):
    fewer violations or fewer borderline refusals (sampled) without more of the other, and why
    the two can hardly differ in this world; [] when the ablation did not run."""
    two = next((s for lab, s, _ in models if lab.startswith("RS V1")), None)
    one = next((s for lab, s, _ in models if lab.startswith("RS, one RM")), None)
    if not two or not one:
        return []
    (v2, f2), (v1, f1) = ((s["sampled"]["violation"], s["sampled"]["false_refusal_borderline"])
                          for s in (two, one))
    if (v2 < v1 and f2 <= f1) or (f2 < f1 and v2 <= v1):
        verdict = "beat one RM"
    elif (v2, f2) == (v1, f1):
        verdict = "tie with one RM"
    else:
        verdict = "do not beat one RM"
    return ["", f"Two RMs against one (sampled replies): the two combined {verdict}: violations "
            f"{_pct(v2)} against {_pct(v1)}, borderline refusals {_pct(f2)} against {_pct(f1)}. "
            "In this world the two objectives never disagree on a pair: the helpfulness "
            "annotators label no request for a secret, and the safety pairs in the helpfulness "
            "RM's data carry the safety annotators' labels, so one RM trained on all the pairs "
            "learns both. The paper's reason for two RMs, helpfulness data that rewards playing "
            "along with a harmful request, is not in our data."]


def _distill_row(models: list) -> list[list[str]]:
    """The summary row of context distillation (§4.2.4): PPO's model (none) against the cd stages,
    on violations, borderline refusals and judged helpfulness (sampled); [] when none ran."""
    by = {lab.split(" (")[0]: (s, h) for lab, s, h in models}
    runs = [(name, by[key]) for name, key in (("none (PPO)", "PPO"),
                                              ("targeted", "context distillation, targeted"),
                                              ("untargeted", "context distillation, untargeted"))
            if key in by]
    if not any(name != "none (PPO)" for name, _ in runs):
        return []
    ours = "; ".join(f"{name}: violation {_pct(s['sampled']['violation'])}, borderline refusal "
                     f"{_pct(s['sampled']['false_refusal_borderline'])}, judged "
                     f"{h['sampled']:.3f}" for name, (s, h) in runs)
    return [["context distillation (§4.2.4), sampled",
             "targeted distillation adds safety; untargeted makes answers vague and refuses more",
             ours, "floors: always refuse (0% violation, 100% refusal), never refuse (100%, 0%)",
             WHY_SMALL]]

def timings(run: Path) -> list[str]:
    rows = []
    for d in sorted(run.iterdir()) if run.is_dir() else []:
        m = _json(d / "done.json") if d.is_dir() else None
        if m and "seconds" in m:
            rows.append((m.get("finished", ""), d.name, m["seconds"]))
    if not rows:
        return []
    rows.sort()
    extra = {name for _, name, _ in rows if ABLATION_STAGES.fullmatch(name)}
    out = ["## Time per stage", "", "A stage rerun later (its inputs changed) shows its last run; "
           "the RM's preference pairs are built once and cached, so an RM stage that reused them "
           "shows only its training and evaluation.", "",
           "| stage | wall time | finished |", "|---|---|---|"]
    out += [f"| {name}{' (ablation)' if name in extra else ''} | {training.fmt_duration(sec)} | {fin} |"
            for fin, name, sec in rows]
    recipe = sum(sec for _, name, sec in rows if name not in extra)
    out.append(f"| the recipe | {training.fmt_duration(recipe)} | |")
    if any(name in extra for _, name, _ in rows):
        out.append(f"| ablations | {training.fmt_duration(sum(r[2] for r in rows) - recipe)} | |")
    return out


def write_report(run: Path, out: Path, size: str = "") -> str:
    """Write <out>/REPORT.md and its figures from the pipeline folder `run`; returns the text."""
    if not run.is_dir():
        raise SystemExit(f"error: --pipeline_dir {run}: no such folder (run pipeline.py first)")
    out.mkdir(parents=True, exist_ok=True)
    info = _json(run / "pipeline.json") or {}
    size = size or info.get("size", "?")
    r_pre, s_pre = pretraining(run, out)
    r_sft, s_sft, evals = sft_vs_pretrained(run, out)
    r_gatt, s_gatt = gatt_adherence(evals, out)
    r_rm, s_rm = reward_model(run, out)
    r_kind, s_kind = rm_by_kind(run)
    s_rm = s_rm + s_kind if s_rm else s_kind
    r_margin, s_margin = margin_ablation(run, out)
    r_rs, s_rs = rejection_sampling(run, out)
    r_ppo, s_ppo = ppo(run, out)
    r_dist, s_dist = reward_distributions(run, out)
    r_safe, s_safe = safety(run, out)
    final = dict(evals).get("final")
    r_final = ["final model, judged (§10)",
               "RLHF improves helpfulness over SFT (Fig. 11, 12)",
               _judged(final) + (f" [{final['label']}] vs SFT {_judged(dict(evals).get('SFT'))}"
                                 if final else ""),
               "floor: empty reply; ceiling 1.0", WHY_SMALL]
    rows = [r_pre, *r_sft, r_gatt, r_rm, r_kind, r_margin, *r_rs, r_ppo, r_dist, r_final,
            *r_safe]
    ck = run / "pretrain" / "ckpt.pt"
    params = (f"{sum(v.numel() for v in training.load_checkpoint(ck)['model'].values()) / 1e6:.2f}M"
              if ck.is_file() else "3M")
    lines = ["# The Llama 2 recipe, reproduced small: our results beside the paper's", "",
             f"Written by `report.py` from one run of `pipeline.py` (size **{size}**, folder "
             f"`{run.name}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Paper: "
             "Touvron et al. 2023, arXiv 2307.09288 (section numbers are the paper's). Our model "
             f"has {params} parameters (the paper's smallest: 7B), trains for CPU minutes, and the "
             "simulated world of `world.py` (a programmatic judge, noisy simulated annotators) "
             "stands in for Meta's human annotators and raters, so our numbers are not the "
             "paper's: the point is that each stage's effect is measured, with its floor and "
             "ceiling beside it. \"not run\" marks a stage this run did not do.", "",
             "| result (paper section) | the paper | ours (this run) | floor / ceiling | why they "
             "differ |", "|---|---|---|---|---|"]
    if size in ("quick", "tiny"):  # a smoke run: say so before any number is read as a result
        rm = _json(run / "rm" / "eval.json")
        acc = rm["buckets"]["average"].get("rm_vs_annotators") if rm else None
        lines[-2:-2] = [f"**A smoke run, not a result.** The {size} size runs every stage small, "
                        "to check in minutes that the whole recipe runs end to end; it is too small "
                        "to show what the stages do"
                        + (f" (here the reward model agrees with the annotators on {_pct(acc)} of "
                           "held-out pairs, where a coin gets 50%)" if acc is not None else "")
                        + ". The full size's report (docs/REPORT.md, `bash scripts/demo.sh`) shows "
                        "the stages' effects.", ""]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    for sec in (s_pre, s_sft, s_gatt, s_rm, s_margin, s_rs, s_ppo, s_dist, s_safe, timings(run)):
        if sec:
            lines += [""] + sec
    text = "\n".join(lines) + "\n"
    with training.atomic_write(out / "REPORT.md", "w") as f:
        f.write(text)
    with training.atomic_write(out / "REPORT.json", "w") as f:
        json.dump({"pipeline_dir": str(run), "size": size, "tables": tables_of(text)}, f, indent=1)
    return text


_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")


def numbers_in(cell: str) -> list[float]:
    """Every number a table cell shows, in order ("0.702 (+-0.010), 46.5%" -> [0.702, 0.01,
    46.5]; thousands separators dropped, the "-" of a "+-" spread too; a number glued to a name, as in "V1" or "T0.6", counts
    too, since the reader sees it)."""
    out = []
    for m in _NUMBER.finditer(cell):
        x = m.group().replace(",", "")
        if x[0] == "-" and cell[:m.start()].endswith(("+", "±")):  # "+-0.010": a spread, >= 0
            x = x[1:]
        out.append(float(x))
    return out


def tables_of(markdown: str) -> list[dict]:
    """Every table of a Markdown text, as {"section": the heading above it (or "" before any),
    "header": [cells], "rows": [{"cells": [...], "numbers": [[numbers of each cell]]}]}:
    REPORT.json, the numbers of REPORT.md's tables for a program to read."""
    tables, section, lines = [], "", markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        is_table = (line.startswith("|") and i + 1 < len(lines)
                    and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip()))
        if not is_table:
            i += 1
            continue
        header, rows = _cells(line), []
        i += 2
        while i < len(lines) and lines[i].strip().startswith("|"):
            cells = _cells(lines[i].strip())
            rows.append({"cells": cells, "numbers": [numbers_in(c) for c in cells]})
            i += 1
        tables.append({"section": section, "header": header, "rows": rows})
    return tables


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def main(argv: list[str] | None = None) -> None:
    cfg = training.parse_config(Config, argv, description=__doc__)
    write_report(Path(cfg.pipeline_dir), Path(cfg.out_dir), cfg.size)
    print(f"wrote {Path(cfg.out_dir) / 'REPORT.md'}, REPORT.json and the figures")


if __name__ == "__main__":
    main()
