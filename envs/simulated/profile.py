"""Task profiles of the simulator: every parameter is data in a YAML (or JSON) file.

A profile describes one task (its shape, its answer space) and how each model of a pool
behaves on it. Only ``input_tokens``, ``output_tokens`` and one measured single-model
``accuracy`` per model are required; every other field has a documented default (see
``docs/simulator.md``). Abilities are fitted from the accuracies when a file leaves them
out, so a user can describe their own pool from a few measurements and refine the rest
later with ``python -m graphtune.envs.simulated.calibrate``.

Parsing uses pydantic (this is outside text); the result is a frozen :class:`Profile`.
Every problem with a file raises one-line :class:`~graphtune.errors.EnvError` naming the
file and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from scipy.optimize import brentq
from scipy.special import expit, ndtri

from graphtune.errors import EnvError

PROFILE_DIR = Path(__file__).parent / "profiles"

#: Built-in task profiles by name (the paper's three tasks, LLaMA pool).
BUILTIN_PROFILES: dict[str, Path] = {p: PROFILE_DIR / f"{p}.yaml" for p in ("math", "mmlu", "humaneval")}

#: Quadrature grid size used to fit abilities against the difficulty distribution.
_GRID = 4001
#: An explicit ability may miss its accuracy by at most this much (absolute).
_ABILITY_TOLERANCE = 0.005


@dataclass(frozen=True)
class ModelProfile:
    """How one model behaves on the task.

    ``ability`` is a logit: a source node of this model answers question q correctly with
    probability ``sigmoid(ability - difficulty_q + idiosyncrasy_qm)``; it is fitted so that
    the mean over both distributions equals ``accuracy``. ``verbosity`` scales its completion
    length (1.0 = the task's ``output_tokens``).
    """

    name: str
    accuracy: float
    ability: float
    verbosity: float = 1.0


@dataclass(frozen=True)
class MixTarget:
    """A calibration target: mean accuracy of random pilot graphs built from ``models``
    (name -> count), as measured in the paper (R2)."""

    label: str
    models: tuple[tuple[str, int], ...]
    accuracy: float

    @property
    def n_nodes(self) -> int:
        return sum(c for _, c in self.models)


@dataclass(frozen=True)
class Profile:
    """All parameters of one simulated task. See ``docs/simulator.md`` for the model."""

    name: str
    input_tokens: float  # A: average prompt tokens of a question
    output_tokens: float  # B: average completion tokens of one call
    models: tuple[ModelProfile, ...]
    task: str = "question answering"
    answer_format: str = "a single final answer"
    n_wrong: int = 9  # K: distinct wrong answers per question
    difficulty_spread: float = 1.5  # s: difficulty_q ~ N(0, s)
    idiosyncrasy: float = 0.5  # t: sd of a per-(question, model) logit shared by its calls
    wrong_answer_skew: float = 1.2  # Zipf exponent of wrong-answer popularity
    error_correlation: float = 0.7  # share of wrong-answer preference common to all models
    synthesis_gain: float = 2.0  # g: pull toward the correct candidate when verifiable
    verify_offset: float = 1.0  # logit by which verifying is easier than solving
    weak_synth_penalty: float = 0.5  # w: pull toward wrong candidates when not verifiable
    context_penalty: float = 0.1  # kappa: logit penalty per input^context_power
    context_power: float = 1.5
    size_exponent: float = 0.5  # tolerance z_m = (params / 1e9) ** size_exponent
    corruption: float = 0.03  # rho: per-level chance a synthesiser garbles a right answer
    assistant_own_weight: float = 1.0  # votes of an assistant's own attempt
    fuser_own_weight: float = 0.3  # votes of a fuser's own attempt
    assistant_sharpness: float = 1.0  # gamma: plurality exponent of an assistant
    fuser_sharpness: float = 2.0  # gamma of a fuser (leans on selection)
    synthesis_diversity: float = 0.3  # share of a synthesiser's selection noise that is its own
    token_noise: float = 0.2  # log-sd of per-call token counts
    mixes: tuple[MixTarget, ...] = ()
    source: str = "<memory>"

    # -- accessors ----------------------------------------------------------------------
    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)

    def model(self, name: str) -> ModelProfile:
        for m in self.models:
            if m.name == name:
                return m
        raise EnvError(f"profile {self.name!r} has no model {name!r}; its models: {list(self.model_names)}")

    def with_params(self, **changes: Any) -> Profile:
        """A copy with some parameters changed; abilities are refitted when the
        difficulty spread changes."""
        p = replace(self, **changes)
        if {"difficulty_spread", "idiosyncrasy"} & set(changes):
            p = replace(p, models=tuple(replace(m, ability=fit_ability(m.accuracy, p.total_spread))
                                        for m in p.models))
        return p

    @property
    def total_spread(self) -> float:
        """sd of ``difficulty_q - idiosyncrasy_qm``: what abilities are fitted against."""
        return float(np.hypot(self.difficulty_spread, self.idiosyncrasy))

    def free_parameters(self) -> dict[str, float]:
        """The scalar parameters calibration may change, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in FREE_PARAMETERS}


#: Parameters the calibration fits (the others are structural or conventional).
FREE_PARAMETERS = ("difficulty_spread", "idiosyncrasy", "wrong_answer_skew", "error_correlation", "synthesis_gain",
                   "verify_offset", "weak_synth_penalty", "context_penalty", "corruption")


# -- ability fitting -----------------------------------------------------------------


@lru_cache(maxsize=64)
def _std_grid() -> np.ndarray:
    return ndtri((np.arange(_GRID) + 0.5) / _GRID)


