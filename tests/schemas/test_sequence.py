import pytest

from mlx_dpo.schemas.sequence import scored_token_count, truncate_sequence


def test_no_truncation_when_it_fits():
    assert truncate_sequence([1, 2], [3], 8) == ([1, 2, 3], [0, 0, 1])
    assert truncate_sequence([1, 2], [3], None) == ([1, 2, 3], [0, 0, 1])


def test_keep_start_cuts_the_completion_end():
    assert truncate_sequence([1, 2, 3], [4, 5], 4, "keep_start") == ([1, 2, 3, 4], [0, 0, 0, 1])


def test_keep_end_cuts_the_prompt_start():
    assert truncate_sequence([1, 2, 3], [4, 5], 4, "keep_end") == ([2, 3, 4, 5], [0, 0, 1, 1])


def test_keep_end_can_cut_into_the_completion():
    ids, mask = truncate_sequence([1], [2, 3, 4], 2, "keep_end")
    assert (ids, mask) == ([3, 4], [1, 1])
    assert scored_token_count(mask) == 1  # the first position has no context


def test_unknown_mode():
    with pytest.raises(ValueError, match="truncation mode"):
        truncate_sequence([1, 2, 3], [4], 2, "middle")
