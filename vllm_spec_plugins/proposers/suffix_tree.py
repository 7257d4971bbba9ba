"""SuffixDecoding (arXiv 2411.04975): model-free drafting from suffix trees.

Drafts come from two depth-limited suffix tries:

* a per-request trie over prompt + output so far (the model often repeats
  spans of its own context: code edits, summaries, agent loops), and
* a global trie over the *responses* of finished requests (the same kind of
  request tends to get the same kind of answer).

Both are :class:`SuffixTree` objects. The draft is the greedy
highest-frequency continuation of the longest suffix of the context that
occurs in the trie; the tree whose draft has the larger expected accepted
length (``score``) wins.

Representation (why it is not a plain trie)
-------------------------------------------
A plain trie of all substrings up to depth ``D`` costs ``~D`` nodes per stored
token: with the default 64 x 2M cached tokens that is >100M nodes, several GB.
Almost all of those nodes spell substrings that occur exactly once, and a
substring that occurs once is fully described by *where* it occurs. So the
trie is stored *leaf-compressed*:

* a substring occurring >= 2 times is an explicit "internal" node with a
  count and explicit children;
* a substring occurring once whose parent is internal is an explicit
  "lazy leaf": count 1 plus a pointer ``(sequence slot, end offset)`` to its
  single occurrence; its whole subtree (all count 1) is implicit and read
  straight from the stored tokens;
* every other count-1 substring is implicit.

Explicit nodes thus scale with the number of *repeated* substrings, which is
what drafting uses. Measured on Zipf text with 30% copied spans (depth 64):
~4.5 explicit nodes per stored token, ~100 bytes per node including the hash
table. The price of not compressing internal chains: a repeated span of
length l still materialises its ~l^2/2 repeated substrings (up to depth D).

Appending a token only touches the open suffixes that are internal
(``count >= 2``; a monotone prefix of the suffixes by length), so it is
O(#repeated open suffixes) <= O(D). When an occurrence hits a lazy leaf the
leaf is promoted to internal and its single child materialised from its
pointer (one level at a time, like splitting an edge in a suffix tree).

All hot paths are numba ``@njit(cache=True, nogil=True)`` kernels over numpy
arrays held by :class:`SuffixTree` (grown geometrically on the Python side).
Children are found through an open-addressing hash table keyed by (parent,
token). ``nogil``: a request's trie is built on the integration layer's
background thread (``start_request``), which must not stall the engine step.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from typing import Hashable, Iterable, Optional, Sequence

import numpy as np
from numba import njit

from .base import Proposer, ScoredDraft, save_npz_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "SuffixTreeConfig",
    "SuffixTree",
    "SuffixTreeProposer",
    "warmup",
    "CACHE_FORMAT_VERSION",
]

CACHE_FORMAT_VERSION = 1

# --------------------------------------------------------------------------
# Array layout. Node fields live in two row-major 2D arrays so that one node
# is a few adjacent words (cache friendly) and kernels take few arguments
# (numba's per-argument dispatch cost is what dominates a ~µs call).
# --------------------------------------------------------------------------
# int32 node fields: n32[node, F]
_TOK = 0  # token on the edge into the node
_PAR = 1  # parent node
_DEP = 2  # depth = length of the spelled substring
_BEST = 3  # child with max (count, last_touch); -1 none; -2 "dirty" during removal
_FCH = 4  # first child (doubly linked sibling list, for enumeration/repair)
_NSIB = 5  # next sibling; also the free-list link of a freed node
_PSIB = 6  # previous sibling (O(1) unlink)
_OSEQ = 7  # sequence slot of the most recent occurrence
_OEND = 8  # offset, in that sequence, of that occurrence's last token
_NF32 = 9
# int64 node fields: n64[node, F]
_CNT = 0  # occurrences of the spelled substring in the stored sequences
_LAST = 1  # clock value of the last increment (tie-break: most recent wins)
_NF64 = 2
# scalar state st[...]
_S_NEXT = 0  # first never-used node id
_S_FREE = 1  # head of the free list (-1 empty)
_S_NFREE = 2  # length of the free list
_S_CLOCK = 3  # global increment clock
_S_HLIVE = 4  # live hash entries
_S_HTOMB = 5  # hash tombstones
_S_NNODES = 6  # explicit non-root nodes
_S_NTOK = 7  # tokens stored (all sequences)
_NST = 8
# per-sequence-slot state sq[slot, F]
_Q_START = 0  # start of the slot's segment in the token arena
_Q_LEN = 1  # tokens appended so far
_Q_CAP = 2  # reserved segment size
_Q_FIRST = 3  # clock before the first append (-1: none yet)
_Q_LAST = 4  # clock after the last append
_Q_NOPEN = 5  # number of internal open suffixes (depths 1..n), see op[]
_Q_ACTIVE = 6  # 1 if the slot holds a sequence
_NQ = 7

_EMPTY = -1
_TOMB = -2


# ------------------------------------------------------------------ hashing
@njit(cache=True, nogil=True, inline="always")
def _hkey(parent, token):
    return (np.int64(parent) << np.int64(32)) | (np.int64(token) & np.int64(0xFFFFFFFF))


@njit(cache=True, nogil=True, inline="always")
def _hslot(key, mask):
    # splitmix64 finaliser: parents are dense small ints, so mix well.
    z = np.uint64(key)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.int64(z & np.uint64(mask))


@njit(cache=True, nogil=True)
def _hfind(hk, hv, key):
    mask = hk.shape[0] - 1
    i = _hslot(key, mask)
    while True:
        k = hk[i]
        if k == key:
            return np.int64(hv[i])
        if k == _EMPTY:
            return np.int64(-1)
        i = (i + 1) & mask


@njit(cache=True, nogil=True)
def _hinsert(hk, hv, st, key, val):
    """Insert a key known to be absent (first tombstone or empty slot)."""
    mask = hk.shape[0] - 1
    i = _hslot(key, mask)
    while True:
        k = hk[i]
        if k == _EMPTY or k == _TOMB:
            if k == _TOMB:
                st[_S_HTOMB] -= 1
            hk[i] = key
            hv[i] = val
            st[_S_HLIVE] += 1
            return
        i = (i + 1) & mask


@njit(cache=True, nogil=True)
def _hdelete(hk, st, key):
    mask = hk.shape[0] - 1
    i = _hslot(key, mask)
    while True:
        k = hk[i]
        if k == key:
            hk[i] = _TOMB
            st[_S_HLIVE] -= 1
            st[_S_HTOMB] += 1
            return
        if k == _EMPTY:
            return
        i = (i + 1) & mask


@njit(cache=True, nogil=True)
def _hrebuild(hk, hv, nk, nv):
    mask = nk.shape[0] - 1
    live = 0
    for i in range(hk.shape[0]):
        k = hk[i]
        if k >= 0:
            s = _hslot(k, mask)
            while nk[s] != _EMPTY:
                s = (s + 1) & mask
            nk[s] = k
            nv[s] = hv[i]
            live += 1
    return live


# ------------------------------------------------------------- node helpers
@njit(cache=True, nogil=True)
def _new_node(n32, n64, hk, hv, st, parent, token, depth, oseq, oend):
    if st[_S_FREE] >= 0:
        c = st[_S_FREE]
        st[_S_FREE] = n32[c, _NSIB]
        st[_S_NFREE] -= 1
    else:
        c = st[_S_NEXT]
        st[_S_NEXT] += 1
    n32[c, _TOK] = token
    n32[c, _PAR] = parent
    n32[c, _DEP] = depth
    n32[c, _BEST] = -1
    n32[c, _FCH] = -1
    f = n32[parent, _FCH]
    n32[c, _NSIB] = f
    n32[c, _PSIB] = -1
    if f >= 0:
        n32[f, _PSIB] = c
    n32[parent, _FCH] = c
    n32[c, _OSEQ] = oseq
    n32[c, _OEND] = oend
    n64[c, _CNT] = 0
    n64[c, _LAST] = 0
    st[_S_NNODES] += 1
    _hinsert(hk, hv, st, _hkey(parent, token), c)
    return c


@njit(cache=True, nogil=True)
def _bump(n32, n64, st, c):
    """count += 1 and keep the parent's best child: the incremented child is
    the most recent, so it wins ties."""
    n64[c, _CNT] += 1
    st[_S_CLOCK] += 1
    n64[c, _LAST] = st[_S_CLOCK]
    p = n32[c, _PAR]
    b = n32[p, _BEST]
    if b < 0 or b == c or n64[c, _CNT] >= n64[b, _CNT]:
        n32[p, _BEST] = c


@njit(cache=True, nogil=True)
def _free_node(n32, n64, hk, st, c):
    p = n32[c, _PAR]
    ps = n32[c, _PSIB]
    ns = n32[c, _NSIB]
    if ps >= 0:
        n32[ps, _NSIB] = ns
    else:
        n32[p, _FCH] = ns
    if ns >= 0:
        n32[ns, _PSIB] = ps
    if n32[p, _BEST] == c:
        n32[p, _BEST] = -2  # caller repairs "dirty" parents
    _hdelete(hk, st, _hkey(p, n32[c, _TOK]))
    n64[c, _CNT] = 0
    n32[c, _BEST] = -1
    n32[c, _FCH] = -1
    n32[c, _NSIB] = st[_S_FREE]
    st[_S_FREE] = c
    st[_S_NFREE] += 1
    st[_S_NNODES] -= 1


@njit(cache=True, nogil=True)
def _rescan_best(n32, n64, p):
    b = -1
    c = n32[p, _FCH]
    while c >= 0:
        if b < 0 or n64[c, _CNT] > n64[b, _CNT] or (
            n64[c, _CNT] == n64[b, _CNT] and n64[c, _LAST] > n64[b, _LAST]
        ):
            b = c
        c = n32[c, _NSIB]
    n32[p, _BEST] = b


# ------------------------------------------------------------------- insert
@njit(cache=True, nogil=True)
def _promote(n32, n64, hk, hv, st, ar, sq, op, c, q, pos, max_depth):
    """A lazy leaf gets its second occurrence: make it internal and
    materialise the one child its first occurrence implies."""
    so = n32[c, _OSEQ]
    eo = n32[c, _OEND]
    _bump(n32, n64, st, c)
    n32[c, _OSEQ] = q
    n32[c, _OEND] = pos
    d = n32[c, _DEP]
    if d < max_depth and eo + 1 < sq[so, _Q_LEN]:
        t2 = ar[sq[so, _Q_START] + eo + 1]
        c2 = _new_node(n32, n64, hk, hv, st, c, t2, d + 1, so, eo + 1)
        n64[c2, _CNT] = 1
        n64[c2, _LAST] = st[_S_CLOCK]
        n32[c, _BEST] = c2
    elif so != q and eo == sq[so, _Q_LEN] - 1 and d <= max_depth - 1:
        # c is a suffix at the end of another live sequence: it just became
        # internal, so that sequence's next append must extend it explicitly.
        op[so, d - 1] = c
        if sq[so, _Q_NOPEN] < d:
            sq[so, _Q_NOPEN] = d


@njit(cache=True, nogil=True)
def _extend(n32, n64, hk, hv, st, ar, sq, op, scratch, q, pos, end, max_depth):
    """Append the tokens already written at offsets [pos, end) of slot q.

    Returns the offset reached: less than ``end`` when node or hash capacity
    ran low (the caller grows the arrays and calls again)."""
    base = sq[q, _Q_START]
    ncap = n32.shape[0]
    hcap = hk.shape[0]
    while pos < end:
        m = sq[q, _Q_NOPEN]
        need = 2 * (m + 2)
        if (ncap - st[_S_NEXT]) + st[_S_NFREE] < need:
            return pos
        if 10 * (st[_S_HLIVE] + st[_S_HTOMB] + need) > 7 * hcap:  # load <= 0.7
            return pos
        t = ar[base + pos]
        sq[q, _Q_LEN] = pos + 1
        if sq[q, _Q_FIRST] < 0:
            sq[q, _Q_FIRST] = st[_S_CLOCK]
        n64[0, _CNT] += 1
        st[_S_NTOK] += 1
        # Extend every internal open suffix (and the empty one at the root)
        # by t. Longer open suffixes have count 1: they are this sequence's
        # own implicit chain, which grows by itself.
        for k in range(m + 1):
            p = 0 if k == 0 else op[q, k - 1]
            c = _hfind(hk, hv, _hkey(p, t))
            if c < 0:
                c = _new_node(n32, n64, hk, hv, st, p, t, k + 1, q, pos)
                _bump(n32, n64, st, c)
            elif n64[c, _CNT] == 1:
                _promote(n32, n64, hk, hv, st, ar, sq, op, c, q, pos, max_depth)
            else:
                _bump(n32, n64, st, c)
                n32[c, _OSEQ] = q
                n32[c, _OEND] = pos
            scratch[k] = c
        # Counts fall with suffix length, so the internal ones are a prefix.
        nm = 0
        while nm < m + 1 and nm < max_depth - 1 and n64[scratch[nm], _CNT] >= 2:
            op[q, nm] = scratch[nm]
            nm += 1
        sq[q, _Q_NOPEN] = nm
        sq[q, _Q_LAST] = st[_S_CLOCK]
        pos += 1
    return pos


# ------------------------------------------------------------------- remove
@njit(cache=True, nogil=True)
def _mark_dirty(n32, dirty, nd, p):
    if n32[p, _BEST] != -2:
        n32[p, _BEST] = -2
        if nd == dirty.shape[0]:
            grown = np.empty(2 * dirty.shape[0], np.int64)
            grown[:nd] = dirty[:nd]
            dirty = grown
        dirty[nd] = p
        nd += 1
    return dirty, nd


@njit(cache=True, nogil=True)
def _push(stack, sp, x):
    """stack[sp] = x, doubling the stack when full; returns the (new) stack."""
    if sp == stack.shape[0]:
        g = np.empty(2 * sp, np.int64)
        g[:sp] = stack[:sp]
        stack = g
    stack[sp] = x
    return stack


@njit(cache=True, nogil=True)
def _remove(n32, n64, hk, hv, st, ar, sq, op, q, max_depth):
    """Subtract slot q's occurrences. Only valid when q is older than every
    other stored sequence (all its appends precede theirs): then any node
    that keeps an occurrence has its most-recent pointer outside q, which is
    exactly the occurrence a node demoted to count 1 must point to."""
    base = sq[q, _Q_START]
    n = sq[q, _Q_LEN]
    path = np.empty(max_depth, np.int64)
    stack = np.empty(64, np.int64)
    dirty = np.empty(64, np.int64)
    nd = 0
    for i in range(n):
        node = 0
        plen = 0
        kmax = min(max_depth, n - i)
        for k in range(kmax):
            c = _hfind(hk, hv, _hkey(node, ar[base + i + k]))
            path[plen] = c
            plen += 1
            node = c
            if n32[c, _FCH] < 0:
                break  # no explicit children: the rest of this path is implicit
        n64[0, _CNT] -= 1
        st[_S_NTOK] -= 1
        for j in range(plen):
            n64[path[j], _CNT] -= 1
        for j in range(plen - 1, -1, -1):
            c = path[j]
            p = n32[c, _PAR]
            cnt = n64[c, _CNT]
            if cnt == 0:
                dirty, nd = _mark_dirty(n32, dirty, nd, p)
                _free_node(n32, n64, hk, st, c)
            elif cnt == 1 and n32[c, _OSEQ] != q:
                # Final count 1: becomes a lazy leaf on its surviving
                # occurrence; its explicit subtree becomes implicit.
                sp = 0
                ch = n32[c, _FCH]
                while ch >= 0:
                    stack = _push(stack, sp, ch)
                    sp += 1
                    ch = n32[ch, _NSIB]
                while sp > 0:
                    sp -= 1
                    x = stack[sp]
                    ch = n32[x, _FCH]
                    if ch >= 0:  # free children first
                        sp += 1
                        while ch >= 0:
                            stack = _push(stack, sp, ch)
                            sp += 1
                            ch = n32[ch, _NSIB]
                        continue
                    _free_node(n32, n64, hk, st, x)
                n32[c, _BEST] = -1
                if n32[p, _BEST] == c:
                    dirty, nd = _mark_dirty(n32, dirty, nd, p)
            elif n32[p, _BEST] == c:
                dirty, nd = _mark_dirty(n32, dirty, nd, p)
    for i in range(nd):
        p = dirty[i]
        if p == 0 or n64[p, _CNT] >= 2:
            _rescan_best(n32, n64, p)
        else:
            n32[p, _BEST] = -1
    # Other sequences' internal open suffixes may have dropped to count 1.
    for s in range(sq.shape[0]):
        if s != q and sq[s, _Q_ACTIVE] == 1:
            m = 0
            while m < sq[s, _Q_NOPEN] and n64[op[s, m], _CNT] >= 2:
                m += 1
            sq[s, _Q_NOPEN] = m


# ------------------------------------------------------------ match / draft
@njit(cache=True, nogil=True)
def _walk(n32, n64, hk, hv, ar, sq, toks, lo, hi, max_depth):
    """Position of the substring toks[lo:hi]: (node, j) where j > 0 means j
    levels below lazy leaf ``node`` (implicit). (-1, 0) if absent."""
    node = np.int64(0)
    j = np.int64(0)
    for i in range(lo, hi):
        x = toks[i]
        if j == 0 and (node == 0 or n64[node, _CNT] >= 2):
            c = _hfind(hk, hv, _hkey(node, x))
            if c < 0:
                return np.int64(-1), np.int64(0)
            node = c
        else:
            s = n32[node, _OSEQ]
            e = n32[node, _OEND] + j + 1
            if n32[node, _DEP] + j >= max_depth or e >= sq[s, _Q_LEN]:
                return np.int64(-1), np.int64(0)
            if ar[sq[s, _Q_START] + e] != x:
                return np.int64(-1), np.int64(0)
            j += 1
    return node, j


@njit(cache=True, nogil=True)
def _next(n32, n64, ar, sq, node, j, max_depth):
    """Most frequent continuation of (node, j): (node', j', token, count);
    node' = -1 if there is none."""
    if j == 0 and (node == 0 or n64[node, _CNT] >= 2):
        c = np.int64(n32[node, _BEST])
        if c < 0:
            return np.int64(-1), np.int64(0), np.int64(0), np.int64(0)
        return c, np.int64(0), np.int64(n32[c, _TOK]), n64[c, _CNT]
    s = n32[node, _OSEQ]
    e = n32[node, _OEND] + j + 1
    if n32[node, _DEP] + j >= max_depth or e >= sq[s, _Q_LEN]:
        return np.int64(-1), np.int64(0), np.int64(0), np.int64(0)
    return node, j + 1, np.int64(ar[sq[s, _Q_START] + e]), np.int64(1)


