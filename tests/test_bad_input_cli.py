"""Broken checkpoints and bad flag values: one line that names the file or the flag's range, exit status 2."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, model_dir
from model import CheckpointError, DeviceUnavailableError, load_model


# ---- broken checkpoints, each a copy of a golden tiny model with one thing wrong ----------------------------------
def _edit_config(path, change):
    config_file = os.path.join(path, "config.json")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    change(config)
    with open(config_file, "w", encoding="utf-8") as f:
        json.dump(config, f)


def _overwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


# name -> (golden model, how to break it, the file the message must name ("": the directory), a phrase it must hold)
BROKEN = {
    "safetensors_truncated_in_header": ("chatglm2-tiny", lambda d: _truncate(f"{d}/model.safetensors", 1000),
                                        "model.safetensors", "truncated"),
    "safetensors_header_length_garbage": ("chatglm2-tiny", lambda d: _overwrite(f"{d}/model.safetensors", 0, b"\xff" * 8),
                                          "model.safetensors", "corrupt"),
    "safetensors_header_not_json": ("chatglm2-tiny", lambda d: _overwrite(f"{d}/model.safetensors", 8, b"\x00" * 16),
                                    "model.safetensors", "corrupt"),
    "safetensors_shard_truncated_in_data": (
        "chatglm3-tiny", lambda d: _truncate(f"{d}/model-00002-of-00002.safetensors", 300_000),
        "model-00002-of-00002.safetensors", "truncated"),
    "bin_shard_truncated": ("chatglm1-tiny", lambda d: _truncate(f"{d}/pytorch_model-00001-of-00002.bin", 5000),
                            "pytorch_model-00001-of-00002.bin", "truncated"),
    "bin_not_a_zip": ("chatglm2-tiny-int4", lambda d: _overwrite(f"{d}/pytorch_model.bin", 0, b"garbage" * 100),
                      "pytorch_model.bin", "corrupt"),
    "index_not_json": ("chatglm3-tiny", lambda d: _overwrite(f"{d}/model.safetensors.index.json", 0, b"{{{"),
                       "model.safetensors.index.json", "not valid JSON"),
    "shard_missing": ("chatglm3-tiny", lambda d: os.remove(f"{d}/model-00001-of-00002.safetensors"),
                      "model.safetensors.index.json", "model-00001-of-00002.safetensors"),
    "config_not_json": ("chatglm2-tiny", lambda d: open(f"{d}/config.json", "w").write("{not json"),
                        "config.json", "not valid JSON"),
    "config_a_list": ("chatglm2-tiny", lambda d: open(f"{d}/config.json", "w").write("[1, 2]"),
                      "config.json", "not an object"),
    "config_without_hidden_size": ("chatglm2-tiny", lambda d: _edit_config(d, lambda c: c.pop("hidden_size")),
                                   "config.json", "hidden_size"),
    "config_without_padded_vocab_size": ("chatglm3-tiny",
                                         lambda d: _edit_config(d, lambda c: c.pop("padded_vocab_size")),
                                         "config.json", "padded_vocab_size"),
    "v1_config_without_inner_hidden_size": ("chatglm1-tiny",
                                            lambda d: _edit_config(d, lambda c: c.pop("inner_hidden_size")),
                                            "config.json", "inner_hidden_size"),
    "config_num_layers_a_string": ("chatglm2-tiny", lambda d: _edit_config(d, lambda c: c.update(num_layers="2")),
                                   "config.json", "num_layers"),
    "config_unsupported_flag": ("chatglm2-tiny", lambda d: _edit_config(d, lambda c: c.update(rmsnorm=False)),
                                "config.json", "rmsnorm"),
    "hidden_size_not_the_weights": ("chatglm2-tiny", lambda d: _edit_config(d, lambda c: c.update(hidden_size=128)),
                                    "model.safetensors", "transformer.embedding.word_embeddings.weight"),
    "v1_hidden_size_not_the_weights": ("chatglm1-tiny",
                                       lambda d: _edit_config(d, lambda c: c.update(inner_hidden_size=256)),
                                       "pytorch_model-0000", "dense_4h_to_h.weight"),
    "tokenizer_model_missing": ("chatglm2-tiny", lambda d: os.remove(f"{d}/tokenizer.model"),
                                "", "has no tokenizer.model"),
    "tokenizer_model_corrupt": ("chatglm3-tiny", lambda d: _truncate(f"{d}/tokenizer.model", 100),
                                "tokenizer.model", "SentencePiece"),
    "ice_text_model_missing": ("chatglm1-tiny", lambda d: os.remove(f"{d}/ice_text.model"),
                               "", "has no ice_text.model"),
    "tokenizer_config_not_json": ("chatglm3-tiny", lambda d: open(f"{d}/tokenizer_config.json", "w").write("{"),
                                  "tokenizer_config.json", "not valid JSON"),
    "no_weights": ("chatglm2-tiny", lambda d: os.remove(f"{d}/model.safetensors"), "", "has no weights"),
    "empty_directory": (None, None, "", "has no config.json"),
}
# what the scripts are run on (each run is seconds of imports): every kind of file once, spread over the scripts;
# the tests above check every case where the scripts get their message from
CLI_DEMO, MODEL_MAIN = ["cli_demo.py"], ["-m", "model", "hello"]
SCRIPT_CASES = [(CLI_DEMO, "safetensors_truncated_in_header"), (CLI_DEMO, "config_not_json"),
                (CLI_DEMO, "config_without_hidden_size"), (CLI_DEMO, "tokenizer_model_missing"),
                (MODEL_MAIN, "bin_shard_truncated"), (MODEL_MAIN, "hidden_size_not_the_weights"),
                (MODEL_MAIN, "empty_directory")]


def broken_checkpoint(tmp_path, case: str) -> tuple[str, str, str]:
    """(directory, path of the file the message must name, phrase it must hold) for BROKEN[case]."""
    golden, breaks, culprit, phrase = BROKEN[case]
    directory = str(tmp_path / case)
    if golden is None:
        os.makedirs(directory)
    else:
        shutil.copytree(model_dir(golden), directory)
        breaks(directory)
    return directory, os.path.join(directory, culprit) if culprit else directory, phrase


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_load_model_raises_one_checkpoint_error_naming_the_file(tmp_path, case):
    directory, culprit, phrase = broken_checkpoint(tmp_path, case)
    with pytest.raises(CheckpointError) as raised:
        load_model(directory, device="cpu", dtype="float32")
    message = str(raised.value)
    assert culprit in message and phrase in message and "\n" not in message


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_service_from_args_gives_model_load_error(tmp_path, case):
    """Every script gets its service from model.flags.service_from_args, and web_demo2's page shows its
    ModelLoadError (the others print it): every broken checkpoint must arrive as one."""
    from model.flags import ModelLoadError, build_parser, service_from_args

    directory, culprit, phrase = broken_checkpoint(tmp_path, case)
    args = build_parser("test", engine=True).parse_args(["--model", directory, "--device", "cpu"])
    with pytest.raises(ModelLoadError, match=".") as raised:
        service_from_args(args)
    assert culprit in str(raised.value) and phrase in str(raised.value) and "\n" not in str(raised.value)


def run_script(*args, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def shown_lines(stderr: str) -> list[str]:
    """The lines stderr leaves on a terminal: a progress bar redrawn with carriage returns shows its last state."""
    return [line.rsplit("\r", 1)[-1] for line in stderr.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def assert_one_error_line(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in shown_lines(r.stderr) if "error:" in line]
    assert len(errors) == 1, r.stderr
    for needle in needles:
        assert needle in errors[0], r.stderr


@pytest.mark.slow  # runs the script as a process
@pytest.mark.parametrize("script,case", SCRIPT_CASES, ids=[f"{s[-1]}-{c}" for s, c in SCRIPT_CASES])
def test_scripts_print_one_line_for_a_broken_checkpoint(tmp_path, script, case):
    directory, culprit, phrase = broken_checkpoint(tmp_path, case)
    r = run_script(*script, "--model", directory, "--device", "cpu")
    assert_one_error_line(r, culprit, phrase)
    assert all(line.startswith(("error:", "INFO ", "WARNING ", "Loading ")) for line in shown_lines(r.stderr)), r.stderr


@pytest.mark.slow  # runs the script as a process
def test_servers_print_one_line_for_a_broken_checkpoint(tmp_path):
    directory, culprit, phrase = broken_checkpoint(tmp_path, "safetensors_shard_truncated_in_data")
    assert_one_error_line(run_script("openai_api.py", "--model", directory, "--device", "cpu"), culprit, phrase)


# ---- flags -----------------------------------------------------------------------------------------------------
def parse_error(parse, argv, capsys) -> str:
    """The argparse error line for argv (which must be refused with exit status 2)."""
    with pytest.raises(SystemExit) as exited:
        parse(argv)
    assert exited.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    return errors[0]


def server_args(argv):
    from server.http import server_parser

    return server_parser("test").parse_args(argv)


def cli_demo_args(argv):
    import cli_demo

    return cli_demo.parse_args(argv)


def model_main(argv):
    from model.__main__ import main

    return main(["hello", "--model", "/nonexistent", *argv])


NO_CUDA = not torch.cuda.is_available()
BAD_FLAGS = [
    (server_args, ["--port", "99999"], "1 to 65535"),
    (server_args, ["--port", "0"], "1 to 65535"),
    (server_args, ["--port", "http"], "1 to 65535"),
    (server_args, ["--max-batch", "0"], ">= 1"),
    (server_args, ["--prefill-chunk", "0"], ">= 1"),
    (server_args, ["--prefill-batch-tokens", "-1"], ">= 0"),
    (server_args, ["--prefix-cache-tokens", "-1"], ">= 0"),
    (server_args, ["--max-queue", "0"], ">= 1"),
    (server_args, ["--max-request-bytes", "-5"], ">= 1"),
    (server_args, ["--num-gpus", "0"], ">= 1"),
    (server_args, ["--dtype", "float8"], "bfloat16, float16, float32"),
    (cli_demo_args, ["--temperature", "-1"], ">= 0"),
    (cli_demo_args, ["--temperature", "nan"], ">= 0"),
    (cli_demo_args, ["--top-p", "0"], "> 0 and <= 1"),
    (cli_demo_args, ["--top-p", "1.5"], "> 0 and <= 1"),
    (cli_demo_args, ["--max-length", "0"], ">= 1"),
    (cli_demo_args, ["--num-gpus", "-1"], ">= 1"),
    (model_main, ["--max-new-tokens", "0"], ">= 1"),
    (model_main, ["--temperature", "-1"], ">= 0"),
    (model_main, ["--top-p", "2"], "> 0 and <= 1"),
    (model_main, ["--dtype", "int3"], "bfloat16, float16, float32"),
    (model_main, ["--device", "gpu"], "cuda"),
]


@pytest.mark.parametrize("parse,argv,allowed", BAD_FLAGS,
                         ids=[f"{p.__name__}{''.join(a)}" for p, a, _ in BAD_FLAGS])
def test_bad_flag_values_are_refused_with_the_allowed_range(parse, argv, allowed, capsys):
    line = parse_error(parse, argv, capsys)
    assert f"argument {argv[0]}:" in line and allowed in line


def test_good_flag_values_still_parse():
    args = server_args(["--port", "65535", "--max-queue", "1", "--prefill-chunk", "1", "--dtype", "bf16",
                        "--device", "cpu"])
    assert (args.port, args.max_queue, args.prefill_chunk, args.dtype, args.device) == (65535, 1, 1, "bf16", "cpu")
    args = cli_demo_args(["--temperature", "0", "--top-p", "1", "--max-length", "8"])
    assert (args.temperature, args.top_p, args.max_length) == (0.0, 1.0, 8)
    if torch.cuda.device_count() > 1:  # a numbered device that is there (argparse choices once refused it)
        assert cli_demo_args(["--device", "cuda:1"]).device == "cuda:1"
    defaults = cli_demo_args([])  # None: the model family's own sampling defaults
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.max_length) == (None, None, None, None)


@pytest.mark.parametrize("argv,needle", [
    (["openai_api.py", "--port", "99999"], "argument --port: 99999 is out of range; use an integer from 1 to 65535"),
    (["api.py", "--max-queue", "0"], "argument --max-queue: 0 is out of range; use an integer >= 1"),
    (["-m", "model", "--max-new-tokens", "0", "hi"], "argument --max-new-tokens: 0 is out of range"),
    (["cli_demo.py", "--temperature", "-1"], "argument --temperature: -1 is out of range; use a number >= 0"),
])
@pytest.mark.slow  # runs the script as a process
def test_scripts_refuse_bad_flags_before_loading(argv, needle):
    r = run_script(*argv, "--model", "/nonexistent")
    assert_one_error_line(r, needle)
    *usage, error = shown_lines(r.stderr)  # argparse's usage lines and the error, nothing else
    assert usage[0].startswith("usage: ") and all(line.startswith(" ") for line in usage[1:]), r.stderr
    assert "error:" in error, r.stderr


# ---- devices that are not there --------------------------------------------------------------------------------
MISSING_DEVICE = "cuda" if NO_CUDA else f"cuda:{torch.cuda.device_count()}"


def test_load_model_says_the_device_is_not_there():
    with pytest.raises(DeviceUnavailableError, match=re.escape(f"'{MISSING_DEVICE}'")):
        load_model(model_dir("chatglm2-tiny"), device=MISSING_DEVICE)


@pytest.mark.slow  # runs the script as a process
@pytest.mark.skipif(not NO_CUDA, reason="this torch has CUDA")
@pytest.mark.parametrize("script", [CLI_DEMO, MODEL_MAIN], ids=["cli_demo", "python-m-model"])
def test_scripts_say_torch_has_no_cuda(script):
    r = run_script(*script, "--model", model_dir("chatglm2-tiny"), "--device", "cuda")
    assert_one_error_line(r, "argument --device:", "no CUDA", "install a CUDA build of torch", "--device cpu")


def test_model_main_says_the_device_is_not_there(capsys):
    line = parse_error(model_main, ["--device", MISSING_DEVICE], capsys)
    assert "argument --device:" in line and ("--device cpu" in line or "cuda:0" in line)
