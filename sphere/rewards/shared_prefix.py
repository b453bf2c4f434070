"""Score PRM rows that share a token prefix with the prefix computed once (issue 34).

The E candidates of one expansion (and the 2E of stage 3) are the same chat - system prompt, problem, every
earlier step - followed by a different last step. A causal PRM's output at a token depends only on the tokens
before it, so the shared part needs one forward pass, not E. Rows are tokenised whole as before (a step that
tokenises differently at its boundary - a BPE merge across the join - simply shares fewer tokens: the prefix is
the longest common TOKEN prefix actually present, never a re-tokenised text prefix), then:

- ``group_rows``: the rows' token trie cut into the groups that compute the fewest tokens (a group of k rows
  sharing n tokens saves (k-1)*n), so five siblings sharing 1,000 tokens are not merged with a row that
  shares only the problem, and a round's expansions (many nodes) become one group each.
- ``kv`` form (the default, ``scorer.shared_prefix: kv``): the groups' prefixes run as one right-padded batch
  with a KV cache; the candidates' continuations then run as one batch whose every row reads its group's
  cached prefix (``PrefixCache``: the prefix keys/values are stored once and gathered per layer, never kept
  for the continuation tokens, so the cache adds one copy of each prefix and nothing per candidate). Position
  ids continue each prefix; the 2-D mask hides each prefix's padding.
- ``packed`` form (``scorer.shared_prefix: packed``, the measured alternative): one sequence per group - the
  prefix followed by every continuation - with a 4-D mask (tree attention: a branch sees the prefix and
  itself) and position ids that restart after the prefix for every branch.

Both give the separate-scoring scores to float rounding (tests/test_prm_shared_prefix.py; max |diff| in
docs/prm_scoring.md).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """How many leading token ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def group_rows(rows: list[list[int]], min_shared: int = 16) -> list[tuple[int, list[int]]]:
    """Rows grouped by a shared token prefix: ``[(shared length, [row index, ...]), ...]``, every row once.

    The groups are nodes of the rows' token trie, chosen to compute the fewest tokens: a set of rows (a
    contiguous run of the sorted rows, whose common prefix n is the minimum of its neighbours' common
    prefixes) is either one group - it computes n once and each row's rest, plus ``min_shared`` for the group's
    own row in the batch - or splits where the rows part at token n, whichever costs less. A group of several
    rows shares at least ``min_shared`` tokens. So five siblings sharing 1,000 tokens stay one group beside a
    row of the same problem that shares only the problem, and the children of two parents two groups. A row
    alone is a group whose prefix is the whole row (no continuation: what separate scoring costs)."""
    if not rows:
        return []
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    adj = [common_prefix_len(rows[order[t]], rows[order[t + 1]]) for t in range(len(order) - 1)]
    lens = [len(rows[i]) for i in order]

    def best(lo: int, hi: int) -> tuple[int, list[tuple[int, list[int]]]]:
        if hi - lo == 1:
            return lens[lo] + min_shared, [(lens[lo], [order[lo]])]
        n = min(adj[lo: hi - 1])
        parts, start = [], lo
        for t in range(lo, hi - 1):
            if adj[t] == n:
                parts.append((start, t + 1))
                start = t + 1
        parts.append((start, hi))
        cost, groups = 0, []
        for a, b in parts:
            c, g = best(a, b)
            cost += c
            groups += g
        if n >= min_shared:
            whole = sum(lens[lo:hi]) - (hi - lo - 1) * n + min_shared
            if whole <= cost:
                return whole, [(n, order[lo:hi])]
        return cost, groups

    return best(0, len(order))[1]


class _PrefixLayer(DynamicLayer):
    """One layer's cached prefix keys/values ``[G, heads, P, d]``: ``update`` returns, for the continuation rows
    (``rows``: each row's group), the group's prefix followed by the new keys/values - and stores nothing, so
    the continuation tokens add no cache memory beyond one layer at a time."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.rows = keys, values, rows
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        k = torch.cat([self.keys.index_select(0, self.rows), key_states], dim=-2)
        v = torch.cat([self.values.index_select(0, self.rows), value_states], dim=-2)
        return k, v

    def get_seq_length(self) -> int:
        return int(self.keys.shape[-2])


class PrefixCache(Cache):
    """A read-only cache of prefixes: continuation rows gather their group's prefix at every layer."""

    def __init__(self, layers_kv: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor):
        super().__init__(layers=[_PrefixLayer(k, v, rows) for k, v in layers_kv])


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _kv_of(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


ProbFn = Callable[[torch.Tensor], torch.Tensor]


def _positive(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)[..., 1].cpu()


def probs_shared(model: Any, rows: list[list[int]], tag_id: int, *, device: torch.device, pad_id: int,
                 batch_size: int, mode: str = "kv", min_shared: int = 16,
                 stats: dict | None = None) -> list[list[float]]:
    """Positive-class probability at every ``tag_id`` token of each row, each shared prefix computed once.

    ``model(input_ids=, attention_mask=, position_ids=, past_key_values=, use_cache=)`` returns logits
    ``[B, T, labels]`` (or an output with ``.logits``). ``stats`` gets ``tokens_computed`` (padding included),
    ``tokens_shared`` (prefix tokens computed once instead of once per row), ``forward_passes``, ``groups``."""
    if mode not in ("kv", "packed"):
        raise ValueError(f"scorer.shared_prefix={mode!r}: allowed off | kv | packed")
    st = stats if stats is not None else {}
    for k in ("tokens_computed", "tokens_shared", "forward_passes", "groups"):
        st.setdefault(k, 0)
    res: list[list[float]] = [[] for _ in rows]
    groups = [(n, idx) for n, idx in group_rows(rows, min_shared)]
    st["groups"] += len(groups)
    st["tokens_shared"] += sum(n * (len(idx) - 1) for n, idx in groups)
    # Super-batches: groups in order, at most batch_size rows each (a larger group goes alone and its
    # continuations run in chunks of batch_size over the same cached prefix).
    batches: list[list[tuple[int, list[int]]]] = []
    for g in groups:
        if batches and sum(len(x[1]) for x in batches[-1]) + len(g[1]) <= batch_size:
            batches[-1].append(g)
        else:
            batches.append([g])
    run = _run_kv if mode == "kv" else _run_packed
    for sb in batches:
        run(model, rows, sb, res, tag_id, device, pad_id, batch_size, st)
    return res


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(map(len, seqs)))
    x = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    m = torch.zeros_like(x)
    for i, r in enumerate(seqs):
        if r:
            x[i, : len(r)] = torch.tensor(r)
            m[i, : len(r)] = 1
    return x, m


