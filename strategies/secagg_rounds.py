"""The server side of masked secure aggregation shared by both Flower APIs: the
strategy's arguments checked, and the round in progress driven through its key
stages and unmasking (:class:`SecAggRounds`). The Message-API adapter
(:mod:`strategies.secagg_message`) and the legacy one (:mod:`strategies.secagg_legacy`)
only supply the message exchange; neither imports the other."""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO, WARNING

import numpy as np
from flwr.common.logger import log

from .aggregation import Layout
from .secagg_masks import SecAggError, SecAggParams
from .screening import RoundWatch
from .secagg_protocol import Prepared, ServerRound

def secagg_params(clip: float, max_total_weight: int, value_bits: int, num_neighbors: int,
                   threshold_fraction: float) -> SecAggParams:
    """Check a masking strategy's arguments; the encoding its clients must use."""
    if num_neighbors < 0:
        raise ValueError(f"num_neighbors must be >= 0 (0: SecAgg+'s logarithmic default), "
                         f"got {num_neighbors}")
    if not 0.5 <= threshold_fraction < 1.0:
        raise ValueError(f"threshold_fraction must be in [0.5, 1), got {threshold_fraction}: "
                         "below a half, two sets of survivors could each reach the threshold "
                         "and the consistency check would not hold")
    try:
        return SecAggParams.derive(clip, max_total_weight, value_bits)
    except SecAggError as err:
        raise ValueError(str(err)) from None



class SecAggRounds:
    """What both masking strategies (Message API and legacy) hold: the encoding, the
    round's settings, the public keys seen so far and the round in progress."""

    server_sees = "masked"  # for CentralDP: clients clip, noise goes on the unmasked sum

    def _init_masking(self, clip: float, max_total_weight: int, value_bits: int,
                      num_neighbors: int, threshold_fraction: float, stage_timeout: float,
                      max_empty_rounds: int) -> None:
        self.watch = RoundWatch(max_empty_rounds)
        self.params = secagg_params(clip, max_total_weight, value_bits, num_neighbors,
                                     threshold_fraction)
        self.num_neighbors = num_neighbors
        self.threshold_fraction = threshold_fraction
        self.stage_timeout = stage_timeout
        self._seen_keys: set[bytes] = set()
        self._round: ServerRound | None = None
        self._layout: Layout | None = None
        # what the last round's survivors prepared for the next one (keys, shares)
        self._next: Prepared | None = None
        self.last_total_weight = 0  # of the last aggregate: central DP reads it
        self.last_level_sum: np.ndarray | None = None  # and its sum of levels
        # distributed DP (set by the DP wrapper): the noise std, in levels, the nodes add,
        # and the fraction of the members they share it among
        self.distributed_noise_levels = 0.0
        self.distributed_noise_fraction = 0.0

    def _new_round(self, nodes: list[int]) -> ServerRound:
        """The round of ``nodes``; on what the last round prepared for it, if any (used
        once)."""
        prepared, self._next = self._next, None
        rnd = ServerRound(self.params, nodes, self._layout.size, self.num_neighbors,
                          self.threshold_fraction, self._seen_keys, prepared)
        rnd.noise_levels = self.distributed_noise_levels
        rnd.noise_fraction = self.distributed_noise_fraction
        return rnd

    def _key_stages(self, rnd: ServerRound, exchange: Callable[[dict[int, str], str],
                                                                 dict[int, str]]) -> None:
        """Stages 1 and 2 through ``exchange(requests, stage) -> replies``: stage 1 only
        for the nodes without pre-advertised keys (skipped when there are none), and in
        a sparse round the coin stage that draws the graph. Both are skipped when the
        sampled nodes made their keys and shares for this round in the last one."""
        if rnd.preshared:
            log(INFO, "Secure aggregation: advertise and share stages skipped, all %d nodes "
                "sent their keys and shares in the last round", len(rnd.nodes))
            rnd.receive_adverts({})
            rnd.receive_shares(rnd.preshared)
            return
        requests = rnd.advertise_requests()
        if requests:
            rnd.receive_adverts(exchange(requests, "advertise"))
            signed = sum(1 for a in rnd.adverts.values() if a.get("sig"))
            log(INFO if signed == len(rnd.adverts) else WARNING, "Secure aggregation: %d of %d "
                "nodes' key advertisements are signed", signed, len(rnd.adverts))
        else:
            log(INFO, "Secure aggregation: advertise stage skipped, all %d nodes "
                "pre-advertised their keys", len(rnd.nodes))
            rnd.receive_adverts({})
        coins = rnd.coin_requests()
        if coins:
            rnd.receive_coins(exchange(coins, "coin"))
        rnd.receive_shares(exchange(rnd.share_requests(), "share"))

    def _unmask(self, rnd: ServerRound, exchange: Callable[[dict[int, str], str],
                                                           dict[int, str]]
                ) -> tuple[np.ndarray, int, dict[str, float]]:
        """The consistency check and the unmask stage through ``exchange``: the weighted
        average, the total weight and the train metrics' example-weighted averages
        (from their sums: the server never sees one node's). Keeps the keys
        pre-advertised and shares made for the next round (even if this one aborts: they
        are bound to the next round's context only)."""
        rnd.receive_checks(exchange(rnd.check_requests(), "check"))
        replies = exchange(rnd.unmask_requests(), "unmask")
        try:
            average, weight = rnd.receive_unmask(replies)
            self.last_level_sum = rnd.level_sum
        finally:
            self._next = rnd.prepared_next()
        return average, weight, {k: v / weight for k, v in rnd.sums.items()}

    def _describe(self) -> str:
        return (f"{self.params.value_bits}-bit values in [-{self.params.clip:g}, "
                f"{self.params.clip:g}] mod 2^{self.params.mod_bits}, neighbors "
                f"{self.num_neighbors or 'auto (log n)'}, threshold > {self.threshold_fraction:g} "
                "of each share group")

