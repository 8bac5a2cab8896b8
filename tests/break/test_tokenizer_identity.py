"""Break: tokenizer_config.json's `split_special_tokens` changes every token id of text holding a
special token (the EOS precompute appends to plain-text answers, the role tokens a chat template
renders), but not the fingerprint: its probe string holds no special token, and the flag lives in
the Python wrapper (transformers sets it on the backend per call), not in the backend's serialization.

README (Identity): the tokenizer fingerprint covers "the tokenizer's whole behaviour"; "`train`
checks the cache against its policy's tokenizer and refuses a mismatch".
"""

import json
import shutil

from tiny_models import run_cli, write_jsonl


def _split_special(model_dir, tmp_path):
    copy = tmp_path / "model-split-special"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["split_special_tokens"] = True
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    return copy


def test_split_special_tokens_changes_the_tokenizer_fingerprint(tiny_model_dir, tmp_path):
    from mlx_dpo.models import load_tokenizer
    from mlx_dpo.schemas import tokenizer_fingerprint

    plain, split = load_tokenizer(tiny_model_dir), load_tokenizer(_split_special(tiny_model_dir, tmp_path))
    text = "Hi there." + plain.eos_token  # what precompute tokenizes for a plain-text answer
    assert plain(text)["input_ids"] != split(text)["input_ids"]  # the two tokenize the data differently
    assert tokenizer_fingerprint(plain) != tokenizer_fingerprint(split)


def test_a_cache_of_other_token_ids_is_not_reused_for_split_special_tokens(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}: hi?", "chosen": " yes.", "rejected": " no."}
                                             for i in range(3)])
    run_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "c", "--max-length", "64")
    result = run_cli("precompute", "--model", _split_special(tiny_model_dir, tmp_path), "--data", data,
                     "--out", tmp_path / "c", "--max-length", "64", ok=False)
    assert "Reusing cache" not in result.output, result.output
