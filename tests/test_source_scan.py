"""Nothing in the project unpickles or evaluates data: a scan of the source of
fedapp/, strategies/, clients/ and scripts/ for pickle, eval-like calls and unsafe
loaders (numpy without allow_pickle=False, torch.load without weights_only=True,
yaml.load, shells)."""

from __future__ import annotations

import ast

from tests.helpers import ROOT


SCANNED = ("fedapp", "strategies", "clients", "scripts")
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib",
                  "jsonpickle", "marshal", "shelve"}
#: ``(path relative to the project, source line)``: reason. Empty: no legitimate
#: use exists. An entry that no longer matches anything fails the test.
ALLOWED: dict[tuple[str, str], str] = {}


def _root_name(node: ast.AST) -> str:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else ""


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expression>"
    return "<missing>"


def unsafe_uses(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for every pickle, eval-like call or unsafe loader in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) \
                else [node.module or ""]
            found += [(node.lineno, f"imports {n}") for n in names
                      if n.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.Name | ast.Attribute):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if "pickle" in name.lower() or name in UNSAFE_MODULES:
                found.append((node.lineno, f"uses {name}"))
        if not isinstance(node, ast.Call):
            continue
        func, root = node.func, _root_name(node.func)
        if isinstance(func, ast.Name) and func.id in {"eval", "exec", "compile", "__import__"}:
            found.append((node.lineno, f"calls {func.id}()"))
        if isinstance(func, ast.Attribute):
            if root == "builtins" and func.attr in {"eval", "exec", "compile"}:
                found.append((node.lineno, f"calls builtins.{func.attr}()"))
            if root in {"np", "numpy"} and func.attr in {"load", "loads"} \
                    and _keyword(node, "allow_pickle") is not False:
                found.append((node.lineno, f"{root}.{func.attr} without allow_pickle=False"))
            if root == "torch" and func.attr == "load" and _keyword(node, "weights_only") is not True:
                found.append((node.lineno, "torch.load without weights_only=True"))
            if root == "yaml" and func.attr in {"load", "load_all", "unsafe_load", "full_load"}:
                found.append((node.lineno, f"yaml.{func.attr} (use yaml.safe_load)"))
            if root == "os" and func.attr in {"system", "popen"}:
                found.append((node.lineno, f"os.{func.attr} runs a shell"))
        if _keyword(node, "allow_pickle") not in (False, "<missing>"):
            found.append((node.lineno, "allow_pickle is not False"))
        if _keyword(node, "shell") not in (False, "<missing>"):
            found.append((node.lineno, "shell=True runs a shell"))
    return sorted(set(found))


def test_the_scan_finds_every_unsafe_pattern():
    bad = """
import pickle
from marshal import loads
import numpy as np, torch, yaml, os, subprocess, builtins, shelve
pickle.loads(b"")
eval("1"); exec("x = 1"); builtins.eval("2")
np.load(f); np.load(f, allow_pickle=True); numpy.load(f, allow_pickle=flag)
torch.load(f); torch.load(f, weights_only=False)
yaml.load(s); yaml.full_load(s)
pd.read_pickle(f)
os.system("ls"); subprocess.run("ls", shell=True)
"""
    good = """
import json, numpy as np, torch, yaml, subprocess
np.load(f, allow_pickle=False); torch.load(f, weights_only=True); yaml.safe_load(s)
model.eval(); json.loads(s); subprocess.run(["ls"], check=True)
\"\"\"Nothing here is pickled, nor eval(uated).\"\"\"  # eval( in a comment is fine
"""
    whats = [what for _, what in unsafe_uses(bad)]
    for expected in ("imports pickle", "imports marshal", "imports shelve", "uses pickle",
                     "calls eval()", "calls exec()", "calls builtins.eval()",
                     "np.load without allow_pickle=False", "numpy.load without allow_pickle=False",
                     "allow_pickle is not False", "torch.load without weights_only=True",
                     "yaml.load (use yaml.safe_load)", "yaml.full_load (use yaml.safe_load)",
                     "uses read_pickle", "os.system runs a shell", "shell=True runs a shell"):
        assert expected in whats, expected
    assert unsafe_uses(good) == []


def test_no_pickle_or_eval_in_the_project_source():
    files = sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 40 and {p.parent.name for p in files} >= set(SCANNED)
    found, allowed_seen = [], set()
    for path in files:
        rel = str(path.relative_to(ROOT))
        lines = path.read_text().splitlines()
        for line, what in unsafe_uses(path.read_text()):
            key = (rel, lines[line - 1].strip())
            if key in ALLOWED:
                allowed_seen.add(key)
            else:
                found.append(f"{rel}:{line}: {what}: {key[1]}")
    assert found == [], "\n".join(found)
    assert allowed_seen == set(ALLOWED), f"stale allow-list entries: {set(ALLOWED) - allowed_seen}"
