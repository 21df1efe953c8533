"""Config loading: shipped configs, `--set` overrides, and one clear line per user error.

Fast: nothing here loads a model or a dataset.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedprompt.cli import main
from fedprompt.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def problems(tmp_path: Path, text: str | bytes | None = None, overrides: tuple[str, ...] = ()) -> list[str]:
    """The ConfigError lines for a config text (None: defaults) plus overrides."""
    path = None
    if text is not None:
        path = tmp_path / "config.yaml"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    assert e.value.problems, "a ConfigError must carry at least one line"
    for line in e.value.problems:
        assert "\n" not in line, f"problem is not one line: {line!r}"
    return e.value.problems


def only(lines: list[str]) -> str:
    assert len(lines) == 1, lines
    return lines[0]


# ---- The shipped configs ----


def test_configs_exist():
    assert CONFIGS, f"no configs/*.yaml under {REPO}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path, capsys):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "valid" in err
    assert yaml.safe_load(out) == cfg.to_dict()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_validate_output_round_trips(path, capsys, tmp_path):
    assert main(["validate", str(path), "--set", "train.local_steps=7"]) == 0
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(capsys.readouterr().out, encoding="utf-8")
    again = load_config(resolved)
    assert again.to_dict() == load_config(path, ["train.local_steps=7"]).to_dict()
    assert again.train.local_steps == 7


def test_defaults_and_empty_file(tmp_path):
    assert load_config().to_dict() == Config().to_dict()
    empty = tmp_path / "empty.yaml"
    empty.write_text("# only a comment\n", encoding="utf-8")
    assert load_config(empty).to_dict() == Config().to_dict()


# ---- --set overrides ----


def test_override_types():
    cfg = load_config(
        None,
        [
            "train.local_steps=50",  # int
            "train.lr=0.1",  # float
            "federation.server_lr=1",  # an int widens to a float
            "output.plots=false",  # bool
            "model.double_quant=true",
            "model.name=smollm2-135m",  # str
            "peft.lora_target_modules=q_proj,v_proj",  # comma list
            "data.labels=[a, b]",  # YAML flow list
            "data.template={text} => topic:",
        ],
    )
    assert cfg.train.local_steps == 50 and type(cfg.train.local_steps) is int
    assert cfg.train.lr == 0.1
    assert cfg.federation.server_lr == 1.0 and type(cfg.federation.server_lr) is float
    assert cfg.output.plots is False and cfg.model.double_quant is True
    assert cfg.model.name == "smollm2-135m"
    assert cfg.peft.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.data.labels == ["a", "b"]
    assert cfg.data.template == "{text} => topic:"


def test_override_applies_on_top_of_file_and_last_wins():
    path = REPO / "configs" / "bbc-minilm-prompt.yaml"
    base = load_config(path)
    cfg = load_config(path, ["train.local_steps=5", "train.local_steps=6"])
    assert cfg.train.local_steps == 6
    assert dataclasses.replace(cfg.train, local_steps=base.train.local_steps) == base.train
    assert cfg.model == base.model


def test_override_nested_unknown_key(tmp_path):
    line = only(problems(tmp_path, None, ("model.foo.bar=1",)))
    assert line.startswith("model.foo: unknown key") and "quantization" in line
    line = only(problems(tmp_path, None, ("nosuch.x=1",)))
    assert line.startswith("nosuch: unknown key") and "model" in line and "federation" in line


def test_override_bad_syntax(tmp_path):
    line = only(problems(tmp_path, None, ("train.local_steps",)))
    assert "train.local_steps" in line and "key.path=value" in line


def test_override_whole_section(tmp_path):
    line = only(problems(tmp_path, None, ("model=minilm-l6",)))
    assert "'model=minilm-l6'" in line and "section and a field" in line


# ---- Every error names the field, the bad value and what is allowed ----


def test_unknown_section(tmp_path):
    line = only(problems(tmp_path, "modle:\n  name: minilm-l6\n"))
    assert line.startswith("modle: unknown key")
    assert "allowed keys: model, peft, data, train, federation, privacy, audit, deepspeed" in line


def test_unknown_key_in_section(tmp_path):
    line = only(problems(tmp_path, "train:\n  steps: 5\n"))
    assert line.startswith("train.steps: unknown key")
    assert "allowed keys:" in line and "local_steps" in line and "batch_size" in line


def test_odd_unknown_keys_stay_one_line(tmp_path):
    lines = problems(tmp_path, "model:\n  ? \"two\\nlines\"\n  : 1\n  '': 2\n  3: 4\n")
    assert [x.split(": unknown key")[0] for x in lines] == ["model.'two\\nlines'", "model.''", "model.3"]


def test_section_not_a_mapping(tmp_path):
    line = only(problems(tmp_path, "model: 5\n"))
    assert "model" in line and "5" in line and "mapping" in line


@pytest.mark.parametrize(
    "text, field, value, allowed",
    [
        ("train: {local_steps: many}", "train.local_steps", "'many'", "an integer"),  # str for int
        ("train: {batch_size: true}", "train.batch_size", "True", "an integer"),  # bool for int
        ("train: {batch_size: 1.5}", "train.batch_size", "1.5", "an integer"),  # float for int
        ("model: {name: [a, b]}", "model.name", "['a', 'b']", "a string"),  # list for str
        ("train: {lr: fast}", "train.lr", "'fast'", "a number"),
        ("output: {plots: 1}", "output.plots", "1", "true or false"),
        ("peft: {lora_target_modules: 3}", "peft.lora_target_modules", "3", "a list of a string"),
        ("data: {labels: [a, [b]]}", "data.labels[1]", "['b']", "a string"),
    ],
)
def test_wrong_type(tmp_path, text, field, value, allowed):
    line = only(problems(tmp_path, text))
    assert line.startswith(f"{field}: {value} is not {allowed}"), line


@pytest.mark.parametrize(
    "text, field, value, allowed",
    [
        ("model: {quantization: 3bit}", "model.quantization", "'3bit'", "'none', '8bit', '4bit'"),
        ("peft: {method: adapter}", "peft.method", "'adapter'", "'prompt', 'prefix', 'lora'"),
        ("train: {schedule: 1}", "train.schedule", "1", "'constant', 'linear', 'cosine'"),
    ],
)
def test_not_in_literal(tmp_path, text, field, value, allowed):
    line = only(problems(tmp_path, text))
    assert line.startswith(f"{field}: {value} is not allowed; expected one of {allowed}"), line


@pytest.mark.parametrize(
    "override, field, value, allowed",
    [
        ("train.lr=0", "train.lr", "0.0", "(0, 10]"),
        ("data.test_fraction=1.5", "data.test_fraction", "1.5", "(0, 1)"),
        ("deepspeed.zero_stage=5", "deepspeed.zero_stage", "5", "0, 1, 2 or 3"),
        ("model.max_length=4", "model.max_length", "4", "8..8192"),
        ("train.local_steps=0", "train.local_steps", "0", ">= 1"),
        ("data.dataset=imdb", "data.dataset", "'imdb'", "'bbc', 'tweets', 'file'"),
    ],
)
def test_out_of_range(tmp_path, override, field, value, allowed):
    line = only(problems(tmp_path, None, (override,)))
    assert line.startswith(f"{field}: {value}"), line
    assert allowed in line, line


@pytest.mark.parametrize(
    "text, field",
    [
        ("train: {lr: .nan}", "train.lr"),
        ("train: {weight_decay: .inf}", "train.weight_decay"),
        ("data: {alpha: " + "9" * 400 + "}", "data.alpha"),  # too large for a float
    ],
)
def test_non_finite_numbers(tmp_path, text, field):
    line = only(problems(tmp_path, text))
    assert line.startswith(f"{field}: ") and "finite number" in line


def test_several_errors_reported_together(tmp_path):
    lines = problems(tmp_path, "bogus: 1\ntrain: {local_steps: many, steps: 1}\nmodel: {quantization: 3bit}\n")
    assert len(lines) == 4, lines
    assert any(x.startswith("bogus: unknown key") for x in lines)
    assert any(x.startswith("train.steps: unknown key") for x in lines)
    assert any(x.startswith("train.local_steps: 'many'") for x in lines)
    assert any(x.startswith("model.quantization: '3bit'") for x in lines)
    # range checks are collected too (they run once the types are right)
    lines = problems(tmp_path, None, ("train.lr=0", "data.test_fraction=1.5", "deepspeed.zero_stage=5"))
    assert [x.split(":")[0] for x in lines] == ["data.test_fraction", "train.lr", "deepspeed.zero_stage"]


def test_missing_file(tmp_path):
    line = only(_load_error(tmp_path / "nope.yaml"))
    assert "nope.yaml" in line and "does not exist" in line


def test_directory_is_not_a_config(tmp_path):
    line = only(_load_error(tmp_path))
    assert str(tmp_path) in line


def _load_error(path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return e.value.problems


@pytest.mark.parametrize("text", ["model: [unclosed\n", "a: b: c\n", "model:\n\tname: x\n", "x: !!python/object:os.system {}\n"])
def test_not_yaml(tmp_path, text):
    line = only(problems(tmp_path, text))
    assert "config.yaml" in line and "is not valid YAML" in line


def test_special_character_is_one_line(tmp_path):
    line = only(problems(tmp_path, "model: {name: \x00}\n"))
    assert "is not valid YAML" in line


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("[]\n", "list"), ("0\n", "int"), ("just text\n", "str"), ("false\n", "bool")])
def test_yaml_not_a_mapping(tmp_path, text, kind):
    line = only(problems(tmp_path, text))
    assert "expected a mapping of sections" in line and f"got {kind}" in line


def test_invalid_utf8(tmp_path):
    line = only(problems(tmp_path, b"model:\n  name: caf\xe9\n"))
    assert "config.yaml" in line and "not UTF-8" in line


def test_deeply_nested(tmp_path):
    line = only(problems(tmp_path, "model: {name: " + "[" * 5000 + "]" * 5000 + "}\n"))
    assert "config.yaml" in line
    # an override value that does not parse as YAML is taken as the literal string
    assert load_config(None, ["model.name=" + "[" * 5000]).model.name == "[" * 5000


def test_privacy_configs_whose_guarantee_would_be_false_are_refused(tmp_path):
    assert load_config(None, ["privacy.mode=sample"]).privacy.mode == "sample"
    line = only(problems(tmp_path, "privacy: {mode: sample}\ndeepspeed: {zero_stage: 2}\n"))
    assert line.startswith("deepspeed.zero_stage: 2 with privacy.mode 'sample'") and "zero_stage 0" in line
    line = only(problems(tmp_path, "privacy: {mode: both}\ndeepspeed: {precision: bf16}\n"))
    assert line.startswith("deepspeed.precision: 'bf16'") and "fp32" in line
    line = only(problems(tmp_path, "privacy: {mode: sample}\ndeepspeed: {gradient_accumulation_steps: 4}\n"))
    assert "Poisson" in line and "train.batch_size" in line
    line = only(problems(tmp_path, "privacy: {mode: sample, noise_multiplier: 0}\n"))
    assert line.startswith("privacy.noise_multiplier: 0") and "no DP guarantee" in line
    line = only(problems(tmp_path, "privacy: {mode: client}\nfederation: {strategy: fedadam}\n"))
    assert line.startswith("federation.strategy: 'fedadam' with privacy.mode 'client'") and "fedavg" in line
    line = only(problems(tmp_path, "privacy: {mode: client, delta: 0.2}\n"))
    assert line.startswith("privacy.delta: 0.2") and "num_clients" in line


def test_cross_field_checks(tmp_path):
    line = only(problems(tmp_path, None, ("data.dataset=file",)))
    assert line.startswith("data.path: required")
    line = only(problems(tmp_path, None, ("data.template=no placeholder",)))
    assert line.startswith("data.template: 'no placeholder'") and "{text}" in line


# ---- Property: arbitrary YAML either loads or raises ConfigError, nothing else ----

SECTIONS = [f.name for f in dataclasses.fields(Config)]
FIELDS = sorted({f.name for s in dataclasses.fields(Config) for f in dataclasses.fields(s.default_factory())})

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["none", "4bit", "prompt", "lora", "file", "{text}", "q_proj,v_proj", "0", ""]),
)
keys = st.one_of(st.sampled_from(SECTIONS + FIELDS), st.text(max_size=8), st.integers(), st.booleans(), st.none())
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=12)
sections = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), junk, max_size=5)
documents = st.one_of(st.dictionaries(st.sampled_from(SECTIONS) | keys, sections | junk, max_size=6), junk)
texts = st.one_of(documents.map(lambda d: yaml.safe_dump(d, allow_unicode=True)), st.text(max_size=80))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("property") / "config.yaml"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts)
def test_any_yaml_loads_or_raises_config_error(scratch, text):
    scratch.write_text(text, encoding="utf-8")
    try:
        cfg = load_config(scratch)
    except ConfigError as e:
        assert e.problems and all(isinstance(x, str) and x and "\n" not in x for x in e.problems)
        return
    assert isinstance(cfg, Config)
    # whatever loads also survives its own resolved YAML
    scratch.write_text(cfg.to_yaml(), encoding="utf-8")
    assert load_config(scratch).to_dict() == cfg.to_dict()


def test_federation_checks_are_collected_and_named():
    with pytest.raises(ConfigError) as e:
        load_config(
            None,
            [
                "federation.num_clients=3",
                "federation.min_clients=5",
                "federation.trim_fraction=0.5",
                "federation.fraction_evaluate=1.5",
                "federation.local_steps=-1",
                "federation.workers=0",
            ],
        )
    text = "\n".join(e.value.problems)
    for needle in (
        "federation.min_clients: 5 exceeds federation.num_clients (3)",
        "federation.trim_fraction: 0.5",
        "federation.fraction_evaluate: 1.5",
        "federation.local_steps: -1",
        "federation.workers: 0",
    ):
        assert needle in text
    cfg = load_config(None, ["train.local_steps=30"])
    assert cfg.round_steps == 30 and load_config(None, ["federation.local_steps=7"]).round_steps == 7


def test_the_inprocess_engine_is_one_worker():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["federation.engine=inprocess", "federation.workers=2"])
    assert "federation.engine inprocess runs one worker" in str(e.value) and "federation.workers" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["federation.engine=ray"])
    assert "federation.engine" in str(e.value) and "inprocess" in str(e.value)
    assert load_config(None, ["federation.engine=inprocess"]).federation.engine == "inprocess"
