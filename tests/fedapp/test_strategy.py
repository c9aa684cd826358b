"""The server's strategy (fedapp.strategy) holds no client secret, for every mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedapp.config import RunSettings
from fedapp.strategy import build_strategy
from strategies.keyfiles import load_identity, load_private_key, write_identity, write_keypair


@pytest.fixture(scope="module")
def paillier_keys(tmp_path_factory) -> tuple[Path, Path]:
    public, private, _ = write_keypair(tmp_path_factory.mktemp("paillier"))
    return public, private


def _holds(obj, needles: list, seen: set[int] | None = None, path: str = "strategy") -> list:
    """Paths below ``obj`` (attributes, slots, containers) holding a Paillier private
    key or one of ``needles``: numbers (compared as ints, so gmpy2 values count),
    bytes, or strings found inside a str or path."""
    from strategies.paillier import PrivateKey

    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, bool | float | None.__class__ | type | np.ndarray):
        return []
    seen.add(id(obj))
    if isinstance(obj, PrivateKey):
        return [path]
    if isinstance(obj, str | bytes | Path):
        text = str(obj) if isinstance(obj, Path) else obj
        return [path] if [n for n in needles if isinstance(n, type(text)) and n in text] else []
    try:
        if int(obj) in [n for n in needles if isinstance(n, int)]:
            return [path]
    except (TypeError, ValueError, OverflowError):
        pass
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += _holds(k, needles, seen, f"{path}[key]")
            found += _holds(v, needles, seen, f"{path}[{k!r}]")
    elif isinstance(obj, list | tuple | set | frozenset):
        for i, v in enumerate(obj):
            found += _holds(v, needles, seen, f"{path}[{i}]")
    children = dict(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if hasattr(obj, slot):
                children[slot] = getattr(obj, slot)
    for name, value in children.items():
        found += _holds(value, needles, seen, f"{path}.{name}")
    return found


def test_server_strategies_hold_no_client_secret(paillier_keys, tmp_path, monkeypatch):
    """Even with the client-side keys in its environment (as in a simulation), the
    server's strategy for every mode holds no private material nor key path."""
    from strategies.keyfiles import KEY_DIR_ENV

    _, auth_path = write_identity(tmp_path)
    monkeypatch.setenv(KEY_DIR_ENV, str(tmp_path))
    private, auth = load_private_key(paillier_keys[1]), load_identity(auth_path).private
    needles = [int(private.p), int(private.q), int(private.alpha_p), int(private.alpha_q), auth,
               auth.hex(), str(paillier_keys[1]), str(auth_path)]
    class Leaky:  # the search would catch a strategy keeping any of them
        def __init__(self):
            self.cache = {"k": [private.q], "path": Path(str(auth_path))}
            self.key, self.mac = private, auth

    assert _holds(Leaky(), needles) == ["strategy.cache['k'][0]", "strategy.cache['path']",
                                        "strategy.key", "strategy.mac"]
    for aggregation in ("fedavg", "secagg", "paillier"):
        for dp in (0.0, 1.0):
            settings = RunSettings.from_run_config({
                "aggregation": aggregation, "paillier-public-key": str(paillier_keys[0]),
                "dp-noise-multiplier": dp})
            strategy = build_strategy(settings)
            assert _holds(strategy, needles) == [], (aggregation, dp)


def test_the_threshold_strategies_hold_no_share_nor_group_key(threshold_key_dir, monkeypatch):
    import json

    from strategies.keyfiles import KEY_DIR_ENV

    monkeypatch.setenv(KEY_DIR_ENV, str(threshold_key_dir))  # as in a simulation
    secrets = [json.loads(p.read_text())[k] for p, k in (
        *((p, "share") for p in threshold_key_dir.glob("*share*")),
        (threshold_key_dir / "paillier-group.key", "key"))]
    needles = [*(int(x, 16) for x in secrets), *secrets,
               *(int(x, 16).to_bytes((len(x) + 1) // 2, "big") for x in secrets)]
    strategy = build_strategy(RunSettings.from_run_config({
        "aggregation": "paillier-threshold",
        "paillier-public-key": str(threshold_key_dir / "paillier-threshold.pub.json")}))
    assert _holds(strategy, needles) == []
    # and the legacy API's, as a server_fn builds it
    from strategies.keyfiles import load_threshold_public_key
    from strategies.threshold_legacy import LegacyThresholdPaillierFedAvg

    legacy = LegacyThresholdPaillierFedAvg(load_threshold_public_key(
        threshold_key_dir / "paillier-threshold.pub.json"), clip=1.0)
    assert _holds(legacy, needles) == []


@pytest.mark.parametrize("given, said", [
    ("paillier.key.json", "holds private key material"),
    ("paillier-threshold-share-1.json", "holds a key share"),
    ("paillier-group.key", "holds the clients' group key")])
def test_the_server_refuses_a_secret_key_file_as_its_public_key(given, said, paillier_keys,
                                                                 threshold_key_dir):
    """(What a ServerApp given the wrong file does: its strategy is built here.)"""
    folder = paillier_keys[1].parent if given == "paillier.key.json" else threshold_key_dir
    aggregation = "paillier" if given == "paillier.key.json" else "paillier-threshold"
    settings = RunSettings.from_run_config({"aggregation": aggregation,
                                            "paillier-public-key": str(folder / given)})
    with pytest.raises(ValueError, match=said):
        build_strategy(settings)
