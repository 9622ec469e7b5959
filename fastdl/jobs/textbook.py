"""The NumPy textbook versions the jobs compare fastdl against: the course notes' formulas, one
array expression per line (every line a temporary array), float32.

:class:`TextbookAdam` is the baseline of ``python -m fastdl bench``; :class:`TextbookNetwork`
and :func:`textbook_cross_entropy` are the one of ``python -m fastdl demo --compare`` (and of
the benchmarks in ``benchmarks/``).
"""

import numpy as np


class TextbookAdam:
    """Adam / AdamW as the course notes write it in NumPy::

        m = b1 * m + (1 - b1) * g ;  v = b2 * v + (1 - b2) * g**2
        p -= lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)

    ``decoupled``: AdamW's ``p *= 1 - lr * weight_decay`` first; ``max_grad_norm``: the
    gradients scaled by ``min(1, max_grad_norm / (norm + 1e-6))``. ``params`` (a list of
    arrays) are updated in place by ``step(grads)``.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled=False, max_grad_norm=None):
        self.params, self.lr, self.eps = params, lr, eps
        self.beta1, self.beta2 = betas
        self.weight_decay, self.decoupled, self.max_grad_norm = weight_decay, decoupled, \
            max_grad_norm
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads):
        if self.max_grad_norm is not None:
            norm = np.sqrt(sum(np.sum(g * g) for g in grads))
            clip = min(1.0, self.max_grad_norm / (norm + 1e-6))
            grads = [g * clip for g in grads]
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            if self.decoupled:
                p *= 1 - self.lr * self.weight_decay
            m[...] = b1 * m + (1 - b1) * g
            v[...] = b2 * v + (1 - b2) * g ** 2
            m_hat = m / (1 - b1 ** self.t)
            v_hat = v / (1 - b2 ** self.t)
            p -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def textbook_cross_entropy(z, labels, axis):
    """The notes' softmax regression in NumPy: ``(loss, dz)``, the mean cross-entropy of logits
    ``z`` (classes along ``axis``) against index ``labels`` (z's shape without ``axis``) and its
    gradient ``(softmax(z) - one_hot(labels)) / m``."""
    shifted = z - z.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    total = e.sum(axis=axis, keepdims=True)
    index = np.expand_dims(labels, axis)
    m = labels.size
    loss = -(np.take_along_axis(shifted, index, axis) - np.log(total)).sum() / m
    grad = e / total
    np.put_along_axis(grad, index, np.take_along_axis(grad, index, axis) - 1, axis)
    grad /= m
    return loss, grad


class TextbookNetwork:
    """The notes' L-layer network in NumPy, one array expression per formula line: blocks of
    Linear (no bias) - batch norm - ReLU - inverted dropout, a Linear output, softmax
    cross-entropy, Adam with L2 on the weights. Batch-first: X (m, sizes[0]) -> logits
    (m, sizes[-1]); float32.

    ``train_step(X, y)`` does one forward, backward and Adam step and returns the loss;
    ``accuracy(X, y)`` evaluates with the running statistics; ``lr`` is settable.
    """

    def __init__(self, sizes, dropout=0.1, seed=0, lr=1e-3, weight_decay=1e-4, momentum=0.1):
        rng = np.random.default_rng(seed)
        self.rng, self.p, self.weight_decay, self.momentum = rng, dropout, weight_decay, momentum
        self.W = [(rng.standard_normal((n_out, n_in)) * np.sqrt(2 / n_in)).astype(np.float32)
                  for n_in, n_out in zip(sizes[:-1], sizes[1:])]
        hidden = sizes[1:-1]
        self.gamma = [np.ones(n, np.float32) for n in hidden]
        self.beta = [np.zeros(n, np.float32) for n in hidden]
        self.running = [(np.zeros(n, np.float32), np.ones(n, np.float32)) for n in hidden]
        self.b = np.zeros(sizes[-1], np.float32)
        self.params = self.W + self.gamma + self.beta + [self.b]
        self.opt = TextbookAdam(self.params, lr=lr)

    @property
    def lr(self):
        return self.opt.lr

    @lr.setter
    def lr(self, value):
        self.opt.lr = value

    def forward(self, X, training=True):
        A, caches = X, []
        for l, (gamma, beta) in enumerate(zip(self.gamma, self.beta)):
            Z = A @ self.W[l].T
            if training:
                mu, var = Z.mean(axis=0), Z.var(axis=0)
                running_mean, running_var = self.running[l]
                m = Z.shape[0]
                running_mean[...] = (1 - self.momentum) * running_mean + self.momentum * mu
                running_var[...] = ((1 - self.momentum) * running_var
                                    + self.momentum * var * m / (m - 1))
            else:
                mu, var = self.running[l]
            inv_std = 1 / np.sqrt(var + 1e-5)
            xhat = (Z - mu) * inv_std
            R = np.maximum(gamma * xhat + beta, 0)
            mask = self.rng.random(R.shape, np.float32) >= self.p if training else None
            caches.append((A, xhat, inv_std, R, mask))
            A = R * mask / (1 - self.p) if training else R
        return A @ self.W[-1].T + self.b, (A, caches)

    def train_step(self, X, y):
        logits, (A, caches) = self.forward(X)
        loss, dlogits = textbook_cross_entropy(logits, y, 1)
        dW = [None] * len(self.W)
        dW[-1], db = dlogits.T @ A, dlogits.sum(axis=0)
        dA = dlogits @ self.W[-1]
        dgamma, dbeta = [None] * len(self.gamma), [None] * len(self.gamma)
        for l in reversed(range(len(self.gamma))):
            A_prev, xhat, inv_std, R, mask = caches[l]
            dR = dA * mask / (1 - self.p)
            dY = dR * (R > 0)
            m = dY.shape[0]
            dbeta[l], dgamma[l] = dY.sum(axis=0), (dY * xhat).sum(axis=0)
            dZ = self.gamma[l] * inv_std * (dY - dbeta[l] / m - xhat * dgamma[l] / m)
            dW[l] = dZ.T @ A_prev + self.weight_decay * self.W[l]
            dA = dZ @ self.W[l]
        dW[-1] = dW[-1] + self.weight_decay * self.W[-1]
        self.opt.step(dW + dgamma + dbeta + [db])
        return loss

    def accuracy(self, X, y):
        logits, _ = self.forward(X, training=False)
        return float(np.mean(np.argmax(logits, axis=1) == y))
