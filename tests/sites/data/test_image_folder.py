"""Bring-your-own image folders: DICOM, NIfTI and PNG ingest, and every error case."""

import csv

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from medfed.errors import DataError
from medfed.sites.data.image_folder import preprocess_folder_site, read_image_folder
from medfed.sites.data.imaging import load_image_split


def write_dicom(path, pixels):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = 8
    dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelRepresentation = 0
    dataset.PixelData = pixels.astype(np.uint8).tobytes()
    dataset.save_as(path, enforce_file_format=True)


def write_nifti(path, pixels):
    # NIfTI's first axis is x (columns), so a (row, column) array is transposed.
    nib.save(nib.Nifti1Image(pixels.T.copy(), np.eye(4)), path)


def write_png(path, pixels):
    Image.fromarray(pixels.astype(np.uint8)).save(path)


WRITERS = {".dcm": write_dicom, ".nii.gz": write_nifti, ".png": write_png}


def write_labels(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "label"])
        writer.writerows(rows)


def make_folder(folder, images, labels, suffix):
    folder.mkdir(exist_ok=True)
    rows = []
    for index, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        name = f"xray{index:02d}{suffix}"
        WRITERS[suffix](folder / name, pixels)
        rows.append((name, int(label)))
    write_labels(folder / "labels.csv", rows)
    return rows


def expected_scaled(pixels):
    low, high = float(pixels.min()), float(pixels.max())
    return np.round((pixels.astype(np.float32) - low) / (high - low) * 255)


@pytest.mark.parametrize("suffix", [".dcm", ".nii.gz", ".png"])
def test_folder_ingests_format(tmp_path, xray_arrays, suffix):
    images, labels = xray_arrays
    make_folder(tmp_path, images, labels, suffix)
    dataset = read_image_folder(tmp_path, tmp_path / "labels.csv")
    assert dataset.images.shape == (12, 28, 28)
    assert dataset.filenames[0] == f"xray00{suffix}"
    np.testing.assert_array_equal(dataset.labels, labels)
    np.testing.assert_allclose(dataset.images[3], expected_scaled(images[3]), atol=1)


def test_folder_mixes_formats(tmp_path, xray_arrays):
    images, labels = xray_arrays
    rows = []
    for index, suffix in enumerate([".dcm", ".nii.gz", ".png"] * 4):
        name = f"scan{index:02d}{suffix}"
        WRITERS[suffix](tmp_path / name, images[index])
        rows.append((name, int(labels[index])))
    write_labels(tmp_path / "labels.csv", rows)
    dataset = read_image_folder(tmp_path, tmp_path / "labels.csv")
    assert len(dataset.filenames) == 12


def test_folder_site_writes_splits(tmp_path, xray_arrays):
    images, labels = xray_arrays
    make_folder(tmp_path / "in", images, labels, ".dcm")
    manifest = preprocess_folder_site(
        tmp_path / "in",
        tmp_path / "in" / "labels.csv",
        tmp_path / "out",
        seed=0,
        val_fraction=0.2,
    )
    assert manifest["splits"]["train"]["rows"] + manifest["splits"]["val"]["rows"] == 12
    train_images, _ = load_image_split(tmp_path / "out", "train")
    assert train_images.shape[1:] == (1, 28, 28)


def problem_message(folder):
    with pytest.raises(DataError) as caught:
        read_image_folder(folder, folder / "labels.csv")
    return str(caught.value)


def test_folder_reports_unreadable_file(tmp_path, xray_arrays):
    images, labels = xray_arrays
    make_folder(tmp_path, images[:3], labels[:3], ".png")
    (tmp_path / "xray01.png").write_bytes(b"not an image")
    message = problem_message(tmp_path)
    assert "has 1 problem(s)" in message
    assert "xray01.png: unreadable" in message


def test_folder_reports_corrupt_dicom(tmp_path, xray_arrays):
    images, labels = xray_arrays
    make_folder(tmp_path, images[:2], labels[:2], ".dcm")
    (tmp_path / "xray00.dcm").write_bytes(b"DICM" * 10)
    assert "xray00.dcm: unreadable" in problem_message(tmp_path)


