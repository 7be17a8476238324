"""Benchmark readers on tiny trees in their real layouts: listing, label mapping, clear errors."""
import numpy as np
import pytest
from PIL import Image

from pipeline.evaluate.datasets import (
    DATASETS, DatasetError, get_dataset, list_samples, load_class_lines, load_sample)
from spar.text import parse_class_lines
from tests.segdata import make_ade, make_cityscapes, make_voc

SIZES = [(60, 80), (75, 50)]


def reduce_zero(raw):
    """mmseg's reduce_zero_label, written out."""
    out = raw.astype(np.int64) - 1
    out[raw == 0] = 255
    out[raw == 255] = 255
    return out.astype(np.uint8)


# ------------------------------------------------------------------------------ class files

@pytest.mark.parametrize("class_list", ["paper", "curated"])
@pytest.mark.parametrize("name,count", [("voc21", 21), ("voc20", 20), ("context60", 60), ("context59", 59),
                                        ("cityscapes", 19), ("ade20k", 150)])
def test_class_files_have_the_right_counts(name, count, class_list):
    classes = parse_class_lines(load_class_lines(f"{class_list}:{name}"))
    assert len(classes) == count == get_dataset(name).num_classes
    # a synonym in two classes would make the two classes tie on it
    names = [s.lower() for c in classes for s in c]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("class_list", ["paper", "curated"])
def test_without_background_files_are_the_with_background_files_minus_line_zero(class_list):
    def lines(name):
        return load_class_lines(f"{class_list}:{name}")

    assert lines("voc20") == lines("voc21")[1:]
    assert lines("context59") == lines("context60")[1:]
    # the paper's VOC background line names what VOC leaves unlabelled, sky first
    assert parse_class_lines(lines("voc21"))[0][0] == {"paper": "sky", "curated": "background"}[class_list]
    assert parse_class_lines(lines("context60"))[0][0] == "background"
    assert parse_class_lines(lines("cityscapes"))[0][0] == "road"
    ade = parse_class_lines(lines("ade20k"))
    assert ade[0][0] == "wall" and ade[-1][0] == "flag" and ade[12][0] == "person"


def test_registry_holds_the_benchmark_settings():
    voc21, ctx60, city = get_dataset("voc21"), get_dataset("context60"), get_dataset("cityscapes")
    assert (voc21.logit_scale, voc21.prob_thd, voc21.area_thd) == (65, 0.1, 0.1)
    assert (ctx60.logit_scale, ctx60.prob_thd, ctx60.area_thd) == (50, 0.1, None)
    assert city.scale == (2048, 1024) and all(DATASETS[d].scale == (2048, 672) for d in DATASETS if d != "cityscapes")
    assert all(DATASETS[d].logit_scale == 40 for d in ("voc20", "context59", "cityscapes", "ade20k"))
    assert {d for d, s in DATASETS.items() if s.reduce_zero_label} == {"voc20", "context59", "ade20k"}
    with pytest.raises(DatasetError, match="known"):
        get_dataset("coco")


# --------------------------------------------------------------------------------- readers

@pytest.mark.parametrize("name,context", [("voc21", False), ("voc20", False), ("context60", True), ("context59", True)])
def test_voc_and_context_readers(tmp_path, name, context):
    raw = make_voc(tmp_path, SIZES, context=context)
    spec = get_dataset(name)
    samples = list_samples(spec, str(tmp_path))
    assert [s.key for s in samples] == sorted(raw)  # the split file, not every JPEG in the folder
    for s in samples:
        image, label = load_sample(spec, s)
        assert image.dtype == np.uint8 and image.shape == (*raw[s.key].shape, 3)
        expected = reduce_zero(raw[s.key]) if spec.reduce_zero_label else raw[s.key]
        assert np.array_equal(label, expected)
    assert (label == 255).any() and label[label != 255].max() == spec.num_classes - 1


def test_voc_root_may_be_any_level_of_the_tree(tmp_path):
    make_voc(tmp_path, SIZES)
    spec = get_dataset("voc21")
    keys = [s.key for s in list_samples(spec, str(tmp_path))]
    assert [s.key for s in list_samples(spec, str(tmp_path / "VOCdevkit"))] == keys
    assert [s.key for s in list_samples(spec, str(tmp_path / "VOCdevkit" / "VOC2012"))] == keys
    assert [s.key for s in list_samples(spec, f"file://{tmp_path}")] == keys


