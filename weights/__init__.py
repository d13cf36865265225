"""The shipped weights, installed as the package ``bdcodec.shipped``."""
