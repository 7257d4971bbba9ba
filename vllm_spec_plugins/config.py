"""Pydantic settings of every method. Imports neither vLLM nor numba, so the
integration layer can validate a user's settings in the API-server / LLM
process at startup, before any worker exists."""

from __future__ import annotations

import os
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


def _same_path(a: str, b: str) -> bool:
    def norm(p: str) -> str:
        return os.path.abspath(os.path.expanduser(p))
    return norm(a) == norm(b)


class SuffixTreeConfig(BaseModel):
    """Settings of :class:`SuffixTreeProposer` (SuffixDecoding)."""

    model_config = ConfigDict(extra="forbid")

    max_tree_depth: int = Field(
        64, ge=2, le=1024,
        description="Longest substring stored in the suffix tries; matches use "
                    "at most max_tree_depth-1 context tokens.")
    max_spec_factor: float = Field(
        1.0, ge=0.0, allow_inf_nan=False,
        description="Draft cap = min(k, floor(match_len*factor + offset)): "
                    "longer matches are more trustworthy, so draft more.")
    max_spec_offset: float = Field(
        0.0, allow_inf_nan=False,
        description="Additive term of the draft cap (may be negative).")
    min_token_prob: float = Field(
        0.1, ge=0.0, le=1.0,
        description="Stop drafting when the cumulative estimated probability "
                    "of the drafted path falls below this.")
    use_global_cache: bool = Field(
        True, description="Also draft from responses of finished requests.")
    max_cached_requests: int = Field(
        10000, ge=0,
        description="Global cache bound: responses kept (oldest evicted first).")
    max_cached_tokens: int = Field(
        2_000_000, ge=0,
        description="Global cache bound: total response tokens kept (oldest "
                    "evicted first; a longer single response is not cached).")
    cache_path: str | None = Field(
        None,
        description="If set and the file exists, load the global cache from "
                    "it at construction (a bad file only logs a warning).")



class TokenRecyclingConfig(BaseModel):
    """Settings of :class:`TokenRecyclingProposer` (Token Recycling,
    arXiv 2408.08696)."""

    model_config = ConfigDict(extra="forbid")

    topk: int = Field(
        8, ge=1, le=32,
        description="Candidates kept per token in the adjacency matrix (its "
                    "width) and asked of the target each step. 8 as in the "
                    "paper: deeper ranks are rarely accepted, and memory grows "
                    "linearly (max_vocab_size*topk*8 bytes at most).")
    tree_breadth: list[int] = Field(
        [4, 2, 1], min_length=1, max_length=64,
        description="Draft-tree template: tree_breadth[d] = children kept per "
                    "node at depth d (the root is depth 0, the last value "
                    "repeats deeper). Default: the 4 best first tokens x 2 "
                    "second tokens = 8 candidate prefixes, each extended "
                    "greedily; one chain is verified, and its acceptance "
                    "hinges most on its first tokens. 1+4+8*15 = 125 nodes "
                    "reach depth 16 within max_tree_nodes.")
    max_tree_nodes: int = Field(
        128, ge=2, le=4096,
        description="Draft-tree size bound, root included (BFS stops when it "
                    "is reached, cutting the deepest level first). 128 fits "
                    "the default template at 16 draft tokens.")
    min_path_prob: float = Field(
        0.1, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Drop tree nodes whose estimated acceptance probability "
                    "(product of the calibrated target probabilities along the "
                    "path) is below this, and charge it per drafted token when "
                    "choosing the chain: the price of verifying one token, in "
                    "accepted tokens. The draft is only as long as it pays. 0.1 "
                    "= suffix_tree's min_token_prob (a step with one row); "
                    "raise it for a compute-bound verifier, lower it where "
                    "extra verified tokens are nearly free (GPU, small batch).")
    batch_cost_slope: float = Field(
        0.25, ge=0.0, le=10.0, allow_inf_nan=False,
        description="The threshold grows with the rows verified in a step: "
                    "min_path_prob * (1 + batch_cost_slope * (rows - 1)), at "
                    "most 0.95. A bigger batch leaves less idle compute for "
                    "rejected tokens. 0 = the same threshold at every batch.")
    draft_price: Literal["measured", "fixed"] = Field(
        "measured",
        description="What a drafted token must be worth. 'measured': the "
                    "engine times its own steps (time vs tokens verified) and "
                    "prices a token at the acceptance probability that pays for "
                    "its verification at the current batch; min_path_prob and "
                    "batch_cost_slope apply until that measurement is reliable "
                    "(a few dozen decode steps). 'fixed': always min_path_prob "
                    "and batch_cost_slope.")
    calibrate: bool = Field(
        True,
        description="Correct the stored probabilities by what past overwrites "
                    "showed (a row's old top-1 vs the new argmax; a curve per "
                    "probability bin and a record per row). False = the "
                    "paper's raw stored probabilities.")
    max_vocab_size: int = Field(
        262144, ge=1, le=16_777_216,
        description="Memory bound: the matrix has at most this many rows "
                    "(token ids at or above it are ignored). 262144 = 2^18 "
                    "covers Llama 3 (128256), Qwen 2.5/3 (151936) and Gemma 2 "
                    "(256000); at topk 8 the full matrix is 16 MiB.")
    matrix_path: str | None = Field(
        None,
        description="If set and the file exists, load the matrix from it at "
                    "construction (a bad file only logs a warning); save() "
                    "writes this format.")

    @field_validator("tree_breadth")
    @classmethod
    def _breadth_within_topk(cls, v: list[int], info: ValidationInfo) -> list[int]:
        topk = info.data.get("topk")
        for b in v:
            if b < 1 or (topk is not None and b > topk):
                raise ValueError(f"every value must be in 1..topk ({topk}), got {v}")
        return v


