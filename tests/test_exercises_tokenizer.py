"""Notebook 01's exercise checks (minigpt/exercises/tokenizer.py) against the worked solutions."""

from collections import Counter

import pytest
from conftest import assert_rejected, load_solutions, unsolved

from minigpt import tokenizer as tk
from minigpt.exercises import UNSOLVED_HINT
from minigpt.exercises import tokenizer as ex

solutions = load_solutions("tokenizer")


# --- Exercise 1: one BPE merge ----------------------------------------------------------------


def merge_overlapping(ids, pair, new_id):
    """Replaces the pair at every position, overlaps included: [1, 1, 1] -> [9, 9]."""
    out = [new_id if (a, b) == pair else a for a, b in zip(ids, ids[1:])]
    return out if out else list(ids)


def merge_missing_the_end(ids, pair, new_id):
    """The loop stops one short, so a pair in the last two places survives."""
    out, i = [], 0
    while i < len(ids) - 1:
        if (ids[i], ids[i + 1]) == pair and i + 2 < len(ids):
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out + ids[i:]


def merge_first_only(ids, pair, new_id):
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == pair:
            return ids[:i] + [new_id] + ids[i + 2 :]
    return list(ids)


def merge_from_the_right(ids, pair, new_id):
    return list(reversed(solutions.merge_pair(list(reversed(ids)), pair[::-1], new_id)))


def test_merge_pair_accepts_the_solution_and_a_tuple():
    assert ex.check_merge_pair(solutions.merge_pair)
    assert ex.check_merge_pair(lambda ids, pair, new_id: tuple(solutions.merge_pair(ids, pair, new_id)))


@pytest.mark.parametrize("wrong, words", [
    (merge_overlapping, ("too often",)),
    (merge_missing_the_end, ("end",)),
    (merge_first_only, ("every occurrence",)),
    (merge_from_the_right, ("right",)),
])
def test_merge_pair_rejects_typical_mistakes_without_the_answer(wrong, words):
    verdict = ex.check_merge_pair(wrong)
    assert_rejected(verdict, [9, 1], [7, 7, 3], [7, 3, 7], [4, 5], [9, 9])
    for word in words:
        assert word in verdict.hint


def test_merge_pair_rejects_the_template():
    verdict = ex.check_merge_pair(unsolved)
    assert not verdict and verdict.hint == UNSOLVED_HINT


# --- Exercise 2: the next merge ---------------------------------------------------------------


def most_common_pair(ids):
    """Ties go to the pair seen first, not the smallest."""
    return Counter(zip(ids, ids[1:])).most_common(1)[0][0]


def largest_tied_pair(ids):
    counts = Counter(zip(ids, ids[1:]))
    return max(counts, key=lambda pair: (counts[pair], pair))


def rarest_pair(ids):
    counts = Counter(zip(ids, ids[1:]))
    return min(counts, key=lambda pair: (counts[pair], pair))


def test_next_pair_accepts_the_solution():
    assert ex.check_next_pair(solutions.next_pair)
    assert ex.check_next_pair(lambda ids: list(solutions.next_pair(ids)))


@pytest.mark.parametrize("wrong, word", [
    (most_common_pair, "smallest"),
    (largest_tied_pair, "smallest"),
    (rarest_pair, "more often"),
    (lambda ids: bytes(solutions.next_pair(ids)), "bytes"),
])
def test_next_pair_rejects_typical_mistakes_without_the_answer(wrong, word):
    verdict = ex.check_next_pair(wrong)
    answers = [solutions.next_pair(list(text.encode())) for text in ex._NEXT_PAIR_TEXTS]
    assert_rejected(verdict, *answers)
    assert word in verdict.hint


def test_next_pair_matches_the_package_trainer_and_rejects_the_template():
    for text in ex._NEXT_PAIR_TEXTS:
        assert solutions.next_pair(list(text.encode())) == ex._package_first_merge(text)
    verdict = ex.check_next_pair(unsolved)
    assert not verdict and verdict.hint == UNSOLVED_HINT


# --- Exercise 3: encoding by rank -------------------------------------------------------------


def leftmost_first(piece, ranks):
    """Joins the leftmost joinable pair, whatever its rank."""
    parts = [bytes([b]) for b in piece]
    joined = True
    while joined:
        joined = False
        for i in range(len(parts) - 1):
            if parts[i] + parts[i + 1] in ranks:
                parts[i : i + 2] = [parts[i] + parts[i + 1]]
                joined = True
                break
    return [ranks[part] for part in parts]


