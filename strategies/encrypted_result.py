"""The final model of a Paillier run, as a Flower app's own code holds it.

A Paillier strategy's result is ciphertexts and a header, not weights. An app written
for plaintext FedAvg would save it as weights without a word (``np.savez(...,
*arrays.to_numpy_ndarrays())`` stores ciphertext bytes) or hand it to its
``evaluate_fn``. So the strategies return it as an :class:`EncryptedArrayRecord`,
whose ``to_numpy_ndarrays``/``to_torch_state_dict`` raise :class:`EncryptedModelError`
saying what to do instead, and refuse an ``evaluate_fn``:

    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=5)
    save_encrypted_model(result.arrays, "model.encrypted.npz")      # server

    fedapp decrypt --key paillier.key.json --model model.encrypted.npz \
        --out model.npz                                            # a key holder

On the legacy API, whose ``ServerApp(server_fn=...)`` gives the app no hook after the
run, ``LegacyPaillierFedAvg(save_to=PATH)`` writes each round's encrypted aggregate,
and ``LegacyThresholdPaillierFedAvg(save_to=PATH)`` each round's sealed model (``fedapp
decrypt --key paillier-group.key`` opens it on a client machine).
Evaluation happens on the clients (``fraction_evaluate``) or on a key holder with the
decrypted model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord

from .paillier_protocol import EncryptedModel
from .records import record_arrays
from .threshold_protocol import is_sealed

HOW_TO_READ = ("save it with strategies.save_encrypted_model(arrays, "
               "'model.encrypted.npz') and decrypt it on a key holder: fedapp decrypt --key "
               "paillier.key.json --model model.encrypted.npz --out model.npz")


class EncryptedModelError(TypeError):
    """Plaintext weights asked of an encrypted model."""


class EncryptedArrayRecord(ArrayRecord):
    """An ``ArrayRecord`` holding a Paillier-encrypted model (ciphertexts and header,
    :meth:`strategies.paillier_protocol.EncryptedModel.to_arrays`) that refuses to pass
    for weights."""

    def to_numpy_ndarrays(self, *, keep_input: bool = True) -> list[np.ndarray]:
        raise EncryptedModelError(f"this model is Paillier-encrypted, not weights: {HOW_TO_READ}")

    def to_torch_state_dict(self, *, keep_input: bool = True) -> dict:
        raise EncryptedModelError(f"this model is Paillier-encrypted, not weights: {HOW_TO_READ}")

    def save(self, path: str | Path) -> Path:
        """Write the encrypted model to ``path`` (:func:`save_encrypted_model`)."""
        return save_encrypted_model(self, path)


def encrypted_record(record: ArrayRecord) -> ArrayRecord:
    """``record`` as an :class:`EncryptedArrayRecord` if it holds an encrypted model."""
    if isinstance(record, EncryptedArrayRecord) or \
            not EncryptedModel.is_encrypted(record_arrays(record)):
        return record
    return EncryptedArrayRecord(dict(record.items()))


def save_encrypted_model(model: ArrayRecord | Mapping[str, np.ndarray], path: str | Path
                         ) -> Path:
    """Write an encrypted model (a strategy's result arrays, or the arrays of
    :meth:`EncryptedModel.to_arrays`), or a threshold run's sealed model
    (:func:`strategies.threshold_protocol.seal_model`), to ``path``, an ``.npz`` that
    ``fedapp decrypt`` reads; the file is replaced whole or not at all.

    Raises
    ------
    ValueError
        If ``model`` is neither (save plaintext weights as usual).
    """
    arrays = record_arrays(model) if isinstance(model, ArrayRecord) else dict(model)
    if not (EncryptedModel.is_encrypted(arrays) or is_sealed(arrays)):
        raise ValueError("not a Paillier-encrypted model nor a sealed one: save plaintext "
                         "weights as usual")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **arrays)
    os.replace(partial, path)
    return path