def _tags(row: list[int], tag_id: int, lo: int, hi: int) -> list[int]:
    return [j for j in range(lo, hi) if row[j] == tag_id]


def _run_kv(model, rows, sb, res, tag_id, device, pad_id, batch_size, st) -> None:
    from transformers import DynamicCache

    prefixes = [rows[idx[0]][:n] for n, idx in sb]
    x, m = _pad(prefixes, pad_id)
    st["tokens_computed"] += x.numel()
    st["forward_passes"] += 1
    with torch.inference_mode():
        cache = DynamicCache()
        p_pre = _positive(_logits(model(input_ids=x.to(device), attention_mask=m.to(device),
                                        past_key_values=cache, use_cache=True)))
        kv = _kv_of(cache)
        del cache
        width_p = x.shape[1]
        conts = [(g, i) for g, (n, idx) in enumerate(sb) for i in idx]
        for g, i in conts:  # the tags inside the prefix: read once from the prefix pass
            n = sb[g][0]
            res[i] = p_pre[g, _tags(rows[i], tag_id, 0, n)].tolist()
        todo = [(g, i) for g, i in conts if len(rows[i]) > sb[g][0]]
        todo.sort(key=lambda gi: -(len(rows[gi[1]]) - sb[gi[0]][0]))
        for s in range(0, len(todo), batch_size):
            chunk = todo[s: s + batch_size]
            tails = [rows[i][sb[g][0]:] for g, i in chunk]
            y, my = _pad(tails, pad_id)
            st["tokens_computed"] += y.numel()
            st["forward_passes"] += 1
            gi = torch.tensor([g for g, _ in chunk], dtype=torch.long)
            mask = torch.cat([m.index_select(0, gi), my], dim=1)
            pos = torch.tensor([sb[g][0] for g, _ in chunk], dtype=torch.long)[:, None] + \
                torch.arange(y.shape[1])[None, :]
            pc = PrefixCache(kv, gi.to(device))
            p = _positive(_logits(model(input_ids=y.to(device), attention_mask=mask.to(device),
                                        position_ids=pos.to(device), past_key_values=pc, use_cache=True)))
            assert mask.shape[1] == width_p + y.shape[1]
            for r, (g, i) in enumerate(chunk):
                n = sb[g][0]
                res[i] = res[i] + p[r, [j - n for j in _tags(rows[i], tag_id, n, len(rows[i]))]].tolist()


def _run_packed(model, rows, sb, res, tag_id, device, pad_id, batch_size, st) -> None:
    """One sequence per group: prefix, then each branch; a 4-D mask lets a branch see the prefix and itself."""
    packs, spans = [], []
    for n, idx in sb:
        seq = list(rows[idx[0]][:n])
        pos = list(range(n))
        branch = [0] * n  # 0 = the prefix, b + 1 = branch b
        sp = []
        for b, i in enumerate(idx):
            tail = rows[i][n:]
            sp.append((i, len(seq)))
            seq += tail
            pos += list(range(n, n + len(tail)))
            branch += [b + 1] * len(tail)
        packs.append((seq, pos, branch, n))
        spans.append(sp)
    width = max(len(p[0]) for p in packs)
    B = len(packs)
    x = torch.full((B, width), pad_id, dtype=torch.long)
    pos_t = torch.zeros((B, width), dtype=torch.long)
    allowed = torch.zeros((B, 1, width, width), dtype=torch.bool)
    for r, (seq, pos, branch, n) in enumerate(packs):
        L = len(seq)
        x[r, :L] = torch.tensor(seq)
        pos_t[r, :L] = torch.tensor(pos)
        br = torch.tensor(branch)
        causal = torch.tril(torch.ones((L, L), dtype=torch.bool))
        same = (br[:, None] == br[None, :]) | (br[None, :] == 0)
        allowed[r, 0, :L, :L] = causal & same
        allowed[r, 0, L:, 0] = True  # padding queries see one key (no all-masked row); never read
    st["tokens_computed"] += x.numel()
    st["forward_passes"] += 1
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    with torch.inference_mode():
        p = _positive(_logits(model(input_ids=x.to(device), attention_mask=mask.to(device),
                                    position_ids=pos_t.to(device))))
    for r, ((seq, _pos, _br, n), sp) in enumerate(zip(packs, spans)):
        for i, start in sp:
            row = rows[i]
            got = [int(j) for j in _tags(row, tag_id, 0, n)]
            vals = p[r, got].tolist()
            tail_tags = [start + (j - n) for j in _tags(row, tag_id, n, len(row))]
            res[i] = vals + p[r, tail_tags].tolist()