class SuffixRecyclingConfig(BaseModel):
    """Settings of :class:`SuffixRecyclingProposer`: suffix tree when the
    context repeats itself, Token Recycling otherwise (SAM-Decoding style)."""

    model_config = ConfigDict(extra="forbid")

    suffix_tree: SuffixTreeConfig = Field(
        default_factory=SuffixTreeConfig,
        description="Settings of the suffix-tree half (see method suffix_tree).")
    token_recycling: TokenRecyclingConfig = Field(
        default_factory=TokenRecyclingConfig,
        description="Settings of the Token Recycling half (see method "
                    "token_recycling).")
    min_suffix_match: int = Field(
        4, ge=1, le=1023,
        description="Use the suffix-tree draft when its matched context "
                    "suffix has at least this many tokens (and it drafted "
                    "something); Token Recycling otherwise. Matches of 1-3 "
                    "tokens occur by chance in any long context; 4+ usually "
                    "means the text is being copied. At most "
                    "suffix_tree.max_tree_depth-1 (the longest match).")

    @field_validator("min_suffix_match")
    @classmethod
    def _reachable_match(cls, v: int, info: ValidationInfo) -> int:
        st = info.data.get("suffix_tree")
        if st is not None and v > st.max_tree_depth - 1:
            raise ValueError(f"must be <= suffix_tree.max_tree_depth-1 "
                             f"({st.max_tree_depth - 1}): longer matches are never found")
        return v

    @field_validator("token_recycling")
    @classmethod
    def _distinct_state_files(cls, v: TokenRecyclingConfig,
                              info: ValidationInfo) -> TokenRecyclingConfig:
        st = info.data.get("suffix_tree")
        cache, matrix = (st.cache_path if st is not None else None), v.matrix_path
        if cache and matrix and _same_path(cache, matrix):
            raise ValueError(
                f"suffix_tree.cache_path ({cache!r}) and token_recycling.matrix_path "
                f"({matrix!r}) name the same file: the matrix would overwrite the "
                f"suffix cache on every save; give each its own file")
        return v