def expected_accuracy(ability: float, spread: float) -> float:
    """Mean over x ~ N(0, spread) of sigmoid(ability - x)."""
    return float(expit(ability - spread * _std_grid()).mean())


def fit_ability(accuracy: float, spread: float) -> float:
    """The ability whose expected single-call accuracy is ``accuracy``."""
    return float(brentq(lambda a: expected_accuracy(a, spread) - accuracy, -40.0, 40.0, xtol=1e-10))


# -- parsing -------------------------------------------------------------------------


class _ModelFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    accuracy: float = Field(gt=0.0, lt=1.0)
    ability: float | None = None
    verbosity: float = Field(default=1.0, gt=0.0)


class _MixFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str | None = None
    models: dict[str, int]
    accuracy: float = Field(gt=0.0, lt=1.0)


class _ProfileFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    task: str = "question answering"
    answer_format: str = "a single final answer"
    input_tokens: float = Field(gt=0)
    output_tokens: float = Field(gt=0)
    models: dict[str, _ModelFile] = Field(min_length=1)
    n_wrong: int = Field(default=9, ge=1, le=64)
    difficulty_spread: float = Field(default=1.5, gt=0.0, le=10.0)
    idiosyncrasy: float = Field(default=0.5, ge=0.0, le=10.0)
    wrong_answer_skew: float = Field(default=1.2, ge=0.0, le=10.0)
    error_correlation: float = Field(default=0.7, ge=0.0, le=1.0)
    synthesis_gain: float = Field(default=2.0, ge=0.0, le=20.0)
    verify_offset: float = Field(default=1.0, ge=-10.0, le=10.0)
    weak_synth_penalty: float = Field(default=0.5, ge=0.0, le=20.0)
    context_penalty: float = Field(default=0.1, ge=0.0, le=10.0)
    context_power: float = Field(default=1.5, ge=0.0, le=4.0)
    size_exponent: float = Field(default=0.5, ge=0.0, le=2.0)
    corruption: float = Field(default=0.03, ge=0.0, le=1.0)
    assistant_own_weight: float = Field(default=1.0, ge=0.0)
    fuser_own_weight: float = Field(default=0.3, ge=0.0)
    assistant_sharpness: float = Field(default=1.0, ge=0.0, le=10.0)
    fuser_sharpness: float = Field(default=2.0, ge=0.0, le=10.0)
    synthesis_diversity: float = Field(default=0.3, ge=0.0, le=1.0)
    token_noise: float = Field(default=0.2, ge=0.0, le=2.0)
    mixes: list[_MixFile] = Field(default_factory=list)


def _one_line_error(where: str, err: ValidationError) -> EnvError:
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return EnvError(f"profile {where}: field `{loc}`: {e['msg']}{more}")


def profile_from_dict(data: Any, *, source: str = "<memory>") -> Profile:
    """Build a profile from plain data (the parsed file)."""
    if not isinstance(data, dict):
        raise EnvError(f"profile {source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        pf = _ProfileFile.model_validate(data)
    except ValidationError as err:
        raise _one_line_error(source, err) from None
    models = []
    spread = float(np.hypot(pf.difficulty_spread, pf.idiosyncrasy))
    for name, mf in pf.models.items():
        fitted = fit_ability(mf.accuracy, spread)
        if mf.ability is not None:
            got = expected_accuracy(mf.ability, spread)
            if abs(got - mf.accuracy) > _ABILITY_TOLERANCE:
                raise EnvError(
                    f"profile {source}: field `models.{name}.ability`: {mf.ability:g} gives accuracy "
                    f"{got:.3f}, not {mf.accuracy:g}; delete `ability` to refit it (or run the calibration)")
        models.append(ModelProfile(name=name, accuracy=mf.accuracy,
                                   ability=fitted if mf.ability is None else mf.ability,
                                   verbosity=mf.verbosity))
    mixes = []
    for i, mx in enumerate(pf.mixes):
        for m, c in mx.models.items():
            if m not in pf.models:
                raise EnvError(f"profile {source}: field `mixes.{i}.models`: model {m!r} is not under "
                               f"`models` ({sorted(pf.models)})")
            if c < 1:
                raise EnvError(f"profile {source}: field `mixes.{i}.models.{m}`: count must be >= 1")
        label = mx.label or "+".join(f"{c}x{m}" for m, c in mx.models.items())
        mixes.append(MixTarget(label=label, models=tuple(mx.models.items()), accuracy=mx.accuracy))
    scalars = pf.model_dump(exclude={"models", "mixes"})
    return Profile(models=tuple(models), mixes=tuple(mixes), source=source, **scalars)


def load_profile(profile: Profile | str | Path) -> Profile:
    """A profile by built-in name (``math``, ``mmlu``, ``humaneval``), by path to a
    YAML/JSON file, or passed through when already a :class:`Profile`."""
    if isinstance(profile, Profile):
        return profile
    key = str(profile)
    path = BUILTIN_PROFILES.get(key, Path(key))
    if not path.exists():
        raise EnvError(f"profile {key!r} is neither a built-in profile ({sorted(BUILTIN_PROFILES)}) "
                       "nor an existing YAML/JSON file")
    return _load_file(str(path.resolve()), path.stat().st_mtime_ns)


@lru_cache(maxsize=32)
def _load_file(path: str, _mtime_ns: int) -> Profile:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise EnvError(f"profile {path}: cannot read it ({err.strerror})") from None
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        first = str(err).strip().splitlines()[0]
        raise EnvError(f"profile {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'} ({first})") from None
    return profile_from_dict(data, source=path)
