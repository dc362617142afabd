"""Profiles: which attention method runs where, as a validated, typed schema.

A profile is YAML (or a :class:`Profile` built in code)::

    name: sliding-frames
    description: each video token sees its own latent frame +-1, plus all text
    model: {family: cogvideox}          # optional: num_layers / num_heads are checked when given
    method: sliding_frames              # default method of every layer not listed below
    params: {window_frames: 1}          # that method's parameters (see its Params)
    dense_warmup_steps: 2               # or dense_warmup_fraction: 0.25 (not both)
    dense_layers: [0]                   # layers that always run dense
    step_cache: {skip_steps: [7, 11, 13]}   # steps that reuse the last computed step's block output
    layers:                             # per-layer overrides, keyed by layer index
      5: {method: dense, sensitivity: 0.031}
      7: {params: {window_frames: 2}, sensitivity: 0.004}

The schema is an omegaconf structured config, so a typo or a wrong type is
refused when the profile is loaded, and every error names the field, the value
seen and what is allowed.  A profile is plain data: omegaconf interpolations
(``${...}``) are refused rather than evaluated, and so are an empty profile, a
list where a mapping belongs (and the reverse) and integers beyond 32 bits.
Checks that need the model (layer and head counts) run in
:meth:`ResolvedProfile.check_model` when the profile is applied.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

__all__ = [
    "Profile", "ModelSpec", "LayerOverride", "HeadOverride", "HeadGroupSpec", "StepCacheSpec", "ProfileError",
    "load_profile", "builtin_profiles", "scheduled_steps",
]


class ProfileError(ValueError):
    """A profile that cannot be used, with the field, the value seen and what is allowed."""


@dataclass
class ModelSpec:
    """The model a profile was written for. Fields left None are not checked."""

    family: Optional[str] = None
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None


@dataclass
class HeadOverride:
    """What some heads of a layer do differently from the layer."""

    method: Optional[str] = None
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerOverride:
    """What one layer does differently from the profile's default.

    ``heads`` gives heads of the layer their own method: keys are a head
    index (``3``) or an inclusive range (``"0-7"``); heads not listed run
    the layer's method.  All heads of a layer run in one kernel launch, so
    their block-sparse methods share ``block_size`` and ``backend``.
    ``sensitivity`` records how much this layer's output moves when it runs
    sparse (from the offline search: relative error against dense); it is
    informational for now and lets budget allocation favour robust layers.
    """

    method: Optional[str] = None
    params: Dict[str, Any] = field(default_factory=dict)
    heads: Dict[Any, HeadOverride] = field(default_factory=dict)
    sensitivity: Optional[float] = None


@dataclass(frozen=True)
class HeadGroupSpec:
    """One method over some heads of a layer: what :meth:`ResolvedProfile.layer_groups` returns."""

    method: type
    params: Any
    heads: tuple[int, ...]


@dataclass
class StepCacheSpec:
    """Step caching: on the steps ``skip_steps`` (of a schedule of ``schedule_steps`` steps, scaled to the
    run's step count as in :func:`scheduled_steps`) the transformer blocks are not run; the output of the
    block stack is the one of the last computed step of the same call kind.  Steps a method must compute
    (Chipmunk's refresh steps) are never skipped, nor a step without a computed one before it."""

    skip_steps: List[int] = field(default_factory=list)
    schedule_steps: int = 50


def scheduled_steps(steps: List[int], schedule_steps: int, num_steps: int) -> set[int]:
    """Steps ``steps`` of a ``schedule_steps``-step schedule, in a run of ``num_steps`` steps: step ``s`` is step
    ``floor(s * num_steps / schedule_steps + 1/2)`` (the same steps when the counts agree)."""
    return {math.floor(s * num_steps / schedule_steps + 0.5) for s in steps}


@dataclass
class Profile:
    name: str = "custom"
    description: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    method: str = "dense"
    params: Dict[str, Any] = field(default_factory=dict)
    dense_warmup_steps: Optional[int] = None
    dense_warmup_fraction: Optional[float] = None
    dense_layers: List[int] = field(default_factory=list)
    layers: Dict[int, LayerOverride] = field(default_factory=dict)
    step_cache: Optional[StepCacheSpec] = None
    #: Where the profile came from (``vdit-sparse search`` writes its model, prompts, settings and date); not read.
    provenance: Dict[str, Any] = field(default_factory=dict)


def builtin_profiles() -> list[str]:
    """Names of the profiles shipped with the package."""
    folder = resources.files("vdit_sparse.profiles")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _omegaconf_message(error: OmegaConfBaseException, schema: type) -> str:
    # omegaconf puts the useful line first and adds "full_key: ..." context lines.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    key = getattr(error, "full_key", None)
    head = lines[0] if lines else type(error).__name__
    if isinstance(error, ConfigKeyError) and key and "." not in str(key):
        head += f"; allowed fields: {', '.join(f.name for f in dataclasses.fields(schema))}"
    return f"field '{key}': {head}" if key else head


#: Largest integer a profile may hold: kernels and index tensors are 32-bit.
MAX_INT = 2**31 - 1


def _describe(value: Any) -> str:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    if isinstance(value, dict):
        return f"a mapping {shown}"
    if isinstance(value, (list, tuple)):
        return f"a list {shown}"
    return f"{type(value).__name__} {shown}"


def check_plain_data(value: Any, schema: Any, path: str, where: str) -> None:
    """Refuse, naming the field, what omegaconf would evaluate or turn into a raw Python error.

    ``value`` is plain YAML data (dicts, lists, scalars) and ``schema`` the
    type it must fill (a dataclass, ``Dict[K, V]``, ``List[T]``,
    ``Optional[T]``, a scalar type or ``Any``).  Scalar types themselves are
    checked later by omegaconf; here: interpolations, mappings vs lists, and
    integers beyond :data:`MAX_INT`.
    """
    field_name = f"field '{path}'" if path else "the profile"
    if isinstance(value, str) and "${" in value:
        raise ProfileError(
            f"{where}: {field_name}: {value!r} is an interpolation; profiles are plain data, "
            "so write the value itself"
        )
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise ProfileError(f"{where}: {field_name}: {value} is too large; allowed: at most {MAX_INT} in magnitude")
    if typing.get_origin(schema) is Union:  # Optional[T]
        if value is None:
            return
        schema = next(arg for arg in typing.get_args(schema) if arg is not type(None))
    origin = typing.get_origin(schema)
    if dataclasses.is_dataclass(schema):
        if not isinstance(value, dict):
            raise ProfileError(f"{where}: {field_name}: expected a mapping of fields, got {_describe(value)}")
        hints = typing.get_type_hints(schema)
        for key, item in value.items():
            if key in hints:  # unknown fields are refused by omegaconf with the list of allowed ones
                check_plain_data(item, hints[key], f"{path}.{key}" if path else str(key), where)
    elif origin in (dict, Dict):
        key_type, item_type = typing.get_args(schema)
        if not isinstance(value, dict):
            raise ProfileError(f"{where}: {field_name}: expected a mapping, got {_describe(value)}")
        for key, item in value.items():
            check_plain_data(key, key_type, path, where)
            check_plain_data(item, item_type, f"{path}.{key}", where)
    elif origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ProfileError(f"{where}: {field_name}: expected a list, got {_describe(value)}")
        for index, item in enumerate(value):
            check_plain_data(item, typing.get_args(schema)[0], f"{path}[{index}]", where)
    elif schema is Any:
        for key, item in (value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()):
            check_plain_data(item, Any, f"{path}.{key}", where)
    elif isinstance(value, (dict, list, tuple)):
        raise ProfileError(f"{where}: {field_name}: expected {schema.__name__}, got {_describe(value)}")


def _parse(raw: Any, source: str) -> Profile:
    where = f"profile {source}"
    if isinstance(raw, Profile):
        raw = dataclasses.asdict(raw)
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: expected a mapping of fields, got {type(raw).__name__}")
    if not raw:
        raise ProfileError(f"{where} is empty; a profile names at least its `method` (see `vdit-sparse profiles`)")
    check_plain_data(raw, Profile, "", where)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Profile), raw)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ProfileError(f"{where}: {_omegaconf_message(error, Profile)}") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ProfileError(f"profile {str(path)!r} is not a UTF-8 text file (byte {error.start}); expected YAML") from None


