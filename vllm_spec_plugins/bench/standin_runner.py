"""A stand-in for vLLM's model runner, to test and time the integration layer
without an engine (tests/test_integration_standin.py, bench/step_stall.py): it calls the drafter's hooks in the order the patched
runner does (step start with finished ids, the draft call, ``propose``) and
verifies drafts against a known continuation, as greedy verification would.

The drafter's step timer reads a synthetic clock that advances by a modelled
step cost (a fixed part, per row, per verified token), not the wall clock: a
stand-in step costs microseconds of noise, and a draft price measured from
that noise would make the budget, and so every test here, depend on the
machine's load.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from vllm_spec_plugins.engine_config import DRAFTER_CLASS_PATH, speculative_config


def vllm_config(settings: dict, k: int = 8, max_model_len: int = 4096, **extra: Any):
    spec = SimpleNamespace(**speculative_config(k))
    assert spec.model == DRAFTER_CLASS_PATH
    return SimpleNamespace(speculative_config=spec,
                           model_config=SimpleNamespace(max_model_len=max_model_len),
                           additional_config={"spec_plugins": settings, **extra})


@dataclass
class StandInRequest:
    req_id: str
    prompt: list[int]
    target: list[int]            # what the target model will emit, in order
    output: list[int] = field(default_factory=list)


class StandInRunner:
    """Runs requests to completion through a PluginDrafter, verifying drafts
    greedily against each request's known target continuation."""

    #: Modelled cost of one step: (fixed s, s per row, s per scheduled token),
    #: roughly a small model's decode step on CPU.
    STEP_COST_S = (0.020, 0.001, 0.0005)

    def __init__(self, drafter, max_reqs: int = 16, max_len: int = 4096,
                 step_cost_s: tuple[float, float, float] = STEP_COST_S) -> None:
        self.drafter = drafter
        self.step_cost_s = step_cost_s
        self.modelled_seconds = 0.0
        drafter.timer.clock = lambda: self.modelled_seconds
        self.token_ids_cpu = np.zeros((max_reqs, max_len), np.int32)
        self.input_batch = SimpleNamespace(req_ids=[], num_prompt_tokens=np.zeros(max_reqs, np.int64))
        self.rows: list[StandInRequest] = []
        self.drafts: dict[str, list[int]] = {}
        self.finished: list[str] = []
        self.accepted = 0
        self.step_seconds: list[float] = []
        self.drafter_seconds: list[float] = []  # time inside the drafter's hooks, per step

    def add(self, req: StandInRequest) -> None:
        self.rows.append(req)

    def abort(self, req_id: str) -> None:
        self.rows = [r for r in self.rows if r.req_id != req_id]
        self.finished.append(req_id)

    def step(self, budget: int = 0) -> list[list[int]]:
        t0 = time.perf_counter()
        per_req = {r.req_id: 1 + len(self.drafts.get(r.req_id, ())) for r in self.rows}
        sched = SimpleNamespace(
            finished_req_ids=set(self.finished),
            # vLLM's last step before going idle schedules nothing (0 tokens).
            total_num_scheduled_tokens=sum(per_req.values()),
            scheduled_new_reqs=(), num_spec_tokens_to_schedule=budget,
            num_scheduled_tokens=per_req,
            scheduled_spec_decode_tokens={r.req_id: self.drafts.get(r.req_id, []) for r in self.rows})
        self.finished = []
        t_hooks = time.perf_counter()
        self.drafter.on_step_start(self, sched)
        fixed, per_row, per_token = self.step_cost_s
        self.modelled_seconds += (fixed + per_row * len(self.rows)
                                  + per_token * sched.total_num_scheduled_tokens)
        in_drafter = time.perf_counter() - t_hooks
        sampled: list[list[int]] = []
        self.input_batch.req_ids = [r.req_id for r in self.rows]
        for i, r in enumerate(self.rows):
            # greedy verification: accept the draft's prefix that matches the target
            pos = len(r.output)
            new = []
            for t in self.drafts.get(r.req_id, []):
                if pos + len(new) < len(r.target) and r.target[pos + len(new)] == t:
                    new.append(t)
                else:
                    break
            self.accepted += len(new)
            if pos + len(new) < len(r.target):
                new.append(r.target[pos + len(new)])  # the bonus / corrected token
            r.output += new
            seq = r.prompt + r.output
            self.token_ids_cpu[i, :len(seq)] = seq
            self.input_batch.num_prompt_tokens[i] = len(r.prompt)
            sampled.append(new)
        num_tokens = np.array([len(r.prompt) + len(r.output) for r in self.rows], np.int32)
        t_hooks = time.perf_counter()
        self.drafter.on_draft_call(self, sched)
        out = self.drafter.propose(sampled, num_tokens, self.token_ids_cpu)
        self.drafter_seconds.append(in_drafter + time.perf_counter() - t_hooks)
        self.drafts = {r.req_id: d for r, d in zip(self.rows, out)}
        done = [r for r in self.rows if len(r.output) >= len(r.target)]
        for r in done:
            self.rows.remove(r)
            self.finished.append(r.req_id)
        self.step_seconds.append(time.perf_counter() - t0)
        return out

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.rows:
                break
            self.step()
        self.step()  # the step that tells the drafter about the last finished ids
