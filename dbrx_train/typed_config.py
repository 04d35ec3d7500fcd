"""Typed configs validated once, at the edge.

`parse(Schema, mapping)` turns what omegaconf read from a YAML (plus command-line overrides)
into a frozen dataclass. A schema with a `translate_input` static method reads another schema too
(`TrainConfig`, `EvalConfig`: llm-foundry's): the mapping goes through it first. Unknown keys (with
the closest valid key suggested), wrong types and the schema's own `check()` all fail with one `ConfigError` naming the dotted key. The rest of
the code trusts the dataclass it gets. A field typed `Annotated[T, parse_fn]` is parsed by
`parse_fn(value, key)` (for values with more than one spelling, such as a list or a file holding one).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

from dbrx_train.errors import ConfigError

T = TypeVar('T')


def load_yaml(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Reads a YAML with omegaconf, merges `dotted.key=value` overrides, resolves interpolations."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise ConfigError('', f'config file not found: {path}')
    try:
        conf = OmegaConf.load(path)
        if overrides:
            bad = [o for o in overrides if '=' not in o]
            if bad:
                raise ConfigError('', f'override {bad[0]!r} is not of the form key=value')
            conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(conf, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError('', f'{path}: {str(e).splitlines()[0]}') from None
    except Exception as e:  # yaml.YAMLError and friends: one line, naming the file
        if isinstance(e, ConfigError):
            raise
        raise ConfigError('', f'{path}: not valid YAML ({str(e).splitlines()[0]})') from None
    if not isinstance(data, dict):
        raise ConfigError('', f'{path}: expected a mapping at the top level')
    return data


def parse(schema: type[T], data: Any, path: str = '') -> T:
    """Builds `schema` (a dataclass) from a plain mapping, or raises `ConfigError`."""
    if isinstance(data, schema):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(path, f'expected a mapping, got {_describe(data)}')
    translate = getattr(schema, 'translate_input', None)
    if translate is not None:
        try:
            data = translate(data)
        except ConfigError as e:
            raise ConfigError(_join(path, e.key), e.problem) from None
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    hints = typing.get_type_hints(schema, include_extras=True)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ''
            raise ConfigError(_join(path, str(key)), f'unknown key{hint}')
    kwargs = {}
    for name, field in fields.items():
        key = _join(path, name)
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(key, 'required key is missing')
    try:
        obj = schema(**kwargs)
        check = getattr(obj, 'check', None)
        if check is not None:
            check()
    except ConfigError as e:
        raise ConfigError(_join(path, e.key), e.problem) from None
    return obj


def to_dict(obj: Any) -> Any:
    """The inverse of `parse`: plain dicts and lists, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Annotated:  # the field's own parser; None stays None where the type allows it
        return _coerce(args[0], value, key) if value is None else hint.__metadata__[0](value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error, with its nested key and suggestion
            return _coerce(options[0], value, key)
        variants = _named_variants(options)
        if variants is not None:
            return _parse_variant(variants, options[0], value, key)
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(e.problem)
        raise ConfigError(key, ' or '.join(dict.fromkeys(errors)))
    if origin is Literal:
        if value not in args:
            choices = ', '.join(repr(a) for a in args)
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint_text = f" (did you mean '{close[0]}'?)" if close else ''
            raise ConfigError(key, f'must be one of {choices}, got {value!r}{hint_text}')
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f'expected a list, got {_describe(value)}')
        item = args[0] if args else Any
        items = [_coerce(item, v, f'{key}[{i}]') for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f'expected a mapping, got {_describe(value)}')
        item = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(item, v, _join(key, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f'expected true or false, got {_describe(value)}')
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f'expected an integer, got {_describe(value)}')
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f'expected a number, got {_describe(value)}')
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f'expected a string, got {_describe(value)}')
        return value
    raise TypeError(f'typed_config cannot parse a field of type {hint!r} ({key})')


def _named_variants(options: list) -> dict[str, type] | None:
    """Dataclasses told apart by a `name: Literal[...]` field (a tagged union), by name; else None."""
    variants = {}
    for option in options:
        hint = typing.get_type_hints(option).get('name') if dataclasses.is_dataclass(option) else None
        if typing.get_origin(hint) is not Literal:
            return None
        variants.update(dict.fromkeys(typing.get_args(hint), option))
    return variants


def _parse_variant(variants: dict[str, type], first: type, value: Any, key: str) -> Any:
    """The variant `value['name']` selects (default: the first option's default name)."""
    if not isinstance(value, Mapping):
        return parse(first, value, key)  # its 'expected a mapping'
    name = value.get('name', next(f.default for f in dataclasses.fields(first) if f.name == 'name'))
    if name not in variants:
        raise ConfigError(_join(key, 'name'), f'must be one of {", ".join(map(repr, variants))}, got {name!r}')
    return parse(variants[name], value, key)


def _join(path: str, key: str) -> str:
    return f'{path}.{key}' if path else key


def _describe(value: Any) -> str:
    if value is None:
        return 'null'
    if isinstance(value, str):
        return f'the string {value!r}'
    return f'{type(value).__name__} {value!r}'
