"""Token Recycling (arXiv 2408.08696): drafts from the target's own past top-k.

Every verification step the target model computes a next-token distribution
for every input token (the last token and the drafts); its top-k candidates
are usually thrown away. Token Recycling keeps them: an adjacency matrix
``[vocab, k]`` holds, for each token ``t``, the top-k next tokens (and here
their probabilities) the target produced the last time ``t`` was an input.
Drafting is a breadth-first search over that matrix from the last context
token, shaped by a static breadth-per-depth template, which gives a draft
tree.

vLLM 0.32 verifies one linear chain per request, so :func:`best_chain` picks
the root-to-node path of the tree with the largest expected number of
accepted tokens; the tree itself (:class:`DraftTree`) stays a first-class
object so tree verification can use it later.

The matrix is shared by all requests (it warms up with traffic, and can be
saved and reloaded), so there is no per-request state (``start_request``
returns None). No prompt-derived cold start: a guess from the prompt is not
the target's top-k, and putting it in the matrix would make the stored
probabilities (which drive chain selection and the draft length) meaningless.
Copying from the context is the suffix tree's job; ``suffix_recycling``
combines the two with an explicit switch.

Calibration (this project's addition; the paper verifies a large tree on a
GPU, where a wasted draft token is nearly free). A stored probability was
the target's confidence *in the context it came from*; for the same token in
a new context it is overconfident, so drafts ran long and mostly got
rejected. Each time a row is overwritten, the kernel checks what its old
candidates would have scored against the new argmax (exactly "would a
greedy draft from this row have been accepted here") and keeps (a) a global
reliability curve: hit rate per stored-probability bin, and (b) a decayed
hit count per row for its top-1. Drafting uses the calibrated probability
(curve, then the row's own record for its top-1), so ``min_path_prob`` cuts
where real acceptance falls; with no evidence yet the stored probability is
used as is. The cut also rises with the number of rows in the step: on a
compute-bound verifier (CPU, large batches) a rejected token costs more.

Hot paths are numba ``@njit(cache=True, nogil=True)`` kernels (the GIL is
released while they run, so other Python threads go on);
:meth:`propose_batch` drafts all rows of a step in one kernel call.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from numba import njit

from vllm_spec_plugins.config import TokenRecyclingConfig

from .base import Proposer, RequestState, ScoredDraft, save_npz_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "TokenRecyclingConfig",
    "AdjacencyMatrix",
    "DraftTree",
    "best_chain",
    "TokenRecyclingProposer",
    "MATRIX_FORMAT_VERSION",
    "warmup",
]

MATRIX_FORMAT_VERSION = 2  # 2: + row reliability and the calibration curve
CAL_BINS = 20          # stored-probability bins of the reliability curve
_CAL_PRIOR = 8.0       # pseudo-observations at the stored probability, per bin
_ROW_PRIOR = 2.0       # pseudo-observations at the curve's value, per row
_ROW_DECAY = 0.8       # a row's record forgets: ~5 recent overwrites count
_CAL_HALVE_AT = 1e6    # halve the curve's counts past this many (keeps it adaptive)
_INITIAL_ROWS = 1024


# ------------------------------------------------------------------ kernels
@njit(cache=True, nogil=True)
def _cal_bin(p, nbins):
    b = int(p * nbins)
    if b < 0:
        return 0
    return b if b < nbins else nbins - 1


@njit(cache=True, nogil=True)
def _update(ids, probs, row_hits, row_trials, cal_hits, cal_trials, inputs,
            cand_ids, cand_probs, vocab, decay):
    """Overwrite the row of every input token with its candidates.

    Before a filled row is overwritten by a non-empty one, its candidates
    are scored against the new best candidate (the target's argmax here):
    per stored-probability bin into ``cal_hits/cal_trials``, and for the
    old top-1 into the row's decayed ``row_hits/row_trials``.

    Rows are processed in order, so a token that appears twice in one window
    keeps the later row (the more recent context). Candidates are filtered
    (id in [0, vocab), 0 < prob; prob clipped to 1; NaN dropped; a repeated
    candidate keeps its best probability, ranked where that occurred) and
    stored best first (stable on ties), keeping the ``k`` best."""
    rows = ids.shape[0]
    k = ids.shape[1]
    kin = cand_ids.shape[1]
    buf_t = np.empty(k, np.int32)
    buf_p = np.empty(k, np.float32)
    for j in range(inputs.shape[0]):
        t = inputs[j]
        if t < 0 or t >= rows:
            continue
        m = 0
        for r in range(kin):
            c = cand_ids[j, r]
            p = cand_probs[j, r]
            if c < 0 or c >= vocab or not (p > 0.0):
                continue
            if p > 1.0:
                p = 1.0
            # A candidate listed twice counts once, with its best probability
            # (a real top-k has no repeats; a duplicate would waste tree nodes).
            dup = -1
            for q in range(m):
                if buf_t[q] == c:
                    dup = q
                    break
            if dup >= 0:
                if buf_p[dup] >= p:
                    continue
                for q in range(dup, m - 1):
                    buf_t[q] = buf_t[q + 1]
                    buf_p[q] = buf_p[q + 1]
                m -= 1
            if m < k:
                pos = m
                m += 1
            elif p > buf_p[k - 1]:
                pos = k - 1
            else:
                continue
            while pos > 0 and buf_p[pos - 1] < p:
                buf_t[pos] = buf_t[pos - 1]
                buf_p[pos] = buf_p[pos - 1]
                pos -= 1
            buf_t[pos] = c
            buf_p[pos] = p
        if m > 0 and ids[t, 0] >= 0:
            a = buf_t[0]
            nb = cal_trials.shape[0]
            for r in range(k):
                c = ids[t, r]
                if c < 0:
                    break
                b = _cal_bin(probs[t, r], nb)
                cal_trials[b] += 1.0
                if c == a:
                    cal_hits[b] += 1.0
            row_trials[t] = row_trials[t] * decay + 1.0
            row_hits[t] = row_hits[t] * decay + (1.0 if ids[t, 0] == a else 0.0)
        for r in range(k):
            if r < m:
                ids[t, r] = buf_t[r]
                probs[t, r] = buf_p[r]
            else:
                ids[t, r] = -1
                probs[t, r] = 0.0


@njit(cache=True, nogil=True)
def _edge_prob(probs, row_hits, row_trials, cal_rate, row_prior, t, r):
    """Estimated acceptance of candidate r of token t: the stored probability
    through the calibration curve (``cal_rate`` empty = raw) and, for the
    top-1, shrunk toward the row's own record of hits."""
    p = probs[t, r]
    nb = cal_rate.shape[0]
    if nb == 0:
        return p
    q = cal_rate[_cal_bin(p, nb)]
    if q < 0.0:  # no evidence in this bin yet
        q = p
    if r == 0:
        q = (row_hits[t] + row_prior * q) / (row_trials[t] + row_prior)
    return q


@njit(cache=True, nogil=True)
def _bfs(ids, probs, row_hits, row_trials, cal_rate, row_prior, root, max_depth,
         breadth, max_nodes, min_prob, tok, par, dep, pp):
    """Breadth-first draft tree from ``root``; returns the node count.

    Node 0 is the root. A node at depth d gets the first breadth[d] (last
    value repeats) candidates of its token's row whose path probability
    (product of :func:`_edge_prob`) stays >= min_prob, in row order.
    Nodes are in BFS order: parents before children, shallower before
    deeper; max_nodes cuts the deepest level."""
    rows = ids.shape[0]
    k = ids.shape[1]
    nb = breadth.shape[0]
    tok[0] = root
    par[0] = -1
    dep[0] = 0
    pp[0] = 1.0
    n = 1
    head = 0
    while head < n:
        u = head
        head += 1
        d = dep[u]
        if d >= max_depth:
            break  # BFS order: every later node is at least as deep
        t = tok[u]
        if t < 0 or t >= rows:
            continue
        b = breadth[d] if d < nb else breadth[nb - 1]
        if b > k:
            b = k
        taken = 0
        for r in range(k):
            if taken >= b:
                break
            c = ids[t, r]
            if c < 0:
                break
            p = pp[u] * _edge_prob(probs, row_hits, row_trials, cal_rate, row_prior, t, r)
            # Calibration can rank a lower candidate above the top-1, so a
            # candidate below the threshold skips, it does not end the row.
            if not (p > 0.0) or p < min_prob:
                continue
            taken += 1
            if n >= max_nodes:
                return n
            tok[n] = c
            par[n] = u
            dep[n] = d + 1
            pp[n] = p
            n += 1
    return n


@njit(cache=True, nogil=True)
def _best_node(par, pp, n, min_prob, gain):
    """Node ending the root path with the largest sum of (path probability -
    min_prob): expected accepted tokens of that chain minus what verifying
    its tokens costs, with ``min_prob`` as the price of one drafted token in
    accepted-token units. 0 (root) if none. A node is eligible only if it and
    all its ancestors have path_prob >= min_prob. Ties keep the earlier node
    (BFS order: shallower, higher-ranked)."""
    gain[0] = 0.0
    best = 0
    best_gain = 0.0
    for i in range(1, n):
        p = par[i]
        if gain[p] < 0.0 or not (pp[i] > 0.0) or pp[i] < min_prob:
            gain[i] = -1.0  # ineligible, and so is its subtree
            continue
        g = gain[p] + pp[i] - min_prob
        gain[i] = g
        if g > best_gain:
            best_gain = g
            best = i
    return best


@njit(cache=True, nogil=True)
def _propose_rows(ids, probs, row_hits, row_trials, cal_rate, row_prior, roots, caps,
                  breadth, max_nodes, min_prob, out, out_p, lens, tok, par, dep, pp, gain):
    """Build the tree and write the best chain for each row (one call per step),
    with each token's probability given its parent (``out_p``)."""
    for b in range(roots.shape[0]):
        lens[b] = 0
        if caps[b] <= 0 or roots[b] < 0:
            continue
        n = _bfs(ids, probs, row_hits, row_trials, cal_rate, row_prior, roots[b], caps[b],
                 breadth, max_nodes, min_prob, tok, par, dep, pp)
        v = _best_node(par, pp, n, min_prob, gain)
        L = dep[v]
        lens[b] = L
        while v > 0:
            L -= 1
            out[b, L] = tok[v]
            q = pp[par[v]]
            out_p[b, L] = pp[v] / q if q > 0.0 else pp[v]
            v = par[v]


# ------------------------------------------------------------------- matrix
class AdjacencyMatrix:
    """For each token id, the target's top-k next tokens (best first) and
    their probabilities, from the last time that token was a target input;
    plus what past overwrites say about how reliable those rows are.

    ``ids`` int32 [rows, k] (-1 = empty), ``probs`` float32 [rows, k],
    ``row_hits``/``row_trials`` float32 [rows] (decayed count of overwrites
    where the row's top-1 was the new argmax), ``cal_hits``/``cal_trials``
    float64 [CAL_BINS] (same, per stored-probability bin, every rank). Rows
    are allocated lazily (capacity doubles up to ``max_vocab_size``), so
    memory never exceeds ``max_vocab_size * (k * 8 + 8)`` bytes. Token ids
    outside ``[0, max_vocab_size)`` are ignored, as inputs and as
    candidates."""

    def __init__(self, k: int = 8, max_vocab_size: int = 262144,
                 initial_rows: int = _INITIAL_ROWS) -> None:
        if int(k) < 1 or int(max_vocab_size) < 1:
            raise ValueError("k and max_vocab_size must be >= 1")
        self.k = int(k)
        self.max_vocab_size = int(max_vocab_size)
        self._alloc(min(self.max_vocab_size, max(1, int(initial_rows))))
        self.cal_hits = np.zeros(CAL_BINS, np.float64)
        self.cal_trials = np.zeros(CAL_BINS, np.float64)

    def _alloc(self, rows: int) -> None:
        self.ids = np.full((rows, self.k), -1, np.int32)
        self.probs = np.zeros((rows, self.k), np.float32)
        self.row_hits = np.zeros(rows, np.float32)
        self.row_trials = np.zeros(rows, np.float32)

    def _grow_to(self, need_rows: int) -> None:
        old = self.ids.shape[0]
        if need_rows <= old:
            return
        new = min(self.max_vocab_size, max(need_rows, 2 * old))
        kept = self.ids, self.probs, self.row_hits, self.row_trials
        self._alloc(new)
        for dst, src in zip((self.ids, self.probs, self.row_hits, self.row_trials), kept):
            dst[:old] = src

    def clear(self) -> None:
        self._alloc(min(self.max_vocab_size, _INITIAL_ROWS))
        self.cal_hits[:] = 0
        self.cal_trials[:] = 0

    # ------------------------------------------------------------ update
    def update(self, input_ids, topk_ids, topk_probs) -> None:
        """Overwrite the rows of ``input_ids`` [n] with ``topk_ids`` /
        ``topk_probs`` [n, k'] (any k': the k best valid candidates are kept,
        sorted best first), scoring the old rows first (see the module doc).
        A token repeated in ``input_ids`` keeps its *last* row (the most
        recent context wins). Out-of-range input ids are skipped;
        out-of-range candidate ids, and candidates with a probability that is
        not > 0, are dropped; probabilities above 1 are clipped; a candidate
        repeated within a row keeps its best probability."""
        inp = np.ascontiguousarray(input_ids, dtype=np.int64).reshape(-1)
        cid = np.ascontiguousarray(topk_ids, dtype=np.int64)
        cpr = np.ascontiguousarray(topk_probs, dtype=np.float32)
        if cid.ndim != 2 or cpr.shape != cid.shape or cid.shape[0] != inp.shape[0]:
            raise ValueError(
                f"update: need input_ids [n] with topk_ids/topk_probs [n, k'], got "
                f"{inp.shape}, {np.shape(topk_ids)}, {np.shape(topk_probs)}")
        if inp.shape[0] == 0:
            return
        valid = inp[(inp >= 0) & (inp < self.max_vocab_size)]
        if valid.size:
            self._grow_to(int(valid.max()) + 1)
        _update(self.ids, self.probs, self.row_hits, self.row_trials, self.cal_hits,
                self.cal_trials, inp, cid, cpr, self.max_vocab_size, _ROW_DECAY)
        if self.cal_trials.sum() > _CAL_HALVE_AT:
            self.cal_hits *= 0.5
            self.cal_trials *= 0.5

    def import_rows(self, tokens, ids, probs, row_hits, row_trials) -> None:
        """Set whole rows as they are (another matrix's rows, already sorted
        and filtered): no scoring, since they were not observed here.
        Malformed input raises ValueError and changes nothing."""
        tokens = np.asarray(tokens, np.int64).reshape(-1)
        ids = np.asarray(ids)
        probs = np.asarray(probs, np.float32)
        hits = np.asarray(row_hits, np.float32).reshape(-1)
        trials = np.asarray(row_trials, np.float32).reshape(-1)
        n = tokens.shape[0]
        if (ids.shape != (n, self.k) or probs.shape != (n, self.k)
                or hits.shape != (n,) or trials.shape != (n,)):
            raise ValueError(f"import_rows: need tokens [n] with ids/probs [n, {self.k}] "
                             "and row_hits/row_trials [n]")
        ok = ((tokens >= 0) & (tokens < self.max_vocab_size)
              & ((ids >= -1) & (ids < self.max_vocab_size)).all(axis=1)
              & np.isfinite(probs).all(axis=1) & (probs >= 0).all(axis=1)
              & (probs <= 1).all(axis=1) & (hits >= 0) & (trials >= hits))
        tokens, ids, probs, hits, trials = (a[ok] for a in (tokens, ids, probs, hits, trials))
        if tokens.size == 0:
            return
        self._grow_to(int(tokens.max()) + 1)
        self.ids[tokens] = ids
        self.probs[tokens] = probs
        self.row_hits[tokens] = hits
        self.row_trials[tokens] = trials

    def row(self, token: int) -> tuple[list[int], list[float]]:
        """(candidate ids, probabilities) of ``token``, best first."""
        if not 0 <= token < self.ids.shape[0]:
            return [], []
        m = self.ids[token] >= 0
        return self.ids[token][m].tolist(), self.probs[token][m].tolist()

    # ------------------------------------------------------- reliability
    def calibration_rates(self) -> np.ndarray:
        """Per stored-probability bin: observed acceptance rate, shrunk toward
        the bin's centre by ``_CAL_PRIOR`` pseudo-observations; -1 where the
        bin has no observation (the kernels then use the stored probability)."""
        centre = (np.arange(CAL_BINS) + 0.5) / CAL_BINS
        rate = (self.cal_hits + _CAL_PRIOR * centre) / (self.cal_trials + _CAL_PRIOR)
        return np.where(self.cal_trials > 0, rate, -1.0)

    def reliability(self) -> dict[str, object]:
        """Diagnostics: the calibration curve (bins with evidence) and the
        mean top-1 hit rate over rows that were overwritten."""
        seen = self.cal_trials > 0
        edges = np.arange(CAL_BINS) / CAL_BINS
        trials = float(self.row_trials.sum())
        return {
            "curve": {f"{lo:.2f}": round(float(r), 3) for lo, r, s in
                      zip(edges, self.calibration_rates(), seen) if s},
            "observations": int(self.cal_trials.sum()),
            "top1_hit_rate": round(float(self.row_hits.sum()) / trials, 3) if trials else None,
        }

    # ------------------------------------------------------------- sizes
    @property
    def rows_allocated(self) -> int:
        return int(self.ids.shape[0])

    @property
    def rows_filled(self) -> int:
        """Tokens that have a row (were a target input at least once)."""
        return int(np.count_nonzero(self.ids[:, 0] >= 0))

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.probs.nbytes + self.row_hits.nbytes
                   + self.row_trials.nbytes)

    @property
    def max_nbytes(self) -> int:
        """Upper bound of ``nbytes``: every row allocated."""
        return self.max_vocab_size * (self.k * (4 + 4) + 4 + 4)

    # ------------------------------------------------------- persistence
    def save(self, path: str) -> None:
        """Write the filled rows and the reliability record as one .npz,
        atomically (temp + replace)."""
        filled = np.flatnonzero(self.ids[:, 0] >= 0)
        n = int(filled[-1]) + 1 if filled.size else 0
        save_npz_atomic(path, version=np.int64(MATRIX_FORMAT_VERSION),
                        k=np.int64(self.k), ids=self.ids[:n], probs=self.probs[:n],
                        row_hits=self.row_hits[:n], row_trials=self.row_trials[:n],
                        cal_hits=self.cal_hits, cal_trials=self.cal_trials)

    def load(self, path: str) -> None:
        """Replace the contents with the matrix saved at ``path``.

        Raises OSError if the file cannot be read and ValueError (saying
        what is wrong) if it is not a valid matrix file of this ``k``; the
        current contents are kept then. Version-1 files (no reliability
        record) load with an empty record. Rows and candidates at or above
        ``max_vocab_size`` are dropped; rows are re-sorted best first."""
        try:
            z = np.load(path, allow_pickle=False)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - zip/pickle/format errors
            raise ValueError(f"{path}: not a token-recycling matrix file ({e})") from e
        try:
            with z:
                missing = {"version", "k", "ids", "probs"} - set(z.files)
                if missing:
                    raise ValueError(f"missing arrays {sorted(missing)}")
                version = int(z["version"])
                if version not in (1, MATRIX_FORMAT_VERSION):
                    raise ValueError(f"format version {version}, expected "
                                     f"{MATRIX_FORMAT_VERSION}")
                k = int(z["k"])
                ids = np.asarray(z["ids"])
                probs = np.asarray(z["probs"])
                record = {}
                if version >= 2:
                    absent = {"row_hits", "row_trials", "cal_hits", "cal_trials"} - set(z.files)
                    if absent:
                        raise ValueError(f"missing arrays {sorted(absent)}")
                    record = {n: np.asarray(z[n], np.float64) for n in
                              ("row_hits", "row_trials", "cal_hits", "cal_trials")}
        except ValueError as e:
            raise ValueError(f"{path}: bad token-recycling matrix file: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: bad token-recycling matrix file: {e}") from e

        def bad(msg: str) -> ValueError:
            return ValueError(f"{path}: bad token-recycling matrix file: {msg}")

        if k != self.k:
            raise bad(f"saved with k={k}, this matrix has k={self.k} (topk setting)")
        if ids.ndim != 2 or ids.shape[1] != k:
            raise bad(f"ids must have shape [rows, {k}], got {ids.shape}")
        if probs.shape != ids.shape:
            raise bad(f"probs shape {probs.shape} != ids shape {ids.shape}")
        if ids.dtype.kind not in "iu" or probs.dtype.kind != "f":
            raise bad(f"ids must be integer and probs float, got {ids.dtype}, {probs.dtype}")
        if ids.size and (int(ids.min()) < -1 or int(ids.max()) > np.iinfo(np.int32).max):
            raise bad("ids out of range")
        if probs.size and not (np.isfinite(probs).all() and probs.min() >= 0
                               and probs.max() <= 1):
            raise bad("probs must be finite and in [0, 1]")
        if record:
            shapes = {"row_hits": (ids.shape[0],), "row_trials": (ids.shape[0],),
                      "cal_hits": (CAL_BINS,), "cal_trials": (CAL_BINS,)}
            for name, shape in shapes.items():
                a = record[name]
                if a.shape != shape or not (np.isfinite(a).all() and (a >= 0).all()):
                    raise bad(f"{name} must be finite, >= 0, shape {shape}")
            if ((record["row_hits"] > record["row_trials"]).any()
                    or (record["cal_hits"] > record["cal_trials"]).any()):
                raise bad("hits above trials in the reliability record")
        rows = min(ids.shape[0], self.max_vocab_size)
        if rows < ids.shape[0]:
            logger.info("%s: dropping %d rows at or above max_vocab_size=%d", path,
                        ids.shape[0] - rows, self.max_vocab_size)
        kept = (self.ids, self.probs, self.row_hits, self.row_trials,
                self.cal_hits.copy(), self.cal_trials.copy())
        self._alloc(max(rows, min(self.max_vocab_size, _INITIAL_ROWS)))
        try:
            # Rows are empty here, so re-sorting through _update scores nothing.
            _update(self.ids, self.probs, self.row_hits, self.row_trials, self.cal_hits,
                    self.cal_trials, np.arange(rows, dtype=np.int64),
                    ids[:rows].astype(np.int64), probs[:rows].astype(np.float32),
                    self.max_vocab_size, _ROW_DECAY)
            if record:
                self.row_hits[:rows] = record["row_hits"][:rows]
                self.row_trials[:rows] = record["row_trials"][:rows]
                self.cal_hits[:] = record["cal_hits"]
                self.cal_trials[:] = record["cal_trials"]
            else:
                self.cal_hits[:] = 0
                self.cal_trials[:] = 0
        except BaseException:
            (self.ids, self.probs, self.row_hits, self.row_trials,
             self.cal_hits, self.cal_trials) = kept
            raise


