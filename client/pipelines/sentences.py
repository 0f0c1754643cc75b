"""Cut streamed text into sentences as it arrives, for speech that starts before the reply ends.

    splitter = SentenceSplitter()
    for delta in llm_stream:
        for sentence in splitter.feed(delta):
            speak(sentence)
    rest = splitter.flush()          # what is left at the end (None when nothing)

A sentence ends at `.`, `!`, `?`, an ellipsis (`...` or `…`) or a line break,
with any closing quotes and brackets after the mark kept in the sentence.
Because text arrives in pieces, a mark only ends a sentence once the next
characters show it does: whitespace must follow, and then a character that
can start a sentence (not a lower-case letter). So these do not cut:

- decimals and versions: `3.14`, `v2.0.1` (no space after the point);
- abbreviations: titles and the like before a name (`Dr. Smith`, `Mr.`,
  `St.`, `vs.`, `e.g.`, `i.e.`, `etc.` before a lower-case word), initials
  (`J. R. R. Tolkien`), `No. 5`;
- an ellipsis or a point before a lower-case word (`I think... maybe`);
- a list number at the start of a sentence (`1. First`).

CJK full stops and marks (`。！？`, and full-width `．！？`) end a sentence
at once, with no space after them, as CJK text has none. Runs of marks
(`?!`, `!!!`) stay together. A sentence longer than `max_chars` is cut at
its last comma, semicolon, colon or dash (else its last space), so that a
run-on reply still starts speaking early.

Whitespace is normalized (runs become one space, ends trimmed); empty
sentences and ones with no letter or digit are never returned.
"""

import re

# Lower-case words that end in a point without ending the sentence when a
# capitalized word follows (titles before names, and the like).
ABBREVIATIONS = frozenset("""
mr mrs ms mx dr prof sr jr st mt ft rev gen col lt sgt capt cmdr gov sen rep pres hon
vs v cf al approx dept est fig no nos vol vols pp ch sec art inc ltd co corp bros jan feb
mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thur thurs fri sat sun
""".split())

# Dotted forms where the dots are part of the word: e.g. i.e. a.m. p.m. u.s.
_DOTTED = re.compile(r"(?:^|[\s(\"'“‘])((?:[A-Za-z]\.){2,})$")

SENTENCE_MARKS = ".!?…"
CJK_MARKS = "。！？．｡"
CLOSERS = "\"'”’»)]}」』）】〉》"
SOFT_BREAKS = ",;:—–"


def _can_start_sentence(char):
    return not char.islower()


class SentenceSplitter(object):
    """Incremental sentence splitter; see the module docstring for the rules."""

    def __init__(self, max_chars=300, min_chars=1):
        self.max_chars = max_chars
        # Sentences shorter than this are joined to the next one ("Yes." stays
        # alone with the default of 1).
        self.min_chars = min_chars
        self._buffer = ""
        self._carry = ""  # a short sentence waiting to be joined to the next

    def feed(self, text):
        """Add text; return the sentences it completed, in order."""
        if not text:
            return []
        self._buffer += text
        return self._take(final=False)

    def flush(self):
        """The text left over at the end, as one last sentence (None when there is none)."""
        sentences = self._take(final=True)
        rest = _clean(self._buffer)
        self._buffer = ""
        if rest and _speakable(rest):
            sentences.append(rest)
        if self._carry:
            sentences = self._join_carry(sentences, final=True)
        if not sentences:
            return None
        return " ".join(sentences)

    def sentences(self, text):
        """All sentences of a whole text (feed, then flush)."""
        found = self.feed(text)
        rest = self.flush()
        return found + ([rest] if rest else [])

    # --- internals -------------------------------------------------------------------

    def _take(self, final):
        found = []
        while True:
            cut = self._find_cut(final)
            if cut is None:
                break
            sentence, self._buffer = _clean(self._buffer[:cut]), self._buffer[cut:]
            if sentence and _speakable(sentence):
                found.append(sentence)
        while self.max_chars and len(self._buffer.strip()) > self.max_chars:
            cut = _soft_cut(self._buffer, self.max_chars)
            sentence, self._buffer = _clean(self._buffer[:cut]), self._buffer[cut:]
            if sentence and _speakable(sentence):
                found.append(sentence)
        return self._join_carry(found, final=False)

    def _join_carry(self, sentences, final):
        if self.min_chars <= 1:
            return sentences
        out = []
        for sentence in sentences:
            if self._carry:
                sentence = self._carry + " " + sentence
                self._carry = ""
            if len(sentence) < self.min_chars and not final:
                self._carry = sentence
                continue
            out.append(sentence)
        if final and self._carry:
            out.append(self._carry)
            self._carry = ""
        return out

    def _find_cut(self, final):
        """The index just after the first sentence end in the buffer, or None."""
        text = self._buffer
        i = 0
        n = len(text)
        while i < n:
            char = text[i]
            if char == "\n":
                if text[:i].strip():
                    return i + 1
                i += 1
                continue
            if char in CJK_MARKS:
                end = _after_run(text, i + 1, CJK_MARKS + SENTENCE_MARKS)
                end = _after_run(text, end, CLOSERS)
                if end == n and not final:
                    return None  # a closing quote may still come
                return end
            if char in SENTENCE_MARKS:
                end = _after_run(text, i + 1, SENTENCE_MARKS)
                end = _after_run(text, end, CLOSERS)
                verdict = self._judge(text, i, end, final)
                if verdict is None:
                    return None  # not decidable yet: wait for more text
                if verdict:
                    return end
                i = end
                continue
            i += 1
        return None

    def _judge(self, text, mark, end, final):
        """Whether the marks text[mark:end] end a sentence: True, False, or None (wait)."""
        n = len(text)
        if end == n:
            return True if final else None
        if not text[end].isspace():
            return False  # 3.14, v2.0, e.g.x, "no."word
        following = end
        while following < n and text[following].isspace():
            if text[following] == "\n":
                return True
            following += 1
        if following == n:
            return True if final else None
        next_char = text[following]
        if not _can_start_sentence(next_char):
            return False  # "etc. and", "I think... maybe"
        marks = text[mark:_after_run(text, mark, SENTENCE_MARKS)]
        if marks != ".":
            return True  # ?, !, ..., …: a lower-case test is all they get
        word = _word_before(text, mark)
        if not word:
            return True
        lowered = word.lower()
        if lowered in ABBREVIATIONS:
            return False
        if len(word) == 1 and word.isalpha() and word.isupper() and word != "I":
            return False  # an initial: J. R. R. Tolkien (but "than I. Then" ends)
        if _DOTTED.search(text[:mark + 1]):
            return False  # e.g. U.S. a.m.
        if word.isdigit() and len(word) <= 2 and not _clean(text[:mark - len(word)]):
            return False  # "1. First": a list number at the start
        return True


def _after_run(text, index, characters):
    while index < len(text) and text[index] in characters:
        index += 1
    return index


def _word_before(text, index):
    start = index
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] == "'"):
        start -= 1
    return text[start:index]


def _soft_cut(text, limit):
    """Where to cut an over-long run: after the last soft break within limit, else a space."""
    window = text[:limit]
    best = max(window.rfind(mark) for mark in SOFT_BREAKS)
    if best > limit // 3:
        return best + 1
    space = window.rfind(" ")
    if space > limit // 3:
        return space + 1
    return limit


def _clean(text):
    return " ".join(text.split())


def _speakable(text):
    return any(char.isalnum() for char in text)
