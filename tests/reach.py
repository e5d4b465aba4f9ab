"""What a query can be influenced by through a stack of attention layers.

One layer lets query i read key j when the mask allows it. Through L layers, i reads
what it sees, what those see, and so on L times. Most attention kinds are closed under
this (a key's visible set lies inside its viewers' sets), but ENCODER_ONLY is not: a
[MASK]ed MASS source token is hidden from the decoder, yet reaches it through the source
tokens that see it. Leakage tests therefore compare a model against this reach, not
against the one-layer mask.
"""

import numpy as np


def reach_through_layers(visible: np.ndarray, layers: int) -> np.ndarray:
    """[L, L] bool: may key j influence query i's output after `layers` layers?"""
    visible = np.asarray(visible, bool)
    reach = visible | np.eye(len(visible), dtype=bool)
    for _ in range(layers - 1):
        reach = reach | ((reach.astype(int) @ visible.astype(int)) > 0)
    return reach
