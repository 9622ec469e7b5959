"""Plain NumPy references: the textbook formulas of SPEC.md, written for reading, not speed.

Every kernel of fastdl is tested against these. They compute in the arrays' own dtype (NumPy 2
keeps float32 arrays float32 against Python floats), one parameter at a time.
"""

import math

import numpy as np

OPTIMIZER_DEFAULTS = {
    "sgd": dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                maximize=False),
    "momentum": dict(lr=0.01, beta=0.9, weight_decay=0.0, maximize=False),
    "rmsprop": dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                    centered=False, maximize=False),
    "adam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 maximize=False),
    "adamw": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False,
                  maximize=False),
}


class ReferenceOptimizer:
    """One optimizer over a list of arrays (updated in place), in SPEC.md's order of operations.

    ``groups`` is a list of (indices of params, hyperparameter overrides).
    """

    def __init__(self, kind, params, groups=None, grad_scale=None, skip_nonfinite=False,
                 max_grad_norm=None, ema_decay=None, state_dtype=None, min_8bit_size=4096,
                 population=False, **hyper):
        self.kind = kind
        self.state_dtype, self.min_8bit_size = state_dtype, min_8bit_size
        self.population = population
        self.params = params
        base = {**OPTIMIZER_DEFAULTS[kind], **hyper}
        groups = groups or [(range(len(params)), {})]
        self.hyper = [None] * len(params)
        for indices, overrides in groups:
            for i in indices:
                self.hyper[i] = {**base, **overrides}
        self.grad_scale = grad_scale
        self.skip_nonfinite = skip_nonfinite
        self.max_grad_norm = max_grad_norm
        self.ema_decay = ema_decay
        self.ema = [p.copy() for p in params] if ema_decay is not None else None
        self.state = [dict() for _ in params]
        self.t = 0

    def step(self, grads):
        """Returns (found_inf, grad_norm) like fastdl's StepInfo."""
        # 1. unscale
        if self.grad_scale is not None:
            grads = [g / self.grad_scale for g in grads]
        # 2. skip a step with any inf/NaN gradient
        found_inf = any(not np.all(np.isfinite(g)) for g in grads)
        norm = None
        if self.max_grad_norm is not None:
            norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
        if self.skip_nonfinite and found_inf:
            return True, norm
        # 3. global-norm clipping
        if self.max_grad_norm is not None:
            clip = self.max_grad_norm / (norm + 1e-6)
            if clip < 1:
                grads = [g * clip for g in grads]
        self.t += 1
        for i, (p, g) in enumerate(zip(self.params, grads)):
            h = self.hyper[i]
            # 4. maximize
            if h["maximize"]:
                g = -g
            getattr(self, "_" + self.kind)(p, g, self.state[i], h)
            self._store_state(p, self.state[i])
        # 7. EMA of the weights
        if self.ema is not None:
            d = self.ema_decay
            for e, p in zip(self.ema, self.params):
                e[...] = d * e + (1 - d) * p
        return (found_inf if self.skip_nonfinite else False), norm

    def _store_state(self, p, s):
        """Low-precision state (SPEC.md): the step used the updated state in float32; what is
        kept is its bfloat16 rounding, or its 8-bit codes (blocks of 256 per model, each on
        its absmax; exp_avg_sq on the unsigned map, the rest on the signed one), decoded. The
        8-bit codes, absmax and scaled values are kept beside as ``<name>.codes``,
        ``<name>.absmax``, ``<name>.scaled``."""
        if self.state_dtype not in ("bfloat16", "int8"):
            return
        rows = p.shape[0] if self.population else 1
        for name in [n for n in s if "." not in n]:
            value = s[name]
            if self.state_dtype == "bfloat16":
                s[name] = bfloat16_value(bfloat16_bits(value)).reshape(value.shape)
                continue
            if value.size // rows < self.min_8bit_size:
                continue
            code = dynamic_map(name != "exp_avg_sq")
            parts = [quantize_blockwise(row, code, scaled=True) for row in value.reshape(rows, -1)]
            codes = np.stack([c for c, _, _ in parts])
            absmax = np.stack([a for _, a, _ in parts])
            s[name] = np.stack([dequantize_blockwise(c, a, code) for c, a, _ in parts]
                               ).reshape(value.shape)
            s[name + ".codes"] = codes.reshape(value.shape)
            s[name + ".absmax"] = absmax if self.population else absmax[0]
            s[name + ".scaled"] = np.stack([x for _, _, x in parts]).reshape(value.shape)

    def _sgd(self, p, g, s, h):
        if h["weight_decay"] != 0:
            g = g + h["weight_decay"] * p
        if h["momentum"] != 0:
            if "momentum_buffer" not in s:
                s["momentum_buffer"] = g.copy()
            else:
                s["momentum_buffer"] = (h["momentum"] * s["momentum_buffer"]
                                        + (1 - h["dampening"]) * g)
            b = s["momentum_buffer"]
            g = g + h["momentum"] * b if h["nesterov"] else b
        p -= h["lr"] * g

    def _momentum(self, p, g, s, h):
        g = g + h["weight_decay"] * p
        v = s.get("velocity", np.zeros_like(p))
        s["velocity"] = v = h["beta"] * v + (1 - h["beta"]) * g
        p -= h["lr"] * v

    def _rmsprop(self, p, g, s, h):
        g = g + h["weight_decay"] * p
        alpha = h["alpha"]
        sq = s["square_avg"] = alpha * s.get("square_avg", np.zeros_like(p)) + (1 - alpha) * g * g
        if h["centered"]:
            ga = s["grad_avg"] = alpha * s.get("grad_avg", np.zeros_like(p)) + (1 - alpha) * g
            avg = np.sqrt(sq - ga * ga) + h["eps"]
        else:
            avg = np.sqrt(sq) + h["eps"]
        if h["momentum"] > 0:
            b = s.get("momentum_buffer", np.zeros_like(p))
            s["momentum_buffer"] = b = h["momentum"] * b + g / avg
            p -= h["lr"] * b
        else:
            p -= h["lr"] * (g / avg)

    def _adam(self, p, g, s, h, decoupled=False):
        b1, b2 = h["betas"]
        if decoupled:
            p *= 1 - h["lr"] * h["weight_decay"]
        else:
            g = g + h["weight_decay"] * p
        m = s["exp_avg"] = b1 * s.get("exp_avg", np.zeros_like(p)) + (1 - b1) * g
        v = s["exp_avg_sq"] = b2 * s.get("exp_avg_sq", np.zeros_like(p)) + (1 - b2) * g * g
        if h["amsgrad"]:
            v = s["max_exp_avg_sq"] = np.maximum(s.get("max_exp_avg_sq", np.zeros_like(p)), v)
        m_hat_step = h["lr"] / (1 - b1 ** self.t)
        p -= m_hat_step * m / (np.sqrt(v) / math.sqrt(1 - b2 ** self.t) + h["eps"])

    def _adamw(self, p, g, s, h):
        self._adam(p, g, s, h, decoupled=True)


