"""English words and sentences for the Gopher, C4 and FineWeb filters, 20 times as fast as spaCy.

The Gopher, C4 and FineWeb filters count words and sentences with a WordTokenizer. datatrove's
English one is spaCy's tokenizer: 7-8 ms for a 900-token article, because inside the memory
zone that keeps its string store from growing it creates every lexeme of every document anew
(2.8 ms once they all exist), and C4 asks it for the sentences of every line: over 80% of
the filters' time. `FastEnglishWords` gives the same tokens from one compiled regular
expression that restates spaCy's English rules, in 0.4 ms; `CleanConfig.tokenizer` picks it
("fast") or spaCy ("spacy"). On the benchmark articles and Python's documentation 99.99% of
spaCy's tokens come out the same and the filters decide the same (test_clean.py measures both).
"""

from __future__ import annotations

import re
import unicodedata
from abc import abstractmethod
from collections.abc import Iterator
from functools import lru_cache

from datatrove.utils.typeshelper import Languages
from datatrove.utils.word_tokenizers import WordTokenizer, load_word_tokenizer, strip_strings

__all__ = ["ENGLISH_WORDS", "FastEnglishWords", "SpacyEnglishWords"]


class _RememberingWords(WordTokenizer):
    """A WordTokenizer that remembers the words and sentences of the last few texts: both Gopher
    filters and FineWeb ask for the words of a document in turn. datatrove's own cache of the
    last five calls, of any kind, does not last that long: C4 in between asks for the
    sentences of every line."""

    KEEP = 4

    def __init__(self):
        super().__init__("en")
        self._words: dict[str, list[str]] = {}
        self._spans: dict[str, list[tuple[int, int]]] = {}

    def word_tokenize(self, text: str) -> list[str]:
        return _remember(self._words, text, self._word_tokenize, self.KEEP)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return _remember(self._spans, text, self._span_tokenize, self.KEEP)

    def sent_tokenize(self, text: str) -> list[str]:
        return strip_strings([text[start:end] for start, end in self.span_tokenize(text)])

    @abstractmethod
    def _word_tokenize(self, text: str) -> list[str]: ...

    @abstractmethod
    def _span_tokenize(self, text: str) -> list[tuple[int, int]]: ...


def _remember(cache: dict, text: str, compute, keep: int):
    found = cache.get(text)
    if found is None:
        if len(cache) >= keep:
            del cache[next(iter(cache))]  # the oldest: dicts keep insertion order
        found = cache[text] = compute(text)
    return found


class SpacyEnglishWords(_RememberingWords):
    """datatrove's English tokenizer (a blank spaCy pipeline, loaded once per process), minus
    the sentencizer that its word_tokenize runs for nothing (the same tokens in 60% of the
    time). Sentences come from datatrove's own."""

    @property
    def _datatrove(self) -> WordTokenizer:
        return load_word_tokenizer(Languages.english)

    def _word_tokenize(self, text: str) -> list[str]:
        nlp = self._datatrove.tokenizer
        try:
            with nlp.memory_zone():  # keeps spaCy's string store from growing with every page
                return strip_strings([token.text for token in nlp.tokenizer(text)])
        except Exception:
            return self._datatrove.word_tokenize(text)  # it knows spaCy's failure cases

    def _span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return self._datatrove.span_tokenize(text)


def _char_class(predicate, *ranges: tuple[int, int]) -> str:
    """The characters of the code point `ranges` that satisfy `predicate`, as the inside of a
    regex [...] class, consecutive ones as a range."""
    runs: list[list[str]] = []
    for char in (chr(c) for start, stop in ranges for c in range(start, stop)):
        if not predicate(char):
            continue
        if runs and ord(char) == ord(runs[-1][1]) + 1:
            runs[-1][1] = char
        else:
            runs.append([char, char])
    return "".join(re.escape(a) if a == b else f"{re.escape(a)}-{re.escape(b)}" for a, b in runs)


