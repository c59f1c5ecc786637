"""
The command line: the nanoGPT-style configurator and one-line errors for user mistakes.

    python train.py config/small.py config/cascade_a2.py --batch_size=8 --F_d=4

Config files (plain Python) and --key=value overrides (Python literals, or bare strings) are
applied in the order given. Each file sees the values set before it (the script's defaults,
then earlier files and overrides), so a variant can be written relative to a scale, e.g.
`S_f = d_ffn0 // 64`. Changing a value after a file computed from it would leave that result
stale, so it is an error that says which order to use. Unknown keys and type mismatches are
one-line errors too, like every UserError: cli() prints `error: ...` and exits with status 2,
without a traceback.
"""
import argparse
import ast
import difflib
import os
import re
import sys

from model import ConfigError, GPTConfig


class UserError(ValueError):
    """Bad input from the user: printed as one line by cli(), no traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts that take options (fanin.py, prune.py, bench.py, data/): --help lists
    every option with its default; a bad option is a one-line UserError, like every other mistake."""

    def __init__(self, **kw):
        super().__init__(formatter_class=_HelpFormatter, **kw)

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")

    def add_argument(self, *args, **kw):
        if not kw.get("help"):   # a developer's mistake, caught by any --help (tests/test_bad_input.py)
            raise TypeError(f"option {args[0]} has no help line")
        return super().add_argument(*args, **kw)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):   # the default, unless the line already says it or there is none
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


def cli(main):
    """Run main(sys.argv[1:]); user mistakes (UserError, model.ConfigError) exit 2 with one line.
    A closed stdout (`python fanin.py ... | head`) ends the script quietly, as it ends `cat`."""
    try:
        return main(sys.argv[1:])
    except (UserError, ConfigError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:   # Python's documented recipe: no traceback, no second error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def one_line(error):
    """A UserError's message; one raised in a DataLoader worker comes back wrapped in the worker's traceback
    ('Caught UserError in DataLoader worker process 0. Original Traceback ...'): its own last line."""
    text = str(error)
    if "\nOriginal Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(f"{type(error).__name__}: ", 1)[-1]
    return text


def int_list(text, option, example, minimum=1):
    """'4,6,8' -> [4, 6, 8], in the order given ('' -> []); anything but integers >= minimum separated
    by commas is a one-line error that shows `example`."""
    parts = [t.strip() for t in str(text).split(",")] if str(text).strip() else []
    if not all(t.isdigit() and int(t) >= minimum for t in parts):
        raise UserError(f"{option} {text!r}: give integers >= {minimum} separated by commas, e.g. {option} {example}")
    return [int(t) for t in parts]


class _Namespace(dict):
    """A config file's namespace: it remembers the names the file reads."""

    def __init__(self, values):
        super().__init__(values)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def _exec_config_file(path, current):
    """(the names a config file assigns, the names it reads), run with the current values visible."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist (see config/ for the available ones)")
    ns = _Namespace(current)
    try:   # the values as globals too, so a comprehension in the file sees them
        exec(compile(open(path).read(), path, "exec"), dict(current), ns)
    except Exception as e:
        raise UserError(f"config file {path} failed to run: {type(e).__name__}: {e}") from None
    assigned = {k: v for k, v in ns.items() if not k.startswith("_") and not callable(v)
                and not isinstance(v, type(os)) and (k not in current or v is not current[k])}
    return assigned, ns.read


def _coerce(key, value, default):
    """value with the type of default; one-line error on a mismatch. None defaults take anything."""
    if default is None or value is None:
        return value
    kinds = [(bool, (bool,)), (int, (int,)), (float, (int, float)), ((list, tuple), (list, tuple)), (str, (str,))]
    for kind, accepted in kinds:
        if isinstance(default, kind):
            if isinstance(value, accepted) and (kind is bool or not isinstance(value, bool)):
                return float(value) if kind is float else type(default)(value) if kind == (list, tuple) else value
            raise UserError(f"{key}={value!r} has type {type(value).__name__}, expected {type(default).__name__} "
                            f"(default {default!r})")
    return value


def _comments(path):
    """{name: its trailing comment} for the `name = value  # comment` (or `name: type = value  #`)
    lines of a source file: where a script documents its keys."""
    out = {}
    for line in open(path):
        m = re.match(r"\s*(\w+)\s*(?::[^=]+)?=[^#]*#\s*(.+)$", line)
        if m:
            out.setdefault(m.group(1), m.group(2).strip())
    return out


def help_text(doc, sections):
    """`script.py --help`: the script's docstring, then every key with its default and its comment.
    sections: [(heading, {key: default}, the source file that documents them)]."""
    lines = [doc.strip(), "", "keys (config files and --key=value, in order):"]
    for heading, keys, source in sections:
        notes = _comments(source)
        lines += ["", f"{heading}:"] + [(f"  {k} = {v!r}".ljust(40) + f"  # {notes.get(k, '')}").rstrip(" #")
                                        for k, v in keys.items()]
    return "\n".join(lines)


def read_config(argv, defaults, ignore_other_keys=False, help=None, given=None):
    """Merge defaults, then config files (positional *.py) and --key=value overrides, in order.

    defaults: the script's keys and their default values (types are enforced).
    ignore_other_keys: keys a config file sets for other scripts (batch_size, ... when only the
    model is read) are ignored, though later files still see them; an unknown --override is
    still an error. help: (docstring, sections) for help_text, printed on --help or -h.
    given: a set that receives every key a config file or an override sets (even to its default)."""
    given = set() if given is None else given
    if help and any(a in ("--help", "-h") for a in argv):
        print(help_text(*help))
        raise SystemExit(0)
    cfg, seen, used = dict(defaults), dict(defaults), {}   # seen: what the next file sees; used: key -> reader

    def unknown(key, where):
        close = difflib.get_close_matches(key, list(defaults), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return UserError(f"unknown config key '{key}' {where}{hint}")

    def change(key, value, where):
        if key in used and key in seen and value != seen[key]:
            raise UserError(f"{where} changes {key} after {used[key]} computed from it: give {where} "
                            f"before {used[key]}")
        seen[key] = value

    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise UserError(f"override {arg} must look like --key=value")
            key, raw = arg[2:].split("=", 1)
            if key not in defaults:
                raise unknown(key, f"in {arg}")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw   # a bare string, e.g. --device=cuda
            cfg[key] = _coerce(key, value, defaults[key])
            given.add(key)
            change(key, cfg[key], arg)
        elif arg.endswith(".py"):
            assigned, read = _exec_config_file(arg, seen)
            for key, value in assigned.items():
                if key in defaults:
                    cfg[key] = _coerce(key, value, defaults[key])
                    given.add(key)
                elif not ignore_other_keys:
                    raise unknown(key, f"set by {arg}")
                change(key, value, arg)
            for key in read:
                used.setdefault(key, arg)
        else:
            raise UserError(f"argument '{arg}' is neither a config file (*.py) nor a --key=value override")
    return cfg


def gpt_config(argv):
    """The GPTConfig that config files + overrides describe (other scripts' keys are ignored)."""
    return GPTConfig.from_dict(read_config(argv, GPTConfig.defaults(), ignore_other_keys=True))


def config_name(argv, default="run"):
    """'small_cascade_a2' for `config/small.py config/cascade_a2.py`: the config files' names
    joined, the default run name (out/<name>)."""
    stems = [os.path.splitext(os.path.basename(a))[0] for a in argv if a.endswith(".py") and not a.startswith("--")]
    return "_".join(stems) or default