def load_profile(profile: Union[str, Path, Profile, dict]) -> "ResolvedProfile":
    """Load and validate a profile: a built-in name, a YAML path, a dict or a :class:`Profile`."""
    if isinstance(profile, ResolvedProfile):
        return profile
    if isinstance(profile, Profile):
        parsed = _parse(profile, f"'{profile.name}'")
    elif isinstance(profile, dict):
        parsed = _parse(profile, "(dict)")
    elif isinstance(profile, (str, Path)):
        path = Path(profile)
        if path.suffix in (".yaml", ".yml") or path.exists():
            if not path.is_file():
                raise ProfileError(f"profile file not found: {str(path)!r}")
            source = repr(str(path))
            text = _read_text(path)
        else:
            names = builtin_profiles()
            if str(profile) not in names:
                raise ProfileError(
                    f"unknown profile {str(profile)!r}: not a built-in name and not a YAML file; "
                    f"built-in profiles: {', '.join(names)}"
                )
            source = f"'{profile}'"
            text = resources.files("vdit_sparse.profiles").joinpath(f"{profile}.yaml").read_text()
        try:
            raw = OmegaConf.to_container(OmegaConf.create(text), resolve=False)  # interpolations stay text
        except Exception as error:  # yaml errors come in several types
            raise ProfileError(f"profile {source}: not valid YAML ({error})") from None
        parsed = _parse(raw, source)
    else:
        raise ProfileError(
            f"profile must be a built-in name, a YAML path, a dict or a Profile, got {type(profile).__name__}"
        )
    return ResolvedProfile(parsed)


