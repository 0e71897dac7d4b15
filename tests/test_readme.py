"""The README's commands stay in step with the code: every script they run exists, every --key is a variable of
that script (or of what a shell entry point passes it to), every config file exists and sets only known keys, and
the Python snippets import names that exist."""

import ast
import importlib
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# shell entry points and the script their extra arguments go to (besides their own flags)
SHELL_SCRIPTS = {"tier1.sh": ("vis_tok_train", {"data"}), "lines.sh": ("vis_tok_train", set()),
                 "pages.sh": ("vis_tok_train", set()),
                 "test.sh": (None, set())}


def readme_blocks(language):
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(rf"```{language}\n(.*?)```", f.read(), flags=re.S)


def readme_commands():
    """Every command line of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def script_keys(name):
    """The config keys of scripts/NAME.py from its source: top-level assignments, and those of a script it
    takes with `from scripts.X import *`."""
    with open(os.path.join(ROOT, "scripts", f"{name}.py")) as f:
        tree = ast.parse(f.read())
    keys = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scripts.") and \
                node.names[0].name == "*":
            keys |= script_keys(node.module.split(".", 1)[1])
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            for t in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if isinstance(t, ast.Name) and not t.id.startswith("_") and not t.id.isupper():
                    keys.add(t.id)
    return keys


def config_file_keys(path):
    scope = {}
    with open(os.path.join(ROOT, path)) as f:
        exec(f.read(), scope)
    return {k for k, v in scope.items() if not k.startswith("_") and not hasattr(v, "__file__")}


def check_arguments(script, arguments, extra_keys=()):
    keys = script_keys(script) | set(extra_keys)
    for arg in arguments:
        assert arg != "--", f"a bare '--' reaches {script} as an argument and stops it"
        if arg.startswith("--"):
            key = arg[2:].split("=", 1)[0]
            assert key in keys, f"README passes --{key} to {script}, which has no such variable"
        else:
            assert os.path.isfile(os.path.join(ROOT, arg)), f"README names config file {arg}, which does not exist"
            unknown = config_file_keys(arg) - keys
            assert not unknown, f"{arg} sets {unknown}, not variables of {script}"


def test_readme_commands_name_real_scripts_and_flags():
    commands = readme_commands()
    assert len(commands) >= 15
    checked = 0
    for words in commands:
        if "-m" in words:
            module = words[words.index("-m") + 1]
            assert module.startswith("scripts."), words
            script = module.split(".", 1)[1]
            assert os.path.isfile(os.path.join(ROOT, "scripts", f"{script}.py")), f"no scripts/{script}.py"
            check_arguments(script, words[words.index("-m") + 2:])
            checked += 1
        elif words[0] == "bash":
            name = os.path.basename(words[1])
            assert os.path.isfile(os.path.join(ROOT, words[1])) and name in SHELL_SCRIPTS, words
            target, own = SHELL_SCRIPTS[name]
            if target:
                check_arguments(target, words[2:], own)
            checked += 1
    assert checked == len(commands), "a README command is neither `python -m scripts.X` nor `bash scripts/X.sh`"


def test_readme_python_snippets_import_what_exists():
    for block in readme_blocks("python"):
        for module, names in re.findall(r"^from (nanovlm\.\w+) import (.+)$", block, flags=re.M):
            loaded = importlib.import_module(module)
            for name in names.split(","):
                assert hasattr(loaded, name.strip()), f"README imports {name.strip()} from {module}"


@pytest.mark.parametrize("config", ["config/d20.py"])
def test_config_files_set_only_known_keys(config):
    check_arguments("vis_tok_train", [config])
