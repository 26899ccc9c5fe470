"""Corpus: documents in, one EOS-joined token stream out, and the sliding windows over it.

(Module docstring to be completed.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """One forward pass: tokens[begin:end] go in; rows for targets first_target..end-1 come out.

    The row of target position j (1 <= j < n_tokens) uses the hidden state at position j-1,
    which sits at offset j-1-begin inside the window.
    """

    begin: int
    end: int
    first_target: int

    @property
    def n_rows(self) -> int:
        return self.end - self.first_target


def sliding_windows(n_tokens: int, block: int, stride: int) -> list[Window]:
    """Windows of `block` tokens whose scored tails move by `stride` (METHOD.md §2.1).

    Every token after the first is predicted exactly once and in corpus order. The first window
    scores all its positions; each later one scores only its last `stride` targets, so every
    prediction after the first window sees at least ``block - stride`` tokens of context. The
    last window is shifted back to end at the stream's end, so all windows have the same length
    (``min(block, n_tokens)``) and batch without padding.
    """
    if block < 2:
        raise ValueError(f"block must be >= 2, got {block}")
    if not 1 <= stride < block:
        raise ValueError(f"stride must be in [1, block-1={block - 1}] so each scored token keeps context, got {stride}")
    if n_tokens < 2:
        return []
    end = min(block, n_tokens)
    windows = [Window(0, end, 1)]
    while end < n_tokens:
        new_end = min(end + stride, n_tokens)
        windows.append(Window(new_end - block, new_end, end))
        end = new_end
    return windows