# --------------------------------------------------------------- draft tree
_NO_CALIBRATION = np.zeros(0, np.float64)


def _cal_rates(matrix: AdjacencyMatrix, calibrate: bool) -> np.ndarray:
    return matrix.calibration_rates() if calibrate else _NO_CALIBRATION


@dataclass
class DraftTree:
    """A draft tree in BFS order: node 0 is the root (the last context
    token, not a draft); ``parent[i] < i`` for every other node.

    ``path_prob[i]`` = product of the (calibrated, see the module doc)
    target probabilities from the root to node i = estimated probability
    that the whole path to i is accepted. Nodes below ``min_path_prob`` were never added (and are never
    chosen by :func:`best_chain` if a hand-built tree has them)."""

    token: np.ndarray  # int32 [n]
    parent: np.ndarray  # int32 [n], -1 for the root
    depth: np.ndarray  # int32 [n]
    path_prob: np.ndarray  # float64 [n]
    min_path_prob: float = 0.0

    def __post_init__(self) -> None:
        self.token = np.asarray(self.token, np.int32)
        self.parent = np.asarray(self.parent, np.int32)
        self.depth = np.asarray(self.depth, np.int32)
        self.path_prob = np.asarray(self.path_prob, np.float64)
        n = self.token.shape[0]
        if not (n >= 1 and self.parent.shape == self.depth.shape
                == self.path_prob.shape == (n,)):
            raise ValueError("token/parent/depth/path_prob must be 1-D, same length >= 1")
        if self.parent[0] != -1 or self.depth[0] != 0:
            raise ValueError("node 0 must be the root (parent -1, depth 0)")
        idx = np.arange(1, n)
        if n > 1 and not ((self.parent[1:] >= 0).all() and (self.parent[1:] < idx).all()
                          and (self.depth[1:] == self.depth[self.parent[1:]] + 1).all()):
            raise ValueError("every node's parent must come before it, one level up")

    @classmethod
    def build(cls, matrix: AdjacencyMatrix, root_token: int, max_depth: int,
              tree_breadth: Sequence[int], max_nodes: int,
              min_path_prob: float, calibrate: bool = True) -> "DraftTree":
        """BFS from ``root_token`` over ``matrix``: a node at depth d gets the
        ``tree_breadth[d]`` best candidates of its token (last value repeats)
        whose path probability is >= ``min_path_prob``; depth <= max_depth,
        at most ``max_nodes`` nodes (root included). ``calibrate=False``
        uses the stored probabilities as they are."""
        max_nodes = max(1, int(max_nodes))
        tok = np.empty(max_nodes, np.int32)
        par = np.empty(max_nodes, np.int32)
        dep = np.empty(max_nodes, np.int32)
        pp = np.empty(max_nodes, np.float64)
        n = _bfs(matrix.ids, matrix.probs, matrix.row_hits, matrix.row_trials,
                 _cal_rates(matrix, calibrate), _ROW_PRIOR, np.int64(root_token),
                 np.int64(max_depth), np.asarray(tree_breadth, np.int64),
                 np.int64(max_nodes), float(min_path_prob), tok, par, dep, pp)
        return cls(tok[:n].copy(), par[:n].copy(), dep[:n].copy(), pp[:n].copy(),
                   float(min_path_prob))

    def __len__(self) -> int:
        return int(self.token.shape[0])

    def children(self, node: int) -> list[int]:
        return np.flatnonzero(self.parent == node).tolist()

    def path(self, node: int) -> list[int]:
        """Draft tokens from the root (excluded) to ``node`` (included)."""
        out = []
        while node > 0:
            out.append(int(self.token[node]))
            node = int(self.parent[node])
        return out[::-1]

    def paths(self) -> dict[tuple[int, ...], float]:
        """Every root path (as a token tuple) with its path probability."""
        return {tuple(self.path(i)): float(self.path_prob[i]) for i in range(1, len(self))}


