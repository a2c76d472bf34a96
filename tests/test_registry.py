import json
from pathlib import Path

import pytest

from ovis_data.errors import OvisDataError
from ovis_data.recipes import load_recipe, recipe_path, select_recipe
from ovis_data.registry import load_registry, resolve_root, select

# The dataset table of docs/stages.md, in order: name, meta_file, image_dir, format, stage.
EXPECTED = [
    ("coyo-10m", "coyo-10m.parquet", "coyo_10m", "caption", 1),
    ("llava-pretrain-558k", "llava-pretrain-558k.json", "llava_pretrain", "conversation", 2),
    ("sharegpt4v-pretrain-82k", "sharegpt4v-pretrain-82k.json", "sharegpt4v", "conversation", 2),
    ("allava-caption-laion-4v-485k", "allava-caption-laion-4v-485k.json", "allava_laion", "conversation", 2),
    ("allava-caption-vflan-4v-203k", "allava-caption-vflan-4v-203k.json", "allava_vflan", "conversation", 2),
    ("laion-description-11k", "laion-description-11k.json", "ovis_laion", "conversation", 2),
    ("cc12m-description-1m", "cc12m-description-1m.json", "ovis_cc12m", "conversation", 2),
    ("scienceqa-train-val-17k", "scienceqa-train-val-17k.json", "scienceqa", "conversation", 3),
    ("textvqa-train-35k", "textvqa-train-35k.json", "textvqa", "conversation", 3),
    (
        "allava-instruct-laion-4v-485k",
        "allava-instruct-laion-4v-485k.json",
        "allava_laion",
        "conversation",
        3,
    ),
    (
        "allava-instruct-vflan-4v-203k",
        "allava-instruct-vflan-4v-203k.json",
        "allava_vflan",
        "conversation",
        3,
    ),
    ("arxivqa-100k", "arxivqa-100k.json", "arxivqa", "conversation", 3),
    ("q-instruct-198k", "q-instruct-198k.json", "q_instruct", "conversation", 3),
    ("llava-finetune-665k", "llava-finetune-665k.json", "llava_finetune", "conversation", 3),
    ("geo-177k", "geo-177k.json", "geo", "conversation", 3),
    (
        "lrv-and-chart-instruction-343k",
        "lrv-and-chart-instruction-343k.json",
        "lrv_and_chart",
        "conversation",
        3,
    ),
    ("synthdog-en-ocr-200k", "synthdog-en-ocr-200k.json", "synthdog", "conversation", 3),
    ("allava-evol-instruct-143k", "allava-evol-instruct-143k.json", None, "conversation", 3),
    ("cc12m-qa-387k", "cc12m-qa-387k.json", "ovis_cc12m", "conversation", 3),
]


def test_registry_holds_the_19_datasets_of_the_original():
    reg = load_registry()
    got = [(s.name, s.meta_file, s.image_dir, s.data_format, s.stage) for s in reg.values()]
    assert got == EXPECTED
    assert reg["coyo-10m"].caption_template == "<image>'s caption: "
    assert reg["coyo-10m"].url_source.url_column == "image_url"
    cc = {reg["cc12m-description-1m"].url_source, reg["cc12m-qa-387k"].url_source}
    assert len(cc) == 1, "the two cc12m datasets share one URL list"
    assert all(s.url_source is None for n, s in reg.items() if n not in ("coyo-10m",) and "cc12m" not in n)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"meta_file": "x.json", "image_dir": "x", "data_format": "video", "stage": 2}, "data_format"),
        ({"image_dir": "x", "data_format": "conversation", "stage": 2}, "meta_file"),
        ({"meta_file": "x.json", "image_dir": "x", "data_format": "conversation", "stage": 7}, "stage"),
        (
            {"meta_file": "x.json", "image_dir": "x", "data_format": "conversation", "stage": 2, "imgdir": 1},
            "imgdir",
        ),
        (
            {
                "meta_file": "x.parquet",
                "image_dir": "x",
                "data_format": "caption",
                "stage": 1,
                "caption_template": "no marker",
            },
            "caption_template",
        ),
        (
            {
                "meta_file": "x.parquet",
                "image_dir": None,
                "data_format": "caption",
                "stage": 1,
                "url_source": {"url_list": "u.parquet"},
            },
            "image_dir",
        ),
    ],
)
def test_malformed_entry_names_the_file_and_entry(tmp_path: Path, entry: dict, message: str):
    info = tmp_path / "info.json"
    good = {"meta_file": "g.json", "image_dir": "g", "data_format": "conversation", "stage": 3}
    info.write_text(json.dumps({"good": good, "my-broken-set": entry}))
    with pytest.raises(OvisDataError) as e:
        load_registry(info)
    assert str(info) in str(e.value) and "'my-broken-set'" in str(e.value) and message in str(e.value)


