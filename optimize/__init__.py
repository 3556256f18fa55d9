"""edgeopt: take a trained ResNet classifier to an edge deployment, measuring every step."""

__version__ = "0.1.0"
