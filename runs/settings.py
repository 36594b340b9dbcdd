"""
Settings from the command line, checked before anything is read or written: every command's parser.

    cfg = parse_settings(TrainConfig, sys.argv[1:], presets=PRESETS)   # --preset first, then --key=value
    check_settings(cfg, BOUNDS, CHOICES)   # or `error: --dropout=1.0 must be in [0, 1)`
    check_fields(ArchConfig, json_dict, "arch")   # a JSON file's fields, typed, or a one-line ValueError
    arch = read_arch("best.json", space, ArchConfig)   # --arch: a named subnet of the space or a JSON arch file
A setting's range is an interval written as text, "[0, 1)" or "(0, inf)"; a number alone is a minimum, "[n, inf)".
Every number must be finite and inside its interval (NaN is inside none), every named setting one of its choices.
"""

import ast
import inspect
import json
import math
import re
from dataclasses import fields, replace
from pathlib import Path

import torch


def parse_settings(cls, argv, command_field=None, presets=None):
    """The settings of dataclass `cls` from argv: a first bare word sets `command_field` (latency.py's command);
    --preset=NAME applies presets[NAME] first (the values that differ from the defaults); then each --key=value,
    read as a Python literal (a bare word is a string) of the field's type. --help (or -h) prints help_text."""
    if any(arg in ("--help", "-h") for arg in argv):
        print(help_text(cls, presets, command_field))
        raise SystemExit(0)
    cfg = cls()
    if command_field and argv and not argv[0].startswith("--"):
        cfg, argv = replace(cfg, **{command_field: argv[0]}), argv[1:]
    for arg in argv:
        if not (arg.startswith("--") and "=" in arg):
            raise SystemExit(f"error: bad argument {arg!r}; use --key=value")
    pairs = dict(arg[2:].split("=", 1) for arg in argv)
    if presets is not None:
        preset = pairs.get("preset", cfg.preset)
        if preset not in presets:
            raise SystemExit(f"error: unknown preset {preset!r}; choose one of {list(presets)}")
        cfg = cls(**{**presets[preset], "preset": preset})
    for key, text in pairs.items():
        setattr(cfg, key, typed_value(cls, key, text))
    return cfg


def typed_value(cls, key, text):
    """--key=text as the type of field `key` of `cls`: a literal (3, 1.5, [1, 2]) or else the bare word; true/false
    for a bool, [a.json,b] for a tuple, an int where a float is asked; `bool | None` (bf16) also takes None."""
    kinds = {f.name: f.type for f in fields(cls)}
    if key not in kinds:
        raise SystemExit(f"error: unknown setting --{key}; settings are {list(kinds)}")
    kind, optional = (bool, True) if kinds[key] == (bool | None) else (kinds[key], False)
    value = literal(text)
    if kind is tuple and isinstance(value, str) and text.startswith("[") and text.endswith("]"):
        value = [literal(item.strip()) for item in text[1:-1].split(",") if item.strip()]  # [a.json,b]: bare words
    if kind is bool and text.lower() in ("true", "false"):
        value = text.lower() == "true"
    if (kind is float and type(value) is int) or (kind is tuple and type(value) is list):
        value = kind(value)
    if type(value) is not kind and not (optional and value is None):
        raise SystemExit(f"error: --{key}={text} should be a {kind.__name__}" + (" or None" if optional else ""))
    return value


def literal(text: str):
    """A Python literal (3, 1.5, 'x', [1]) if the text is one, else the text itself as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


WRAPPED = 100  # a source line this long or longer was wrapped: a comment line below it continues its comment


def field_comments(cls) -> dict:
    """Each field of dataclass `cls` -> the comment written beside it in the source (continued on a comment line
    right below it when the line above was wrapped at the width), "" where there is none."""
    comments, field, previous, names = {}, None, "", {f.name for f in fields(cls)}
    for line in inspect.getsource(cls).splitlines():
        start = re.match(r"\s+(\w+)\s*:[^=]*=", line)
        if start and start.group(1) in names:
            field = start.group(1)
            comments[field] = line.split("  # ", 1)[1].strip() if "  # " in line else ""
        elif field and line.strip().startswith("#") and comments[field] and len(previous) >= WRAPPED:
            comments[field] += " " + line.strip().lstrip("#").strip()
        else:
            field = None
        previous = line
    return comments


def help_text(cls, presets=None, command_field=None) -> str:
    """--help: every setting of dataclass `cls` with its default, type and the comment beside it, in the order of
    the code, then the presets (what each changes)."""
    comments, defaults = field_comments(cls), cls()
    usage = f"usage: {'COMMAND ' if command_field else ''}--key=value ... (a value is a Python literal or a bare word"
    usage += "; --preset=NAME first applies a preset)" if presets else ")"
    text = [(cls.__doc__ or cls.__name__).strip().split("\n")[0], usage, "", "settings, with their defaults:"]
    for f in fields(cls):
        kind = "bool or None" if f.type == (bool | None) else getattr(f.type, "__name__", str(f.type))
        text.append(f"  --{f.name}={as_typed(getattr(defaults, f.name))} ({kind})  {comments.get(f.name, '')}".rstrip())
    if presets:
        text += ["", "presets (what each changes):"]
        text += [f"  --preset={name}: {' '.join(f'--{k}={as_typed(v)}' for k, v in values.items()) or 'the defaults'}"
                 for name, values in presets.items()]
    return "\n".join(text)


def as_typed(value) -> str:
    """A setting's value as it is typed after --key=: a plain word bare, anything else as a Python literal."""
    return value if isinstance(value, str) and re.fullmatch(r"[\w./<>-]+", value) else repr(value)