class SharingConfig(BaseModel):
    """``additional_config.spec_plugins_sharing``: share the proposer's
    cross-request state (suffix-tree responses, Token Recycling rows) with
    the other replicas through a named Ray actor (see ``sharing.py``)."""

    model_config = ConfigDict(extra="forbid")

    hub: str = Field(
        "vllm-spec-plugins-hub", min_length=1,
        description="Name of the Ray actor holding the shared state; replicas "
                    "with the same hub (and namespace) share. Created if absent.")
    namespace: str = Field("vllm-spec-plugins", min_length=1,
                           description="Ray namespace of the hub actor.")
    ray_address: str = Field(
        "auto", description="Ray cluster to join when the engine process is not "
                            "in Ray already (Serve replicas' vLLM workers are not).")
    interval_s: float = Field(
        2.0, gt=0, le=3600, allow_inf_nan=False,
        description="Push local state and pull the others' this often (seconds).")
    retry_s: float = Field(
        30.0, gt=0, le=3600, allow_inf_nan=False,
        description="After a failure (hub gone, Ray unreachable) wait this long "
                    "before trying again; drafting goes on from the local cache.")
    max_hub_mb: int = Field(
        256, ge=1, le=65536,
        description="Memory bound of the hub's log (oldest payloads evicted).")


class DraftBudgetConfig(BaseModel):
    """``additional_config.spec_plugins.draft_budget``: the draft budget every
    method shares (integration/draft_budget.py). Each step it cuts each row's
    draft where one more token's calibrated acceptance probability no longer
    pays for verifying it, at the price this engine's own steps measure."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True,
        description="false = every method drafts what it drafts on its own "
                    "(only num_speculative_tokens and the method's own "
                    "thresholds bound it).")
    fallback_price: float = Field(
        0.1, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Price of a drafted token (acceptance probability it "
                    "needs) at one row until the engine's step times give a "
                    "reliable one (a few dozen decode steps); it rises by "
                    "fallback_rows_slope per extra row in the step, at most 0.95.")
    fallback_rows_slope: float = Field(0.25, ge=0.0, le=10.0, allow_inf_nan=False,
                                       description="See fallback_price.")
    explore_every: int = Field(
        8, ge=0, le=10**6,
        description="While the engine's steps have not yet measured what a "
                    "drafted token costs (too few steps carried drafts), one "
                    "step in this many prices drafts at fallback_price whatever "
                    "the batch, so some drafts are verified and timed; "
                    "otherwise a large batch's fallback price could keep "
                    "every draft out for good. 0 = never.")
    optimism: float = Field(
        0.5, ge=0.0, le=5.0, allow_inf_nan=False,
        description="Standard errors added to each calibrated estimate before "
                    "the cut: evidence seen rarely (a large error) is still "
                    "tried, so the calibration keeps learning it; evidence "
                    "known to fail (a small error) is not. 0 = the plain "
                    "estimate.")
    calibrate: bool = Field(
        True,
        description="Correct each method's acceptance estimates by what the "
                    "engine accepted (per kind of evidence and probability "
                    "bin). false = take the estimates as they are.")
    prior_weight: float = Field(
        8.0, gt=0.0, le=1e6, allow_inf_nan=False,
        description="How many observed tokens a method's own estimate is "
                    "worth against the observed acceptance in its bin.")
    half_life_tokens: int = Field(
        4096, ge=16, le=10**9,
        description="Observed tokens after which old evidence counts half "
                    "(the calibration follows a changing workload).")
    state_path: Optional[str] = Field(
        None,
        description="File (.npz) the calibration is saved to (every few hundred "
                    "finished requests and at exit) and loaded from at start, so a "
                    "restarted engine does not learn again what its last run knew. "
                    "One file per method. null = learnt anew at every start.")


# ------------------------------------------------------------------ cascade
class PromptLookupConfig(BaseModel):
    """Settings of :class:`PromptLookupProposer` (n-gram prompt lookup): copy
    what followed the most recent earlier occurrence of the context's last
    n tokens (n from max_n down to min_n)."""

    model_config = ConfigDict(extra="forbid")

    min_n: int = Field(2, ge=1, le=64, description="Shortest n-gram matched.")
    max_n: int = Field(5, ge=1, le=64, description="Longest n-gram matched (tried first).")
    max_context: int = Field(
        8192, ge=16, le=1 << 20,
        description="Search only the last this many context tokens (bounds the "
                    "per-step cost on long contexts).")

    @field_validator("max_n")
    @classmethod
    def _ordered(cls, v: int, info: ValidationInfo) -> int:
        lo = info.data.get("min_n")
        if lo is not None and v < lo:
            raise ValueError(f"must be >= min_n ({lo})")
        return v


def check_draft_model_path(name_or_path: str) -> str:
    """Where to load a draft model from: a fetched model of ``vllm-spec-plugins
    models``, a local Hugging Face directory, or (hub reachable, i.e.
    HF_HUB_OFFLINE unset) a hub id ``owner/name``. ValueError saying how to
    get it otherwise. Never fetches: startup must not download a model behind
    the user's back."""
    import re

    from vllm_spec_plugins import models

    if name_or_path in models.MODELS:
        d = models.model_dir(name_or_path)
        if not (d / "config.json").exists():
            raise ValueError(f"model {name_or_path!r} is not fetched yet: run "
                             f"`vllm-spec-plugins models fetch {name_or_path}`")
        return str(d)
    p = os.path.expanduser(name_or_path)
    if os.path.isfile(os.path.join(p, "config.json")):
        return p
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if not offline and re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path) and not os.path.exists(p):
        return name_or_path  # a hub id: transformers downloads it in the worker
    raise ValueError(f"{name_or_path!r} is neither a model of `vllm-spec-plugins models "
                     f"list` ({', '.join(sorted(models.MODELS))}) nor a directory with a "
                     "Hugging Face config.json" + ("" if not offline else
                                                   " (HF_HUB_OFFLINE is set: no hub ids)"))