def longest_match(piece, ranks):
    """Greedy longest token from the left: not how BPE encodes."""
    ids, i = [], 0
    while i < len(piece):
        j = max(j for j in range(i + 1, len(piece) + 1) if piece[i:j] in ranks)
        ids.append(ranks[piece[i:j]])
        i = j
    return ids


def one_join_only(piece, ranks):
    parts = [bytes([b]) for b in piece]
    candidates = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
    if candidates:
        _, i = min(candidates)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[part] for part in parts]


def ties_to_the_right(piece, ranks):
    parts = [bytes([b]) for b in piece]
    while True:
        candidates = [(ranks[a + b], -i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not candidates:
            return [ranks[part] for part in parts]
        _, i = min(candidates)
        parts[-i : -i + 2] = [parts[-i] + parts[-i + 1]]


def test_encode_by_rank_accepts_the_solution_and_matches_the_package():
    assert ex.check_encode_by_rank(solutions.encode_by_rank)
    for _, piece, ranks in ex._encode_cases():
        assert solutions.encode_by_rank(piece, ranks) == tk.bpe_merge(piece, ranks)


@pytest.mark.parametrize("wrong, word", [
    (leftmost_first, "LOWEST"),
    (longest_match, "LOWEST"),
    (one_join_only, "too early"),
    (ties_to_the_right, "leftmost"),
    (lambda piece, ranks: [bytes([b]) for b in piece], "bytes"),
    (lambda piece, ranks: [ranks[bytes([b])] for b in piece], "too early"),
])
def test_encode_by_rank_rejects_typical_mistakes_without_the_answer(wrong, word):
    verdict = ex.check_encode_by_rank(wrong)
    answers = [tk.bpe_merge(piece, ranks) for _, piece, ranks in ex._encode_cases()]
    assert_rejected(verdict, *answers)
    assert word in verdict.hint


def test_encode_by_rank_rejects_the_template():
    verdict = ex.check_encode_by_rank(unsolved)
    assert not verdict and verdict.hint == UNSOLVED_HINT


# --- Exercise 4: a safe chat prompt -----------------------------------------------------------


def format_forgeable(tok, messages):
    """Encodes the whole template with every special allowed: user text can forge control tokens."""
    return tok.encode(ex._template(messages), allowed_special="all")


def format_as_plain_text(tok, messages):
    """The safe alternative: the content encoded as ordinary text, never as control tokens."""
    start, sep, end = (tok.special_tokens[n] for n in ("<|im_start|>", "<|im_sep|>", "<|im_end|>"))
    ids = []
    for role, content in messages:
        ids += [start] + tok.encode_ordinary(role) + [sep] + tok.encode_ordinary(content) + [end]
    return ids + [start] + tok.encode_ordinary("assistant") + [sep]


def format_without_the_opener(tok, messages):
    opener = tok.encode("<|im_start|>assistant<|im_sep|>", allowed_special="all")
    return solutions.format_chat(tok, messages)[: -len(opener)]


def format_without_separators(tok, messages):
    sep = tok.special_tokens["<|im_sep|>"]
    return [i for i in solutions.format_chat(tok, messages) if i != sep]


def test_format_chat_accepts_refusing_and_plain_text():
    assert ex.check_format_chat(solutions.format_chat)
    assert ex.check_format_chat(format_as_plain_text)


def test_format_chat_solution_refuses_forged_control_tokens():
    tok = ex.course_tokenizer()
    with pytest.raises(ValueError):
        solutions.format_chat(tok, [("user", ex._FORGED_CONTENT)])


@pytest.mark.parametrize("wrong, word", [
    (format_forgeable, "control tokens"),
    (format_without_the_opener, "assistant"),
    (format_without_separators, "control tokens"),
    (lambda tok, messages: ex._template(messages), "list"),
])
def test_format_chat_rejects_typical_mistakes_without_the_answer(wrong, word):
    verdict = ex.check_format_chat(wrong)
    tok = ex.course_tokenizer()
    answers = [tok.encode(ex._template(m), allowed_special="all") for m in ex._BENIGN_CHATS]
    assert_rejected(verdict, *answers)
    assert word in verdict.hint


def test_format_chat_rejects_the_template():
    verdict = ex.check_format_chat(unsolved)
    assert not verdict and verdict.hint == UNSOLVED_HINT