class ResolvedProfile:
    """A validated profile with each layer's method and parameters resolved."""

    def __init__(self, profile: Profile):
        from .methods import get_method_class  # methods import this module for ProfileError

        self.profile = profile
        where = f"profile '{profile.name}'"
        if profile.dense_warmup_steps is not None and profile.dense_warmup_fraction is not None:
            raise ProfileError(
                f"{where}: set dense_warmup_steps or dense_warmup_fraction, not both "
                f"(got {profile.dense_warmup_steps} and {profile.dense_warmup_fraction})"
            )
        if profile.dense_warmup_steps is not None and profile.dense_warmup_steps < 0:
            raise ProfileError(f"{where}: field 'dense_warmup_steps' must be >= 0, got {profile.dense_warmup_steps}")
        fraction = profile.dense_warmup_fraction
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ProfileError(f"{where}: field 'dense_warmup_fraction' must be in [0, 1], got {fraction}")
        bad = [i for i in profile.dense_layers if i < 0]
        if bad:
            raise ProfileError(f"{where}: field 'dense_layers' holds negative layer indices {bad}; allowed: >= 0")
        bad = [i for i in profile.layers if i < 0]
        if bad:
            raise ProfileError(f"{where}: field 'layers' has negative layer indices {bad}; allowed: >= 0")
        for name, value in (("model.num_layers", profile.model.num_layers), ("model.num_heads", profile.model.num_heads)):
            if value is not None and value < 1:
                raise ProfileError(f"{where}: field '{name}' must be >= 1, got {value}")

        cache = profile.step_cache
        if cache is not None:
            if cache.schedule_steps < 1:
                raise ProfileError(f"{where}: field 'step_cache.schedule_steps' must be >= 1, got {cache.schedule_steps}")
            bad = [s for s in cache.skip_steps if not 0 < s < cache.schedule_steps]
            if bad:
                raise ProfileError(
                    f"{where}: field 'step_cache.skip_steps' holds {bad}; allowed: steps 1..{cache.schedule_steps - 1} "
                    "(step 0 has no step before it to reuse)"
                )

        self.default_method = get_method_class(profile.method, field_name="method", where=where)
        self.default_params = self.default_method.parse_params(profile.params, field_name="params", where=where)
        # layer -> (its method, its params, [(heads, method, params, field name)])
        self._layers: dict[int, tuple[type, Any, list[tuple[tuple[int, ...], type, Any, str]]]] = {}
        for index, override in profile.layers.items():
            method = self.default_method
            if override.method is not None:
                method = get_method_class(override.method, field_name=f"layers.{index}.method", where=where)
            # Layer params refine the profile's params when the method is the same, else start from defaults.
            raw = {**(profile.params if method is self.default_method else {}), **override.params}
            params = method.parse_params(raw, field_name=f"layers.{index}.params", where=where)
            if override.sensitivity is not None and not (override.sensitivity >= 0 and math.isfinite(override.sensitivity)):
                raise ProfileError(
                    f"{where}: field 'layers.{index}.sensitivity' must be a finite number >= 0, got {override.sensitivity}"
                )
            groups, taken = [], {}
            for key, head_override in override.heads.items():
                field_name = f"layers.{index}.heads.{key}"
                heads = _head_range(key, field_name, where)
                clash = sorted(set(heads) & set(taken))
                if clash:
                    raise ProfileError(
                        f"{where}: field '{field_name}' names heads {clash} that "
                        f"'layers.{index}.heads.{taken[clash[0]]}' names too; each head has one method"
                    )
                taken.update((head, key) for head in heads)
                head_method = method
                if head_override.method is not None:
                    head_method = get_method_class(head_override.method, field_name=f"{field_name}.method", where=where)
                # Head params refine the layer's params when the method is the same, else start from defaults.
                head_raw = {**(raw if head_method is method else {}), **head_override.params}
                head_params = head_method.parse_params(head_raw, field_name=f"{field_name}.params", where=where)
                groups.append((heads, head_method, head_params, field_name))
            _check_one_launch([(params, f"layers.{index}")] + [(g[2], g[3]) for g in groups], where)
            self._layers[index] = (method, params, groups)

    @property
    def name(self) -> str:
        return self.profile.name

    def check_model(self, family: str, num_layers: int, num_heads: int) -> None:
        """Refuse a profile written for another model, naming both counts."""
        p, where = self.profile, f"profile '{self.profile.name}'"
        if p.model.family is not None and p.model.family != family:
            raise ProfileError(f"{where} was written for model family {p.model.family!r}, but the pipeline is {family!r}")
        if p.model.num_layers is not None and p.model.num_layers != num_layers:
            raise ProfileError(
                f"{where} was written for a model with {p.model.num_layers} attention layers, "
                f"but this transformer has {num_layers}"
            )
        if p.model.num_heads is not None and p.model.num_heads != num_heads:
            raise ProfileError(
                f"{where} was written for a model with {p.model.num_heads} attention heads, "
                f"but this transformer has {num_heads}"
            )
        for field_name, indices in (("dense_layers", p.dense_layers), ("layers", list(p.layers))):
            bad = sorted(i for i in indices if i >= num_layers)
            if bad:
                raise ProfileError(
                    f"{where}: field '{field_name}' names layers {bad}, but this transformer has "
                    f"{num_layers} attention layers (valid: 0..{num_layers - 1})"
                )
        for _, _, groups in self._layers.values():
            for heads, _, _, field_name in groups:
                if max(heads) >= num_heads:
                    raise ProfileError(
                        f"{where}: field '{field_name}' names head {max(heads)}, but this transformer has "
                        f"{num_heads} attention heads (valid: 0..{num_heads - 1})"
                    )

    def dense_warmup_steps(self, num_steps: int) -> int:
        """Steps that run fully dense at the start of a run of ``num_steps`` steps.

        A fraction is rounded up, so 0.25 of 4 steps is 1 step; with few-step
        or distilled models prefer ``dense_warmup_steps`` (an exact count).
        """
        if self.profile.dense_warmup_steps is not None:
            return self.profile.dense_warmup_steps
        if self.profile.dense_warmup_fraction is not None:
            # As the decimal the user wrote: 0.28 of 25 steps is 7, not ceil(7.000000000000001) = 8.
            return math.ceil(Fraction(repr(self.profile.dense_warmup_fraction)) * num_steps)
        return 0

    def skip_steps(self, num_steps: int) -> set[int]:
        """The steps of a ``num_steps``-step run that step caching skips (empty without ``step_cache``)."""
        cache = self.profile.step_cache
        return set() if cache is None else scheduled_steps(cache.skip_steps, cache.schedule_steps, num_steps)

    def layer_groups(self, layer_index: int, num_heads: int) -> list[HeadGroupSpec]:
        """The methods of one layer, each with its parameters and heads, in head order of first appearance.

        A dense layer (``dense_layers``) is one ``dense`` group; heads a
        ``heads`` entry does not name run the layer's method.
        """
        from .methods import get_method_class

        if layer_index in self.profile.dense_layers:
            dense = get_method_class("dense")
            return [HeadGroupSpec(dense, dense.parse_params({}), tuple(range(num_heads)))]
        method, params, groups = self._layers.get(layer_index, (self.default_method, self.default_params, []))
        named = {head for heads, _, _, _ in groups for head in heads}
        rest = tuple(head for head in range(num_heads) if head not in named)
        specs = [HeadGroupSpec(method, params, rest)] if rest else []
        specs += [HeadGroupSpec(group_method, group_params, heads) for heads, group_method, group_params, _ in groups]
        return specs

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self.profile))