def test_malformed_registry_json_gives_position(tmp_path: Path):
    info = tmp_path / "info.json"
    info.write_text('{\n  "a": {"meta_file": "a.json",,}\n}')
    with pytest.raises(OvisDataError, match=r"line 2 column"):
        load_registry(info)


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(OvisDataError, match="unknown dataset.*coyo-10m"):
        select(load_registry(), ["coyo-11m"])


def test_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OVIS_DATA_ROOT", str(tmp_path))
    assert resolve_root(None) == tmp_path.resolve()
    monkeypatch.delenv("OVIS_DATA_ROOT")
    with pytest.raises(OvisDataError, match="--root"):
        resolve_root(None)
    with pytest.raises(OvisDataError, match="does not exist"):
        resolve_root(tmp_path / "nope")


def test_stage_recipes_follow_the_original():
    reg = load_registry()
    recipes = {s: load_recipe(s, reg) for s in (1, 2, 3)}
    for stage, recipe in recipes.items():
        assert [d.name for d in recipe.datasets] == [n for n, *_, st in EXPECTED if st == stage]
        assert all(d.weight == 1.0 for d in recipe.datasets)
        assert recipe.deepspeed_path().exists()
    assert (recipes[1].max_length, recipes[2].max_length, recipes[3].max_length) == (1024, 2048, 2048)
    assert recipes[1].trainable == ("visual_tokenizer.re_init_layers", "visual_tokenizer.head", "vte")
    assert recipes[2].trainable == ("visual_tokenizer", "vte")
    assert recipes[3].trainable == ("all",)
    assert recipes[1].lr_for("qwen") == 1e-4 and recipes[2].lr_for("llama3") == 1e-4
    assert recipes[3].lr_for("qwen") == 2e-5 and recipes[3].lr_for("llama3") == 1e-5
    assert [r.train["warmup_ratio"] for r in recipes.values()] == [0.1, 0.1, 0.05]
    assert [r.train["global_batch_samples"] for r in recipes.values()] == [8192, 1024, 1024]
    assert [r.deepspeed for r in recipes.values()] == ["zero2.json", "zero3.json", "zero3.json"]
    for r in recipes.values():
        assert (
            r.train["schedule"] == "cosine" and r.train["weight_decay"] == 0.0 and r.train["grad_clip"] == 1.0
        )


def test_recipe_naming_an_unknown_dataset_is_an_error(tmp_path: Path):
    recipe = tmp_path / "stage9.toml"
    recipe.write_text(
        'stage = 3\nmax_length = 2048\ntrainable = ["all"]\ndeepspeed = "zero3.json"\n'
        '[train]\nlr = 1e-5\n[[datasets]]\nname = "not-a-dataset"\n'
    )
    (tmp_path / "zero3.json").write_text("{}")
    with pytest.raises(OvisDataError, match="not-a-dataset"):
        load_recipe(recipe, load_registry())


