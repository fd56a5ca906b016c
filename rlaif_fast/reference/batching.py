"""Plain-Python rollout batching: pad, pack, unpack and balanced micro-batches.

This is the single source of truth for what ``rlaif_fast._C`` computes: the tests compare the C++
extension against it element by element, and ``rlaif_fast.batching`` runs it (wrapped into torch
tensors) as the pure-Python fallback when the extension is missing. It is written for clarity: plain
lists of ints in, plain lists out, one loop per idea.

Every function takes ``prompts`` / ``responses`` as lists of lists of Python ints (the public face
converts numpy arrays and tensors first) and raises ``ValueError`` naming the rollout index and the
offending value for anything a user can get wrong. The messages match the C++ ones word for word.
"""

from __future__ import annotations

import heapq


def check_ids(name: str, seqs: list[list[int]]) -> None:
    """Token ids must be ints >= 0: a negative id would index the embedding from the end, silently."""
    for i, seq in enumerate(seqs):
        for j, tok in enumerate(seq):
            if tok < 0:
                raise ValueError(
                    f"{name}[{i}][{j}] = {tok}: token ids must be >= 0; fix the tokenizer output"
                )


def check_prompts_nonempty(prompts: list[list[int]]) -> None:
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(
                f"prompts[{i}] is empty: every rollout needs at least one prompt token (e.g. BOS) to condition on"
            )


def truncate(prompt: list[int], response: list[int], i: int, max_len: int | None, truncation: str):
    """Apply ``truncation`` to rollout ``i``; return the (prompt, response) that fit ``max_len``."""
    n = len(prompt) + len(response)
    if max_len is None or n <= max_len:
        return prompt, response
    if truncation == "error":
        raise ValueError(
            f"rollout {i} has {n} tokens (prompt {len(prompt)} + response {len(response)}) > max_len={max_len}; "
            "pass truncation='left' or 'right', or a larger max_len"
        )
    if truncation == "left":
        # drop the oldest prompt tokens; the response is what the loss is about, so it is never cut here
        if len(response) >= max_len:
            raise ValueError(
                f"rollout {i} has a response of {len(response)} tokens >= max_len={max_len}: truncation='left' "
                "only drops prompt tokens and keeps at least one; use truncation='right' or a larger max_len"
            )
        return prompt[len(prompt) - (max_len - len(response)) :], response
    # "right": keep the first max_len tokens, cutting the end of the response (then of the prompt)
    kept_prompt = prompt[:max_len]
    return kept_prompt, response[: max_len - len(kept_prompt)]


def pad_rollouts(
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    padding_side: str = "left",
    max_len: int | None = None,
    truncation: str = "error",
) -> dict:
    """Pad ``prompt_i + response_i`` to one width; see ``rlaif_fast.batching.pad_rollouts``.

    Returns a dict of (B, L) nested lists ``input_ids``, ``attention_mask``, ``position_ids``,
    ``response_mask`` and (B,) lists ``prompt_lengths``, ``response_lengths`` (after truncation).
    L is the longest (truncated) rollout. Position ids count real tokens from 0; pads get 0.
    """
    check_ids("prompts", prompts)
    check_ids("responses", responses)
    check_prompts_nonempty(prompts)
    pairs = [truncate(p, r, i, max_len, truncation) for i, (p, r) in enumerate(zip(prompts, responses))]
    width = max(len(p) + len(r) for p, r in pairs)
    out = {k: [] for k in ("input_ids", "attention_mask", "position_ids", "response_mask")}
    for p, r in pairs:
        n = len(p) + len(r)
        pad = width - n
        row = {
            "input_ids": p + r,
            "attention_mask": [1] * n,
            "position_ids": list(range(n)),
            "response_mask": [0] * len(p) + [1] * len(r),
        }
        for key, values in row.items():
            fill = [pad_id if key == "input_ids" else 0] * pad
            out[key].append(fill + values if padding_side == "left" else values + fill)
    out["prompt_lengths"] = [len(p) for p, _ in pairs]
    out["response_lengths"] = [len(r) for _, r in pairs]
    return out


def pack_rollouts(prompts: list[list[int]], responses: list[list[int]]) -> dict:
    """Concatenate rollouts without padding (flash-attention varlen layout).

    Returns flat lists ``input_ids``, ``position_ids`` (restarting at 0 per rollout), ``response_mask``,
    ``cu_seqlens`` (B + 1 cumulative lengths starting at 0) and ``max_seqlen``.
    """
    check_ids("prompts", prompts)
    check_ids("responses", responses)
    check_prompts_nonempty(prompts)
    out = {"input_ids": [], "position_ids": [], "response_mask": [], "cu_seqlens": [0]}
    for p, r in zip(prompts, responses):
        n = len(p) + len(r)
        out["input_ids"] += p + r
        out["position_ids"] += list(range(n))
        out["response_mask"] += [0] * len(p) + [1] * len(r)
        out["cu_seqlens"].append(out["cu_seqlens"][-1] + n)
    out["max_seqlen"] = max(len(p) + len(r) for p, r in zip(prompts, responses))
    return out


