"""``tupli_jax._rows.ranges`` against the plain concatenation of ``arange``s."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from tupli_jax._rows import ranges

runs = st.lists(st.tuples(st.integers(-(2**40), 2**40), st.integers(0, 20)), max_size=30)


@given(runs)
def test_ranges_is_the_concatenation_of_aranges(pairs: list[tuple[int, int]]) -> None:
    starts = np.array([s for s, _ in pairs], np.int64)
    counts = np.array([c for _, c in pairs], np.int64)
    expected = [r for s, c in pairs for r in range(s, s + c)]
    out = ranges(starts, counts)
    assert out.dtype == np.int64
    assert out.tolist() == expected