def best_chain(tree: DraftTree) -> list[int]:
    """The root path of ``tree`` with the most expected accepted tokens.

    Chain verification accepts a prefix of the draft: token i counts only if
    tokens 1..i are all accepted, with estimated probability path_prob(i).
    So a chain's expected accepted length is the sum of path_prob along it;
    each drafted token also costs ``tree.min_path_prob`` (the price of
    verifying it, in accepted tokens). Net gains accumulate root-down in one
    pass over the BFS order (a DP over the tree); the best chain ends at the
    node with the largest sum. This is not always the greedy top-1 path: a
    slightly less likely first token with a confident continuation can be
    worth more."""
    gain = np.empty(len(tree), np.float64)
    v = _best_node(tree.parent, tree.path_prob, np.int64(len(tree)),
                   float(tree.min_path_prob), gain)
    return tree.path(int(v))


# ----------------------------------------------------------------- proposer
class TokenRecyclingProposer(Proposer):
    """Token Recycling: drafts from a shared matrix of the target's past top-k."""

    def __init__(self, config: TokenRecyclingConfig, num_speculative_tokens: int) -> None:
        self.config = config
        self.num_speculative_tokens = max(0, int(num_speculative_tokens))
        self.target_topk = int(config.topk)
        self.matrix = AdjacencyMatrix(config.topk, config.max_vocab_size)
        self._breadth = np.asarray(config.tree_breadth, np.int64)
        self._max_nodes = int(config.max_tree_nodes)
        self._min_prob = float(config.min_path_prob)
        self._batch_slope = float(config.batch_cost_slope)
        self._calibrate = bool(config.calibrate)
        self._step_cost = None  # StepCostModel, when measured pricing is on
        # Scratch for the kernels, reused every step (one tree at a time).
        self._tok = np.empty(self._max_nodes, np.int32)
        self._par = np.empty(self._max_nodes, np.int32)
        self._dep = np.empty(self._max_nodes, np.int32)
        self._pp = np.empty(self._max_nodes, np.float64)
        self._gain = np.empty(self._max_nodes, np.float64)
        # Rows written since the last export_shared (sharing only; <= vocab).
        self._dirty: Optional[set[int]] = None
        if config.matrix_path and os.path.exists(config.matrix_path):
            self.load(config.matrix_path)

    # ---------------------------------------------------------- lifecycle
    def start_request(self, req_id: str, prompt_token_ids: np.ndarray) -> None:
        """No per-request state: the matrix is shared (see the module doc).
        The other hooks ignore the state they are given."""
        return None

    def on_tokens(self, state: RequestState, new_token_ids: np.ndarray) -> None:
        pass  # everything it learns comes through on_target_topk

    def on_target_topk(self, state: RequestState, input_token_ids: np.ndarray,
                       topk_ids: np.ndarray, topk_probs: np.ndarray) -> None:
        self.matrix.update(input_token_ids, topk_ids, topk_probs)
        if self._dirty is not None:
            self._dirty.update(int(t) for t in input_token_ids
                               if 0 <= t < self.matrix.rows_allocated)

    # ------------------------------------------------------------ sharing
    def enable_sharing(self) -> None:
        if self._dirty is None:
            self._dirty = set()

    def export_shared(self) -> Optional[dict]:
        """The rows written since the last export (with their reliability)."""
        if not self._dirty:
            return None
        m = self.matrix
        rows = np.array(sorted(self._dirty), np.int64)
        self._dirty.clear()
        rows = rows[m.ids[rows, 0] >= 0]
        if rows.size == 0:
            return None
        return {"recycling_rows": {"k": m.k, "tokens": rows.astype(np.int32),
                                   "ids": m.ids[rows].copy(), "probs": m.probs[rows].copy(),
                                   "row_hits": m.row_hits[rows].copy(),
                                   "row_trials": m.row_trials[rows].copy()}}

    def import_shared(self, payload: dict) -> None:
        """Overwrite rows with another replica's (newest wins, like the
        matrix itself); a payload of another width is ignored."""
        rows = payload.get("recycling_rows")
        if rows and int(rows.get("k", -1)) == self.matrix.k:
            self.matrix.import_rows(rows["tokens"], rows["ids"], rows["probs"],
                                    rows["row_hits"], rows["row_trials"])

    @property
    def stats(self) -> dict[str, object]:
        """Diagnostics for ``drafter_snapshot``: matrix fill and reliability."""
        m = self.matrix
        return {"rows_filled": m.rows_filled, "matrix_bytes": m.nbytes,
                "calibrate": self._calibrate, "threshold_1_row": round(self.draft_threshold(1), 4),
                **m.reliability()}

    def set_step_cost(self, model) -> None:
        if self.config.draft_price == "measured":
            self._step_cost = model

    # ------------------------------------------------------------ drafting
    def draft_threshold(self, step_rows: int = 1) -> float:
        """Path probability a drafted token needs (= its verification cost in
        accepted tokens). ``draft_price="measured"``: the engine's measured
        price for a step of ``step_rows`` rows, once the measurement is
        trustworthy. Otherwise (and until then) ``min_path_prob`` at one row,
        rising by ``batch_cost_slope`` per extra row, at most 0.95."""
        rows = max(1, int(step_rows))
        if self._step_cost is not None:
            price = self._step_cost.token_price(rows)
            if price is not None:
                return price
        return min(0.95, self._min_prob * (1.0 + self._batch_slope * (rows - 1)))

    def draft_tree(self, context: np.ndarray, max_tokens: int,
                   step_rows: int = 1) -> DraftTree:
        """The full draft tree for ``context`` (for tree verification and
        inspection; ``propose`` uses the same kernels without building it)."""
        k = min(int(max_tokens), self.num_speculative_tokens)
        root = int(context[-1]) if len(context) else -1
        return DraftTree.build(self.matrix, root, max(k, 0), self._breadth,
                               self._max_nodes, self.draft_threshold(step_rows),
                               self._calibrate)

    def propose(self, state: RequestState, context: np.ndarray, max_tokens: int) -> list[int]:
        return self.propose_batch([(state, context, max_tokens)])[0]

    def propose_batch(self, batch: Sequence[tuple[RequestState, np.ndarray, int]],
                      step_rows: Optional[int] = None) -> list[list[int]]:
        """Drafts for every row. ``step_rows``: rows the engine verifies this
        step (default ``len(batch)``; the hybrid passes the full step when it
        hands over only some rows), which sets :meth:`draft_threshold`."""
        threshold = self.draft_threshold(len(batch) if step_rows is None else step_rows)
        return [d.tokens for d in self._propose(batch, threshold)]

    def propose_scored_batch(self, batch: Sequence[tuple[RequestState, np.ndarray, int]],
                             price: Optional[float] = None) -> list[ScoredDraft]:
        """Each row's best chain with its tokens' calibrated probabilities
        (given the tokens before). The chain is chosen with ``price`` (the
        shared draft budget's, when it has one) as the cost of a token."""
        threshold = self.draft_threshold(len(batch)) if price is None else float(price)
        return self._propose(batch, threshold)

    def _propose(self, batch, threshold: float) -> list[ScoredDraft]:
        nb = len(batch)
        roots = np.empty(nb, np.int64)
        caps = np.empty(nb, np.int64)
        cap_all = self.num_speculative_tokens
        for i, (_state, ctx, k) in enumerate(batch):
            roots[i] = ctx[-1] if len(ctx) else -1
            caps[i] = k if k < cap_all else cap_all
        width = int(caps.max()) if nb else 0
        if width <= 0:
            return [ScoredDraft([], []) for _ in range(nb)]
        out = np.empty((nb, width), np.int32)
        out_p = np.empty((nb, width), np.float64)
        lens = np.empty(nb, np.int64)
        m = self.matrix
        _propose_rows(m.ids, m.probs, m.row_hits, m.row_trials,
                      _cal_rates(m, self._calibrate), _ROW_PRIOR, roots, caps, self._breadth,
                      self._max_nodes, threshold, out, out_p, lens, self._tok, self._par,
                      self._dep, self._pp, self._gain)
        return [ScoredDraft(out[i, :lens[i]].tolist(), out_p[i, :lens[i]].tolist())
                for i in range(nb)]

    # --------------------------------------------------------- persistence
    def save_state(self) -> bool:
        if not self.config.matrix_path:
            return False
        self.save(self.config.matrix_path)
        return True

    def save(self, path: str) -> None:
        """Write the matrix (atomic .npz, see AdjacencyMatrix.save)."""
        self.matrix.save(path)

    def load(self, path: str) -> bool:
        """Replace the matrix with the one at ``path``. A missing, corrupt or
        mismatched file logs a warning and keeps the current matrix; returns
        whether it loaded."""
        try:
            self.matrix.load(path)
        except (OSError, ValueError) as e:
            logger.warning("Ignoring token-recycling matrix file %s: %s", path, e)
            return False
        return True

    def warmup(self) -> None:
        warmup()


# ===================================================================== warmup
def warmup() -> None:
    """Compile (or load from numba's on-disk cache) every kernel, with the
    argument types the proposer uses."""
    m = AdjacencyMatrix(2, 16, initial_rows=4)
    m.update(np.array([1, 2], np.int32), np.array([[2, 3], [1, 3]], np.int32),
             np.array([[0.6, 0.3], [0.9, 0.05]], np.float32))
    p = TokenRecyclingProposer(TokenRecyclingConfig(topk=2, tree_breadth=[2, 1],
                                                    max_tree_nodes=8), 4)
    p.matrix = m
    p.propose_batch([(p.start_request("w", np.array([1], np.int32)),
                      np.array([1], np.int32), 4)])
    best_chain(DraftTree.build(m, 1, 4, [2, 1], 8, 0.0))
    best_chain(DraftTree.build(m, 1, 4, [2, 1], 8, 0.0, calibrate=False))
