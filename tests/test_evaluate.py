"""The fidelity report on real text: fields, and the invariants every figure must satisfy."""

import json

import pytest

import flashhead
from flashhead.cli import main
from flashhead.evaluate import EvalConfig, evaluate

SMALL = EvalConfig(positions=256, prompts=4, prompt_tokens=16, new_tokens=8, tv_positions=8)


@pytest.fixture(scope="module")
def report(smollm2, smol_index):
    model, tok = smollm2
    k = smol_index.num_clusters
    return evaluate(model, tok, smol_index, flashhead.load_text("persuasion")[:40_000], [8, 96, k], config=SMALL,
                    progress=False)


def test_report_has_every_figure(report):
    keys = {"n_probes", "rows_fraction", "bytes_fraction", "containment", "containment_vllm_rule", "agreement",
            "next_token_accuracy", "continuation_identical_fraction", "continuation_mean_identical_prefix",
            "tv_t0.7", "kl_t0.7", "tv_t1.0", "kl_t1.0", "tv_stderr_t1.0"}
    for row in report["settings"]:
        assert keys <= set(row)
    json.dumps(report)  # plain JSON


def test_figures_are_consistent(report):
    rows = report["settings"]
    for r in rows:
        assert r["agreement"] <= r["containment"] + 1e-9  # a token outside the candidates cannot win
        assert 0 <= r["tv_t1.0"] <= 1 and r["kl_t1.0"] >= -1e-6
    assert [r["bytes_fraction"] for r in rows] == sorted(r["bytes_fraction"] for r in rows)
    assert rows[1]["containment"] >= rows[0]["containment"]


def test_all_clusters_reproduce_the_dense_head(report):
    full = report["settings"][-1]
    assert full["containment"] == 1.0 and full["agreement"] == 1.0
    assert full["continuation_identical_fraction"] == 1.0
    assert full["next_token_accuracy"] == pytest.approx(report["dense"]["next_token_accuracy"])
    assert full["tv_t1.0"] < 1e-4 and full["tv_t0.7"] < 1e-4  # every cluster probed: the exact dense softmax


def test_eval_command_json_and_plot(tmp_path, capsys, smol_index):
    smol_index.save(tmp_path / "idx")
    code = main(["eval", "smollm2-135m", "--index", str(tmp_path / "idx"), "--probes", "16,64", "--positions", "128",
                 "--prompts", "2", "--new-tokens", "4", "--json", "--plot", str(tmp_path / "p.png")])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["n_probes"] for r in out["settings"]] == [16, 64] and out["text"] == "persuasion"
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
