import os
import subprocess
import sys

import pytest

import configurator
from configurator import UserError
from conftest import ROOT


def settings():
    return {"n_layer": 4, "learning_rate": 1e-3, "compile": False, "device": "auto", "MAX": 3, "_private": 1}


def test_overrides_are_parsed_as_literals_of_the_default_type():
    s = settings()
    changed = configurator.configure(s, ["--n_layer=6", "--learning_rate=3e-4", "--compile=True", "--device=cpu"])
    assert s["n_layer"] == 6 and s["learning_rate"] == 3e-4 and s["compile"] is True and s["device"] == "cpu"
    assert changed == {"n_layer", "learning_rate", "compile", "device"}


def test_an_int_may_stand_for_a_float():
    s = settings()
    configurator.configure(s, ["--learning_rate=1"])
    assert s["learning_rate"] == 1.0 and isinstance(s["learning_rate"], float)


@pytest.mark.parametrize("arg", ["--n_layer=6.5", "--n_layer=True", "--learning_rate=True", "--compile=1",
                                 "--learning_rate='fast'"])
def test_a_value_of_the_wrong_type_is_an_error(arg):
    with pytest.raises(UserError, match="--.* must be"):
        configurator.configure(settings(), [arg])


def test_an_unknown_key_is_an_error_that_lists_the_known_keys():
    with pytest.raises(UserError) as e:
        configurator.configure(settings(), ["--n_layers=6"])
    message = str(e.value)
    assert "unknown setting --n_layers" in message and "did you mean --n_layer?" in message
    assert "compile, device, learning_rate, n_layer" in message
    assert "MAX" not in message and "_private" not in message  # constants and private names are not settings


@pytest.mark.parametrize("arg", ["--n_layer=six", "--learning_rate=1e-3x", "--n_layer="])
def test_a_bad_literal_is_an_error(arg):
    with pytest.raises(UserError, match="is not a Python literal"):
        configurator.configure(settings(), [arg])


def test_a_flag_without_a_value_is_an_error():
    with pytest.raises(UserError, match="needs a value"):
        configurator.configure(settings(), ["--n_layer"])


def test_a_bool_setting_alone_switches_it_on():
    s = settings()
    assert configurator.configure(s, ["--compile"]) == {"compile"} and s["compile"] is True


def test_a_config_file_of_assignments_applies_before_later_flags(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("# a run\nn_layer = 8\nlearning_rate = 2\n", encoding="utf-8")
    s = settings()
    configurator.configure(s, [str(path), "--n_layer=2"])
    assert s["n_layer"] == 2 and s["learning_rate"] == 2.0


@pytest.mark.parametrize("body, message", [
    ("import os\n", "only plain `key = value`"),
    ("n_layer = 2 + x\n", "must be a literal"),
    ("n_layers = 2\n", "unknown setting --n_layers"),
    ("n_layer = 'deep'\n", "must be int"),
    ("n_layer = (\n", "not valid Python"),
])
def test_a_bad_config_file_is_an_error(tmp_path, body, message):
    path = tmp_path / "cfg.py"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        configurator.configure(settings(), [str(path)])


def test_a_missing_config_file_is_an_error():
    with pytest.raises(UserError, match="config file nope.py not found"):
        configurator.configure(settings(), ["nope.py"])


def test_unavailable_devices_are_refused():
    import torch

    assert configurator.pick_device("cpu") == "cpu"
    assert configurator.pick_device("auto") in ("cuda", "mps", "cpu")
    with pytest.raises(UserError, match="not a device"):
        configurator.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            configurator.pick_device("cuda")


def test_cuda_devices_are_pinned_by_index_and_checked(monkeypatch):
    # Pretend to have two GPUs: plain "cuda" must not call set_device (it takes an index only), cuda:1 pins GPU 1,
    # and cuda:2 is a clear error, not a CUDA assert.
    import torch

    pinned = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", pinned.append)
    assert configurator.pick_device("cuda") == "cuda" and pinned == []
    assert configurator.pick_device("cuda:1") == "cuda:1" and pinned == [1]
    with pytest.raises(UserError, match="has 2 CUDA GPU"):
        configurator.pick_device("cuda:2")


def test_a_user_error_in_library_code_leaves_an_interactive_python_running(tmp_path):
    lines = ["import checkpoint, prepare, tokenizer",
             "checkpoint.load_checkpoint('missing.pt')",
             "tokenizer.CharTokenizer.train('ab').decode([7])",
             "prepare.read_meta('nowhere')",
             "print('still', 'here')"]
    result = subprocess.run([sys.executable, "-i", "-q"], input="\n".join(lines) + "\n", cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert "still here" in result.stdout, result.stderr  # SystemExit would have ended the interpreter
    assert result.stderr.count("configurator.UserError: ") == 3, result.stderr
    assert "no checkpoint at missing.pt" in result.stderr and "token id 7 is not in this vocabulary" in result.stderr
    assert not issubclass(UserError, SystemExit)


def test_a_script_turns_a_user_error_into_one_line_and_exit_code_1():
    @configurator.script
    def main(args):
        raise UserError(f"--n_layer={args[0]} must be at least 1")

    with pytest.raises(SystemExit) as e:
        main(["0"])
    assert e.value.code == "error: --n_layer=0 must be at least 1"  # printed to stderr, exit status 1


def test_a_script_ends_a_ctrl_c_it_does_not_handle_with_exit_code_130_and_no_traceback():
    @configurator.script
    def main(args):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 130 and e.value.__suppress_context__