def resolve_drafter_path(name_or_path: str) -> str:
    """A trained drafter's directory: ``name_or_path`` itself if it holds a
    drafter.json, else that name under the drafters folder (where
    ``train-drafter`` saves by default). Not checked here: see
    block_drafter.read_spec for the error a missing one gives."""
    from vllm_spec_plugins import models

    p = os.path.expanduser(name_or_path)
    if os.path.isfile(os.path.join(p, "drafter.json")) or os.sep in name_or_path:
        return p
    return str(models.drafters_root() / name_or_path)


class DraftModelLevel(BaseModel):
    """A draft-model level of a cascade: a small causal LM sharing the
    target's tokenizer, run in the worker with its own per-request KV cache."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["draft_model"] = "draft_model"
    model: str = Field(
        ..., min_length=1,
        description="A model of `vllm-spec-plugins models list` (fetched) or a "
                    "local Hugging Face directory. Must share the target's "
                    "tokenizer (same vocabulary).")
    num_layers: Optional[int] = Field(
        None, ge=1, le=1024,
        description="Use only the model's first this many transformer layers "
                    "(a cheaper, weaker drafter: e.g. the target itself cut "
                    "short, LayerSkip-style). null = all.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights and compute dtype of the draft model. "
                               "float32 on CPUs without native bf16.")
    cpu_packing: Literal["int8", "float16", "none"] = Field(
        "int8",
        description="On the CPU, in float32: the linear layers' weights packed for "
                    "fbgemm, several times faster than plain float32 at a drafter's "
                    "few tokens per pass. int8: int8 weights and activations, the "
                    "fastest, and the best end to end in the Qwen benchmark; "
                    "float16: float16 weights, float32 arithmetic, the same greedy "
                    "tokens as float32 in our checks; none: plain float32. Ignored "
                    "on a GPU. The target verifies every token: lossless either way.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the draft model runs: auto = the engine "
                            "worker's GPU when there is one, else the CPU.")
    passes: Union[Literal["auto"], int] = Field(
        "auto",
        description="Forward passes of this model per step and row. Each pass "
                    "verifies the level below's proposal in one go and adds at "
                    "least one token (vertical cascade); positions after the "
                    "last pass come from the levels below (horizontal "
                    "cascade). \"auto\": run a pass only while the acceptance "
                    "measured online at the position it reaches pays for its "
                    "measured time; an int: exactly that many (1-64).")
    vertical: bool = Field(
        True,
        description="Each pass checks the level below's proposal (vertical "
                    "cascade). false = each pass adds one token of the model's "
                    "own and the levels below only fill the positions after its "
                    "passes (horizontal cascade only; the ablation).")
    max_context: Optional[int] = Field(
        512, ge=64, le=1 << 20,
        description="The draft model reads at most a request's last this many "
                    "tokens (a window that slides forward once it has grown to "
                    "twice this): reading a long prompt costs a draft model more "
                    "than the far context improves its drafts; the levels below "
                    "still see everything. null = the whole request.")
    prompt_read: Literal["when_needed", "at_start"] = Field(
        "when_needed",
        description="When the draft model reads a request's prompt: "
                    "\"when_needed\" = once the gain its passes would have added, "
                    "summed over the request's steps, covers the read's measured "
                    "time (rent-or-buy; the same for catching up on many tokens), so "
                    "a request the cheaper levels draft well, e.g. one that copies, "
                    "never pays for it; \"at_start\" = when the request starts "
                    "(the ablation).")
    max_cached_tokens: int = Field(
        262144, ge=256, le=1 << 30,
        description="KV cache bound over all requests, in tokens (least "
                    "recently used requests give theirs up and re-read their "
                    "context when they draft again).")

    @field_validator("passes")
    @classmethod
    def _passes(cls, v):
        if isinstance(v, int) and not 1 <= v <= 64:
            raise ValueError('must be "auto" or an integer from 1 to 64')
        return v


class SuffixTreeLevel(SuffixTreeConfig):
    type: Literal["suffix_tree"] = "suffix_tree"


class TokenRecyclingLevel(TokenRecyclingConfig):
    type: Literal["token_recycling"] = "token_recycling"


class SuffixRecyclingLevel(SuffixRecyclingConfig):
    type: Literal["suffix_recycling"] = "suffix_recycling"


class PromptLookupLevel(PromptLookupConfig):
    type: Literal["ngram"] = "ngram"


CascadeLevel = Annotated[
    Union[DraftModelLevel, SuffixTreeLevel, TokenRecyclingLevel, SuffixRecyclingLevel,
          PromptLookupLevel],
    Field(discriminator="type")]

#: Level types that need no model.
MODEL_FREE_LEVELS = ("suffix_tree", "token_recycling", "suffix_recycling", "ngram")


class CascadeConfig(BaseModel):
    """Settings of :class:`CascadeProposer` (Cascade Speculative Drafting,
    arXiv 2312.11462): levels top (strongest, dearest) to bottom (cheapest)."""

    model_config = ConfigDict(extra="forbid")

    levels: list[CascadeLevel] = Field(
        ..., min_length=1, max_length=8,
        description="Top to bottom: draft-model levels first, then model-free "
                    "ones (suffix_tree, token_recycling, suffix_recycling, "
                    "ngram). Each model level verifies the proposal of the "
                    "level below it; the model-free levels form one proposal: "
                    "the first of them that drafts something for the row.")

    @field_validator("levels")
    @classmethod
    def _model_levels_on_top(cls, levels: list) -> list:
        seen_free = False
        for i, lvl in enumerate(levels):
            if lvl.type in MODEL_FREE_LEVELS:
                seen_free = True
            elif seen_free:
                raise ValueError(f"level {i} ({lvl.type}) is below a model-free level: put "
                                 "draft_model levels first (top = strongest)")
        kinds = [lvl.type for lvl in levels]
        if "draft_model" not in kinds:
            raise ValueError("a cascade needs at least one draft_model level (with model-free "
                             "levels only, use their method directly, e.g. suffix_recycling)")
        return levels


# ---------------------------------------------------------------- diffusion
class DiffusionConfig(BaseModel):
    """Settings of :class:`DiffusionProposer`: a masked-block drafter made
    for the target by ``vllm-spec-plugins train-drafter``, one pass per step
    drafting a whole block, read by causal-consistency path search."""

    model_config = ConfigDict(extra="forbid")

    drafter: str = Field(
        ..., min_length=1,
        description="A drafter written by `vllm-spec-plugins train-drafter` "
                    "(drafter.json + drafter.safetensors): its directory, or its name "
                    "under ~/.cache/vllm-spec-plugins/drafters (where train-drafter "
                    "saves: the target's name). Made for this target: a drafter of "
                    "another target fails at startup.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Compute dtype of the drafter: auto = bfloat16 where "
                            "the CPU computes it natively (AVX512-BF16, AMX; faster "
                            "than float32 in a rough timing here), else float32. The "
                            "target verifies every token: lossless either way.")
    path_search: bool = Field(
        True,
        description="Causal-consistency path search: a small beam over each "
                    "position's likeliest candidates, scored with the drafter's "
                    "log-probabilities plus an n-gram model of the request's own "
                    "context. false = each position's most likely token.")
    path_mass: float = Field(
        0.8, gt=0.0, le=1.0, allow_inf_nan=False,
        description="Per position, candidates are the likeliest ones until "
                    "their probabilities sum to this.")
    path_max_candidates: int = Field(8, ge=1, le=64, description="At most this many per position.")
    path_beam: int = Field(3, ge=1, le=32, description="Beam width of the path search.")
    path_weight: float = Field(
        0.5, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Weight of the drafter's log-probability in a path's score "
                    "(the n-gram model gets the rest).")
    adaptive_length: bool = Field(
        True,
        description="Adaptive draft length per request: the next draft's "
                    "length follows moving averages of drafted and accepted "
                    "tokens. false = the whole block (the draft budget still "
                    "cuts what does not pay).")
    min_length: int = Field(2, ge=1, le=64,
                            description="Shortest draft the adaptive length picks.")
    skip_unpaid_passes: bool = Field(
        True,
        description="Skip the drafter's pass in a step where the tokens it is "
                    "measured to add do not pay for its measured time at the "
                    "engine's measured throughput (a share of steps still runs "
                    "it, so the measure stays current).")
    max_context: int = Field(
        1024, ge=64, le=1 << 20,
        description="The drafter reads at most a request's last this many "
                    "tokens (a window that slides forward once it has grown to "
                    "twice this).")
    max_cached_tokens: int = Field(
        262144, ge=256, le=1 << 30,
        description="Context-cache bound over all requests, in tokens (least "
                    "recently used requests give theirs up and re-read).")


class ScorerConfig(BaseModel):
    """``additional_config.spec_plugins_scorer``: how draft tokens are accepted.

    ``standard`` (the default) is vLLM's lossless verification. ``judge`` and
    ``reflective`` are LOSSY: a request they apply to may get output that
    differs from the target's own (see the README's "Lossy scorers"). They
    work with any proposer of this package; ``judge`` also with vLLM's
    built-in ones (ngram, suffix, draft_model)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["standard", "judge", "reflective"] = Field(
        "standard", description="standard (lossless) | judge | reflective (both lossy)")
    requests: Literal["opt_out", "opt_in"] = Field(
        "opt_out",
        description="opt_out: every request is scored lossily unless it sends "
                    "extra_args / vllm_xargs {\"spec_lossy\": false}; opt_in: only "
                    "requests sending {\"spec_lossy\": true} are.")
    head: Optional[str] = Field(
        None, description="judge: a head directory (judge.json) or a name under the "
                          "judges folder (train-judge's default: the target's name)")
    threshold: Optional[float] = Field(
        None, gt=0.0, lt=1.0,
        description="judge: accept when the head's probability reaches this "
                    "(default: the threshold train-judge chose)")
    probe: str = Field(
        "\nCorrected:\n", min_length=1,
        description="reflective: the text put between the draft and its copy")
    fusion_weight: float = Field(
        0.5, ge=0.0, le=1.0,
        description="reflective: weight of the reflective distribution in the fused one")
    min_target_prob: float = Field(
        0.05, ge=0.0, le=1.0,
        description="judge and reflective: never accept a token the target gives less "
                    "probability than this (0 = no floor)")

    @field_validator("head")
    @classmethod
    def _head_named(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        if v is not None and not v.strip():
            raise ValueError("empty: name a head directory or leave it out")
        return v

    @property
    def lossless(self) -> bool:
        return self.name == "standard"
