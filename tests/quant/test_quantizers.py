"""Forward values and every gradient of each quantizer against NumPy closed forms.

The closed forms are docs/method.md section 2 written out with NumPy; the gradients are the
chain rule through the normalised grid x_n with the EWGS-scaled

    dL/dx_n = g * (1 + delta * sign(g) * (x_n - x_q)),   g = dL/dx_q

(delta = 0: straight-through). Clip bounds are inclusive (torch.clamp): an element exactly on
a bound is "inside" and passes gradient 1.

Test inputs are random values plus, per channel, values exactly on both clip bounds, beyond
them, and on rounding ties x_n = (k + 1/2) / (L - 1). Parameters are powers of two (or have a
power-of-two width) so that every division before the rounding is exact in float32 both in
XLA and in NumPy; the NumPy closed forms then see the same ties as the code. (XLA's CPU
division by other numbers is not correctly rounded, so it can differ from NumPy by an ulp.)
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax import quant

C = 3  # channels (last axis) for per-channel parameters
ROWS = 19  # 8 random rows + 11 rows of bounds, beyond-bounds and ties
DELTAS = [0.0, 0.4]
BITS = [1, 2, 3, 8]


# ----------------------------------------------------------------------------- helpers

def f32(a):
    return np.asarray(a, np.float32)


def np_round_grid(x_n, steps):
    return np.round(f32(x_n) * np.float32(steps)) / np.float32(steps)


def ewgs(g, x_n, x_q, delta):
    """EWGS-scaled dL/dx_n from g = dL/dx_q (docs/method.md section 1)."""
    return g * (1.0 + delta * np.sign(g) * (x_n - x_q))


def reduce_to(a, shape):
    """Sums a gradient over the elements that share one parameter entry."""
    if shape == ():
        return a.sum()
    return a.sum(axis=0, keepdims=True)


def tie_indices(steps):
    k = {0, 1, 2, steps // 2, steps - 2, steps - 1}
    return sorted(i for i in k if 0 <= i < steps)


# ----------------------------------------------------------------------------- cases
# Each case: params(per_channel) -> dict of float32 arrays; to_x(x_n, p, bits) maps
# normalised values back to inputs; steps(bits) = L - 1; ref(x, p, bits, delta, G) -> dict
# with out, u (the rounded argument x_n * steps), x_n, inside and d_<name> gradients;
# call(x, p, bits, delta, **kw) -> the library's output.


class Interval:
    names = ("lower", "upper")

    def __init__(self, signed):
        self.signed = signed
        self.id = f"interval_{'signed' if signed else 'unsigned'}"

    def params(self, per_channel):
        if per_channel:  # widths 2, 2, 1
            return {"lower": f32([[-0.5, -1.0, -0.25]]), "upper": f32([[1.5, 1.0, 0.75]])}
        return {"lower": f32(-0.5), "upper": f32(1.5)}

    def steps(self, bits):
        return 2**bits - 1

    def n_levels(self, bits):
        return 2**bits

    def to_x(self, x_n, p, bits):
        return p["lower"] + x_n * (p["upper"] - p["lower"])

    def call(self, x, p, bits, delta, **kw):
        return quant.interval_quantize(x, p["lower"], p["upper"], bits, signed=self.signed, delta=delta, **kw)

    def ref(self, x, p, bits, delta, G):
        lo, up = p["lower"], p["upper"]
        r = up - lo
        z = (x - lo) / r
        inside = (z >= 0) & (z <= 1)
        x_n = np.clip(z, 0, 1)
        steps = self.steps(bits)
        x_q = np_round_grid(x_n, steps)
        dq = 2.0 if self.signed else 1.0  # d out / d x_q
        out = 2 * x_q - 1 if self.signed else x_q
        h = ewgs(G * dq, x_n, x_q, delta) * inside  # dL/dx_n
        return dict(out=out, u=x_n * steps, x_n=x_n, inside=inside, dq=dq,
                    d_x=h / r,
                    d_lower=reduce_to(h * (x_n - 1) / r, lo.shape),  # d x_n/d lower = (x_n - 1)/r
                    d_upper=reduce_to(-h * x_n / r, up.shape))  # d x_n/d upper = -x_n/r


class Pact:
    """PACT; signed (our choice, docs/method.md section 2): clip to [-alpha, alpha], a symmetric
    grid with zero (2**b - 1 levels; 1 bit: {-alpha, +alpha}), d/d alpha = sign(x) beyond it."""

    names = ("alpha",)

    def __init__(self, signed=False):
        self.signed = signed
        self.id = "pact_signed" if signed else "pact"

    def params(self, per_channel):
        return {"alpha": f32([[2.0, 1.0, 0.5]]) if per_channel else f32(2.0)}

    def n_levels(self, bits):
        if not self.signed:
            return 2**bits
        return 2 if bits == 1 else 2**bits - 1

    def steps(self, bits):
        return self.n_levels(bits) - 1

    def to_x(self, x_n, p, bits):
        return (2 * x_n - 1) * p["alpha"] if self.signed else x_n * p["alpha"]

    def call(self, x, p, bits, delta, **kw):
        return quant.pact(x, p["alpha"], bits, delta=delta, signed=self.signed, **kw)

    def ref(self, x, p, bits, delta, G):
        a = p["alpha"]
        steps = self.steps(bits)
        if self.signed:
            inside = (x >= -a) & (x <= a)
            x_n = (np.clip(x, -a, a) / a + 1) / 2
            x_q = np_round_grid(x_n, steps)
            h = ewgs(G * 2 * a, x_n, x_q, delta) * inside  # dL/dx_n; d x_n / dx = 1 / (2 alpha)
            return dict(out=a * (2 * x_q - 1), u=x_n * steps, x_n=x_n, inside=inside, dq=2 * a,
                        d_x=h / (2 * a),
                        d_alpha=reduce_to(G * ((x >= a) * 1.0 - (x <= -a)), a.shape))  # sign(x) beyond
        inside = (x >= 0) & (x <= a)
        x_n = np.clip(x, 0, a) / a
        x_q = np_round_grid(x_n, steps)
        h = ewgs(G * a, x_n, x_q, delta) * inside
        return dict(out=a * x_q, u=x_n * steps, x_n=x_n, inside=inside, dq=a,
                    d_x=h / a,
                    d_alpha=reduce_to(G * (x >= a), a.shape))  # PACT: 1 where x >= alpha


class Lsq:
    names = ("step",)

    def __init__(self, signed):
        self.signed = signed
        self.id = f"lsq_{'signed' if signed else 'unsigned'}"

    def bounds(self, bits):
        """Q_N, Q_P of LSQ; signed 1-bit is the binary grid {-s, +s} (Q_N = Q_P = 1)."""
        if not self.signed:
            return 0, 2**bits - 1
        if bits == 1:
            return 1, 1
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1

    def params(self, per_channel):
        return {"step": f32([[0.25, 0.5, 0.125]]) if per_channel else f32(0.25)}

    def binary(self, bits):
        return self.signed and bits == 1

    def steps(self, bits):
        q_n, q_p = self.bounds(bits)
        return 1 if self.binary(bits) else q_n + q_p

    def n_levels(self, bits):
        return 2**bits

    def to_x(self, x_n, p, bits):
        q_n, q_p = self.bounds(bits)
        v = f32(np.asarray(x_n, np.float64) * (q_n + q_p) - q_n)  # exact k + 1/2 on ties
        return v * p["step"]

    def call(self, x, p, bits, delta, **kw):
        return quant.lsq(x, p["step"], bits, signed=self.signed, delta=delta, **kw)

    def grad_scale(self, x, s, bits):
        """LSQ: 1/sqrt(N * Q_P), N = elements sharing one step."""
        return 1.0 / math.sqrt((x.size // s.size) * self.bounds(bits)[1])

    def ref(self, x, p, bits, delta, G):
        s = p["step"]
        q_n, q_p = self.bounds(bits)
        span = q_n + q_p
        v_raw = x / s
        inside = (v_raw >= -q_n) & (v_raw <= q_p)
        v = np.clip(v_raw, -q_n, q_p)
        if self.binary(bits):
            # x_n = (v + 1)/2, L = 2, out = s * (2 x_q - 1)
            x_n = (v + 1) / 2
            x_q = np.round(x_n)
            out = s * (2 * x_q - 1)
            dq = 2 * s
            h = ewgs(G * dq, x_n, x_q, delta) * inside
            d_v = h / 2
            d_s_direct = G * (2 * x_q - 1)
            u = x_n
        else:
            # v_hat = s * round(v); x_n = (v + Q_N)/span, x_q = (round(v) + Q_N)/span
            rv = np.round(v)
            out = s * rv
            x_n = (v + q_n) / span
            x_q = (rv + q_n) / span
            dq = s * span
            h = ewgs(G * dq, x_n, x_q, delta) * inside
            d_v = h / span
            d_s_direct = G * rv
            u = v + q_n
        d_s = reduce_to(d_s_direct + d_v * (-x / s**2) * inside, s.shape) * self.grad_scale(x, s, bits)
        return dict(out=out, u=u, x_n=x_n, inside=inside, dq=dq, d_x=d_v / s, d_step=d_s)


class DorefaWeight:
    names = ()
    id = "dorefa_weight"

    def params(self, per_channel):
        return {}

    def steps(self, bits):
        return 2**bits - 1

    def n_levels(self, bits):
        return 2**bits

    def call(self, x, p, bits, delta, **kw):
        return quant.dorefa_weight(x, bits, delta=delta, **kw)

    def ref(self, w, p, bits, delta, G):
        w = np.asarray(w, np.float64)
        if bits == 1:
            # sign(w) * E with E = mean|w| (w = 0 goes to -E), straight-through gradient
            e = np.abs(w).mean()
            x_n = np.clip(0.5 + w / (2 * e), 0, 1)
            x_q = (w > 0).astype(np.float64)
            h = ewgs(G * 2 * e, x_n, x_q, delta)
            return dict(out=np.where(w > 0, e, -e), u=x_n, x_n=x_n, dq=2 * e,
                        inside=np.ones(w.shape, bool), d_x=h / (2 * e))
        t = np.tanh(w)
        m = np.abs(t).max()
        i_star = np.unravel_index(np.argmax(np.abs(t)), t.shape)
        x_n = t / (2 * m) + 0.5
        steps = self.steps(bits)
        x_q = np.round(x_n * steps) / steps
        h = ewgs(2 * G, x_n, x_q, delta)  # dL/dx_n, out = 2 x_q - 1
        # x_n depends on w_i directly, (1 - t_i^2)/(2m), and on every w through m = max|tanh w|:
        # d x_n_j / d m = -t_j/(2 m^2), d m / d w_{i*} = sign(t_{i*}) (1 - t_{i*}^2) at the argmax only.
        d_w = h * (1 - t**2) / (2 * m)
        d_w[i_star] += np.sign(t[i_star]) * (1 - t[i_star] ** 2) * np.sum(h * (-t / (2 * m**2)))
        return dict(out=2 * x_q - 1, u=x_n * steps, x_n=x_n, dq=2.0, inside=np.ones(w.shape, bool), d_x=d_w)


class DorefaActivation:
    """DoReFa activations; signed (our choice): clip to [-1, 1] on the signed PACT grid, alpha = 1."""

    names = ()

    def __init__(self, signed=False):
        self.signed = signed
        self.id = "dorefa_activation_signed" if signed else "dorefa_activation"

    def params(self, per_channel):
        return {}

    def n_levels(self, bits):
        if not self.signed:
            return 2**bits
        return 2 if bits == 1 else 2**bits - 1

    def steps(self, bits):
        return self.n_levels(bits) - 1

    def to_x(self, x_n, p, bits):
        return 2 * x_n - 1 if self.signed else x_n

    def call(self, x, p, bits, delta, **kw):
        return quant.dorefa_activation(x, bits, delta=delta, signed=self.signed, **kw)

    def ref(self, x, p, bits, delta, G):
        steps = self.steps(bits)
        if self.signed:
            inside = (x >= -1) & (x <= 1)
            x_n = (np.clip(x, -1, 1) + 1) / 2
            x_q = np_round_grid(x_n, steps)
            return dict(out=2 * x_q - 1, u=x_n * steps, x_n=x_n, inside=inside, dq=2.0,
                        d_x=ewgs(G * 2, x_n, x_q, delta) * inside / 2)
        inside = (x >= 0) & (x <= 1)
        x_n = np.clip(x, 0, 1)
        x_q = np_round_grid(x_n, steps)
        return dict(out=x_q, u=x_n * steps, x_n=x_n, inside=inside, dq=1.0,
                    d_x=ewgs(G, x_n, x_q, delta) * inside)


class Qkd:
    names = ("interval",)

    def __init__(self, signed):
        self.signed = signed
        self.id = f"qkd_{'signed' if signed else 'unsigned'}"

    def params(self, per_channel):
        return {"interval": f32([[2.0, 0.5, 1.0]]) if per_channel else f32(2.0)}

    def n_levels(self, bits):
        """Signed: 2**(b-1) - 1 positive levels, their negatives and zero (2**b - 1); 1 bit: {-I, +I}."""
        if not self.signed:
            return 2**bits
        return 2 if bits == 1 else 2**bits - 1

    def steps(self, bits):
        return self.n_levels(bits) - 1

    def to_x(self, x_n, p, bits):
        return (2 * x_n - 1) * p["interval"] if self.signed else x_n * p["interval"]

    def call(self, x, p, bits, delta, **kw):
        return quant.qkd_interval(x, p["interval"], bits, signed=self.signed, delta=delta, **kw)

    def ref(self, x, p, bits, delta, G):
        I = p["interval"]
        c_raw = x / I
        steps = self.steps(bits)
        if self.signed:
            inside = (c_raw >= -1) & (c_raw <= 1)
            x_n = (np.clip(c_raw, -1, 1) + 1) / 2
            x_q = np_round_grid(x_n, steps)
            out = I * (2 * x_q - 1)
            dq = 2 * I
            h = ewgs(G * dq, x_n, x_q, delta) * inside
            d_c = h / 2
            d_i_direct = G * (2 * x_q - 1)
        else:
            inside = (c_raw >= 0) & (c_raw <= 1)
            x_n = np.clip(c_raw, 0, 1)
            x_q = np_round_grid(x_n, steps)
            out = I * x_q
            dq = I
            d_c = ewgs(G * dq, x_n, x_q, delta) * inside
            d_i_direct = G * x_q
        return dict(out=out, u=x_n * steps, x_n=x_n, inside=inside, dq=dq, d_x=d_c / I,
                    d_interval=reduce_to(d_i_direct + d_c * (-x / I**2) * inside, I.shape))


CASES = [Interval(True), Interval(False), Pact(), Pact(signed=True), Lsq(True), Lsq(False),
         DorefaWeight(), DorefaActivation(), DorefaActivation(signed=True), Qkd(True), Qkd(False)]
CASE_IDS = [c.id for c in CASES]
PER_CHANNEL = [c for c in CASES if c.names]


# ----------------------------------------------------------------------------- inputs

def make_input(case, p, bits, seed=0):
    """(rows, C) float32: random values and, per channel, bounds, beyond-bounds and ties."""
    rng = np.random.default_rng(seed + 17 * bits)
    if isinstance(case, DorefaWeight):
        w = rng.normal(scale=0.6, size=(ROWS, C))
        steps = case.steps(bits)
        # keep x_n * steps at least 1e-3 from a rounding boundary: float32 tanh in XLA and
        # float64 tanh here may differ by an ulp
        for _ in range(100):
            t = np.tanh(w)
            u = (t / (2 * np.abs(t).max()) + 0.5) * steps
            bad = np.abs(u - np.floor(u) - 0.5) < 1e-3
            bad[np.unravel_index(np.argmax(np.abs(t)), t.shape)] = False
            if not bad.any():
                break
            w[bad] = rng.normal(scale=0.6, size=bad.sum())
        w[0, 0] = 2.5  # a unique max |w|
        if bits == 1:
            w[1, 1] = 0.0  # the tie x_n = 0.5: goes to x_q = 0, i.e. -E
        return f32(w)
    steps = case.steps(bits)
    ties = [(k + 0.5) / steps for k in tie_indices(steps)]
    # fixed length (repeats) so that every call has one shape: eager ops compile once
    special = np.resize(np.float64([0.0, 1.0, -0.3, 1.3, 0.5] + ties), ROWS - 8)
    rand = rng.uniform(-0.4, 1.4, size=(8, C))
    x_n = np.concatenate([rand, np.repeat(special[:, None], C, axis=1)])
    return f32(case.to_x(f32(x_n), p, bits))


def run(case, x, p, bits, delta, G):
    """Library output and vjp w.r.t. x and each parameter, with cotangent G."""
    names = case.names
    fn = lambda x, *ps: case.call(x, dict(zip(names, ps)), bits, delta)
    out, vjp = jax.vjp(fn, jnp.asarray(x), *[jnp.asarray(p[n]) for n in names])
    grads = vjp(jnp.asarray(G))
    return np.asarray(out), dict(zip(("x",) + names, map(np.asarray, grads)))


def check_against_ref(case, bits, delta, per_channel):
    p = case.params(per_channel)
    x = make_input(case, p, bits)
    G = f32(np.random.default_rng(5).normal(size=x.shape))
    out, grads = run(case, x, p, bits, delta, G)
    ref = case.ref(x, p, bits, delta, G)

    # the data really contain exact ties and elements exactly on both bounds
    u = ref["u"]
    if not (isinstance(case, DorefaWeight) and bits > 1):
        assert np.any(u - np.floor(u) == 0.5), "no exact rounding tie in the test data"
    if not isinstance(case, DorefaWeight):
        assert np.any(ref["inside"] & (ref["x_n"] == 0)) and np.any(ref["inside"] & (ref["x_n"] == 1))

    scale = float(np.max(np.abs(ref["out"])))
    np.testing.assert_allclose(out, ref["out"], rtol=0, atol=2e-6 * scale + 1e-7)
    np.testing.assert_allclose(grads["x"], ref["d_x"], rtol=1e-5, atol=1e-5)
    for name in case.names:
        assert grads[name].shape == p[name].shape
        np.testing.assert_allclose(grads[name], ref[f"d_{name}"], rtol=1e-5, atol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("delta", DELTAS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_and_gradients_per_tensor(case, bits, delta):
    check_against_ref(case, bits, delta, per_channel=False)


@pytest.mark.parametrize("delta", DELTAS)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("case", PER_CHANNEL, ids=[c.id for c in PER_CHANNEL])
def test_forward_and_gradients_per_channel(case, bits, delta):
    """Parameters of shape (1, C): each channel has its own bounds / step / interval."""
    check_against_ref(case, bits, delta, per_channel=True)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_lsq_step_gradient_reference_form(bits, signed):
    """docs/method.md section 2: with delta = 0, d v_hat / d s = round(v/s) - v/s inside, -Q_N below, Q_P above,
    times 1/sqrt(N Q_P). The binary 1-bit grid {-s, +s} has sign-like levels 2 round((v+1)/2) - 1."""
    case = Lsq(signed)
    p = case.params(per_channel=False)
    x = make_input(case, p, bits)
    G = f32(np.random.default_rng(2).normal(size=x.shape))
    _, grads = run(case, x, p, bits, 0.0, G)
    q_n, q_p = case.bounds(bits)
    v = x / p["step"]
    inner = 2 * np.round((v + 1) / 2) - 1 - v if case.binary(bits) else np.round(v) - v
    local = np.where(v < -q_n, -q_n, np.where(v > q_p, q_p, inner))
    expected = np.sum(G * local) / math.sqrt(x.size * q_p)
    np.testing.assert_allclose(grads["step"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("signed", [False, True])
def test_qkd_interval_gradient_reference_form(signed):
    """QKD docstring: with delta = 0, dI = q - x/I inside, +-1 (signed) or 1 (unsigned) beyond, q = out/I."""
    case = Qkd(signed)
    p = case.params(per_channel=False)
    x = make_input(case, p, 3)
    G = f32(np.random.default_rng(3).normal(size=x.shape))
    out, grads = run(case, x, p, 3, 0.0, G)
    c = x / p["interval"]
    q = out / p["interval"]
    lo = -1.0 if signed else 0.0
    local = np.where(c > 1, 1.0, np.where(c < lo, lo, q - c))
    np.testing.assert_allclose(grads["interval"], np.sum(G * local), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_elements", [4, 6, 8])
def test_lsq_on_the_clip_bound_is_exact(n_elements):
    """x = Q_P * s exactly: output Q_P * s and gradient 1 to x. The gradient-scale trick must not
    perturb the forward value of s: with s = 0.7 and k = 1/sqrt(n Q_P), (s - s*k) + s*k is one
    ulp off s in float32 for n = 6 and 8, which put x/s beyond Q_P (gradient 0) for n = 8."""
    s, bits = 0.7, 2
    q_p = 2**bits - 1
    x = np.full(n_elements, np.float32(s) * q_p, np.float32)
    assert np.all(x / np.float32(s) == q_p)
    out, vjp = jax.vjp(lambda v: quant.lsq(v, s, bits, signed=False), jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(out), np.float32(s) * q_p)
    np.testing.assert_array_equal(np.asarray(vjp(jnp.ones_like(out))[0]), 1.0)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_lsq_every_tie_rounds_half_to_even(bits, signed):
    """v = k + 1/2 for every k on the grid: LSQ's round(clip(x/s)) is half-to-even (torch.round)."""
    q_n, q_p = quant.lsq_bounds(bits, signed)
    v = np.arange(-q_n, q_p, dtype=np.float32) + 0.5
    out = np.asarray(quant.lsq(jnp.asarray(v * 0.25), 0.25, bits, signed=signed))
    np.testing.assert_array_equal(out / 0.25, np.round(v))


