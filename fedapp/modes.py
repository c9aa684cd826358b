"""The aggregation modes: the one place that says, per value of the ``aggregation``
setting, which strategy the server runs, which mod the clients run, what the server
sees of the updates and what the mode's settings must satisfy.

The strategy builder (:mod:`fedapp.strategy`), the ClientApp, the ServerApp and the
settings check all read :data:`MODES`; nothing else switches on the mode's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.clientapp.typing import Mod
    from flwr.serverapp.strategy import Strategy

    from .config import RunSettings


@dataclass(frozen=True)
class Mode:
    """One aggregation mode.

    Attributes
    ----------
    name : str
        The ``aggregation`` setting's value.
    strategy : Callable[[RunSettings, dict], Strategy]
        Builds the server's Message-API strategy from the settings and FedAvg's
        sampling arguments.
    client_mod : str | None
        ``"module:name"`` of the ClientApp mod (imported when a node needs it).
    server_sees : str
        ``"plain"``, ``"masked"``, ``"encrypted"`` or ``"sealed"`` (as the strategy
        class says).
    check : Callable[[RunSettings], None]
        Raises ``ValueError`` naming the setting when the mode's settings do not fit;
        runs wherever settings are read (server and client nodes), so it never needs a
        key file.
    """

    name: str
    strategy: Callable[[RunSettings, dict], Strategy]
    client_mod: str | None
    server_sees: str
    check: Callable[[RunSettings], None]

    def mod(self) -> Mod | None:
        """The ClientApp mod, imported."""
        if self.client_mod is None:
            return None
        import importlib

        module, name = self.client_mod.split(":")
        return getattr(importlib.import_module(module), name)


def _plain(settings: RunSettings, sampling: dict[str, Any]) -> Strategy:
    from strategies.fedavg import WeightedFedAvg

    return WeightedFedAvg(**sampling)


def _paillier(settings: RunSettings, sampling: dict[str, Any]) -> Strategy:
    """Loads the public key file named by ``paillier-public-key``; the server never
    loads a private key (the loader refuses one)."""
    from strategies.keyfiles import load_public_key
    from strategies.paillier_message import PaillierFedAvg

    return PaillierFedAvg(
        load_public_key(Path(settings.paillier.public_key).expanduser()),
        clip=settings.paillier.clip, value_bits=settings.paillier.value_bits,
        max_total_weight=settings.paillier.max_total_weight,
        weight_unit=settings.paillier.weight_unit, decrypt_once=settings.paillier.decrypt_once,
        stage_timeout=settings.round_timeout, **sampling)


def _threshold(settings: RunSettings, sampling: dict[str, Any]) -> Strategy:
    """Loads the threshold public key file named by ``paillier-public-key``; the loader
    refuses a key share."""
    from strategies.keyfiles import load_threshold_public_key
    from strategies.threshold_message import ThresholdPaillierFedAvg

    return ThresholdPaillierFedAvg(
        load_threshold_public_key(Path(settings.paillier.public_key).expanduser()),
        clip=settings.paillier.clip, value_bits=settings.paillier.value_bits,
        max_total_weight=settings.paillier.max_total_weight,
        weight_unit=settings.paillier.weight_unit,
        extra_decryptors=settings.paillier.extra_decryptors,
        payload=settings.paillier.threshold_payload,
        stage_timeout=settings.round_timeout, **sampling)


def _masking(settings: RunSettings, sampling: dict[str, Any]) -> Strategy:
    from strategies.secagg_message import SecAggFedAvg

    return SecAggFedAvg(
        clip=settings.secagg.clip, value_bits=settings.secagg.value_bits,
        max_total_weight=settings.secagg.max_total_weight,
        num_neighbors=settings.secagg.neighbors, threshold_fraction=settings.secagg.threshold,
        stage_timeout=settings.round_timeout, **sampling)


def _check_plain(settings: RunSettings) -> None:
    return None


def _check_paillier(settings: RunSettings) -> None:
    if not settings.paillier.public_key:
        raise ValueError("aggregation='paillier' needs paillier-public-key: the path of the "
                         "public key file on the server (make one with 'fedapp keygen')")
    _check_paillier_dp(settings)


def _check_paillier_dp(settings: RunSettings) -> None:
    if settings.dp.noise_multiplier > 0 and settings.dp.adaptive_clip:
        raise ValueError("adaptive clipping needs the count of unclipped updates, which the "
                         "server cannot read under Paillier: set dp-adaptive-clip false")


def _check_threshold(settings: RunSettings) -> None:
    if not settings.paillier.public_key:
        raise ValueError("aggregation='paillier-threshold' needs paillier-public-key: the path "
                         "of the threshold public key file on the server "
                         "(paillier-threshold.pub.json, from 'fedapp keygen --threshold T "
                         "--shares N')")
    _check_paillier_dp(settings)


def _check_masking(settings: RunSettings) -> None:
    from strategies.secagg_rounds import secagg_params

    secagg_params(settings.secagg.clip, settings.secagg.max_total_weight,
                   settings.secagg.value_bits, settings.secagg.neighbors,
                   settings.secagg.threshold)
    if settings.dp.noise_multiplier > 0 and settings.dp.adaptive_clip \
            and settings.secagg.clip < 1:
        raise ValueError("adaptive clipping with secagg sends a 0/1 value through the masked "
                         "sum: secagg-clip must be >= 1")


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("fedavg", _plain, None, "plain", _check_plain),
    Mode("paillier", _paillier, "strategies.paillier_message:paillier_mod", "encrypted",
         _check_paillier),
    Mode("paillier-threshold", _threshold, "strategies.threshold_message:threshold_paillier_mod",
         "sealed", _check_threshold),
    Mode("secagg", _masking, "strategies.secagg_message:secagg_mod", "masked", _check_masking),
)}


def mode_of(name: str) -> Mode:
    """The mode named ``name``.

    Raises
    ------
    ValueError
        Naming the modes there are.
    """
    if name not in MODES:
        raise ValueError(f"aggregation must be one of {tuple(MODES)}, got '{name}'")
    return MODES[name]
