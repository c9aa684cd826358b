"""Central DP-FedAvg's round logic, shared by both Flower APIs: the settings, the
accountant, the clipping norm, the round's global model, and each step of a round
(clip and sum, or take the unmasked sum, or add encrypted noise; release; account).

The wrapped strategy says what the server sees of the updates (its ``server_sees``:
``"plain"``, ``"masked"`` or ``"encrypted"``; Flower's own FedAvg, without one, is
plain), which decides where clipping happens and how noise is added. The Message-API
wrapper (:mod:`strategies.dp_message`) and the legacy one (:mod:`strategies.dp_legacy`)
only move values in and out of their envelopes; neither imports the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar
from logging import INFO, WARNING

import numpy as np
from flwr.common.logger import log

from .aggregation import check_update
from .discrete_gaussian import MAX_SIGMA, discrete_gaussian, tail_bound
from .dp import (AdaptiveClip, BudgetExhausted, DPConfig, PrivacyLedger, clip_update,
                 distributed_multiplier, noised_average, poisson_sample)
from .paillier import Encryptor
from .paillier_protocol import CLIENT_TAIL_CLIP, ClientNoise, EncryptedModel, add_noise
from .screening import PLAINTEXT_EMPTY_ROUNDS, NoUsableUpdate, RoundWatch
from .checks import is_int, is_number
from .node_settings import node_setting

T = TypeVar("T")

CLIP_KEY = "dp-clip"

BIT_KEY = "dp-unclipped"  # config flag (ask for the bit) and array name
VALUE_CLIP_KEY, STEP_KEY = "dp-value-clip", "dp-quantization-step"  # the secure quantizer
NOISE_LEVELS_KEY = "dp-noise-levels"  # distributed DP: the std the masked sum must carry
QUORUM_KEY = "dp-noise-quorum"  # distributed DP under Paillier: contributors sharing it
FRACTION_KEY = "dp-noise-quorum-fraction"  # under masking: the fraction of members sharing it


SERVER_SEES = ("plain", "masked", "encrypted", "sealed")  # sealed: threshold Paillier
DP_MODES = ("central", "distributed")
TAIL_CLIP = 8.0  # Paillier: the noise is clipped at this many standard deviations
MIN_NOISE_SETTING = "dp-min-noise-multiplier"
GRID_SLACK = 1e-6  # plaintext: rounding to the fine grid costs this fraction of the clip


def server_sees(strategy: object) -> str:
    """What the server sees of the updates under ``strategy`` (see the module)."""
    seen = getattr(strategy, "server_sees", "plain")
    if seen not in SERVER_SEES:
        raise ValueError(f"{type(strategy).__name__}.server_sees is {seen!r}, not one of "
                         f"{SERVER_SEES}")
    return seen


class DPRounds:
    """The central-DP state both wrappers (Message API and legacy) hold: settings,
    accountant, clipping norm, the round's global model, and the steps of a round."""

    def _init_dp(self, strategy: object, *, noise_multiplier: float,
                 clip: float, population: int, delta: float, max_epsilon: float,
                 adaptive: bool, target_quantile: float, clip_learning_rate: float,
                 clipped_count_stddev: float | None, sampling: str, mode: str,
                 quorum: float = 0.8) -> None:
        seen = server_sees(strategy)
        # threshold Paillier ("sealed") is Paillier whose model the clients decrypt and seal
        self.masked, self.sealed = seen == "masked", seen == "sealed"
        self.encrypted = seen in ("encrypted", "sealed")
        if mode not in DP_MODES:
            raise ValueError(f"the DP mode must be one of {DP_MODES}, got {mode!r}")
        self.distributed = mode == "distributed"
        if self.distributed and not (self.masked or self.encrypted):
            raise ValueError("distributed DP needs masking or Paillier (aggregation 'secagg', "
                             "'paillier' or 'paillier-threshold'): the nodes add the noise to "
                             "what they protect, and only the sum, which carries all of it, "
                             "is ever revealed")
        if self.distributed and adaptive:
            raise ValueError("distributed DP is accounted for a fixed clip: leave "
                             "dp-adaptive-clip off")
        if not 0 < quorum <= 1:
            raise ValueError(f"the distributed-DP quorum must be in (0, 1], got {quorum}")
        self.quorum = quorum
        if sampling == "auto":
            sampling = "fixed" if self.encrypted else "poisson"
        if self.encrypted and sampling == "poisson":
            raise ValueError("Poisson sampling needs the fixed denominator m, but under "
                             "Paillier the encrypted sum is divided by the number of updates, "
                             "which depends on the sample: use sampling 'fixed'")
        if self.encrypted and adaptive:
            raise ValueError("adaptive clipping needs the count of unclipped updates, which "
                             "the server cannot read under Paillier: use a fixed clip")
        if self.masked and adaptive and strategy.params.clip < 1:
            raise ValueError("adaptive clipping with masking sends a 0/1 value through the "
                             f"masked sum, but its clip range is {strategy.params.clip:g}: "
                             "use a masking clip of at least 1")
        # central DP's noise (under threshold Paillier the strategy encrypts and proves it)
        self._encryptor = Encryptor(strategy.public_key) if self.encrypted \
            and not self.sealed else None
        # the secure modes quantize what clients send: clients leave room for it
        self._quantizer = strategy.params.fixed_point if self.masked or self.encrypted \
            else None
        # the wrapped strategy's (so its max_empty_rounds holds); Flower's FedAvg has none
        self.watch = getattr(strategy, "watch", None) or RoundWatch(PLAINTEXT_EMPTY_ROUNDS)
        self.population = population
        self._settings = dict(noise_multiplier=noise_multiplier, clip=clip, delta=delta,
                              max_epsilon=max_epsilon, adaptive=adaptive,
                              target_quantile=target_quantile,
                              clip_learning_rate=clip_learning_rate,
                              clipped_count_stddev=clipped_count_stddev, sampling=sampling,
                              distributed=self.distributed)
        # distributed DP: the std of the noise the sum must carry, in levels
        self.noise_levels = noise_multiplier * clip / self._quantizer.step \
            if self.distributed else 0.0
        if self.distributed and self.masked:
            strategy.distributed_noise_levels = self.noise_levels
            strategy.distributed_noise_fraction = quorum
        # check the arguments now (the default count noise depends on m: at round 1)
        DPConfig(num_sampled=1, population=1, **{
            **self._settings, "adaptive": adaptive and clipped_count_stddev is not None})
        self.config: DPConfig | None = None
        self.ledger: PrivacyLedger | None = None
        self.clipper: AdaptiveClip | None = None
        self.budget_exhausted = False
        self._global: dict[str, np.ndarray] = {}
        self.noise_only = False  # this round's Poisson sample was too small to aggregate
        self.tail_mass = 0.0  # Paillier: the probability the clipped noise changed a release

    def _describe_dp(self) -> str:
        s = self._settings
        budget = f", budget epsilon {s['max_epsilon']:g}" if s["max_epsilon"] else ""
        where = "clients" if self.masked or self.encrypted else "server"
        noise = "the clients (distributed DP)" if self.distributed else "the server"
        return (f"noise multiplier {s['noise_multiplier']:g}, clip {s['clip']:g}"
                f"{' (adaptive)' if s['adaptive'] else ''}, delta {s['delta']:g}{budget}, "
                f"clipping on the {where}, noise from {noise}, {s['sampling']} sampling")

    def _start_dp(self, connected: int, sampled: int, size: int = 0) -> None:
        """Fix the sampling figures at the first round: the denominator is the number
        of clients the strategy samples (even if some drop out later). ``size``: the
        model's number of values (distributed DP's accounting needs it)."""
        population = max(self.population or connected, sampled)
        settings = dict(self._settings)
        if self.distributed:
            settings["noise_multiplier"] = self._distributed_multiplier(population, sampled,
                                                                        size)
        self.config = DPConfig(num_sampled=sampled, population=population, **settings)
        self.ledger = PrivacyLedger(self.config)
        self.clipper = AdaptiveClip(self.config)
        log(INFO, "Central DP: %s %d of %d clients per round (sample rate %.4f), update "
            "noise multiplier %.4f", "on average" if self.config.sampling == "poisson"
            else "exactly", sampled, self.config.population, self.config.sample_rate,
            self.config.update_noise_multiplier)
        if self.config.update_noise_multiplier > sampled:
            log(WARNING, "Central DP: the noise std on the average, z C / m = %.3g C, is larger "
                "than a clipped update's norm C: the noise swamps the updates. Sample more "
                "clients per round (m = %d) or lower dp-noise-multiplier",
                self.config.update_noise_multiplier / sampled, sampled)

    def _distributed_multiplier(self, population: int, sampled: int, size: int) -> float:
        """The multiplier distributed DP is accounted at: no more than ``population``
        nodes each add at least ``levels / sqrt(population)`` under masking, exactly
        ``levels / sqrt(quorum)`` under Paillier (:func:`strategies.dp.distributed_multiplier`).
        Refuses when that is below 99.9% of the configured one (too many nodes for too
        little noise each). Under Paillier it also fixes the noise every update carries
        (the strategy's ``client_noise``), for a quorum of the ``sampled``."""
        z = self._settings["noise_multiplier"]
        if size <= 0:
            raise ValueError("distributed DP's accounting needs the model's size")
        per_node = self.noise_levels / math.sqrt(population)
        if self.encrypted:
            per_node = self._set_client_noise(sampled).std
            log(INFO, "Distributed DP: each update carries noise of std %.4g levels, for a "
                "quorum of %d of the %d sampled; a round needs that many updates", per_node,
                self.strategy.client_noise.quorum, sampled)
        effective = distributed_multiplier(z, per_node, population, size)
        if effective < 0.999 * z:
            raise ValueError(f"distributed DP: {population} nodes sharing noise of "
                             f"{self.noise_levels:.4g} levels add too little each for the sum "
                             f"to be nearly a discrete Gaussian (multiplier {effective:.4g} "
                             f"for {z:g}): raise dp-noise-multiplier or the value bits")
        log(INFO, "Distributed DP: the nodes add noise of std %.4g levels in all, at least "
            "%.4g each; accounted at multiplier %.6g", self.noise_levels, per_node, effective)
        return effective

    def _set_client_noise(self, sampled: int) -> ClientNoise:
        """Paillier: the noise each update must carry, shared among a quorum of
        ``ceil(quorum m)`` (at least 2) of the ``m`` sampled."""
        quorum = max(2, min(sampled, math.ceil(self.quorum * sampled)))
        noise = ClientNoise.for_round(self.noise_levels, quorum, self._settings["clip"])
        self.strategy.client_noise = noise
        return noise

    def _poisson_round(self, nodes: list) -> list:
        """Poisson sampling: each of ``nodes`` with probability ``q``. Too few to
        aggregate (none; under masking, one) make a noise-only round
        (:attr:`noise_only`): nothing is sent, the noise alone is released."""
        chosen = poisson_sample(sorted(nodes), self.config.sample_rate)
        log(INFO, "Central DP: Poisson sampling took %d of %d nodes (rate %.4f)", len(chosen),
            len(nodes), self.config.sample_rate)
        self.noise_only = len(chosen) < (2 if self.masked else 1)
        if self.noise_only:
            log(INFO, "Central DP: %d node(s) drawn, too few to aggregate%s: this round "
                "releases the noise alone", len(chosen), " securely" if chosen else "")
            return []
        return chosen

    def state_dict(self) -> dict:
        """What a restarted server needs to go on (JSON-able): the sampling figures
        fixed at round 1, the accountant's history and the clipping norm."""
        if self.config is None:
            return {}
        return {"num-sampled": self.config.num_sampled, "population": self.config.population,
                "history": [list(h) for h in self.ledger.history],
                "clip": self.clipper.clip, "tail-mass": self.tail_mass,
                "noise-multiplier": self.config.noise_multiplier}

    def load_state_dict(self, state: dict) -> None:
        """Go on from :meth:`state_dict` of an earlier run (same settings)."""
        if not state:
            return
        settings = dict(self._settings)
        if self.distributed:
            settings["noise_multiplier"] = float(state["noise-multiplier"])
        if self.distributed and self.encrypted:
            self._set_client_noise(int(state["num-sampled"]))
        self.config = DPConfig(num_sampled=int(state["num-sampled"]),
                               population=int(state["population"]), **settings)
        self.ledger = PrivacyLedger(self.config, [(float(z), float(q), int(s))
                                                  for z, q, s in state["history"]])
        self.clipper = AdaptiveClip(self.config, clip=float(state["clip"]))
        self.tail_mass = float(state.get("tail-mass", 0.0))
        log(INFO, "Central DP resumed: epsilon %.3f after %d rounds, clip %.4g",
            self.ledger.epsilon(), sum(s for _, _, s in self.ledger.history),
            self.clipper.clip)

    def _budget_left(self, server_round: int) -> bool:
        try:
            self.ledger.check_budget()
        except BudgetExhausted as err:
            log(WARNING, "Round %d not run: %s", server_round, err)
            self.budget_exhausted = True
            return False
        return True

    def _round_config(self) -> dict:
        """What the clients' clip mod needs this round."""
        config = {CLIP_KEY: self.clipper.clip}
        if self._quantizer is not None:
            config.update({VALUE_CLIP_KEY: self._quantizer.clip, STEP_KEY: self._quantizer.step})
        if self.distributed:
            config[NOISE_LEVELS_KEY] = self.noise_levels
        if self.distributed and self.encrypted:
            config[QUORUM_KEY] = self.strategy.client_noise.quorum
        if self.distributed and self.masked:
            config[FRACTION_KEY] = self.quorum
        if self.masked and self.config.adaptive:
            config[BIT_KEY] = True
        return config

    def _with_bit(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The global arrays as sent for training (masked adaptive mode: plus the bit)."""
        if self.masked and self.config.adaptive:
            return {**arrays, BIT_KEY: np.zeros(1, np.float32)}
        return arrays

    def _clipped_sum(self, updates: Sequence[tuple[object, list[np.ndarray]]]
                     ) -> tuple[np.ndarray | None, float, int, int, list[int]]:
        """Plaintext mode: check, clip and sum ``(client, arrays)`` updates on a fine
        grid; the sum in grid units (int64, flattened), the grid step, how many were
        summed and were not clipped, and the indices of the valid ones.

        Each update is clipped to ``C - step sqrt(d) / 2`` and rounded to the nearest
        multiple of ``step`` (:meth:`_fine_step`), which moves it by at most
        ``step sqrt(d) / 2``: it still moves the sum by at most ``C``, and now by a
        lattice vector, as the discrete Gaussian needs."""
        if not updates:
            return None, 0.0, 0, 0, []
        reference = list(self._global.values())
        d = sum(g.size for g in reference)
        step = self._fine_step()
        clip = self.clipper.clip - step * math.sqrt(d) / 2
        total = np.zeros(d, np.int64)
        n = unclipped = 0
        valid = []
        for i, (client, update) in enumerate(updates):
            try:
                check_update(update, reference)
                # in float64: finite float32 values can differ by more than float32 holds
                clipped, norm = clip_update([np.asarray(u, np.float64) - g
                                             for u, g in zip(update, reference)],
                                            clip)
            except ValueError as err:  # InvalidUpdate, or a norm too large to measure
                log(WARNING, "Left out the reply of %s: %s", client, err)
                continue
            total += np.rint(np.concatenate([c.ravel() for c in clipped]) / step
                             ).astype(np.int64)
            n += 1
            unclipped += norm <= clip
            valid.append(i)
        return total, step, n, unclipped, valid

    def _fine_step(self) -> float:
        """Plaintext mode's grid: ``2 GRID_SLACK C / sqrt(d)`` (see :meth:`_clipped_sum`),
        or coarser if the noise would be more steps than the sampler takes."""
        d = sum(g.size for g in self._global.values())
        clip = self.clipper.clip
        return max(2 * GRID_SLACK * clip / math.sqrt(d),
                   self.config.update_noise_multiplier * clip / MAX_SIGMA)

    def _unmasked_sum(self, average: dict[str, np.ndarray], n: int, levels: np.ndarray
                      ) -> tuple[np.ndarray, float, int]:
        """Masking mode: the sum of the clients' clipped updates in quantization steps
        (int64, flattened), the step, and how many were not clipped. ``levels`` is the
        unmasked sum of the clients' quantized levels, in the order of ``average``.

        A client sends the levels of ``g + u``; the global model ``g`` it was sent lies
        within half a step of the lattice point ``j = rint((g + clip) / step)`` (in
        range), and its contribution to ``levels - n j`` is an integer vector of norm
        at most ``C / step`` (:func:`quantized_clip` leaves the room)."""
        quantizer = self._quantizer
        unclipped = round(float(average.pop(BIT_KEY, np.zeros(1))[0]) * n)
        flat = np.concatenate([g.astype(np.float64).ravel() for g in self._global.values()])
        lattice = np.rint((flat + quantizer.clip) / quantizer.step).astype(np.int64)
        total = np.asarray(levels[:flat.size]).astype(np.int64) - n * lattice
        return total, quantizer.step, unclipped

    def _release(self, server_round: int, total: np.ndarray | None, step: float, n: int,
                 unclipped: int) -> tuple[dict[str, np.ndarray], dict] | None:
        """The noised new global model and the round's DP metrics; None when no update
        arrived under fixed-size sampling (nothing is released, nothing spent). Under
        Poisson sampling such a round releases the noise alone, the mechanism's output
        on an empty sum: whether a round is empty depends on who is in the population,
        so skipping it would release something the accountant does not count.
        ``total`` is the clipped updates' sum in units of ``step`` (int64, flattened)."""
        if n == 0:
            if self.config is None or self.config.sampling != "poisson":
                log(WARNING, "Round %d: no update to add noise to; nothing released",
                    server_round)
                return None
            log(WARNING, "Round %d: no update arrived; the noise alone is released (Poisson "
                "sampling)", server_round)
            total = np.zeros(sum(g.size for g in self._global.values()), np.int64)
            step = self._quantizer.step if self._quantizer is not None else self._fine_step()
        clip = self.clipper.clip
        # distributed DP: the clients' noise is in the sum; a round without any sum (too
        # few drawn) gets the noise from the server, which knows it is empty anyway
        new = noised_average(list(self._global.values()), total, step, self.config, clip,
                             add_noise=not self.distributed or n == 0)
        epsilon = self.ledger.step()
        next_clip = self.clipper.update(unclipped, n)
        log(INFO, "Central DP round %d: %d of %d sampled clients summed, clip %.4g, "
            "epsilon %.4f at delta %g", server_round, n, self.config.num_sampled, clip,
            epsilon, self.config.delta)
        metrics = {"dp-epsilon": epsilon, "dp-clip": clip, "dp-next-clip": next_clip}
        if not self.masked and n:  # plaintext: the server sees every update anyway
            metrics["dp-unclipped-fraction"] = unclipped / n
        elif self.config.adaptive:  # masked: only the noised count is released
            metrics["dp-unclipped-fraction"] = self.clipper.noisy_fraction
        return dict(zip(self._global, new, strict=True)), metrics

    def _central_noise(self, step: float) -> tuple[float, int]:
        """Central DP under Paillier: the noise's std in levels of the sum (of width
        ``step``) and the bound it is clipped to."""
        sigma = self.config.update_noise_multiplier * self.clipper.clip / step
        return sigma, math.ceil(TAIL_CLIP * sigma)

    def _arm_sealed(self) -> None:
        """Threshold Paillier, central DP: tell the strategy the round's noise, which it
        encrypts, proves it knows and sends the decryptors (before it aggregates)."""
        if self.sealed and not self.distributed:
            self.strategy.server_noise = self._central_noise(self.strategy.params.step)

    def _release_encrypted(self, server_round: int, model: EncryptedModel, *,
                           noised: bool = False) -> tuple[EncryptedModel, dict]:
        """Paillier mode: discrete Gaussian noise in the encrypted sum of the ``n``
        clipped updates' levels. Central DP adds it homomorphically (``noised``: the
        threshold strategy added it already, :meth:`_arm_sealed`); under distributed
        DP each update already carries its share (:class:`ClientNoise`) and the server
        adds nothing. The server cannot rescale an encrypted average to the fixed
        denominator, so the decoders divide by ``n``: the same mechanism on the sum,
        then a division by the public ``n``. The noise is clipped (at ``TAIL_CLIP``
        standard deviations on the server, ``CLIENT_TAIL_CLIP`` on each client) to fit
        the slots; the chance that this changed anything goes into delta."""
        if self.distributed:
            noise = model.client_noise
            if noise != self.strategy.client_noise:  # RoundSum refuses any other
                raise ValueError("the aggregate does not carry the round's client noise")
            noisy, how = model, "the clients' noise in"
            # the sum differs from one of unclipped shares only where a share was clipped
            self.tail_mass += (len(model.contributors) * model.layout.size
                               * tail_bound(noise.std, noise.bound))
            clipped_at = CLIENT_TAIL_CLIP
        else:
            sigma, bound = self._central_noise(model.params.step)
            if noised and model.server_noise != bound:
                raise ValueError("the sealed aggregate does not carry the round's noise")
            noisy = model if noised else add_noise(
                model, discrete_gaussian(sigma, model.layout.size), bound, self._encryptor)
            how = "noise added to"
            # the clipped noise differs from the discrete Gaussian only where a value fell
            # beyond the bound: the release is the mechanism's except with at most that
            # probability, which adds to delta (summed over rounds)
            self.tail_mass += model.layout.size * tail_bound(sigma, bound)
            clipped_at = TAIL_CLIP
        epsilon = self.ledger.step()
        delta = self.config.delta + self.tail_mass
        log(INFO, "%s DP round %d (Paillier): %s the encrypted average of %d updates, clip "
            "%.4g, epsilon %.4f at delta %.6g (%g, plus %.2g for the noise clipped at %g "
            "standard deviations)", "Distributed" if self.distributed else "Central",
            server_round, how, model.total_weight, self.clipper.clip, epsilon, delta,
            self.config.delta, self.tail_mass, clipped_at)
        return noisy, {"dp-epsilon": epsilon, "dp-clip": self.clipper.clip, "dp-delta": delta}

    def _inner_aggregate(self, server_round: int, aggregate: Callable[[], T]) -> T:
        """``aggregate()``, the wrapped strategy's aggregation of ``server_round``. If the
        run stops there (:class:`~strategies.screening.NoUsableUpdate`, its last allowed
        empty round) after ``T`` decryptors decrypted the round's noised aggregate, the
        round's cost is accounted first and the error says the epsilon spent."""
        try:
            return aggregate()
        except NoUsableUpdate as err:
            spent = self._spent_without_model(server_round) if self.encrypted else None
            if spent is None:
                raise
            raise NoUsableUpdate(f"{err} Round {server_round}'s noised aggregate was "
                                 f"decrypted, so its privacy cost counts: epsilon "
                                 f"{spent['dp-epsilon']:.4g} spent in all") from None

    def _spent_without_model(self, server_round: int) -> dict | None:
        """Threshold Paillier, a round without a model: if ``T`` decryptors decrypted its
        noised aggregate (every combiner then failed), the combiners saw it, so the
        round's privacy cost counts all the same. Its DP metrics; ``None`` if nothing
        was decrypted."""
        model = getattr(self.strategy, "last_aggregate", None)
        if not self.sealed or model is None or model.server_round != server_round:
            return None
        log(WARNING, "Round %d: the noised aggregate was decrypted but no combiner returned "
            "the model; the round's privacy cost counts all the same", server_round)
        return self._release_sealed(server_round)

    def _release_sealed(self, server_round: int) -> dict:
        """Threshold Paillier: the round's DP metrics for the aggregate the clients
        decrypted and sealed (the strategy's ``last_aggregate``). It carries the
        clients' noise (the decryptors checked it, :mod:`strategies.threshold_protocol`)
        or the server's (central DP, :meth:`_arm_sealed`); it is accounted as under the
        single-holder key (:meth:`_release_encrypted`)."""
        model = getattr(self.strategy, "last_aggregate", None)
        if model is None or model.server_round != server_round:
            raise ValueError(f"round {server_round} sealed a model without an aggregate of "
                             "its own")
        return self._release_encrypted(server_round, model, noised=True)[1]


def clip_local_update(config: dict, incoming: dict[str, np.ndarray],
                      trained: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The trained model with its update clipped to the round's ``dp-clip`` norm (and
    the unclipped bit when the round asks for it). Refuses when the server sent no
    clipping norm (it is not running central DP)."""
    clip = config.get(CLIP_KEY)
    if not is_number(clip) or not 0 < clip < math.inf:
        raise ValueError("this node clips its updates for central DP (dp_clip_mod) but the "
                         "server sent no dp-clip norm: the server must wrap its strategy in "
                         "CentralDP (Message API) or LegacyCentralDP (legacy API); got "
                         f"{clip!r}, not a positive finite number")
    if list(trained) != list(incoming):
        raise ValueError("the trained model's arrays differ from the global model's")
    bound = float(clip)
    if STEP_KEY in config or VALUE_CLIP_KEY in config:
        bound = quantized_clip(bound, list(incoming.values()), config.get(VALUE_CLIP_KEY),
                               config.get(STEP_KEY))
    clipped, norm = clip_update([trained[k] - incoming[k] for k in incoming], bound)
    update = {k: (incoming[k].astype(np.float64) + c).astype(incoming[k].dtype)
              for k, c in zip(incoming, clipped, strict=True)}
    if config.get(BIT_KEY):
        update[BIT_KEY] = np.array([1.0 if norm <= bound else 0.0], np.float32)
    return update


def quantized_clip(clip: float, incoming: Sequence[np.ndarray], value_clip: object,
                   step: object) -> float:
    """The norm to clip an update to when a secure mode quantizes the model it is sent
    in, so that one client still moves the sum by at most ``clip`` (the sensitivity the
    accountant assumes): ``clip - ||g - clip_v(g)|| - 1.5 step sqrt(d)``.

    The client sends ``Q(clip_v(g + u))`` for the global model ``g`` (``d`` values) and
    its clipped update ``u``; the server subtracts the lattice point ``g*`` nearest
    ``g`` (``-value_clip + step rint((g + value_clip) / step)``, within ``step / 2`` of
    ``g`` in each value), so that the contribution is a lattice vector. Value clipping
    to ``[-value_clip, value_clip]`` is 1-Lipschitz, so ``||clip_v(g + u) - clip_v(g)||
    <= ||u||``; ``||clip_v(g) - g*|| <= ||g - clip_v(g)|| + step sqrt(d) / 2`` (the
    first term is 0 unless noise took ``g`` out of range); and stochastic rounding
    moves each value by less than one ``step``. Without this the sensitivity is up to
    ``clip + 1.5 step sqrt(d)`` (Kairouz et al., ICML 2021, section 4).

    Raises
    ------
    ValueError
        If the values are not numbers, or nothing is left of ``clip``.
    """
    if not is_number(value_clip) or not is_number(step) or not 0 < step < math.inf \
            or not 0 < value_clip < math.inf:
        raise ValueError(f"the server sent a quantizer of clip {value_clip!r} and step "
                         f"{step!r}: positive finite numbers expected")
    d = sum(a.size for a in incoming)
    outside = math.sqrt(sum(float(np.sum((a.astype(np.float64)
                                          - np.clip(a, -value_clip, value_clip)) ** 2))
                            for a in incoming))
    bound = clip - outside - 1.5 * step * math.sqrt(d)
    if bound <= 0:
        raise ValueError(f"dp-clip {clip:g} leaves no room for the quantization of "
                         f"{d} values ({1.5 * step * math.sqrt(d):.4g} = 1.5 step x "
                         "sqrt(d)) and the "
                         f"global model's values outside the clip range ({outside:.4g}): "
                         "raise dp-clip or the secure mode's value bits")
    return bound


def distributed_noise(config: Mapping[str, object], node_config: Mapping[str, object]
                      ) -> float:
    """Distributed DP, on a node: the std, in quantization levels, of the noise the
    round's unmasked sum must carry (``dp-noise-levels``; 0 in a round without it).

    Raises
    ------
    ValueError
        If the server sent a malformed request.
    PermissionError
        If it amounts to a noise multiplier (levels x step / dp-clip) below the node's
        own ``dp-min-noise-multiplier``, or asks for none while that is above 0.
    """
    levels = config.get(NOISE_LEVELS_KEY)
    floor = node_setting(node_config, MIN_NOISE_SETTING)
    if levels is None:
        if floor > 0:  # a server that leaves the request out must not skip the floor
            raise PermissionError(f"the round asks for no distributed DP noise, and this "
                                  f"node's {MIN_NOISE_SETTING} is {floor:g}: the server "
                                  "must ask for at least that (dp-mode = 'distributed')")
        return 0.0
    clip, step = config.get(CLIP_KEY), config.get(STEP_KEY)
    if not all(is_number(v) and 0 < v < math.inf for v in (levels, clip, step)) \
            or levels > MAX_SIGMA:
        raise ValueError(f"the server asked for distributed DP noise of {levels!r} levels "
                         f"with dp-clip {clip!r} and step {step!r}: positive finite numbers "
                         "expected (levels up to 2^40)")
    multiplier = float(levels) * float(step) / float(clip)
    if multiplier < floor:
        raise PermissionError(f"the round asks for distributed DP noise of multiplier "
                              f"{multiplier:.4g}, below this node's {MIN_NOISE_SETTING} "
                              f"{floor:g}: the server must ask for at least that")
    return float(levels)


def paillier_client_noise(config: Mapping[str, object], node_config: Mapping[str, object]
                          ) -> ClientNoise | None:
    """Distributed DP under Paillier, on a node: the noise its update must carry
    (:class:`strategies.paillier_protocol.ClientNoise`), or None in a round without it.

    Raises
    ------
    ValueError
        If the server sent a malformed request.
    PermissionError
        If the round's noise is below the node's ``dp-min-noise-multiplier``
        (:func:`distributed_noise`).
    """
    levels = distributed_noise(config, node_config)
    if not levels:
        return None
    quorum = config.get(QUORUM_KEY)
    if not is_int(quorum) or not 1 <= quorum < 2 ** 32:
        raise ValueError(f"the server asked for distributed DP noise without a valid "
                         f"{QUORUM_KEY} (got {quorum!r}): a positive int expected")
    return ClientNoise.for_round(levels, quorum, float(config[CLIP_KEY]))


def masking_noise_fraction(config: Mapping[str, object]) -> float:
    """Distributed DP under masking, on a node: the fraction of the round's members its
    noise is shared among (``dp-noise-quorum-fraction``; 0 in a round without noise,
    and then the masking quorum alone counts).

    Raises
    ------
    ValueError
        If a round with noise names no fraction in (0, 1].
    """
    if config.get(NOISE_LEVELS_KEY) is None:
        return 0.0
    fraction = config.get(FRACTION_KEY)
    if not is_number(fraction) or not 0 < fraction <= 1:
        raise ValueError(f"the server asked for distributed DP noise without a valid "
                         f"{FRACTION_KEY} (got {fraction!r}): a number in (0, 1] expected")
    return float(fraction)
