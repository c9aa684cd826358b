"""Paillier strategy tests of both Flower APIs: models, updates encrypted as the client
mods make them, tampered ones, and a search for private key material."""

from __future__ import annotations

import numpy as np

from strategies.paillier import Encryptor, PrivateKey
from strategies.paillier_node import encrypt_local_model, round_config
from strategies.paillier_protocol import (CIPHERTEXTS_KEY, EncryptedModel, Layout, aggregate,
                                          decrypt_model, encrypt_update)
from strategies.paillier_tags import TagKey
from tests.helpers import RUN, SHAPES


def model(value: float, seed: int | None = None) -> dict[str, np.ndarray]:
    """Arrays of SHAPES around ``value``, jittered when ``seed`` is given."""
    rng = np.random.default_rng(seed)
    return {k: (value + (rng.uniform(-0.5, 0.5, s) if seed is not None else np.zeros(s)))
            .astype(np.float32) for k, s in SHAPES.items()}


def expected_average(models: list[dict[str, np.ndarray]], weights: list[int]) -> list[np.ndarray]:
    return [np.average(np.stack([m[k].astype(np.float64) for m in models]), axis=0,
                       weights=weights) for k in SHAPES]


def assert_weighted_average_of_good(arrays, keypair, good, strategy) -> None:
    """The aggregate holds the two good replies (weights 10 and 30), averaged within
    one quantization step."""
    summed = EncryptedModel.from_arrays(arrays, keypair[0])
    assert summed.total_weight == 40
    for out, exp in zip(decrypt_model(keypair[1], summed)[0], expected_average(good, [10, 30]),
                        strict=True):
        np.testing.assert_allclose(out, exp, rtol=0, atol=strategy.params.max_error())


def encrypted_arrays(keypair, arrays: list[np.ndarray], names: list[str], n: int,
                     strategy, node: int, server_round: int = 1) -> dict[str, np.ndarray]:
    """Node ``node``'s update as the client mods make it."""
    config = round_config(strategy.params, keypair[0].fingerprint, strategy.weight_unit,
                          server_round)
    update, _ = encrypt_local_model(config, names, arrays, n, keypair[1], run=RUN, node=node,
                                    workers=1)
    return update.to_arrays()


def foreign_arrays(public_key, arrays: list[np.ndarray], names: list[str], n: int, params,
                   node: int) -> dict[str, np.ndarray]:
    """An update encrypted under another federation's key, encoding otherwise right."""
    return encrypt_update(arrays, Layout.of(names, arrays), n, params, Encryptor(public_key),
                          TagKey(bytes(32), public_key.n), run=RUN, server_round=1,
                          node=node).to_arrays()


def global_model(keypair, arrays: list[np.ndarray], layout: Layout, params,
                 server_round: int = 1) -> EncryptedModel:
    """An honest aggregate whose average is ``arrays``: the updates of nodes 101 and 102
    (weights 1 and 2) of ``server_round``, as a server sends it back to the nodes."""
    encryptor, tag_key = Encryptor(keypair[0]), TagKey.from_private_key(keypair[1])
    updates = [encrypt_update(arrays, layout, w, params, encryptor, tag_key, run=RUN,
                              server_round=server_round, node=node)
               for node, w in ((101, 1), (102, 2))]
    return aggregate(keypair[0], updates)


def truncated(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**arrays, CIPHERTEXTS_KEY: arrays[CIPHERTEXTS_KEY][:, :-1].copy()}


def with_big_row(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    cts = arrays[CIPHERTEXTS_KEY].copy()
    cts[0, :] = 0xFF  # 2^(8 * width) - 1 >= n^2
    return {**arrays, CIPHERTEXTS_KEY: cts}


def find_secrets(obj, private_key: PrivateKey, path: str = "strategy", seen=None) -> list[str]:
    """Paths below ``obj`` (attributes, slots, containers) that hold a PrivateKey, a prime
    or a subgroup prime (the order of ``h``: it decrypts too)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, bytes, float, bool, type(None))):
        return []
    seen.add(id(obj))
    if isinstance(obj, PrivateKey):
        return [path]
    try:
        if int(obj) in (int(private_key.p), int(private_key.q), int(private_key.alpha_p),
                        int(private_key.alpha_q), int(private_key.alpha_p * private_key.alpha_q)):
            return [path]
    except (TypeError, ValueError, OverflowError):
        pass
    found: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += find_secrets(k, private_key, f"{path}[key]", seen)
            found += find_secrets(v, private_key, f"{path}[{k!r}]", seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            found += find_secrets(v, private_key, f"{path}[{i}]", seen)
    elif isinstance(obj, np.ndarray):
        return []
    children = dict(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if hasattr(obj, slot):
                children[slot] = getattr(obj, slot)
    for name, value in children.items():
        found += find_secrets(value, private_key, f"{path}.{name}", seen)
    return found