def _head_range(key: Any, field_name: str, where: str) -> tuple[int, ...]:
    """``3`` or ``"3"`` -> (3,); ``"0-7"`` -> (0, ..., 7)."""
    text = str(key).strip()
    first, dash, last = text.partition("-")
    try:
        low, high = int(first), int(last) if dash else int(first)
    except ValueError:
        raise ProfileError(
            f"{where}: field '{field_name}': {key!r} is not a head index or range; write 3 or \"0-7\""
        ) from None
    if low < 0 or high < low:
        raise ProfileError(f"{where}: field '{field_name}': heads {key!r} must be a range low-high with 0 <= low <= high")
    return tuple(range(low, high + 1))


def _check_one_launch(params: list[tuple[Any, str]], where: str) -> None:
    """The heads of one layer run in one launch: their block sizes and backends must agree."""
    for attribute in ("block_size", "backend"):
        seen = {}
        for value, field_name in params:
            if hasattr(value, attribute):
                seen.setdefault(getattr(value, attribute), field_name)
        if len(seen) > 1:
            (a, first), (b, second) = list(seen.items())[:2]
            raise ProfileError(
                f"{where}: fields '{first}' and '{second}' set {attribute} {a!r} and {b!r}; the heads of one layer "
                f"run in one launch and share one {attribute}"
            )


def params_from_dict(params_cls: type, values: dict, *, field_name: str, where: str) -> Any:
    """Build a method's Params dataclass from a dict, refusing unknown fields and wrong types."""
    check_plain_data(values, params_cls, "", f"{where}: {field_name}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(params_cls), values)
        result = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ProfileError(f"{where}: {field_name}: {_omegaconf_message(error, params_cls)}") from None
    if hasattr(result, "validate"):
        problem = result.validate()
        if problem:
            raise ProfileError(f"{where}: {field_name}: {problem}")
    assert dataclasses.is_dataclass(result)
    return result