def unpack(values: list, cu_seqlens: list[int]) -> list[list]:
    """The per-sequence pieces of a packed list: ``values[cu[i]:cu[i+1]]``."""
    return [values[a:b] for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]


# ----------------------------------------------------------------------------------- micro-batch plans
#
# Two candidate plans, each step mirrored one to one by csrc/balance.cpp; the cheaper one wins:
# - "global": all sequences, longest first, cut at the padded budget (count x longest <= max_tokens),
#   split up to a multiple of the rank count, micro-batches dealt to ranks by Karmarkar-Karp with equal
#   counts, then swaps of micro-batches and moves of single sequences. Neighbours of similar length
#   stay together: on 4096 long-tailed rollouts it pads ~2% where cutting each rank's share pads ~11%.
# - "per rank": sequences dealt to ranks by Karmarkar-Karp, each rank's share cut longest first,
#   counts equalized by splitting. Near-perfect balance, more padding; it wins on small batches,
#   where a few micro-batches are too coarse to balance.
# Cost of a plan: the padded tokens of its busiest rank (what the slowest rank computes), then steps.


def check_lengths(lengths: list[int], max_tokens: int) -> None:
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"lengths[{i}] = {n} is negative; lengths count tokens")
        if n > max_tokens:
            raise ValueError(
                f"lengths[{i}] = {n} > max_tokens={max_tokens}: one sequence must fit one micro-batch; "
                "raise max_tokens or truncate that rollout"
            )


def cut_by_length(lengths: list[int], members: list[int], max_tokens: int) -> list[list[int]]:
    """``members`` ordered by (length desc, index asc), cut greedily where count x longest would pass
    ``max_tokens``. On a sorted order the greedy cut gives the fewest micro-batches."""
    batches: list[list[int]] = []
    for i in sorted(members, key=lambda i: (-lengths[i], i)):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def split_to(batches: list[list[int]], target: int) -> list[list[int]]:
    """Split the micro-batch with the most sequences (first on ties) in two, in place of it, until there
    are ``target``; once every micro-batch holds one sequence, append empty ones. Splitting a
    length-sorted micro-batch never adds padding and never breaks the budget."""
    batches = [list(b) for b in batches]
    while len(batches) < target:
        j = max(range(len(batches)), key=lambda t: (len(batches[t]), -t)) if batches else 0
        if not batches or len(batches[j]) < 2:
            batches.append([])
            continue
        cut = (len(batches[j]) + 1) // 2
        batches[j : j + 1] = [batches[j][:cut], batches[j][cut:]]
    return batches


def karmarkar_karp(weights: list[int], k: int, equal_size: bool) -> list[list[int]]:
    """Largest differencing (Karmarkar & Karp 1982): item indices into ``k`` sets of balanced weight.

    Items sorted by (weight desc, index asc) start as partial solutions: one item each with k - 1
    empty sets, or with ``equal_size`` (len(weights) % k == 0) rows of k items, one per set, so that
    every set ends with the same count. The two partial solutions with the largest spread (heaviest -
    lightest set) merge, heaviest set of one with the lightest of the other, until one remains. Ties go
    to the oldest partial solution; sets stay sorted heaviest first (stable), so C++ and Python agree.
    """
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    if equal_size:
        rows = [[(weights[i], [i]) for i in order[r : r + k]] for r in range(0, len(order), k)]
    else:
        rows = [[(weights[i], [i])] + [(0, []) for _ in range(k - 1)] for i in order]
    heap = [(-(sets[0][0] - sets[-1][0]), uid, sets) for uid, sets in enumerate(rows)]
    heapq.heapify(heap)
    uid = len(heap)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        # extend the longer member list: a copy per merge would make this quadratic in the items
        merged = [
            (sa + sb, ma + mb if len(ma) < 64 else (ma.extend(mb) or ma))
            for (sa, ma), (sb, mb) in zip(a, reversed(b))
        ]
        merged.sort(key=lambda s: -s[0])
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), uid, merged))
        uid += 1
    return [sorted(members) for _, members in heap[0][2]]


def refine_swaps(weights: list[int], ranks: list[list[int]], max_rounds: int = 1000) -> list[list[int]]:
    """Swap one micro-batch of the heaviest rank with one of the lightest while that narrows their gap.

    The pair (a, b) with 0 < w[a] - w[b] < gap that brings the two loads closest wins (ties: smallest a,
    then b). Each swap strictly lowers the sum of squared loads, so the loop ends.
    """
    ranks = [list(r) for r in ranks]
    loads = [sum(weights[m] for m in r) for r in ranks]
    for _ in range(max_rounds):
        h = max(range(len(ranks)), key=lambda r: (loads[r], -r))
        lo = min(range(len(ranks)), key=lambda r: (loads[r], r))
        gap = loads[h] - loads[lo]
        best = None
        for a in ranks[h]:
            for b in ranks[lo]:
                d = weights[a] - weights[b]
                if 0 < d < gap and (best is None or (abs(gap - 2 * d), a, b) < best):
                    best = (abs(gap - 2 * d), a, b)
        if best is None:
            break
        _, a, b = best
        ranks[h][ranks[h].index(a)] = b
        ranks[lo][ranks[lo].index(b)] = a
        loads[h] -= weights[a] - weights[b]
        loads[lo] += weights[a] - weights[b]
    return [sorted(r) for r in ranks]


