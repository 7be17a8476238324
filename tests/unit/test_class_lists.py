"""The benchmarks' default class lists are the paper's (the SCLIP / ClearCLIP / ProxyCLIP files),
the curated lists stay selectable, and every result and table row names the list it used."""
import json

import pytest

from jobs import evaluate
from pipeline.config import parse_config
from pipeline.evaluate.datasets import DATASETS, class_source, display_names, get_dataset, load_class_lines
from pipeline.evaluate.evaluator import EvalConfig
from pipeline.evaluate.tables import build_tables
from spar.text import parse_class_lines
from tests.segdata import make_voc

# The first synonym of every class, copied from SCLIP's configs/cls_<name>.txt (wangf3014/SCLIP,
# commit 57fa9aa7448d476b237547a16a11af4e6c3f50ea). Typed out here, not read from the packaged
# files, so an edit to a packaged list fails this test.
VOC20 = ["aeroplane", "bicycle", "bird", "ship", "bottle", "bus", "car", "cat", "chair", "cow", "table", "dog",
         "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "television monitor"]
CONTEXT59 = ["aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
             "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
             "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
             "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
             "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
             "water", "window", "wood"]
PAPER_FIRST_SYNONYMS = {
    "voc21": ["sky", *VOC20],  # the background line lists what VOC leaves unlabelled, sky first
    "voc20": VOC20,
    "context60": ["background", *CONTEXT59],
    "context59": CONTEXT59,
    "cityscapes": ["road", "sidewalk", "building", "wall", "fence", "pole", "trafficlight", "trafficsign", "vegetation",
                   "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"],
    "ade20k": [
        "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
        "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
        "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
        "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
        "chestofdrawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
        "stairs", "runway", "case", "pooltable", "pillow", "screendoor", "stairway", "river", "bridge", "bookcase",
        "blind", "coffeetable", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
        "kitchenisland", "computer", "swivelchair", "boat", "bar", "arcademachine", "hovel", "bus", "towel", "light",
        "truck", "tower", "chandelier", "awning", "streetlight", "booth", "televisionreceiver", "airplane",
        "dirttrack", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
        "stage", "van", "ship", "fountain", "conveyerbelt", "canopy", "washer", "plaything", "swimmingpool", "stool",
        "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
        "tradename", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
        "hood", "sconce", "vase", "trafficlight", "tray", "ashcan", "fan", "pier", "crtscreen", "plate", "monitor",
        "bulletinboard", "shower", "radiator", "glass", "clock", "flag"],
}
SIZES = {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "cityscapes": 19, "ade20k": 150}


@pytest.mark.parametrize("name", list(SIZES))
def test_default_list_is_the_papers(name):
    classes = parse_class_lines(load_class_lines(name))
    assert len(classes) == SIZES[name] == DATASETS[name].num_classes == len(PAPER_FIRST_SYNONYMS[name])
    assert [c[0] for c in classes] == PAPER_FIRST_SYNONYMS[name]
    assert load_class_lines(f"paper:{name}") == load_class_lines(name)


def test_paper_lists_keep_the_reference_synonyms():
    voc21 = parse_class_lines(load_class_lines("voc21"))
    assert voc21[0] == ["sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk",
                        "bed", "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf",
                        "curtain", "stair", "floor", "hill", "rail", "fence"]
    assert voc21[15] == ["person", "person in shirt", "person in jeans", "person in dress", "person in sweater",
                         "person in skirt", "person in jacket"]
    assert voc21[20] == ["television monitor", "tv monitor", "monitor", "television", "screen"]
    assert parse_class_lines(load_class_lines("voc20")) == voc21[1:]
    # every other paper list has one name per class
    for name in ("context60", "context59", "cityscapes", "ade20k"):
        assert all(len(c) == 1 for c in parse_class_lines(load_class_lines(name))), name


@pytest.mark.parametrize("name", list(SIZES))
def test_results_call_a_background_background_and_every_other_class_by_its_first_synonym(name):
    for source in (name, f"curated:{name}"):
        first = [c[0] for c in parse_class_lines(load_class_lines(source))]
        shown = display_names(get_dataset(name), first)
        if name in ("voc21", "context60"):  # label 0 is the dataset's background, whatever its prompts say
            assert shown == ("background", *first[1:]), source
        else:
            assert shown == tuple(first), source
    assert display_names(None, ["sky", "cat"]) == ("sky", "cat")  # a user's classes, no dataset: as given


@pytest.mark.parametrize("name", list(SIZES))
def test_curated_lists_stay_selectable_and_differ(name):
    curated = parse_class_lines(load_class_lines(f"curated:{name}"))
    assert len(curated) == DATASETS[name].num_classes
    assert curated != parse_class_lines(load_class_lines(name))


def test_evaluation_config_picks_a_list(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["dataset=voc21", "root=/data/voc", "features=single"]
    assert class_source("voc21", parse_config(EvalConfig, base).classes) == "paper:voc21"
    for value in ("paper", "curated"):  # list names are not turned into paths
        cfg = parse_config(EvalConfig, [*base, f"classes={value}"])
        assert cfg.classes == value and class_source("voc21", cfg.classes) == f"{value}:voc21"
    cfg = parse_config(EvalConfig, [*base, "classes=mine.txt"])
    assert class_source("VOC21", cfg.classes) == f"{tmp_path}/mine.txt"


def _result(dataset: str, classes: str | None, miou: float = 50.0) -> dict:
    r = {"dataset": dataset, "label": "single", "mode": "single", "backbone": "maskclip", "miou": miou,
         "images": 3, "images_listed": 3}
    return r if classes is None else {**r, "classes": classes}


def test_table_rows_name_their_class_lists():
    tables = build_tables([_result("voc21", "paper:voc21"), _result("ade20k", "paper:ade20k")])
    row = tables["json"]["rows"][0]
    assert row["classes"] == {"voc21": "paper:voc21", "ade20k": "paper:ade20k"}
    assert "| mean | paper | classes |" in tables["markdown"]
    assert tables["markdown"].split("| maskclip | single pass |")[1].split("\n")[0].endswith("| paper |")
    mixed = build_tables([_result("voc21", "curated:voc21"), _result("ade20k", "s3://b/mine.txt"),
                          _result("voc20", None)])
    line = mixed["markdown"].split("| maskclip | single pass |")[1].split("\n")[0]
    assert line.endswith("| VOC21: curated; VOC20: unrecorded; ADE20K: s3://b/mine.txt |")


def test_results_and_table_record_the_list_a_run_used(tmp_path):
    voc = tmp_path / "voc"
    make_voc(voc, [(48, 64), (40, 56)])
    out = tmp_path / "eval"
    common = [f"root={voc}", "features=single", f"output={out}", "backbone=maskclip-test", "pretrained=null",
              "scale=[96,64]"]
    evaluate.main(["dataset=voc21", *common])
    evaluate.main(["dataset=voc20", "classes=curated", *common])
    r = json.loads((out / "maskclip-test/voc21/single.json").read_text())
    assert r["classes"] == "paper:voc21" and "ship" in r["iou"]  # per-class IoU under the paper list's names
    assert list(r["iou"])[0] == "background" and "sky" not in r["iou"]  # not the background's first prompt
    r = json.loads((out / "maskclip-test/voc20/single.json").read_text())
    assert r["classes"] == "curated:voc20" and "boat" in r["iou"] and "ship" not in r["iou"]
    row = json.loads((out / "table.json").read_text())["rows"][0]
    assert row["classes"] == {"voc21": "paper:voc21", "voc20": "curated:voc20"}
    assert "| VOC21: paper; VOC20: curated |" in (out / "table.md").read_text()
