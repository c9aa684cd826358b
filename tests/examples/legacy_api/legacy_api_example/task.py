"""legacy-api-example: a linear model and synthetic data, in NumPy."""

import numpy as np

NUM_FEATURES = 8
TRUE_WEIGHT = np.linspace(-1.0, 1.0, NUM_FEATURES)
TRUE_BIAS = 0.5


def initial_weights(seed: int) -> list[np.ndarray]:
    """A random linear model: weight vector and bias."""
    rng = np.random.default_rng(seed)
    return [rng.normal(0.0, 0.1, NUM_FEATURES).astype(np.float32), np.zeros(1, np.float32)]


def load_data(partition_id: int, num_partitions: int):
    """This partition's train and test split; partitions differ in size, so the
    weighted average differs from the plain one."""
    rng = np.random.default_rng(1000 * num_partitions + partition_id)
    n = 40 * (partition_id + 1)
    x = rng.normal(size=(n, NUM_FEATURES))
    y = x @ TRUE_WEIGHT + TRUE_BIAS + rng.normal(0.0, 0.1, n)
    split = int(0.8 * n)
    return (x[:split], y[:split]), (x[split:], y[split:])


def loss(weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """Mean squared error."""
    w, b = weights
    return float(np.mean((x @ w + b - y) ** 2))


def train(weights: list[np.ndarray], x: np.ndarray, y: np.ndarray, epochs: int,
          lr: float) -> tuple[list[np.ndarray], float]:
    """Full-batch gradient descent on the mean squared error."""
    w, b = (a.astype(np.float64) for a in weights)
    for _ in range(epochs):
        err = x @ w + b - y
        w = w - lr * 2.0 * x.T @ err / len(y)
        b = b - lr * 2.0 * np.mean(err, keepdims=True)
    new = [w.astype(np.float32), b.astype(np.float32)]
    return new, loss(new, x, y)
