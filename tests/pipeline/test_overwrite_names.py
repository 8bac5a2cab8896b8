"""precompute --overwrite next to a folder named like one of our temp files (review break14b).

A killed writer leaves `.NAME.PID.tmp` files, which precompute removes; a folder of that name is not one of
them. It used to crash every --overwrite with IsADirectoryError (a traceback) before building."""

import pytest

import tiny_models

run = tiny_models.invoke_cli


def precompute(model, data, out, max_length, *extra):
    return run("precompute", "--model", model, "--data", data, "--out", out, "--max-length", max_length,
               "--rows-per-shard", 8, "--tokens-per-batch", 256, *extra)


@pytest.mark.parametrize("name", ["train/.part-00000.4242.tmp", ".manifest.4242.tmp"])
def test_a_folder_named_like_a_temp_file_is_left_alone(tiny_model_dir, standard_data, tmp_path, name):
    cache = tmp_path / "c"
    assert precompute(tiny_model_dir, standard_data, cache, 24).exit_code == 0
    (cache / name).mkdir()
    (cache / name / "x").write_text("x")
    result = precompute(tiny_model_dir, standard_data, cache, 30, "--overwrite")
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 0, result.output
    assert run("cache", "verify", cache).exit_code == 0
    assert (cache / name / "x").read_text() == "x"  # not ours: it stays