def dense_input(case, bits):
    if isinstance(case, DorefaWeight):
        return f32(np.linspace(-2.0, 2.0, 5001))
    p = case.params(per_channel=False)
    return f32(case.to_x(f32(np.linspace(-0.2, 1.2, 5001)), p, bits))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_number_of_levels(case, bits):
    """2**bits distinct outputs on a dense input covering the range (QKD signed: 2**b - 1, with a
    zero level and a symmetric grid; its 1-bit grid is {-I, +I}, 2 levels)."""
    p = case.params(per_channel=False)
    out = np.asarray(case.call(jnp.asarray(dense_input(case, bits)), p, bits, 0.0))
    assert len(np.unique(out)) == case.n_levels(bits)


@pytest.mark.parametrize("bits, expected", [(1, [-1.0, 1.0]), (2, [-1.0, -1 / 3, 1 / 3, 1.0]),
                                            (3, [(2 * k - 7) / 7 for k in range(8)])])
def test_interval_signed_grid(bits, expected):
    x = jnp.linspace(-2.0, 2.0, 801)
    out = np.unique(np.asarray(quant.interval_quantize(x, -1.0, 1.0, bits, signed=True)))
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_interval_unsigned_grid():
    out = np.unique(np.asarray(quant.interval_quantize(jnp.linspace(-1, 2, 301), 0.0, 1.0, 2, signed=False)))
    np.testing.assert_allclose(out, [0, 1 / 3, 2 / 3, 1], atol=1e-6)


