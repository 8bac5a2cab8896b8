"""The tiny test model is the same model under torch (transformers) and MLX (mlx_lm), and is built deterministically."""

import json

import numpy as np

import tiny_models


def _encode(tokenizer):
    text = "The capital of France is Paris.</s>"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    return ids


def test_mlx_lm_loads_the_same_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids = _encode(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        torch_logits = model(torch.tensor([ids])).logits[0].float().numpy()

    import mlx.core as mx
    import mlx_lm

    mlx_model, mlx_tokenizer = mlx_lm.load(str(tiny_model_dir))
    mlx_logits = np.array(mlx_model(mx.array([ids]))[0].astype(mx.float32))

    assert mlx_tokenizer.encode("The capital of France is Paris.</s>") == ids
    assert torch_logits.shape == mlx_logits.shape == (len(ids), len(tokenizer))
    assert torch_logits.std() > 0.3, "logits are nearly flat: the parity tests would be weak"
    diff = np.abs(torch_logits - mlx_logits).max()
    print(f"max |torch - mlx| logit diff: {diff:.2e}")
    assert diff < 1e-4


def test_tokenizer_is_llama_like(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert 300 <= len(tok) <= 500
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert tok("Hello")["input_ids"][0] == tok.bos_token_id  # post-processor prepends bos, no eos appended
    assert tok("Hello")["input_ids"][-1] != tok.eos_token_id

    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chosen = [{"role": "assistant", "content": "Hello!"}]
    prompt_ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    full_ids = tok.apply_chat_template(prompt + chosen, tokenize=True, return_dict=True)
    prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
    assert prompt_ids[0] == tok.bos_token_id and prompt_ids.count(tok.bos_token_id) == 1
    assert full_ids[: len(prompt_ids)] == prompt_ids  # generation prompt is a prefix of the full conversation
    assert full_ids[-1] == tok.eos_token_id  # assistant turns end with eos

    # Byte-level BPE: a prompt ending mid-word does not tokenize as a prefix of prompt + completion.
    row = tiny_models.standard_rows()[1]
    assert row["prompt"].endswith("Fra")
    p, pc = tok(row["prompt"])["input_ids"], tok(row["prompt"] + row["chosen"])["input_ids"]
    assert pc[: len(p)] != p


def test_builders_are_deterministic(tmp_path):
    import torch
    from safetensors.torch import load_file

    a = tiny_models.build_llama(tmp_path / "a", seed=0)
    tiny_models.build_llama(tmp_path / "b", seed=0)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(t.dtype == torch.float32 for t in wa.values())
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is False
    assert sum(p.numel() for p in a.parameters()) < 200_000


def test_write_jsonl_round_trip(tmp_path):
    rows = tiny_models.conversational_rows()
    path = tiny_models.write_jsonl(tmp_path / "x.jsonl", rows)
    assert tiny_models.read_jsonl(path) == rows
    assert any(m["role"] == "system" for r in rows for m in r["prompt"])
    assert 10 <= len(tiny_models.standard_rows()) <= 14 and 6 <= len(rows) <= 10
