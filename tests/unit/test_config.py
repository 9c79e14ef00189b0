"""Config loading: YAML + dotted overrides, errors that name the key, the source and what is accepted."""

import pytest
import yaml

from pipeline.config import Config, dump_config, load_config, parse_override
from pipeline.errors import WysiwycError


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_paper_voc_vgg16_lambdas():
    cfg = load_config()
    assert cfg.loss.entropy_regularizer == 1.0
    assert cfg.loss.mask_total_area_regularizer == 0.1
    assert cfg.loss.ncmask_total_area_regularizer == 0.3
    assert (cfg.loss.class_mask_min_area, cfg.loss.class_mask_max_area) == (0.05, 0.3)


def test_yaml_values_then_overrides_apply_in_order(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.001\ndata:\n  image_size: 96\n")
    cfg = load_config(path, ["optim.lr=1e-5", "data.classes=[a, b]", "trainer.use_gpu=true", "data.image_size=64"])
    assert cfg.optim.lr == pytest.approx(1e-5)
    assert cfg.data.classes == ["a", "b"]
    assert cfg.trainer.use_gpu is True
    assert cfg.data.image_size == 64


def test_parse_override_reads_scientific_notation_as_number():
    assert parse_override("optim.lr=3e-4") == (["optim", "lr"], pytest.approx(3e-4))
    assert parse_override("output=s3://bucket/x.y") == (["output"], "s3://bucket/x.y")


def test_an_unquoted_off_turns_mixed_precision_off_in_a_file_and_an_override(tmp_path):
    # YAML 1.1 reads `off` as False: `trainer.cpu_amp=off` was refused ("got False")
    assert load_config(None, ["trainer.cpu_amp=off", "trainer.amp=off"]).trainer.cpu_amp == "off"
    cfg = load_config(write(tmp_path, "trainer:\n  cpu_amp: off\n  amp: off\n"))
    assert (cfg.trainer.cpu_amp, cfg.trainer.amp) == ("off", "off")
    with pytest.raises(WysiwycError, match="'off', 'bf16' or 'auto'"):
        load_config(None, ["trainer.cpu_amp=true"])


def test_unknown_key_names_key_file_and_accepted_keys(tmp_path):
    path = write(tmp_path, "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(WysiwycError) as err:
        load_config(path)
    text = str(err.value)
    assert "optim.learning_rate" in text and str(path) in text
    assert "accepted keys under optim: lr, weight_decay" in text


def test_unknown_override_says_it_came_from_the_command_line():
    with pytest.raises(WysiwycError) as err:
        load_config(None, ["loss.entropy=2"])
    assert "command-line override loss.entropy" in str(err.value)
    assert "entropy_regularizer" in str(err.value)


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, "trainer:\n  epochs: many\n")
    with pytest.raises(WysiwycError) as err:
        load_config(path)
    assert "trainer.epochs" in str(err.value) and "'many'" in str(err.value) and "integer" in str(err.value)


@pytest.mark.parametrize("name", ["../../..", "../escape", "a/b", ".hidden"])
def test_a_run_name_that_is_not_one_folder_name_is_refused(name):
    """trainer.run_name becomes trainer.storage/NAME: no separator, no parent, no leading dot (as sweep.name)."""
    with pytest.raises(WysiwycError) as err:
        load_config(None, [f"trainer.run_name={name}"])
    assert "trainer.run_name" in str(err.value) and "^[A-Za-z0-9][A-Za-z0-9._-]*$" in str(err.value)
    assert load_config(None, ["trainer.run_name=cpu-explainer_v1.2"]).trainer.run_name == "cpu-explainer_v1.2"


def test_literal_error_lists_accepted_values():
    with pytest.raises(WysiwycError) as err:
        load_config(None, ["ingest.on_error=ignore"])
    assert "'skip' or 'fail'" in str(err.value)


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(WysiwycError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(WysiwycError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(WysiwycError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_malformed_override_is_an_error():
    with pytest.raises(WysiwycError, match="key.sub=value"):
        load_config(None, ["optim.lr"])


def test_dump_round_trips_and_hides_secrets(tmp_path):
    cfg = load_config(
        None, ["storage.secret_access_key=TOPSECRET123", "storage.access_key_id=AKIDEXAMPLE", "optim.lr=0.01"]
    )
    assert cfg.storage.options().secret_access_key == "TOPSECRET123"
    text = dump_config(cfg)
    assert "TOPSECRET123" not in text and "AKIDEXAMPLE" not in text
    again = yaml.safe_load(text)
    assert again["optim"]["lr"] == 0.01
    # a dumped config (secrets removed) loads back to the same values
    again["storage"] = {}
    assert Config.model_validate(again).optim.lr == 0.01


def test_a_password_inside_a_uri_is_masked_wherever_the_config_is_recorded():
    """Checkpoints, MLflow params, config.yaml and manifests record public_config / dump_config: a URI's
    user:password is masked there (the user stays, for the reader), the config in memory keeps it."""
    from pipeline.config import public_config

    cfg = load_config(
        None,
        [
            "tracking.uri=http://alice:Hunter2-tracking-pw@mlflow.example:5000",
            "data.train=s3://bucket/train",
            "attribute.input=https://bob:Hunter2-input-pw@images.example/list.txt",
        ],
    )
    assert cfg.tracking.uri == "http://alice:Hunter2-tracking-pw@mlflow.example:5000"
    recorded = public_config(cfg)
    assert recorded["tracking"]["uri"] == "http://alice:***@mlflow.example:5000"
    assert recorded["attribute"]["input"] == "https://bob:***@images.example/list.txt"
    assert recorded["data"]["train"] == "s3://bucket/train"  # nothing else changes
    text = dump_config(cfg)
    assert "Hunter2" not in text and "Hunter2" not in str(recorded)


def test_secret_value_is_not_echoed_in_errors():
    with pytest.raises(WysiwycError) as err:
        load_config(None, ["storage.secret_access_key=[zzsecretzz]"])
    assert "storage.secret_access_key" in str(err.value)
    assert "zzsecretzz" not in str(err.value)


def test_configuration_reference_in_docs_is_generated_from_the_models():
    """docs/configuration.md is what reference_markdown() gives today (regenerate it when a key changes:
    `python -c "from pipeline.config import reference_markdown as r; open('docs/configuration.md','w').write(r())"`)."""
    from pathlib import Path

    from pipeline.config import reference_markdown

    text = reference_markdown()
    assert "| `loss.entropy_regularizer` | float | `1.0` | λ_e" in text
    assert "| `storage.secret_access_key` |" in text and "| `minimum` | dict[str, float] |" in text
    assert (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text() == text