def ewa(values, beta, bias_correction=True):
    """v_t = beta * v_{t-1} + (1 - beta) * theta_t, v_0 = 0; optionally / (1 - beta**t)."""
    out, v = [], 0.0
    for t, theta in enumerate(values, start=1):
        v = beta * v + (1 - beta) * theta
        out.append(v / (1 - beta ** t) if bias_correction else v)
    return np.array(out)


def batch_norm_forward(x, gamma, beta, running_mean, running_var, training=True, momentum=0.1,
                       eps=1e-5, channel_axis=1):
    """SPEC.md's batch norm, for one model, in float64. Returns y, the new running statistics
    (or None), and what backward needs. Statistics per channel over every other axis."""
    x = np.asarray(x, np.float64)
    axis = channel_axis % x.ndim
    others = tuple(a for a in range(x.ndim) if a != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    m = x.size // x.shape[axis]
    gamma = np.ones(x.shape[axis]) if gamma is None else np.asarray(gamma, np.float64)
    beta = np.zeros(x.shape[axis]) if beta is None else np.asarray(beta, np.float64)
    new_mean = new_var = None
    if training:
        mu = x.mean(axis=others)
        var = ((x - mu.reshape(shape)) ** 2).mean(axis=others)
        if running_mean is not None:
            new_mean = (1 - momentum) * running_mean + momentum * mu
            new_var = (1 - momentum) * running_var + momentum * var * m / (m - 1)
    else:
        mu = np.asarray(running_mean, np.float64)
        var = np.asarray(running_var, np.float64)
    inv_std = 1 / np.sqrt(var + eps)
    xhat = (x - mu.reshape(shape)) * inv_std.reshape(shape)
    y = gamma.reshape(shape) * xhat + beta.reshape(shape)
    return y, new_mean, new_var, (xhat, inv_std, gamma, shape, others, m, training)


def batch_norm_backward(dy, saved):
    """dbeta = sum(dy); dgamma = sum(dy * xhat); training:
    dx = gamma * inv_std * (dy - dbeta/m - xhat * dgamma/m); test time: gamma * inv_std * dy."""
    xhat, inv_std, gamma, shape, others, m, training = saved
    dy = np.asarray(dy, np.float64)
    dbeta = dy.sum(axis=others)
    dgamma = (dy * xhat).sum(axis=others)
    scale = (gamma * inv_std).reshape(shape)
    if training:
        dx = scale * (dy - dbeta.reshape(shape) / m - xhat * dgamma.reshape(shape) / m)
    else:
        dx = scale * dy
    return dx, dgamma, dbeta


def softmax(z, axis=-1):
    """exp(z - max z) / sum exp(z - max z) along ``axis``, in float64."""
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(z, axis=-1):
    z = np.asarray(z, np.float64)
    shifted = z - z.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def softmax_cross_entropy(logits, target, axis=-1, reduction="mean", label_smoothing=0.0,
                          ignore_index=-100, weight=None):
    """SPEC.md's cross-entropy for one model, in float64: returns (loss, dlogits).

    The textbook way: a probability array, a dense target array t (smoothed, times the class
    weights w), per-row loss -sum t log p, and the gradient p * sum(t) - t, each row weighted
    by the reduction. With index targets t_j = w_j * ((1 - eps) * onehot_j + eps / C), so the
    loss is (1 - eps) * w_y * (-log p_y) + eps / C * sum_j w_j * (-log p_j), and "mean" divides
    by the sum of w_y over the rows not ignored (NaN when that is 0; the gradient then is NaN
    on the rows not ignored, 0 on the others, as torch); with probabilities, by the row count.
    """
    z = np.moveaxis(np.asarray(logits, np.float64), axis, -1)
    n_classes = z.shape[-1]
    log_p = log_softmax(z)
    eps = label_smoothing
    w = np.ones(n_classes) if weight is None else np.asarray(weight, np.float64)
    if np.issubdtype(np.asarray(target).dtype, np.integer):
        labels = np.asarray(target)
        kept = labels != ignore_index
        onehot = (labels[..., None] == np.arange(n_classes)).astype(np.float64)
        t = w * ((1 - eps) * onehot + eps / n_classes)
        t[~kept] = 0.0
        divisor = (onehot * w).sum(axis=-1)[kept].sum()  # sum of w_y over the rows kept
    else:
        t = w * ((1 - eps) * np.moveaxis(np.asarray(target, np.float64), axis, -1)
                 + eps / n_classes)
        kept = np.ones(z.shape[:-1], bool)
        divisor = kept.sum()
    row_loss = -(t * log_p).sum(axis=-1)
    grad = np.exp(log_p) * t.sum(axis=-1, keepdims=True) - t
    if reduction == "mean":
        loss = row_loss.sum() / divisor if divisor != 0 else np.nan
        if divisor != 0:
            grad = grad / divisor
        else:
            grad = np.where(kept[..., None], np.nan, 0.0) * grad
    elif reduction == "sum":
        loss = row_loss.sum()
    else:
        loss = row_loss
    return loss, np.moveaxis(grad, -1, axis)


def _lowbias32(h):
    """Wellons' lowbias32 on uint64 arrays holding 32-bit values."""
    m32 = np.uint64(0xFFFFFFFF)
    h = h ^ (h >> np.uint64(16))
    h = (h * np.uint64(0x7FEB352D)) & m32
    h = h ^ (h >> np.uint64(15))
    h = (h * np.uint64(0x846CA68B)) & m32
    return h ^ (h >> np.uint64(16))


def dropout_mask(shape, p, seed):
    """SPEC.md's mask u >= p, with u = 24 bits of the documented counter-based hash of
    (seed, flat index) / 2**24. ``p`` may hold one rate per model (leading axis)."""
    mask64 = (1 << 64) - 1
    z = (seed + 0x9E3779B97F4A7C15) & mask64  # SplitMix64 of the seed: the 64-bit key
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask64
    key = z ^ (z >> 31)
    index = np.arange(math.prod(shape), dtype=np.uint64)
    m32 = np.uint64(0xFFFFFFFF)
    h = _lowbias32((index & m32) ^ np.uint64(key & 0xFFFFFFFF))
    h = _lowbias32(h ^ (index >> np.uint64(32)) ^ np.uint64(key >> 32))
    u = (h >> np.uint64(8)).astype(np.float64) / 2.0**24
    p = np.asarray(p, np.float64).reshape((-1,) + (1,) * (len(shape) - 1)) if np.ndim(p) else p
    return u.reshape(shape) >= p


def dropout(x, mask, p):
    """y = x * mask * scale, scale = 1 / (1 - p) (0 when p = 1); also dx from dy."""
    p = np.asarray(p, np.float64)
    if p.ndim:
        p = p.reshape((-1,) + (1,) * (x.ndim - 1))
    with np.errstate(divide="ignore"):
        scale = np.where(p < 1, 1 / (1 - p), 0.0).astype(x.dtype)
    return x * mask * scale


# -- the toolkit's layers (the notes' forward and backward, one line per formula) ---------------


def linear_forward(x, W, b, feature_axis=-1):
    """Batch-first: y = x W^T + b (x (N, n_in)); the notes' layout: Z = W A + b (A (n_in, m))."""
    if feature_axis == 0:
        return W @ x + (0 if b is None else b[:, None])
    return x @ W.T + (0 if b is None else b)


def linear_backward(dy, x, W, feature_axis=-1):
    """(dx, dW, db) of linear_forward."""
    if feature_axis == 0:
        return W.T @ dy, dy @ x.T, dy.sum(axis=1)
    return dy @ W, dy.T @ x, dy.sum(axis=0)


def relu(x):
    return np.maximum(x, 0)


def relu_backward(dy, x):
    return dy * (x > 0)


def tanh_backward(dy, y):
    """y = tanh(x): dx = dy * (1 - y**2)."""
    return dy * (1 - y * y)


# -- low-precision optimizer state (SPEC.md) -----------------------------------------------------

def bfloat16_bits(x):
    """float32 -> bfloat16 bits (uint16): the upper half of the float32, rounded to the nearest,
    ties to even; a NaN stays a NaN (its upper half, made quiet: rounding could carry a
    signaling NaN's low payload into an infinity)."""
    x = np.asarray(x, np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), ((u >> 16) | 0x40).astype(np.uint16), rounded)