def move_score(lengths: list[int], src: list[int], pos: int, dst: list[int], gap: int, max_tokens: int):
    """Score of moving ``src[pos]`` into ``dst`` (lower is better): the two ranks' new spread plus the
    padding the move adds (may be negative), in tokens; None if it breaks the budget, empties ``src``
    or does not beat the current gap."""
    d = lengths[src[pos]]
    if len(src) < 2 or not 0 < d < gap:
        return None
    dst_max = lengths[dst[0]] if dst else 0
    new_max = max(dst_max, d)
    if (len(dst) + 1) * new_max > max_tokens:
        return None
    rest_max = lengths[src[1]] if pos == 0 else lengths[src[0]]
    added_pad = (
        (len(src) - 1) * rest_max - len(src) * lengths[src[0]] + (len(dst) + 1) * new_max - len(dst) * dst_max
    )
    score = abs(gap - 2 * d) + added_pad
    return score if score < gap else None


def refine_moves(lengths, batches, ranks, max_tokens: int, max_rounds: int = 1000) -> list[list[int]]:
    """Move single sequences from the heaviest rank's micro-batches into the lightest rank's while that
    narrows their gap by more than it adds padding. A source keeps at least one sequence, so every rank
    keeps its step count. Best move: the lowest (score, sequence index, destination micro-batch)."""
    batches = [list(b) for b in batches]
    loads = [sum(lengths[i] for m in r for i in batches[m]) for r in ranks]
    for _ in range(max_rounds):
        h = max(range(len(ranks)), key=lambda r: (loads[r], -r))
        lo = min(range(len(ranks)), key=lambda r: (loads[r], r))
        best = None
        for x in ranks[h]:
            for pos, s in enumerate(batches[x]):
                for y in ranks[lo]:
                    score = move_score(lengths, batches[x], pos, batches[y], loads[h] - loads[lo], max_tokens)
                    if score is not None and (best is None or (score, s, y) < best[:3]):
                        best = (score, s, y, x)
        if best is None:
            break
        _, s, y, x = best
        batches[x].remove(s)
        batches[y] = sorted(batches[y] + [s], key=lambda i: (-lengths[i], i))  # longest stays first
        loads[h] -= lengths[s]
        loads[lo] += lengths[s]
    return batches


def global_plan(lengths: list[int], max_tokens: int, k: int) -> list[list[list[int]]]:
    batches = cut_by_length(lengths, list(range(len(lengths))), max_tokens)
    batches = split_to(batches, -(-len(batches) // k) * k)
    weights = [sum(lengths[i] for i in mb) for mb in batches]
    ranks = refine_swaps(weights, karmarkar_karp(weights, k, equal_size=True))
    batches = refine_moves(lengths, batches, ranks, max_tokens)
    return [[batches[m] for m in r] for r in ranks]


def per_rank_plan(lengths: list[int], max_tokens: int, k: int) -> list[list[list[int]]]:
    plan = [cut_by_length(lengths, members, max_tokens) for members in karmarkar_karp(lengths, k, False)]
    steps = max(len(b) for b in plan)
    return [split_to(b, steps) for b in plan]


def padded_size(lengths: list[int], mb: list[int]) -> int:
    return len(mb) * lengths[mb[0]] if mb else 0


def balanced_microbatches(lengths: list[int], max_tokens: int, num_ranks: int) -> dict:
    """Split sequence indices into ``num_ranks`` x M micro-batches; see ``rlaif_fast.batching``.

    Returns ``microbatches`` (rank -> micro-batch -> indices; longest micro-batch first, empty ones
    last), ``rank_tokens`` (real tokens per rank), ``rank_padded_tokens`` (sum over the rank's
    micro-batches of count x longest) and ``strategy`` ("global" or "per_rank").
    """
    check_lengths(lengths, max_tokens)
    best = None
    for strategy, make in (("global", global_plan), ("per_rank", per_rank_plan)):
        plan = make(lengths, max_tokens, num_ranks)
        cost = (max(sum(padded_size(lengths, mb) for mb in r) for r in plan), len(plan[0]))
        if best is None or cost < best[0]:
            best = (cost, strategy, plan)
    _, strategy, plan = best
    order = lambda mb: (0, -lengths[mb[0]], mb[0]) if mb else (1, 0, 0)  # noqa: E731
    plan = [sorted(r, key=order) for r in plan]
    rank_padded = [sum(padded_size(lengths, mb) for mb in r) for r in plan]
    return {
        "microbatches": plan,
        "rank_tokens": [sum(lengths[i] for mb in r for i in mb) for r in plan],
        "rank_padded_tokens": rank_padded,
        "strategy": strategy,
    }
