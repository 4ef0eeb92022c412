"""The deterministic prompt of `mpolm bench generate` (crates/cli/src/bench.rs), shared by the
peer scripts so every side measures the same ids: the paragraph repeated until it tokenizes to
at least n ids, then cut to n ids."""

PARAGRAPH = (
    "The old lighthouse keeper climbed the spiral stairs every evening, counting each "
    "of the one hundred and twelve steps as his father had done before him. From the "
    "lantern room he could see the fishing boats returning to the harbor, their sails "
    "catching the last orange light of the sun, while gulls circled above the breakwater "
    "and the tide crept slowly over the dark rocks below. "
)


def prompt_ids(encode, n):
    """`encode(text) -> list of ids` without special tokens."""
    text = PARAGRAPH
    ids = encode(text)
    while len(ids) < n:
        text += PARAGRAPH
        ids = encode(text)
    return ids[:n]