def bfloat16_value(bits):
    """bfloat16 bits -> float32 (exact)."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def _linspace32(start, end, n):
    """torch.linspace(start, end, n, dtype=torch.float32) on the CPU: the step in float32, each
    value start + i * step (first half) or end - (n - 1 - i) * step rounded once (an FMA)."""
    start, end = np.float32(start), np.float32(end)
    step = (end - start) / np.float32(n - 1)
    i = np.arange(n)
    low = (np.float64(start) + np.float64(step) * i).astype(np.float32)
    high = (np.float64(end) - np.float64(step) * (n - 1 - i)).astype(np.float32)
    return np.where(i < n // 2, low, high)


def dynamic_map(signed):
    """bitsandbytes' ``create_dynamic_map(signed)`` (7 exponent bits, 8 bits in all), float32
    (256,) sorted: per decimal exponent e = -6 .. 0, the midpoints of 2**e' + 1 points evenly
    spaced in [0.1, 1] (e' = e + 6, or e + 7 unsigned) times 10**e, their negatives when
    signed, then 0 and 1."""
    data = []
    for i in range(7):
        n = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        bounds = _linspace32(0.1, 1, n)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scale = np.float32(10.0 ** (i - 6))
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    return np.sort(np.array(data, np.float32))


def nearest_code(scaled, code):
    """Brute force: the index of the code nearest each value of ``scaled`` (float32), the
    distance taken exactly (float64), ties to the lower index."""
    distance = np.abs(np.asarray(scaled, np.float64)[..., None] - code.astype(np.float64))
    return np.argmin(distance, axis=-1).astype(np.uint8)


def quantize_blockwise(values, code, block=256, scaled=False):
    """(codes uint8, absmax float32 per block): blocks of ``block`` consecutive values of the
    flat float32 ``values``, each scaled by 1 / its absmax (0 for a block of zeros) and
    clipped to [-1, 1], then rounded to the nearest code. ``scaled=True`` also returns the
    scaled values (to tell near-ties)."""
    values = np.asarray(values, np.float32).reshape(-1)
    codes = np.empty(values.size, np.uint8)
    absmax = np.empty(-(-values.size // block), np.float32)
    clipped = np.empty(values.size, np.float32)
    for b in range(absmax.size):
        part = values[b * block:(b + 1) * block]
        absmax[b] = np.max(np.abs(part))
        inverse = np.float32(1) / absmax[b] if absmax[b] > 0 else np.float32(0)
        clipped[b * block:(b + 1) * block] = np.clip(part * inverse, np.float32(-1),
                                                     np.float32(1))
        codes[b * block:(b + 1) * block] = nearest_code(clipped[b * block:(b + 1) * block], code)
    return (codes, absmax, clipped) if scaled else (codes, absmax)


def near_tie(scaled, code, ulps=4):
    """Whether each float32 ``scaled`` value lies within ``ulps`` float32 ulps of a midpoint
    between two neighbouring codes (where a rounding may go either way)."""
    scaled = np.asarray(scaled, np.float32)
    mids = (code[:-1].astype(np.float64) + code[1:]) / 2
    nearest_mid = mids[np.clip(np.searchsorted(mids, scaled), 0, mids.size - 1)]
    below = mids[np.clip(np.searchsorted(mids, scaled) - 1, 0, mids.size - 1)]
    gap = np.minimum(np.abs(scaled - nearest_mid), np.abs(scaled - below))
    return gap <= ulps * np.spacing(np.abs(scaled)).astype(np.float64)


def dequantize_blockwise(codes, absmax, code, block=256):
    """float32 values: code[codes] * the block's absmax."""
    codes = np.asarray(codes).reshape(-1)
    return code[codes] * np.repeat(absmax, block)[:codes.size]
