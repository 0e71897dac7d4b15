"""
The poor man's configurator. A script keeps its hyperparameters as plain variables at the top and then calls

    from configurator import configure
    user_config = configure(globals())

Every top-level int / float / bool / str variable (and those set to None) is a config key. The command line
overrides them:

    python -m scripts.vis_tok_train --num_iterations=300 --run=ocr1 --lr=3e-4
    python -m scripts.vis_tok_train config/my_run.py --device_batch_size=8

`--key=value` values are Python literals (strings may be left unquoted) and must have the type of the current
value (an int may widen to a float, a number given to a text setting stays text, None accepts anything);
booleans are `--flag=True` / `--flag=False`. A bare argument is a config file: plain Python assignments, executed
and then checked the same way. An unknown key or a wrong type stops the script with a message that names the key
and lists the valid ones. The return value is the resolved config as a dict, for logging and for checkpoints.
"""

import ast
import os
import sys
import types

CONFIG_TYPES = (int, float, bool, str)


def config_keys(scope):
    """The overridable names of a script: its top-level scalar variables (not _private, not CONSTANTS)."""
    return [k for k, v in scope.items()
            if not k.startswith("_") and not k.isupper() and (v is None or type(v) in CONFIG_TYPES)]


def parse_value(text):
    # Python literal if it parses as one, otherwise the raw string: --run=my_run needs no quotes
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):  # the parser gives up on long free text
        return text


def checked(key, value, current):
    """value, coerced to the type of the current value, or a clear error."""
    if current is None or value is None:
        return value
    want = type(current)
    if want is float and type(value) is int:
        return float(value)  # --lr=1 means 1.0, no need to be pedantic
    if type(value) is not want:
        raise SystemExit(f"config error: --{key}={value!r} has type {type(value).__name__}, "
                         f"but {key} takes a {want.__name__} (default {current!r})")
    return value


def unknown_key_error(key, keys):
    return SystemExit(f"config error: unknown key '{key}'. Valid keys: {', '.join(sorted(keys))}")


def configure(scope, argv=None):
    """Apply command-line overrides to a script's globals (in place); return the resolved config dict."""
    argv = sys.argv[1:] if argv is None else argv
    keys = config_keys(scope)
    for arg in argv:
        if not arg.startswith("--"):
            # a config file: run it in a scratch namespace, then apply what it set like --key=value
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                raise SystemExit(f"config error: cannot read config file '{arg}': {e}")
            file_scope = {}
            exec(source, file_scope)
            for key, value in file_scope.items():
                if key.startswith("_") or isinstance(value, types.ModuleType):
                    continue  # dunders and imports are not settings
                if key not in keys:
                    raise unknown_key_error(key, keys)
                scope[key] = checked(key, value, scope[key])
            continue
        key, sep, text = arg[2:].partition("=")  # partition: values may contain '='
        if not sep:
            raise SystemExit(f"config error: '{arg}' is not of the form --key=value")
        if key not in keys:
            raise unknown_key_error(key, keys)
        value = parse_value(text)
        if isinstance(scope[key], str) and type(value) in (int, float):
            value = text  # a number given to a text setting is that text: --cases=640 means "640"
        scope[key] = checked(key, value, scope[key])
        if os.environ.get("RANK", "0") == "0":
            print(f"Overriding: {key} = {scope[key]!r}")
    return {k: scope[k] for k in keys}
