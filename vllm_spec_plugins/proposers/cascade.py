"""Cascade Speculative Drafting (arXiv 2312.11462): a draft model that is
itself drafted by cheaper drafters.

Levels, top (strongest, dearest) to bottom (cheapest):

* **draft-model levels** (:class:`~.causal_lm.CausalLMDrafter`): a small LM
  with the target's tokenizer;
* **model-free levels** (suffix tree, Token Recycling, their hybrid, n-gram
  lookup): together they make one proposal per row, the first of them (in
  order) that drafts something.

**Vertical cascade.** A model level does not generate token by token. Each
*pass* takes the proposal of the level below for the context so far and
checks it in one forward pass: the proposal's tokens are kept while they
equal the model's greedy choice, and the model's own token follows at the
first disagreement (or after the whole proposal). So a pass adds at least
one token and, where the cheap level guessed right, many. The level below
is asked again after each pass, from the extended context.

**Horizontal cascade.** Positions after the model level's last pass come
from the levels below as they are (unchecked by the model). How many passes
a model level runs is ``passes``: an int, or ``"auto"``: a pass runs only
while the acceptance measured online at the position it reaches, for tokens
this level produced, pays for the pass's measured time at the engine's
measured throughput (the same rule as the draft budget: a pass of ``s``
seconds that adds a token accepted with probability ``q`` pays iff
``q - price > s * E / T``, where ``price`` is what the budget says verifying
one more token costs at this batch).

**Check or trust.** With ``passes: "auto"``, the top model level's first
pass over a row that has a cheap proposal is a choice (``_choose_arm``):
check the proposal with the model, or send it unchecked, measured per kind
of proposal; a row with nothing to check gets the model's own pass only
where its token pays for the pass. The model reads a request's prompt only
when a pass first needs it (``prompt_read: "when_needed"``). A pass that
would first have to read many tokens (that prompt, or trusted tokens to
catch up on) waits until the gain forgone without the model, summed over
the request's steps, covers the read's measured time (``_read_pays``,
rent-or-buy), so a request the cheap levels draft alone (one that copies)
never pays for a read, and one they cannot draft reads after a few steps.

**Losslessness.** The cascade only chooses which tokens to draft; the target
verifies them. Drafts are deterministic (greedy model choices, copied
tokens), so vLLM's rejection sampler treats each as a point mass (q = 1):
under random sampling a token is accepted with the target's probability for
it, and a rejection resamples from the target with that token removed,
which leaves the target's distribution unchanged whatever chose the draft.

**Failures.** A level that raises drafts nothing for that row on that call;
the other levels go on (a model level's row falls back to the proposal
below it, unchecked). Errors are counted per level.

**Metrics.** Every drafted token carries its source (``draft_model``: the
model's own token; ``suffix_tree>draft_model``: a cheaper level's token the
model agreed with; ``suffix_tree``: a cheaper level's token past the model's
passes). When the next tokens arrive, each source's tokens are scored per
draft position (drafted, accepted): in ``stats`` (the drafter snapshot).
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

from vllm_spec_plugins.config import CascadeConfig, DraftModelLevel, check_draft_model_path

from .base import Proposer, ScoredDraft

__all__ = ["CascadeConfig", "CascadeProposer", "CascadeState", "LevelStats"]

logger = logging.getLogger("vllm_spec_plugins")

#: Draft positions tracked per source (later ones are counted in the last).
TRACKED_POSITIONS = 32
#: Prior of the online acceptance per position ("auto" passes): this many
#: pseudo-observations at PRIOR_ACCEPTANCE, so early passes run and get measured.
PRIOR_WEIGHT = 4.0
PRIOR_ACCEPTANCE = 0.6
#: Smoothing of a level's measured pass time.
PASS_TIME_EMA = 0.1


class LevelStats:
    """Drafted and accepted tokens per draft position for one source."""

    __slots__ = ("drafted", "accepted")

    def __init__(self) -> None:
        self.drafted = np.zeros(TRACKED_POSITIONS, np.int64)
        self.accepted = np.zeros(TRACKED_POSITIONS, np.int64)

    def rate(self, pos: int) -> float:
        """Accepted / drafted at ``pos`` with a prior (for ``auto`` passes)."""
        p = min(pos, TRACKED_POSITIONS - 1)
        return float((self.accepted[p] + PRIOR_WEIGHT * PRIOR_ACCEPTANCE)
                     / (self.drafted[p] + PRIOR_WEIGHT))

    def as_dict(self) -> dict[str, Any]:
        n = int(np.max(np.flatnonzero(self.drafted), initial=-1)) + 1
        d, a = int(self.drafted.sum()), int(self.accepted.sum())
        return {"drafted": d, "accepted": a,
                "acceptance": round(a / d, 3) if d else None,
                "drafted_per_position": self.drafted[:n].tolist(),
                "accepted_per_position": self.accepted[:n].tolist()}


class CascadeState(NamedTuple):
    lm: list            # per model level: its LMState (None if that level failed to start)
    lower: list         # per model-free level: what its start_request returned
    last: list          # [tokens, sources, (arm key, arm) or None] of the last draft
    read_credit: list   # per model level: gain forgone while a read was not bought


#: Arms of the top model level's first decision per row (see ``_choose_arm``).
CHECK, TRUST = "check", "trust"
#: Explore the arm that looks worse on this share of rows (keeps both measured).
ARM_EXPLORE = 0.1
#: Pseudo-observations of each arm's prior (its mean accepted tokens per row).
ARM_PRIOR_WEIGHT = 2.0


class ArmStats:
    """Rows and accepted tokens per arm for one kind of cheap proposal."""

    __slots__ = ("rows", "accepted")

    def __init__(self) -> None:
        self.rows = {CHECK: 0, TRUST: 0}
        self.accepted = {CHECK: 0, TRUST: 0}

    def mean(self, arm: str, prior: float) -> float:
        return ((self.accepted[arm] + ARM_PRIOR_WEIGHT * prior)
                / (self.rows[arm] + ARM_PRIOR_WEIGHT))


def proposal_key(sources: list[str], n: int) -> tuple[str, int]:
    """The kind of a cheap proposal: its level and its length bucket (a long
    suffix-tree or n-gram proposal means a long match: the text is copied)."""
    bucket = 1 if n <= 1 else 2 if n == 2 else 4 if n <= 4 else 8 if n <= 8 else 16
    return sources[0], bucket


class _ModelLevel:
    def __init__(self, index: int, config: DraftModelLevel) -> None:
        from .causal_lm import CausalLMDrafter

        self.index = index
        self.config = config
        self.name = "draft_model" if index == 0 else f"draft_model{index}"
        self.lm = CausalLMDrafter(check_draft_model_path(config.model), config.dtype,
                                  config.num_layers, config.max_cached_tokens, config.device,
                                  config.cpu_packing, config.max_context)
        self.pass_seconds: Optional[float] = None  # per row, smoothed
        self.passes = 0
        self.errors = 0

    def timed_predict(self, states, seqs, n_outs):
        """One pass for several rows; ``pass_seconds`` tracks its time per
        row that did not read (reads run alone and are priced apart, by
        ``read_seconds_per_token``: counting them here too charged them twice)."""
        st = self.lm.stats
        reads0, read_s0 = st["reads"], st["read_seconds"]
        t0 = time.perf_counter()
        out = self.lm.predict_batch(states, seqs, n_outs)
        dt = time.perf_counter() - t0 - (st["read_seconds"] - read_s0)
        rows = len(states) - (st["reads"] - reads0)
        if rows > 0 and dt > 0:
            dt /= rows
            ps = self.pass_seconds
            self.pass_seconds = dt if ps is None else ps + PASS_TIME_EMA * (dt - ps)
        self.passes += 1
        return out


class CascadeProposer(Proposer):
    """Draft-model levels over model-free levels (see module note)."""

    def __init__(self, config: CascadeConfig, num_speculative_tokens: int) -> None:
        from vllm_spec_plugins.registry import METHODS

        self.config = config
        self.num_speculative_tokens = max(0, int(num_speculative_tokens))
        self.models: list[_ModelLevel] = []
        self.lower: list[tuple[str, Proposer]] = []
        for lvl in config.levels:
            if lvl.type == "draft_model":
                self.models.append(_ModelLevel(len(self.models), lvl))
            else:
                settings = lvl.model_dump(exclude={"type"})
                if lvl.type == "ngram":
                    from .prompt_lookup import PromptLookupConfig, PromptLookupProposer

                    p: Proposer = PromptLookupProposer(PromptLookupConfig(**settings),
                                                       num_speculative_tokens)
                else:
                    entry = METHODS[lvl.type]
                    p = entry.proposer_cls()(entry.config_cls(**settings), num_speculative_tokens)
                self.lower.append((lvl.type, p))
        self.target_topk = max([p.target_topk for _, p in self.lower], default=0)
        self.vocab_size = self.models[0].lm.vocab_size
        for m in self.models[1:]:
            if m.lm.vocab_size != self.vocab_size:
                raise ValueError(f"cascade levels {m.index} and 0 have different vocabularies "
                                 f"({m.lm.vocab_size} vs {self.vocab_size})")
        self._step_cost = None
        self.source_stats: dict[str, LevelStats] = {}
        self._level_totals: dict[int, LevelStats] = {}  # per model level; reset when scored
        self.arm_stats: dict[tuple[str, int], ArmStats] = {}
        self._rng = np.random.default_rng(0)
        self._price = 0.0
        self.arm_explore = ARM_EXPLORE
        self.lower_errors = {name: 0 for name, _ in self.lower}
        self.rows = 0

    # ---------------------------------------------------------- lifecycle
    def start_request(self, req_id: str, prompt_token_ids: np.ndarray) -> CascadeState:
        prompt = np.asarray(prompt_token_ids, dtype=np.int64)
        lm_states = []
        for m in self.models:
            st = m.lm.new_state()
            try:
                m.lm.reuse_prefix(st, prompt)  # a finished request's cache, where it fits
                if m.config.prompt_read == "at_start":
                    m.lm.predict(st, prompt, 1)  # the first step then only runs new tokens
            except Exception:
                m.errors += 1
                logger.warning("vllm-spec-plugins: cascade level %s failed reading the prompt of "
                               "%s; it re-reads the context when it drafts:\n%s", m.name, req_id,
                               traceback.format_exc())
                st.cache = None
            lm_states.append(st)
        lower = []
        for name, p in self.lower:
            try:
                lower.append(p.start_request(req_id, prompt_token_ids))
            except Exception:
                self._lower_failed(name, "start_request")
                lower.append(_BROKEN)
        return CascadeState(lm_states, lower, [None, None, None], [0.0] * len(self.models))

    def on_tokens(self, state: CascadeState, new_token_ids: np.ndarray) -> None:
        self._score_last(state, new_token_ids)
        for i, (name, p) in enumerate(self.lower):
            s = state.lower[i]
            if s is _BROKEN:
                continue
            try:
                p.on_tokens(s, new_token_ids)
            except Exception:
                self._lower_failed(name, "on_tokens")
                state.lower[i] = _BROKEN

    def on_target_topk(self, state: CascadeState, input_token_ids, topk_ids, topk_probs) -> None:
        for i, (name, p) in enumerate(self.lower):
            if p.target_topk and state.lower[i] is not _BROKEN:
                try:
                    p.on_target_topk(state.lower[i], input_token_ids, topk_ids, topk_probs)
                except Exception:
                    self._lower_failed(name, "on_target_topk")

    def finish_request(self, state: CascadeState, aborted: bool = False) -> None:
        for m, st in zip(self.models, state.lm):
            m.lm.release(st, keep=not aborted)
        for i, (name, p) in enumerate(self.lower):
            if state.lower[i] is not _BROKEN:
                try:
                    p.finish_request(state.lower[i], aborted)
                except Exception:
                    self._lower_failed(name, "finish_request")

    def _lower_failed(self, name: str, where: str) -> None:
        self.lower_errors[name] += 1
        logger.warning("vllm-spec-plugins: cascade level %s failed in %s (the other levels go "
                       "on drafting):\n%s", name, where, traceback.format_exc())

    # ------------------------------------------------------------- scoring
    def _score_last(self, state: CascadeState, new: np.ndarray) -> None:
        """Score the last draft against the tokens that followed it: position
        i was reached if all before it matched; it was accepted if it matched
        too. (A token past the budget's cut that equals the target's next
        token counts as accepted: the target did produce it.)"""
        tokens, sources, arm = state.last
        state.last[0] = state.last[1] = state.last[2] = None
        if not tokens:
            return
        self._level_totals.clear()
        n = min(len(tokens), len(new))
        accepted = 0
        for i in range(n):
            st = self.source_stats.get(sources[i])
            if st is None:
                st = self.source_stats[sources[i]] = LevelStats()
            p = min(i, TRACKED_POSITIONS - 1)
            st.drafted[p] += 1
            if int(new[i]) != tokens[i]:
                break
            st.accepted[p] += 1
            accepted += 1
        if arm is not None and n:
            a = self.arm_stats.setdefault(arm[0], ArmStats())
            a.rows[arm[1]] += 1
            a.accepted[arm[1]] += accepted

    # ------------------------------------------------------------ drafting
    def propose(self, state: CascadeState, context: np.ndarray, max_tokens: int) -> list[int]:
        return self.propose_scored_batch([(state, context, max_tokens)])[0].tokens

    def propose_scored_batch(self, batch: Sequence[tuple[CascadeState, np.ndarray, int]],
                             price: Optional[float] = None) -> list[ScoredDraft]:
        """One draft per row: the top model level's, built as the module note says."""
        self.rows += len(batch)
        items = [(state, np.asarray(ctx, dtype=np.int64), min(int(k), self.num_speculative_tokens))
                 for state, ctx, k in batch]
        self._arms: dict[int, tuple] = {}  # row -> (arm key, arm) of this step
        self._price = float(price) if price is not None else 0.0
        out = []
        drafts = self._draft(0, items, len(batch))
        for r, ((state, _, _), (toks, probs, srcs)) in enumerate(zip(items, drafts)):
            state.last[0], state.last[1], state.last[2] = toks, srcs, self._arms.get(r)
            out.append(ScoredDraft(toks, probs, self._stratum(srcs)))
        return out

    def _stratum(self, sources: list[str]) -> int:
        """The budget calibrates per stratum: the first token's kind of source
        (model's own / checked by a model / unchecked), per model level."""
        if not sources:
            return 0
        s = sources[0]
        if ">" in s:
            return 1
        return 0 if s.startswith("draft_model") else 2

    def _lower_draft(self, state: CascadeState, ctx: np.ndarray, k: int, rows: int
                     ) -> tuple[list[int], list[float], list[str]]:
        for i, (name, p) in enumerate(self.lower):
            s = state.lower[i]
            if s is _BROKEN or k <= 0:
                continue
            try:
                d = p.propose_scored_batch([(s, ctx.astype(np.int32), k)], None)[0]
            except Exception:
                self._lower_failed(name, "propose")
                continue
            if d.tokens:
                toks = [int(t) for t in d.tokens[:k]]
                probs = list(d.probs[:k]) if d.probs is not None else [0.5] * len(toks)
                return toks, [float(x) for x in probs], [name] * len(toks)
        return [], [], []

    def _draft(self, level: int, items: list, rows: int) -> list:
        """Drafts at ``level`` for ``items`` = [(state, ctx, k)]: a list of
        (tokens, probs, sources). A model level runs its passes for all rows
        together: one batched forward per pass."""
        out = [([], [], []) for _ in items]
        live = [i for i, (_, _, k) in enumerate(items) if k > 0]
        if not live:
            return out
        if level >= len(self.models):
            for i in live:
                st, ctx, k = items[i]
                out[i] = self._lower_draft(st, ctx, k, rows)
            return out
        m = self.models[level]
        passes = 0
        active = list(live)
        while active:
            active = [i for i in active if len(out[i][0]) < items[i][2]
                      and self._pass_pays(m, len(out[i][0]), passes, rows)]
            if not active:
                break
            if m.config.vertical:
                below = self._draft(level + 1, [(items[i][0], _extend(items[i][1], out[i][0]),
                                                 items[i][2] - len(out[i][0])) for i in active],
                                    rows)
            else:  # horizontal only: the model's own next token, nothing to check
                below = [([], [], []) for _ in active]
            if passes == 0 and level == 0 and m.config.vertical and m.config.passes == "auto":
                # Check the cheap proposal with the model, or send it as it
                # is? With nothing to check: does the model's own token pay?
                kept = []
                for i, b in zip(active, below):
                    st = items[i][0]
                    pending = m.lm.pending_tokens(st.lm[level], _extend(items[i][1], b[0]),
                                                  len(b[0]) + 1)
                    if b[0]:
                        if self._choose_arm(i, m, proposal_key(b[2], len(b[0])), pending,
                                            st.read_credit) == TRUST:
                            out[i] = (list(b[0]), list(b[1]), list(b[2]))
                            continue
                    elif not self._own_pass_pays(m, pending, st.read_credit):
                        continue  # this row drafts nothing this step
                    kept.append((i, b))
                if len(kept) < len(active):
                    active = [i for i, _ in kept]
                    below = [b for _, b in kept]
                    if not active:
                        break
            seqs = [_extend(items[i][1], out[i][0] + b[0]) for i, b in zip(active, below)]
            try:
                preds = m.timed_predict([items[i][0].lm[level] for i in active], seqs,
                                        [len(b[0]) + 1 for b in below])
            except Exception:
                m.errors += 1
                logger.warning("vllm-spec-plugins: cascade level %s failed drafting (its rows "
                               "fall back to the levels below):\n%s", m.name,
                               traceback.format_exc())
                for i in active:
                    items[i][0].lm[level].cache = None
                break
            passes += 1
            for i, (b_toks, _, b_srcs), (ids, p) in zip(active, below, preds):
                toks, probs, srcs = out[i]
                n = 0
                while n < len(b_toks) and int(ids[n]) == b_toks[n]:
                    n += 1
                toks += b_toks[:n]
                probs += [float(x) for x in p[:n]]
                srcs += [f"{x}>{m.name}" for x in b_srcs[:n]]
                if len(toks) < items[i][2]:
                    toks.append(int(ids[n]))
                    probs.append(float(p[n]))
                    srcs.append(m.name)
        # horizontal: the rest from the levels below, unchecked
        rest = [i for i in live if len(out[i][0]) < items[i][2]]
        if rest:
            fill = self._draft(level + 1, [(items[i][0], _extend(items[i][1], out[i][0]),
                                            items[i][2] - len(out[i][0])) for i in rest], rows)
            for i, (b_toks, b_probs, b_srcs) in zip(rest, fill):
                out[i][0].extend(b_toks)
                out[i][1].extend(b_probs)
                out[i][2].extend(b_srcs)
        return out

    def _choose_arm(self, row: int, m: _ModelLevel, key: tuple[str, int], pending: int,
                    credit: Optional[list] = None) -> str:
        """For a row with a cheap proposal of kind ``key``: check it with the
        model (a pass of measured time) or trust it unchecked (free)? Measured
        per kind: accepted tokens per row under each arm, the check's less
        what its time is worth (seconds x the engine's tokens per second).
        Where copying wins (a long suffix match), trusting it keeps what the
        cheap level wins alone; where it guesses, the model's check pays.

        ``pending``: the tokens the check's forward would run. Past
        READ_MIN_TOKENS it is a *read* (the prompt not yet read, or a long
        run of trusted tokens to catch up on), bought as ``_read_pays`` says
        with the request's ``credit``; neither a first try nor exploration
        (the arm that looks worse, on ARM_EXPLORE of rows) pays for one."""
        from .causal_lm import READ_MIN_TOKENS

        a = self.arm_stats.get(key) or ArmStats()
        tps = self._tokens_per_second()
        reading = pending >= READ_MIN_TOKENS
        if tps is None or m.pass_seconds is None:
            arm = TRUST if reading else CHECK
        else:
            prior = (a.accepted[CHECK] + a.accepted[TRUST] + 1.0) / (
                a.rows[CHECK] + a.rows[TRUST] + 1.0)
            # until checks of this kind are measured, a check is taken to add
            # what the model's own next token is worth (its acceptance at
            # position 1): else a kind never checked while reads are pending
            # would never build the credit that buys its first read
            check = (a.mean(CHECK, prior + self._level_stats(m).rate(0))
                     - m.pass_seconds * tps)
            trust = a.mean(TRUST, prior)
            if reading:
                credit = credit if credit is not None else [0.0] * (m.index + 1)
                arm = CHECK if self._read_pays(m, credit, check - trust, pending, tps) else TRUST
            else:
                arm = TRUST if trust > check else CHECK
        if not reading and self._rng.random() < self.arm_explore:
            arm = TRUST if arm == CHECK else CHECK
        self._arms[row] = (key, arm)
        return arm

    def _own_pass_pays(self, m: _ModelLevel, pending: int, credit: list) -> bool:
        """A row with nothing to check: does the model's own next token pay
        for its pass (its measured acceptance at position 1, less the
        budget's price, against the pass's time at the engine's throughput),
        and for the read before it if there is one (``_read_pays``)? A pass
        that does not pay still runs on ARM_EXPLORE of rows, so the
        acceptance stays measured; nothing measured yet: it runs."""
        from .causal_lm import READ_MIN_TOKENS

        tps = self._tokens_per_second()
        if tps is None or m.pass_seconds is None:
            return True
        gain = self._level_stats(m).rate(0) - self._price - m.pass_seconds * tps
        if pending >= READ_MIN_TOKENS:
            return self._read_pays(m, credit, gain, pending, tps)
        return gain > 0 or self._rng.random() < self.arm_explore

    def _read_pays(self, m: _ModelLevel, credit: list, gain: float, pending: int,
                   tps: float) -> bool:
        """Buy a read (``pending`` tokens) now? A read is paid once and serves
        the rest of the request, so it is not charged to the one step that
        causes it: ``gain`` (in tokens: what this step's model pass would add
        over going without it) is added to the request's ``credit`` each
        step the read is not bought, and the read is bought once the credit
        covers its measured cost (rent-or-buy: never more than twice the
        cost of the best choice in hindsight). A request the cheap levels
        draft alone never builds the credit, so it never reads."""
        from .causal_lm import READ_MIN_TOKENS

        cost = (pending - READ_MIN_TOKENS) * (m.lm.read_seconds_per_token or 0.0) * tps
        credit[m.index] += max(0.0, gain)
        if credit[m.index] >= cost:
            credit[m.index] = 0.0
            return True
        return False

    def _pass_pays(self, m: _ModelLevel, pos: int, passes: int, rows: int) -> bool:
        fixed = m.config.passes
        if fixed != "auto":
            return passes < fixed
        if passes == 0:
            return True  # the first pass: it is what keeps the rate estimates measured
        st = self._level_stats(m)
        reach = 1.0
        for i in range(pos):  # the chance the draft so far is all accepted
            reach *= st.rate(i)
        # the token it adds is worth its acceptance less what verifying it
        # costs (the draft budget's price for this batch, in tokens)
        gain = reach * st.rate(pos) - self._price
        tps = self._tokens_per_second()
        if tps is None or m.pass_seconds is None:
            return gain >= 0.5
        return gain > m.pass_seconds * tps

    def _level_stats(self, m: _ModelLevel) -> LevelStats:
        """Acceptance per position of every token model level ``m`` produced
        (its own and the ones it agreed with). Kept until the next scoring:
        every row and pass of a step asks, and scores change only between steps."""
        total = self._level_totals.get(m.index)
        if total is None:
            total = self._level_totals[m.index] = LevelStats()
            for src, st in self.source_stats.items():
                if src == m.name or src.endswith(">" + m.name):
                    total.drafted += st.drafted
                    total.accepted += st.accepted
        return total

    def _tokens_per_second(self) -> Optional[float]:
        model = self._step_cost
        fn = getattr(model, "tokens_per_second", None)
        return fn() if fn is not None else None

    # ------------------------------------------------------------- the rest
    @property
    def stats(self) -> dict[str, Any]:
        levels = {}
        for m in self.models:
            levels[m.name] = {"model": m.config.model, "layers": m.lm.num_layers,
                              "packing": m.lm.packing,
                              "passes": m.passes, "errors": m.errors,
                              "pass_ms": None if m.pass_seconds is None
                              else round(m.pass_seconds * 1e3, 2),
                              "read_ms_per_token": None if m.lm.read_seconds_per_token is None
                              else round(m.lm.read_seconds_per_token * 1e3, 3),
                              **{k: (round(v, 3) if isinstance(v, float) else v)
                                 for k, v in m.lm.stats.items()}}
        for name, _ in self.lower:
            levels[name] = {"errors": self.lower_errors[name]}
        arms = {f"{k[0]}/{k[1]}": {"rows": dict(a.rows), "accepted": dict(a.accepted)}
                for k, a in sorted(self.arm_stats.items())}
        return {"rows": self.rows, "levels": levels, "check_or_trust": arms,
                "sources": {s: st.as_dict() for s, st in sorted(self.source_stats.items())}}

    def prometheus_counters(self) -> list[tuple[str, str, dict, float]]:
        """Drafted and accepted tokens per source and draft position (1-based)."""
        out = []
        for src, st in sorted(self.source_stats.items()):
            for pos in np.flatnonzero(st.drafted):
                lab = {"source": src, "position": str(int(pos) + 1)}
                out.append(("vsp_cascade_drafted_tokens_total",
                            "Cascade draft tokens by source level and draft position", lab,
                            int(st.drafted[pos])))
                out.append(("vsp_cascade_accepted_tokens_total",
                            "Accepted cascade draft tokens by source level and draft position",
                            lab, int(st.accepted[pos])))
        return out

    def set_step_cost(self, model) -> None:
        self._step_cost = model
        for _, p in self.lower:
            p.set_step_cost(model)

    def warmup(self) -> None:
        for m in self.models:
            m.lm.warmup()
        for _, p in self.lower:
            p.warmup()

    def enable_sharing(self) -> None:
        for _, p in self.lower:
            p.enable_sharing()

    def export_shared(self) -> Optional[dict]:
        out: dict = {}
        for _, p in self.lower:
            out.update(p.export_shared() or {})
        return out or None

    def import_shared(self, payload: dict) -> None:
        for _, p in self.lower:
            p.import_shared(payload)

    def save_state(self) -> bool:
        saved = False
        for _, p in self.lower:
            saved = p.save_state() or saved
        return saved


class _Broken:
    """Marks a model-free level that failed for a request: it drafts nothing more there."""

    def __repr__(self) -> str:
        return "<broken level>"


_BROKEN = _Broken()


def _extend(ctx: np.ndarray, toks: list[int]) -> np.ndarray:
    if not toks:
        return ctx
    return np.concatenate([ctx, np.asarray(toks, dtype=ctx.dtype)])
