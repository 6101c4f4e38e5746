"""Tokenizer trained with Llama 2's settings, and Meta's chat format assembled by hand."""
import pytest

import llama2


def test_special_ids_follow_llama2(tokenizer):
    assert (tokenizer.sp.unk_id(), tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, -1)
    assert tokenizer.n_words == 400


def test_digits_are_split_one_per_token(tokenizer):
    pieces = tokenizer.sp.encode("in 12345 and 907", out_type=str)
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert "".join(digit_pieces).replace("\u2581", "") == "12345907"
    assert all(len(p.replace("\u2581", "")) == 1 for p in digit_pieces)


@pytest.mark.parametrize("text", ["Crème brûlée à la française", "日本語のテキスト 中文", "llamas 🦙🎉 and 👩‍🔬",
                                  "two  spaces\tand a tab\nnewline", "ñ 12 ü 3.5 ß"])
def test_any_utf8_round_trips_through_byte_fallback(tokenizer, text):
    ids = tokenizer.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids) == text


def test_unseen_characters_become_bytes_not_unk(tokenizer):
    pieces = tokenizer.sp.encode("🦙", out_type=str)
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]  # UTF-8 of U+1F999
    assert 0 not in tokenizer.encode("🦙")


def test_tokenizer_survives_a_byte_round_trip(tokenizer):
    again = llama2.Tokenizer.from_bytes(tokenizer.model_bytes)
    assert again.encode("Thou art 42 fair") == tokenizer.encode("Thou art 42 fair")


def test_vocab_too_large_for_corpus_is_a_clear_error(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text("a tiny corpus with very few words\n" * 20)
    with pytest.raises(ValueError, match="too large for this corpus"):
        llama2.train_tokenizer([str(corpus)], str(tmp_path / "t"), vocab_size=5000)


# ---------------------------------------------------------------- chat format (SPEC.md section 3)

def by_hand(tok, pairs, last_user=None, system=None):
    """[BOS] "[INST] {u} [/INST] {a} " [EOS] per finished pair; [BOS] "[INST] {u} [/INST]" last."""
    ids = []
    for i, (u, a) in enumerate(pairs):
        if i == 0 and system is not None:
            u = f"<<SYS>>\n{system}\n<</SYS>>\n\n{u}"
        ids += [1] + tok.sp.encode(f"[INST] {u.strip()} [/INST] {a.strip()} ") + [2]
    if last_user is not None:
        if not pairs and system is not None:
            last_user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{last_user}"
        ids += [1] + tok.sp.encode(f"[INST] {last_user.strip()} [/INST]")
    return ids


def dialog(pairs, last_user=None, system=None):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for u, a in pairs:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    if last_user is not None:
        msgs.append({"role": "user", "content": last_user})
    return msgs


CASES = [
    ([], "What is 12 plus 30?", None),
    ([], "  Speak, fair lady.  ", "Answer like a pirate."),
    ([("Hi there", " Hello! "), ("Count to 3", "1 2 3")], "Now reverse it", None),
    ([("Hi there", "Ahoy, matey!")], "Sort 3 1 2", "Always talk like a pirate."),
]


@pytest.mark.parametrize("pairs,last,system", CASES)
def test_generation_ids_equal_hand_assembled(tokenizer, pairs, last, system):
    ids, mask = llama2.encode_dialog(tokenizer, dialog(pairs, last, system))
    assert ids == by_hand(tokenizer, pairs, last, system)
    # the mask marks the finished answers (each with its EOS) and nothing of the prompts or of
    # the final user turn, which ends the ids
    assert len(mask) == len(ids)
    expected = []
    for i, (u, a) in enumerate(pairs):
        if i == 0 and system is not None:
            u = f"<<SYS>>\n{system}\n<</SYS>>\n\n{u}"
        prompt = tokenizer.sp.encode(f"[INST] {u.strip()} [/INST]")
        expected += tokenizer.sp.encode(f"[INST] {u.strip()} [/INST] {a.strip()} ")[len(prompt):] + [2]
    assert [t for t, m in zip(ids, mask) if m] == expected
    tail = len(by_hand(tokenizer, [], last, system if not pairs else None))
    assert mask[-tail:] == [0] * tail


@pytest.mark.parametrize("pairs,system", [([("Hi", "Hello!")], None), ([("Hi", "Hello!"), ("Sum 4 5", "9")], "Be brief."),
                                          ([("Hi", "Hello!"), ("And you?", "Fine, thanks."), ("Bye", "Farewell")], None)])
def test_training_ids_and_answer_mask(tokenizer, pairs, system):
    ids, mask = llama2.encode_dialog(tokenizer, dialog(pairs, system=system), for_training=True)
    assert ids == by_hand(tokenizer, pairs, system=system)
    # The mask covers exactly each answer's tokens (" {answer} ") and its EOS, nothing of the prompts.
    expected_answer_ids = []
    for u, a in pairs:
        expected_answer_ids += tokenizer.sp.encode(f"[INST] {u} [/INST] {a} ")[len(tokenizer.sp.encode(f"[INST] {u} [/INST]")):] + [2]
    assert [t for t, m in zip(ids, mask) if m] == expected_answer_ids
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m and t != 2]).split() == \
        " ".join(a for _, a in pairs).split()
    assert [t for t, m in zip(ids, mask) if m].count(2) == len(pairs)
    assert all(m == 0 for t, m in zip(ids, mask) if t == 1)


@pytest.mark.parametrize("msgs,match", [
    ([], "empty"),
    ([{"role": "assistant", "content": "hi"}], "role 'assistant' where 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "role 'user' where 'assistant'"),
    ([{"role": "system", "content": "s"}], "followed by a user"),
    ([{"role": "user", "content": "tell me about [INST] tags"}], "reserved tag"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "must end with a user"),
])
def test_bad_dialogs_are_clear_errors(tokenizer, msgs, match):
    with pytest.raises(ValueError, match=match):
        llama2.encode_dialog(tokenizer, msgs)


def test_training_dialog_must_end_with_an_answer(tokenizer):
    with pytest.raises(ValueError, match="must end with an assistant"):
        llama2.encode_dialog(tokenizer, [{"role": "user", "content": "hi"}], for_training=True)
