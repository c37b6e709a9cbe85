import pytest

from flashhead import data


@pytest.mark.parametrize(
    "name, words",
    [("prideprejudice", 121_567), ("sensesensibility", 118_565), ("emma", 157_441), ("persuasion", 83_283),
     ("mansfieldpark", 159_540), ("northangerabbey", 77_141)],
)
def test_austen_sizes(name, words):
    text = data.load_text(name)
    assert abs(len(text.split()) - words) / words < 0.01


def test_pride_and_prejudice_content():
    text = data.load_text("prideprejudice")
    assert text.startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged, that a single man in possession" in text


def test_brown_whole_and_categories():
    whole = data.load_text("brown")
    assert 0.95e6 < len(whole.split()) < 1.1e6
    assert whole.startswith("The Fulton County Grand Jury said Friday")
    assert "/nn" not in whole and "``" not in whole  # tags and tokenizer quotes are gone
    parts = [data.load_text(f"brown:{c}") for c in data.BROWN_CATEGORIES]
    assert sum(len(p.split()) for p in parts) == len(whole.split())


def test_cleared_text_cache_is_rebuilt_identically():
    first = data.load_text("persuasion")
    cached = data.cache_dir() / "texts" / "persuasion.txt"
    cached.write_text("damaged")
    data.clear_text_cache()
    assert data.load_text("persuasion") == first


def test_unknown_text_names_the_choices():
    with pytest.raises(ValueError, match="unknown text 'pride'.*prideprejudice"):
        data.load_text("pride")
