"""Helpers for local_wikitext2.yaml: the page verbatim, lm-eval's wikitext process_results."""

import re


def page(doc):
    # No detokenizer: mpolm's wikitext2 scores the tokenised file as it is.
    return doc["page"]


def process_results(doc, results):
    # Same as lm_eval/tasks/wikitext/preprocess_wikitext.py: words and bytes of the page.
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    nbytes = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, nbytes),
        "bits_per_byte": (loglikelihood, nbytes),
    }
