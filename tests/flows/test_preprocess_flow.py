"""The preprocess_site Prefect flow, run with Prefect's local ephemeral API."""

import csv

import pytest
from PIL import Image

from medfed.errors import ConfigError
from medfed.flows.preprocess import preprocess_site
from medfed.sites.data.imaging import load_image_split


@pytest.mark.slow
def test_preprocess_flow_writes_pneumonia_site(pneumonia_root, tmp_path):
    manifest = preprocess_site(
        "hospital-a",
        str(tmp_path),
        data_root=str(pneumonia_root),
        options={"site_index": 1, "sites": 3, "seed": 4, "include_test": True},
    )
    images, _ = load_image_split(tmp_path, "val")
    assert manifest["splits"]["val"]["rows"] == len(images)
    assert manifest["parameters"]["site_index"] == 1


@pytest.mark.slow
def test_preprocess_flow_reads_image_folder(xray_arrays, tmp_path):
    images, labels = xray_arrays
    folder = tmp_path / "in"
    folder.mkdir()
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "label"])
        for index, (pixels, label) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(pixels).save(folder / f"xray{index}.png")
            writer.writerow([f"xray{index}.png", int(label)])
    manifest = preprocess_site(
        "hospital-b",
        str(tmp_path / "out"),
        dataset="image_folder",
        folder=str(tmp_path / "in"),
        options={"seed": 0, "val_fraction": 0.25},
    )
    assert manifest["parameters"]["files"] == 12


def test_preprocess_flow_rejects_unknown_dataset(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset 'cifar'") as caught:
        preprocess_site.fn("hospital-a", str(tmp_path), dataset="cifar")
    assert "'pneumoniamnist' or 'image_folder'" in str(caught.value)


def test_preprocess_flow_needs_folder(tmp_path):
    with pytest.raises(ConfigError, match="needs 'folder', got None"):
        preprocess_site.fn("hospital-a", str(tmp_path), dataset="image_folder")
