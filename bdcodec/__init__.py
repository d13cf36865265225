"""bdcodec: learned image compression with a Laplacian-guided entropy model and a
blur-dissipated diffusion decoder (Khoshkhahtinat et al., CVPR 2024).

``from bdcodec import Codec`` loads the model on first use; importing the package
itself is cheap (no torch).
"""

from .errors import BdcError

__all__ = ["BdcError", "Codec", "__version__"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "Codec":
        from .codec import Codec

        return Codec
    raise AttributeError(name)
