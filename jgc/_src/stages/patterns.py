"""The bug patterns: one-parameter models of the classic mistakes in a gradient.

A pattern explains the discrepancy g - D (g checked, D numerical) almost entirely: the model's
residual must be below EXPLAINED (1%) of |g - D| plus the error bar. Patterns (vocab.Pattern):
  * zero: g == 0 (never computed, or overwritten);
  * sign: g = -D (a subtraction reversed);
  * scale: g = a D (a 1/m missing or doubled, a 2 from a square);
  * transpose: g = D.T (X @ dZ.T for X.T @ dZ);
  * conjugate (complex leaves): g = conj(D), the df/dx + i df/dy convention (PyTorch's .grad)
    where JAX's is df/dx - i df/dy; in the real view, the imaginary parts' signs flipped;
  * regularization: g = D + lam theta (a term proportional to the parameters added or missing).
Entry by entry they are fitted by `find_pattern`; over a whole leaf whose entries each pass, by
`Collective.fit` (reduced precision, the leaf-level chi-squared test).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jgc._src.report.vocab import Pattern
from jgc._src.stages.differences import NOISE_SIGMAS, TOL_FACTOR

EXPLAINED = 0.01  # A pattern must leave less than 1% of the discrepancy unexplained.
MIN_FIT = 3  # entries a leaf-level pattern needs
# Entries that must agree on a fitted factor or term before it is named (one fits any value).
MIN_AGREE = 2
ZERO_FACTOR = 0.05  # a fitted factor below this, with the gradient within its error bars: zero


@dataclasses.dataclass(frozen=True)
class Collective:
    """The leaf-level test: residuals against the Richardson reference, taken together.

    A bug too small to push any single entry outside its error bar (a 1% scale error in float32)
    still makes the sum of squared standardised residuals, chi2, exceed what noise allows.
    """

    reference: np.ndarray  # Richardson reference at the entries tested (kinks excluded).
    sd: np.ndarray  # Standard deviation of each residual under noise alone.
    chi2: float
    threshold: float
    where: np.ndarray  # Positions (within the leaf's planned entries) that were tested.
    floor: float = 0.0  # the smallest relative pattern that counts (compare.pattern_floor)
    # 2 D(h) - D(2h) at the entries tested (errormodel.ErrorModel.debiased): the reference
    # without a bias linear in the step, to tell a pattern from the bias of crossed kinks.
    debiased: np.ndarray | None = None
    # The leaf's steps are known to cross kinks (errormodel.crossing), and how many of its
    # entries were found at kinks: then a pattern must be shown by more entries than that
    # (`_shown_widely`).
    crossed: bool = False
    kinks: int = 0

    @property
    def significant(self) -> bool:
        return len(self.where) > 0 and self.chi2 > self.threshold

    def resolution(self, g: np.ndarray | None = None, theta: np.ndarray | None = None
                   ) -> float:
        """From the reference, not the checked gradient (a buggy gradient 10x too large would
        claim 10x the resolution); noise adds about one to each squared standardised entry,
        which is taken off the signal. Never finer than the floor below which a pattern does
        not count.

        Given the checked gradient `g` of a significant leaf, what the factor's fit leaves
        counts too (`_fits`): each error bar widened by its scatter, and a factor smaller than
        (TOL_FACTOR + 1) times its drift (TOL_FACTOR drifts for it to count, one more for the
        bias the drift stands for)."""
        scatter, drift = 1.0, 0.0
        if g is not None and self.significant:
            scatter, drift = next((fit[4:] for fit in self._fits(g, theta, details=True)
                                   if fit[0] == Pattern.SCALE), (1.0, 0.0))
        n = len(self.where)
        statistical = resolution(self.reference, self.sd * np.sqrt(scatter), self.threshold,
                                 bias=n)
        if n < MIN_FIT:  # each entry must show the pattern by itself (`_showing`)
            statistical = max(statistical, _each_resolution(self.reference, self.sd, n))
        if self.crossed:  # enough entries must show it by themselves (`_shown_widely`)
            statistical = max(statistical, _showing_resolution(
                self.reference, self.sd * np.sqrt(scatter), self._showing_needed()))
        return max(self.floor, statistical, (TOL_FACTOR + 1) * drift)

    def _showing_needed(self) -> int:
        """How many entries must each show a pattern in a leaf whose steps cross kinks."""
        return max(MIN_FIT, self.kinks + 1)

    def fit(self, g: np.ndarray, theta: np.ndarray) -> tuple[str | None, float | None]:
        """A one-parameter pattern that explains the excess, if any (`_fits`), larger than
        `floor`. Below MIN_FIT entries one parameter fits whatever they hold, so each entry
        must show the pattern by itself (`_showing`): one entry off and one not is the bias
        of a kink the steps crossed unseen (a float32 relu bias of two entries, one at a tie,
        once fitted as a factor 1.00016), and a single entry never names a pattern."""
        for name, c, size, explained in self._fits(g, theta):
            if explained and size > self.floor:
                return name, c
        return None, None

    def below_floor(self, g: np.ndarray, theta: np.ndarray) -> bool:
        """A pattern explains the excess, but is no larger than `floor`: an excess the loss's own
        rounding can make, not an unexplained one."""
        return any(explained and size <= self.floor
                   for _, _, size, explained in self._fits(g, theta))

    def _fits(self, g: np.ndarray, theta: np.ndarray, details: bool = False):
        """(pattern, parameter, relative size, explains the excess) for each one-parameter
        model: the size is a factor's |c - 1|, a term's |c| ||theta|| / ||reference||; with
        `details`, also the scatter the fit leaves (its Birge ratio squared, at least one) and
        the pattern's drift (below).

        A fit explains the excess when the residuals are significant and the fit removes at
        least half of their excess over noise (a real systematic error lies along the pattern;
        biases from crossed kinks point anywhere), both judged against the scatter the fit
        leaves: on MIN_FIT entries or more each error bar is widened by the Birge ratio
        sqrt(after / (n - 1)) where that exceeds one, since what a pattern leaves behind is
        scatter the noise does not explain, and a pattern counts only against that scatter.
        Without the widening, a float32 conv kernel's correct gradient (14 entries whose
        residuals still held a chi2 of 44.7 after the fit, 13 expected) fitted a factor 1.0009
        through its three largest entries by chance, and jax.grad with it. Requiring instead
        that the fit leave no more than noise made a leaf with such scatter unable to name any
        pattern: a float32 Flax CNN's conv kernel 3% and 5% too large passed (chi2 11931,
        3990 after the factor, threshold 2329).

        Where the fit leaves scatter, the steps crossed kinks, and crossed kinks bias the
        difference quotients systematically too, by about as much as the step (see
        ErrorModel.debiased): on that CNN's correct float32 gradient D(h) was 0.41% off, D(2h)
        0.66%, the reference 0.31% and 2 D(h) - D(2h) 0.09%. So the same pattern is fitted
        against the debiased reference as well; the change of its size, the drift, measures the
        bias, and the pattern counts only when it is TOL_FACTOR drifts or more (the correct
        gradient's 0.31% drifted by 0.22%; a 1% factor, fitted 1.3%, by 0.23%). A pattern of a
        smooth leaf does not drift, and there the test is the plain one."""
        ref, th = self.reference, theta[self.where]
        g = g[self.where]
        n = len(self.where)
        for name, basis, offset in ((Pattern.SCALE, ref, 0.0), (Pattern.REGULARIZATION, th, ref)):
            c, size, left = _fit(g, basis, offset, ref, name)
            if c is None:
                continue
            # The discrepancy from the reference, and the part the pattern claims of it.
            unit = 1.0 if name == Pattern.SCALE else 0.0
            excess, pattern = g - offset - unit * basis, (c - unit) * basis
            after = chi2(left, self.sd)
            birge2, drift = 1.0, 0.0
            if n >= MIN_FIT:
                birge2 = max(1.0, after / (n - 1))
                sd = self.sd * np.sqrt(birge2)
                total, after = chi2(g - ref, sd), chi2(left, sd)
                fits = total > self.threshold and total - after >= (total - n) / 2
                if birge2 > 1.0 and self.debiased is not None:
                    debiased = self.debiased
                    dbasis, doffset = ((debiased, 0.0) if name == Pattern.SCALE
                                       else (basis, debiased))
                    c2, _, _ = _fit(g, dbasis, doffset, debiased, name)
                    if c2 is not None:
                        drift = abs(c - c2) * (1.0 if name == Pattern.SCALE else
                                               size / max(abs(c), 1e-300))
                        fits = fits and size >= TOL_FACTOR * drift
            else:
                fits = (after <= self.threshold and self.chi2 - after >= (self.chi2 - n) / 2
                        and n >= 2 and bool(np.all(_showing(excess, pattern, self.sd))))
            if self.crossed and fits:
                fits = self._shown_widely(excess, pattern, self.sd * np.sqrt(birge2))
            yield (name, c, size, fits, birge2, drift) if details else (name, c, size, fits)

    def _shown_widely(self, excess: np.ndarray, pattern: np.ndarray, sd: np.ndarray) -> bool:
        """In a leaf whose steps cross kinks, whether more entries than kinks can explain show
        the pattern by themselves (each EACH_SIGMAS of its error bar in the pattern's direction),
        and at least MIN_FIT.

        Kinks the steps crossed unseen bias a few entries' finite differences far beyond their
        noise (errormodel._spread), and a one-parameter fit through two such entries can stand
        out of any scatter the rest leave when the rest are too small to resolve it: a float32
        relu LSTM's weight, sampled, fitted a factor 1.05 through its only two large entries,
        each 5% off a jax.grad that float64 confirms, and a bias of two tested entries fitted a
        term 0.16 theta. Up to as many entries as were found at kinks may be so biased
        (diagnose._unseen_kinks), so a pattern is a finding only when more entries show it. A
        factor of a whole leaf shows at every entry that resolves it."""
        return int(np.sum(_showing(excess, pattern, sd))) >= self._showing_needed()


def _fit(g, basis, offset, ref, name):
    """The least-squares parameter of g - offset = c basis, its relative size (a factor's
    |c - 1|, a term's |c| ||basis|| / ||ref||) and the residual; (None, None, None) where the
    basis is zero or not finite."""
    bb = float(basis @ basis)
    if not (bb > 0 and np.isfinite(bb)):
        return None, None, None
    c = float((g - offset) @ basis) / bb
    size = abs(c - 1) if name == Pattern.SCALE else abs(c) * np.sqrt(bb / max(
        float(ref @ ref), 1e-300))
    return c, size, g - offset - c * basis


# Standard deviations by which an entry shows a pattern by itself (`_showing`).
EACH_SIGMAS = 2.0


def _showing(excess: np.ndarray, pattern: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Per entry, whether it deviates from the reference in the pattern's direction by at least
    EACH_SIGMAS of its error bar: the evidence a pattern needs from each entry where a fit
    cannot be tested (below MIN_FIT entries, all of them), or where kinks may bias a few
    (`Collective._shown_widely`, enough of them)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = excess / sd
    return (np.sign(z) == np.sign(pattern)) & (np.abs(z) >= EACH_SIGMAS)


def _each_resolution(reference: np.ndarray, sd: np.ndarray, n: int) -> float:
    """The smallest factor that `_showing` sees for sure: each entry moved EACH_SIGMAS of
    its noise, plus TOL_FACTOR more for the noise that may pull it back (a float32 conv bias
    of two entries, one of them 2.5 noises per percent, claimed the chi-squared resolution,
    0.46%, and a 1% factor showed 0.8 noises there and passed)."""
    if n < 2:
        return math.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.max((EACH_SIGMAS + TOL_FACTOR) * sd / np.abs(reference)))


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    """The standard normal distribution function, vectorised: erf by Abramowitz and Stegun
    7.1.26 (absolute error below 1.5e-7, plenty for an expected count)."""
    z = np.abs(x) / math.sqrt(2)
    t = 1 / (1 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                          + t * 1.061405429))))
    erf = 1 - poly * np.exp(-z * z)
    return 0.5 * (1 + np.sign(x) * erf)


def _showing_resolution(reference: np.ndarray, sd: np.ndarray, needed: int) -> float:
    """The smallest factor e that `Collective._shown_widely` sees for sure: entry i moves
    e |reference_i| / sd_i standard deviations, so it shows the pattern (EACH_SIGMAS or more)
    with probability Phi(e |reference_i| / sd_i - EACH_SIGMAS), and the expected count must
    reach `needed` plus TOL_FACTOR standard deviations of a count (sqrt(needed)). Bisected in
    log e; inf where all the entries together cannot."""
    with np.errstate(divide="ignore", invalid="ignore"):
        signal = np.abs(reference) / sd
    signal = signal[np.isfinite(signal)]
    target = needed + TOL_FACTOR * math.sqrt(needed)
    if len(signal) < target:
        return math.inf

    def count(e):
        return float(np.sum(_normal_cdf(e * signal - EACH_SIGMAS)))

    lo, hi = 1e-12, 1e6
    if count(hi) < target:
        return math.inf
    for _ in range(60):  # 1e-12..1e6 to within a factor 1 + 1e-9
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if count(mid) >= target else (mid, hi)
    return hi


def explains(residual, discrepancy, tol) -> bool:
    """The model leaves less than EXPLAINED of the discrepancy plus the error bars, over the
    entries taken together and at each entry the discrepancy puts beyond its error bar. Taken
    together only, the error bars of a large leaf outweigh one wrong entry: one entry of a
    802,816-entry kernel 5% off was explained as the whole leaf "0.029% too large"."""
    residual, discrepancy = np.asarray(residual), np.asarray(discrepancy)
    tol = np.broadcast_to(tol, residual.shape)
    beyond = np.abs(discrepancy) > tol
    return bool(np.linalg.norm(residual) <= EXPLAINED * np.linalg.norm(discrepancy)
                + np.linalg.norm(tol)
                and np.all(np.abs(residual[beyond]) <= EXPLAINED * np.abs(discrepancy[beyond])
                           + tol[beyond]))


def find_pattern(g, d, theta, tol, shape, full: bool, smooth=None, imag=None,
                 few: int = MIN_AGREE) -> tuple[str | None, float | None]:
    """The simplest model that explains g - d, as (pattern, factor).

    `smooth` (bool per entry) leaves out entries at kinks, whose central difference is no
    derivative. `full`: every entry of the leaf is present, in order (needed for "transpose").
    `shape` is the leaf's real-view shape; `imag` (bool per entry, complex leaves only) marks
    the entries that are imaginary parts.

    A pattern needs evidence: a factor or a term proportional to the parameters is named only
    when `few` entries or more agree on it (one fits whatever value it holds: a one-entry leaf
    1.17x off was called a scale error, with advice about a missing 1/m, where the real cause
    was floor for trunc). An exact zero and an exact negation are specific enough to name on
    one.
    """
    square = _square(shape, imag is not None)
    if smooth is not None and not smooth.all() and smooth.any():
        if full and square:
            both = (smooth.reshape(shape) & _swap(smooth, shape).reshape(shape)).ravel()
            if both.any() and _is_transpose(g, d, tol, shape, both):
                return Pattern.TRANSPOSE, None
        return find_pattern(g[smooth], d[smooth], theta[smooth], tol[smooth], shape, False,
                            imag=None if imag is None else imag[smooth], few=few)
    disc = g - d
    if not np.any(np.abs(disc) > tol):
        return None, None
    dd = float(d @ d)
    # Zero: the gradient is zero, or so close that the best factor is (a g/4 is within a float32
    # error bar of zero but is a factor, not a missing gradient).
    if np.all(np.abs(g) <= tol) and np.any(np.abs(d) > tol) and (
            not np.any(g) or dd == 0 or abs(float(g @ d) / dd) < ZERO_FACTOR):
        return Pattern.ZERO, 0.0
    if imag is not None and imag.any():
        conj = np.where(imag, -d, d)
        if explains(g - conj, disc, 2 * tol):
            return Pattern.CONJUGATE, None
    if dd > 0:
        a = float(g @ d) / dd
        if explains(g - a * d, disc, (1 + abs(a)) * tol):
            # A sign flip when -d itself explains the discrepancy within the error bars (a
            # fitted -0.9988 in float32 is a sign flip, not a factor).
            if a < 0 and explains(g + d, disc, 2 * tol):
                return Pattern.SIGN, -1.0
            if len(g) >= few:
                return Pattern.SCALE, a
    if full and square and _is_transpose(g, d, tol, shape, np.ones(len(g), bool)):
        return Pattern.TRANSPOSE, None
    tt = float(theta @ theta)
    if tt > 0 and len(g) >= few:
        lam = float(disc @ theta) / tt
        if explains(disc - lam * theta, disc, 2 * tol):
            return Pattern.REGULARIZATION, lam
    return None, None


def _is_transpose(g, d, tol, shape, keep) -> bool:
    """g = d.T on the entries `keep` (whose transposed positions are trusted too), and d is not
    symmetric there (else a transpose changes nothing)."""
    dt = _swap(d, shape)
    disc = (g - d)[keep]
    return (not explains((d - dt)[keep], disc, tol[keep])
            and explains((g - dt)[keep], disc, 2 * tol[keep]))



def _square(shape, is_complex: bool) -> bool:
    """A square matrix leaf (in a complex leaf's real view, with the parts' axis last)."""
    matrix = shape[:-1] if is_complex else shape
    return len(matrix) == 2 and matrix[0] == matrix[1] and matrix[0] > 1


def _swap(a, shape) -> np.ndarray:
    """The matrix transpose of a leaf's flat entries (the parts' axis of a complex view stays
    last)."""
    return np.swapaxes(np.reshape(a, shape), 0, 1).ravel()


# -- many small errors: the leaf-level test --------------------------------------------------

# The measured noise level is itself an estimate from a few differences (uncertain by up to
# ~30%), so the variance it implies is allowed 1.3**2 = 1.69 times its value.
SIGMA_UNCERTAINTY = 1.69


def chi2_threshold(n: int) -> float:
    """A chi-square statistic over n entries is significant beyond this: its mean plus
    NOISE_SIGMAS standard deviations (normal approximation), inflated for the uncertainty of the
    measured noise."""
    return SIGMA_UNCERTAINTY * (n + NOISE_SIGMAS * math.sqrt(2 * n))


def chi2(residual: np.ndarray, sd: np.ndarray) -> float:
    """Sum of squared standardised residuals, each capped at NOISE_SIGMAS**2.

    The leaf-level test looks for many small deviations. A single residual beyond NOISE_SIGMAS
    standard deviations is either a bug the per-entry test reports on its own or an entry whose
    stencil straddles a kink that the kink test cannot see (one at about 2h/3 from x), so it may
    add no more than that cap. Under noise alone the cap changes nothing (P(z**2 > 36) ~ 2e-9).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        z2 = (residual / sd) ** 2
    return float(np.sum(np.minimum(z2, NOISE_SIGMAS ** 2)))


def resolution(values: np.ndarray, sd: np.ndarray, threshold: float, bias: float = 0.0
               ) -> float:
    """The smallest relative error of a whole leaf (g -> (1 + e) g) the leaf-level test detects:
    it adds e**2 (values / sd)**2 to each entry's term of chi2, which must exceed the threshold
    minus the noise's own mean, len(values). `bias`: what noise alone contributes to
    sum((values / sd)**2) when the values are themselves noisy estimates (one per entry), taken
    off the signal, evenly.

    Each entry's term is capped at NOISE_SIGMAS**2, as `chi2` caps it: one large entry cannot
    detect what its cap denies it (a float32 conv kernel whose largest tested entry alone
    claimed 0.76%, while a 1% factor added only the cap there, and passed).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        signal = (values / sd) ** 2 - (bias / len(values) if len(values) else 0.0)
    signal = np.sort(signal[np.isfinite(signal) & (signal > 0)])[::-1]
    room = threshold - len(values)
    cap = NOISE_SIGMAS ** 2
    # The smallest e with sum(min(e**2 signal, cap)) >= room: with the k largest entries at the
    # cap, e**2 = (room - k cap) / (the others' signal), valid when it caps exactly those k.
    rest = np.cumsum(signal[::-1])[::-1]  # rest[k]: the signal of entries k, k+1, ...
    for k in range(len(signal)):
        e2 = (room - k * cap) / rest[k]
        if e2 * signal[k] <= cap and (k == 0 or e2 * signal[k - 1] >= cap):
            return math.sqrt(max(e2, 0.0))
    return math.inf