@pytest.mark.parametrize("bits, signed, expected", [
    (1, True, [-1, 1]), (2, True, [-2, -1, 0, 1]), (1, False, [0, 1]), (2, False, [0, 1, 2, 3])])
def test_lsq_grid(bits, signed, expected):
    out = np.unique(np.asarray(quant.lsq(jnp.linspace(-3, 3, 601), 0.5, bits, signed=signed)))
    np.testing.assert_allclose(out, 0.5 * np.float32(expected), atol=1e-6)


@pytest.mark.parametrize("bits, expected", [(1, [-1, 1]), (2, [-1, 0, 1]), (3, [-1, -2 / 3, -1 / 3, 0, 1 / 3, 2 / 3, 1])])
def test_qkd_signed_grid(bits, expected):
    out = np.unique(np.asarray(quant.qkd_interval(jnp.linspace(-3, 3, 601), 1.5, bits, signed=True)))
    np.testing.assert_allclose(out, 1.5 * np.float32(expected), atol=1e-6)


@pytest.mark.parametrize("bits, expected", [(1, [-1, 1]), (2, [-1, 0, 1]), (3, [-1, -2 / 3, -1 / 3, 0, 1 / 3, 2 / 3, 1])])
def test_signed_pact_and_dorefa_grids(bits, expected):
    """Signed PACT: alpha k / (2^(b-1) - 1), k = -(2^(b-1) - 1)..2^(b-1) - 1 (1 bit: +-alpha); signed
    DoReFa: the same with alpha = 1. The nearest level is chosen, values beyond clip to +-alpha."""
    x = np.linspace(-3, 3, 601, dtype=np.float32)
    for alpha, out in ((1.5, quant.pact(jnp.asarray(x), 1.5, bits, signed=True)),
                       (1.0, quant.dorefa_activation(jnp.asarray(x), bits, signed=True))):
        grid = alpha * np.float64(expected)
        np.testing.assert_allclose(np.unique(np.asarray(out)), grid, atol=1e-6)
        clipped = np.clip(x, -alpha, alpha)
        nearest = grid[np.argmin(np.abs(clipped[:, None] - grid[None, :]), axis=1)]
        dist = np.sort(np.abs(clipped[:, None] - grid[None, :]), axis=1)
        ok = (dist[:, 1] - dist[:, 0]) > 1e-5  # not a rounding tie (float32 may go either way there)
        assert ok.sum() > 500
        np.testing.assert_allclose(np.asarray(out)[ok], nearest[ok], atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_signed_pact_alpha_gradient_matches_finite_differences_beyond_the_clip(bits):
    """Beyond [-alpha, alpha] the output is exactly sign(x) alpha, so d out / d alpha = sign(x):
    central differences of the forward pass against the gradient, element by element."""
    x = f32([-5.0, -3.0, -2.5, 2.5, 3.0, 7.0])
    alpha, h = 2.0, 1e-2
    grads = np.stack([np.asarray(jax.grad(lambda a, i=i: quant.pact(jnp.asarray(x), a, bits, signed=True)[i])(
        jnp.float32(alpha))) for i in range(len(x))])
    fd = (np.asarray(quant.pact(jnp.asarray(x), alpha + h, bits, signed=True)) -
          np.asarray(quant.pact(jnp.asarray(x), alpha - h, bits, signed=True))) / (2 * h)
    np.testing.assert_allclose(grads, np.sign(x), atol=0)
    np.testing.assert_allclose(fd, np.sign(x), atol=1e-4)


def test_dorefa_weight_one_bit_is_sign_times_mean_abs():
    w = f32([[0.3, -1.2, 0.0], [2.0, -0.1, 0.7]])
    e = np.abs(w).mean()
    out = np.asarray(quant.dorefa_weight(jnp.asarray(w), 1))
    np.testing.assert_allclose(out, np.where(w > 0, e, -e), rtol=1e-6)


def test_pact_default_delta_is_ste_and_bound_passes_gradient():
    """x = alpha gets gradient 1 to x (inclusive bound) and 1 to alpha (x >= alpha); x = 1 is the
    tie x_n * 3 = 1.5, which goes to 2 (half to even): 2 * 2/3."""
    x = f32([0.0, 1.0, 2.0, 3.0, -1.0])
    out, vjp = jax.vjp(lambda v, a: quant.pact(v, a, 2), jnp.asarray(x), jnp.float32(2.0))
    dx, da = vjp(jnp.ones(5))
    np.testing.assert_allclose(np.asarray(out), [0.0, 4 / 3, 2.0, 2.0, 0.0], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(dx), [1, 1, 1, 0, 0])
    assert float(da) == 2.0


# ----------------------------------------------------------------------------- grid_hook

@pytest.mark.parametrize("bits", [1, 3])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_grid_hook_sees_x_q_and_its_gradient_is_dL_dxq(case, bits):
    """The hook receives x_q on the [0, 1] grid; a perturbation p added there has
    dL/dp = G * (d out / d x_q) (e.g. 2 for signed interval, alpha for PACT, s * span for LSQ)."""
    p = case.params(per_channel=False)
    x = make_input(case, p, bits)
    G = f32(np.random.default_rng(9).normal(size=x.shape))
    ref = case.ref(x, p, bits, 0.0, G)
    seen = []

    def hook_out(eps):
        def hook(x_q):
            seen.append(x_q)
            return x_q + eps
        return case.call(jnp.asarray(x), p, bits, 0.0, grid_hook=hook)

    out, vjp = jax.vjp(hook_out, jnp.zeros(x.shape, jnp.float32))
    (d_eps,) = vjp(jnp.asarray(G))
    plain = np.asarray(case.call(jnp.asarray(x), p, bits, 0.0))
    np.testing.assert_allclose(np.asarray(out), plain, rtol=1e-6, atol=1e-6)
    steps = case.steps(bits)
    x_q = np.asarray(seen[0])
    assert x_q.min() >= 0 and x_q.max() <= 1
    np.testing.assert_allclose(x_q * steps, np.round(x_q * steps), atol=1e-4)  # on the grid
    np.testing.assert_allclose(np.asarray(d_eps), G * ref["dq"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- validation

def call_with(case, bits=2, **override):
    p = {k: float(v) for k, v in case.params(per_channel=False).items()}
    p.update(override)
    return case.call(jnp.linspace(-1, 1, 8), p, bits, 0.0)


@pytest.mark.parametrize("bits", [0, 9, -1, 2.5, True, "4", None])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_invalid_bits_raise(case, bits):
    with pytest.raises(ValueError, match="bits"):
        call_with(case, bits=bits)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_numpy_integer_bits_accepted(case):
    out = call_with(case, bits=np.int64(3))
    assert len(np.unique(np.asarray(out))) >= 2


@pytest.mark.parametrize("name, case", [("alpha", Pact()), ("alpha", Pact(signed=True)), ("step", Lsq(True)), ("step", Lsq(False)),
                                        ("interval", Qkd(True)), ("interval", Qkd(False))])
@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), np.float32([0.5, 0.0, 1.0])])
def test_non_positive_static_parameter_raises(name, case, value):
    with pytest.raises(ValueError, match=f"{name} must be > 0"):
        call_with(case, **{name: value})


@pytest.mark.parametrize("lower, upper", [(1.0, 1.0), (1.0, -1.0), (np.float32([0.0, 1.0]), np.float32([1.0, 1.0]))])
@pytest.mark.parametrize("signed", [False, True])
def test_interval_upper_not_above_lower_raises(lower, upper, signed):
    with pytest.raises(ValueError, match="upper > lower"):
        quant.interval_quantize(jnp.zeros(2), lower, upper, 2, signed=signed)


def test_lsq_bounds_and_qkd_levels():
    assert [quant.lsq_bounds(b, False) for b in (1, 2, 8)] == [(0, 1), (0, 3), (0, 255)]
    assert [quant.lsq_bounds(b, True) for b in (1, 2, 8)] == [(1, 1), (2, 1), (128, 127)]
    assert [quant.qkd_levels(b, True) for b in (1, 2, 3, 8)] == [2, 3, 7, 255]
    assert [quant.qkd_levels(b, False) for b in (1, 2, 8)] == [2, 4, 256]