def _own(tmp_path: Path, datasets: str, top: str = "", deepspeed: str = "zero3.json") -> Path:
    recipe = tmp_path / "my_recipe.toml"
    recipe.write_text(
        f'stage = 4\nmax_length = 256\ntrainable = ["all"]\ndeepspeed = "{deepspeed}"\n{top}'
        f"[train]\nlr = 1e-5\n{datasets}"
    )
    return recipe


def test_own_recipe_mixes_own_and_shipped_datasets_and_finds_its_deepspeed_config(tmp_path: Path):
    info = tmp_path / "my_info.json"
    own = {"meta_file": "mine.jsonl", "image_dir": "mine", "data_format": "caption", "stage": 1}
    moved = {"meta_file": "geo.json", "image_dir": "elsewhere", "data_format": "conversation", "stage": 3}
    info.write_text(json.dumps({"my-captions": own, "geo-177k": moved}))
    datasets = '[[datasets]]\nname = "my-captions"\nweight = 0.5\n[[datasets]]\nname = "geo-177k"\n'
    recipe, registry = select_recipe(None, _own(tmp_path, datasets), info)
    assert recipe.stage == 4
    assert [(m.name, m.weight) for m in recipe.datasets] == [("my-captions", 0.5), ("geo-177k", 1.0)]
    assert registry["geo-177k"].image_dir == "elsewhere"  # the user's entry replaces the shipped one
    assert "coyo-10m" in registry  # the rest of the shipped registry stays
    assert recipe.deepspeed_path() == recipe_path(3).parent / "zero3.json"  # the shipped fallback
    (tmp_path / "zero3.json").write_text('{"zero_optimization": {"stage": 3}}')
    assert recipe.deepspeed_path() == tmp_path / "zero3.json"  # beside the recipe wins
    with pytest.raises(OvisDataError, match="unknown dataset 'my-captions'"):
        select_recipe(None, recipe.path, None)  # without --dataset-info
    with pytest.raises(OvisDataError, match="exclude each other"):
        select_recipe(3, recipe.path, info)
    with pytest.raises(OvisDataError, match="--stage N .* or --recipe FILE"):
        select_recipe(None, None, info)
    assert select_recipe(3, None, info)[0].stage == 3  # --stage N: the shipped recipe, own entries added


GEO = '[[datasets]]\nname = "geo-177k"\n'


@pytest.mark.parametrize(
    ("datasets", "top", "deepspeed", "reason"),
    [
        (GEO, "max_lenght = 9\n", "zero3.json", r"unknown key\(s\) \['max_lenght'\]"),
        (GEO + "wieght = 2\n", "", "zero3.json", r"datasets\[0\]: unknown key\(s\) \['wieght'\]"),
        (GEO + GEO, "", "zero3.json", r"datasets\[1\] \(geo-177k\): listed twice"),
        (GEO + 'caption_template = "<image> "\n', "", "zero3.json", "only applies to caption datasets"),
        ('[[datasets]]\nname = "coyo-10m"\ncaption_template = "x"\n', "", "zero3.json", "one '<image>'"),
        (GEO + "weight = 0\n", "", "zero3.json", r"\(geo-177k\): weight must be a number > 0"),
        (GEO, "", "zero9.json", "'zero9.json' found neither beside the recipe nor shipped"),
        ("", "datasets = []\n", "zero3.json", "datasets must be a non-empty list"),
        (GEO, "stage = 0\n", "zero3.json", "stage must be a positive integer"),
    ],
)
def test_own_recipe_mistakes_name_the_file_and_entry(
    tmp_path: Path, datasets: str, top: str, deepspeed: str, reason: str
):
    recipe = _own(tmp_path, datasets, top, deepspeed)
    if top.startswith("stage"):  # replace, not repeat, the key
        recipe.write_text(recipe.read_text().replace("stage = 4\n", "", 1))
    with pytest.raises(OvisDataError, match=rf"my_recipe\.toml: .*{reason}"):
        load_recipe(recipe, load_registry())
