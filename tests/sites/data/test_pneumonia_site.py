"""PneumoniaMNIST site preprocessing on the real file: splits, manifest, read-back."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from medfed.errors import DataError
from medfed.sites.data.imaging import content_sha256, load_image_split
from medfed.sites.data.pneumonia import (
    PNEUMONIA_FILE,
    load_pneumoniamnist,
    preprocess_pneumonia_site,
    preprocess_pneumonia_test,
    stratified_holdout,
)
from medfed.sites.data.root import file_sha256

SITE = {
    "sites": 5,
    "seed": 42,
    "partition": "label_skew",
    "partition_params": {"alpha": 0.5},
    "feature_skew": 1.0,
}


@pytest.fixture(scope="module")
def site_dirs(pneumonia_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("pneumonia")
    manifests = {}
    for index in range(SITE["sites"]):
        manifests[index] = preprocess_pneumonia_site(
            pneumonia_root, base / f"site{index}", site_index=index, **SITE
        )
    return base, manifests


def test_official_splits_have_documented_sizes(pneumonia_root):
    data = load_pneumoniamnist(pneumonia_root)
    sizes = {split: len(labels) for split, (_, labels) in data.items()}
    assert sizes == {"train": 4708, "val": 524, "test": 624}
    assert int(data["test"][1].sum()) == 390


def test_sites_split_the_training_pool(site_dirs):
    _, manifests = site_dirs
    total = sum(
        manifest["splits"][split]["rows"]
        for manifest in manifests.values()
        for split in ("train", "val")
    )
    assert total == 4708
    assert min(m["splits"]["train"]["rows"] for m in manifests.values()) >= 40


def test_site_manifest_records_counts_and_parameters(site_dirs):
    base, manifests = site_dirs
    manifest = json.loads((base / "site1" / "manifest.json").read_text())
    assert manifest == manifests[1]
    train = manifest["splits"]["train"]
    assert train["rows"] == sum(train["label_counts"].values())
    assert train["sha256"] == file_sha256(base / "site1" / "train.parquet")
    assert manifest["parameters"]["partition"] == "label_skew"
    assert manifest["parameters"]["partition_params"]["alpha"] == 0.5
    assert manifest["parameters"]["site_index"] == 1
    assert manifest["scanner_profile"]["gamma"] != 1.0
    assert manifest["image_shape"] == [28, 28]


def test_site_split_reads_back_as_tensors(site_dirs):
    base, manifests = site_dirs
    images, labels = load_image_split(base / "site0", "train")
    assert images.shape == (manifests[0]["splits"]["train"]["rows"], 1, 28, 28)
    assert images.dtype == torch.float32
    assert float(images.min()) >= 0.0
    assert float(images.max()) <= 1.0
    assert set(labels.unique().tolist()) <= {0.0, 1.0}
    expected = manifests[0]["splits"]["train"]["content_sha256"]
    assert content_sha256(images.squeeze(1).numpy(), labels.numpy()) == expected


def test_parquet_schema_is_fixed_size_image(site_dirs):
    base, _ = site_dirs
    schema = pq.read_schema(base / "site2" / "val.parquet")
    assert str(schema.field("image").type) == "fixed_size_list<element: float>[784]"
    assert str(schema.field("label").type) == "int8"


def test_preprocessing_repeats_bit_for_bit(pneumonia_root, site_dirs, tmp_path):
    _, manifests = site_dirs
    again = preprocess_pneumonia_site(pneumonia_root, tmp_path, site_index=3, **SITE)
    assert (
        again["splits"]["train"]["content_sha256"]
        == (manifests[3]["splits"]["train"]["content_sha256"])
    )


def test_validation_follows_site_label_mix(site_dirs):
    _, manifests = site_dirs
    for manifest in manifests.values():
        train = manifest["splits"]["train"]["label_counts"]
        val = manifest["splits"]["val"]["label_counts"]
        for label in ("0", "1"):
            if train[label] >= 2:
                assert val[label] >= 1


def test_altered_split_is_rejected(site_dirs, tmp_path):
    base, _ = site_dirs
    copy = tmp_path / "site"
    copy.mkdir()
    for name in ("manifest.json", "train.parquet"):
        (copy / name).write_bytes((base / "site4" / name).read_bytes())
    with (copy / "train.parquet").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(DataError, match="does not match the SHA-256") as caught:
        load_image_split(copy, "train")
    assert "preprocess the site again" in str(caught.value)


def test_missing_split_is_named(site_dirs):
    base, _ = site_dirs
    with pytest.raises(DataError, match="split 'test' not found") as caught:
        load_image_split(base / "site0", "test")
    assert "available: train, val" in str(caught.value)


def test_site_test_shares_cover_official_test(pneumonia_root, tmp_path):
    rows = 0
    for index in range(3):
        manifest = preprocess_pneumonia_site(
            pneumonia_root,
            tmp_path / f"s{index}",
            site_index=index,
            sites=3,
            seed=1,
            feature_skew=1.0,
            include_test=True,
        )
        rows += manifest["splits"]["test"]["rows"]
    assert rows == 624


def test_coordinator_test_split_is_unprofiled(pneumonia_root, tmp_path):
    manifest = preprocess_pneumonia_test(pneumonia_root, tmp_path)
    images, labels = load_image_split(tmp_path, "test")
    raw = load_pneumoniamnist(pneumonia_root)["test"][0]
    assert manifest["splits"]["test"]["label_counts"] == {"0": 234, "1": 390}
    np.testing.assert_allclose(images.squeeze(1).numpy(), raw / 255.0, atol=1e-6)
    assert len(labels) == 624


def test_standardize_uses_site_training_statistics(pneumonia_root, tmp_path):
    manifest = preprocess_pneumonia_site(
        pneumonia_root,
        tmp_path,
        site_index=0,
        sites=2,
        seed=0,
        normalization="standardize",
    )
    images, _ = load_image_split(tmp_path, "train")
    assert abs(float(images.mean())) < 1e-3
    assert float(images.std()) == pytest.approx(1.0, abs=1e-3)
    assert manifest["normalization_statistics"]["std"] > 0


def test_stratified_holdout_keeps_both_labels():
    labels = np.array([0] * 3 + [1] * 40)
    kept, held = stratified_holdout(labels, fraction=0.1, seed=0)
    assert set(labels[held]) == {0, 1}
    assert set(labels[kept]) == {0, 1}
    assert len(np.intersect1d(kept, held)) == 0
    assert len(kept) + len(held) == len(labels)


def test_missing_dataset_names_remedy(tmp_path):
    with pytest.raises(DataError, match=r"set data\.root or MEDFED_DATA_DIR") as caught:
        load_pneumoniamnist(tmp_path, download=False)
    assert "pneumoniamnist/pneumoniamnist.npz not found" in str(caught.value)
    assert PNEUMONIA_FILE.sha256 in str(caught.value)
