"""The shape of strategies/: cores that never import Flower, one adapter per Flower API
that never imports the other's, a public API that resolves, and a config whose
settings are the same in pyproject.toml, the code and the README's table."""

from __future__ import annotations

import ast
import re
import tomllib
import strategies
from fedapp.config import DEFAULTS
from tests.helpers import ROOT

PACKAGE = ROOT / "strategies"
CORES = {"aggregation", "checks", "fixed_point", "encoding", "paillier", "paillier_protocol",
         "paillier_tags", "threshold_paillier", "secagg_identity", "secagg_masks",
         "secagg_protocol", "secagg_wire", "secure_sums", "dp", "discrete_gaussian", "keyfiles",
         "legacy_wire", "opacus_import", "threshold_protocol", "plaintext_proofs",
         "ring_masks"}
MESSAGE_API = {"fedavg", "paillier_message", "secagg_message", "dp_message",
               "threshold_message"}
LEGACY_API = {"paillier_legacy", "secagg_legacy", "dp_legacy", "threshold_legacy"}


def imports(module: str) -> set[str]:
    """Top-level names of what ``strategies/<module>.py`` imports (``.x`` as ``x``)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(("." * node.level) + node.module)
        elif isinstance(node, ast.ImportFrom):  # from . import x
            found |= {"." * node.level + a.name for a in node.names}
    return found


def local(names: set[str]) -> set[str]:
    return {n.lstrip(".") for n in names if n.startswith(".")}


def test_every_module_is_placed():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    shared = {"paillier_node", "secagg_rounds", "secagg_node", "dp_rounds", "screening",
              "node_errors", "node_settings", "records", "encrypted_result", "threshold_node",
              "threshold_rounds"}
    assert modules == CORES | MESSAGE_API | LEGACY_API | shared


def test_cores_never_import_flower():
    for module in CORES:
        assert not [n for n in imports(module) if n.split(".")[0] == "flwr"], module
        assert not local(imports(module)) - CORES, module  # nor anything above them


def test_the_two_api_adapters_never_import_each_other():
    for module in MESSAGE_API:
        assert not local(imports(module)) & LEGACY_API, module
    for module in LEGACY_API:
        assert not local(imports(module)) & MESSAGE_API, module
    shared = {"paillier_node", "secagg_rounds", "secagg_node", "dp_rounds", "threshold_node",
              "threshold_rounds"}
    for module in shared:
        assert not local(imports(module)) & (MESSAGE_API | LEGACY_API), module


def test_central_dp_imports_no_secure_strategy():
    for module in ("dp_message", "dp_legacy", "dp_rounds"):
        assert not local(imports(module)) & {"paillier_message", "secagg_message",
                                              "secagg_legacy"}, module


def test_public_api_resolves():
    for name in strategies.__all__:
        assert getattr(strategies, name) is not None
    from strategies import PaillierFedAvg, SecAggFedAvg, paillier_mod

    assert PaillierFedAvg.server_sees == "encrypted" and SecAggFedAvg.server_sees == "masked"
    assert callable(paillier_mod)


def test_settings_agree_in_pyproject_code_and_readme():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == DEFAULTS
    readme = (ROOT / "docs" / "configuration.md").read_text()
    table = re.search(r"\| key \| default \| meaning \|\n\|---\|---\|---\|\n((?:\|.*\n)+)",
                      readme)
    assert table, "the README's run configuration table"
    documented: dict[str, str] = {}
    for row in table[1].splitlines():
        keys_cell, default_cell = row.split("|")[1:3]
        keys = re.findall(r"`([a-z0-9-]+)`", keys_cell)
        defaults = re.findall(r"`([^`]+)`", default_cell)
        for key, default in zip(keys, defaults):
            documented[key] = default
    assert set(documented) == set(DEFAULTS)

    assert {k: tomllib.loads(f"v = {v}")["v"] for k, v in documented.items()} == DEFAULTS


def test_node_settings_agree_in_code_and_docs():
    from strategies.node_settings import SETTINGS

    text = (ROOT / "docs" / "configuration.md").read_text()
    table = re.search(r"\| node setting \| default \| meaning \|\n\|---\|---\|---\|\n((?:\|.*\n)+)",
                      text)
    assert table, "the node settings table"
    documented = {re.findall(r"`([a-z0-9-]+)`", row.split("|")[1])[0]:
                  tomllib.loads(f"v = {re.findall(r'`([^`]+)`', row.split('|')[2])[0]}")["v"]
                  for row in table[1].splitlines()}
    assert documented == {k: default for k, (default, _) in SETTINGS.items()}