def test_folder_reports_image_without_label(tmp_path, xray_arrays):
    images, labels = xray_arrays
    make_folder(tmp_path, images[:2], labels[:2], ".png")
    write_png(tmp_path / "extra.png", images[5])
    assert "extra.png: no label in labels.csv" in problem_message(tmp_path)


def test_folder_reports_label_without_file(tmp_path, xray_arrays):
    images, labels = xray_arrays
    rows = make_folder(tmp_path, images[:2], labels[:2], ".nii.gz")
    write_labels(tmp_path / "labels.csv", [*rows, ("ghost.nii.gz", 1)])
    message = problem_message(tmp_path)
    assert "ghost.nii.gz: labelled in labels.csv but not found" in message


def test_folder_reports_wrong_size(tmp_path, xray_arrays):
    images, labels = xray_arrays
    make_folder(tmp_path, images[:2], labels[:2], ".dcm")
    write_dicom(tmp_path / "xray01.dcm", np.zeros((32, 30), np.uint8))
    message = problem_message(tmp_path)
    assert "xray01.dcm: image size 32x30, expected 28x28" in message


def test_folder_reports_color_png(tmp_path, xray_arrays):
    images, labels = xray_arrays
    make_folder(tmp_path, images[:2], labels[:2], ".png")
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / "xray00.png")
    assert "xray00.png: expected a single-channel 2D image" in problem_message(tmp_path)


def test_folder_reports_invalid_and_duplicate_labels(tmp_path, xray_arrays):
    images, labels = xray_arrays
    make_folder(tmp_path, images[:2], labels[:2], ".png")
    write_labels(
        tmp_path / "labels.csv",
        [("xray00.png", "2"), ("xray01.png", "1"), ("xray01.png", "0")],
    )
    message = problem_message(tmp_path)
    assert "xray00.png: invalid label '2' on line 2; expected 0 or 1" in message
    assert "xray01.png: labelled twice (line 4)" in message


def test_folder_reports_bad_header(tmp_path, xray_arrays):
    images, labels = xray_arrays
    make_folder(tmp_path, images[:1], labels[:1], ".png")
    (tmp_path / "labels.csv").write_text("file,class\nxray00.png,1\n")
    assert "labels.csv: the header must be 'filename,label'" in problem_message(
        tmp_path
    )


def test_folder_reports_unsupported_type(tmp_path, xray_arrays):
    images, labels = xray_arrays
    rows = make_folder(tmp_path, images[:1], labels[:1], ".png")
    write_labels(tmp_path / "labels.csv", [*rows, ("scan.jpg", 0)])
    assert "scan.jpg: unsupported file type" in problem_message(tmp_path)


def test_folder_collects_all_problems_and_truncates(tmp_path, xray_arrays):
    images, labels = xray_arrays
    rows = make_folder(tmp_path, images[:2], labels[:2], ".png")
    missing = [(f"missing{index:02d}.png", 0) for index in range(25)]
    write_labels(tmp_path / "labels.csv", [*rows, *missing])
    (tmp_path / "xray00.png").write_bytes(b"broken")
    message = problem_message(tmp_path)
    assert "has 26 problem(s)" in message
    assert "missing00.png: labelled in labels.csv but not found" in message
    assert "; and 6 more" in message


def test_folder_problems_write_nothing(tmp_path, xray_arrays):
    images, labels = xray_arrays
    make_folder(tmp_path / "in", images[:2], labels[:2], ".png")
    write_png(tmp_path / "in" / "unlabelled.png", images[4])
    with pytest.raises(DataError, match=r"unlabelled\.png: no label"):
        preprocess_folder_site(
            tmp_path / "in", tmp_path / "in" / "labels.csv", tmp_path / "out", seed=0
        )
    assert not (tmp_path / "out").exists()


def test_folder_reports_missing_labels_file(tmp_path, xray_arrays):
    images, labels = xray_arrays
    make_folder(tmp_path, images[:1], labels[:1], ".png")
    (tmp_path / "labels.csv").unlink()
    message = problem_message(tmp_path)
    assert "labels.csv: labels file not found" in message
    assert "xray00.png: no label in labels.csv" in message
