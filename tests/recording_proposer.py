"""A proposer for the stand-in runner tests: drafts by copying and records
every hook call (per request: tokens seen, finishes; threads of starts/saves)."""

from __future__ import annotations

import threading

from vllm_spec_plugins.proposers.base import Proposer


class RecordingProposer(Proposer):
    """Drafts by copying the longest earlier occurrence of the last 2 tokens,
    and records every hook call (per request: tokens seen, finishes)."""

    class Config(__import__("pydantic").BaseModel):
        model_config = {"extra": "forbid"}
        fail_on: str = ""            # "start", "propose", "batch", "tokens"
        block_start_over: int = 0    # prompts longer than this wait for `release`
        state_path: str = ""
        wrong_drafts: bool = False   # draft tokens the target never emits, claiming certainty

    instances: list["RecordingProposer"] = []

    def __init__(self, config, k: int) -> None:
        self.config = config
        self.k = k
        self.release = threading.Event()
        self.start_threads: list[str] = []
        self.save_threads: list[str] = []
        self.finished: list[tuple[str, list[int], bool]] = []
        self.imported: list[dict] = []
        RecordingProposer.instances.append(self)

    def start_request(self, req_id, prompt):
        self.start_threads.append(threading.current_thread().name)
        if self.config.fail_on == "start" and "boom" in req_id:
            raise RuntimeError("injected start failure")
        if self.config.block_start_over and len(prompt) > self.config.block_start_over:
            assert self.release.wait(10), "the test never released the slow start"
        return {"id": req_id, "ctx": [int(t) for t in prompt], "seen": []}

    def on_tokens(self, state, new):
        if self.config.fail_on == "tokens" and "boom" in state["id"]:
            raise RuntimeError("injected on_tokens failure")
        state["ctx"] += [int(t) for t in new]
        state["seen"] += [int(t) for t in new]

    def propose(self, state, context, max_tokens):
        if self.config.fail_on == "propose" and "boom" in state["id"]:
            raise RuntimeError("injected propose failure")
        ctx = [int(t) for t in context]
        assert ctx == state["ctx"], "context and the tokens delivered disagree"
        if self.config.wrong_drafts:
            return [99_999] * max_tokens
        key = ctx[-2:]
        for s in range(len(ctx) - 3, -1, -1):
            if ctx[s:s + 2] == key:
                return ctx[s + 2:s + 2 + max_tokens]
        return []

    def propose_batch(self, batch):
        if self.config.fail_on == "batch":
            raise RuntimeError("injected batch failure")
        return super().propose_batch(batch)

    def finish_request(self, state, aborted=False):
        self.finished.append((state["id"], state["seen"], aborted))

    def save_state(self):
        if not self.config.state_path:
            return False
        with open(self.config.state_path, "w") as f:
            f.write(str(len(self.finished)))
        # recorded after the write, so a test that sees the thread also sees the file
        self.save_threads.append(threading.current_thread().name)
        return True

    def export_shared(self):
        return None

    def import_shared(self, payload):
        self.imported.append(payload)
