from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.png"))
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def codec():
    from bdcodec.codec import Codec

    return Codec(device="cpu")


@pytest.fixture(scope="session")
def kodim23():
    return np.asarray(Image.open(ROOT / "examples" / "kodim23.png").convert("RGB"))
