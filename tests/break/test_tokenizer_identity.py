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


# ---- a model's own tokenizer code (--trust-remote-code)

def _custom_tokenizer(model_dir, folder, normalises: bool):
    """A copy of the model whose tokenizer is a Python class shipped beside it (tokenizer_config.json's
    auto_map, as Qwen-1's tokenization_qwen.py): version 2 of its code maps 'colour' to 'color'."""
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="CustomTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenization_custom.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n"
        "    def __call__(self, text=None, *args, **kwargs):\n"
        f"        if {normalises} and isinstance(text, str):\n"
        "            text = text.replace('colour', 'color')\n"
        "        return super().__call__(text, *args, **kwargs)\n")
    return folder


def test_a_custom_tokenizers_code_is_part_of_its_fingerprint(tiny_model_dir, tmp_path):
    from mlx_dpo.models import load_tokenizer
    from mlx_dpo.schemas import tokenizer_fingerprint

    v1 = load_tokenizer(_custom_tokenizer(tiny_model_dir, tmp_path / "v1", False), trust_remote_code=True)
    v2 = load_tokenizer(_custom_tokenizer(tiny_model_dir, tmp_path / "v2", True), trust_remote_code=True)
    text = "The colour is red."
    assert v1(text)["input_ids"] != v2(text)["input_ids"]  # the premise: the code changes the ids
    assert tokenizer_fingerprint(v1) != tokenizer_fingerprint(v2)


def test_a_cache_is_not_reused_after_the_tokenizer_code_changed(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}: which colour?", "chosen": " The colour red.",
                                               "rejected": " Blue."} for i in range(3)])
    for version, normalises in (("v1", False), ("v2", True)):
        model = _custom_tokenizer(tiny_model_dir, tmp_path / version, normalises)
        result = run_cli("precompute", "--model", model, "--data", data, "--out", tmp_path / "c", "--max-length", "64",
                         "--trust-remote-code", ok=version == "v1")
    assert "Reusing cache" not in result.output, result.output
