"""datagen: paired video stylization training data."""

__version__ = "0.1.0"
