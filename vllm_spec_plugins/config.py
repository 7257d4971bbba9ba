"""Pydantic settings of every method. Imports neither vLLM nor numba, so the
integration layer can validate a user's settings in the API-server / LLM
process at startup, before any worker exists."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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