@pytest.mark.parametrize("train_ids", [False, True])
def test_cityscapes_reader_maps_label_ids_to_train_ids(tmp_path, train_ids):
    raw = make_cityscapes(tmp_path, {"frankfurt": [(48, 96)], "lindau": [(40, 80), (48, 64)]}, train_ids=train_ids)
    spec = get_dataset("cityscapes")
    samples = list_samples(spec, str(tmp_path))
    assert [s.key for s in samples] == sorted(raw)
    for s in samples:
        _, label = load_sample(spec, s)
        r = raw[s.key]
        if train_ids:
            assert np.array_equal(label, r)
        else:  # road 7 -> 0, car 26 -> 13, bicycle 33 -> 18, person 24 -> 11; unlabeled 0 / static 4 ignored
            expected = np.select([r == 7, r == 26, r == 33, r == 24], [0, 13, 18, 11], 255)
            assert np.array_equal(label, expected)


def test_ade_reader_drops_the_zero_label(tmp_path):
    raw = make_ade(tmp_path, SIZES + [(33, 90)])
    spec = get_dataset("ade20k")
    samples = list_samples(spec, str(tmp_path))
    assert len(samples) == 3 and list_samples(spec, str(tmp_path / "ADEChallengeData2016")) == samples
    for s in samples:
        _, label = load_sample(spec, s)
        assert np.array_equal(label, reduce_zero(raw[s.key]))  # "other" 0 -> 255, 150 -> 149, 1 -> 0
    assert {0, 149, 255} <= set(np.unique(label).tolist())


# ---------------------------------------------------------------------------------- errors

def test_unknown_tree_says_what_layout_was_expected(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(DatasetError, match=r"(?s)found no ImageSets/Segmentation/val.txt.*SegmentationClass/<id>.png"):
        list_samples("voc21", str(tmp_path / "random"))
    with pytest.raises(DatasetError, match=r"(?s)gtFine.*leftImg8bit/<split>"):
        list_samples("cityscapes", str(tmp_path / "random"))
    with pytest.raises(DatasetError, match="does not exist"):
        list_samples("ade20k", str(tmp_path / "nowhere"))


def test_missing_files_are_named(tmp_path):
    raw = make_voc(tmp_path, SIZES)
    gone = sorted(raw)[1]
    (tmp_path / "VOCdevkit/VOC2012/SegmentationClass" / f"{gone}.png").unlink()
    with pytest.raises(DatasetError, match=f"1 files of the split are missing, e.g. {gone} \\(label\\)"):
        list_samples("voc21", str(tmp_path))
    make_cityscapes(tmp_path / "city", {"ulm": [(40, 40)]})
    for f in (tmp_path / "city" / "gtFine").rglob("*_labelIds.png"):
        f.unlink()
    with pytest.raises(DatasetError, match="label"):
        list_samples("cityscapes", str(tmp_path / "city"))


def test_malformed_labels_are_refused(tmp_path):
    raw = make_ade(tmp_path, SIZES)
    spec = get_dataset("ade20k")
    samples = list_samples(spec, str(tmp_path))
    ann = tmp_path / "ADEChallengeData2016/annotations/validation"
    # colour-coded labels (a common mix-up)
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(ann / f"{samples[0].key}.png")
    with pytest.raises(DatasetError, match="colour-coded"):
        load_sample(spec, samples[0])
    # a label beyond the class count (e.g. the full 459-class Context annotation in the wrong place)
    bad = raw[samples[1].key].copy()
    bad[0, 0] = 200
    Image.fromarray(bad).save(ann / f"{samples[1].key}.png")
    with pytest.raises(DatasetError, match="labels up to 199"):
        load_sample(spec, samples[1])
    # image and label of different sizes
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(ann / f"{samples[1].key}.png")
    with pytest.raises(DatasetError, match="differ in size"):
        load_sample(spec, samples[1])