def interval(bound) -> str:
    """A bound as interval text: 5 -> "[5, inf)", (0, 1) -> "[0, 1]", "[0, 1)" as it is."""
    if isinstance(bound, str):
        return bound
    return f"[{bound[0]}, {bound[1]}]" if isinstance(bound, tuple) else f"[{bound}, inf)"


def inside(value, bound) -> bool:
    """Whether a number lies in an interval ("[0, 1)": 0 in, 1 out); NaN and the infinities lie in none."""
    text = interval(bound)
    low, high = (float(x) for x in text[1:-1].split(","))
    above = value >= low if text[0] == "[" else value > low
    below = value <= high if text[-1] == "]" else value < high
    return math.isfinite(value) and above and below


def check_settings(cfg, bounds, choices):
    """One line `error: ...` for the first setting of dataclass `cfg` out of range: every number finite and in its
    interval in `bounds` ("[0, inf)" unless named there); every setting named in `choices` one of its values."""
    for f in fields(cfg):
        value, bound = getattr(cfg, f.name), bounds.get(f.name, 0)
        if type(value) in (int, float) and not inside(value, bound):
            text = interval(bound)
            where = f"{'>=' if text[0] == '[' else '>'} {text[1:-1].split(',')[0]}" if text.endswith(" inf)") \
                else f"in {text}"
            raise SystemExit(f"error: --{f.name}={value} must be {where} (and finite)")
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"error: --{key}={getattr(cfg, key)}; choose one of {list(allowed)}")


def check_fields(cls, d, what: str) -> dict:
    """Keyword arguments of dataclass `cls` from a dict such as a JSON file: exactly its fields, an integer for an
    int field and a list of integers for a tuple field. Raises a one-line ValueError naming the first problem."""
    names, is_int = [f.name for f in fields(cls)], lambda v: isinstance(v, int) and not isinstance(v, bool)
    if not isinstance(d, dict):
        raise ValueError(f"an {what} is a JSON object {{field: value}} with the keys {names}, got {type(d).__name__}")
    unknown, missing = sorted(set(d) - set(names)), [n for n in names if n not in d]
    if unknown or missing:
        raise ValueError(f"{what} has unknown keys {unknown} / missing keys {missing}; the keys are {names}")
    for f in fields(cls):
        value = d[f.name]
        if f.type is int and not is_int(value):
            raise ValueError(f"{what} field '{f.name}' must be an integer, got {value!r}")
        if f.type is tuple and not (isinstance(value, (list, tuple)) and all(map(is_int, value))):
            raise ValueError(f"{what} field '{f.name}' must be a list of integers (one per layer), got {value!r}")
    return {name: tuple(d[name]) if isinstance(d[name], list) else d[name] for name in names}


def check_arch(arch, space):
    """Return arch (a mos.ArchConfig) if every field is a choice of `space` (a mos.SearchSpace; per-layer fields one
    value per layer, cross-attention spans no longer than the encoder), else raise a one-line ValueError naming the
    first field outside it."""
    for name, allowed in space.choices().items():
        value, layers = getattr(arch, name), "enc_layers" if name.startswith("enc") else "dec_layers"
        if isinstance(value, tuple) and len(value) != getattr(arch, layers):
            raise ValueError(f"arch field '{name}' has {len(value)} values but {layers} = {getattr(arch, layers)}; "
                             f"give one value per layer, each from {allowed}")
        for i, v in enumerate(value if isinstance(value, tuple) else (value,)):
            if v not in allowed:
                where = f"{name}[{i}]" if isinstance(value, tuple) else name
                raise ValueError(f"arch field '{where}' = {v!r} is not in space '{space.name}'; allowed: {allowed}")
    if max(arch.dec_cross_spans) > arch.enc_layers:
        raise ValueError(f"arch field 'dec_cross_spans' = {arch.dec_cross_spans} attends to more than "
                         f"enc_layers = {arch.enc_layers} encoder layers")
    return arch


NAMED_ARCHS = ("largest", "smallest", "middle")  # --arch names: a space's representative subnets, not files


def read_arch(spec: str, space, arch_cls):
    """--arch: one of NAMED_ARCHS (space.largest() ...) or a JSON arch file (search.py writes them), read as an
    `arch_cls` (mos.ArchConfig) that must lie in `space`; anything else is a one-line error."""
    if spec in NAMED_ARCHS:
        return getattr(space, spec)()
    try:
        return space.validate(arch_cls.from_dict(json.loads(Path(spec).read_text())))
    except (OSError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: JSON nested too deeply
        raise SystemExit(f"error: cannot read arch file {spec!r} ({e}); give largest|smallest|middle or a JSON file")
    except ValueError as e:
        raise SystemExit(f"error: arch file {spec}: {e}")


def need(condition, problem: str):
    """Raise ValueError(problem) unless the condition holds: a check that, unlike assert, python -O keeps."""
    if not condition:
        raise ValueError(problem)


def get_device(name: str, auto=False) -> torch.device:
    """cpu | cuda | cuda:N (and auto: cuda if present): a torch.device, or one line saying why not here."""
    if auto and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        need(device.type in ("cpu", "cuda"), "not a cpu or cuda device")
    except (RuntimeError, ValueError):
        raise SystemExit(f"error: --device={name}; use cpu or cuda" + (" or auto" if auto else ""))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device={name} but torch sees no CUDA GPU here; use --device=cpu")
    return device
