"""DP-SGD's settings and its privacy accountant's state, without Opacus's training code.

What a client needs on every message (is DP-SGD asked for? what is this node's
accountant history?) lives here, so a ClientApp process (real nodes start one per
message) imports Opacus, about 6 s on these machines, only when it trains with DP-SGD
(:mod:`clients.dp_sgd`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from flwr.app import ConfigRecord, RecordDict

from .training import config_number

#: The accountant behind every epsilon reported here.
ACCOUNTANT = "rdp"

#: The ConfigRecord in the node's state that holds the accountant's history.
STATE_KEY = "dp-sgd-accountant"


History = list[tuple[float, float, int]]



@dataclass(frozen=True)
class DPSGDConfig:
    """DP-SGD settings, as the server sends them with every fit config.

    Parameters
    ----------
    noise_multiplier : float
        ``z``: noise std in units of ``max_grad_norm``; must be positive.
    max_grad_norm : float
        ``C``: every example's gradient is clipped to this L2 norm.
    delta : float
        The delta at which epsilon is reported, in (0, 1).

    Raises
    ------
    ValueError
        If a value is out of range.
    """

    noise_multiplier: float
    max_grad_norm: float
    delta: float

    def __post_init__(self) -> None:
        if not 0 < self.noise_multiplier < math.inf:
            raise ValueError(
                f"dp-sgd-noise-multiplier must be positive and finite, got "
                f"{self.noise_multiplier}: without noise no epsilon is finite (set dp-sgd = "
                "false to train without DP)")
        if not 0 < self.max_grad_norm < math.inf:
            raise ValueError(f"dp-sgd-max-grad-norm must be positive and finite, got "
                             f"{self.max_grad_norm}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp-delta must be in (0, 1), got {self.delta}")

    @staticmethod
    def from_config(config: dict) -> DPSGDConfig | None:
        """The settings in a fit config, or None if it asks for no DP-SGD.

        The server adds ``dp-sgd-noise-multiplier``, ``dp-sgd-max-grad-norm`` and
        ``dp-delta`` when the run's ``dp-sgd`` is true.

        Raises
        ------
        ValueError
            If only some of the three keys are present, or a value is out of range.
        """
        keys = ("dp-sgd-noise-multiplier", "dp-sgd-max-grad-norm", "dp-delta")
        if "dp-sgd-noise-multiplier" not in config:
            return None
        missing = [k for k in keys if k not in config]
        if missing:
            raise ValueError(f"the fit config asks for DP-SGD but lacks {missing}")
        return DPSGDConfig(*(config_number(config, k, float) for k in keys))



@dataclass(frozen=True)
class DPSGDResult:
    """What one round of DP-SGD local training gives back.

    Attributes
    ----------
    loss : float
        Mean training loss over the examples sampled this round.
    history : History
        The accountant's history after this round: every round so far.
    epsilon : float
        Cumulative epsilon (RDP accountant) at ``delta`` over ``history``.
    steps : int
        Steps taken this round.
    """

    loss: float
    history: History
    epsilon: float
    steps: int



# -- State kept between rounds ---------------------------------------------------------------

def load_history(state: RecordDict) -> History:
    """The RDP accountant's history stored in a node's ``context.state`` (empty at first).

    Raises
    ------
    ValueError
        If the stored record is malformed or from another accountant.
    """
    if STATE_KEY not in state.config_records:
        return []
    record = state.config_records[STATE_KEY]
    if record.get("accountant") != ACCOUNTANT:
        raise ValueError(f"the node state's '{STATE_KEY}' holds a "
                         f"'{record.get('accountant')}' history, expected '{ACCOUNTANT}'")
    try:
        return [(float(z), float(q), int(s)) for z, q, s in json.loads(str(record["history"]))]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"the node state's '{STATE_KEY}' history is malformed: {err}") from err



def save_history(state: RecordDict, history: History) -> None:
    """Store the accountant's history in a node's ``context.state``, as JSON."""
    state.config_records[STATE_KEY] = ConfigRecord({
        "accountant": ACCOUNTANT,
        "history": json.dumps([[float(z), float(q), int(s)] for z, q, s in history]),
    })



def epsilon(history: History, delta: float) -> float:
    """Epsilon of ``history`` at ``delta`` by Opacus's RDP accountant (0 if empty)."""
    import strategies.opacus_import  # noqa: F401  (before opacus: keeps logging as it was)
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))