@njit(cache=True, nogil=True)
def _denom(n32, n64, sq, op, node, j, live_q):
    """Occurrences of (node, j) that could have been followed by a token.
    The occurrence ending at the live sequence's last token has no successor
    yet, so it must not dilute the probabilities."""
    if j > 0 or (node != 0 and n64[node, _CNT] < 2):
        return np.int64(1)
    d = n64[node, _CNT]
    if live_q >= 0 and node != 0:
        dep = n32[node, _DEP]
        if dep <= sq[live_q, _Q_NOPEN] and op[live_q, dep - 1] == node:
            d -= 1
    return d


@njit(cache=True, nogil=True)
def _match(n32, n64, hk, hv, ar, sq, toks, n, max_depth, need_next):
    """Longest L <= min(max_depth-1, n) such that toks[n-L:n] occurs (and,
    with need_next, occurs followed by a token). Both properties are closed
    under taking suffixes, so binary search on L. Returns (L, node, j)."""
    lo = np.int64(0)
    hi = np.int64(min(max_depth - 1, n))
    bn = np.int64(0)
    bj = np.int64(0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        node, j = _walk(n32, n64, hk, hv, ar, sq, toks, n - mid, n, max_depth)
        ok = node >= 0
        if ok and need_next:
            c, _cj, _t, _cc = _next(n32, n64, ar, sq, node, j, max_depth)
            ok = c >= 0
        if ok:
            lo = mid
            bn = node
            bj = j
        else:
            hi = mid - 1
    return lo, bn, bj


@njit(cache=True, nogil=True)
def _greedy(n32, n64, hk, hv, ar, sq, op, buf, nb, node, j, cap, min_prob,
            live_q, max_depth, out, pout):
    """Follow best children from (node, j). buf[:nb] holds the context tail
    (>= the matched suffix, <= max_depth-1 tokens); drafted tokens are
    appended to buf for re-anchoring, and each token's count ratio (its
    probability given the tokens before it) to pout. Returns (n, score,
    stopped_by_prob)."""
    prob = 1.0
    score = 0.0
    n = 0
    while n < cap:
        if n32[node, _DEP] + j >= max_depth:
            # Nothing is stored below depth max_depth: continue from the
            # node of the last max_depth-1 tokens (always exists).
            node, j = _walk(n32, n64, hk, hv, ar, sq, buf,
                            nb + n - (max_depth - 1), nb + n, max_depth)
            if node < 0:
                break
        c, cj, tok, ccnt = _next(n32, n64, ar, sq, node, j, max_depth)
        if c < 0:
            break
        den = _denom(n32, n64, sq, op, node, j, live_q)
        if den <= 0:
            break
        p = prob * ccnt / den
        if p < min_prob:
            return n, score, n == 0
        prob = p
        score += p
        out[n] = tok
        pout[n] = ccnt / den
        buf[nb + n] = tok
        n += 1
        node = c
        j = cj
    return n, score, False


@njit(cache=True, nogil=True)
def _draft(n32, n64, hk, hv, ar, sq, op, ctx, max_tokens, factor, offset,
           min_prob, live_q, max_depth):
    """Returns (tokens, score, match_len, per-token count ratios). See
    SuffixTree.draft."""
    n_ctx = ctx.shape[0]
    out = np.empty(max(max_tokens, 1), np.int32)
    pout = np.empty(max(max_tokens, 1), np.float64)
    L, node, j = _match(n32, n64, hk, hv, ar, sq, ctx, n_ctx, max_depth, True)
    if L == 0 or max_tokens <= 0:
        return out[:0], 0.0, L, pout[:0]
    nb = min(max_depth - 1, n_ctx)
    buf = np.empty(nb + max_tokens, np.int32)
    buf[:nb] = ctx[n_ctx - nb:]
    capf = min(float(max_tokens), math.floor(L * factor + offset))
    cap = int(capf) if capf > 0 else 0
    n, score, by_prob = _greedy(n32, n64, hk, hv, ar, sq, op, buf, nb, node, j,
                                cap, min_prob, live_q, max_depth, out, pout)
    best_n = n
    best_score = score
    best_L = L
    if n == 0 and by_prob:
        # The longest match is too uncertain. A shorter suffix pools more
        # occurrences and may have a confident continuation: try L/2, L/4,
        # ... and keep the best-scoring non-empty draft.
        out2 = np.empty(max_tokens, np.int32)
        pout2 = np.empty(max_tokens, np.float64)
        Ls = L // 2
        while Ls >= 1:
            node2, j2 = _walk(n32, n64, hk, hv, ar, sq, ctx, n_ctx - Ls, n_ctx,
                              max_depth)
            capf = min(float(max_tokens), math.floor(Ls * factor + offset))
            cap2 = int(capf) if capf > 0 else 0
            n2, s2, _bp = _greedy(n32, n64, hk, hv, ar, sq, op, buf, nb, node2,
                                  j2, cap2, min_prob, live_q, max_depth, out2, pout2)
            if n2 > 0 and s2 > best_score:
                best_n = n2
                best_score = s2
                best_L = Ls
                out[:n2] = out2[:n2]
                pout[:n2] = pout2[:n2]
            Ls //= 2
    return out[:best_n].copy(), best_score, best_L, pout[:best_n].copy()


# ===================================================================== Python
class SuffixTree:
    """Depth-limited, leaf-compressed suffix trie over token sequences.

    Stores, for every substring of length 1..``max_depth`` of the stored
    sequences, its occurrence count (implicitly 1 for implicit nodes), and for
    every node its most frequent child (ties: most recently incremented).

    Sequences are identified by any hashable ``seq_id`` and can be extended
    token by token. ``remove_sequence`` is incremental when the removed
    sequence is older than all others (FIFO, the global-cache case); otherwise
    the trie is rebuilt from the remaining sequences, which resets recency
    tie-breaks to their re-insertion order.
    """

    def __init__(self, max_depth: int = 64, node_capacity: int = 256,
                 token_capacity: int = 256) -> None:
        if int(max_depth) < 2:
            raise ValueError("max_depth must be >= 2")
        self.max_depth = int(max_depth)
        self._init_arrays(node_capacity, token_capacity)

    # -------------------------------------------------------------- storage
    def _init_arrays(self, node_capacity: int, token_capacity: int) -> None:
        ncap = max(64, int(node_capacity))
        hcap = 1 << max(7, int(2 * ncap - 1).bit_length())
        self._n32 = np.full((ncap, _NF32), -1, np.int32)
        self._n64 = np.zeros((ncap, _NF64), np.int64)
        self._hk = np.full(hcap, _EMPTY, np.int64)
        self._hv = np.zeros(hcap, np.int32)
        self._st = np.zeros(_NST, np.int64)
        self._st[_S_NEXT] = 1  # node 0 is the root
        self._st[_S_FREE] = -1
        self._n32[0, _DEP] = 0
        self._ar = np.zeros(max(64, int(token_capacity)), np.int32)
        self._ar_used = 0
        self._sq = np.zeros((8, _NQ), np.int64)
        self._op = np.zeros((8, self.max_depth), np.int32)
        self._scratch = np.zeros(self.max_depth + 1, np.int64)
        self._slot_of: dict[Hashable, int] = {}
        self._id_of: dict[int, Hashable] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0

    def _grow_nodes(self, need: int) -> None:
        free = (self._n32.shape[0] - int(self._st[_S_NEXT])) + int(self._st[_S_NFREE])
        if free < need:
            old = self._n32.shape[0]
            new = max(old + old // 2, old + need)
            n32 = np.full((new, _NF32), -1, np.int32)
            n32[:old] = self._n32
            n64 = np.zeros((new, _NF64), np.int64)
            n64[:old] = self._n64
            self._n32, self._n64 = n32, n64
        live, tomb = int(self._st[_S_HLIVE]), int(self._st[_S_HTOMB])
        hcap = self._hk.shape[0]
        if 10 * (live + tomb + need) > 7 * hcap:
            # Rehash (drops tombstones); double until the load is <= 0.35, so
            # linear probing stays short (max load 0.7) at ~12-24 B per node.
            while 20 * (live + need) > 7 * hcap:
                hcap *= 2
            nk = np.full(hcap, _EMPTY, np.int64)
            nv = np.zeros(hcap, np.int32)
            _hrebuild(self._hk, self._hv, nk, nv)
            self._hk, self._hv = nk, nv
            self._st[_S_HTOMB] = 0

    def _new_slot(self) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        q = self._next_slot
        self._next_slot += 1
        if q >= self._sq.shape[0]:
            n = 2 * self._sq.shape[0]
            sq = np.zeros((n, _NQ), np.int64)
            sq[: q] = self._sq
            op = np.zeros((n, self.max_depth), np.int32)
            op[: q] = self._op
            self._sq, self._op = sq, op
        return q

    def _reserve(self, q: int, need: int) -> None:
        """Make slot q's arena segment hold ``need`` tokens (relocate, and
        compact the arena when it has to be reallocated anyway). Lazy-leaf
        pointers are (slot, offset), so moving segments is free."""
        sq = self._sq
        if need <= sq[q, _Q_CAP]:
            return
        newcap = need if sq[q, _Q_CAP] == 0 else max(need, 2 * int(sq[q, _Q_CAP]))
        if self._ar_used + newcap > self._ar.shape[0]:
            active = np.nonzero(sq[: self._next_slot, _Q_ACTIVE] == 1)[0]
            live = int(sq[active, _Q_CAP].sum()) + newcap
            ar = np.zeros(max(2 * live, 64), np.int32)
            used = 0
            for s in active.tolist():
                st0, ln, cp = int(sq[s, _Q_START]), int(sq[s, _Q_LEN]), int(sq[s, _Q_CAP])
                ar[used: used + ln] = self._ar[st0: st0 + ln]
                sq[s, _Q_START] = used
                used += cp
            self._ar, self._ar_used = ar, used
        st0, ln = int(sq[q, _Q_START]), int(sq[q, _Q_LEN])
        self._ar[self._ar_used: self._ar_used + ln] = self._ar[st0: st0 + ln]
        sq[q, _Q_START] = self._ar_used
        sq[q, _Q_CAP] = newcap
        self._ar_used += newcap

    # ----------------------------------------------------------- sequences
    def add_sequence(self, seq_id: Hashable, tokens: Iterable[int] | None = None) -> None:
        """Start a new sequence (optionally with its first tokens, inserted
        in one kernel call)."""
        if seq_id in self._slot_of:
            raise KeyError(f"sequence {seq_id!r} already exists")
        q = self._new_slot()
        self._sq[q] = 0
        self._sq[q, _Q_FIRST] = -1
        self._sq[q, _Q_ACTIVE] = 1
        self._slot_of[seq_id] = q
        self._id_of[q] = seq_id
        if tokens is not None:
            self.extend(seq_id, tokens)

    def extend(self, seq_id: Hashable, tokens: Iterable[int]) -> None:
        """Append tokens to a sequence: O(#repeated open suffixes) per token."""
        toks = np.asarray(tokens)
        if toks.dtype != np.int32:
            toks = toks.astype(np.int32)
        toks = toks.reshape(-1)
        n = toks.shape[0]
        if n == 0:
            return
        q = self._slot_of[seq_id]
        L0 = int(self._sq[q, _Q_LEN])
        self._reserve(q, L0 + n)
        s0 = int(self._sq[q, _Q_START])
        self._ar[s0 + L0: s0 + L0 + n] = toks
        pos, end = L0, L0 + n
        while True:
            pos = _extend(self._n32, self._n64, self._hk, self._hv, self._st,
                          self._ar, self._sq, self._op, self._scratch, q, pos,
                          end, self.max_depth)
            if pos >= end:
                return
            # Capacity ran low: grow for (an estimate of) the rest of the
            # batch at once; an append needs at most 2*(max_depth+1) nodes.
            self._grow_nodes(max(2 * (self.max_depth + 2), 2 * (end - pos)))

    def remove_sequence(self, seq_id: Hashable) -> None:
        """Subtract a sequence's occurrences, free nodes that reach count 0
        and repair best children. Unknown ids raise KeyError."""
        q = self._slot_of[seq_id]
        sq = self._sq
        if sq[q, _Q_LEN] > 0:
            others = np.nonzero(sq[: self._next_slot, _Q_ACTIVE] == 1)[0]
            others = others[(others != q) & (sq[others, _Q_LEN] > 0)]
            if others.size and int(sq[others, _Q_FIRST].min()) < int(sq[q, _Q_LAST]):
                self._rebuild_without(seq_id)
                return
            _remove(self._n32, self._n64, self._hk, self._hv, self._st, self._ar,
                    sq, self._op, q, self.max_depth)
        del self._slot_of[seq_id]
        del self._id_of[q]
        sq[q] = 0
        self._free_slots.append(q)

    def _rebuild_without(self, seq_id: Hashable) -> None:
        items = []
        for sid, q in self._slot_of.items():
            if sid != seq_id:
                first = int(self._sq[q, _Q_FIRST])
                items.append((first if first >= 0 else 1 << 62, q, sid,
                              self.sequence_tokens(sid)))
        items.sort(key=lambda x: (x[0], x[1]))
        self._init_arrays(self._n32.shape[0], sum(len(x[3]) for x in items) + 64)
        for _, _, sid, toks in items:
            self.add_sequence(sid, toks)

    def has_sequence(self, seq_id: Hashable) -> bool:
        return seq_id in self._slot_of

    def sequence_tokens(self, seq_id: Hashable) -> np.ndarray:
        """Copy of a stored sequence's tokens."""
        q = self._slot_of[seq_id]
        s0, ln = int(self._sq[q, _Q_START]), int(self._sq[q, _Q_LEN])
        return self._ar[s0: s0 + ln].copy()

    def sequence_length(self, seq_id: Hashable) -> int:
        return int(self._sq[self._slot_of[seq_id], _Q_LEN])

    # ----------------------------------------------------------- queries
    def match(self, pattern, require_next: bool = False) -> tuple[int, int]:
        """Longest suffix of ``pattern`` of length <= max_depth-1 that occurs
        in a stored sequence (with ``require_next``: occurs followed by a
        token). Returns (node, match_len); node is the deepest explicit node
        on the path (the lazy leaf when the match ends inside an implicit
        chain), 0 (root) when match_len == 0."""
        p = _as_i32(pattern)
        L, node, _j = _match(self._n32, self._n64, self._hk, self._hv, self._ar,
                             self._sq, p, p.shape[0], self.max_depth, require_next)
        return int(node), int(L)

    def draft(self, context, max_tokens: int, max_spec_factor: float = 1.0,
              max_spec_offset: float = 0.0, min_token_prob: float = 0.1,
              live_seq_id: Hashable | None = None) -> tuple[list[int], float, int]:
        """Greedy most-frequent continuation of ``context``.

        1. match_len L = longest suffix of context (<= max_depth-1 tokens)
           occurring *followed by a token* (a suffix that only occurs at the
           very end of a sequence has nothing to draft).
        2. cap = min(max_tokens, floor(L*max_spec_factor + max_spec_offset)).
        3. Follow best children, prob *= count(child)/count(node), stop when
           prob would drop below min_token_prob, at cap, or with no child.
           At depth max_depth re-anchor on the last max_depth-1 tokens of
           context+draft (the cap keeps using L).
        4. If that yields nothing because the very first step was below
           min_token_prob, retry from the suffixes of length L//2, L//4, ...,
           1 (cap from their length) and keep the best-scoring draft.

        ``live_seq_id``: a sequence still being generated whose tokens end
        with ``context`` (the request's own trie). Its final occurrence of
        each suffix has no successor yet and is left out of the denominators.

        Returns (tokens, score = sum of cumulative probabilities, i.e. the
        expected number of accepted tokens, match_len of the used suffix).
        """
        live_q = -1 if live_seq_id is None else self._slot_of.get(live_seq_id, -1)
        toks, score, L, _p = _draft(self._n32, self._n64, self._hk, self._hv, self._ar,
                                self._sq, self._op, _as_i32(context), int(max_tokens),
                                float(max_spec_factor), float(max_spec_offset),
                                float(min_token_prob), live_q, self.max_depth)
        return toks.tolist(), float(score), int(L)

    def count(self, substring) -> int:
        """Occurrences of ``substring`` (only meaningful up to max_depth)."""
        s = _as_i32(substring)
        if s.shape[0] == 0:
            return int(self._n64[0, _CNT])
        node, j = _walk(self._n32, self._n64, self._hk, self._hv, self._ar, self._sq,
                        s, 0, s.shape[0], self.max_depth)
        if node < 0:
            return 0
        return 1 if j > 0 else int(self._n64[node, _CNT])

    # -------------------------------------------------------------- sizes
    @property
    def num_nodes(self) -> int:
        """Explicit (materialised) nodes, root excluded."""
        return int(self._st[_S_NNODES])

    @property
    def num_sequences(self) -> int:
        return len(self._slot_of)

    @property
    def num_tokens(self) -> int:
        return int(self._st[_S_NTOK])

    @property
    def nbytes(self) -> int:
        return int(self._n32.nbytes + self._n64.nbytes + self._hk.nbytes
                   + self._hv.nbytes + self._ar.nbytes + self._sq.nbytes
                   + self._op.nbytes + self._scratch.nbytes)

    # --------------------------------------------------- debugging / tests
    def _node_string(self, node: int) -> tuple[int, ...]:
        out = []
        while node != 0:
            out.append(int(self._n32[node, _TOK]))
            node = int(self._n32[node, _PAR])
        return tuple(reversed(out))

    def _children(self, node: int) -> list[int]:
        out, c = [], int(self._n32[node, _FCH])
        while c >= 0:
            out.append(c)
            c = int(self._n32[c, _NSIB])
        return out

    def substring_counts(self) -> dict[tuple[int, ...], int]:
        """All stored substrings (explicit and implicit) with their counts.
        Python-speed: for tests on small trees."""
        res: dict[tuple[int, ...], int] = {}
        stack = [(0, ())]
        while stack:
            node, s = stack.pop()
            for c in self._children(node):
                cs = s + (int(self._n32[c, _TOK]),)
                cnt = int(self._n64[c, _CNT])
                res[cs] = cnt
                if cnt >= 2:
                    stack.append((c, cs))
                else:  # lazy leaf: read its implicit chain
                    q, e = int(self._n32[c, _OSEQ]), int(self._n32[c, _OEND])
                    s0, ln = int(self._sq[q, _Q_START]), int(self._sq[q, _Q_LEN])
                    while len(cs) < self.max_depth and e + 1 < ln:
                        e += 1
                        cs = cs + (int(self._ar[s0 + e]),)
                        res[cs] = 1
        return res

    def check_invariants(self) -> None:
        """Assert structural invariants (tests only; O(nodes * depth))."""
        n32, n64, sq = self._n32, self._n64, self._sq
        seen = 0
        stack = [0]
        total = 0
        for q in self._slot_of.values():
            total += int(sq[q, _Q_LEN])
        assert int(n64[0, _CNT]) == total == self.num_tokens
        while stack:
            node = stack.pop()
            kids = self._children(node)
            for c in kids:
                seen += 1
                assert int(n32[c, _PAR]) == node
                assert int(n32[c, _DEP]) == int(n32[node, _DEP]) + 1 <= self.max_depth
                assert _hfind(self._hk, self._hv, _hkey(node, n32[c, _TOK])) == c
                cnt = int(n64[c, _CNT])
                assert cnt >= 1
                # The pointer is a real occurrence of the node's string.
                q, e = int(n32[c, _OSEQ]), int(n32[c, _OEND])
                assert sq[q, _Q_ACTIVE] == 1 and 0 <= e < sq[q, _Q_LEN], (c, q, e)
                s = self._node_string(c)
                s0 = int(sq[q, _Q_START])
                assert tuple(self._ar[s0 + e - len(s) + 1: s0 + e + 1].tolist()) == s
                if cnt == 1:
                    assert int(n32[c, _FCH]) == -1 and int(n32[c, _BEST]) == -1
                else:
                    stack.append(c)
            if kids:
                assert node == 0 or sum(int(n64[c, _CNT]) for c in kids) <= int(n64[node, _CNT])
                b = max(kids, key=lambda c: (int(n64[c, _CNT]), int(n64[c, _LAST])))
                assert int(n32[node, _BEST]) == b, (node, int(n32[node, _BEST]), b)
            else:
                assert int(n32[node, _BEST]) == -1
        assert seen == self.num_nodes == int(self._st[_S_HLIVE])
        for sid, q in self._slot_of.items():
            toks = self.sequence_tokens(sid)
            m = int(sq[q, _Q_NOPEN])
            for k in range(1, m + 1):
                node = int(self._op[q, k - 1])
                assert self._node_string(node) == tuple(toks[len(toks) - k:].tolist())
                assert int(n64[node, _CNT]) >= 2
            if m + 1 <= min(self.max_depth - 1, len(toks)):
                assert self.count(toks[len(toks) - m - 1:]) < 2


def _as_i32(x) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype != np.int32 or a.ndim != 1:
        a = a.astype(np.int32).reshape(-1)
    return a


# Settings live in a numba-free module so configs validate without compiling.
from vllm_spec_plugins.config import SuffixTreeConfig  # noqa: E402


_NO_TOKENS = np.zeros(0, np.int32)
_NO_PROBS = np.zeros(0, np.float64)
#: Upper ends of the match-length buckets of the calibration strata.
_MATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
#: Strata used: (len(_MATCH_BUCKETS) + 1) match buckets x 2 tries.
SUFFIX_STRATA = 2 * (len(_MATCH_BUCKETS) + 1)


def suffix_stratum(match_len: int, source: int) -> int:
    """Calibration stratum of a suffix-tree draft: match-length bucket
    (1, 2, 3-4, 5-8, 9-16, 17-32, 33+) x trie (0 own, 1 global)."""
    b = 0
    while b < len(_MATCH_BUCKETS) and match_len > _MATCH_BUCKETS[b]:
        b += 1
    return 2 * b + (1 if source else 0)


# =================================================================== proposer
class _Request:
    """Per-request state of :class:`SuffixTreeProposer` (what ``start_request``
    returns): the request's own trie over prompt + output so far. ``tree`` is
    None once the request finished."""

    __slots__ = ("req_id", "tree", "prompt_len", "slot")

    def __init__(self, req_id: str, tree: SuffixTree, prompt_len: int) -> None:
        self.req_id = req_id
        self.tree: Optional[SuffixTree] = tree
        self.prompt_len = prompt_len
        self.slot = tree._slot_of[0]

    def __repr__(self) -> str:
        n = -1 if self.tree is None else self.tree.sequence_length(0)
        return (f"_Request({self.req_id!r}, prompt_len={self.prompt_len}, "
                f"tokens={n}{', finished' if self.tree is None else ''})")


class SuffixTreeProposer(Proposer):
    """SuffixDecoding proposer: per-request trie + global response trie."""

    def __init__(self, config: SuffixTreeConfig, num_speculative_tokens: int) -> None:
        self.config = config
        self.num_speculative_tokens = max(0, int(num_speculative_tokens))
        self._depth = config.max_tree_depth
        self._reset_global()
        # Responses cached here since the last export_shared (sharing only).
        self._outbox: Optional[deque[np.ndarray]] = None
        if config.cache_path and os.path.exists(config.cache_path):
            self.load(config.cache_path)

    # ---------------------------------------------------------- lifecycle
    def start_request(self, req_id: str, prompt_token_ids: np.ndarray) -> _Request:
        """The request's trie over its prompt. Touches nothing of the
        proposer's (reads only its depth), so it may run on another thread."""
        prompt = _as_i32(prompt_token_ids)
        n = prompt.shape[0]
        tree = SuffixTree(self._depth, node_capacity=4 * n + 256,
                          token_capacity=n + 512)
        tree.add_sequence(0, prompt)
        return _Request(req_id, tree, n)

    def on_tokens(self, state: Optional[_Request], new_token_ids: np.ndarray) -> None:
        if state is not None and state.tree is not None:
            state.tree.extend(0, new_token_ids)

    def propose(self, state: Optional[_Request], context: np.ndarray,
                max_tokens: int) -> list[int]:
        return self.propose_scored(state, context, max_tokens)[0]

    def propose_scored(self, state: Optional[_Request], context: np.ndarray,
                       max_tokens: int) -> tuple[list[int], float, int]:
        """``propose`` with the evidence behind the draft: (tokens, score =
        expected accepted tokens, match_len = length of the context suffix
        the draft continues). ``([], 0.0, 0)`` for no state (None) or a
        finished request."""
        toks, score, L, _probs, _src = self.draft_row(state, context, max_tokens)
        return toks.tolist(), score, L

    def propose_scored_batch(self, batch: Sequence[tuple[Optional[_Request], np.ndarray, int]],
                             price: Optional[float] = None) -> list[ScoredDraft]:
        """Each row's draft with its tokens' count ratios (the probability of
        each token given the ones before it, by the trie's counts) and a
        calibration stratum: which trie drafted (the request's own or the
        global one) x how long the matched suffix was. Count ratios of a
        short match are overconfident and of a long one under-confident;
        the draft budget learns each stratum's real acceptance."""
        out = []
        for state, ctx, k in batch:
            toks, _score, L, probs, src = self.draft_row(state, ctx, k)
            out.append(ScoredDraft(toks.tolist(), probs.tolist(),
                                   suffix_stratum(L, src) if len(toks) else 0))
        return out

    def draft_row(self, state: Optional[_Request], context: np.ndarray, max_tokens: int):
        """(tokens int32, score, match_len, count ratios, source 0 = own trie / 1 = global)."""
        k = min(int(max_tokens), self.num_speculative_tokens)
        if state is None or state.tree is None or k <= 0:
            return _NO_TOKENS, 0.0, 0, _NO_PROBS, 0
        cfg = self.config
        ctx = context if (isinstance(context, np.ndarray) and context.dtype == np.int32
                          and context.ndim == 1) else _as_i32(context)
        t = state.tree
        toks, score, L, probs = _draft(t._n32, t._n64, t._hk, t._hv, t._ar, t._sq, t._op,
                                       ctx, k, cfg.max_spec_factor, cfg.max_spec_offset,
                                       cfg.min_token_prob, state.slot, self._depth)
        g = self._global
        if cfg.use_global_cache and g._slot_of:
            gtoks, gscore, gL, gprobs = _draft(g._n32, g._n64, g._hk, g._hv, g._ar, g._sq,
                                               g._op, ctx, k, cfg.max_spec_factor,
                                               cfg.max_spec_offset, cfg.min_token_prob, -1,
                                               self._depth)
            if gscore > score:
                return gtoks, float(gscore), int(gL), gprobs, 1
        return toks, float(score), int(L), probs, 0

    def finish_request(self, state: Optional[_Request], aborted: bool = False) -> None:
        """Cache the request's response in the global trie and drop its own
        trie. Aborted requests are cached too: their partial output is still
        genuine model text. A second call (or None) does nothing."""
        if state is None or state.tree is None:
            return
        t, state.tree = state.tree, None
        q = state.slot
        s0, ln = int(t._sq[q, _Q_START]), int(t._sq[q, _Q_LEN])
        response = t._ar[s0 + state.prompt_len: s0 + ln]
        self._cache_response(response)
        if self._outbox is not None and self.config.use_global_cache and len(response):
            self._outbox.append(response.copy())

    # ------------------------------------------------------------ sharing
    def enable_sharing(self) -> None:
        if self._outbox is None:
            # Bounded: a hub that stays away must not grow memory.
            self._outbox = deque(maxlen=max(1, min(self.config.max_cached_requests, 4096)))

    def export_shared(self) -> Optional[dict]:
        if not self._outbox:
            return None
        out = {"suffix_responses": list(self._outbox)}
        self._outbox.clear()
        return out

    def import_shared(self, payload: dict) -> None:
        """Add other replicas' responses to the global cache (not re-exported)."""
        for resp in payload.get("suffix_responses", ()):
            self._cache_response(_as_i32(resp))

    def warmup(self) -> None:
        warmup()  # the module-level kernel warm-up

    # ------------------------------------------------------- global cache
    def _reset_global(self, node_capacity: int = 1024, token_capacity: int = 4096) -> None:
        self._global = SuffixTree(self._depth, node_capacity=node_capacity,
                                  token_capacity=token_capacity)
        self._order: deque[int] = deque()  # cached sequence ids, oldest first
        self._cached_tokens = 0
        self._next_id = 0

    def _cache_response(self, response: np.ndarray) -> None:
        cfg = self.config
        n = int(response.shape[0])
        if (not cfg.use_global_cache or n == 0 or n > cfg.max_cached_tokens
                or cfg.max_cached_requests == 0):
            return
        sid = self._next_id
        self._next_id += 1
        self._global.add_sequence(sid, response)
        self._order.append(sid)
        self._cached_tokens += n
        while (len(self._order) > cfg.max_cached_requests
               or self._cached_tokens > cfg.max_cached_tokens):
            old = self._order.popleft()
            self._cached_tokens -= self._global.sequence_length(old)
            self._global.remove_sequence(old)  # oldest: incremental path

    @property
    def global_tree(self) -> SuffixTree:
        return self._global

    def cached_responses(self) -> list[np.ndarray]:
        """The cached responses, oldest first."""
        return [self._global.sequence_tokens(s) for s in self._order]

    def save_state(self) -> bool:
        if not self.config.cache_path:
            return False
        self.save(self.config.cache_path)
        return True

    def save(self, path: str) -> None:
        """Write the global cache as one .npz, atomically (temp + replace)."""
        resp = self.cached_responses()
        lengths = np.array([len(r) for r in resp], np.int64)
        tokens = np.concatenate(resp).astype(np.int32) if resp else np.zeros(0, np.int32)
        save_npz_atomic(path, version=np.int64(CACHE_FORMAT_VERSION),
                        max_tree_depth=np.int64(self._depth), lengths=lengths, tokens=tokens)

    def load(self, path: str) -> bool:
        """Replace the global cache with the one saved at ``path``.

        The trie is rebuilt from the saved responses with this config's depth
        and bounds (the newest responses that fit are kept, as FIFO eviction
        would). A missing, corrupt or incompatible file logs a warning and
        leaves the current cache unchanged; returns whether it loaded."""
        try:
            with np.load(path, allow_pickle=False) as z:
                version = int(z["version"])
                if version != CACHE_FORMAT_VERSION:
                    raise ValueError(f"format version {version}, expected "
                                     f"{CACHE_FORMAT_VERSION}")
                saved_depth = int(z["max_tree_depth"])
                lengths = np.asarray(z["lengths"])
                tokens = np.asarray(z["tokens"])
            if lengths.ndim != 1 or tokens.ndim != 1:
                raise ValueError("lengths/tokens must be 1-D")
            if lengths.size and (lengths.dtype.kind not in "iu" or lengths.min() < 0):
                raise ValueError("bad lengths")
            if tokens.size and (tokens.dtype.kind not in "iu" or tokens.min() < 0
                                or tokens.max() > np.iinfo(np.int32).max):
                raise ValueError("bad tokens")
            if int(lengths.sum()) != tokens.size:
                raise ValueError("lengths do not add up to the token count")
        except Exception as e:  # noqa: BLE001 - never crash on a bad cache file
            logger.warning("Ignoring suffix cache file %s: %s", path, e)
            return False
        if saved_depth != self._depth:
            logger.info("Suffix cache %s was saved with max_tree_depth=%d; "
                        "rebuilding with %d", path, saved_depth, self._depth)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        # The FIFO result of inserting everything = the newest responses that
        # fit the bounds; select them without building the rest.
        cfg = self.config
        keep: list[int] = []
        ntok = 0
        if cfg.use_global_cache:
            for i in range(len(lengths) - 1, -1, -1):
                n = int(lengths[i])
                if n == 0 or n > cfg.max_cached_tokens:
                    continue
                if len(keep) + 1 > cfg.max_cached_requests or ntok + n > cfg.max_cached_tokens:
                    break
                keep.append(i)
                ntok += n
        tok32 = tokens.astype(np.int32)
        self._reset_global(node_capacity=2 * ntok + 1024, token_capacity=ntok + 64)
        for i in reversed(keep):
            self._cache_response(tok32[offsets[i]: offsets[i + 1]])
        return True


# ===================================================================== warmup
def warmup() -> None:
    """Compile (or load from numba's on-disk cache) every kernel, so the
    first real request does not pay for it. Call once at startup."""
    t = SuffixTree(4, node_capacity=8, token_capacity=8)
    t.add_sequence("a", [1, 2, 3, 1, 2, 3, 1, 2])
    t.add_sequence("b", [2, 3, 1])
    t.extend("b", [2])
    t.match([1, 2])
    t.draft([3, 1, 2], 4, 1.0, 0.0, 0.9, live_seq_id="b")  # exercises the retry
    t.count([1, 2])
    t.remove_sequence("a")  # incremental path
    t.add_sequence("c", list(range(300)))  # forces growth + rehash
    t.remove_sequence("c")  # rebuild path
