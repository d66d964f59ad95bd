"""stable-cnn: train convolutional image classifiers the stable way."""

__version__ = "0.1.0"
