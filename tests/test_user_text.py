"""Fidelity on the user's own text: UTF-8 files, --chat, the code texts, and one-line errors for bad input."""

from __future__ import annotations

import copy
import json
import re
import sysconfig
from pathlib import Path

import pytest
import torch

from flashhead import data
from flashhead.cli import main
from flashhead.evaluate import EvalConfig, chat_text, evaluate


def test_code_texts_are_slices_of_the_running_stdlib():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tune, held = data.load_text("code-tune"), data.load_text("code-heldout")
    assert not set(data.CODE_TEXTS["code-tune"]) & set(data.CODE_TEXTS["code-heldout"])  # disjoint modules
    for name, text in (("code-tune", tune), ("code-heldout", held)):
        modules = data.CODE_TEXTS[name]
        assert len(text) <= len(modules) * (data.CODE_SLICE_CHARS + 2)
        where = []
        for module in modules:  # each module's slice starts at its first top-level def/class, in list order
            source = (stdlib / f"{module}.py").read_text(encoding="utf-8")
            start = re.search(r"^(def|class) ", source, re.M).start()
            where.append(text.index(source[start:start + 500]))
        assert where == sorted(where) and where[0] == 0


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b" \n\t\n", "is empty"),
    (b"caf\xe9 au lait", "is not UTF-8 .*iconv"),
])
def test_bad_text_files_are_named(tmp_path, content, message):
    path = tmp_path / "mine.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        data.text_or_file(str(path))


def test_builtin_names_win_and_files_are_read(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("Grüße aus München.\n", encoding="utf-8")
    assert data.text_or_file(str(path)) == "Grüße aus München.\n"
    assert data.text_or_file("persuasion") == data.load_text("persuasion")


def test_eval_command_reports_a_bad_file_in_one_line(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("déjà vu\n".encode("latin-1"))
    assert main(["eval", "smollm2-135m", "--text", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not UTF-8" in err and str(path) in err


def test_chat_alternates_user_and_assistant(smollm2):
    _, tok = smollm2
    rendered = chat_text(tok, "How do I open a file?\n\nUse open().\n\nAnd close it?\n\nUse a with block.")
    order = [rendered.index(s) for s in ("How do I open", "Use open()", "And close it?", "Use a with block")]
    assert order == sorted(order)
    assert rendered.count("<|im_start|>user") == 2 and rendered.count("<|im_start|>assistant") == 2


def test_chat_needs_a_template_and_two_paragraphs(smollm2):
    _, tok = smollm2
    plain = copy.deepcopy(tok)
    plain.chat_template = None  # a base model's tokenizer
    with pytest.raises(ValueError, match="has no chat template.*drop --chat"):
        chat_text(plain, "a\n\nb")
    with pytest.raises(ValueError, match="at least two paragraphs"):
        chat_text(tok, "one paragraph only")


def test_text_too_short_for_the_positions(smollm2, smol_index):
    model, tok = smollm2
    text = data.load_text("persuasion")[:6_000]  # ~1,400 tokens: enough for 5 windows, not for 4096 positions
    with pytest.raises(ValueError, match=r"only \d+ of the 4096 positions.*--positions"):
        evaluate(model, tok, smol_index, text, [8], config=EvalConfig(positions=4096, prompts=2), progress=False)


def test_eval_on_a_user_file_with_chat(tmp_path, capsys, smol_index):
    smol_index.save(tmp_path / "idx")
    paragraphs = [p for p in data.load_text("code-heldout").split("\n\n") if p.strip()][:40]
    path = tmp_path / "dialogue.txt"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    code = main(["eval", "smollm2-135m", "--index", str(tmp_path / "idx"), "--text", str(path), "--chat",
                 "--probes", "16", "--positions", "128", "--prompts", "2", "--new-tokens", "4", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chat"] is True and out["text"] == str(path) and out["positions"] == 128
    assert 0 <= out["settings"][0]["agreement"] <= 1


def test_build_calibrates_on_a_users_file(tmp_path, smollm2):
    from flashhead.integrations.transformers import calibration_sets, calibration_states

    model, tok = smollm2
    text = data.load_text("de-fortunes")[:8_000]
    path = tmp_path / "domain.txt"
    path.write_text(text, encoding="utf-8")
    [mine] = calibration_sets(model, tok, [str(path)], positions=256)
    assert torch.equal(mine, calibration_states(model, tok, text, 256))  # the file's own states
    [mixed, other] = calibration_sets(model, tok, [f"{path}+emma", "persuasion"], positions=256)
    assert mixed.shape[0] == 256 and other.shape[0] == 128
    with pytest.raises(ValueError, match=r"calibration text '.*domain.txt' gives \d+ positions, fewer than the "
                                         r"4096 asked of it; give a longer text or fewer positions"):
        calibration_sets(model, tok, [str(path)], positions=4096)


@pytest.mark.parametrize("content, message", [
    (None, "unknown text .*mine.txt: neither a built-in text"),
    (b"", "is empty"),
    (b"caf\xe9 au lait", "is not UTF-8"),
])
def test_build_names_a_bad_calibration_file_before_loading_the_model(tmp_path, capsys, content, message):
    path = tmp_path / "mine.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        main(["build", "smollm2-135m", "--out", str(tmp_path / "idx"), "--calibration", f"prideprejudice,{path}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(message, err) and not (tmp_path / "idx").exists()


def test_eval_reports_one_row_per_language(capsys):
    code = main(["eval", "smollm2-135m", "--text", "ru-fortunes,el-help", "--positions", "128", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["texts"]) == ["ru-fortunes", "el-help"] and out["positions"] == 128
    ru, el = out["texts"]["ru-fortunes"], out["texts"]["el-help"]
    assert (ru["language"], ru["script"], el["script"]) == ("ru", "Cyrillic", "Greek")
    assert not el["calibrated_language"] and ru["calibrated_language"]  # Russian man pages, no Greek text
    [row] = ru["report"]["settings"]
    assert row["n_probes"] == ru["report"]["default_n_probes"] and 0 <= row["agreement"] <= 1
    assert row["continuation_identical_fraction"] is None  # a table measures no continuations unless asked


class _LossyTokenizer:
    """Encodes ASCII only: every other character comes back as nothing (an unknown-token piece)."""

    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [ord(c) if ord(c) < 128 else 0 for c in text]})()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)


def test_a_script_the_tokenizer_cannot_encode_is_an_error(monkeypatch, capsys):
    from flashhead import evaluate as ev

    assert ev.encoding_loss(_LossyTokenizer(), "plain ascii") == 0.0
    assert ev.encoding_loss(_LossyTokenizer(), "ab" + "ภาษา" * 2) == pytest.approx(8 / 10)
    monkeypatch.setattr(ev, "encoding_loss", lambda tok, text: 0.9 if any("\u0e00" <= c <= "\u0e7f" for c in text[:500])
                        else 0.0)
    assert main(["eval", "smollm2-135m", "--text", "th-tutorial,emma", "--positions", "128"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar: one line
    assert "cannot encode th-tutorial (Thai, 90% of its characters lost)" in err and "emma" not in err
