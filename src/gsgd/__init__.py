"""gsgd: G-SGD, optimizing ReLU networks in their positively scale-invariant space."""

__version__ = "0.1.0"
