"""Dense classifiers on a flat parameter vector: softmax regression and ReLU MLPs.

Forward and backward passes are written by hand on the array module of the inputs, so the same
code runs on numpy and CuPy. The parameter vector holds, layer after layer, the weight matrix
(fan_in x fan_out, row-major) and then the bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpiopt.config import param
from mpiopt.errors import ConfigError
from mpiopt.problems import PROBLEMS
from mpiopt.problems.base import EpochBatches, Problem, ProblemConfig


class DenseNet(EpochBatches, Problem):
    """A fully connected ReLU network with a softmax cross-entropy loss.

    Args:
        shard: the rank's data (:class:`mpiopt.data.base.Shard`).
        hidden: widths of the hidden layers; empty for softmax regression.
        batch_size: minibatch size of ``gradient``.
        xp: array module (numpy or cupy).
        dtype: floating type of parameters and data (float32 in runs; float64 for checks).
    """

    def __init__(self, shard, hidden=(), batch_size: int = 32, xp=np, dtype=np.float32):
        if hasattr(shard.x_train, "indptr"):
            raise ConfigError("is a bag-of-words corpus: documents, not feature vectors; "
                              "topic models take it (problem.name: lda)", key="data.name")
        self.xp, self.dtype = xp, np.dtype(dtype)
        self.sizes = [shard.n_features, *hidden, shard.n_classes]
        self.n_classes = shard.n_classes
        self.shapes = [(a, b) for a, b in zip(self.sizes[:-1], self.sizes[1:])]
        self.dim = sum(a * b + b for a, b in self.shapes)
        self.batch_size = batch_size
        self.x_train = xp.asarray(shard.x_train, dtype=self.dtype)
        self.y_train = xp.asarray(shard.y_train)
        self.n_train = int(shard.x_train.shape[0])
        self.x_test = None if shard.x_test is None else xp.asarray(shard.x_test, self.dtype)
        self.y_test = None if shard.y_test is None else xp.asarray(shard.y_test)
        self._reset_batches()
        self._views: list = []  # (vector, its views), most recent first
        self._rows: dict = {}  # batch size -> arange(batch size)

    def views(self, flat):
        """Split a flat vector into per-layer (weight, bias) views, without copying.

        The views of the last few vectors are kept: a step asks for those of the same
        parameter and gradient buffers every time.
        """
        for seen, views in self._views:
            if seen is flat:
                return views
        views = self._split(flat)
        self._views = [(flat, views), *self._views[:3]]
        return views

    def _split(self, flat):
        out, at = [], 0
        for a, b in self.shapes:
            w = flat[at: at + a * b].reshape(a, b)
            at += a * b
            out.append((w, flat[at: at + b]))
            at += b
        return out

    def init(self, rng):
        """Draw He-scaled weights (Xavier-like for the output layer) and zero biases."""
        x = np.zeros(self.dim, dtype=self.dtype)
        for i, (w, _) in enumerate(self.views(x)):
            fan_in = w.shape[0]
            gain = 2.0 if i < len(self.shapes) - 1 else 1.0
            w[...] = rng.standard_normal(w.shape) * np.sqrt(gain / fan_in)
        return self.xp.asarray(x)

    def _batch(self, rng):
        """Return the next minibatch indices (:class:`EpochBatches`), on the device."""
        return self.xp.asarray(self._next_indices(rng))

    def forward(self, flat, inputs):
        """Return the logits and the activations of every layer (inputs first)."""
        xp = self.xp
        acts = [inputs]
        layers = self.views(flat)
        for i, (w, b) in enumerate(layers):
            z = acts[-1] @ w
            z += b
            if i < len(layers) - 1:
                xp.maximum(z, 0, out=z)
            acts.append(z)
        return acts[-1], acts

    def _loss_and_delta(self, logits, labels):
        """Return mean cross-entropy and its gradient with respect to the logits.

        Written for small batches, where each numpy call costs more than its arithmetic:
        sums rather than means, the softmax normalised in place, the row indices kept.
        """
        xp = self.xp
        n = labels.shape[0]
        rows = self._rows.get(n)
        if rows is None:
            rows = self._rows[n] = xp.arange(n)
        logits = logits - logits.max(axis=1, keepdims=True)
        delta = xp.exp(logits)
        total = delta.sum(axis=1, keepdims=True)
        loss = (xp.log(total).sum() - logits[rows, labels].sum()) / n
        delta /= total
        delta[rows, labels] -= 1
        delta /= n
        return loss, delta

    def gradient(self, x, rng, out) -> dict:
        """Write the minibatch gradient at ``x`` into ``out``; return the minibatch loss."""
        idx = self._batch(rng)
        inputs, labels = self.x_train[idx], self.y_train[idx]
        logits, acts = self.forward(x, inputs)
        loss, delta = self._loss_and_delta(logits, labels)
        layers, grads = self.views(x), self.views(out)
        for i in range(len(layers) - 1, -1, -1):
            gw, gb = grads[i]
            self.xp.matmul(acts[i].T, delta, out=gw)
            delta.sum(axis=0, out=gb)
            if i:
                delta = delta @ layers[i][0].T
                delta *= acts[i] > 0
        return {"loss": float(loss)}

    def evaluate(self, x, batch: int = 4096) -> dict:
        """Return the test loss and accuracy of ``x`` (on the ranks that hold the test set)."""
        if self.x_test is None:
            raise RuntimeError("evaluate() needs the test set: load the shard with_test=True")
        n, loss_sum, correct = int(self.x_test.shape[0]), 0.0, 0
        for start in range(0, n, batch):
            xb, yb = self.x_test[start: start + batch], self.y_test[start: start + batch]
            logits, _ = self.forward(x, xb)
            loss, _ = self._loss_and_delta(logits, yb)
            loss_sum += float(loss) * int(yb.shape[0])
            correct += int((logits.argmax(axis=1) == yb).sum())
        return {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1)}


@PROBLEMS.register("softmax")
@dataclass(frozen=True)
class SoftmaxConfig(ProblemConfig):
    """Multinomial logistic regression (a linear layer and softmax cross-entropy)."""

    def build(self, shard, batch_size: int, xp=np) -> DenseNet:
        return DenseNet(shard, (), batch_size, xp)


@PROBLEMS.register("mlp")
@dataclass(frozen=True)
class MLPConfig(ProblemConfig):
    """A multilayer perceptron with ReLU hidden layers and softmax cross-entropy."""

    hidden: tuple[int, ...] = param((64,), "Widths of the hidden layers.", low=1)

    def build(self, shard, batch_size: int, xp=np) -> DenseNet:
        return DenseNet(shard, self.hidden, batch_size, xp)
