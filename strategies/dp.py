"""Central differential privacy for FedAvg (Flower-free): clipping, noise, adaptive
clipping and privacy accounting.

DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language
Models", ICLR 2018) with uniform client weights: each client's update
``delta_k = x_k - global`` is clipped to L2 norm ``C``, the server sums the
clipped updates of the ``n`` clients that answered, adds Gaussian noise of std
``z C`` to the sum and divides by the fixed denominator ``m`` (the number of
clients sampled for the round):

    global' = global + (sum_k clip(delta_k) + N(0, (z C)^2 I)) / m

One client changes the sum by at most ``C`` whatever its number of examples.
(Weighting by examples would make one client's influence ``n_k C / sum n``,
unbounded by ``C / m``: that is why DP here always weights uniformly.) A client
that drops out adds nothing; the round's noise and denominator stay as they are.

The accountant matches how the round's clients are sampled (``sampling``):

- ``"poisson"``: each client takes part in a round with probability
  ``q = m / population``, independently (:func:`poisson_sample`, from the OS's
  CSPRNG); the round size varies, the denominator stays ``m``. Adding or removing
  one client changes the sum by at most ``C``, so ``z`` is the noise multiplier of
  the Poisson-subsampled Gaussian mechanism, composed in RDP (Mironov, CSF 2017;
  Mironov, Talwar and Zhang 2019; Opacus's ``RDPAccountant``). A round in which no
  update arrives still releases the noise (the mechanism's output on an empty sum).
- ``"fixed"``: exactly ``m`` of the ``population`` clients, uniformly without
  replacement (Flower's own sampling). This is analysed for neighbouring
  populations of the same size, one client's data *replaced* (Wang, Balle and
  Kasiviswanathan, AISTATS 2019, Theorem 27; Google's ``dp-accounting``), under
  which the sum moves by up to ``2 C``: the noise multiplier against that
  sensitivity is ``z / 2``. With ``m = population`` this is the plain Gaussian
  mechanism at ``z / 2``.

The Poisson figure is not an approximation of the fixed-size one (Birrell et al.
2024 show where they differ): each is reported only for its own sampling.

The noise is the discrete Gaussian (:mod:`strategies.discrete_gaussian`), exact and
from the OS's CSPRNG, added to the clipped updates' sum on an integer lattice (the
secure modes' quantization grid, or a fine grid in plaintext mode): one client moves
that sum by an integer vector of norm at most ``C`` (in grid units, ``C / step``).
For integer shifts the discrete Gaussian's Renyi divergence is the continuous one's,
``alpha Delta^2 / (2 sigma^2)`` at every order (Canonne, Kamath and Steinke,
NeurIPS 2020, Proposition 5), and so are all the moments
``E[(p1/p0)^a (p2/p0)^b]`` with integer ``a, b`` that the subsampling bounds are
built from (complete the square: the sum over the lattice of a Gaussian centred at a
lattice point does not depend on the point). Hence:

- ``"fixed"``: Wang, Balle and Kasiviswanathan's bound, which ``dp-accounting``
  evaluates from those moments, holds as it is.
- ``"poisson"`` with ``q = 1``: the plain mechanism, at every order (Opacus's).
- ``"poisson"`` with ``q < 1``: Zhu and Wang's general upper bound for Poisson
  subsampling ("Poisson Subsampled Renyi Differential Privacy", ICML 2019), which
  needs only the base mechanism's RDP at integer orders and covers both directions
  of add/remove; it is within ``log(3) / (alpha - 1)`` of the Gaussian's exact
  figure (Mironov, Talwar and Zhang 2019, the one Opacus computes), which is not
  proven for the discrete Gaussian (:func:`poisson_rdp`).

Adaptive clipping (Andrew et al., "Differentially Private Learning with Adaptive
Clipping", NeurIPS 2021): each round every client also reports whether its update
norm was at most ``C``; the server releases the centred count ``sum (b_k - 1/2)``
plus discrete Gaussian noise of std ``sigma_b`` (one client moves it by at most 1/2
under add/remove, 1 under replace-one) and moves ``C`` geometrically towards the
``target_quantile`` of the update norms: ``C <- C exp(-eta (b/m - gamma))``.
Spending part of the budget on the count, the update noise multiplier becomes
``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2`` so that the two releases together are a
Gaussian mechanism of multiplier ``z``.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import numpy as np
from scipy.special import gammaln, logsumexp

from .discrete_gaussian import discrete_gaussian

SAMPLINGS = ("poisson", "fixed")
POISSON_ORDERS = np.arange(2, 513)  # integer orders: the subsampling bounds need them
# the unsampled mechanism's RDP holds at every real order: Opacus's grid, then on to 512
PLAIN_ORDERS = np.concatenate([1 + np.arange(1, 100) / 10, np.arange(12, 513)])


class BudgetExhausted(RuntimeError):
    """The next round would take the privacy loss past the configured budget."""


def l2_norm(arrays: list[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


def clip_update(delta: list[np.ndarray], clip: float) -> tuple[list[np.ndarray], float]:
    """``delta`` scaled down to L2 norm at most ``clip`` (all arrays together);
    returns the clipped arrays (float64) and the norm before clipping."""
    if not clip > 0:
        raise ValueError(f"the clipping norm must be positive, got {clip}")
    norm = l2_norm(delta)
    if not math.isfinite(norm):  # clip / norm would be 0 and inf * 0 NaN
        raise ValueError(f"the update's L2 norm is {norm}: it holds NaN or infinity, or "
                         "values too large to measure")
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return [np.asarray(d, np.float64) * scale for d in delta], norm


@dataclass
class DPConfig:
    """Central DP settings.

    Parameters
    ----------
    noise_multiplier : float
        ``z``: noise std on the sum of clipped updates, in units of the clipping norm.
    clip : float
        ``C``: the clipping norm (the initial one with adaptive clipping).
    num_sampled : int
        ``m``: clients sampled per round, the fixed denominator.
    population : int
        Clients the ``m`` are sampled from (sample rate ``q = m / population``).
    delta : float (default: 1e-5)
        The delta at which epsilon is reported.
    max_epsilon : float (default: 0 = no budget)
        Training stops before a round that would take epsilon past this.
    adaptive : bool (default: False)
        Adaptive clipping (Andrew et al. 2021).
    target_quantile, clip_learning_rate : float (default: 0.5, 0.2)
        ``gamma`` and ``eta`` of adaptive clipping.
    clipped_count_stddev : float or None (default: None = ``m / 20``, the paper's)
        ``sigma_b``, noise std on the count of unclipped updates.
    sampling : str (default: "poisson")
        How each round's clients are drawn, and so which accountant applies:
        ``"poisson"`` or ``"fixed"`` (see the module).
    distributed : bool (default: False)
        Distributed DP: the clients add the noise, and ``noise_multiplier`` is the one
        :func:`distributed_multiplier` gives; the sum of their discrete Gaussians is
        not one, so the fixed-size accountant is :func:`fixed_rdp`.
    """

    noise_multiplier: float
    clip: float
    num_sampled: int
    population: int
    delta: float = 1e-5
    max_epsilon: float = 0.0
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None
    sampling: str = "poisson"
    distributed: bool = False

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be positive, got {self.noise_multiplier}")
        if not self.clip > 0:
            raise ValueError(f"clip must be positive, got {self.clip}")
        if not 1 <= self.num_sampled <= self.population:
            raise ValueError(f"need 1 <= clients per round ({self.num_sampled}) <= population "
                             f"({self.population})")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.max_epsilon < 0:
            raise ValueError(f"max_epsilon must be >= 0 (0: no budget), got {self.max_epsilon}")
        if not 0 <= self.target_quantile <= 1 or not self.clip_learning_rate > 0:
            raise ValueError("target_quantile must be in [0, 1] and clip_learning_rate > 0")
        if self.adaptive:
            self.update_noise_multiplier  # noqa: B018 - raises if the count takes all noise
        if self.distributed and self.adaptive:
            raise ValueError("distributed DP is accounted for a fixed clip only")

    @property
    def sample_rate(self) -> float:
        return self.num_sampled / self.population

    @property
    def count_stddev(self) -> float:
        return self.clipped_count_stddev if self.clipped_count_stddev is not None \
            else self.num_sampled / 20

    @property
    def update_noise_multiplier(self) -> float:
        """The multiplier for the updates: ``z``, or with adaptive clipping ``z_delta``."""
        if not self.adaptive:
            return self.noise_multiplier
        rest = self.noise_multiplier ** -2 - (2 * self.count_stddev) ** -2
        if rest <= 0:
            raise ValueError(f"the clipped-count noise (std {self.count_stddev}) spends the whole "
                             f"noise multiplier {self.noise_multiplier}: raise "
                             "dp-clipped-count-stddev or the noise multiplier")
        return rest ** -0.5


History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, rounds)


def epsilon_of(history: History, config: DPConfig) -> float:
    """Epsilon at ``config.delta`` after the rounds of ``history``, by the accountant
    of ``config.sampling``. Opacus and dp-accounting load on first use: a client
    process that only clips or answers a key stage never imports them."""
    if not history:
        return 0.0
    if config.sampling == "poisson" and all(q == 1 for _, q, _ in history):
        from . import opacus_import  # noqa: F401  (before any opacus module: keeps logging)
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = list(history)
        return float(accountant.get_epsilon(delta=config.delta))
    if config.sampling == "poisson":
        rdp = sum(steps * poisson_rdp(q, z, POISSON_ORDERS) for z, q, steps in history)
        return rdp_to_epsilon(POISSON_ORDERS, rdp, config.delta)
    if config.distributed:  # fixed-size sampling, replace-one: sensitivity 2 C
        orders = PLAIN_ORDERS if all(q == 1 for _, q, _ in history) else POISSON_ORDERS
        rdp = sum(steps * fixed_rdp(q, z / 2, orders) for z, q, steps in history)
        return rdp_to_epsilon(orders, rdp, config.delta)
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for z, q, rounds in history:
        sample = round(q * config.population)
        accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(
            config.population, sample, dp_accounting.GaussianDpEvent(z / 2)), rounds)
    return float(accountant.get_epsilon(config.delta))


def poisson_rdp(q: float, z: float, orders: np.ndarray) -> np.ndarray:
    """RDP at integer ``orders`` of one Poisson-subsampled (rate ``q``) step of a
    mechanism with RDP ``eps(l) = l / (2 z^2)``, by Zhu and Wang's general bound
    (ICML 2019, Theorem 6): ``1/(alpha-1) log[(1-q)^(alpha-1) (alpha q - q + 1)
    + C(alpha,2) q^2 (1-q)^(alpha-2) e^eps(2)
    + 3 sum_(l=3..alpha) C(alpha,l) q^l (1-q)^(alpha-l) e^((l-1) eps(l))]``."""
    if q == 1:
        return orders / (2 * z ** 2)
    out = np.empty(len(orders))
    for i, alpha in enumerate(orders):
        ls = np.arange(2, alpha + 1)
        log_terms = (gammaln(alpha + 1) - gammaln(ls + 1) - gammaln(alpha - ls + 1)
                     + ls * math.log(q) + (alpha - ls) * math.log1p(-q)
                     + (ls - 1) * ls / (2 * z ** 2))
        log_terms[1:] += math.log(3)
        first = (alpha - 1) * math.log1p(-q) + math.log(alpha * q - q + 1)
        out[i] = logsumexp(np.append(log_terms, first)) / (alpha - 1)
    return out


def fixed_rdp(q: float, z: float, orders: np.ndarray) -> np.ndarray:
    """RDP at integer ``orders`` of one step of a mechanism with RDP ``eps(l) = l / (2
    z^2)`` (``z`` against the replace-one sensitivity) on a sample of a fraction ``q``
    of the population drawn without replacement, by Wang, Balle and Kasiviswanathan's
    general bound (AISTATS 2019, Theorem 9, with ``eps(inf) = inf``):
    ``1/(alpha-1) log[1 + q^2 C(alpha,2) min(4 (e^eps(2) - 1), 2 e^eps(2))
    + 2 sum_(j=3..alpha) q^j C(alpha,j) e^((j-1) eps(j))]``.

    It needs only the base mechanism's RDP, so it holds for distributed DP's sum of
    discrete Gaussians through its zCDP bound; ``dp-accounting``'s tighter figure
    for the Gaussian (their Theorem 27, from the Gaussian's own moments) is not proven
    for that sum. ``dp-accounting`` evaluates this same bound above order 256.
    With ``q = 1`` it is the mechanism's own RDP, at any real orders."""
    if q == 1:
        return orders / (2 * z ** 2)
    out = np.empty(len(orders))
    eps2 = 2 / (2 * z ** 2)
    for i, alpha in enumerate(orders):
        second = (2 * math.log(q) + gammaln(alpha + 1) - gammaln(3) - gammaln(alpha - 1)
                  + min(math.log(4) + eps2 + math.log(-math.expm1(-eps2)), math.log(2) + eps2))
        js = np.arange(3, alpha + 1)
        rest = (math.log(2) + js * math.log(q) + gammaln(alpha + 1) - gammaln(js + 1)
                - gammaln(alpha - js + 1) + (js - 1) * js / (2 * z ** 2))
        out[i] = logsumexp(np.concatenate([[0.0, second], rest])) / (alpha - 1)
    return out


def distributed_multiplier(z: float, per_node_levels: float, nodes: int, size: int) -> float:
    """The noise multiplier the accountant may use for distributed DP: the sum of ``s``
    nodes' discrete Gaussians of std ``per_node_levels`` (levels), ``s`` at most
    ``nodes``, carrying at least ``z`` times the sensitivity, is ``rho``-zCDP with
    ``rho = 1 / (2 z^2) + tau size / 4``, ``tau = 10 sum_(k=1..s-1) exp(-2 pi^2
    sigma^2 k / (k + 1))`` (Kairouz, Liu and Steinke, ICML 2021, Theorem 1): the
    multiplier ``(z^-2 + tau size / 2)^-1/2``. ``tau`` vanishes (underflows to 0) once
    each node's std is more than a few levels."""
    ks = np.arange(1, max(nodes, 2))
    tau = 10 * float(np.sum(np.exp(-2 * math.pi ** 2 * per_node_levels ** 2 * ks / (ks + 1))))
    return (z ** -2 + tau * size / 2) ** -0.5


def rdp_to_epsilon(orders: np.ndarray, rdp: np.ndarray, delta: float) -> float:
    """The smallest epsilon at ``delta`` over ``orders`` (Balle et al., AISTATS 2020,
    Theorem 21; the conversion Opacus and dp-accounting use)."""
    orders = np.asarray(orders, np.float64)
    eps = rdp + np.log1p(-1 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    return float(max(0.0, np.nanmin(eps)))


@dataclass
class PrivacyLedger:
    """The privacy loss of a run so far, and its budget.

    Each round is one step of the subsampled Gaussian mechanism with the
    configured noise multiplier and sample rate, composed by the accountant of the
    sampling (:func:`epsilon_of`).
    """

    config: DPConfig
    history: History = field(default_factory=list)

    def _after_one_more(self) -> History:
        step = (self.config.noise_multiplier, self.config.sample_rate)
        if self.history and self.history[-1][:2] == step:
            return [*self.history[:-1], (*step, self.history[-1][2] + 1)]
        return [*self.history, (*step, 1)]

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.config)

    def epsilon_after_next(self) -> float:
        """Epsilon if one more round were run."""
        return epsilon_of(self._after_one_more(), self.config)

    def check_budget(self) -> None:
        """:class:`BudgetExhausted` if the next round would exceed ``max_epsilon``."""
        if self.config.max_epsilon > 0:
            nxt = self.epsilon_after_next()
            if nxt > self.config.max_epsilon:
                raise BudgetExhausted(
                    f"another round would take epsilon from {self.epsilon():.3f} to "
                    f"{nxt:.3f}, past the budget {self.config.max_epsilon:g} "
                    f"(delta {self.config.delta:g}): training stops here")

    def step(self) -> float:
        """Account one round; the cumulative epsilon."""
        self.history = self._after_one_more()
        return self.epsilon()


def poisson_sample(nodes: list[int], rate: float) -> list[int]:
    """Each of ``nodes`` with probability ``rate``, independently, decided by the OS's
    CSPRNG (:class:`secrets.SystemRandom`): no one can predict or replay a sample."""
    draw = secrets.SystemRandom()
    return [u for u in nodes if draw.random() < rate]


@dataclass
class AdaptiveClip:
    """The clipping norm of a run, moved each round by adaptive clipping (if on)."""

    config: DPConfig
    clip: float = 0.0
    noisy_fraction: float = 0.0  # the last noised fraction of unclipped updates

    def __post_init__(self) -> None:
        self.clip = self.clip or self.config.clip

    def update(self, unclipped: int, summed: int) -> float:
        """Move the norm given how many of the ``summed`` updates were not clipped.

        The released count is centred, ``sum (b_k - 1/2) + N_Z``, computed on the
        integers as ``(2 unclipped - summed + N_Z(0, (2 sigma_b)^2)) / 2``; the fraction
        is that over ``m``, plus 1/2."""
        if self.config.adaptive:
            noise = int(discrete_gaussian(2 * self.config.count_stddev, 1)[0])
            centred = (2 * int(unclipped) - int(summed) + noise) / 2
            self.noisy_fraction = centred / self.config.num_sampled + 0.5
            self.clip *= math.exp(-self.config.clip_learning_rate
                                  * (self.noisy_fraction - self.config.target_quantile))
        return self.clip


def noised_average(global_arrays: list[np.ndarray], lattice_sum: np.ndarray, step: float,
                   config: DPConfig, clip: float, add_noise: bool = True) -> list[np.ndarray]:
    """``global + step (lattice_sum + N_Z(0, (z C / step)^2)) / m`` in the dtypes of
    ``global``: ``lattice_sum`` (int64, the global arrays flattened in order) is the sum
    of the clipped updates in units of ``step``; without ``add_noise`` (distributed DP:
    the clients added it), ``global + step lattice_sum / m``."""
    if add_noise:
        lattice_sum = lattice_sum + discrete_gaussian(
            config.update_noise_multiplier * clip / step, lattice_sum.size)
    flat = lattice_sum.astype(np.float64) * (step / config.num_sampled)
    out, at = [], 0
    for g in global_arrays:
        out.append((g.astype(np.float64) + flat[at:at + g.size].reshape(g.shape))
                   .astype(g.dtype))
        at += g.size
    return out