def _alternation(words: list[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # longest first


# spaCy's English character classes and special cases (spacy/lang/char_classes.py,
# punctuation.py, tokenizer_exceptions.py, en/), as far as they concern English text.
_UPPER = _char_class(str.isupper, (0x41, 0x530), (0x1E00, 0x1F00))  # capitals: Latin, Greek, Cyrillic
_ICONS = _char_class(lambda c: unicodedata.category(c) == "So", (0xA0, 0x1FC00))  # ©, °, ™, emoji: always split
_LETTER = r"[^\W\d_]"
_QUOTES = "'\"”“`‘´’‚,„»«「」『』（）〔〕【】《》〈〉⟦⟧"
_PUNCT = "…,:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪"
_CURRENCY = "$£€¥฿₽﷼₴₠₡₢₣₤₥₦₧₨₩₪₫₭₮₯₰₱₲₳₵₶₷₸₹₺₻₼₾₿"
_UNITS = (
    "km km² km³ m m² m³ dm dm² dm³ cm cm² cm³ mm mm² mm³ ha µm nm yd in ft kg g mg µg t lb oz m/s km/h kmh "
    "mph hPa Pa mbar mb MB kb KB gb GB tb TB T G M K %"
).split()
# Words that keep their period. The others lose it after a small letter: "etc." is two tokens.
_ABBREVIATIONS = (
    "Adm Ak Ala Apr Ariz Ark Aug Bros Calif Co Colo Conn Corp Dec Del Dr Feb Fla Ga Gen Gov Ia Id Ill Inc "
    "Ind Jan Jr Jul Jun Kan Kans Ky La Ltd Mar Mass Md Messrs Mich Minn Miss Mo Mont Mr Mrs Ms Mt Neb Nebr "
    "Nev Nov Oct Okla Ore Pa Prof Rep Rev Sen Sep Sept St Tenn Va Wash Wis co vs a.m p.m e.g i.e E.g I.e "
    "E.G I.E v.s Ph.D D.C N.C N.D N.H N.J N.M N.Y S.C"
).split()
# Special cases made of characters that the rules would split.
_EMOTICONS = (
    ":) :-) :)) :-)) :))) :-))) (: (-: =) (= :] :-] [: [-: [= =] :o) (o: :} :-} 8) 8-) (-8 ;) ;-) (; (-; :( "
    ":-( :(( :-(( :((( :-((( ): )-: =( >:( :') :'-) :'( :'-( :/ :-/ =/ =| :| :-| ]= =[ :1 :P :-P :p :-p :O "
    ":-O :o :-o :0 :-0 :() >:o :* :-* :3 :-3 =3 :> :-> :X :-X :x :-x :D :-D ;D ;-D =D 8D 8-D <3 <33 <333 </3 "
    "'' ’’ and/or w/o C++"
).split()
# spaCy's Sentencizer.default_punct_chars: a token that is one of these ends a sentence.
_TERMINALS = (
    "!.?։؟۔܀܁܂߹।॥၊။።፧፨᙮᜵᜶᠃᠉᥄᥅᪨᪩᪪᪫᭚᭛᭞᭟᰻᰼᱾᱿‼‽⁇⁈⁉⸮⸼꓿꘎꘏꛳꛷꡶꡷꣎꣏꤯꧈꧉꩝꩞꩟꫰꫱꯫﹒﹖﹗！．？𐩖𐩗𑁇𑁈𑂾𑂿"
    "𑃀𑃁𑅁𑅂𑅃𑇅𑇆𑇍𑇞𑇟𑈸𑈹𑈻𑈼𑊩𑑋𑑌𑗂𑗃𑗉𑗊𑗋𑗌𑗍𑗎𑗏𑗐𑗑𑗒𑗓𑗔𑗕𑗖𑗗𑙁𑙂𑜼𑜽𑜾𑩂𑩃𑪛𑪜𑱁𑱂𖩮𖩯𖫵𖬷𖬸𖭄𛲟𝪈｡。"
)


def _english_token_regex() -> re.Pattern:
    """One spaCy token per match of `findall`.

    spaCy cuts a text at spaces into chunks; off each chunk it splits prefixes (opening
    punctuation) and suffixes (closing punctuation, a period, 's), then cuts the rest at
    infixes (hyphens between letters, ...). A special case (Mr., :), don't) overrides the
    rules. Here each alternative is one kind of token, tried in order at a token's first
    character; the lookarounds say where in its chunk it stands."""
    prefix_chars = re.escape("§%=—–" + _PUNCT + _QUOTES + _CURRENCY) + _ICONS
    suffix_chars = re.escape(_PUNCT + _QUOTES + "—–") + _ICONS
    # A final period is split off after a small letter, a digit, punctuation or two capitals,
    # not after a lone capital (J., U.S.). ("|" is spaCy's too: its class holds a joined list.)
    after_period = re.escape("%²-+|" + _PUNCT + _QUOTES)
    period = rf"(?:(?<=[{_UPPER}][{_UPPER}])|(?<=°[FfCcKk])|(?<![{_UPPER}]))(?<=[^\W_]|[{after_period}])\."
    suffix = rf"(?:[{suffix_chars}]|\.\.+|{period}|['’][sS])"
    # Only suffixes follow, to the end of the chunk. Lookaheads stop after 20 of them: each
    # token start looks ahead, and unbounded that is quadratic in a chunk like "!!!...!" or
    # ".,.,.,", which would then take seconds; a run of 20 closing marks is no sentence's end.
    end = rf"(?={suffix}{{0,20}}(?:\s|$))"
    start = rf"(?<![^\s{prefix_chars}])"  # only prefixes precede it in its chunk
    unit = rf"(?:{_alternation(_UNITS)}|[{re.escape(_CURRENCY)}]|\+)"  # off a number: 5 km, 10 %, 5 $
    infix = "|".join((
        r"(?<=\d)[+\-*^](?=[\d-])",  # 1-2, 3*4
        rf"(?<=[^\W\d_{_UPPER}]|[{re.escape(_QUOTES)}])\.(?=[{_UPPER}{re.escape(_QUOTES)}])",  # end.Next
        rf"(?<={_LETTER}),(?={_LETTER})",
        rf"(?<=[^\W_])(?:---|--|——|[-–—~])(?={_LETTER})",  # well-known, 19-year-old; not COVID-19
        rf"(?<=[^\W_])[:<>=/](?={_LETTER})",
        rf"[{_ICONS}]",
    ))
    # 's and n't everywhere; 'm, 've, 'll, 'd, 're where spaCy lists the words (I, you, who, could...).
    clitic = rf"['’](?:[sSd]|re|ll)(?=[^\w'’]|$)|(?<={_LETTER})['’](?:m|ve)(?=[^\w'’]|$)"
    negation = r"n['’]t(?=[^\w'’]|$)"
    split = rf"\.\.|…|{infix}|{suffix}{{1,20}}(?:\s|$)|{clitic}|(?<=\d){unit}{end}"
    closing = r"[,;:!?)\]\"”]{0,20}(?:\s|$)"
    return re.compile(
        r"(?=\S)(?:"  # at a space fail at once: findall tries every alternative at every position
        # Fast paths, nine tokens in ten: a word or number, and punctuation that is always
        # a token of its own.
        rf"{_LETTER}+(?={closing})|[a-z]{{3,}}(?=\.{closing})|(?!8\))\d+(?=\.?{closing})"
        rf"|[,;:!?\"“”‘’«»„*_#&$£€¥§%{{}}|'-](?=\s)|{start}[,!?\"“”‘«»„*_#&$£€¥§%{{}}]|\.(?=\s|$)"
        rf"|[)\]](?![-:=])(?=\.?{closing})|{start}\((?![-:;=o^*.>¬ಠ_╯])"
        # URLs and e-mail addresses, whole
        rf"|{start}(?:[\w+.-]{{2,}}://)?(?:[\w.+-]+@)?(?:[\w-]+\.)+[a-z]{{2,63}}(?::\d{{2,5}})?(?:[/?#]\S*?)?{end}"
        rf"|(?:{_alternation(_ABBREVIATIONS)}|[a-zäöü])\.(?={end}|[{_UPPER}])"
        rf"|(?=[^\w\s]|[8a-zC])(?:{_alternation(_EMOTICONS)}){end}"
        rf"|(?<![\w.])(?:1[0-2]|[1-9])(?=(?:[ap]m|[ap]\.m\.){end})"  # 10 am
        rf"|\.\.+|…"
        rf"|(?<=\d){unit}{end}"
        rf"|{negation}|{clitic}|['’](?:[Cc]ause|[Cc]o[sz]|[Cc]uz|bout|em|nuff){end}|y['’](?=all{end})"
        rf"|{start}(?:\+(?!\d)|[{prefix_chars}])"
        rf"|{infix}"
        # the rest of a chunk, up to the next split
        rf"|(?:(?!(?<=\d){unit}{end})[^\W\d_n]+|\d+|n(?!{negation[1:]})|(?!{split})[^\s\w]|(?!{split})_)+"
        r"|\S)"
    )


def _split_words() -> dict[str, list[str]]:
    """spaCy's special cases for contractions written without their apostrophe (dont, cannot,
    im, id, wed): the words it splits in two although no rule would."""
    clitics = {
        "i": "m ll d ve", "you": "ll d ve re", "he": "ll d s", "she": "ll d s", "it": "ll d s",
        "we": "ll d ve re", "they": "ll d ve re", "that": "s ll d", "this": "s ll d", "these": "ll d re ve",
        "those": "ll d re ve", "could": "ve", "might": "ve", "must": "ve", "should": "ve", "would": "ve",
    } | dict.fromkeys(("who", "what", "when", "where", "why", "how", "there"), "s ll d re ve")
    negated = "ca could do does did had may might must need ought sha should wo would ai are is was were have has dare"
    pairs = [(word, c) for word, cs in clitics.items() for c in cs.split()] + [(w, "nt") for w in negated.split()]
    pairs += [("can", "not"), ("gon", "na"), ("got", "ta"), ("y", "all")]
    real_words = {"ill", "its", "hell", "shell", "shed", "were", "well", "whore"}
    return {
        w + second: [w, second]
        for first, second in pairs for w in (first, first.title())
        if (first + second) not in real_words
    }


class FastEnglishWords(_RememberingWords):
    """spaCy's English tokens and sentences (datatrove's English tokenizer) from one regular
    expression, 20 times as fast. It leaves out spaCy's rarer special cases (a name with 'll or
    'd stays whole there, a few emoticons) and splits sentences where spaCy's sentencizer does:
    before the first token after a standalone ".", "!" or "?" (or its Unicode kin) that is not
    punctuation itself, so closing quotes and brackets stay behind, whatever the case of the
    next word ("It costs $5. and more" is two sentences); an abbreviation and "U.S." keep their
    period and end nothing."""

    TOKEN = _english_token_regex()
    SPLIT = _split_words()
    FIRST_TERMINAL = re.compile(rf"(?<!\S)\S*?[{re.escape(_TERMINALS)}]")  # the chunk it is in
    TERMINALS = frozenset(_TERMINALS)

    def _word_tokenize(self, text: str) -> list[str]:
        tokens = self.TOKEN.findall(text)
        if not self.SPLIT.keys().isdisjoint(tokens):
            tokens = [part for token in tokens for part in self.SPLIT.get(token, (token,))]
        return tokens

    def _span_tokenize(self, text: str) -> list[tuple[int, int]]:
        if not text:
            return []
        spans, start = [], 0
        for end, next_start in self._sentence_breaks(text):
            spans.append((start, end))
            start = next_start
        return spans + [(start, len(text))]

    def _sentence_breaks(self, text: str) -> Iterator[tuple[int, int]]:
        """(end of a sentence, start of the next), as spaCy's Sentencizer would put them."""
        first = self.FIRST_TERMINAL.search(text)
        if first is None:
            return
        after_terminal, end = False, first.start()
        for match in self.TOKEN.finditer(text, first.start()):  # the tokens up to it cannot matter
            token = match.group()
            if after_terminal:
                if _space_token(text, end, match.start()):
                    yield end, end + (text[end] == " ")
                    after_terminal = False
                elif not _is_punct(token):
                    yield end, match.start()
                    after_terminal = False
            if token in self.TERMINALS:
                after_terminal = True
            end = match.end()
        if after_terminal and _space_token(text, end, len(text)):
            yield end, end + (text[end] == " ")


def _space_token(text: str, start: int, stop: int) -> bool:
    # spaCy keeps one space after a token as its trailing whitespace; any other whitespace
    # between two tokens is a token of its own, not punctuation, so it starts a sentence too.
    return stop > start and text[start:stop] != " "


@lru_cache(maxsize=4096)
def _is_punct(token: str) -> bool:
    return all(unicodedata.category(char).startswith("P") for char in token)  # spaCy's is_punct


# One instance of each: the filters of a chain share it, and so its memory of the last texts.
ENGLISH_WORDS: dict[str, _RememberingWords] = {"fast": FastEnglishWords(), "spacy": SpacyEnglishWords()}
