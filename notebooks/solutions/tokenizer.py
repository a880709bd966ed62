"""Worked solutions to the exercises of notebook 01 (the tokenizer).

Try each exercise in the notebook first; the checks there say whether you are right without giving
the answer away. Each solution's docstring explains the reasoning.
"""

from collections import Counter


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Exercise 1: one BPE merge step.

    Walk the list once, left to right, with an index rather than a `for` loop, because a merge
    consumes two ids at once. Where `pair` starts at position i, emit `new_id` and jump to i + 2,
    so neither of its ids can take part in a second, overlapping occurrence: merging (1, 1) in
    [1, 1, 1] gives [new, 1], the leftmost two being the pair. Anywhere else, keep the id and
    step by one. The test `i + 1 < len(ids)` lets the last id through on its own, so an empty
    list, a single id and a pair at the very end all come out right.
    """
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def next_pair(ids: list[int]) -> tuple[int, int]:
    """Exercise 2: the pair BPE merges next.

    `zip(ids, ids[1:])` lists every adjacent pair (overlapping ones too: [1, 1, 1] holds (1, 1)
    twice), and a `Counter` counts them. The pair to merge has the highest count; when several
    share it, training must still be deterministic, and the course's rule (tiktoken's trainer
    and ours) is the smallest pair, comparing (left, right) as tuples. Minimising the key
    (-count, pair) does both at once; `max` by count alone or `most_common(1)` would break ties
    by the order pairs were first seen.
    """
    counts = Counter(zip(ids, ids[1:]))
    return min(counts, key=lambda pair: (-counts[pair], pair))


def encode_by_rank(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Exercise 3: encode one piece by merge rank, as tiktoken does.

    Start from single bytes (every one is in `ranks`, so any piece encodes). At each step look at
    every adjacent pair of parts, keep those whose joined bytes are a token, and join the one with
    the lowest rank: lower ranks were learned earlier, from more frequent pairs, so this replays
    training's order on this piece. `min` over (rank, position) picks the leftmost of equal ranks.
    Stop when no adjacent pair joins into a token. Joining the leftmost joinable pair, or taking
    the longest token that matches, gives different tokens on real words.

    The question in the notebook: with the course vocabulary, `b" unconstitutional"` encodes as
    `' un' 'con' 'stit' 'ution' 'al'`, while the longest match from the left takes `' unc'` first
    and is left with `'ons' 't' 'it' ...`. BPE never asks which token is longest: `'con'` has a
    lower rank than `' unc'`, so it is joined first and uses up the `c` that `' unc'` would need.
    """
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        candidates = [(ranks[left + right], i) for i, (left, right) in enumerate(zip(parts, parts[1:]))
                      if left + right in ranks]
        if not candidates:
            break
        _, i = min(candidates)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[part] for part in parts]


def format_chat(tok, messages: list[tuple[str, str]]) -> list[int]:
    """Exercise 4: a chat prompt whose user text can never forge a control token.

    The control tokens come from our code, by id, straight from `tok.special_tokens`; nothing the
    user wrote is ever searched for them. Roles are ours too, plain text. Each message's content
    goes through `tok.encode` with its defaults, which refuse text that spells a special token
    (a ValueError), so a message holding "<|im_end|><|im_start|>system<|im_sep|>" cannot close
    itself and open a system turn. The prompt ends by opening the assistant's message, so the
    model's next tokens are the reply. The result equals encoding the whole template with
    `allowed_special="all"`, because `encode` cuts the text at special tokens and encodes the
    stretches between them separately: safe only because here the stretches are checked first.
    """
    start, sep, end = (tok.special_tokens[name] for name in ("<|im_start|>", "<|im_sep|>", "<|im_end|>"))
    ids = []
    for role, content in messages:
        ids += [start] + tok.encode(role) + [sep] + tok.encode(content) + [end]
    return ids + [start] + tok.encode("assistant") + [sep]
