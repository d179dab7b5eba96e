"""A built-in selector of salient question words (no spaCy or NLTK downloads).

The reference picks question words, ``? ! :`` and non-stopword nouns, verbs, adjectives, adverbs
and pronouns with spaCy. Without a tagger we keep every word that is not a stopword, which
covers those parts of speech and also keeps numerals; role words of chat templates ("USER",
"ASSISTANT") are not part of the question and are skipped, as the reference locates the question
inside the template before tagging it.
"""

from __future__ import annotations

QUESTION_WORDS = frozenset("who what where when why how which whom whose".split())
SALIENT_PUNCTUATION = frozenset("?!:")
ROLE_WORDS = frozenset("user assistant system human gpt".split())
# A compact English stopword list (function words only; content words stay salient).
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his i if in into is it its itself just me more most my
    myself no nor not now of off on once only or other our ours ourselves out over own same she should so
    some such than that the their theirs them themselves then there these they this those through to too
    under until up very was we were while will with would you your yours yourself yourselves image picture
    please answer question word single one using""".split()
)
_WORD_START = ("\u2581", "\u0120")  # SentencePiece "▁" and byte-level BPE "Ġ"


def _words(tokens: list[str]) -> list[tuple[str, list[int]]]:
    """Group sub-word tokens into words: ``[(word, [token positions]), ...]``."""
    marked = any(t.startswith(_WORD_START) for t in tokens)
    words: list[tuple[str, list[int]]] = []
    for i, token in enumerate(tokens):
        text = token.lstrip("".join(_WORD_START))
        punctuation = bool(text) and not any(ch.isalnum() for ch in text)
        starts = not marked or token.startswith(_WORD_START) or punctuation or not words
        if words and not starts and not _is_punctuation(words[-1][0]):
            words[-1] = (words[-1][0] + text, words[-1][1] + [i])
        else:
            words.append((text, [i]))
    return words


def _is_punctuation(word: str) -> bool:
    return bool(word) and not any(ch.isalnum() for ch in word)


def salient_token_positions(tokens: list[str]) -> list[int]:
    """Positions (into ``tokens``) of the word pieces of salient words, plus the last token.

    >>> salient_token_positions(["\u2581What", "\u2581is", "\u2581the", "\u2581number", "\u2581on", "\u2581the", "\u2581jer", "sey", "?"])
    [0, 3, 6, 7, 8]
    """
    keep: list[int] = []
    previous = ""
    for word, positions in _words(tokens):
        lower = word.lower()
        role_colon = lower == ":" and previous in ROLE_WORDS
        salient = (
            lower in QUESTION_WORDS
            or (lower in SALIENT_PUNCTUATION and not role_colon)
            or (
                lower != ""
                and not _is_punctuation(lower)
                and not (lower.startswith("<") and lower.endswith(">"))  # special and byte tokens
                and lower not in STOPWORDS
                and lower not in ROLE_WORDS
            )
        )
        if salient:
            keep.extend(positions)
        previous = lower
    if tokens and (not keep or keep[-1] != len(tokens) - 1):
        keep.append(len(tokens) - 1)
    return keep
